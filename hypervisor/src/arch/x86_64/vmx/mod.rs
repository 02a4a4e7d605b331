//! VT-x: capabilities and controls, EPT formats, guest-state checks (pure,
//! host-tested), and behind `cfg(target_os = "none")` the VMX instructions:
//! VMXON, the VMCS and VM entry.
pub mod bitmaps;
pub mod caps;
pub mod entry_check;
pub mod ept;

#[cfg(target_os = "none")]
pub mod enable;
#[cfg(target_os = "none")]
pub mod vcpu;
#[cfg(target_os = "none")]
pub mod vmcs;
