//! Physical memory: which frames are free, and a first-fit allocator over them.
//!
//! Everything here works on fixed-capacity arrays so that it can run before
//! the heap exists (the heap itself is carved out of these frames).

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub const fn new(start: u64, end: u64) -> Self {
        Region { start, end }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn overlaps(&self, other: &Region) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The largest page-aligned region inside this one.
    pub const fn page_aligned_inside(&self) -> Region {
        let start = align_up(self.start, PAGE_SIZE);
        let end = self.end & !(PAGE_SIZE - 1);
        Region { start, end }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

pub const fn align_up(value: u64, align: u64) -> u64 {
    match value.checked_add(align - 1) {
        Some(v) => v & !(align - 1),
        None => !(align - 1),
    }
}

/// A sorted, non-overlapping set of regions with a fixed capacity.
#[derive(Clone)]
pub struct RegionSet<const N: usize> {
    regions: [Region; N],
    len: usize,
}

/// The set ran out of slots: the memory map is more fragmented than expected.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl<const N: usize> Default for RegionSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RegionSet<N> {
    pub const fn new() -> Self {
        RegionSet { regions: [Region::new(0, 0); N], len: 0 }
    }

    pub fn as_slice(&self) -> &[Region] {
        &self.regions[..self.len]
    }

    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(Region::len).sum()
    }

    /// Adds a region, merging it with any it overlaps or touches.
    pub fn insert(&mut self, region: Region) -> Result<(), Overflow> {
        if region.is_empty() {
            return Ok(());
        }
        let mut merged = region;
        // Find the run of regions that overlap or touch `merged`.
        let first = self.as_slice().iter().position(|r| r.end >= merged.start).unwrap_or(self.len);
        let mut last = first;
        while last < self.len && self.regions[last].start <= merged.end {
            merged.start = merged.start.min(self.regions[last].start);
            merged.end = merged.end.max(self.regions[last].end);
            last += 1;
        }
        let removed = last - first;
        if removed == 0 {
            if self.len == N {
                return Err(Overflow);
            }
            self.regions.copy_within(first..self.len, first + 1);
            self.len += 1;
        } else {
            self.regions.copy_within(last..self.len, first + 1);
            self.len -= removed - 1;
        }
        self.regions[first] = merged;
        Ok(())
    }

    /// The highest block of `size` bytes aligned to `align` (a power of two)
    /// that lies inside one region and below `limit`.
    pub fn highest_block(&self, size: u64, align: u64, limit: u64) -> Option<Region> {
        self.as_slice().iter().rev().find_map(|r| {
            let end = r.end.min(limit);
            let start = end.checked_sub(size)? & !(align - 1);
            (start >= r.start).then_some(Region::new(start, start + size))
        })
    }

    /// Removes a range; a region it cuts in the middle becomes two.
    pub fn remove(&mut self, cut: Region) -> Result<(), Overflow> {
        if cut.is_empty() {
            return Ok(());
        }
        let mut i = 0;
        while i < self.len {
            let r = self.regions[i];
            if !r.overlaps(&cut) {
                i += 1;
                continue;
            }
            let left = Region::new(r.start, cut.start.max(r.start).min(r.end));
            let right = Region::new(cut.end.min(r.end).max(r.start), r.end);
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    self.regions.copy_within(i + 1..self.len, i);
                    self.len -= 1;
                    continue;
                }
                (false, true) => self.regions[i] = left,
                (true, false) => self.regions[i] = right,
                (false, false) => {
                    if self.len == N {
                        return Err(Overflow);
                    }
                    self.regions.copy_within(i + 1..self.len, i + 2);
                    self.len += 1;
                    self.regions[i] = left;
                    self.regions[i + 1] = right;
                    i += 1;
                }
            }
            i += 1;
        }
        Ok(())
    }
}

/// The kind of a firmware memory-map entry, reduced to what matters here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM.
    Available,
    /// Anything else: reserved, ACPI, NVS, defective.
    Reserved,
}

/// Computes the free frames: available RAM, page-aligned, minus every reserved
/// entry of the map (entries may overlap; reserved wins), minus `exclude`
/// (the hypervisor image, the boot modules, the multiboot information, the
/// first MiB), and clipped to `limit` (what the hypervisor can address).
pub fn free_memory<const N: usize>(
    map: impl Iterator<Item = (Region, MemoryKind)> + Clone,
    exclude: &[Region],
    limit: u64,
) -> Result<RegionSet<N>, Overflow> {
    let mut free = RegionSet::<N>::new();
    for (region, kind) in map.clone() {
        if kind == MemoryKind::Available {
            free.insert(region.page_aligned_inside())?;
        }
    }
    for (region, kind) in map {
        if kind == MemoryKind::Reserved {
            free.remove(widen_to_pages(region))?;
        }
    }
    for region in exclude {
        free.remove(widen_to_pages(*region))?;
    }
    free.remove(Region::new(limit, u64::MAX))?;
    Ok(free)
}

fn widen_to_pages(r: Region) -> Region {
    Region::new(r.start & !(PAGE_SIZE - 1), align_up(r.end, PAGE_SIZE))
}

/// A first-fit allocator of contiguous, aligned runs of frames.
pub struct FrameAllocator<const N: usize> {
    free: RegionSet<N>,
    total: u64,
}

impl<const N: usize> FrameAllocator<N> {
    pub fn new(free: RegionSet<N>) -> Self {
        let total = free.total();
        FrameAllocator { free, total }
    }

    /// Allocates `bytes` (rounded up to pages) aligned to `align` (a power of
    /// two, at least a page). The memory is not zeroed.
    pub fn allocate(&mut self, bytes: u64, align: u64) -> Option<u64> {
        let align = align.max(PAGE_SIZE);
        if !align.is_power_of_two() || bytes == 0 {
            return None;
        }
        let size = align_up(bytes, PAGE_SIZE);
        let start = self.free.as_slice().iter().find_map(|r| {
            let start = align_up(r.start, align);
            (start.checked_add(size)? <= r.end).then_some(start)
        })?;
        // Splitting the region cannot overflow in practice, but if it does the
        // frames simply stay free.
        self.free.remove(Region::new(start, start + size)).ok()?;
        Some(start)
    }

    /// Returns frames to the pool.
    pub fn deallocate(&mut self, start: u64, bytes: u64) -> Result<(), Overflow> {
        self.free.insert(Region::new(start, start + align_up(bytes, PAGE_SIZE)))
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.total()
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    pub fn regions(&self) -> &[Region] {
        self.free.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn set(regions: &[(u64, u64)]) -> Vec<(u64, u64)> {
        regions.to_vec()
    }

    fn as_pairs<const N: usize>(s: &RegionSet<N>) -> Vec<(u64, u64)> {
        s.as_slice().iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn insert_merges_overlapping_and_touching() {
        let mut s = RegionSet::<8>::new();
        s.insert(Region::new(0x3000, 0x5000)).unwrap();
        s.insert(Region::new(0x1000, 0x2000)).unwrap();
        s.insert(Region::new(0x8000, 0x9000)).unwrap();
        assert_eq!(as_pairs(&s), set(&[(0x1000, 0x2000), (0x3000, 0x5000), (0x8000, 0x9000)]));
        s.insert(Region::new(0x2000, 0x3000)).unwrap(); // touches both neighbours
        assert_eq!(as_pairs(&s), set(&[(0x1000, 0x5000), (0x8000, 0x9000)]));
        s.insert(Region::new(0x4000, 0xa000)).unwrap(); // swallows the next one
        assert_eq!(as_pairs(&s), set(&[(0x1000, 0xa000)]));
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = RegionSet::<8>::new();
        s.insert(Region::new(0, 0x10000)).unwrap();
        s.remove(Region::new(0x4000, 0x6000)).unwrap();
        assert_eq!(as_pairs(&s), set(&[(0, 0x4000), (0x6000, 0x10000)]));
        s.remove(Region::new(0x3000, 0x7000)).unwrap();
        assert_eq!(as_pairs(&s), set(&[(0, 0x3000), (0x7000, 0x10000)]));
        s.remove(Region::new(0, 0x20000)).unwrap();
        assert!(s.as_slice().is_empty());
    }

    #[test]
    fn overflow_is_reported_not_ignored() {
        let mut s = RegionSet::<2>::new();
        s.insert(Region::new(0, 0x1000)).unwrap();
        s.insert(Region::new(0x2000, 0x3000)).unwrap();
        assert_eq!(s.insert(Region::new(0x4000, 0x5000)), Err(Overflow));
        let mut t = RegionSet::<1>::new();
        t.insert(Region::new(0, 0x10000)).unwrap();
        assert_eq!(t.remove(Region::new(0x1000, 0x2000)), Err(Overflow));
    }

    /// A map shaped like Bochs' e820 with 1 GiB plus the usual holes, an
    /// overlapping reserved entry, and unaligned edges.
    fn sample_map() -> Vec<(Region, MemoryKind)> {
        vec![
            (Region::new(0, 0x9f000), MemoryKind::Available),
            (Region::new(0x9f000, 0x100000), MemoryKind::Reserved),
            (Region::new(0x100000, 0x3fff0000), MemoryKind::Available),
            (Region::new(0x3fff0000, 0x40000000), MemoryKind::Reserved),
            // Firmware maps sometimes overlap: reserved must win.
            (Region::new(0x0800_0800, 0x0800_1800), MemoryKind::Reserved),
            (Region::new(0xfffc0000, 0x1_0000_0000), MemoryKind::Reserved),
            (Region::new(0x1_0000_0100, 0x1_4000_0000), MemoryKind::Available),
        ]
    }

    #[test]
    fn free_memory_excludes_reserved_image_and_modules() {
        let image = Region::new(0x200000, 0x2a5123);
        let module = Region::new(0x300000, 0x310000);
        let first_mib = Region::new(0, MIB);
        let free = free_memory::<16>(sample_map().into_iter(), &[first_mib, image, module], 4 << 30).unwrap();
        assert_eq!(
            as_pairs(&free),
            set(&[(0x100000, 0x200000), (0x2a6000, 0x300000), (0x310000, 0x0800_0000), (0x0800_2000, 0x3fff0000),])
        );
    }

    #[test]
    fn free_memory_rounds_inward_and_respects_the_limit() {
        let free = free_memory::<16>(sample_map().into_iter(), &[], u64::MAX).unwrap();
        // The entry at 4 GiB + 0x100 starts mid-page: its first page is unusable.
        assert_eq!(free.as_slice().last().unwrap().start, 0x1_0000_1000);
        let clipped = free_memory::<16>(sample_map().into_iter(), &[], 0x2000_0000).unwrap();
        assert_eq!(clipped.as_slice().last().unwrap().end, 0x2000_0000);
    }

    #[test]
    fn allocator_never_hands_out_excluded_frames() {
        let image = Region::new(0x200000, 0x400000);
        let free = free_memory::<16>(sample_map().into_iter(), &[Region::new(0, MIB), image], 4 << 30).unwrap();
        let mut alloc = FrameAllocator::new(free);
        let mut seen = Vec::new();
        while let Some(frame) = alloc.allocate(PAGE_SIZE, PAGE_SIZE) {
            assert!(!image.contains(frame), "handed out image frame {frame:#x}");
            assert!(frame >= MIB);
            assert!(!Region::new(0x0800_0000, 0x0800_2000).contains(frame));
            assert!(!Region::new(0x3fff0000, 0x40000000).contains(frame));
            seen.push(frame);
            if seen.len() > 600 {
                break;
            }
        }
        assert_eq!(seen[0], 0x100000);
        // Frames come out unique and ascending.
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn highest_block_is_aligned_and_inside_one_region() {
        let mut s = RegionSet::<8>::new();
        s.insert(Region::new(0x10_0000, 0x800_0000)).unwrap();
        s.insert(Region::new(0x900_0000, 0x930_0000)).unwrap();
        // 4 MiB do not fit in the small top region once aligned to 2 MiB.
        assert_eq!(s.highest_block(4 * MIB, 2 * MIB, u64::MAX), Some(Region::new(0x7c0_0000, 0x800_0000)));
        assert_eq!(s.highest_block(2 * MIB, 2 * MIB, u64::MAX), Some(Region::new(0x900_0000, 0x920_0000)));
        assert_eq!(s.highest_block(2 * MIB, 2 * MIB, 0x400_0000), Some(Region::new(0x3e0_0000, 0x400_0000)));
        assert_eq!(s.highest_block(256 * MIB, 2 * MIB, u64::MAX), None);
    }

    #[test]
    fn allocator_aligns_and_reuses() {
        let mut free = RegionSet::<8>::new();
        free.insert(Region::new(0x1000, 0x800000)).unwrap();
        let mut alloc = FrameAllocator::new(free);
        let big = alloc.allocate(3 * MIB, 2 * MIB).unwrap();
        assert_eq!(big, 0x200000);
        assert_eq!(alloc.free_bytes(), 0x800000 - 0x1000 - 3 * MIB);
        // The gap below the aligned block is still usable.
        assert_eq!(alloc.allocate(PAGE_SIZE, PAGE_SIZE), Some(0x1000));
        assert_eq!(alloc.allocate(8 * MIB, PAGE_SIZE), None);
        alloc.deallocate(big, 3 * MIB).unwrap();
        assert_eq!(alloc.allocate(3 * MIB, 2 * MIB), Some(0x200000));
        assert_eq!(alloc.allocate(0, PAGE_SIZE), None);
        assert_eq!(alloc.allocate(PAGE_SIZE, 3 * PAGE_SIZE), None);
    }
}
