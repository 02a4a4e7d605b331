//! A guest's RAM: which guest-physical ranges are backed by which host frames.

use alloc::vec::Vec;

use crate::mm::frames::Region;

/// How the hypervisor reaches host-physical memory (identity mapped on bare
/// metal, a buffer in tests).
pub trait HostPhys {
    fn read(&self, hpa: u64, buf: &mut [u8]);
    fn write(&self, hpa: u64, data: &[u8]);
    /// Atomically replaces the aligned u64 at `hpa` with `new` if it still
    /// holds `current` (a guest page-table entry the guest may be changing
    /// on another CPU); whether it did.
    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool;
}

impl<T: HostPhys + ?Sized> HostPhys for &T {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        (**self).read(hpa, buf)
    }
    fn write(&self, hpa: u64, data: &[u8]) {
        (**self).write(hpa, data)
    }
    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
        (**self).compare_exchange_u64(hpa, current, new)
    }
}

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    pub gpa: Region,
    pub hpa: u64,
}

/// An access outside the guest's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange(pub u64);

#[derive(Clone, Debug, Default)]
pub struct GuestMemory {
    backings: Vec<Backing>,
}

impl GuestMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backing; overlapping guest-physical ranges are refused.
    pub fn add(&mut self, gpa: Region, hpa: u64) -> Result<(), OutOfRange> {
        if let Some(b) = self.backings.iter().find(|b| b.gpa.overlaps(&gpa)) {
            return Err(OutOfRange(b.gpa.start.max(gpa.start)));
        }
        self.backings.push(Backing { gpa, hpa });
        self.backings.sort_by_key(|b| b.gpa.start);
        Ok(())
    }

    pub fn backings(&self) -> &[Backing] {
        &self.backings
    }

    pub fn size(&self) -> u64 {
        self.backings.iter().map(|b| b.gpa.len()).sum()
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.backings.iter().any(|b| b.gpa.contains(gpa))
    }

    /// The host address of `gpa` and how many bytes stay contiguous from there.
    pub fn translate(&self, gpa: u64) -> Option<(u64, u64)> {
        let b = self.backings.iter().find(|b| b.gpa.contains(gpa))?;
        Some((b.hpa + (gpa - b.gpa.start), b.gpa.end - gpa))
    }

    /// Copies guest memory out; fails without partial effect on the caller's
    /// view if any byte is outside guest RAM.
    pub fn read(&self, phys: &impl HostPhys, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(gpa, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            let at = gpa + done as u64;
            let (hpa, run) = self.translate(at).ok_or(OutOfRange(at))?;
            let n = (run as usize).min(buf.len() - done);
            phys.read(hpa, &mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Copies into guest memory; nothing is written unless all of it fits.
    pub fn write(&self, phys: &impl HostPhys, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        self.check(gpa, data.len() as u64)?;
        let mut done = 0;
        while done < data.len() {
            let at = gpa + done as u64;
            let (hpa, run) = self.translate(at).ok_or(OutOfRange(at))?;
            let n = (run as usize).min(data.len() - done);
            phys.write(hpa, &data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Compare-and-exchange of an aligned u64 of guest RAM (see
    /// [`HostPhys::compare_exchange_u64`]); whether it was exchanged.
    pub fn compare_exchange_u64(
        &self,
        phys: &impl HostPhys,
        gpa: u64,
        current: u64,
        new: u64,
    ) -> Result<bool, OutOfRange> {
        if !gpa.is_multiple_of(8) {
            return Err(OutOfRange(gpa));
        }
        self.check(gpa, 8)?;
        let (hpa, _) = self.translate(gpa).ok_or(OutOfRange(gpa))?;
        Ok(phys.compare_exchange_u64(hpa, current, new))
    }

    /// Zero-fills a range.
    pub fn zero(&self, phys: &impl HostPhys, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        self.check(gpa, len)?;
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(4096);
            self.write(phys, gpa + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        let end = gpa.checked_add(len).ok_or(OutOfRange(gpa))?;
        let mut at = gpa;
        while at < end {
            let (_, run) = self.translate(at).ok_or(OutOfRange(at))?;
            at = at.saturating_add(run);
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod fake {
    use super::HostPhys;
    use core::cell::RefCell;

    /// Host memory as one buffer starting at host-physical `base`.
    pub struct FakePhys {
        pub base: u64,
        pub bytes: RefCell<alloc::vec::Vec<u8>>,
    }

    impl FakePhys {
        pub fn new(base: u64, len: usize) -> Self {
            FakePhys { base, bytes: RefCell::new(alloc::vec![0; len]) }
        }
    }

    impl HostPhys for FakePhys {
        fn read(&self, hpa: u64, buf: &mut [u8]) {
            let at = (hpa - self.base) as usize;
            buf.copy_from_slice(&self.bytes.borrow()[at..at + buf.len()]);
        }
        fn write(&self, hpa: u64, data: &[u8]) {
            let at = (hpa - self.base) as usize;
            self.bytes.borrow_mut()[at..at + data.len()].copy_from_slice(data);
        }
        fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
            let mut b = [0u8; 8];
            self.read(hpa, &mut b);
            let ok = u64::from_le_bytes(b) == current;
            if ok {
                self.write(hpa, &new.to_le_bytes());
            }
            ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakePhys;
    use super::*;

    #[test]
    fn reads_and_writes_across_backings() {
        let phys = FakePhys::new(0x100_0000, 0x4000);
        let mut m = GuestMemory::new();
        // Guest 0..0x1000 -> host +0x2000, guest 0x1000..0x2000 -> host +0x0.
        m.add(Region::new(0x1000, 0x2000), 0x100_0000).unwrap();
        m.add(Region::new(0, 0x1000), 0x100_2000).unwrap();
        m.write(&phys, 0xffe, &[1, 2, 3, 4]).unwrap();
        assert_eq!(&phys.bytes.borrow()[0x2ffe..0x3000], &[1, 2]);
        assert_eq!(&phys.bytes.borrow()[0..2], &[3, 4]);
        let mut back = [0; 4];
        m.read(&phys, 0xffe, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
    }

    #[test]
    fn out_of_range_changes_nothing() {
        let phys = FakePhys::new(0, 0x2000);
        let mut m = GuestMemory::new();
        m.add(Region::new(0, 0x1000), 0).unwrap();
        assert_eq!(m.write(&phys, 0xfff, &[9, 9]), Err(OutOfRange(0x1000)));
        assert_eq!(phys.bytes.borrow()[0xfff], 0);
        assert_eq!(m.write(&phys, u64::MAX, &[9, 9]), Err(OutOfRange(u64::MAX)));
        assert_eq!(m.read(&phys, 0x5000, &mut [0; 1]), Err(OutOfRange(0x5000)));
        assert!(m.add(Region::new(0x800, 0x1800), 0x1000).is_err());
    }
}
