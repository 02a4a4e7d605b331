//! The VMCS: regions, VMREAD/VMWRITE, and what a failed VMX instruction means.

use x86::bits64::vmx;
use x86::vmx::vmcs;

use crate::mm::phys;

/// A 4 KiB VMXON or VMCS region.
pub struct Region {
    pub phys: u64,
}

impl Region {
    /// A zeroed region stamped with the VMCS revision identifier.
    pub fn new(revision: u32) -> Option<Region> {
        let phys = phys::alloc_zeroed(4096, 4096)?;
        // SAFETY: the frame was just allocated and is identity mapped.
        unsafe { core::ptr::write_volatile(phys as *mut u32, revision) };
        Some(Region { phys })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        phys::free(self.phys, 4096);
    }
}

/// Reads a field of the current VMCS. Fails only on a hypervisor bug (no
/// current VMCS, or a field this processor lacks): reported, then 0.
pub fn read(field: u32) -> u64 {
    // SAFETY: VMREAD only reads the current VMCS; we run in VMX root mode.
    match unsafe { vmx::vmread(field) } {
        Ok(v) => v,
        Err(_) => {
            log::error!("VMREAD of field {field:#x} failed (error {})", instruction_error());
            0
        }
    }
}

/// Writes a field of the current VMCS.
pub fn write(field: u32, value: u64) {
    // SAFETY: VMWRITE only changes the current VMCS, which belongs to the vCPU
    // being set up or handled; the values come from the hypervisor's logic.
    if unsafe { vmx::vmwrite(field, value) }.is_err() {
        log::error!("VMWRITE of {value:#x} to field {field:#x} failed (error {})", instruction_error());
    }
}

/// The VM-instruction error of the last failed VMX instruction (VMfailValid).
pub fn instruction_error() -> u32 {
    // SAFETY: reading a read-only field of the current VMCS.
    unsafe { vmx::vmread(vmcs::ro::VM_INSTRUCTION_ERROR) }.unwrap_or(0) as u32
}

/// SDM Vol. 3C, 31.4: VM-instruction error numbers.
pub fn instruction_error_name(error: u32) -> &'static str {
    match error {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}
