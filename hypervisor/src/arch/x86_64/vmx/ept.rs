//! The EPT entry format, the EPT pointer, and EPT-violation qualifications.
//!
//! Pure bit layouts from the Intel SDM (Vol. 3C, 29.3): no instructions here,
//! so the generic page-table code can be tested on the host with this format.

use crate::mm::paging::{Attrs, EntryFormat, MemType, PageTable, Perms};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXECUTE: u64 = 1 << 2;
const MEMTYPE_SHIFT: u64 = 3;
const MEMTYPE_MASK: u64 = 7 << MEMTYPE_SHIFT;
const LARGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Extended page-table entries.
pub enum EptFormat {}

impl EntryFormat for EptFormat {
    fn is_present(entry: u64) -> bool {
        // Execute-only pages are present too.
        entry & (READ | WRITE | EXECUTE) != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & LARGE != 0
    }

    fn address(entry: u64) -> u64 {
        entry & ADDRESS_MASK
    }

    fn table(address: u64) -> u64 {
        (address & ADDRESS_MASK) | READ | WRITE | EXECUTE
    }

    fn leaf(address: u64, attrs: Attrs, level: u8) -> u64 {
        let mut entry = (address & ADDRESS_MASK) | ((attrs.mem_type as u64) << MEMTYPE_SHIFT);
        if attrs.perms.contains(Perms::READ) {
            entry |= READ;
        }
        if attrs.perms.contains(Perms::WRITE) {
            entry |= WRITE;
        }
        if attrs.perms.contains(Perms::EXECUTE) {
            entry |= EXECUTE;
        }
        if level > 0 {
            entry |= LARGE;
        }
        entry
    }

    fn attrs(entry: u64) -> Attrs {
        let mut perms = Perms::empty();
        perms.set(Perms::READ, entry & READ != 0);
        perms.set(Perms::WRITE, entry & WRITE != 0);
        perms.set(Perms::EXECUTE, entry & EXECUTE != 0);
        let mem_type =
            MemType::from_bits(((entry & MEMTYPE_MASK) >> MEMTYPE_SHIFT) as u8).unwrap_or(MemType::Uncacheable);
        Attrs { perms, mem_type }
    }
}

/// An EPT hierarchy.
pub type EptTable = PageTable<EptFormat>;

/// The EPT pointer for a hierarchy: write-back paging structures, a 4-level
/// walk, and optionally accessed/dirty flags.
pub const fn eptp(root: u64, accessed_dirty: bool) -> u64 {
    let mut value = (root & ADDRESS_MASK) | (MemType::WriteBack as u64) | (3 << 3);
    if accessed_dirty {
        value |= 1 << 6;
    }
    value
}

/// What an EPT violation's exit qualification says (SDM Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationInfo {
    /// The access that faulted.
    pub access: Access,
    /// What the guest-physical page allowed (empty when not mapped).
    pub allowed: Perms,
    /// Whether the guest linear address field is valid.
    pub linear_valid: bool,
    /// Whether the access was to the final translation (false: to a guest
    /// paging structure during the walk).
    pub final_translation: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Execute,
}

impl Access {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Execute => "execute",
        }
    }
}

impl ViolationInfo {
    pub const fn from_qualification(q: u64) -> Self {
        // An instruction fetch can also read; the fetch is what matters.
        let access = if q & (1 << 2) != 0 {
            Access::Execute
        } else if q & (1 << 1) != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let allowed = Perms::from_bits_truncate(((q >> 3) & 7) as u8);
        ViolationInfo { access, allowed, linear_valid: q & (1 << 7) != 0, final_translation: q & (1 << 8) != 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::paging::host::HeapTables;
    use crate::mm::paging::{Flush, MapError, PageSize, Translation};

    const K4: u64 = 4096;
    const M2: u64 = 2 << 20;
    const G1: u64 = 1 << 30;
    const WB_RWX: Attrs = Attrs::new(Perms::RWX, MemType::WriteBack);

    fn table(largest: PageSize) -> (EptTable, HeapTables) {
        let mut mem = HeapTables::default();
        let pt = EptTable::new(&mut mem, largest).unwrap();
        (pt, mem)
    }

    fn leaves(pt: &EptTable, mem: &HeapTables) -> Vec<(u64, Translation)> {
        let mut out = Vec::new();
        pt.for_each_leaf(mem, |a, t| out.push((a, t)));
        out
    }

    #[test]
    fn entry_bits_follow_the_sdm() {
        let a = Attrs::new(Perms::RX, MemType::WriteBack);
        assert_eq!(EptFormat::leaf(0x1234_5000, a, 0), 0x1234_5000 | 0b101 | (6 << 3));
        assert_eq!(EptFormat::leaf(0x4000_0000, a, 2), 0x4000_0000 | 0b101 | (6 << 3) | (1 << 7));
        assert_eq!(EptFormat::table(0x9000), 0x9007);
        let uc = Attrs::new(Perms::RW, MemType::Uncacheable);
        assert_eq!(EptFormat::attrs(EptFormat::leaf(0, uc, 0)), uc);
        // Execute-only is present.
        assert!(EptFormat::is_present(EPT_X_ONLY));
        assert!(!EptFormat::is_present(0x1000 | (6 << 3)));
    }
    const EPT_X_ONLY: u64 = 0x5000 | EXECUTE;

    #[test]
    fn eptp_encodes_walk_length_and_memory_type() {
        assert_eq!(eptp(0x12_3000, false), 0x12_3000 | 6 | (3 << 3));
        assert_eq!(eptp(0x12_3000, true), 0x12_3000 | 6 | (3 << 3) | (1 << 6));
    }

    #[test]
    fn map_uses_the_largest_pages_alignment_allows() {
        let (mut pt, mut mem) = table(PageSize::Size1G);
        // 4K at the head, 2M pages, a 1G page, then a 4K tail.
        let start = 2 * G1 - M2 - K4;
        let len = K4 + M2 + G1 + K4;
        let flush = pt.map(&mut mem, start, start, len, WB_RWX).unwrap();
        assert_eq!(flush, Flush::NONE, "mapping over nothing needs no flush");
        let sizes: Vec<_> = leaves(&pt, &mem).iter().map(|(a, t)| (*a, t.size)).collect();
        assert_eq!(
            sizes,
            vec![
                (start, PageSize::Size4K),
                (2 * G1 - M2, PageSize::Size2M),
                (2 * G1, PageSize::Size1G),
                (3 * G1, PageSize::Size4K),
            ]
        );
    }

    #[test]
    fn largest_size_is_respected() {
        let (mut pt, mut mem) = table(PageSize::Size2M);
        let _ = pt.map(&mut mem, 0, 0, G1, WB_RWX).unwrap();
        let l = leaves(&pt, &mem);
        assert_eq!(l.len(), 512);
        assert!(l.iter().all(|(_, t)| t.size == PageSize::Size2M));
    }

    #[test]
    fn translate_follows_offsets_and_misses() {
        let (mut pt, mut mem) = table(PageSize::Size1G);
        let _ = pt.map(&mut mem, G1, 5 * G1, G1, WB_RWX).unwrap();
        let _ = pt.map(&mut mem, 0x1000, 0x8000, K4, Attrs::new(Perms::READ, MemType::Uncacheable)).unwrap();
        let t = pt.translate(&mem, G1 + 0x12345).unwrap();
        assert_eq!(t.address, 5 * G1 + 0x12345);
        assert_eq!(t.size, PageSize::Size1G);
        let t = pt.translate(&mem, 0x1abc).unwrap();
        assert_eq!((t.address, t.attrs.perms, t.attrs.mem_type), (0x8abc, Perms::READ, MemType::Uncacheable));
        assert_eq!(pt.translate(&mem, 0x2000), None);
        assert_eq!(pt.translate(&mem, 1 << 48), None);
        assert_eq!(pt.translate(&mem, u64::MAX), None);
    }

    #[test]
    fn protect_splits_a_large_page_on_a_partial_change() {
        let (mut pt, mut mem) = table(PageSize::Size1G);
        let _ = pt.map(&mut mem, 0, 0, G1, WB_RWX).unwrap();
        let target = 3 * M2 + 5 * K4;
        let flush = pt.protect(&mut mem, target, K4, Perms::RX).unwrap();
        assert!(flush.is_needed());
        let t = pt.translate(&mem, target).unwrap();
        assert_eq!((t.size, t.attrs.perms, t.address), (PageSize::Size4K, Perms::RX, target));
        // Neighbours keep their rights and their translation, at 4K or 2M.
        let before = pt.translate(&mem, target - K4).unwrap();
        assert_eq!((before.size, before.attrs.perms, before.address), (PageSize::Size4K, Perms::RWX, target - K4));
        let far = pt.translate(&mem, 100 * M2 + 7).unwrap();
        assert_eq!((far.size, far.attrs.perms, far.address), (PageSize::Size2M, Perms::RWX, 100 * M2 + 7));
        // Every byte of the gigabyte still maps to itself.
        let mut covered = 0;
        for (a, t) in leaves(&pt, &mem) {
            assert_eq!(a, t.address);
            covered += t.size.bytes();
        }
        assert_eq!(covered, G1);
    }

    #[test]
    fn protect_of_a_whole_large_page_does_not_split() {
        let (mut pt, mut mem) = table(PageSize::Size2M);
        let _ = pt.map(&mut mem, 0, 0, 4 * M2, WB_RWX).unwrap();
        let tables = mem.live();
        let flush = pt.protect(&mut mem, M2, M2, Perms::READ).unwrap();
        assert!(flush.is_needed());
        assert_eq!(mem.live(), tables);
        assert_eq!(pt.translate(&mem, M2).unwrap().attrs.perms, Perms::READ);
        // Same rights again: nothing to flush, nothing split.
        let flush = pt.protect(&mut mem, M2 + K4, K4, Perms::READ).unwrap();
        assert_eq!(flush, Flush::NONE);
        assert_eq!(mem.live(), tables);
    }

    #[test]
    fn protect_refuses_unmapped_ranges_and_changes_nothing() {
        let (mut pt, mut mem) = table(PageSize::Size2M);
        let _ = pt.map(&mut mem, 0, 0, M2, WB_RWX).unwrap();
        assert_eq!(pt.protect(&mut mem, 0, 2 * M2, Perms::READ), Err(MapError::NotMapped(M2)));
        assert_eq!(pt.translate(&mem, 0).unwrap().attrs.perms, Perms::RWX);
    }

    #[test]
    fn unmap_splits_and_clears() {
        let (mut pt, mut mem) = table(PageSize::Size1G);
        let _ = pt.map(&mut mem, 0, 0, G1, WB_RWX).unwrap();
        let flush = pt.unmap(&mut mem, M2 - K4, 2 * K4).unwrap();
        assert!(flush.is_needed());
        assert_eq!(pt.translate(&mem, M2 - K4), None);
        assert_eq!(pt.translate(&mem, M2), None);
        assert_eq!(pt.translate(&mem, M2 - 2 * K4).unwrap().address, M2 - 2 * K4);
        assert_eq!(pt.translate(&mem, M2 + K4).unwrap().address, M2 + K4);
        // Unmapping a hole costs nothing and needs no flush.
        let flush = pt.unmap(&mut mem, 4 * G1, G1).unwrap();
        assert_eq!(flush, Flush::NONE);
        // Unmap everything, across mapped and unmapped parts.
        let _ = pt.unmap(&mut mem, 0, 2 * G1).unwrap();
        assert!(leaves(&pt, &mem).is_empty());
    }

    #[test]
    fn remapping_replaces_and_frees_subtables() {
        let (mut pt, mut mem) = table(PageSize::Size2M);
        let _ = pt.map(&mut mem, 0, 0, M2, WB_RWX).unwrap();
        let _ = pt.split_to_4k(&mut mem, 0).unwrap();
        let with_pt = mem.live();
        let flush = pt.map(&mut mem, 0, 0x4000_0000, M2, WB_RWX).unwrap();
        assert!(flush.is_needed());
        assert_eq!(mem.live(), with_pt - 1, "the 4K table under the new 2M leaf is freed");
        assert_eq!(pt.translate(&mem, 0x1000).unwrap().address, 0x4000_1000);
    }

    #[test]
    fn misaligned_and_wrapping_ranges_are_refused() {
        let (mut pt, mut mem) = table(PageSize::Size2M);
        assert_eq!(pt.map(&mut mem, 0x10, 0, K4, WB_RWX), Err(MapError::Misaligned));
        assert_eq!(pt.map(&mut mem, 0, 0, 100, WB_RWX), Err(MapError::Misaligned));
        assert_eq!(pt.map(&mut mem, u64::MAX - 0xfff, 0, K4, WB_RWX), Err(MapError::Misaligned));
        assert_eq!(pt.map(&mut mem, 1 << 48, 0, K4, WB_RWX), Err(MapError::Misaligned));
        assert_eq!(pt.unmap(&mut mem, 0, !0xfff), Err(MapError::Misaligned));
    }

    #[test]
    fn out_of_memory_is_an_error() {
        let mut mem = HeapTables::with_limit(2);
        let mut pt = EptTable::new(&mut mem, PageSize::Size2M).unwrap();
        assert_eq!(pt.map(&mut mem, 0, 0, K4, WB_RWX), Err(MapError::OutOfMemory));
    }

    #[test]
    fn destroy_frees_every_table() {
        let (mut pt, mut mem) = table(PageSize::Size1G);
        let _ = pt.map(&mut mem, 0, 0, 3 * G1, WB_RWX).unwrap();
        let _ = pt.protect(&mut mem, G1 + 5 * K4, K4, Perms::READ).unwrap();
        pt.destroy(&mut mem);
        assert_eq!(mem.live(), 0);
    }

    #[test]
    fn violation_qualification_decodes() {
        // Write to a read-only, mapped page, linear address valid.
        let q = (1 << 1) | (1 << 3) | (1 << 7) | (1 << 8);
        let v = ViolationInfo::from_qualification(q);
        assert_eq!(v.access, Access::Write);
        assert_eq!(v.allowed, Perms::READ);
        assert!(v.linear_valid && v.final_translation);
        // A fetch from an unmapped page.
        let v = ViolationInfo::from_qualification((1 << 2) | (1 << 0));
        assert_eq!(v.access, Access::Execute);
        assert_eq!(v.allowed, Perms::empty());
    }
}
