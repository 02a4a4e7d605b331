//! x86-64 and VT-x.
pub mod vmx;
