//! Turning VMX on: detection, IA32_FEATURE_CONTROL, the fixed CR bits, VMXON.

use core::fmt;

use super::caps::{feature_control, msr, Controls, Missing, VmxMsrs};
use super::vmcs::Region;
use crate::arch::x86_64::{cpu, percpu};

/// VMX as this processor offers it, switched on.
pub struct Vmx {
    pub msrs: VmxMsrs,
    pub controls: Controls,
    /// Guest-physical address bits (CPUID 0x80000008).
    pub physical_bits: u8,
    /// The XCR0 components guests may enable, switched through a 4 KiB
    /// XSAVE area (0: no XSAVE for guests).
    pub xcr0_offered: u64,
}

#[derive(Debug)]
pub enum VmxError {
    NoVmx,
    LockedOff(u64),
    Missing(Missing),
    OutOfMemory,
    VmxonFailed,
    /// Another CPU's VMX differs from the boot CPU's.
    Different,
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::NoVmx => write!(f, "this processor has no VMX (CPUID.1:ECX bit 5 is clear)"),
            VmxError::LockedOff(v) => write!(
                f,
                "the firmware locked VMX off (IA32_FEATURE_CONTROL = {v:#x}); enable VT-x in the firmware set-up"
            ),
            VmxError::Missing(m) => write!(f, "a required VMX feature is missing: {m}"),
            VmxError::OutOfMemory => write!(f, "no memory for the VMXON region"),
            VmxError::VmxonFailed => write!(f, "VMXON failed"),
            VmxError::Different => write!(f, "its VMX capabilities differ from the boot CPU's"),
        }
    }
}

const CR4_OSXSAVE: u64 = 1 << 18;

/// Whether the boot CPU is in VMX root operation.
static IN_VMX: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

const CR4_VMXE: u64 = 1 << 13;

/// Leaves VMX operation on the boot CPU, if it is in it: at power-off and
/// before tboot's shutdown entry, which leaves the measured environment
/// (the other CPUs left already: `arch::x86_64::park`).
pub fn leave() {
    if IN_VMX.swap(false, core::sync::atomic::Ordering::SeqCst) {
        // SAFETY: in VMX root operation (the flag says so); no guest runs
        // again after this.
        unsafe { off_here() };
    }
}

/// Leaves VMX operation on this CPU: the current VMCS cleared (its state
/// written back, none left active on the CPU), VMXOFF, then CR4.VMXE
/// cleared, so INIT reaches the CPU again and nothing after CTVM finds
/// VMX half on.
///
/// # Safety
/// The CPU is in VMX root operation and runs no guest after this.
pub unsafe fn off_here() {
    use x86::bits64::vmx;
    // SAFETY: in VMX root operation (the caller's word): VMPTRST and
    // VMCLEAR of the current VMCS, then VMXOFF; CR4.VMXE may be cleared
    // outside VMX operation.
    unsafe {
        if let Ok(current) = vmx::vmptrst() {
            if current != u64::MAX {
                let _ = vmx::vmclear(current);
            }
        }
        let _ = vmx::vmxoff();
        cpu::write_cr4(cpu::read_cr4() & !CR4_VMXE);
    }
}

/// Detects VMX, checks every required feature, and enters VMX root
/// operation on this CPU (the boot CPU).
pub fn enable() -> Result<Vmx, VmxError> {
    feature_control()?;
    // SAFETY: VmxMsrs::read only reads the MSRs whose existence the earlier ones announce.
    let msrs = VmxMsrs::read(|m| unsafe { cpu::rdmsr(m) });
    let controls = Controls::compute(&msrs).map_err(VmxError::Missing)?;

    // Guests' extended state is switched with XSAVE into a 4 KiB area:
    // guests get the components that fit.
    let host_cpuid = |leaf, subleaf| {
        let r = cpu::cpuid(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    };
    let xcr0_offered = crate::exits::xcr0_offered(&host_cpuid, 4096);
    let physical_bits =
        if cpu::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 { cpu::cpuid(0x8000_0008, 0).eax as u8 } else { 36 };
    let vmx = Vmx { msrs, controls, physical_bits, xcr0_offered };
    vmxon(&vmx)?;
    IN_VMX.store(true, core::sync::atomic::Ordering::SeqCst);
    crate::smp::PARK.entered_vmx(percpu::current().index);
    Ok(vmx)
}

/// Enters VMX root operation on another CPU, which must offer what the boot
/// CPU offers (the controls and VMCSs are shared).
pub fn enable_ap(vmx: &Vmx) -> Result<(), VmxError> {
    feature_control()?;
    // SAFETY: as in `enable`.
    let msrs = VmxMsrs::read(|m| unsafe { cpu::rdmsr(m) });
    if msrs != vmx.msrs {
        return Err(VmxError::Different);
    }
    vmxon(vmx)?;
    // From now on it must leave VMX before the machine is handed back.
    crate::smp::PARK.entered_vmx(percpu::current().index);
    Ok(())
}

/// VMX on in IA32_FEATURE_CONTROL (set and locked if the firmware left it open).
fn feature_control() -> Result<(), VmxError> {
    if cpu::cpuid(1, 0).ecx & (1 << 5) == 0 {
        return Err(VmxError::NoVmx);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on every processor with VMX.
    let fc = unsafe { cpu::rdmsr(msr::FEATURE_CONTROL) };
    if fc & feature_control::LOCK == 0 {
        let value = fc | feature_control::LOCK | feature_control::VMX_OUTSIDE_SMX;
        // SAFETY: the MSR is unlocked; enabling VMX outside SMX and locking is what firmware would do.
        unsafe { cpu::wrmsr(msr::FEATURE_CONTROL, value) };
        log::info!("IA32_FEATURE_CONTROL was unlocked: set to {value:#x}");
    } else if fc & feature_control::VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::LockedOff(fc));
    }
    Ok(())
}

/// Fixes CR0/CR4 for VMX operation and runs VMXON with a new region, which
/// this CPU keeps for as long as the machine runs.
fn vmxon(vmx: &Vmx) -> Result<(), VmxError> {
    let msrs = &vmx.msrs;
    let mut cr4 = msrs.fix_cr4(cpu::read_cr4());
    if vmx.xcr0_offered != 0 {
        // Needed to switch guests' XCR0 and extended state.
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: the fixed bits are what VMX operation requires (NE, VMXE, ...),
    // and none of them disturbs the hypervisor's own execution.
    unsafe {
        cpu::write_cr0(msrs.fix_cr0(cpu::read_cr0(), false));
        cpu::write_cr4(cr4);
    }
    let region = Region::new(msrs.revision()).ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the region is 4 KiB aligned, stamped with the revision, and CR0/CR4 are fixed.
    unsafe { x86::bits64::vmx::vmxon(region.phys) }.map_err(|_| VmxError::VmxonFailed)?;
    core::mem::forget(region);
    Ok(())
}

impl Vmx {
    /// One line per capability, for the boot log.
    pub fn report(&self) {
        let m = &self.msrs;
        let f = &self.controls.features;
        log::info!(
            "VT-x: VMCS revision {:#x}, {} physical address bits, TRUE controls {}",
            m.revision(),
            self.physical_bits,
            if m.basic & (1 << 55) != 0 { "yes" } else { "no" }
        );
        log::info!(
            "VT-x: EPT with 2M pages {}, 1G pages {}, A/D bits {}, execute-only {}, INVEPT single-context {}",
            yes(f.ept_2m_pages),
            yes(f.ept_1g_pages),
            yes(f.ept_accessed_dirty),
            yes(f.ept_execute_only),
            yes(f.invept_single_context)
        );
        log::info!(
            "VT-x: VPID {}, unrestricted guest {}, preemption timer {}, VMFUNC EPTP switching {}, EPT-violation #VE {}",
            yes(f.vpid),
            yes(f.unrestricted_guest),
            yes(f.preemption_timer),
            yes(f.vmfunc_eptp_switching),
            yes(f.ept_violation_ve)
        );
        log::info!(
            "VT-x: controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
            self.controls.pinbased,
            self.controls.procbased,
            self.controls.procbased2,
            self.controls.exit,
            self.controls.entry
        );
        log::debug!(
            "VT-x MSRs: basic {:#x} pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x} misc {:#x} \
             cr0 {:#x}/{:#x} cr4 {:#x}/{:#x} ept {:#x} vmfunc {:#x}",
            m.basic,
            m.pinbased,
            m.procbased,
            m.procbased2,
            m.exit,
            m.entry,
            m.misc,
            m.cr0_fixed0,
            m.cr0_fixed1,
            m.cr4_fixed0,
            m.cr4_fixed1,
            m.ept_vpid_cap,
            m.vmfunc
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
