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
//!   `instruction_length` finds, at most 15 bytes;
//! * for an instruction the input describes (`Insn`: MOV, MOVZX, MOVSX,
//!   MOVSXD loads and MOV stores of registers and immediates, with and
//!   without REX and the operand-size prefix, the byte registers AH..BH
//!   included) and the harness encodes, an emulated access does exactly
//!   what the encoding means, by the harness's own reading of it, not the
//!   decoder's: the register written (and how it merges or extends), the
//!   width, the value stored. [`register_cases`] lists every byte register
//!   and width for the stable smoke test.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::guest::access::{GuestAccess, Paging, Principal};
use hypervisor::integrity::View;
use hypervisor::mmio::decode::{self, Extend, MmioOp, Source};
use hypervisor::mmio::Emulated;
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

/// The instruction forms the harness encodes and knows the meaning of.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// 8A /r: MOV r8, m8.
    Load8,
    /// 8B /r: MOV r, m.
    Load,
    /// 0F B6 / 0F B7 /r: MOVZX r, m8 / m16.
    Movzx8,
    Movzx16,
    /// 0F BE / 0F BF /r: MOVSX r, m8 / m16.
    Movsx8,
    Movsx16,
    /// REX.W 63 /r: MOVSXD r64, m32.
    Movsxd,
    /// 88 /r: MOV m8, r8.
    Store8,
    /// 89 /r: MOV m, r.
    Store,
    /// C6 /0 ib, C7 /0 iw/id: MOV m, imm.
    StoreImm8,
    StoreImm,
}

/// One instruction: its form, REX (W and R bits; none is not REX 0x40),
/// the operand-size prefix, ModRM.reg, the base register of `[base]`
/// (one of RAX, RCX, RDX, RBX, RSI, RDI) and the immediate.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Insn {
    pub form: Form,
    pub rex: Option<u8>,
    pub opsize16: bool,
    pub reg: u8,
    pub base: u8,
    pub imm: u32,
    /// The exit reports the access the instruction makes (else the input's).
    pub honest: bool,
}

const BASES: [u8; 6] = [0, 1, 2, 3, 6, 7];

impl Insn {
    fn rex(&self) -> Option<u8> {
        let rex = self.rex.map(|r| 0x40 | (r & 0xc));
        if self.form == Form::Movsxd {
            Some(rex.unwrap_or(0x40) | 8)
        } else {
            rex
        }
    }
    fn w(&self) -> bool {
        self.rex().is_some_and(|r| r & 8 != 0)
    }
    fn base(&self) -> u8 {
        BASES[usize::from(self.base) % BASES.len()]
    }
    fn is_store(&self) -> bool {
        matches!(self.form, Form::Store8 | Form::Store | Form::StoreImm8 | Form::StoreImm)
    }

    /// The width of a register or immediate operand without a fixed size:
    /// 8 with REX.W, 2 with 66, else 4.
    fn operand_size(&self) -> u8 {
        if self.w() {
            8
        } else if self.opsize16 {
            2
        } else {
            4
        }
    }

    /// The encoding, padded with `tail` to 16 bytes.
    pub fn encode(&self, tail: &[u8; 16]) -> [u8; 16] {
        self.encoded(tail).0
    }

    /// The encoding padded with `tail`, and its length.
    fn encoded(&self, tail: &[u8; 16]) -> ([u8; 16], usize) {
        let mut b = Vec::new();
        if self.opsize16 {
            b.push(0x66);
        }
        b.extend(self.rex());
        let opcode: &[u8] = match self.form {
            Form::Load8 => &[0x8a],
            Form::Load => &[0x8b],
            Form::Movzx8 => &[0x0f, 0xb6],
            Form::Movzx16 => &[0x0f, 0xb7],
            Form::Movsx8 => &[0x0f, 0xbe],
            Form::Movsx16 => &[0x0f, 0xbf],
            Form::Movsxd => &[0x63],
            Form::Store8 => &[0x88],
            Form::Store => &[0x89],
            Form::StoreImm8 => &[0xc6],
            Form::StoreImm => &[0xc7],
        };
        b.extend_from_slice(opcode);
        let reg = if matches!(self.form, Form::StoreImm8 | Form::StoreImm) { 0 } else { self.reg & 7 };
        b.push((reg << 3) | self.base());
        match self.form {
            Form::StoreImm8 => b.push(self.imm as u8),
            Form::StoreImm if self.operand_size() == 2 => b.extend_from_slice(&(self.imm as u16).to_le_bytes()),
            Form::StoreImm => b.extend_from_slice(&self.imm.to_le_bytes()),
            _ => {}
        }
        let mut out = *tail;
        out[..b.len()].copy_from_slice(&b);
        (out, b.len())
    }

    /// The register ModRM.reg names, as (index, width, high byte): the
    /// byte registers are AL..BH without REX, AL..DIL and R8B.. with it.
    fn register(&self, width: u8) -> (u8, u8, bool) {
        let r = self.rex().is_some_and(|x| x & 4 != 0);
        let index = (self.reg & 7) | if r { 8 } else { 0 };
        if width == 1 && self.rex().is_none() && index >= 4 {
            (index - 4, 1, true)
        } else {
            (index, width, false)
        }
    }

    /// (access width, destination width, sign-extends) of a load.
    fn load(&self) -> (u8, u8, bool) {
        match self.form {
            Form::Load8 => (1, 1, false),
            Form::Load => (self.operand_size(), self.operand_size(), false),
            Form::Movzx8 => (1, self.operand_size(), false),
            Form::Movzx16 => (2, self.operand_size(), false),
            Form::Movsx8 => (1, self.operand_size(), true),
            Form::Movsx16 => (2, self.operand_size(), true),
            _ => (4, 8, true),
        }
    }
}

/// A register as the processor writes it: bytes and words merge, a
/// doubleword zero-extends, AH..BH are bits 15:8.
fn merged(old: u64, value: u64, width: u8, high: bool) -> u64 {
    match (width, high) {
        (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (old & !0xff) | (value & 0xff),
        (2, _) => (old & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    }
}

fn extend(raw: u64, from: u8, sign: bool) -> u64 {
    match (sign, from) {
        (true, 1) => raw as i8 as i64 as u64,
        (true, 2) => raw as i16 as i64 as u64,
        (true, 4) => raw as i32 as i64 as u64,
        _ => raw,
    }
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    /// (page, index, entry): entries written into guest RAM.
    pub entries: Vec<(u8, u16, Entry)>,
    /// CR3's page (the PML4), or any value.
    pub cr3: Entry,
    pub cr0_cr4_efer: Option<(u64, u64, u64)>,
    pub cs_access_rights: Option<u16>,
    /// RIP: a linear address built from four table indices and an offset,
    /// or any value.
    pub rip: Result<(u16, u16, u16, u16, u16), u64>,
    /// The instruction's bytes, written at RIP's translation when it has one.
    pub code: [u8; 16],
    /// Where the code goes in guest RAM when RIP does not translate.
    pub code_gpa: u16,
    /// Registers: small ones are offsets into the window's page, so that a
    /// memory operand can match the fault.
    pub regs: [u64; 16],
    pub near_fault: u16,
    pub fs_gs: (u64, u64),
    /// EPT violation qualification bits 0-2 (read, write, fetch).
    pub access: u8,
    /// Fault offset into the window (or below it).
    pub fault: i32,
    pub interruptibility: u8,
    pub answer: u64,
    /// An instruction to encode at RIP instead of `code` (last, so that
    /// the inputs of earlier campaigns keep their meaning).
    pub insn: Option<Insn>,
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
    check(&input);
}

/// Every byte register as the destination of MOV r8, m8 and the source of
/// MOV m8, r8 (and every width of MOV, MOVZX, MOVSX), with and without
/// REX, as honest accesses the emulator must carry out: the cases a
/// campaign's corpus may happen to lack.
pub fn register_cases() -> Vec<Input> {
    let mut out = Vec::new();
    let forms = [Form::Load8, Form::Store8, Form::Load, Form::Store, Form::Movzx8, Form::Movsx16, Form::Movsxd];
    for form in forms {
        for rex in [None, Some(0), Some(4), Some(8), Some(0xc)] {
            for opsize16 in [false, true] {
                for reg in 0..8u8 {
                    let insn = Insn { form, rex, opsize16, reg, base: reg.wrapping_add(1), imm: 0, honest: true };
                    out.push(Input {
                        entries: Vec::new(),
                        cr3: Entry::Raw(0),
                        // Paging off (RIP is the code's guest-physical
                        // address), IA-32e mode and a 64-bit CS.
                        cr0_cr4_efer: Some((1, 1 << 5, (1 << 8) | (1 << 10))),
                        cs_access_rights: None,
                        rip: Err(0x3000),
                        code: [0x90; 16],
                        code_gpa: 0x3000,
                        regs: core::array::from_fn(|i| 0x0123_4567_89ab_cdef_u64.rotate_left(8 * i as u32)),
                        near_fault: 0,
                        fs_gs: (0, 0),
                        access: 0,
                        fault: 0x18 + i32::from(reg),
                        interruptibility: 0,
                        answer: 0x8877_6655_4433_22f1,
                        insn: Some(insn),
                    });
                }
            }
        }
    }
    out
}

/// One trapped access, checked.
pub fn check(input: &Input) -> Option<Emulated> {
    let code = match input.insn {
        Some(insn) => insn.encode(&input.code),
        None => input.code,
    };
    check_decoder(&code);
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
    if let Some(insn) = input.insn {
        // [base] is the faulting address.
        vcpu.set_gpr(insn.base(), gpa);
    }
    // The code, where RIP leads (the walk is the code under test, so the
    // harness places it with a plain reference walk of 4 KiB pages only) or
    // at a chosen place.
    let at = reference_walk(&g, vcpu.read(Field::Cr3), rip).unwrap_or(u64::from(input.code_gpa) % (RAM - 16));
    if at + 16 <= RAM {
        g.write(at, &code);
    }
    let writes_before = g.phys.writes.get();
    let access = match input.insn {
        Some(insn) if insn.honest => 1 << u8::from(insn.is_store()),
        _ => input.access & 7,
    };
    let exit = ExitInfo {
        reason: 48,
        qualification: u64::from(access) | (1 << 7) | (1 << 8),
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
            None
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
            // The harness placed the encoding where its own 4 KiB walk
            // puts RIP; the tables may send the fetch elsewhere (a large
            // page). Only the instruction it encoded is held to its meaning.
            if let Some(insn) = input.insn {
                let (encoding, n) = insn.encoded(&input.code);
                let mut fetched = [0u8; 15];
                let got = access.fetch_instruction(rip, &mut fetched).unwrap_or(0);
                if got >= n && fetched[..n] == encoding[..n] {
                    assert_eq!(usize::from(done.len), n, "{insn:?}: the length of {:02x?}", &encoding[..n]);
                    meant(&insn, &before, &vcpu, &device, input.answer, done.len);
                }
            }
            Some(done)
        }
    }
}

/// What the encoding of `insn` means, by the harness's reading of it, held
/// against what the emulation did: the device access and the registers.
fn meant(insn: &Insn, before: &Vcpu, after: &Vcpu, device: &Device, answer: u64, len: u8) {
    let what = format!("{insn:?} ({:02x?})", &insn.encode(&[0; 16])[..usize::from(len)]);
    let (store, _, width, value) = device.accesses[0];
    let mut expected = before.clone();
    expected.write(Field::Rip, before.read(Field::Rip).wrapping_add(u64::from(len)));
    expected.write(Field::Interruptibility, before.read(Field::Interruptibility) & !3);
    assert_eq!(store, insn.is_store(), "{what}: direction");
    match insn.form {
        Form::Store8 | Form::Store => {
            let (index, size, high) = insn.register(if insn.form == Form::Store8 { 1 } else { insn.operand_size() });
            let full = before.gpr(index);
            let v = if high { (full >> 8) & 0xff } else { full & mask(size) };
            assert_eq!((width, value), (size, v), "{what}: the store");
        }
        Form::StoreImm8 => assert_eq!((width, value), (1, u64::from(insn.imm as u8)), "{what}: the store"),
        Form::StoreImm => {
            let size = insn.operand_size();
            let imm = if size == 2 { u64::from(insn.imm as u16) } else { insn.imm as i32 as i64 as u64 };
            assert_eq!((width, value), (size, imm & mask(size)), "{what}: the store");
        }
        _ => {
            let (from, to, sign) = insn.load();
            assert_eq!(width, from, "{what}: the load's width");
            let (index, size, high) = insn.register(to);
            let v = extend(answer & mask(from), from, sign);
            expected.set_gpr(index, merged(before.gpr(index), v, size, high));
        }
    }
    assert_eq!(*after, expected, "{what}: registers");
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
