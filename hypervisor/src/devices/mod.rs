//! Emulated devices.
pub mod tis;
pub mod uart;
