//! VM-exit handling: one table keyed by the basic exit reason.
//!
//! Every handler gets an [`ExitContext`] (the generic guest, its vCPU state,
//! the exit information and the host CPU) and returns an [`Action`]. A reason
//! without a handler stops the guest with a report; it is never ignored.

pub mod apic;
mod cpuid;
mod cr;
pub mod dtable;
mod ept;
pub mod hypercall;
pub mod integrity;
pub mod io;
mod misc;
pub mod msr;

use alloc::string::String;
use core::fmt;

use crate::guest::access::{GuestAccess, Inspector, Paging, Principal};
use crate::guest::memory::HostPhys;
use crate::guest::Guest;
use crate::vcpu::{ExitInfo, VcpuState};

pub use ept::Access;
pub use misc::{xcr0_offered, xcr0_valid};

/// What the host processor offers the handlers; faked in tests.
pub trait HostCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    fn rdtsc(&self) -> u64;
    /// Reads a host MSR that exists (the caller knows which ones do).
    fn read_msr(&self, msr: u32) -> u64;
    /// Writes an MSR that holds guest state while the guest runs.
    fn write_msr(&self, msr: u32, value: u64);
    /// Loads XCR0 (the running guest's value).
    fn set_xcr0(&self, value: u64);
    /// The XCR0 components guests may enable (0: XSAVE is not available to
    /// them, and XSETBV is #UD).
    fn xcr0_offered(&self) -> u64;
    /// Port I/O on the real machine, for pass-through ports the hypervisor
    /// watches (`size` is 1, 2 or 4).
    fn port_read(&self, port: u16, size: u8) -> u32;
    fn port_write(&self, port: u16, size: u8, value: u32);
    /// The real local APIC's registers (xAPIC, by offset in its page), for
    /// the pass-through guest's writes the hypervisor checks and passes on.
    fn lapic_read(&self, offset: u64) -> u32;
    fn lapic_write(&self, offset: u64, value: u32);
}

/// What to do after handling an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the same guest again.
    Resume,
    /// Let another guest run, then come back.
    Yield,
    /// Stop this guest for good.
    Stop(StopReason),
}

/// Why a guest stopped. Displayed in the one log line that reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Shutdown {
        code: u32,
    },
    /// A pass-through guest asked ACPI for a sleep state (S5 is power-off).
    AcpiSleep {
        sleep_type: u16,
    },
    TripleFault {
        rip: u64,
    },
    Reset {
        what: &'static str,
    },
    Halted {
        rip: u64,
    },
    EptViolation {
        gpa: u64,
        access: Access,
        rip: u64,
        linear: Option<u64>,
        guest_memory: bool,
    },
    /// VMLAUNCH/VMRESUME refused to enter (invalid control or host state).
    LaunchFailed(String),
    EntryFailed {
        reason: u16,
        qualification: u64,
        detail: String,
    },
    Unhandled {
        reason: u16,
        qualification: u64,
        rip: u64,
    },
    Unsupported {
        what: &'static str,
        rip: u64,
    },
    /// An access to an emulated MMIO window that cannot be emulated.
    Mmio(String),
    LoadFailed(String),
    HypervisorError(String),
    /// Run-time integrity was asked for and cannot be enforced.
    IntegrityRefused(String),
    /// Devices' rights can no longer be shown to follow the kernel view
    /// (see `platform::dma::stops`).
    DmaContainmentLost(crate::platform::dma::ContainmentLost),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Shutdown { code } => write!(f, "shutdown hypercall, exit code {code}"),
            StopReason::AcpiSleep { sleep_type } => {
                write!(f, "ACPI sleep requested (SLP_TYP {sleep_type}): treated as power-off")
            }
            StopReason::TripleFault { rip } => write!(f, "triple fault at rip {rip:#x}"),
            StopReason::Reset { what } => write!(f, "reset requested ({what})"),
            StopReason::Halted { rip } => {
                write!(f, "halted at rip {rip:#x} with no interrupt source to wake it")
            }
            StopReason::EptViolation { gpa, access, rip, linear, guest_memory } => {
                let what = if *guest_memory { "protected guest memory" } else { "not guest memory" };
                write!(f, "EPT violation: {} to guest-physical {gpa:#x} ({what}) at rip {rip:#x}", access.name())?;
                if let Some(l) = linear {
                    write!(f, ", guest-linear {l:#x}")?;
                }
                Ok(())
            }
            StopReason::EntryFailed { reason, qualification, detail } => write!(
                f,
                "VM entry failed (reason {reason}, {}, qualification {qualification:#x}): {detail}",
                reason_name(*reason)
            ),
            StopReason::LaunchFailed(detail) => write!(f, "VMLAUNCH/VMRESUME failed: {detail}"),
            StopReason::Unhandled { reason, qualification, rip } => write!(
                f,
                "unhandled VM exit {reason} ({}), qualification {qualification:#x}, at rip {rip:#x}",
                reason_name(*reason)
            ),
            StopReason::Unsupported { what, rip } => write!(f, "{what} is not supported (rip {rip:#x})"),
            StopReason::Mmio(why) => f.write_str(why),
            StopReason::LoadFailed(why) => write!(f, "could not be loaded: {why}"),
            StopReason::HypervisorError(why) => write!(f, "hypervisor error: {why}"),
            StopReason::IntegrityRefused(why) => write!(f, "integrity cannot be enforced: {why}"),
            StopReason::DmaContainmentLost(lost) => write!(f, "DMA containment lost: {lost}"),
        }
    }
}

/// Everything a handler may look at or change.
pub struct ExitContext<'a> {
    pub guest: &'a mut Guest,
    pub vcpu: &'a mut dyn VcpuState,
    pub exit: &'a ExitInfo,
    pub host: &'a dyn HostCpu,
    /// How the hypervisor reaches the guest's RAM.
    pub phys: &'a dyn HostPhys,
    /// EPT views and register guards, for guests with integrity views.
    pub control: Option<&'a mut dyn crate::integrity::control::GuestControl>,
}

impl ExitContext<'_> {
    /// The EPT view the vCPU runs in (the kernel's, for a guest without views).
    pub fn view(&self) -> crate::integrity::View {
        self.guest.integrity.as_ref().map_or(crate::integrity::View::Kernel, |i| i.local.view)
    }

    /// Who ran the instruction that exited.
    pub fn principal(&self) -> Principal {
        Principal::current(self.vcpu, self.view())
    }

    /// Guest memory as `who` may use it.
    pub fn access_as(&self, who: Principal) -> GuestAccess<'_> {
        GuestAccess::new(&self.guest.memory, self.phys, Paging::from_vcpu(self.vcpu), who, self.control.as_deref())
    }

    /// Guest memory as whoever ran the instruction that exited may use it.
    pub fn access(&self) -> GuestAccess<'_> {
        self.access_as(self.principal())
    }

    /// The hypervisor's own read-only look at guest memory.
    pub fn inspect(&self) -> Inspector<'_> {
        Inspector::new(&self.guest.memory, self.phys, Paging::from_vcpu(self.vcpu))
    }
}

pub type Handler = fn(&mut ExitContext<'_>) -> Action;

/// Basic exit reasons (SDM Vol. 3D, Appendix C).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const GETSEC: u16 = 11;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const RDTSC: u16 = 16;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const DESCRIPTOR_TABLE: u16 = 46;
    pub const LDTR_TR: u16 = 47;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const VMFUNC: u16 = 59;
    pub const COUNT: usize = 70;
}

const NAMES: [&str; reason::COUNT] = [
    "exception or NMI",
    "external interrupt",
    "triple fault",
    "INIT",
    "SIPI",
    "I/O SMI",
    "other SMI",
    "interrupt window",
    "NMI window",
    "task switch",
    "CPUID",
    "GETSEC",
    "HLT",
    "INVD",
    "INVLPG",
    "RDPMC",
    "RDTSC",
    "RSM",
    "VMCALL",
    "VMCLEAR",
    "VMLAUNCH",
    "VMPTRLD",
    "VMPTRST",
    "VMREAD",
    "VMRESUME",
    "VMWRITE",
    "VMXOFF",
    "VMXON",
    "CR access",
    "MOV DR",
    "I/O instruction",
    "RDMSR",
    "WRMSR",
    "entry failure: guest state",
    "entry failure: MSR loading",
    "reason 35",
    "MWAIT",
    "monitor trap flag",
    "reason 38",
    "MONITOR",
    "PAUSE",
    "entry failure: machine check",
    "reason 42",
    "TPR below threshold",
    "APIC access",
    "virtualized EOI",
    "GDTR/IDTR access",
    "LDTR/TR access",
    "EPT violation",
    "EPT misconfiguration",
    "INVEPT",
    "RDTSCP",
    "preemption timer",
    "INVVPID",
    "WBINVD",
    "XSETBV",
    "APIC write",
    "RDRAND",
    "INVPCID",
    "VMFUNC",
    "ENCLS",
    "RDSEED",
    "PML full",
    "XSAVES",
    "XRSTORS",
    "reason 65",
    "SPP event",
    "UMWAIT",
    "TPAUSE",
    "LOADIWKEY",
];

pub fn reason_name(reason: u16) -> &'static str {
    NAMES.get(usize::from(reason)).copied().unwrap_or("unknown")
}

const fn table() -> [Option<Handler>; reason::COUNT] {
    let mut t: [Option<Handler>; reason::COUNT] = [None; reason::COUNT];
    t[reason::EXCEPTION_OR_NMI as usize] = Some(integrity::exception);
    t[reason::EXTERNAL_INTERRUPT as usize] = Some(misc::external_interrupt);
    t[reason::TRIPLE_FAULT as usize] = Some(misc::triple_fault);
    t[reason::INTERRUPT_WINDOW as usize] = Some(integrity::interrupt_window);
    t[reason::INIT as usize] = Some(misc::init_signal);
    t[reason::CPUID as usize] = Some(cpuid::handle);
    t[reason::GETSEC as usize] = Some(misc::undefined_opcode);
    t[reason::HLT as usize] = Some(misc::hlt);
    t[reason::INVD as usize] = Some(misc::skip);
    t[reason::RDTSC as usize] = Some(misc::rdtsc);
    t[reason::VMCALL as usize] = Some(hypercall::handle);
    // VMX is hidden from guests: its instructions raise #UD as on a CPU without it.
    let mut vmx = reason::VMCLEAR;
    while vmx <= reason::VMXON {
        t[vmx as usize] = Some(misc::undefined_opcode);
        vmx += 1;
    }
    t[reason::INVEPT as usize] = Some(misc::undefined_opcode);
    // So are MONITOR and MWAIT (see `cpuid`).
    t[reason::MWAIT as usize] = Some(misc::undefined_opcode);
    t[reason::MONITOR as usize] = Some(misc::undefined_opcode);
    t[reason::INVVPID as usize] = Some(misc::undefined_opcode);
    t[reason::VMFUNC as usize] = Some(misc::undefined_opcode);
    t[reason::CR_ACCESS as usize] = Some(cr::handle);
    t[reason::IO_INSTRUCTION as usize] = Some(io::handle);
    t[reason::RDMSR as usize] = Some(msr::rdmsr);
    t[reason::WRMSR as usize] = Some(msr::wrmsr);
    t[reason::ENTRY_FAIL_GUEST_STATE as usize] = Some(misc::entry_failed);
    t[reason::ENTRY_FAIL_MSR_LOADING as usize] = Some(misc::entry_failed);
    t[reason::ENTRY_FAIL_MACHINE_CHECK as usize] = Some(misc::entry_failed);
    t[reason::EPT_VIOLATION as usize] = Some(ept::violation);
    t[reason::EPT_MISCONFIG as usize] = Some(ept::misconfiguration);
    t[reason::PREEMPTION_TIMER as usize] = Some(misc::preemption_timer);
    t[reason::MONITOR_TRAP as usize] = Some(integrity::monitor_trap);
    t[reason::DESCRIPTOR_TABLE as usize] = Some(dtable::handle);
    t[reason::LDTR_TR as usize] = Some(dtable::handle);
    t[reason::WBINVD as usize] = Some(misc::skip);
    t[reason::XSETBV as usize] = Some(misc::xsetbv);
    t
}

/// The exit handlers, indexed by basic exit reason.
pub static HANDLERS: [Option<Handler>; reason::COUNT] = table();

/// Counts the exit and runs its handler.
pub fn dispatch(ctx: &mut ExitContext<'_>) -> Action {
    let reason = ctx.exit.reason;
    ctx.guest.exits.count(reason);
    // Violations recorded while handling this exit name the vCPU.
    let cpu = ctx.guest.cpus.current as u32;
    if let Some(integrity) = ctx.guest.integrity.as_mut() {
        integrity.engine.cpu = cpu;
    }
    if ctx.exit.entry_failed
        && !matches!(
            reason,
            reason::ENTRY_FAIL_GUEST_STATE | reason::ENTRY_FAIL_MSR_LOADING | reason::ENTRY_FAIL_MACHINE_CHECK
        )
    {
        return misc::entry_failed(ctx);
    }
    let action = match HANDLERS.get(usize::from(reason)).copied().flatten() {
        Some(handler) => handler(ctx),
        None => Action::Stop(StopReason::Unhandled {
            reason,
            qualification: ctx.exit.qualification,
            rip: ctx.vcpu.read(crate::vcpu::Field::Rip),
        }),
    };
    if !matches!(action, Action::Stop(_)) {
        crate::vcpu::redeliver_interrupted_event(ctx.vcpu, ctx.exit);
    }
    action
}

/// VM exits per reason for one guest, and the TSC ticks their handling
/// took (under Bochs, where the TSC counts instructions, the hypervisor's
/// instructions per exit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStats {
    counts: [u64; reason::COUNT + 1],
    ticks: [u64; reason::COUNT + 1],
}

impl Default for ExitStats {
    fn default() -> Self {
        ExitStats { counts: [0; reason::COUNT + 1], ticks: [0; reason::COUNT + 1] }
    }
}

impl ExitStats {
    pub fn count(&mut self, reason: u16) {
        let slot = usize::from(reason).min(reason::COUNT);
        self.counts[slot] = self.counts[slot].saturating_add(1);
    }

    /// Adds the ticks spent handling one exit for `reason`.
    pub fn add_ticks(&mut self, reason: u16, ticks: u64) {
        let slot = usize::from(reason).min(reason::COUNT);
        self.ticks[slot] = self.ticks[slot].saturating_add(ticks);
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (reason, name, count) for every reason seen.
    pub fn seen(&self) -> impl Iterator<Item = (u16, &'static str, u64)> + '_ {
        self.counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(r, &n)| (r as u16, reason_name(r as u16), n))
    }

    /// Mean ticks spent handling an exit for `reason`.
    pub fn mean_ticks(&self, reason: u16) -> u64 {
        let slot = usize::from(reason).min(reason::COUNT);
        self.ticks[slot].checked_div(self.counts[slot]).unwrap_or(0)
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing {
    //! A fake host CPU and a helper to run one exit through the table.
    use super::*;
    use crate::vcpu::fake::FakeVcpu;
    use core::cell::RefCell;

    #[derive(Default)]
    pub struct FakeHost {
        /// MSR values to report; others read as `msr << 8`.
        pub msrs: alloc::collections::BTreeMap<u32, u64>,
        pub msr_writes: RefCell<alloc::vec::Vec<(u32, u64)>>,
        pub xcr0: RefCell<u64>,
        pub port_writes: RefCell<alloc::vec::Vec<(u16, u8, u32)>>,
        pub lapic_writes: RefCell<alloc::vec::Vec<(u64, u32)>>,
        /// What XSAVE offers guests (default: x87, SSE, AVX).
        pub xcr0_offered: Option<u64>,
    }

    impl HostCpu for FakeHost {
        fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
            match leaf {
                0 => [0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
                // VMX (bit 5) and SMX (bit 6) set on the host, OSXSAVE (27) per host CR4.
                1 => [0x506e3, 0x0010_0800, 0x7ffa_fbff, 0xbfeb_fbff],
                0xd => [0x7, 0x340, 0x340, 0],
                0x4000_0000 => [0xdead, 0xdead, 0xdead, 0xdead],
                _ => [leaf, 0, 0, 0],
            }
        }
        fn rdtsc(&self) -> u64 {
            123_456
        }
        fn read_msr(&self, msr: u32) -> u64 {
            self.msrs.get(&msr).copied().unwrap_or(u64::from(msr) << 8)
        }
        fn write_msr(&self, msr: u32, value: u64) {
            self.msr_writes.borrow_mut().push((msr, value));
        }
        fn set_xcr0(&self, value: u64) {
            *self.xcr0.borrow_mut() = value;
        }
        fn xcr0_offered(&self) -> u64 {
            self.xcr0_offered.unwrap_or(0x7)
        }
        fn port_read(&self, port: u16, _size: u8) -> u32 {
            u32::from(port) ^ 0x5a5a
        }
        fn port_write(&self, port: u16, size: u8, value: u32) {
            self.port_writes.borrow_mut().push((port, size, value));
        }
        fn lapic_read(&self, offset: u64) -> u32 {
            // The last value written, as the ICR's destination reads back.
            self.lapic_writes.borrow().iter().rev().find(|w| w.0 == offset).map_or(0, |w| w.1)
        }
        fn lapic_write(&self, offset: u64, value: u32) {
            self.lapic_writes.borrow_mut().push((offset, value));
        }
    }

    /// Runs one exit through [`dispatch`].
    pub fn run(guest: &mut Guest, vcpu: &mut FakeVcpu, exit: ExitInfo) -> Action {
        let host = FakeHost::default();
        let phys = crate::guest::memory::fake::FakePhys::new(0x1000_0000, 16 << 20);
        let mut ctx = ExitContext { guest, vcpu, exit: &exit, host: &host, phys: &phys, control: None };
        dispatch(&mut ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::run;
    use super::*;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::Field;

    #[test]
    fn every_reason_has_a_name() {
        assert_eq!(reason_name(reason::EPT_VIOLATION), "EPT violation");
        assert_eq!(reason_name(reason::XSETBV), "XSETBV");
        assert_eq!(reason_name(69), "LOADIWKEY");
        assert_eq!(reason_name(500), "unknown");
    }

    #[test]
    fn unhandled_reasons_stop_the_guest_with_a_report() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let a = run(&mut g, &mut v, ExitInfo { reason: 40, qualification: 5, ..Default::default() });
        assert_eq!(a, Action::Stop(StopReason::Unhandled { reason: 40, qualification: 5, rip: 0x10_0000 }));
        // Reasons beyond the table too.
        let a = run(&mut g, &mut v, ExitInfo { reason: 999, ..Default::default() });
        assert!(matches!(a, Action::Stop(StopReason::Unhandled { reason: 999, .. })));
        let counted: alloc::vec::Vec<_> = g.exits.seen().collect();
        assert_eq!(counted, [(40, "PAUSE", 1), (70, "unknown", 1)]);
        g.exits.add_ticks(40, 900);
        g.exits.add_ticks(999, 7);
        assert_eq!((g.exits.mean_ticks(40), g.exits.mean_ticks(70), g.exits.mean_ticks(10)), (900, 7, 0));
    }

    #[test]
    fn vmx_instructions_raise_ud() {
        for r in [reason::VMCLEAR, 20, 23, reason::VMXON, reason::INVEPT, reason::VMFUNC] {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            assert_eq!(
                run(&mut g, &mut v, ExitInfo { reason: r, instruction_len: 3, ..Default::default() }),
                Action::Resume
            );
            assert_eq!(v.injected(), Some((6, None)), "reason {r}");
            assert_eq!(v.read(Field::Rip), 0x10_0000, "RIP stays on the faulting instruction");
        }
    }

    #[test]
    fn stop_reasons_read_well() {
        let s = StopReason::EptViolation {
            gpa: 0x4000_0000,
            access: Access::Write,
            rip: 0x10_0123,
            linear: Some(0x4000_0000),
            guest_memory: false,
        };
        assert_eq!(
            alloc::format!("{s}"),
            "EPT violation: write to guest-physical 0x40000000 (not guest memory) at rip 0x100123, guest-linear 0x40000000"
        );
        assert_eq!(alloc::format!("{}", StopReason::Shutdown { code: 42 }), "shutdown hypercall, exit code 42");
    }
}
