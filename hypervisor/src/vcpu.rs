//! The architecture-neutral view of a virtual CPU that exit handlers work on.
//!
//! The VMX layer implements [`VcpuState`] over the real VMCS; host tests
//! implement it over a map. Handlers never execute VMREAD/VMWRITE themselves,
//! so every decision they make is testable on the host.

/// General-purpose registers the VM-entry stub saves and restores (RSP and
/// RIP live in the VMCS). CR2 is not part of the VMCS either, so it is here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr2: u64,
}

impl GuestRegisters {
    /// A register by its x86 encoding (0 = RAX ... 15 = R15). RSP (4) is not
    /// here: callers read it from the VMCS.
    pub fn get(&self, index: u8, rsp: u64) -> u64 {
        match index & 15 {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            _ => self.r15,
        }
    }

    /// Sets a register by encoding; `None` for RSP, which the caller writes to the VMCS.
    pub fn set(&mut self, index: u8, value: u64) -> Option<()> {
        let slot = match index & 15 {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => return None,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        };
        *slot = value;
        Some(())
    }
}

/// Guest state kept in the VMCS that handlers read or change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    Rip,
    Rsp,
    Rflags,
    Cr0,
    Cr3,
    Cr4,
    Cr0ReadShadow,
    Cr4ReadShadow,
    Efer,
    Pat,
    /// Loaded on entry, where the processor switches it (see
    /// `Guest::perf_switched`).
    PerfGlobalCtrl,
    FsBase,
    GsBase,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    CsSelector,
    GdtrBase,
    GdtrLimit,
    IdtrBase,
    IdtrLimit,
    LdtrSelector,
    TrSelector,
    CsAccessRights,
    SsAccessRights,
    Interruptibility,
    ActivityState,
    /// The VM-entry controls (the IA-32e mode guest bit follows EFER.LMA).
    EntryControls,
    /// Debug exceptions pending at the next instruction boundary (a trap
    /// flag's single step, a data breakpoint's hit) across an exit.
    PendingDebugExceptions,
    /// VM-entry interruption information (event injection).
    EntryInterruptionInfo,
    EntryExceptionErrorCode,
    EntryInstructionLength,
}

/// The state of one virtual CPU as the exit handlers see it.
pub trait VcpuState {
    fn regs(&mut self) -> &mut GuestRegisters;
    fn read(&self, field: Field) -> u64;
    fn write(&mut self, field: Field, value: u64);
}

/// What the processor reported about one VM exit, read once from the VMCS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Basic exit reason (bits 15:0 of the exit-reason field).
    pub reason: u16,
    /// Bit 31 of the exit-reason field: the VM entry itself failed.
    pub entry_failed: bool,
    pub qualification: u64,
    pub instruction_len: u64,
    pub instruction_info: u64,
    pub guest_physical: u64,
    pub guest_linear: u64,
    pub interruption_info: u32,
    pub interruption_error: u32,
    /// An event (interrupt, exception, NMI) whose delivery the exit cut
    /// short: it must be delivered again, or it is lost.
    pub idt_vectoring_info: u32,
    pub idt_vectoring_error: u32,
}

/// Interruption types for event injection (SDM 25.8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventType {
    ExternalInterrupt = 0,
    Nmi = 2,
    HardwareException = 3,
    SoftwareException = 6,
}

pub const VECTOR_UD: u8 = 6;
pub const VECTOR_GP: u8 = 13;

pub const BLOCKING_BY_STI_OR_MOV_SS: u64 = 0b11;
const RFLAGS_IF: u64 = 1 << 9;

/// Whether the guest can take an external interrupt now: interrupts on,
/// and no STI or MOV SS shadow.
pub fn interruptible(vcpu: &dyn VcpuState) -> bool {
    vcpu.read(Field::Rflags) & RFLAGS_IF != 0 && vcpu.read(Field::Interruptibility) & BLOCKING_BY_STI_OR_MOV_SS == 0
}

/// Moves RIP past the instruction that exited, as if it had executed.
pub fn skip_instruction(vcpu: &mut dyn VcpuState, exit: &ExitInfo) {
    let rip = vcpu.read(Field::Rip).wrapping_add(exit.instruction_len);
    vcpu.write(Field::Rip, rip);
    // The instruction completed, so interrupt shadows from STI/MOV SS end.
    let blocking = vcpu.read(Field::Interruptibility);
    if blocking & BLOCKING_BY_STI_OR_MOV_SS != 0 {
        vcpu.write(Field::Interruptibility, blocking & !BLOCKING_BY_STI_OR_MOV_SS);
    }
}

const EVENT_VALID: u32 = 1 << 31;

/// Re-queues the event whose delivery the exit interrupted, unless the
/// handler queued one itself. A lost interrupt leaves the local APIC
/// waiting for an EOI that never comes, and the guest hangs.
pub fn redeliver_interrupted_event(vcpu: &mut dyn VcpuState, exit: &ExitInfo) {
    let info = exit.idt_vectoring_info;
    if info & EVENT_VALID == 0 || vcpu.read(Field::EntryInterruptionInfo) & u64::from(EVENT_VALID) != 0 {
        return;
    }
    // Bit 12 (NMI unblocking) is reserved in the entry field.
    vcpu.write(Field::EntryInterruptionInfo, u64::from(info & !(1 << 12)));
    if info & (1 << 11) != 0 {
        vcpu.write(Field::EntryExceptionErrorCode, u64::from(exit.idt_vectoring_error));
    }
    // Software interrupts and exceptions are re-executed with their length.
    if matches!((info >> 8) & 7, 4..=6) {
        vcpu.write(Field::EntryInstructionLength, exit.instruction_len);
    }
}

/// Queues a hardware exception for delivery at the next VM entry.
pub fn inject_exception(vcpu: &mut dyn VcpuState, vector: u8, error_code: Option<u32>) {
    let mut info = u64::from(vector) | ((EventType::HardwareException as u64) << 8) | (1 << 31);
    if let Some(code) = error_code {
        info |= 1 << 11;
        vcpu.write(Field::EntryExceptionErrorCode, u64::from(code));
    }
    vcpu.write(Field::EntryInterruptionInfo, info);
}

/// The guest's current privilege level (the DPL of SS).
pub fn cpl(vcpu: &dyn VcpuState) -> u8 {
    ((vcpu.read(Field::SsAccessRights) >> 5) & 3) as u8
}

/// A canonical 48-bit address (what MSRs holding addresses require).
pub const fn is_canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

#[cfg(any(test, feature = "testing"))]
pub mod fake {
    //! A VcpuState over a map, for host tests.
    use super::*;
    use alloc::collections::BTreeMap;

    #[derive(Default)]
    pub struct FakeVcpu {
        pub regs: GuestRegisters,
        pub fields: BTreeMap<Field, u64>,
    }

    impl FakeVcpu {
        pub fn new() -> Self {
            let mut v = FakeVcpu::default();
            v.fields.insert(Field::Rip, 0x10_0000);
            v.fields.insert(Field::Rflags, 0x2);
            v
        }

        pub fn injected(&self) -> Option<(u8, Option<u32>)> {
            let info = *self.fields.get(&Field::EntryInterruptionInfo)?;
            if info & (1 << 31) == 0 {
                return None;
            }
            let code = (info & (1 << 11) != 0).then(|| self.read(Field::EntryExceptionErrorCode) as u32);
            Some((info as u8, code))
        }
    }

    impl VcpuState for FakeVcpu {
        fn regs(&mut self) -> &mut GuestRegisters {
            &mut self.regs
        }
        fn read(&self, field: Field) -> u64 {
            self.fields.get(&field).copied().unwrap_or(0)
        }
        fn write(&mut self, field: Field, value: u64) {
            self.fields.insert(field, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeVcpu;
    use super::*;

    #[test]
    fn register_encoding_matches_x86() {
        let mut r = GuestRegisters::default();
        for i in 0..16u8 {
            if i != 4 {
                r.set(i, 100 + u64::from(i)).unwrap();
            }
        }
        assert_eq!(r.rcx, 101);
        assert_eq!(r.rbx, 103);
        assert_eq!(r.rdi, 107);
        assert_eq!(r.r15, 115);
        assert_eq!(r.get(4, 0xdead), 0xdead);
        assert_eq!(r.set(4, 1), None);
    }

    #[test]
    fn skipping_advances_rip_and_ends_sti_shadow() {
        let mut v = FakeVcpu::new();
        v.write(Field::Interruptibility, 0b1001);
        let exit = ExitInfo { instruction_len: 3, ..Default::default() };
        skip_instruction(&mut v, &exit);
        assert_eq!(v.read(Field::Rip), 0x10_0003);
        assert_eq!(v.read(Field::Interruptibility), 0b1000);
    }

    #[test]
    fn injection_encodes_vector_type_and_error_code() {
        let mut v = FakeVcpu::new();
        inject_exception(&mut v, VECTOR_GP, Some(0));
        assert_eq!(v.read(Field::EntryInterruptionInfo), 13 | (3 << 8) | (1 << 11) | (1 << 31));
        assert_eq!(v.injected(), Some((13, Some(0))));
        let mut v = FakeVcpu::new();
        inject_exception(&mut v, VECTOR_UD, None);
        assert_eq!(v.injected(), Some((6, None)));
    }

    #[test]
    fn interrupted_events_are_delivered_again() {
        // An external interrupt (vector 0xec) cut short by an EPT violation.
        let mut v = FakeVcpu::new();
        let exit = ExitInfo { idt_vectoring_info: 0x8000_00ec, ..Default::default() };
        redeliver_interrupted_event(&mut v, &exit);
        assert_eq!(v.read(Field::EntryInterruptionInfo), 0x8000_00ec);
        // A page fault with its error code, and NMI-unblocking cleared.
        let mut v = FakeVcpu::new();
        let exit = ExitInfo { idt_vectoring_info: 0x8000_1b0e, idt_vectoring_error: 2, ..Default::default() };
        redeliver_interrupted_event(&mut v, &exit);
        assert_eq!(v.injected(), Some((14, Some(2))));
        assert_eq!(v.read(Field::EntryInterruptionInfo) & (1 << 12), 0);
        // A software interrupt (int3) keeps its instruction length.
        let mut v = FakeVcpu::new();
        let exit = ExitInfo { idt_vectoring_info: 0x8000_0603, instruction_len: 1, ..Default::default() };
        redeliver_interrupted_event(&mut v, &exit);
        assert_eq!(v.read(Field::EntryInstructionLength), 1);
        // Nothing pending, or the handler injected its own: left alone.
        let mut v = FakeVcpu::new();
        redeliver_interrupted_event(&mut v, &ExitInfo::default());
        assert_eq!(v.injected(), None);
        let mut v = FakeVcpu::new();
        inject_exception(&mut v, VECTOR_GP, Some(0));
        redeliver_interrupted_event(&mut v, &ExitInfo { idt_vectoring_info: 0x8000_00ec, ..Default::default() });
        assert_eq!(v.injected(), Some((13, Some(0))));
    }

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(!is_canonical(0xfff0_0000_0000_0000 ^ (1 << 52)));
    }
}
