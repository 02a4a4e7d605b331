//! Trapped MMIO: the guest's access to an emulated window exits (the window
//! is absent from its EPT); the faulting instruction is fetched through the
//! guest-access service ([`crate::guest::access`]), as the principal that ran
//! it, decoded ([`decode`]) and carried out against an [`MmioDevice`]
//! ([`emulate`]).

pub mod decode;
pub mod emulate;

pub use emulate::{emulate, Emulated, MmioError, Reason};

/// A device behind an emulated MMIO window.
pub trait MmioDevice {
    /// A read of `size` bytes (1, 2, 4 or 8) at `offset` from the window's
    /// base; the value is in the low `size` bytes.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    /// A write of the low `size` bytes of `value` at `offset`.
    fn write(&mut self, offset: u64, size: u8, value: u64);
}
