//! The emulation step for one trapped access: fetch the instruction at RIP
//! through the guest's page tables, decode it, check it against what the
//! processor reported, perform it on the device, write the destination
//! register, advance RIP.
//!
//! Only 64-bit code is emulated: there CS's base is 0, so RIP is the
//! linear address of the instruction. Anything that cannot be emulated
//! exactly returns an [`MmioError`] and leaves the guest's state untouched
//! (the device has not been accessed either); the caller stops the guest.

use alloc::string::String;
use core::fmt;

use iced_x86::{OpKind, Register};

use super::decode::{self, gpr, DecodeError, Extend, Gpr, MmioOp, Source};
use super::MmioDevice;
use crate::arch::x86_64::vmx::ept::{Access, ViolationInfo};
use crate::guest::access::{AccessError, GuestAccess, MAX_INSTRUCTION_LEN};
use crate::vcpu::{skip_instruction, ExitInfo, Field, VcpuState};

const EFER_LMA: u64 = 1 << 10;
const CS_LONG: u64 = 1 << 13;
const CS_DB: u64 = 1 << 14;
const PAGE_SIZE: u64 = 0x1000;

/// What was emulated (for tracing and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulated {
    pub op: MmioOp,
    /// Offset of the access from the window's base.
    pub offset: u64,
    /// The value read (before extension) or written.
    pub value: u64,
    /// Instruction length; RIP moved by this much.
    pub len: u8,
}

/// Why an access was not emulated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The code segment is not 64-bit (16, 32).
    NotLongMode {
        bitness: u32,
    },
    Fetch(AccessError),
    Decode(DecodeError),
    /// The processor reported `access`, the instruction does the other
    /// (or an instruction fetch from the window).
    Direction {
        access: Access,
        store: bool,
    },
    /// The faulting address lies below the window's base.
    OutsideWindow {
        base: u64,
    },
    /// The access does not fit in the faulting page.
    CrossesPage {
        size: u8,
    },
    /// The instruction's memory operand is not the faulting address (an
    /// access that starts in the page before the window).
    AddressMismatch {
        linear: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotLongMode { bitness } => {
                write!(f, "only 64-bit code is emulated (this is {bitness}-bit)")
            }
            Reason::Fetch(e) => write!(f, "cannot fetch the instruction: {e}"),
            Reason::Decode(e) => write!(f, "{e}"),
            Reason::Direction { access, store } => {
                if *access == Access::Execute {
                    f.write_str("instruction fetch from an emulated MMIO window")
                } else {
                    let does = if *store { "stores" } else { "loads" };
                    write!(f, "the processor reported a {} but the instruction {does}", access.name())
                }
            }
            Reason::OutsideWindow { base } => {
                write!(f, "the address is below the window at {base:#x}")
            }
            Reason::CrossesPage { size } => {
                write!(f, "its {size}-byte access crosses a page boundary")
            }
            Reason::AddressMismatch { linear } => {
                write!(f, "its memory operand (guest-linear {linear:#x}) is not the faulting address")
            }
        }
    }
}

/// A trapped access that was not emulated, with what is known of the
/// instruction. Displays as one line for the stop report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioError {
    pub rip: u64,
    pub gpa: u64,
    /// The bytes fetched at RIP (the instruction's own when it decoded).
    pub bytes: [u8; MAX_INSTRUCTION_LEN],
    pub len: u8,
    /// The instruction's text, when it decoded.
    pub text: Option<String>,
    pub reason: Reason,
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot emulate ")?;
        match &self.text {
            Some(text) => write!(f, "`{text}` (")?,
            None if self.len > 0 => f.write_str("the instruction (")?,
            None => f.write_str("the access")?,
        }
        for (i, b) in self.bytes.iter().take(usize::from(self.len)).enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        if self.text.is_some() || self.len > 0 {
            f.write_str(")")?;
        }
        write!(f, " at rip {:#x}, guest-physical {:#x}: {}", self.rip, self.gpa, self.reason)
    }
}

/// Emulates the access that caused `exit` (an EPT violation at
/// `exit.guest_physical`) against `device`, whose window starts at
/// guest-physical `base`. The caller has checked that the address is inside
/// the window; the device gets `gpa - base` and must itself answer offsets
/// near its end (an access may run past it, never past the page). On
/// success the destination register (loads) is written and RIP is past the
/// instruction, with the STI/MOV-SS shadow ended; on error nothing changed.
///
/// Allocation-free unless it fails.
pub fn emulate(
    vcpu: &mut dyn VcpuState,
    exit: &ExitInfo,
    memory: &GuestAccess<'_>,
    device: &mut dyn MmioDevice,
    base: u64,
) -> Result<Emulated, MmioError> {
    let rip = vcpu.read(Field::Rip);
    let gpa = exit.guest_physical;
    let mut error = MmioError {
        rip,
        gpa,
        bytes: [0; MAX_INSTRUCTION_LEN],
        len: 0,
        text: None,
        reason: Reason::OutsideWindow { base },
    };
    let fail = |mut error: MmioError, reason| {
        error.reason = reason;
        Err(error)
    };

    let bitness = bitness(vcpu);
    if bitness != 64 {
        return fail(error, Reason::NotLongMode { bitness });
    }
    let fetched = match memory.fetch_instruction(rip, &mut error.bytes) {
        Ok(n) => n,
        Err(e) => return fail(error, Reason::Fetch(e)),
    };
    error.len = fetched as u8;
    let decoded = match decode::decode(&error.bytes[..fetched], bitness, rip) {
        Ok(d) => d,
        Err(e) => {
            if let DecodeError::Unsupported { text, len, .. } = &e {
                error.text = Some(text.clone());
                error.len = *len;
            }
            return fail(error, Reason::Decode(e));
        }
    };
    error.len = decoded.len;
    let op = decoded.op;
    if let Err(reason) = check(vcpu, exit, &decoded, base) {
        // Only now is the text worth an allocation.
        error.text = Some(decode::describe(&decoded.instruction));
        return fail(error, reason);
    }
    let offset = gpa.wrapping_sub(base);
    let size = op.size();

    let mask = size_mask(size);
    let value = match op {
        MmioOp::Load { dst, extend, .. } => {
            let raw = device.read(offset, size) & mask;
            let widened = match extend {
                Extend::Sign => sign_extend(raw, size),
                Extend::Zero | Extend::None => raw,
            };
            write_gpr(vcpu, dst, widened);
            raw
        }
        MmioOp::Store { src, .. } => {
            let v = match src {
                Source::Gpr(g) => read_gpr(vcpu, g),
                Source::Imm(imm) => imm,
            } & mask;
            device.write(offset, size, v);
            v
        }
    };
    let done = ExitInfo { instruction_len: u64::from(decoded.len), ..*exit };
    skip_instruction(vcpu, &done);
    Ok(Emulated { op, offset, value, len: decoded.len })
}

/// Whether the decoded instruction is the access the processor reported.
fn check(vcpu: &mut dyn VcpuState, exit: &ExitInfo, decoded: &decode::Decoded, base: u64) -> Result<(), Reason> {
    let op = decoded.op;
    let gpa = exit.guest_physical;
    let access = ViolationInfo::from_qualification(exit.qualification).access;
    let expected = if op.is_store() { Access::Write } else { Access::Read };
    if access != expected {
        return Err(Reason::Direction { access, store: op.is_store() });
    }
    if gpa < base {
        return Err(Reason::OutsideWindow { base });
    }
    let size = op.size();
    if (gpa & (PAGE_SIZE - 1)) + u64::from(size) > PAGE_SIZE {
        return Err(Reason::CrossesPage { size });
    }
    if let Some(linear) = operand_address(vcpu, &decoded.instruction) {
        if linear & (PAGE_SIZE - 1) != gpa & (PAGE_SIZE - 1) {
            return Err(Reason::AddressMismatch { linear });
        }
    }
    Ok(())
}

/// The code segment's default size: 64 in IA-32e mode with CS.L, else 32
/// or 16 by CS.D.
fn bitness(vcpu: &dyn VcpuState) -> u32 {
    let cs = vcpu.read(Field::CsAccessRights);
    if vcpu.read(Field::Efer) & EFER_LMA != 0 && cs & CS_LONG != 0 {
        64
    } else if cs & CS_DB != 0 {
        32
    } else {
        16
    }
}

/// The linear address of the instruction's memory operand (64-bit mode:
/// only FS and GS have a base).
fn operand_address(vcpu: &mut dyn VcpuState, instruction: &iced_x86::Instruction) -> Option<u64> {
    let operand = (0..instruction.op_count()).find(|&i| instruction.op_kind(i) == OpKind::Memory)?;
    let rsp = vcpu.read(Field::Rsp);
    let fs = vcpu.read(Field::FsBase);
    let gs = vcpu.read(Field::GsBase);
    let regs = *vcpu.regs();
    instruction.virtual_address(operand, 0, |reg, _, _| match reg {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(fs),
        Register::GS => Some(gs),
        _ => gpr(reg).map(|g| regs.get(g.index, rsp)),
    })
}

const fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

const fn sign_extend(value: u64, size: u8) -> u64 {
    match size {
        1 => value as u8 as i8 as i64 as u64,
        2 => value as u16 as i16 as i64 as u64,
        4 => value as u32 as i32 as i64 as u64,
        _ => value,
    }
}

fn read_gpr(vcpu: &mut dyn VcpuState, g: Gpr) -> u64 {
    let rsp = vcpu.read(Field::Rsp);
    let full = vcpu.regs().get(g.index, rsp);
    if g.high_byte {
        (full >> 8) & 0xff
    } else {
        full & size_mask(g.size)
    }
}

/// Writes a register as the processor does: 8- and 16-bit destinations
/// merge into the old value, 32-bit ones zero-extend to 64 bits.
fn write_gpr(vcpu: &mut dyn VcpuState, g: Gpr, value: u64) {
    let rsp = vcpu.read(Field::Rsp);
    let old = vcpu.regs().get(g.index, rsp);
    let new = match (g.size, g.high_byte) {
        (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (old & !0xff) | (value & 0xff),
        (2, _) => (old & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
    if vcpu.regs().set(g.index, new).is_none() {
        vcpu.write(Field::Rsp, new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::access::testing::{TestGuest, PML4};
    use crate::guest::access::{AccessError, GuestAccess, Paging, Principal};
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::GuestRegisters;
    use alloc::vec::Vec;

    const WINDOW: u64 = 0xfed4_0000;
    const CODE_VA: u64 = 0xffff_ffff_8100_0000;
    const CODE_GPA: u64 = 0x30_0000;
    /// Where the guest maps the window (never walked: only its page offset matters).
    const MMIO_VA: u64 = 0xffff_c900_0010_0000;
    const RSP0: u64 = 0xffff_8000_0000_1234;
    /// What the fake device answers to every read (masked by the access size).
    const ANSWER: u64 = 0x1122_3344_8866_80fe;

    #[derive(Default)]
    struct Device {
        log: Vec<(bool, u64, u8, u64)>,
    }

    impl MmioDevice for Device {
        fn read(&mut self, offset: u64, size: u8) -> u64 {
            self.log.push((false, offset, size, ANSWER));
            ANSWER
        }
        fn write(&mut self, offset: u64, size: u8, value: u64) {
            self.log.push((true, offset, size, value));
        }
    }

    struct Setup {
        g: TestGuest,
        v: FakeVcpu,
        dev: Device,
    }

    fn default_regs() -> GuestRegisters {
        let mut r = GuestRegisters::default();
        for i in 0..16u8 {
            r.set(i, 0xaaaa_bbbb_cccc_dd00 | u64::from(i));
        }
        r
    }

    /// A 64-bit guest whose code pages at CODE_VA (two of them) hold `code`
    /// at `at` bytes into the first.
    fn setup_at(code: &[u8], at: u64) -> Setup {
        let mut g = TestGuest::new();
        g.map(CODE_VA, CODE_GPA, 0x1000);
        g.map(CODE_VA + 0x1000, CODE_GPA + 0x1000, 0x1000);
        g.write(CODE_GPA + at, code);
        let mut v = FakeVcpu::new();
        v.regs = default_regs();
        let fields = [
            (Field::Rip, CODE_VA + at),
            (Field::Rsp, RSP0),
            (Field::Cr0, 0x8000_0031),
            (Field::Cr3, PML4),
            (Field::Cr4, 0x20),
            (Field::Efer, 0xd00),
            (Field::CsAccessRights, 0xa09b),
        ];
        for (f, val) in fields {
            v.write(f, val);
        }
        Setup { g, v, dev: Device::default() }
    }

    fn setup(code: &[u8]) -> Setup {
        setup_at(code, 0)
    }

    fn exit(qualification: u64, offset: u64) -> ExitInfo {
        ExitInfo {
            reason: crate::exits::reason::EPT_VIOLATION,
            qualification: qualification | (1 << 7) | (1 << 8),
            guest_physical: WINDOW.wrapping_add(offset),
            ..Default::default()
        }
    }
    const READ: u64 = 1;
    const WRITE: u64 = 2;

    /// The guest's memory as its kernel (the test vCPU's CS and SS are DPL 0) uses it.
    fn kernel_access<'a>(g: &'a TestGuest, v: &FakeVcpu) -> GuestAccess<'a> {
        GuestAccess::new(&g.memory, &g.phys, Paging::from_vcpu(v), Principal::KERNEL, None)
    }

    fn run(s: &mut Setup, qualification: u64, offset: u64) -> Result<Emulated, MmioError> {
        let e = exit(qualification, offset);
        let access = kernel_access(&s.g, &s.v);
        emulate(&mut s.v, &e, &access, &mut s.dev, WINDOW)
    }

    /// Register overrides: (index, value); index 4 is RSP (the VMCS field).
    type Regs = &'static [(u8, u64)];

    fn apply(s: &mut Setup, regs: Regs) {
        for &(i, val) in regs {
            if s.v.regs.set(i, val).is_none() {
                s.v.write(Field::Rsp, val);
            }
        }
    }

    const RDI_24: Regs = &[(7, MMIO_VA + 0x24)];

    /// (name, bytes, registers, offset, size, (register, value after)).
    type LoadCase = (&'static str, &'static [u8], Regs, u64, u8, (u8, u64));
    const LOADS: &[LoadCase] = &[
        ("mov cl, [rdi]", &[0x8a, 0x0f], RDI_24, 0x24, 1, (1, 0xaaaa_bbbb_cccc_ddfe)),
        ("mov ch, [rdi]", &[0x8a, 0x2f], RDI_24, 0x24, 1, (1, 0xaaaa_bbbb_cccc_fe01)),
        ("mov cx, [rdi]", &[0x66, 0x8b, 0x0f], RDI_24, 0x24, 2, (1, 0xaaaa_bbbb_cccc_80fe)),
        ("mov ecx, [rdi]", &[0x8b, 0x0f], RDI_24, 0x24, 4, (1, 0x8866_80fe)),
        ("mov rcx, [rdi]", &[0x48, 0x8b, 0x0f], RDI_24, 0x24, 8, (1, ANSWER)),
        ("movzx ecx, byte [rdi]", &[0x0f, 0xb6, 0x0f], RDI_24, 0x24, 1, (1, 0xfe)),
        ("movzx cx, byte [rdi]", &[0x66, 0x0f, 0xb6, 0x0f], RDI_24, 0x24, 1, (1, 0xaaaa_bbbb_cccc_00fe)),
        ("movzx rcx, word [rdi]", &[0x48, 0x0f, 0xb7, 0x0f], RDI_24, 0x24, 2, (1, 0x80fe)),
        ("movsx ecx, byte [rdi]", &[0x0f, 0xbe, 0x0f], RDI_24, 0x24, 1, (1, 0xffff_fffe)),
        ("movsx rcx, word [rdi]", &[0x48, 0x0f, 0xbf, 0x0f], RDI_24, 0x24, 2, (1, 0xffff_ffff_ffff_80fe)),
        ("movsx cx, byte [rdi]", &[0x66, 0x0f, 0xbe, 0x0f], RDI_24, 0x24, 1, (1, 0xaaaa_bbbb_cccc_fffe)),
        ("movsxd rcx, dword [rdi]", &[0x48, 0x63, 0x0f], RDI_24, 0x24, 4, (1, 0xffff_ffff_8866_80fe)),
        ("mov r9b, [rdi]", &[0x44, 0x8a, 0x0f], RDI_24, 0x24, 1, (9, 0xaaaa_bbbb_cccc_ddfe)),
        (
            "mov r15, [rdi+rbx*4+0x24]",
            &[0x4c, 0x8b, 0x7c, 0x9f, 0x24],
            &[(7, MMIO_VA), (3, 0x10)],
            0x64,
            8,
            (15, ANSWER),
        ),
        ("mov esp, [rdi]", &[0x8b, 0x27], RDI_24, 0x24, 4, (4, 0x8866_80fe)),
        ("mov sil, [rdi]", &[0x40, 0x8a, 0x37], RDI_24, 0x24, 1, (6, 0xaaaa_bbbb_cccc_ddfe)),
        ("mov eax, [ecx] (67h)", &[0x67, 0x8b, 0x01], &[(1, 0xdead_beef_0000_0f00)], 0xf00, 4, (0, 0x8866_80fe)),
        ("mov al, [moffs64]", &[0xa0, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0x24, 1, (0, 0xaaaa_bbbb_cccc_ddfe)),
        (
            "mov ax, [moffs64]",
            &[0x66, 0xa1, 0x18, 0x00, 0xd4, 0xfe, 0, 0, 0, 0],
            &[],
            0x18,
            2,
            (0, 0xaaaa_bbbb_cccc_80fe),
        ),
        ("mov eax, [moffs64]", &[0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0xf00, 4, (0, 0x8866_80fe)),
        ("mov rax, [moffs64]", &[0x48, 0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0xf00, 8, (0, ANSWER)),
        (
            // RIP + 6 + 0x1012 = CODE_VA + 0x1018: page offset 0x018.
            "mov eax, [rip+0x1012]",
            &[0x8b, 0x05, 0x12, 0x10, 0x00, 0x00],
            &[],
            0x18,
            4,
            (0, 0x8866_80fe),
        ),
    ];

    #[test]
    fn loads_write_the_destination_with_x86_semantics() {
        for &(name, bytes, regs, offset, size, (reg, after)) in LOADS {
            let mut s = setup(bytes);
            apply(&mut s, regs);
            let mut expected = s.v.regs;
            let mut expected_rsp = RSP0;
            if expected.set(reg, after).is_none() {
                expected_rsp = after;
            }
            let done = run(&mut s, READ, offset).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(done.offset, offset, "{name}");
            assert_eq!(done.op.size(), size, "{name}");
            assert_eq!(usize::from(done.len), bytes.len(), "{name}");
            assert_eq!(s.dev.log, [(false, offset, size, ANSWER)], "{name}");
            assert_eq!(s.v.regs, expected, "{name}");
            assert_eq!(s.v.read(Field::Rsp), expected_rsp, "{name}");
            assert_eq!(s.v.read(Field::Rip), CODE_VA + bytes.len() as u64, "{name}");
        }
    }

    #[test]
    fn segment_overrides_add_fs_and_gs_bases() {
        for (bytes, field) in [([0x64, 0x8b, 0x08], Field::FsBase), ([0x65, 0x8b, 0x08], Field::GsBase)] {
            let mut s = setup(&bytes);
            s.v.write(field, 0x7000_0010);
            s.v.regs.rax = 0x8;
            assert!(run(&mut s, READ, 0x18).is_ok(), "{field:?}");
            assert_eq!(s.v.regs.rcx, 0x8866_80fe);
            // Without the base, the operand is at page offset 0x008: refused.
            let mut s = setup(&bytes);
            s.v.regs.rax = 0x8;
            assert_eq!(run(&mut s, READ, 0x18).map_err(|e| e.reason), Err(Reason::AddressMismatch { linear: 0x8 }));
        }
    }

    /// (name, bytes, registers, offset, size, value written).
    type StoreCase = (&'static str, &'static [u8], Regs, u64, u8, u64);
    const STORES: &[StoreCase] = &[
        ("mov [rdi], cl", &[0x88, 0x0f], RDI_24, 0x24, 1, 0x01),
        ("mov [rdi], ch", &[0x88, 0x2f], RDI_24, 0x24, 1, 0xdd),
        ("mov [rdi], cx", &[0x66, 0x89, 0x0f], RDI_24, 0x24, 2, 0xdd01),
        ("mov [rdi], ecx", &[0x89, 0x0f], RDI_24, 0x24, 4, 0xcccc_dd01),
        ("mov [rdi], rcx", &[0x48, 0x89, 0x0f], RDI_24, 0x24, 8, 0xaaaa_bbbb_cccc_dd01),
        ("mov [rdi], r14b", &[0x44, 0x88, 0x37], RDI_24, 0x24, 1, 0x0e),
        ("mov [rdi], spl", &[0x40, 0x88, 0x27], RDI_24, 0x24, 1, 0x34),
        ("mov [rdi], rsp", &[0x48, 0x89, 0x27], RDI_24, 0x24, 8, RSP0),
        ("mov byte [rdi], 0x40", &[0xc6, 0x07, 0x40], &[(7, MMIO_VA + 0x18)], 0x18, 1, 0x40),
        ("mov word [rdi], 0x1234", &[0x66, 0xc7, 0x07, 0x34, 0x12], RDI_24, 0x24, 2, 0x1234),
        ("mov dword [rdi], 0x87654321", &[0xc7, 0x07, 0x21, 0x43, 0x65, 0x87], RDI_24, 0x24, 4, 0x8765_4321),
        ("mov qword [rdi], -2", &[0x48, 0xc7, 0x07, 0xfe, 0xff, 0xff, 0xff], RDI_24, 0x24, 8, 0xffff_ffff_ffff_fffe),
        ("mov qword [rdi], 0x7fffffff", &[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0x7f], RDI_24, 0x24, 8, 0x7fff_ffff),
        ("mov [r8+r9*8+0x18], r10d", &[0x47, 0x89, 0x54, 0xc8, 0x18], &[(8, MMIO_VA), (9, 1)], 0x20, 4, 0xcccc_dd0a),
        ("mov [moffs64], al", &[0xa2, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0x24, 1, 0x00),
        ("mov [moffs64], ax", &[0x66, 0xa3, 0x18, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0x18, 2, 0xdd00),
        ("mov [moffs64], eax", &[0xa3, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0x24, 4, 0xcccc_dd00),
        ("mov [moffs64], rax", &[0x48, 0xa3, 0x80, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], &[], 0x80, 8, 0xaaaa_bbbb_cccc_dd00),
        (
            // RIP + 10 + 0x100e = CODE_VA + 0x1018.
            "mov dword [rip+0x100e], 0x20",
            &[0xc7, 0x05, 0x0e, 0x10, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00],
            &[],
            0x18,
            4,
            0x20,
        ),
    ];

    #[test]
    fn stores_write_the_source_to_the_device() {
        for &(name, bytes, regs, offset, size, value) in STORES {
            let mut s = setup(bytes);
            apply(&mut s, regs);
            let before = s.v.regs;
            let done = run(&mut s, WRITE, offset).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((done.offset, done.value), (offset, value), "{name}");
            assert_eq!(s.dev.log, [(true, offset, size, value)], "{name}");
            assert_eq!(s.v.regs, before, "{name}: registers unchanged");
            assert_eq!(s.v.read(Field::Rsp), RSP0, "{name}");
            assert_eq!(s.v.read(Field::Rip), CODE_VA + bytes.len() as u64, "{name}");
        }
    }

    #[test]
    fn an_instruction_across_a_page_boundary_is_fetched_and_run() {
        let mut s = setup_at(&[0x48, 0x8b, 0x0f], 0xffe);
        s.v.regs.rdi = MMIO_VA + 0xf00;
        assert_eq!(run(&mut s, READ, 0xf00).map(|d| d.len), Ok(3));
        assert_eq!(s.v.regs.rcx, ANSWER);
        assert_eq!(s.v.read(Field::Rip), CODE_VA + 0x1001);
    }

    #[test]
    fn the_interrupt_shadow_ends() {
        let mut s = setup(&[0x89, 0x0f]);
        s.v.regs.rdi = MMIO_VA + 0x24;
        s.v.write(Field::Interruptibility, 0b1011);
        run(&mut s, WRITE, 0x24).unwrap();
        assert_eq!(s.v.read(Field::Interruptibility), 0b1000);
    }

    /// Runs a case that must fail; checks nothing changed and returns the error.
    fn refused(s: &mut Setup, qualification: u64, offset: u64) -> MmioError {
        let regs = s.v.regs;
        let rip = s.v.read(Field::Rip);
        let e = run(s, qualification, offset).expect_err("must be refused");
        assert!(s.dev.log.is_empty(), "the device was not touched");
        assert_eq!(s.v.regs, regs);
        assert_eq!(s.v.read(Field::Rip), rip);
        assert_eq!(s.v.read(Field::Rsp), RSP0);
        e
    }

    #[test]
    fn unsupported_instructions_stop_with_their_text() {
        let mut s = setup(&[0xf0, 0x80, 0x08, 0x01]);
        s.v.regs.rax = MMIO_VA + 0x24;
        let e = refused(&mut s, WRITE, 0x24);
        assert_eq!(
            alloc::format!("{e}"),
            "cannot emulate `lock or byte [rax], 0x1` (f0 80 08 01) at rip 0xffffffff81000000, \
             guest-physical 0xfed40024: LOCK-prefixed read-modify-write is not emulated on MMIO"
        );
        for (bytes, text) in [
            (&[0x87, 0x08][..], "xchg dword [rax], ecx"),
            (&[0xf3, 0xa4], "rep movsb [rdi], [rsi]"),
            (&[0xc5, 0xfe, 0x6f, 0x00], "vmovdqu ymm0, [rax]"),
        ] {
            let mut s = setup(bytes);
            let e = refused(&mut s, READ, 0x24);
            assert_eq!(e.text.as_deref(), Some(text));
            assert_eq!(&e.bytes[..usize::from(e.len)], &bytes[..bytes.len().min(usize::from(e.len))]);
            assert!(matches!(e.reason, Reason::Decode(DecodeError::Unsupported { .. })));
        }
    }

    #[test]
    fn the_direction_must_match_the_exit() {
        let mut s = setup(&[0x8b, 0x0f]); // a load
        s.v.regs.rdi = MMIO_VA + 0x24;
        let e = refused(&mut s, WRITE, 0x24);
        assert_eq!(e.reason, Reason::Direction { access: Access::Write, store: false });
        assert!(alloc::format!("{e}").ends_with("the processor reported a write but the instruction loads"));
        let mut s = setup(&[0x89, 0x0f]); // a store
        s.v.regs.rdi = MMIO_VA + 0x24;
        assert_eq!(refused(&mut s, READ, 0x24).reason, Reason::Direction { access: Access::Read, store: true });
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.regs.rdi = MMIO_VA + 0x24;
        assert_eq!(refused(&mut s, 4, 0x24).reason, Reason::Direction { access: Access::Execute, store: false });
    }

    #[test]
    fn accesses_that_leave_the_page_or_start_before_it_are_refused() {
        // A 4-byte read at page offset 0xffe would reach into the next page.
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.regs.rdi = MMIO_VA + 0xffe;
        assert_eq!(refused(&mut s, READ, 0xffe).reason, Reason::CrossesPage { size: 4 });
        // A 4-byte read at MMIO_VA - 2 faults on the window's first byte:
        // its first two bytes were elsewhere.
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.regs.rdi = MMIO_VA - 2;
        assert_eq!(refused(&mut s, READ, 0).reason, Reason::AddressMismatch { linear: MMIO_VA - 2 });
        // A faulting address below the window's base.
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.regs.rdi = MMIO_VA + 0xff0;
        assert_eq!(refused(&mut s, READ, 0u64.wrapping_sub(0x10)).reason, Reason::OutsideWindow { base: WINDOW });
    }

    #[test]
    fn only_64_bit_code_is_emulated() {
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.write(Field::CsAccessRights, 0xc09b); // D=1, L=0: 32-bit
        assert_eq!(refused(&mut s, READ, 0).reason, Reason::NotLongMode { bitness: 32 });
        let mut s = setup(&[0x8b, 0x0f]);
        s.v.write(Field::Efer, 0);
        s.v.write(Field::CsAccessRights, 0x9b);
        assert_eq!(refused(&mut s, READ, 0).reason, Reason::NotLongMode { bitness: 16 });
    }

    #[test]
    fn fetch_failures_and_truncated_instructions() {
        let mut s = setup(&[]);
        s.v.write(Field::Rip, CODE_VA + 0x2000);
        let e = refused(&mut s, READ, 0);
        assert_eq!(e.reason, Reason::Fetch(AccessError::PageFault { address: CODE_VA + 0x2000, code: 0x10 }));
        assert_eq!(
            alloc::format!("{e}"),
            "cannot emulate the access at rip 0xffffffff81002000, guest-physical 0xfed40000: \
             cannot fetch the instruction: guest-linear 0xffffffff81002000: page fault (error code 0x10)"
        );
        // The last 4 bytes of the mapped code, a 6-byte instruction.
        let mut s = setup(&[]);
        s.g.write(CODE_GPA + 0x1ffc, &[0x8b, 0x05, 0x12, 0x10]);
        s.v.write(Field::Rip, CODE_VA + 0x1ffc);
        let e = refused(&mut s, READ, 0x18);
        assert_eq!(e.reason, Reason::Decode(DecodeError::Truncated));
        assert_eq!(&e.bytes[..usize::from(e.len)], &[0x8b, 0x05, 0x12, 0x10]);
        assert!(alloc::format!("{e}").starts_with("cannot emulate the instruction (8b 05 12 10) at rip"));
    }

    #[test]
    fn random_bytes_never_panic_and_never_half_emulate() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut emulated = 0;
        let mut s = setup(&[]);
        for i in 0..20_000 {
            let mut code = [0u8; 15];
            for b in code.iter_mut() {
                *b = next() as u8;
            }
            // Bias toward the opcodes of interest, with random prefixes.
            let op = [0x88u8, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa0, 0xa1, 0xa2, 0xa3, 0x0f, 0x63];
            let r = next();
            let at = (r % 3) as usize;
            code[at] = op[((r >> 8) % op.len() as u64) as usize];
            s.g.write(CODE_GPA, &code);
            s.v.write(Field::Rip, CODE_VA);
            s.dev.log.clear();
            for reg in 0..16u8 {
                s.v.regs.set(reg, next());
            }
            let offset = next() % 0x5000;
            let qualification = [READ, WRITE, 4][(next() % 3) as usize];
            let regs = s.v.regs;
            let rsp = s.v.read(Field::Rsp);
            let mut result = run(&mut s, qualification, offset);
            // Retry at the operand's own page offset, so that many succeed.
            if let Err(MmioError { reason: Reason::AddressMismatch { linear }, .. }) = result {
                let offset = (offset & !0xfff) | (linear & 0xfff);
                result = run(&mut s, qualification, offset);
            }
            match result {
                Ok(done) => {
                    emulated += 1;
                    assert_eq!(s.dev.log.len(), 1, "step {i}: {code:x?}");
                    assert_eq!(s.v.read(Field::Rip), CODE_VA + u64::from(done.len));
                    assert!((1..=15).contains(&done.len));
                }
                Err(e) => {
                    assert!(s.dev.log.is_empty(), "step {i}: {e}");
                    assert_eq!(s.v.regs, regs);
                    assert_eq!(s.v.read(Field::Rsp), rsp);
                    assert_eq!(s.v.read(Field::Rip), CODE_VA);
                    assert!(!alloc::format!("{e}").is_empty());
                }
            }
        }
        assert!(emulated > 1000, "{emulated}");
    }

    /// A TPM that answers every command with its ordinal as a 14-byte response.
    struct Echo(Vec<Vec<u8>>);

    impl crate::devices::tis::TpmBackend for Echo {
        fn execute(&mut self, _locality: u8, command: &[u8]) -> Vec<u8> {
            self.0.push(command.to_vec());
            let mut r = alloc::vec![0, 0xc4, 0, 0, 0, 14, 0, 0, 0, 0];
            r.extend_from_slice(&command[6..10]);
            r
        }
    }

    /// Runs one instruction (as Linux's readb/readl/writeb/writel compile
    /// on x86-64) against the TIS through `emulate`.
    fn tis_access(
        s: &mut Setup,
        tis: &mut crate::devices::tis::Tis<Echo>,
        (code, store): (&[u8], bool),
        offset: u64,
        value: u64,
    ) -> u64 {
        s.g.write(CODE_GPA, code);
        s.v.write(Field::Rip, CODE_VA);
        s.v.regs.rdi = MMIO_VA + (offset & 0xfff);
        s.v.regs.rsi = value;
        s.v.regs.rax = 0xdead_beef_dead_beef;
        let e = exit(if store { WRITE } else { READ }, offset);
        let access = kernel_access(&s.g, &s.v);
        emulate(&mut s.v, &e, &access, tis, WINDOW).unwrap();
        s.v.regs.rax
    }

    #[test]
    fn a_tpm_command_through_trapped_instructions() {
        const READB: (&[u8], bool) = (&[0x8a, 0x07], false); // mov al, [rdi]
        const READL: (&[u8], bool) = (&[0x8b, 0x07], false); // mov eax, [rdi]
        const WRITEB: (&[u8], bool) = (&[0x40, 0x88, 0x37], true); // mov [rdi], sil
        const WRITEL: (&[u8], bool) = (&[0x89, 0x37], true); // mov [rdi], esi
        let mut s = setup(&[]);
        let mut tis = crate::devices::tis::Tis::new(Echo(Vec::new()), 0);
        let t = &mut tis;
        assert_eq!(tis_access(&mut s, t, READL, 0xf00, 0), 0x0001_1014, "DID_VID");
        tis_access(&mut s, t, WRITEB, 0x000, 0x02);
        // readb merges into RAX; readl zero-extends.
        assert_eq!(tis_access(&mut s, t, READB, 0x000, 0), 0xdead_beef_dead_bea1);
        tis_access(&mut s, t, WRITEB, 0x018, 0x40);
        assert_eq!(tis_access(&mut s, t, READL, 0x018, 0), 0xffc0, "burstCount 255, ready");
        let cmd = [0x00, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x46];
        for b in cmd {
            tis_access(&mut s, t, WRITEB, 0x024, u64::from(b));
        }
        assert_eq!(tis_access(&mut s, t, READB, 0x018, 0) & 0xff, 0x80, "Expect 0");
        tis_access(&mut s, t, WRITEL, 0x018, 0x20);
        let mut rsp = Vec::new();
        while tis_access(&mut s, t, READB, 0x018, 0) & 0x10 != 0 {
            rsp.push(tis_access(&mut s, t, READB, 0x024, 0) as u8);
        }
        assert_eq!(rsp, [0, 0xc4, 0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0, 0x46]);
        assert_eq!(tis.backend().0, [cmd.to_vec()]);
    }
}
