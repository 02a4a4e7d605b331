//! Device registers through the identity mapping: the boot page tables map
//! the first 4 GiB, and the firmware's MTRRs keep MMIO holes uncached.

use crate::platform::Mmio;

/// A register block of `size` bytes at physical `base`, below 4 GiB.
pub struct MmioRegion {
    base: u64,
    size: u64,
}

impl MmioRegion {
    /// `None` when the block is not where the identity mapping reaches.
    pub fn new(base: u64, size: u64) -> Option<Self> {
        let end = base.checked_add(size)?;
        (size >= 8 && end <= 4 << 30).then_some(MmioRegion { base, size })
    }

    fn at(&self, offset: u64, width: u64) -> u64 {
        // An offset outside the block is a driver bug; never touch memory beyond it.
        assert!(offset.checked_add(width).is_some_and(|e| e <= self.size), "MMIO offset {offset:#x} outside the block");
        self.base + offset
    }
}

impl Mmio for MmioRegion {
    fn read32(&mut self, offset: u64) -> u32 {
        let at = self.at(offset, 4);
        // SAFETY: inside the device's register block (checked above), which
        // the identity mapping covers; the hypervisor owns the device.
        unsafe { core::ptr::read_volatile(at as *const u32) }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let at = self.at(offset, 4);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(at as *mut u32, value) }
    }

    fn read64(&mut self, offset: u64) -> u64 {
        let at = self.at(offset, 8);
        // SAFETY: as above; 64-bit registers take 64-bit accesses.
        unsafe { core::ptr::read_volatile(at as *const u64) }
    }

    fn write64(&mut self, offset: u64, value: u64) {
        let at = self.at(offset, 8);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(at as *mut u64, value) }
    }

    fn read8(&mut self, offset: u64) -> u8 {
        let at = self.at(offset, 1);
        // SAFETY: as above; FIFO registers are byte-wide.
        unsafe { core::ptr::read_volatile(at as *const u8) }
    }

    fn write8(&mut self, offset: u64, value: u8) {
        let at = self.at(offset, 1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(at as *mut u8, value) }
    }
}
