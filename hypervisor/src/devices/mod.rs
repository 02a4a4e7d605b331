//! Emulated devices.
pub mod uart;
