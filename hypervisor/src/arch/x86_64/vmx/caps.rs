//! What the processor's VMX implementation allows, and the VM-execution,
//! VM-exit and VM-entry controls CTVM computes from it.
//!
//! Nothing is hard-coded: every control word starts from the allowed-0 bits
//! (which must be 1) and adds the wanted bits that allowed-1 permits, using
//! the TRUE_* MSRs when IA32_VMX_BASIC bit 55 says they exist (SDM Vol. 3D,
//! A.3–A.5). A missing required feature is an error naming it.

use core::fmt;

pub use x86::vmx::vmcs::control::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};

/// VMX capability MSRs.
pub mod msr {
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const BASIC: u32 = 0x480;
    pub const PINBASED_CTLS: u32 = 0x481;
    pub const PROCBASED_CTLS: u32 = 0x482;
    pub const EXIT_CTLS: u32 = 0x483;
    pub const ENTRY_CTLS: u32 = 0x484;
    pub const MISC: u32 = 0x485;
    pub const CR0_FIXED0: u32 = 0x486;
    pub const CR0_FIXED1: u32 = 0x487;
    pub const CR4_FIXED0: u32 = 0x488;
    pub const CR4_FIXED1: u32 = 0x489;
    pub const VMCS_ENUM: u32 = 0x48a;
    pub const PROCBASED_CTLS2: u32 = 0x48b;
    pub const EPT_VPID_CAP: u32 = 0x48c;
    pub const TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const TRUE_ENTRY_CTLS: u32 = 0x490;
    pub const VMFUNC: u32 = 0x491;

    /// Is this one of the VMX MSRs (including FEATURE_CONTROL), which guests never see?
    pub const fn is_vmx(index: u32) -> bool {
        index == FEATURE_CONTROL || (index >= BASIC && index <= VMFUNC)
    }
}

/// IA32_FEATURE_CONTROL bits.
pub mod feature_control {
    pub const LOCK: u64 = 1 << 0;
    pub const VMX_INSIDE_SMX: u64 = 1 << 1;
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// The raw capability MSRs, with the TRUE_* variants already chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    /// Zero when the CPU has no secondary controls.
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// Zero when the CPU has neither EPT nor VPID.
    pub ept_vpid_cap: u64,
    /// Zero when the CPU has no VM functions.
    pub vmfunc: u64,
}

const BASIC_TRUE_CTLS: u64 = 1 << 55;

impl VmxMsrs {
    /// Reads every capability MSR through `rdmsr`, skipping the ones whose
    /// existence an earlier MSR denies (reading those would #GP).
    pub fn read(mut rdmsr: impl FnMut(u32) -> u64) -> Self {
        let basic = rdmsr(msr::BASIC);
        let true_ctls = basic & BASIC_TRUE_CTLS != 0;
        let pick = |plain: u32, true_msr: u32| if true_ctls { true_msr } else { plain };
        let procbased = rdmsr(pick(msr::PROCBASED_CTLS, msr::TRUE_PROCBASED_CTLS));
        let has_secondary = allowed1(procbased) & PrimaryControls::SECONDARY_CONTROLS.bits() != 0;
        let procbased2 = if has_secondary { rdmsr(msr::PROCBASED_CTLS2) } else { 0 };
        let p2 = allowed1(procbased2);
        let ept_or_vpid = SecondaryControls::ENABLE_EPT.bits() | SecondaryControls::ENABLE_VPID.bits();
        let ept_vpid_cap = if p2 & ept_or_vpid != 0 { rdmsr(msr::EPT_VPID_CAP) } else { 0 };
        let vmfunc = if p2 & SecondaryControls::ENABLE_VM_FUNCTIONS.bits() != 0 { rdmsr(msr::VMFUNC) } else { 0 };
        VmxMsrs {
            basic,
            pinbased: rdmsr(pick(msr::PINBASED_CTLS, msr::TRUE_PINBASED_CTLS)),
            procbased,
            procbased2,
            exit: rdmsr(pick(msr::EXIT_CTLS, msr::TRUE_EXIT_CTLS)),
            entry: rdmsr(pick(msr::ENTRY_CTLS, msr::TRUE_ENTRY_CTLS)),
            misc: rdmsr(msr::MISC),
            cr0_fixed0: rdmsr(msr::CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::CR4_FIXED1),
            ept_vpid_cap,
            vmfunc,
        }
    }

    pub const fn revision(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Bytes the VMXON and VMCS regions need (at most 4 KiB).
    pub const fn region_size(&self) -> u64 {
        (self.basic >> 32) & 0x1fff
    }

    /// The VMX-preemption timer counts down once every 2^rate TSC ticks.
    pub const fn preemption_timer_rate(&self) -> u32 {
        (self.misc & 0x1f) as u32
    }

    /// Applies the CR0 fixed bits; `unrestricted` relaxes PE and PG.
    pub const fn fix_cr0(&self, value: u64, unrestricted: bool) -> u64 {
        let mut must_be_1 = self.cr0_fixed0;
        if unrestricted {
            must_be_1 &= !(CR0_PE | CR0_PG);
        }
        (value | must_be_1) & self.cr0_fixed1
    }

    pub const fn fix_cr4(&self, value: u64) -> u64 {
        (value | self.cr4_fixed0) & self.cr4_fixed1
    }
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_VMXE: u64 = 1 << 13;

const fn allowed0(caps: u64) -> u32 {
    caps as u32
}

const fn allowed1(caps: u64) -> u32 {
    (caps >> 32) as u32
}

/// EPT and VPID capability bits (IA32_VMX_EPT_VPID_CAP).
pub mod ept_cap {
    pub const EXECUTE_ONLY: u64 = 1 << 0;
    pub const WALK_LENGTH_4: u64 = 1 << 6;
    pub const MEMTYPE_WB: u64 = 1 << 14;
    pub const PAGE_2M: u64 = 1 << 16;
    pub const PAGE_1G: u64 = 1 << 17;
    pub const INVEPT: u64 = 1 << 20;
    pub const ACCESSED_DIRTY: u64 = 1 << 21;
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    pub const INVEPT_ALL: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE: u64 = 1 << 41;
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// A feature CTVM cannot run without, absent on this processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Bits of a control word that allowed-1 forbids.
    Control { word: &'static str, bits: u32 },
    /// An EPT capability (a bit of IA32_VMX_EPT_VPID_CAP).
    Ept(&'static str),
    /// VMCS regions must be write-back and addresses 64-bit.
    Basic(&'static str),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Control { word, bits } => {
                write!(f, "{word} controls {bits:#010x} cannot be set on this processor")
            }
            Missing::Ept(what) => write!(f, "EPT lacks {what}"),
            Missing::Basic(what) => write!(f, "IA32_VMX_BASIC: {what}"),
        }
    }
}

/// Combines wanted bits with what the processor allows. Required bits that
/// cannot be set are an error; optional ones are dropped.
fn adjust(word: &'static str, caps: u64, required: u32, optional: u32) -> Result<u32, Missing> {
    let missing = required & !allowed1(caps);
    if missing != 0 {
        return Err(Missing::Control { word, bits: missing });
    }
    Ok(allowed0(caps) | required | (optional & allowed1(caps)))
}

/// The optional features that ended up enabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub vpid: bool,
    pub unrestricted_guest: bool,
    pub preemption_timer: bool,
    pub vmfunc_eptp_switching: bool,
    pub ept_violation_ve: bool,
    pub ept_1g_pages: bool,
    pub ept_2m_pages: bool,
    pub ept_accessed_dirty: bool,
    pub ept_execute_only: bool,
    pub invept_single_context: bool,
    pub invvpid: bool,
    pub hlt_activity_state: bool,
    /// A vCPU may wait for a start-up IPI in VMX non-root operation.
    pub wait_for_sipi_activity_state: bool,
    /// INVEPT of every EPT hierarchy at once (what a CPU catching up does).
    pub invept_all_context: bool,
    /// An exit when the guest can take an NMI again.
    pub nmi_window_exiting: bool,
    /// IA32_PERF_GLOBAL_CTRL is loaded on both VM exit (0) and entry.
    pub perf_global_ctrl: bool,
}

/// The control words every VMCS starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pinbased: u32,
    pub procbased: u32,
    pub procbased2: u32,
    pub exit: u32,
    pub entry: u32,
    pub features: Features,
}

impl Controls {
    /// Computes the baseline controls. Per-guest differences (IA-32e mode
    /// guest, the preemption timer for time slicing) are toggled later with
    /// [`Controls::with_entry`] and friends, always within what is allowed.
    pub fn compute(m: &VmxMsrs) -> Result<Self, Missing> {
        if m.basic & (1 << 48) != 0 {
            return Err(Missing::Basic("VMCS addresses limited to 32 bits"));
        }
        if (m.basic >> 50) & 0xf != 6 {
            return Err(Missing::Basic("VMCS memory type is not write-back"));
        }

        // External interrupts exit by default: a guest with emulated devices
        // only must never take the host's interrupts. Pass-through guests turn
        // this off. NMIs always exit: they are the hypervisor's signal between
        // CPUs, and a guest's own NMIs are delivered to it as virtual NMIs
        // (whose blocking the processor tracks for the guest).
        let pinbased = adjust(
            "pin-based",
            m.pinbased,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinbasedControls::NMI_EXITING
                | PinbasedControls::VIRTUAL_NMIS)
                .bits(),
            PinbasedControls::VMX_PREEMPTION_TIMER.bits(),
        )?;

        let procbased = adjust(
            "primary processor-based",
            m.procbased,
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::MWAIT_EXITING
                | PrimaryControls::MONITOR_EXITING
                | PrimaryControls::USE_IO_BITMAPS
                | PrimaryControls::USE_MSR_BITMAPS
                | PrimaryControls::SECONDARY_CONTROLS)
                .bits(),
            0,
        )?;

        // Instructions the guest may use must be enabled where they exist,
        // or they raise #UD inside the guest.
        let p2_optional = SecondaryControls::ENABLE_VPID
            | SecondaryControls::UNRESTRICTED_GUEST
            | SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::ENABLE_XSAVES_XRSTORS
            | SecondaryControls::ENABLE_VM_FUNCTIONS
            | SecondaryControls::EPT_VIOLATION_VE;
        let mut procbased2 = adjust(
            "secondary processor-based",
            m.procbased2,
            SecondaryControls::ENABLE_EPT.bits(),
            p2_optional.bits(),
        )?;

        let cap = m.ept_vpid_cap;
        for (bit, what) in [
            (ept_cap::WALK_LENGTH_4, "4-level page walks"),
            (ept_cap::MEMTYPE_WB, "write-back paging structures"),
            (ept_cap::INVEPT, "the INVEPT instruction"),
        ] {
            if cap & bit == 0 {
                return Err(Missing::Ept(what));
            }
        }
        if cap & (ept_cap::INVEPT_SINGLE | ept_cap::INVEPT_ALL) == 0 {
            return Err(Missing::Ept("a usable INVEPT type"));
        }

        let has = |word: u32, bits: SecondaryControls| word & bits.bits() != 0;
        // VPID is only worth having with INVVPID to flush it.
        let invvpid = cap & ept_cap::INVVPID != 0 && cap & (ept_cap::INVVPID_SINGLE | ept_cap::INVVPID_ALL) != 0;
        if !invvpid {
            procbased2 &= !SecondaryControls::ENABLE_VPID.bits();
        }
        // Only EPTP switching is used among the VM functions.
        let eptp_switching = has(procbased2, SecondaryControls::ENABLE_VM_FUNCTIONS) && m.vmfunc & 1 != 0;
        if !eptp_switching {
            procbased2 &= !SecondaryControls::ENABLE_VM_FUNCTIONS.bits();
        }

        // IA32_PERF_GLOBAL_CTRL switched on exit and entry, where both
        // directions exist: the guest's counters (and PEBS) then never count
        // in the hypervisor. Without it, guests may not enable counters.
        let perf_exit = ExitControls::LOAD_IA32_PERF_GLOBAL_CTRL.bits();
        let perf_entry = EntryControls::LOAD_IA32_PERF_GLOBAL_CTRL.bits();
        let perf = allowed1(m.exit) & perf_exit != 0 && allowed1(m.entry) & perf_entry != 0;
        let exit = adjust(
            "VM-exit",
            m.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT)
                .bits(),
            if perf { perf_exit } else { 0 },
        )?;
        let entry = adjust(
            "VM-entry",
            m.entry,
            (EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits(),
            if perf { perf_entry } else { 0 },
        )?;
        if allowed1(m.entry) & EntryControls::IA32E_MODE_GUEST.bits() == 0 {
            return Err(Missing::Control { word: "VM-entry", bits: EntryControls::IA32E_MODE_GUEST.bits() });
        }

        let features = Features {
            vpid: has(procbased2, SecondaryControls::ENABLE_VPID),
            unrestricted_guest: has(procbased2, SecondaryControls::UNRESTRICTED_GUEST),
            preemption_timer: pinbased & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0,
            vmfunc_eptp_switching: eptp_switching,
            ept_violation_ve: has(procbased2, SecondaryControls::EPT_VIOLATION_VE),
            ept_1g_pages: cap & ept_cap::PAGE_1G != 0,
            ept_2m_pages: cap & ept_cap::PAGE_2M != 0,
            ept_accessed_dirty: cap & ept_cap::ACCESSED_DIRTY != 0,
            ept_execute_only: cap & ept_cap::EXECUTE_ONLY != 0,
            invept_single_context: cap & ept_cap::INVEPT_SINGLE != 0,
            invvpid,
            hlt_activity_state: m.misc & (1 << 6) != 0,
            wait_for_sipi_activity_state: m.misc & (1 << 8) != 0,
            invept_all_context: cap & ept_cap::INVEPT_ALL != 0,
            nmi_window_exiting: allowed1(m.procbased) & PrimaryControls::NMI_WINDOW_EXITING.bits() != 0,
            perf_global_ctrl: perf,
        };
        // #VE and VM functions need per-view set-up the baseline does not do;
        // they are switched on where used.
        procbased2 &= !(SecondaryControls::EPT_VIOLATION_VE | SecondaryControls::ENABLE_VM_FUNCTIONS).bits();
        // The preemption timer is switched on per guest when time slicing.
        let pinbased = pinbased & !PinbasedControls::VMX_PREEMPTION_TIMER.bits()
            | (allowed0(m.pinbased) & PinbasedControls::VMX_PREEMPTION_TIMER.bits());

        Ok(Controls { pinbased, procbased, procbased2, exit, entry, features })
    }

    /// Sets or clears an entry control, if the processor allows the change.
    pub fn entry_with(&self, m: &VmxMsrs, bits: EntryControls, on: bool) -> Option<u32> {
        toggle(self.entry, m.entry, bits.bits(), on)
    }

    pub fn pinbased_with(&self, m: &VmxMsrs, bits: PinbasedControls, on: bool) -> Option<u32> {
        toggle(self.pinbased, m.pinbased, bits.bits(), on)
    }

    pub fn exit_with(&self, m: &VmxMsrs, bits: ExitControls, on: bool) -> Option<u32> {
        toggle(self.exit, m.exit, bits.bits(), on)
    }

    pub fn procbased_with(&self, m: &VmxMsrs, bits: PrimaryControls, on: bool) -> Option<u32> {
        toggle(self.procbased, m.procbased, bits.bits(), on)
    }

    pub fn procbased2_with(&self, m: &VmxMsrs, bits: SecondaryControls, on: bool) -> Option<u32> {
        toggle(self.procbased2, m.procbased2, bits.bits(), on)
    }
}

/// `word` with `bits` set or cleared, or `None` when the processor forbids it.
fn toggle(word: u32, caps: u64, bits: u32, on: bool) -> Option<u32> {
    if on {
        (bits & !allowed1(caps) == 0).then_some(word | bits)
    } else {
        (bits & allowed0(caps) == 0).then_some(word & !bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs 2.7, `cpu: model=corei7_skylake_x`, as CTVM's `boot` scenario
    /// logs them with `log=debug` (the allowed-1 halves match BOCHS.md).
    fn bochs_skylake_x() -> VmxMsrs {
        VmxMsrs {
            basic: 0x00d8_1000_0000_002b,
            pinbased: 0x0000_007f_0000_0016,
            procbased: 0xf7f9_fffe_0400_6172,
            procbased2: 0x0217_7fff_0000_0000,
            exit: 0x007f_ffff_0003_6dfb,
            entry: 0x0000_ffff_0000_11fb,
            misc: 0x0000_0000_6004_01e0,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_27ff,
            ept_vpid_cap: 0x0000_0f01_0633_4141,
            vmfunc: 1,
        }
    }

    /// A bare-metal Haswell-generation part: the primary, secondary, exit and
    /// entry MSRs come from a published dmesg dump of that machine; the dump
    /// lacks the others, which are set to the usual values of the generation,
    /// with IA32_VMX_BASIC bit 55 clear as on older parts. The plain (non-TRUE)
    /// MSRs then apply, so CR3-load/store exiting cannot be turned off.
    fn haswell_without_true_msrs() -> VmxMsrs {
        VmxMsrs {
            basic: 0x0058_0400_0000_0012,
            pinbased: 0x0000_007f_0000_0016,
            procbased: 0xfff9_fffe_0401_e172,
            procbased2: 0x0000_3cff_0000_0000,
            exit: 0x01ff_ffff_0003_6dff,
            entry: 0x0003_ffff_0000_11ff,
            misc: 0x0000_0000_3004_41e5,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0017_27ff,
            ept_vpid_cap: 0x0000_0f01_0633_4141,
            vmfunc: 1,
        }
    }

    /// The virtual CPU nested KVM offers an L1 hypervisor, as CTVM sees it
    /// under `qemu -enable-kvm -cpu host`: control MSRs from a published dump
    /// (no preemption timer, no VMCS shadowing); BASIC/MISC/EPT as KVM reports.
    fn kvm_nested() -> VmxMsrs {
        VmxMsrs {
            basic: 0x00da_0400_0000_0001,
            pinbased: 0x0000_003f_0000_0016,
            procbased: 0xfff9_fffe_0401_e172,
            procbased2: 0x0055_3cfe_0000_0000,
            exit: 0x003f_efff_0003_6dff,
            entry: 0x0000_d3ff_0000_11ff,
            misc: 0x0000_0000_2000_0065,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_27ff,
            ept_vpid_cap: 0x0000_0f01_0673_4141,
            vmfunc: 1,
        }
    }

    /// Table-driven: (CPU, expected control words, expected features).
    #[test]
    fn controls_from_real_capability_values() {
        // MWAIT and MONITOR exit (the guest is told it has neither).
        const MWAIT_AND_MONITOR: u32 = (1 << 10) | (1 << 29);
        struct Case {
            name: &'static str,
            msrs: VmxMsrs,
            pinbased: u32,
            procbased: u32,
            procbased2: u32,
            exit: u32,
            entry: u32,
            unrestricted: bool,
            preemption_timer: bool,
            vmfunc: bool,
            ept_1g: bool,
        }
        let cases = [
            Case {
                name: "bochs skylake-x",
                msrs: bochs_skylake_x(),
                pinbased: 0x16 | 0x1 | 0x8 | 0x20,
                procbased: 0x0400_6172 | 0x80 | (1 << 25) | (1 << 28) | (1 << 31) | MWAIT_AND_MONITOR,
                // EPT, RDTSCP, VPID, unrestricted, INVPCID, XSAVES (VMFUNC/#VE stay off by default).
                procbased2: 0x2 | 0x8 | 0x20 | 0x80 | 0x1000 | 0x10_0000,
                // IA32_PERF_GLOBAL_CTRL loaded on exit (bit 12) and entry (bit 13).
                exit: 0x0003_6dfb | (1 << 9) | (0xf << 18) | (1 << 12),
                entry: 0x11fb | (1 << 14) | (1 << 15) | (1 << 13),
                unrestricted: true,
                preemption_timer: true,
                vmfunc: true,
                ept_1g: true,
            },
            Case {
                name: "kvm nested",
                msrs: kvm_nested(),
                pinbased: 0x16 | 0x1 | 0x8 | 0x20,
                procbased: 0x0401_e172 | 0x80 | (1 << 25) | (1 << 28) | (1 << 31) | MWAIT_AND_MONITOR,
                procbased2: 0x2 | 0x8 | 0x20 | 0x80 | 0x1000 | 0x10_0000,
                exit: 0x0003_6dff | (1 << 9) | (0xf << 18),
                entry: 0x11ff | (1 << 14) | (1 << 15),
                unrestricted: true,
                preemption_timer: false,
                vmfunc: true,
                ept_1g: true,
            },
            Case {
                name: "haswell",
                msrs: haswell_without_true_msrs(),
                pinbased: 0x16 | 0x1 | 0x8 | 0x20,
                // CR3-load and CR3-store exiting (bits 15, 16) are forced on.
                procbased: 0x0401_e172 | 0x80 | (1 << 25) | (1 << 28) | (1 << 31) | MWAIT_AND_MONITOR,
                procbased2: 0x2 | 0x8 | 0x20 | 0x80 | 0x1000,
                exit: 0x0003_6dff | (1 << 9) | (0xf << 18) | (1 << 12),
                entry: 0x11ff | (1 << 14) | (1 << 15) | (1 << 13),
                unrestricted: true,
                preemption_timer: true,
                vmfunc: true,
                ept_1g: true,
            },
        ];
        for c in cases {
            let got = Controls::compute(&c.msrs).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(got.pinbased, c.pinbased, "{}: pin-based {:#x}", c.name, got.pinbased);
            assert_eq!(got.procbased, c.procbased, "{}: primary {:#x}", c.name, got.procbased);
            assert_eq!(got.procbased2, c.procbased2, "{}: secondary {:#x}", c.name, got.procbased2);
            assert_eq!(got.exit, c.exit, "{}: exit {:#x}", c.name, got.exit);
            assert_eq!(got.entry, c.entry, "{}: entry {:#x}", c.name, got.entry);
            assert_eq!(got.features.unrestricted_guest, c.unrestricted, "{}", c.name);
            assert_eq!(got.features.preemption_timer, c.preemption_timer, "{}", c.name);
            assert_eq!(got.features.vmfunc_eptp_switching, c.vmfunc, "{}", c.name);
            assert_eq!(got.features.ept_1g_pages, c.ept_1g, "{}", c.name);
            assert_eq!(got.features.perf_global_ctrl, got.exit & (1 << 12) != 0, "{}", c.name);
            // NMIs exit, as virtual NMIs, everywhere; Bochs also has what
            // SMP guests use: NMI windows, wait-for-SIPI, INVEPT of all contexts.
            assert_eq!(got.pinbased & 0x28, 0x28, "{}", c.name);
            if c.name.starts_with("bochs") {
                let f = got.features;
                assert!(f.nmi_window_exiting && f.wait_for_sipi_activity_state && f.invept_all_context);
            }
            // Every word respects both halves of its capability MSR.
            for (word, caps) in [
                (got.pinbased, c.msrs.pinbased),
                (got.procbased, c.msrs.procbased),
                (got.procbased2, c.msrs.procbased2),
                (got.exit, c.msrs.exit),
                (got.entry, c.msrs.entry),
            ] {
                assert_eq!(word & allowed0(caps), allowed0(caps), "{}: allowed-0 violated", c.name);
                assert_eq!(word & !allowed1(caps), 0, "{}: allowed-1 violated", c.name);
            }
        }
    }

    #[test]
    fn true_msrs_are_read_only_when_basic_bit_55_says_so() {
        let mut read = Vec::new();
        let bochs = bochs_skylake_x();
        VmxMsrs::read(|m| {
            read.push(m);
            match m {
                msr::BASIC => bochs.basic,
                msr::TRUE_PROCBASED_CTLS | msr::PROCBASED_CTLS => bochs.procbased,
                msr::PROCBASED_CTLS2 => bochs.procbased2,
                _ => 0,
            }
        });
        assert!(read.contains(&msr::TRUE_PINBASED_CTLS));
        assert!(!read.contains(&msr::PINBASED_CTLS));

        let mut read = Vec::new();
        let haswell = haswell_without_true_msrs();
        VmxMsrs::read(|m| {
            read.push(m);
            match m {
                msr::BASIC => haswell.basic,
                msr::PROCBASED_CTLS => haswell.procbased,
                _ => 0,
            }
        });
        assert!(read.contains(&msr::PINBASED_CTLS));
        assert!(read.contains(&msr::PROCBASED_CTLS2));
        assert!(!read.iter().any(|m| (msr::TRUE_PINBASED_CTLS..=msr::TRUE_ENTRY_CTLS).contains(m)));
    }

    #[test]
    fn msrs_a_cpu_lacks_are_never_read() {
        // No secondary controls: PROCBASED_CTLS2, EPT_VPID_CAP and VMFUNC would #GP.
        let mut read = Vec::new();
        let m = VmxMsrs::read(|m| {
            read.push(m);
            match m {
                msr::BASIC => 0x0058_0400_0000_0012,
                msr::PROCBASED_CTLS => 0x7ff9_fffe_0401_e172,
                _ => 0,
            }
        });
        for absent in [msr::PROCBASED_CTLS2, msr::EPT_VPID_CAP, msr::VMFUNC] {
            assert!(!read.contains(&absent), "read {absent:#x}");
        }
        assert_eq!((m.procbased2, m.ept_vpid_cap, m.vmfunc), (0, 0, 0));
    }

    #[test]
    fn missing_ept_is_refused_with_its_name() {
        let mut m = bochs_skylake_x();
        m.procbased2 &= !(u64::from(SecondaryControls::ENABLE_EPT.bits()) << 32);
        let err = Controls::compute(&m).unwrap_err();
        assert_eq!(err, Missing::Control { word: "secondary processor-based", bits: 0x2 });
        assert!(err.to_string().contains("secondary processor-based"));

        let mut m = bochs_skylake_x();
        m.ept_vpid_cap &= !ept_cap::WALK_LENGTH_4;
        assert_eq!(Controls::compute(&m).unwrap_err(), Missing::Ept("4-level page walks"));

        let mut m = bochs_skylake_x();
        m.procbased = 0; // no secondary controls at all (a pre-EPT CPU)
        assert!(matches!(Controls::compute(&m), Err(Missing::Control { word: "primary processor-based", .. })));
    }

    #[test]
    fn optional_features_drop_out_quietly() {
        // bx_generic-like: no unrestricted guest, no VMFUNC, no preemption timer.
        let mut m = bochs_skylake_x();
        m.procbased2 = 0x0004_67ff_0000_0000 & !(0x80u64 << 32);
        m.pinbased = 0x0000_003f_0000_0016;
        m.vmfunc = 0;
        let c = Controls::compute(&m).unwrap();
        assert!(!c.features.unrestricted_guest);
        assert!(!c.features.preemption_timer);
        assert!(!c.features.vmfunc_eptp_switching);
        assert_eq!(c.procbased2 & SecondaryControls::UNRESTRICTED_GUEST.bits(), 0);
        assert_eq!(c.pinbased_with(&m, PinbasedControls::VMX_PREEMPTION_TIMER, true), None);
    }

    #[test]
    fn vpid_needs_invvpid() {
        let mut m = bochs_skylake_x();
        m.ept_vpid_cap &= !ept_cap::INVVPID;
        let c = Controls::compute(&m).unwrap();
        assert!(!c.features.vpid);
        assert_eq!(c.procbased2 & SecondaryControls::ENABLE_VPID.bits(), 0);
    }

    #[test]
    fn toggles_respect_both_halves() {
        let m = kvm_nested();
        let c = Controls::compute(&m).unwrap();
        let with = c.entry_with(&m, EntryControls::IA32E_MODE_GUEST, true).unwrap();
        assert_ne!(with & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        // Bit 2 (load debug controls) is allowed-0 here: it cannot be cleared.
        assert_eq!(c.entry_with(&m, EntryControls::LOAD_DEBUG_CONTROLS, false), None);
        // No preemption timer under nested KVM.
        assert_eq!(c.pinbased_with(&m, PinbasedControls::VMX_PREEMPTION_TIMER, true), None);
        let b = bochs_skylake_x();
        let cb = Controls::compute(&b).unwrap();
        assert!(cb.pinbased_with(&b, PinbasedControls::VMX_PREEMPTION_TIMER, true).is_some());
    }

    #[test]
    fn fixed_bits_apply_to_cr0_and_cr4() {
        let m = bochs_skylake_x();
        assert_eq!(m.fix_cr0(0, false), 0x8000_0021);
        assert_eq!(m.fix_cr0(0, true), CR0_NE);
        assert_eq!(m.fix_cr4(0x20), 0x20 | CR4_VMXE);
        assert_eq!(m.fix_cr4(1 << 40), CR4_VMXE);
        assert_eq!(m.revision(), 0x2b);
        assert_eq!(m.region_size(), 0x1000);
    }
}
