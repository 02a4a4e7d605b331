//! The `mmio` target: one trapped access to an emulated MMIO window, fetched
//! through page tables the input writes (hostile: entries pointing anywhere,
//! loops, reserved bits, large pages), decoded and carried out on a device
//! that records what reaches it.
//!
//! Properties:
//! * the walk and the fetch never touch host memory outside the guest's
//!   RAM ([`Ram`] panics);
//! * a refused access changes nothing: the vCPU is bit-identical, the device
//!   saw no access, guest RAM was not written;
//! * an emulated access reached the device exactly once, at the faulting
//!   offset, with the decoded size, inside the faulting page; RIP moved by the
//!   instruction's length, the interrupt shadow ended, and no register but
//!   the load's destination changed (to the value the device answered,
//!   extended as the instruction says);
//! * the decoder agrees with itself: a decoded instruction has the length
//!   `instruction_length` finds, at most 15 bytes.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::guest::access::{GuestAccess, Paging, Principal};
use hypervisor::integrity::View;
use hypervisor::mmio::decode::{self, Extend, MmioOp, Source};
use hypervisor::mmio::{emulate, MmioDevice};
use hypervisor::vcpu::{ExitInfo, Field, VcpuState};

use super::fakes::{GuestRam, Vcpu};

/// Guest RAM: 16 pages at guest-physical 0.
const RAM: u64 = 16 * 0x1000;
/// The emulated window (the TIS's place).
const WINDOW: u64 = 0xfed4_0000;

/// A page-table entry: most point at a page of guest RAM with chosen
/// flags (so that walks go deep), some are any 64-bit value.
#[derive(Arbitrary, Debug)]
pub enum Entry {
    Page { page: u8, flags: u16 },
    Raw(u64),
}

impl Entry {
    pub fn value(&self) -> u64 {
        match *self {
            Entry::Page { page, flags } => (u64::from(page % 20) << 12) | u64::from(flags & 0xfff) | 1,
            Entry::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// (page, index, entry): entries written into guest RAM.
    entries: Vec<(u8, u16, Entry)>,
    /// CR3's page (the PML4), or any value.
    cr3: Entry,
    cr0_cr4_efer: Option<(u64, u64, u64)>,
    cs_access_rights: Option<u16>,
    /// RIP: a linear address built from four table indices and an offset,
    /// or any value.
    rip: Result<(u16, u16, u16, u16, u16), u64>,
    /// The instruction's bytes, written at RIP's translation when it has one.
    code: [u8; 16],
    /// Where the code goes in guest RAM when RIP does not translate.
    code_gpa: u16,
    /// Registers: small ones are offsets into the window's page, so that a
    /// memory operand can match the fault.
    regs: [u64; 16],
    near_fault: u16,
    fs_gs: (u64, u64),
    /// EPT violation qualification bits 0-2 (read, write, fetch).
    access: u8,
    /// Fault offset into the window (or below it).
    fault: i32,
    interruptibility: u8,
    answer: u64,
}

#[derive(Default)]
struct Device {
    /// (store, offset, size, value)
    accesses: Vec<(bool, u64, u8, u64)>,
    answer: u64,
}

impl MmioDevice for Device {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.accesses.push((false, offset, size, 0));
        self.answer
    }
    fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.accesses.push((true, offset, size, value));
    }
}

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

fn linear(indices: (u16, u16, u16, u16, u16)) -> u64 {
    let (a, b, c, d, off) = indices;
    let l = (u64::from(a & 0x1ff) << 39)
        | (u64::from(b & 0x1ff) << 30)
        | (u64::from(c & 0x1ff) << 21)
        | (u64::from(d & 0x1ff) << 12)
        | u64::from(off & 0xfff);
    // Sign-extend bit 47: canonical.
    ((l << 16) as i64 >> 16) as u64
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    check_decoder(&input.code);
    let g = GuestRam::new(RAM);
    for (page, index, entry) in input.entries.iter().take(64) {
        let at = u64::from(page % 16) * 0x1000 + u64::from(index & 0x1ff) * 8;
        g.write(at, &entry.value().to_le_bytes());
    }
    let mut vcpu = Vcpu::default();
    let (cr0, cr4, efer) = input.cr0_cr4_efer.unwrap_or((0x8001_0001, 1 << 5, (1 << 8) | (1 << 10) | (1 << 11)));
    vcpu.write(Field::Cr0, cr0);
    vcpu.write(Field::Cr3, input.cr3.value() & !1);
    vcpu.write(Field::Cr4, cr4);
    vcpu.write(Field::Efer, efer);
    vcpu.write(Field::CsAccessRights, input.cs_access_rights.map_or(0xa09b, u64::from));
    vcpu.write(Field::Rflags, 2);
    let rip = match input.rip {
        Ok(indices) => linear(indices),
        Err(any) => any,
    };
    vcpu.write(Field::Rip, rip);
    vcpu.write(Field::Interruptibility, u64::from(input.interruptibility & 0xf));
    vcpu.write(Field::FsBase, input.fs_gs.0);
    vcpu.write(Field::GsBase, input.fs_gs.1);
    let gpa = WINDOW.wrapping_add_signed(i64::from(input.fault % 0x6000));
    for (i, r) in input.regs.iter().enumerate() {
        let v = if *r < 0x100 { (gpa & !0xfff) | u64::from(input.near_fault & 0xfff) } else { *r };
        vcpu.set_gpr(i as u8, v);
    }
    // The code, where RIP leads (the walk is the code under test, so the
    // harness places it with a plain reference walk of 4 KiB pages only) or
    // at a chosen place.
    let at = reference_walk(&g, vcpu.read(Field::Cr3), rip).unwrap_or(u64::from(input.code_gpa) % (RAM - 16));
    if at + 16 <= RAM {
        g.write(at, &input.code);
    }
    let writes_before = g.phys.writes.get();
    let exit = ExitInfo {
        reason: 48,
        qualification: u64::from(input.access & 7) | (1 << 7) | (1 << 8),
        guest_physical: gpa,
        guest_linear: rip,
        ..Default::default()
    };
    let mut device = Device { answer: input.answer, ..Default::default() };
    let before = vcpu.clone();
    let who = Principal::current(&vcpu, View::Kernel);
    let access = GuestAccess::new(&g.memory, &g.phys, Paging::from_vcpu(&vcpu), who, None);
    match emulate(&mut vcpu, &exit, &access, &mut device, WINDOW) {
        Err(e) => {
            assert_eq!(vcpu, before, "a refused access changed the vCPU: {e}");
            assert!(device.accesses.is_empty(), "a refused access reached the device: {e}");
            assert_eq!(g.phys.writes.get(), writes_before, "a refused access wrote guest memory: {e}");
            assert!(usize::from(e.len) <= 15, "{e:?}");
            let _ = e.to_string();
        }
        Ok(done) => {
            let size = done.op.size();
            assert_eq!(device.accesses.len(), 1, "{:?}", device.accesses);
            let (store, offset, width, written) = device.accesses[0];
            assert_eq!((store, offset, width), (done.op.is_store(), gpa.wrapping_sub(WINDOW), size));
            assert!(gpa >= WINDOW && (gpa & 0xfff) + u64::from(size) <= 0x1000, "the access leaves its page");
            assert_eq!(g.phys.writes.get(), writes_before, "emulation wrote guest memory");
            let mut expected = before.clone();
            expected.write(Field::Rip, rip.wrapping_add(u64::from(done.len)));
            expected.write(Field::Interruptibility, before.read(Field::Interruptibility) & !3);
            match done.op {
                MmioOp::Load { size, dst, extend } => {
                    let raw = input.answer & mask(size);
                    assert_eq!(done.value, raw);
                    let widened = match (extend, size) {
                        (Extend::Sign, 1) => raw as i8 as i64 as u64,
                        (Extend::Sign, 2) => raw as i16 as i64 as u64,
                        (Extend::Sign, 4) => raw as i32 as i64 as u64,
                        _ => raw,
                    };
                    let old = before.gpr(dst.index);
                    let new = match (dst.size, dst.high_byte) {
                        (1, true) => (old & !0xff00) | ((widened & 0xff) << 8),
                        (1, false) => (old & !0xff) | (widened & 0xff),
                        (2, _) => (old & !0xffff) | (widened & 0xffff),
                        (4, _) => widened & 0xffff_ffff,
                        _ => widened,
                    };
                    expected.set_gpr(dst.index, new);
                }
                MmioOp::Store { size, src } => {
                    let v = match src {
                        Source::Imm(imm) => imm,
                        Source::Gpr(r) if r.high_byte => before.gpr(r.index) >> 8,
                        Source::Gpr(r) => before.gpr(r.index),
                    } & mask(size);
                    assert_eq!((written, done.value), (v, v));
                }
            }
            assert_eq!(vcpu, expected, "more changed than the destination and RIP");
        }
    }
}

/// 4-level walk over 4 KiB pages only, no permission checks: where the
/// harness puts the code. Not an oracle for the walker under test.
fn reference_walk(g: &GuestRam, cr3: u64, linear: u64) -> Option<u64> {
    let mut table = cr3 & 0x000f_ffff_ffff_f000;
    for level in (1..=4).rev() {
        let index = (linear >> (12 + 9 * (level - 1))) & 0x1ff;
        let at = table.checked_add(index * 8)?;
        if at + 8 > RAM {
            return None;
        }
        let mut e = [0u8; 8];
        g.memory.read(&g.phys, at, &mut e).ok()?;
        let e = u64::from_le_bytes(e);
        if e & 1 == 0 || (level > 1 && e & 0x80 != 0) {
            return None;
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    let gpa = table | (linear & 0xfff);
    (gpa + 16 <= RAM).then_some(gpa)
}

/// The decoder on the raw bytes: no panic, a length within the bytes and
/// 15, the same length `instruction_length` finds.
fn check_decoder(code: &[u8; 16]) {
    if let Ok(d) = decode::decode(code, 64, 0xffff_ffff_8100_0000) {
        assert!(usize::from(d.len) <= 15 && d.len > 0, "length {}", d.len);
        assert_eq!(decode::instruction_length(code), Some(d.len));
        let _ = decode::describe(&d.instruction);
    }
}
