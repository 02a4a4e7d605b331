//! VT-x: capabilities and controls, EPT formats, the VMCS and VM entry.
pub mod caps;
pub mod ept;
