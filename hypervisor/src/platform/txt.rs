//! The TXT heap (Intel TXT Software Development Guide, appendix C): four
//! regions, each an 8-byte size (counting itself) and its data: BIOS data,
//! OS-to-MLE data, OS-to-SINIT data and SINIT-to-MLE data. CTVM reads:
//!
//! - from OS-to-SINIT data (versions 4-7), the DMA protected ranges (PMRs)
//!   tboot asked SINIT to set up: what stayed protected from DMA until CTVM
//!   took the IOMMU;
//! - from SINIT-to-MLE data (versions 5-9), SINIT's memory descriptor
//!   records (which memory it found usable, which it protects) and its
//!   verified copy of the DMAR table, which CTVM uses instead of the
//!   firmware's (firmware tables can be changed after SINIT checked them).
//!
//! The heap is written by firmware, tboot and SINIT: every size and offset
//! is checked against its region.

use alloc::vec::Vec;

use super::Reader;
use crate::mm::frames::Region;

/// TXT public configuration registers.
pub mod reg {
    use crate::mm::frames::Region;

    /// The private (0xFED20000) and public (0xFED30000) configuration spaces.
    pub const PRIVATE_SPACE: Region = Region::new(0xfed2_0000, 0xfed3_0000);
    pub const PUBLIC_SPACE: Region = Region::new(0xfed3_0000, 0xfed4_0000);
    pub const PUBLIC_BASE: u64 = 0xfed3_0000;
    pub const STS: u64 = 0x000;
    pub const HEAP_BASE: u64 = 0x300;
    pub const HEAP_SIZE: u64 = 0x308;
    /// TXT.STS: SENTER completed (a measured launch happened).
    pub const STS_SENTER_DONE: u64 = 1 << 0;
}

/// A SINIT memory descriptor record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mdr {
    pub region: Region,
    pub kind: MdrKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MdrKind {
    Good,
    SmmOverlay,
    SmmNonOverlay,
    PcieConfig,
    Protected,
    Other(u8),
}

impl MdrKind {
    fn from(v: u8) -> Self {
        match v {
            0 => Self::Good,
            1 => Self::SmmOverlay,
            2 => Self::SmmNonOverlay,
            3 => Self::PcieConfig,
            4 => Self::Protected,
            other => Self::Other(other),
        }
    }
}

/// What CTVM uses of the heap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heap {
    pub os_sinit_version: u32,
    /// PMRs: below 4 GiB and above.
    pub pmr_low: Region,
    pub pmr_high: Region,
    pub sinit_mle_version: u32,
    pub mdrs: Vec<Mdr>,
    /// SINIT's copy of the ACPI DMAR table.
    pub dmar: Option<Vec<u8>>,
}

impl Heap {
    /// Memory SINIT did not report as usable RAM: never for guests or devices.
    pub fn reserved(&self) -> impl Iterator<Item = Region> + '_ {
        self.mdrs.iter().filter(|m| m.kind != MdrKind::Good).map(|m| m.region)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxtError {
    /// A region's size runs past the heap or is below its own 8 bytes.
    Region(usize),
    /// OS-to-SINIT data older or newer than CTVM reads.
    OsSinitVersion(u32),
    SinitMleVersion(u32),
    /// A table offset or size runs past its region.
    Table,
}

const MAX_MDRS: u32 = 64;

/// The four regions' data, in order.
fn regions(heap: &[u8]) -> Result<[&[u8]; 4], TxtError> {
    let mut out: [&[u8]; 4] = [&[]; 4];
    let mut at = 0usize;
    for (i, slot) in out.iter_mut().enumerate() {
        let size = Reader(heap).u64(at).ok_or(TxtError::Region(i))?;
        let size = usize::try_from(size).map_err(|_| TxtError::Region(i))?;
        let end = at.checked_add(size).filter(|&e| size >= 8 && e <= heap.len()).ok_or(TxtError::Region(i))?;
        *slot = &heap[at..end];
        at = end;
    }
    Ok(out)
}

fn region(base: u64, size: u64) -> Region {
    Region::new(base, base.saturating_add(size))
}

/// Parses a copy of the heap (TXT.HEAP.SIZE bytes at TXT.HEAP.BASE).
pub fn parse(heap: &[u8]) -> Result<Heap, TxtError> {
    let [_bios, _os_mle, os_sinit, sinit_mle] = regions(heap)?;
    let mut out = Heap::default();

    // Offsets below count from the region's start, its size field included.
    let r = Reader(os_sinit);
    out.os_sinit_version = r.u32(8).ok_or(TxtError::Region(2))?;
    if !(4..=7).contains(&out.os_sinit_version) {
        return Err(TxtError::OsSinitVersion(out.os_sinit_version));
    }
    let q = |at: usize| r.u64(8 + at).ok_or(TxtError::Region(2));
    out.pmr_low = region(q(32)?, q(40)?);
    out.pmr_high = region(q(48)?, q(56)?);

    let r = Reader(sinit_mle);
    out.sinit_mle_version = r.u32(8).ok_or(TxtError::Region(3))?;
    if !(5..=9).contains(&out.sinit_mle_version) {
        return Err(TxtError::SinitMleVersion(out.sinit_mle_version));
    }
    let field = |at: usize| r.u32(8 + at).ok_or(TxtError::Region(3));
    let (mdr_count, mdr_offset) = (field(128)?, field(132)? as usize);
    if mdr_count > MAX_MDRS {
        return Err(TxtError::Table);
    }
    for i in 0..mdr_count as usize {
        let at = mdr_offset.checked_add(24 * i).ok_or(TxtError::Table)?;
        let (base, length, kind) = (
            r.u64(at).ok_or(TxtError::Table)?,
            r.u64(at + 8).ok_or(TxtError::Table)?,
            r.u8(at + 16).ok_or(TxtError::Table)?,
        );
        out.mdrs.push(Mdr { region: region(base, length), kind: MdrKind::from(kind) });
    }
    let (dmar_size, dmar_offset) = (field(136)? as usize, field(140)? as usize);
    if dmar_size > 0 {
        let end = dmar_offset.checked_add(dmar_size).ok_or(TxtError::Table)?;
        out.dmar = Some(sinit_mle.get(dmar_offset..end).ok_or(TxtError::Table)?.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
pub mod build {
    //! Heaps laid out as the TXT guide's structures describe them (no
    //! hardware capture exists on the project's machines).
    use alloc::vec::Vec;

    fn region(data: &[u8]) -> Vec<u8> {
        let mut r = ((data.len() + 8) as u64).to_le_bytes().to_vec();
        r.extend_from_slice(data);
        r
    }

    /// A heap whose SINIT-to-MLE data (version `version`) holds `mdrs` and `dmar`.
    pub fn heap(version: u32, pmr_low: (u64, u64), mdrs: &[(u64, u64, u8)], dmar: &[u8]) -> Vec<u8> {
        let bios = region(&[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0]);
        let os_mle = region(&[0; 64]);
        let mut os_sinit = alloc::vec![0u8; 92];
        os_sinit[0..4].copy_from_slice(&7u32.to_le_bytes());
        os_sinit[32..40].copy_from_slice(&pmr_low.0.to_le_bytes());
        os_sinit[40..48].copy_from_slice(&pmr_low.1.to_le_bytes());
        let os_sinit = region(&os_sinit);
        let mut sinit = alloc::vec![0u8; 148];
        sinit[0..4].copy_from_slice(&version.to_le_bytes());
        let mdr_offset = 8 + sinit.len();
        sinit[128..132].copy_from_slice(&(mdrs.len() as u32).to_le_bytes());
        sinit[132..136].copy_from_slice(&(mdr_offset as u32).to_le_bytes());
        for &(base, len, kind) in mdrs {
            sinit.extend_from_slice(&base.to_le_bytes());
            sinit.extend_from_slice(&len.to_le_bytes());
            sinit.push(kind);
            sinit.extend_from_slice(&[0; 7]);
        }
        let dmar_offset = 8 + sinit.len();
        sinit[136..140].copy_from_slice(&(dmar.len() as u32).to_le_bytes());
        sinit[140..144].copy_from_slice(&(dmar_offset as u32).to_le_bytes());
        sinit.extend_from_slice(dmar);
        [bios, os_mle, os_sinit, region(&sinit)].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::build::heap;
    use super::*;
    use crate::platform::dmar;

    fn qemu_dmar() -> Vec<u8> {
        dmar::build::table(39, 1, &[dmar::build::drhd(0xfed9_0000, true, &[])])
    }

    #[test]
    fn pmrs_mdrs_and_the_dmar_copy() {
        let h = heap(9, (0, 0x8000_0000), &[(0, 0x9f000, 0), (0x7f00_0000, 0x100_0000, 4)], &qemu_dmar());
        let p = parse(&h).unwrap();
        assert_eq!(p.pmr_low, Region::new(0, 0x8000_0000));
        assert_eq!(p.pmr_high, Region::default());
        assert_eq!(p.mdrs.len(), 2);
        assert_eq!(p.reserved().collect::<Vec<_>>(), [Region::new(0x7f00_0000, 0x8000_0000)]);
        let copy = p.dmar.unwrap();
        assert_eq!(dmar::parse(&copy).unwrap().units[0].base, 0xfed9_0000);
        for v in 5..=9 {
            assert!(parse(&heap(v, (0, 0), &[], &[])).is_ok(), "version {v}");
        }
        assert_eq!(parse(&heap(4, (0, 0), &[], &[])), Err(TxtError::SinitMleVersion(4)));
    }

    /// Sizes, counts and offsets are input: each lie is refused, never
    /// followed, and no prefix or byte flip panics.
    #[test]
    fn hostile_heaps_are_refused() {
        let good = heap(8, (0, 0x1000_0000), &[(0, 0x9f000, 0)], &qemu_dmar());
        // A region claiming more than the heap, or less than its own size field.
        let mut h = good.clone();
        h[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&h), Err(TxtError::Region(0)));
        let mut h = good.clone();
        h[0..8].copy_from_slice(&4u64.to_le_bytes());
        assert_eq!(parse(&h), Err(TxtError::Region(0)));
        // The SINIT-to-MLE region's start, for editing its fields.
        let regions = regions(&good).unwrap();
        let sinit = good.len() - regions[3].len();
        let mut h = good.clone();
        h[sinit + 8 + 128..sinit + 8 + 132].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(parse(&h), Err(TxtError::Table), "too many MDRs");
        let mut h = good.clone();
        h[sinit + 8 + 132..sinit + 8 + 136].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&h), Err(TxtError::Table), "MDRs past the region");
        let mut h = good.clone();
        h[sinit + 8 + 136..sinit + 8 + 140].copy_from_slice(&0x10000u32.to_le_bytes());
        assert_eq!(parse(&h), Err(TxtError::Table), "a DMAR copy past the region");
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        for i in 0..good.len() {
            let mut h = good.clone();
            h[i] ^= 0xff;
            let _ = parse(&h);
        }
    }
}
