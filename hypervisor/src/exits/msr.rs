//! RDMSR and WRMSR through an allow-list. State the VMCS holds goes to the
//! VMCS; the syscall MSRs, which the hypervisor never uses, are written
//! through to the hardware and shadowed for guest switches; a few read-only
//! values come from the host. Everything else raises #GP, as a CPU does for
//! an MSR it lacks.

use super::{Action, ExitContext};
use crate::arch::x86_64::vmx::bitmaps::{MsrAccess, MsrBitmap};
use crate::integrity::{View, ViolationKind};
use crate::vcpu::{inject_exception, is_canonical, skip_instruction, Field, VECTOR_GP};

pub mod index {
    pub const TSC: u32 = 0x10;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

use index::*;

/// Where an allowed MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    Vmcs(Field),
    /// Hardware register written through, shadowed per guest.
    Shadowed,
    /// The host's value, read-only.
    HostReadOnly,
    /// The time-stamp counter, read-only.
    Tsc,
}

fn home(msr: u32) -> Option<Home> {
    Some(match msr {
        EFER => Home::Vmcs(Field::Efer),
        PAT => Home::Vmcs(Field::Pat),
        FS_BASE => Home::Vmcs(Field::FsBase),
        GS_BASE => Home::Vmcs(Field::GsBase),
        SYSENTER_CS => Home::Vmcs(Field::SysenterCs),
        SYSENTER_ESP => Home::Vmcs(Field::SysenterEsp),
        SYSENTER_EIP => Home::Vmcs(Field::SysenterEip),
        STAR | LSTAR | CSTAR | SFMASK | KERNEL_GS_BASE | TSC_AUX => Home::Shadowed,
        MISC_ENABLE => Home::HostReadOnly,
        TSC => Home::Tsc,
        _ => return None,
    })
}

const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;
/// EFER bits a running 64-bit guest may change: LME/LMA are fixed once in long mode.
const EFER_WRITABLE: u64 = EFER_SCE | EFER_NXE;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CR0_PG: u64 = 1 << 31;

/// Whether a value is acceptable for an MSR, as the hardware would check it.
/// Whether a write of `value` over `current` is one the processor takes.
/// EFER: SCE and NXE change; LME only while paging is off (a CPU on its
/// way into long mode; the processor faults otherwise); LMA is the
/// processor's, whatever the write says (the caller keeps the current one).
fn valid(msr: u32, value: u64, current: u64, paging: bool) -> bool {
    match msr {
        EFER => {
            let writable = EFER_WRITABLE | if paging { 0 } else { EFER_LME };
            (value ^ current) & !(writable | EFER_LMA) == 0
        }
        PAT => (0..8).all(|i| matches!((value >> (8 * i)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7)),
        FS_BASE | GS_BASE | KERNEL_GS_BASE | LSTAR | CSTAR | SYSENTER_ESP | SYSENTER_EIP => is_canonical(value),
        SYSENTER_CS | TSC_AUX | SFMASK => value >> 32 == 0,
        _ => true,
    }
}

fn shadow_slot(g: &mut crate::guest::MsrShadow, msr: u32) -> &mut u64 {
    match msr {
        STAR => &mut g.star,
        LSTAR => &mut g.lstar,
        CSTAR => &mut g.cstar,
        SFMASK => &mut g.sfmask,
        KERNEL_GS_BASE => &mut g.kernel_gs_base,
        _ => &mut g.tsc_aux,
    }
}

const FEATURE_CONTROL: u32 = 0x3a;
/// What a pass-through guest reads in IA32_FEATURE_CONTROL: locked, VMX off.
const FEATURE_CONTROL_LOCKED_OFF: u64 = 1;
const APIC_BASE: u32 = 0x1b;
const TSC_ADJUST: u32 = 0x3b;
const MICROCODE_TRIGGER: u32 = 0x79;
const PERF_GLOBAL_CTRL: u32 = 0x38f;
const XSS: u32 = 0xda0;
const MTRR_CAP: u32 = 0xfe;
/// The variable and fixed MTRRs and MTRRdefType.
const MTRRS: core::ops::RangeInclusive<u32> = 0x200..=0x2ff;
const MISC_ENABLE_XD_DISABLE: u64 = 1 << 34;
/// The x2APIC interrupt command register: INIT and start-up IPIs go here.
pub const X2APIC_ICR: u32 = 0x830;
const APIC_BASE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// The MSRs a pass-through guest's kernel writes without an exit: an
/// allow-list, each range with why letting it through is safe. Every other
/// write exits and is judged below; from an isolated module's view every
/// write exits.
pub const PASS_WRITES: &[(u32, u32, &str)] = &[
    (0x48, 0x49, "SPEC_CTRL, PRED_CMD: speculation controls, written at context switches"),
    (0x4e, 0x4e, "PPIN_CTL: enables reading the processor's inventory number"),
    (0x10b, 0x10b, "FLUSH_CMD: L1D flush"),
    (0x140, 0x140, "MISC_FEATURES_ENABLES: CPUID faulting for user space"),
    (0x8b, 0x8b, "BIOS_SIGN_ID: the microcode-revision read protocol (write 0, CPUID, read)"),
    (0xc1, 0xc8, "PMC0-7: counters only count in the guest (PERF_GLOBAL_CTRL is switched)"),
    (0x179, 0x17b, "MCG_STATUS, MCG_CTL: the guest handles the machine's machine checks"),
    (0x186, 0x18d, "PERFEVTSEL0-7: as the counters"),
    (0x199, 0x19b, "PERF_CTL, CLOCK_MODULATION, THERM_INTERRUPT: the guest's power management"),
    (0x1a6, 0x1a7, "OFFCORE_RSP0-1: as the counters"),
    (0x1b0, 0x1b2, "ENERGY_PERF_BIAS, PACKAGE_THERM_STATUS/INTERRUPT: power management"),
    (0x1c8, 0x1c9, "LBR_SELECT, LBR_TOS: last-branch records only run while DEBUGCTL enables them"),
    (0x1d9, 0x1d9, "DEBUGCTL: cleared on every VM exit, so branch tracing never runs in the hypervisor"),
    (0x277, 0x277, "PAT: saved and loaded by the VMCS on every exit and entry"),
    (0x280, 0x29f, "MC0-31_CTL2: machine-check banks"),
    (0x309, 0x30b, "FIXED_CTR0-2: as the counters"),
    (0x38d, 0x38d, "FIXED_CTR_CTRL: as the counters"),
    (0x390, 0x390, "PERF_GLOBAL_OVF_CTRL: as the counters"),
    (0x3f1, 0x3f1, "PEBS_ENABLE: PEBS records need counters, which only count in the guest"),
    (0x3f6, 0x3f7, "PEBS_LD_LAT, PEBS_FRONTEND: as PEBS"),
    (0x400, 0x47f, "MC0-31_CTL/STATUS/ADDR/MISC: machine-check banks"),
    (0x4c1, 0x4c8, "A_PMC0-7: as the counters"),
    (0x600, 0x600, "DS_AREA: a guest-linear address, written by PEBS and BTS only while the guest runs"),
    (0x680, 0x69f, "LBR_FROM_IP: last-branch records"),
    (0x6c0, 0x6df, "LBR_TO_IP: last-branch records"),
    (0x6e0, 0x6e0, "TSC_DEADLINE: the local timer, on the hot path"),
    (0x770, 0x777, "HWP: the guest's power management"),
    (0x800, 0x82f, "x2APIC registers below the ICR (TPR, EOI, LVT): the guest's own interrupts"),
    (0x831, 0x8ff, "x2APIC registers above the ICR (timer, self-IPI)"),
    (0xdc0, 0xddf, "LBR_INFO: last-branch records"),
    (0xc000_0100, 0xc000_0100, "FS_BASE: user space's TLS, written at context switches"),
    (0xc000_0103, 0xc000_0103, "TSC_AUX: the CPU number RDTSCP and RDPID give; switched between guests"),
];

/// MSRs whose change after the integrity lock subverts the kernel: the
/// system-call and SYSENTER entry points and segments (STAR, LSTAR, CSTAR,
/// SFMASK, SYSENTER_*), EFER (NXE, SCE), the kernel's per-CPU base
/// (GS_BASE) and the microcode trigger. Writes that change them are
/// violations; writes of the current value (the kernel reloading them on
/// CPU bring-up) are not.
const GUARDED_AFTER_LOCK: [u32; 10] =
    [STAR, LSTAR, CSTAR, SFMASK, SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP, EFER, GS_BASE, MICROCODE_TRIGGER];

/// Whether the kernel view's writes to `msr` go straight to the hardware.
pub fn passes_writes(msr: u32) -> bool {
    PASS_WRITES.iter().any(|&(first, last, _)| (first..=last).contains(&msr))
}

/// The pass-through guest's MSR bitmaps: (kernel view, module views).
/// Reads pass, but for VMX, which is hidden (an MSR read changes nothing,
/// and the guest owns the machine's other state); writes pass only for the
/// allow-list, and never from a module's view.
pub fn pass_through_bitmaps() -> (MsrBitmap, MsrBitmap) {
    let mut kernel = MsrBitmap::pass_all();
    let vmx = crate::arch::x86_64::vmx::caps::msr::BASIC..=crate::arch::x86_64::vmx::caps::msr::VMFUNC;
    for msr in vmx.chain([FEATURE_CONTROL]) {
        kernel.trap(msr, MsrAccess::Read);
    }
    for msr in (0..=0x1fff).chain(0xc000_0000..=0xc000_1fff) {
        if !passes_writes(msr) {
            kernel.trap(msr, MsrAccess::Write);
        }
    }
    let mut module = kernel.clone();
    for msr in (0..=0x1fff).chain(0xc000_0000..=0xc000_1fff) {
        module.trap(msr, MsrAccess::Write);
    }
    (kernel, module)
}

/// RDMSR exits of a pass-through guest: VMX is hidden, and MSRs outside the
/// bitmap's ranges (hypervisor and AMD ranges) do not exist for it.
fn pass_through_read(ctx: &mut ExitContext<'_>, msr: u32) -> Action {
    let value = match msr {
        FEATURE_CONTROL => FEATURE_CONTROL_LOCKED_OFF,
        _ => return deny(ctx),
    };
    let regs = ctx.vcpu.regs();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

/// The guest's current value of an MSR the hypervisor knows where to find.
fn current(ctx: &ExitContext<'_>, msr: u32) -> u64 {
    match home(msr) {
        Some(Home::Vmcs(field)) => ctx.vcpu.read(field),
        _ => ctx.host.read_msr(msr),
    }
}

/// WRMSR exits of a pass-through guest: everything off the allow-list.
fn pass_through_write(ctx: &mut ExitContext<'_>, msr: u32, value: u64) -> Action {
    // An isolated module writes no MSR at all: reported, and the write dropped.
    if let View::Module(_) = ctx.view() {
        super::integrity::refusal(ctx, ViolationKind::ModuleMsr, u64::from(msr));
        skip_instruction(ctx.vcpu, ctx.exit);
        return Action::Resume;
    }
    if GUARDED_AFTER_LOCK.contains(&msr) || msr == KERNEL_GS_BASE {
        let paging = ctx.vcpu.read(Field::Cr0) & CR0_PG != 0;
        if !valid(msr, value, current(ctx, msr), paging) {
            return deny(ctx);
        }
        let value = if msr == EFER { (value & !EFER_LMA) | (current(ctx, msr) & EFER_LMA) } else { value };
        // The user's GS base, while the kernel runs: never a kernel address.
        let kernel_address = msr == KERNEL_GS_BASE && value >> 63 != 0;
        let changes = current(ctx, msr) != value || kernel_address;
        let guarded = msr != KERNEL_GS_BASE || kernel_address;
        if !(guarded && changes && super::integrity::msr_write(ctx, msr, value)) {
            match home(msr) {
                Some(Home::Vmcs(field)) => ctx.vcpu.write(field, value),
                _ => ctx.host.write_msr(msr, value),
            }
        }
    } else {
        match msr {
            TSC | TSC_ADJUST => {
                log::debug!("guest {}: write to the TSC ignored (the hypervisor's clock too)", ctx.guest.name());
            }
            APIC_BASE => {
                // The LAPIC stays where the hypervisor watches it, and on:
                // its mode may change (x2APIC on), its address may not, and
                // a disabled APIC would take no signal from other CPUs.
                let now = ctx.host.read_msr(APIC_BASE);
                if (now ^ value) & APIC_BASE_ADDRESS != 0 || value & APIC_BASE_ENABLE == 0 {
                    super::integrity::refusal(ctx, ViolationKind::GuardedMsr, u64::from(msr));
                } else {
                    ctx.host.write_msr(msr, value);
                }
            }
            // The ICR exists as an MSR in x2APIC mode only; elsewhere the
            // processor faults, and the hypervisor must not.
            X2APIC_ICR if ctx.host.read_msr(APIC_BASE) & APIC_BASE_X2APIC == 0 => return deny(ctx),
            X2APIC_ICR => super::apic::x2apic_icr_write(ctx, value),
            XSS if value == 0 => ctx.host.write_msr(msr, 0),
            // The MTRRs set the hypervisor's own memory types too, and under
            // EPT they do not set the guest's (EPT's types and its PAT do):
            // Linux only writes back what it read, around a cache flush.
            MTRR_CAP => return deny(ctx),
            _ if MTRRS.contains(&msr) => {
                if value != ctx.host.read_msr(msr) && ctx.guest.msrs_logged.first_time(msr) {
                    log::info!(
                        "guest {}: MTRR {msr:#x} <- {value:#x} kept from the hardware (logged once per MSR)",
                        ctx.guest.name()
                    );
                }
            }
            // Setting XD-disable would turn the hypervisor's NX bits into
            // reserved bits under it.
            MISC_ENABLE if value & MISC_ENABLE_XD_DISABLE == 0 => ctx.host.write_msr(msr, value),
            // Counters count only while the guest runs: its value is the
            // VMCS's, loaded on entry and replaced by 0 on every exit.
            PERF_GLOBAL_CTRL if ctx.guest.perf_switched => ctx.vcpu.write(Field::PerfGlobalCtrl, value),
            PERF_GLOBAL_CTRL if value == 0 => {}
            _ if passes_writes(msr) => ctx.host.write_msr(msr, value),
            _ => {
                if ctx.guest.msrs_logged.first_time(msr) {
                    log::info!(
                        "guest {}: write {value:#x} to MSR {msr:#x} refused with #GP: not on the allow-list (logged once per MSR)",
                        ctx.guest.name()
                    );
                }
                return deny(ctx);
            }
        }
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

fn deny(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

pub fn rdmsr(ctx: &mut ExitContext<'_>) -> Action {
    let msr = ctx.vcpu.regs().rcx as u32;
    if ctx.guest.platform.is_pass_through() {
        return pass_through_read(ctx, msr);
    }
    let value = match home(msr) {
        Some(Home::Vmcs(field)) => ctx.vcpu.read(field),
        Some(Home::Shadowed) => *shadow_slot(&mut ctx.guest.msrs, msr),
        Some(Home::HostReadOnly) => ctx.host.read_msr(msr),
        Some(Home::Tsc) => ctx.host.rdtsc(),
        None => return deny(ctx),
    };
    let regs = ctx.vcpu.regs();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

pub fn wrmsr(ctx: &mut ExitContext<'_>) -> Action {
    let regs = ctx.vcpu.regs();
    let msr = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    if ctx.guest.platform.is_pass_through() {
        return pass_through_write(ctx, msr, value);
    }
    match home(msr) {
        Some(Home::Vmcs(field)) => {
            if !valid(msr, value, ctx.vcpu.read(field), true) {
                return deny(ctx);
            }
            ctx.vcpu.write(field, value);
        }
        Some(Home::Shadowed) => {
            if !valid(msr, value, 0, true) {
                return deny(ctx);
            }
            *shadow_slot(&mut ctx.guest.msrs, msr) = value;
            ctx.host.write_msr(msr, value);
        }
        Some(Home::HostReadOnly | Home::Tsc) | None => return deny(ctx),
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::FakeHost;
    use crate::exits::{dispatch, ExitContext};
    use crate::guest::{test_guest, Guest};
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};

    fn access(g: &mut Guest, v: &mut FakeVcpu, host: &FakeHost, write: bool, msr: u32, value: u64) -> Action {
        v.regs.rcx = u64::from(msr);
        v.regs.rax = value & 0xffff_ffff;
        v.regs.rdx = value >> 32;
        let exit = ExitInfo {
            reason: if write { reason::WRMSR } else { reason::RDMSR },
            instruction_len: 2,
            ..Default::default()
        };
        let phys = crate::guest::memory::fake::FakePhys::new(0, 0);
        let mut ctx = ExitContext { guest: g, vcpu: v, exit: &exit, host, phys: &phys, control: None };
        dispatch(&mut ctx)
    }

    /// (msr, write?, value, allowed?) for the test guests' policy.
    #[test]
    fn allow_list_table() {
        let cases: &[(u32, bool, u64, bool)] = &[
            (EFER, false, 0, true),
            (EFER, true, 0xd01, true),  // set SCE and NXE
            (EFER, true, 0x001, false), // clear LME/LMA: refused
            (PAT, true, 0x0007_0406_0007_0406, true),
            (PAT, true, 0x0002_0000_0000_0000, false), // type 2 is reserved
            (FS_BASE, true, 0xffff_8000_0000_0000, true),
            (FS_BASE, true, 0x0000_8000_0000_0000, false), // non-canonical
            (LSTAR, true, 0xffff_ffff_8100_0000, true),
            (STAR, true, 0x0023_0010_0000_0000, true),
            (TSC_AUX, true, 1 << 32, false),
            (TSC, false, 0, true),
            (TSC, true, 5, false),
            (MISC_ENABLE, false, 0, true),
            (MISC_ENABLE, true, 1, false),
            (0x3a, false, 0, false), // IA32_FEATURE_CONTROL
            (0x3a, true, 5, false),
            (0x480, false, 0, false), // IA32_VMX_BASIC
            (0x1b, false, 0, false),  // APIC base: no LAPIC for test guests
            (0xdead_beef, false, 0, false),
        ];
        for &(msr, write, value, allowed) in cases {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.write(Field::Efer, 0x500);
            let host = FakeHost::default();
            assert_eq!(access(&mut g, &mut v, &host, write, msr, value), Action::Resume);
            let faulted = v.injected() == Some((13, Some(0)));
            assert_eq!(!faulted, allowed, "msr {msr:#x} write={write} value={value:#x}");
            let rip = v.read(Field::Rip);
            assert_eq!(rip, if allowed { 0x10_0002 } else { 0x10_0000 }, "msr {msr:#x}");
        }
    }

    #[test]
    fn shadowed_msrs_write_through_and_read_back() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let host = FakeHost::default();
        access(&mut g, &mut v, &host, true, LSTAR, 0xffff_ffff_8123_4567);
        assert_eq!(host.msr_writes.borrow().as_slice(), &[(LSTAR, 0xffff_ffff_8123_4567)]);
        access(&mut g, &mut v, &host, false, LSTAR, 0);
        assert_eq!((v.regs.rdx << 32) | v.regs.rax, 0xffff_ffff_8123_4567);
    }

    fn pass_through_guest() -> Guest {
        let mut g = test_guest();
        g.platform = crate::guest::Platform::PassThrough { pm1a_control: None, lapic: None };
        g
    }

    #[test]
    fn pass_through_guests_see_vmx_locked_off() {
        let host = FakeHost::default();
        for (msr, write, allowed, value) in [
            (0x3a, false, true, 1u64),
            (0x3a, true, false, 0),
            (0x480, false, false, 0),
            (0x491, false, false, 0),
            (0x10, true, true, 0),
            (0x4000_0000, false, false, 0),
        ] {
            let mut g = pass_through_guest();
            let mut v = FakeVcpu::new();
            access(&mut g, &mut v, &host, write, msr, 0);
            assert_eq!(v.injected().is_none(), allowed, "msr {msr:#x} write={write}");
            if allowed && !write {
                assert_eq!(v.regs.rax, value);
            }
        }
        assert!(host.msr_writes.borrow().is_empty(), "nothing reaches the hardware");
        let (kernel, _) = pass_through_bitmaps();
        assert!(kernel.traps(0x3a, MsrAccess::Read) && kernel.traps(0x3a, MsrAccess::Write));
    }

    #[test]
    fn writes_pass_by_allow_list_only() {
        let (kernel, module) = pass_through_bitmaps();
        // The hot paths pass; what subverts the kernel or the hypervisor exits.
        for msr in [0x48, 0x6e0, 0x80b, FS_BASE] {
            assert!(!kernel.traps(msr, MsrAccess::Write), "{msr:#x}");
        }
        for msr in [EFER, STAR, LSTAR, SFMASK, GS_BASE, KERNEL_GS_BASE, APIC_BASE, 0x79, X2APIC_ICR, XSS, 0x3a, 0x10] {
            assert!(kernel.traps(msr, MsrAccess::Write), "{msr:#x}");
        }
        // Off the list: #GP, and nothing reaches the hardware.
        let host = FakeHost::default();
        let mut g = pass_through_guest();
        let mut v = FakeVcpu::new();
        access(&mut g, &mut v, &host, true, 0x1a4, 0xf); // MISC_FEATURE_CONTROL: prefetchers
        assert_eq!(v.injected(), Some((13, Some(0))));
        assert!(host.msr_writes.borrow().is_empty());
        // A module's view: every write exits, reads are as the kernel's.
        assert!((0..0x2000).all(|m| module.traps(m, MsrAccess::Write)));
        assert!(!module.traps(0x10, MsrAccess::Read));
    }

    fn locked(mode: crate::integrity::Mode, view: crate::integrity::View) -> Guest {
        let mut g = pass_through_guest();
        let mut i = crate::integrity::GuestIntegrity::new(mode, alloc::vec![]);
        let layout = crate::integrity::KernelLayout::default();
        i.engine.register_kernel(layout, []).unwrap();
        i.engine.lock([]).unwrap();
        i.local.view = view;
        g.integrity = Some(i);
        g
    }

    fn kinds(g: &mut Guest) -> alloc::vec::Vec<u32> {
        g.integrity.as_mut().unwrap().engine.violations.take(99).map(|r| r.kind).collect()
    }

    #[test]
    fn an_isolated_module_writes_no_msr() {
        use crate::integrity::{Mode, View, ViolationKind};
        for msr in [LSTAR, GS_BASE, EFER, 0x48, FS_BASE] {
            let mut g = locked(Mode::Enforce, View::Module(2));
            let mut v = FakeVcpu::new();
            v.write(Field::Efer, 0xd01);
            let host = FakeHost::default();
            assert_eq!(access(&mut g, &mut v, &host, true, msr, 0xffff_8000_dead_0000), Action::Resume);
            assert!(host.msr_writes.borrow().is_empty(), "{msr:#x} reached the hardware");
            assert_eq!((v.read(Field::GsBase), v.read(Field::Efer)), (0, 0xd01), "{msr:#x}");
            assert_eq!(v.read(Field::Rip), 0x10_0002, "skipped, the module runs on");
            assert_eq!(kinds(&mut g), [ViolationKind::ModuleMsr as u32], "{msr:#x}");
        }
    }

    #[test]
    fn the_kernels_guarded_msrs_hold_after_the_lock() {
        use crate::integrity::{Mode, View, ViolationKind};
        for (msr, value) in [
            (EFER, 0x501u64), // NXE cleared
            (STAR, 0x0023_0010_0000_0000),
            (SFMASK, 0),
            (GS_BASE, 0xffff_8880_1234_0000),
            (KERNEL_GS_BASE, 0xffff_8880_1234_0000),
            (MICROCODE_TRIGGER, 0x1000),
        ] {
            let mut g = locked(Mode::Enforce, View::Kernel);
            let mut v = FakeVcpu::new();
            v.write(Field::Efer, 0xd01);
            let host = FakeHost::default();
            access(&mut g, &mut v, &host, true, msr, value);
            assert!(host.msr_writes.borrow().is_empty(), "{msr:#x}");
            assert_eq!((v.read(Field::GsBase), v.read(Field::Efer)), (0, 0xd01), "{msr:#x}");
            assert_eq!(kinds(&mut g), [ViolationKind::GuardedMsr as u32], "{msr:#x}");
        }
        // The user's GS base may change (a context switch); the current value may be written again.
        let mut g = locked(Mode::Enforce, View::Kernel);
        let mut v = FakeVcpu::new();
        v.write(Field::Efer, 0xd01);
        let host = FakeHost::default();
        access(&mut g, &mut v, &host, true, KERNEL_GS_BASE, 0x7f00_1234_0000);
        access(&mut g, &mut v, &host, true, EFER, 0xd01);
        assert_eq!(host.msr_writes.borrow().as_slice(), [(KERNEL_GS_BASE, 0x7f00_1234_0000)]);
        assert!(kinds(&mut g).is_empty());
    }

    #[test]
    fn apic_base_stays_and_init_sipi_through_the_x2apic_icr_is_refused() {
        use crate::integrity::{Mode, View, ViolationKind};
        let mut g = locked(Mode::Enforce, View::Kernel);
        let mut host = FakeHost::default();
        host.msrs.insert(APIC_BASE, 0xfee0_0900);
        let mut v = FakeVcpu::new();
        // Moving the APIC out of the hypervisor's sight, or turning it off: refused.
        access(&mut g, &mut v, &host, true, APIC_BASE, 0xfed0_0900);
        access(&mut g, &mut v, &host, true, APIC_BASE, 0xfee0_0100);
        // x2APIC mode on, same base: fine.
        access(&mut g, &mut v, &host, true, APIC_BASE, 0xfee0_0d00);
        host.msrs.insert(APIC_BASE, 0xfee0_0d00);
        // INIT then SIPI to APIC 1, which the guest was not given; a fixed IPI to it is refused too.
        access(&mut g, &mut v, &host, true, X2APIC_ICR, (1 << 32) | 0x4500);
        access(&mut g, &mut v, &host, true, X2APIC_ICR, (1 << 32) | 0x069a);
        access(&mut g, &mut v, &host, true, X2APIC_ICR, (1 << 32) | 0x00ec);
        // A fixed IPI to itself goes out as written.
        access(&mut g, &mut v, &host, true, X2APIC_ICR, 0x00ec);
        assert_eq!(host.msr_writes.borrow().as_slice(), [(APIC_BASE, 0xfee0_0d00), (X2APIC_ICR, 0xec)]);
        assert_eq!(
            kinds(&mut g),
            [
                ViolationKind::GuardedMsr as u32,
                ViolationKind::GuardedMsr as u32,
                ViolationKind::StartCpu as u32,
                ViolationKind::StartCpu as u32,
                ViolationKind::ForeignIpi as u32
            ]
        );
        assert!(g.is_running(), "the guest runs on");
    }

    #[test]
    fn efer_lme_changes_only_with_paging_off_and_lma_stays_the_processors() {
        let host = FakeHost::default();
        // A vCPU started by a start-up IPI, in protected mode without paging.
        let mut g = pass_through_guest();
        let mut v = FakeVcpu::new();
        v.write(Field::Cr0, 0x11);
        access(&mut g, &mut v, &host, true, EFER, 0xd01 | (1 << 10));
        assert_eq!((v.injected(), v.read(Field::Efer)), (None, 0x901), "LME and NXE set; LMA not taken");
        // With paging on, LME is fixed.
        let mut v = FakeVcpu::new();
        v.write(Field::Cr0, 0x8000_0011);
        access(&mut g, &mut v, &host, true, EFER, 0x100);
        assert_eq!(v.injected(), Some((13, Some(0))));
    }

    #[test]
    fn the_x2apic_icr_faults_in_xapic_mode_and_never_reaches_the_hardware() {
        let mut g = pass_through_guest();
        let mut host = FakeHost::default();
        host.msrs.insert(APIC_BASE, 0xfee0_0900);
        let mut v = FakeVcpu::new();
        access(&mut g, &mut v, &host, true, X2APIC_ICR, 0x00ec);
        assert_eq!(v.injected(), Some((13, Some(0))));
        assert!(host.msr_writes.borrow().is_empty());
    }

    #[test]
    fn counters_are_enabled_only_where_the_vmcs_switches_them() {
        let host = FakeHost::default();
        let mut g = pass_through_guest();
        let mut v = FakeVcpu::new();
        access(&mut g, &mut v, &host, true, PERF_GLOBAL_CTRL, 0xf);
        assert_eq!(v.injected(), Some((13, Some(0))), "not switched: refused");
        g.perf_switched = true;
        let mut v = FakeVcpu::new();
        access(&mut g, &mut v, &host, true, PERF_GLOBAL_CTRL, 0xf);
        assert_eq!(v.read(Field::PerfGlobalCtrl), 0xf);
        assert!(host.msr_writes.borrow().is_empty(), "the hardware gets it at entry, and 0 at exit");
    }

    #[test]
    fn vmcs_msrs_land_in_the_vmcs() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let host = FakeHost::default();
        access(&mut g, &mut v, &host, true, GS_BASE, 0x1234_5000);
        assert_eq!(v.read(Field::GsBase), 0x1234_5000);
        access(&mut g, &mut v, &host, false, TSC, 0);
        assert_eq!(v.regs.rax, 123_456);
    }
}
