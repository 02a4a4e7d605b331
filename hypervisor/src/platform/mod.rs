//! The platform under CTVM: what the hypervisor takes for itself before any
//! guest runs, and keeps.
//!
//! - [`dmar`]: the ACPI DMAR table (VT-d remapping units, reserved regions).
//! - [`vtd`]: the remapping units' registers, second-level (DMA) tables in
//!   the one page-table implementation, invalidation, fault records, and
//!   interrupt remapping.
//! - [`dma`]: the DMA view devices get: the pass-through guest's memory with
//!   the kernel view's write rights, never the hypervisor's.
//! - [`tpm`]: the platform TPM (1.2 and 2.0, TIS and CRB): drivers,
//!   command marshalling, the measured launch and its TCG event logs.
//! - [`tboot`] and [`txt`]: tboot's shared page and log, and the TXT heap.
//!
//! Everything here is generic and host-tested: device registers are reached
//! through [`Mmio`], which the bare-metal build implements with volatile
//! accesses (`arch::x86_64::mmio`) and the tests with fakes.

pub mod dma;
pub mod dmar;
pub mod tboot;
pub mod tpm;
pub mod txt;
pub mod vtd;

/// A device's memory-mapped registers, as offsets into its register block.
pub trait Mmio {
    fn read32(&mut self, offset: u64) -> u32;
    fn write32(&mut self, offset: u64, value: u32);
    fn read64(&mut self, offset: u64) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }
    fn write64(&mut self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    fn read8(&mut self, offset: u64) -> u8 {
        let word = self.read32(offset & !3);
        (word >> ((offset & 3) * 8)) as u8
    }
    fn write8(&mut self, offset: u64, value: u8);
}

/// Reads little-endian integers out of firmware structures, refusing
/// anything that does not fit: every offset and length in them is input.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    pub fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    pub fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(self.0.get(at..at.checked_add(2)?)?.try_into().ok()?))
    }
    pub fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.0.get(at..at.checked_add(4)?)?.try_into().ok()?))
    }
    pub fn u64(&self, at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(self.0.get(at..at.checked_add(8)?)?.try_into().ok()?))
    }
}
