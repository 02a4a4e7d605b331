//! One 4-level page-table implementation, generic over the entry format.
//!
//! The same code builds the EPT hierarchies of every guest view (KEPT, MEPT)
//! and could build x86 paging structures: only [`EntryFormat`] differs. Tables
//! are reached through [`TableMemory`], so the logic runs on the host in tests
//! with tables in ordinary heap memory, and in the hypervisor with tables in
//! identity-mapped physical frames.
//!
//! Every mutating operation returns a [`Flush`] that says whether a present
//! translation changed; the caller must then invalidate (INVEPT for EPT).
//!
//! A hierarchy has 4 levels (48-bit addresses, as EPT and x86 paging) or 3
//! (39-bit, what many VT-d remapping units walk): the level count is chosen
//! when it is created, and everything else is the same code.

use bitflags::bitflags;

use super::frames::PAGE_SIZE;

bitflags! {
    /// Access rights, independent of the entry format.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        const RW = Self::READ.bits() | Self::WRITE.bits();
        const RX = Self::READ.bits() | Self::EXECUTE.bits();
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXECUTE.bits();
    }
}

/// Memory types, numbered as the MTRR/PAT/EPT encodings number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemType {
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}

impl MemType {
    pub const fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0 => Self::Uncacheable,
            1 => Self::WriteCombining,
            4 => Self::WriteThrough,
            5 => Self::WriteProtected,
            6 => Self::WriteBack,
            _ => return None,
        })
    }
}

/// What a leaf grants: rights and a memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub perms: Perms,
    pub mem_type: MemType,
}

impl Attrs {
    pub const fn new(perms: Perms, mem_type: MemType) -> Self {
        Attrs { perms, mem_type }
    }
}

/// The sizes a leaf can map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 1 << 12,
            Self::Size2M => 1 << 21,
            Self::Size1G => 1 << 30,
        }
    }

    const fn level(self) -> u8 {
        match self {
            Self::Size4K => 0,
            Self::Size2M => 1,
            Self::Size1G => 2,
        }
    }

    const fn from_level(level: u8) -> Self {
        match level {
            0 => Self::Size4K,
            1 => Self::Size2M,
            _ => Self::Size1G,
        }
    }
}

/// How the bits of one entry are laid out.
pub trait EntryFormat {
    /// Whether the entry maps anything (a table or a leaf).
    fn is_present(entry: u64) -> bool;
    /// Whether a present entry at `level` > 0 is a leaf (a 2 MiB or 1 GiB page).
    fn is_large(entry: u64) -> bool;
    /// The physical address the entry points to.
    fn address(entry: u64) -> u64;
    /// An entry pointing to a next-level table, with full rights so the leaf decides.
    fn table(address: u64) -> u64;
    /// A leaf at `level` (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB).
    fn leaf(address: u64, attrs: Attrs, level: u8) -> u64;
    /// The attributes of a leaf.
    fn attrs(entry: u64) -> Attrs;
}

/// Where table frames come from and how they are read and written.
pub trait TableMemory {
    /// A zeroed 4 KiB frame, or `None` when memory is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    fn free_table(&mut self, table: u64);
    fn read(&self, table: u64, index: usize) -> u64;
    fn write(&mut self, table: u64, index: usize, entry: u64);
}

/// Whether a present translation changed, so cached ones must be invalidated.
#[must_use = "a changed translation must be invalidated"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flush(bool);

impl Flush {
    pub const NONE: Flush = Flush(false);
    pub const NEEDED: Flush = Flush(true);

    pub const fn is_needed(self) -> bool {
        self.0
    }

    fn merge(&mut self, other: Flush) {
        self.0 |= other.0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Addresses or length not 4 KiB aligned, or the range wraps or leaves the
    /// 48-bit space.
    Misaligned,
    /// No frame for a new table.
    OutOfMemory,
    /// Part of the range maps nothing (for `protect`).
    NotMapped(u64),
}

/// The result of a walk: where an address goes and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub address: u64,
    pub attrs: Attrs,
    pub size: PageSize,
}

const ENTRIES: usize = 512;

const fn level_bytes(level: u8) -> u64 {
    1 << (12 + 9 * level as u64)
}

const fn index(addr: u64, level: u8) -> usize {
    ((addr >> (12 + 9 * level as u64)) & 511) as usize
}

/// A 4-level (or 3-level) hierarchy rooted at one frame.
pub struct PageTable<F: EntryFormat> {
    root: u64,
    largest: PageSize,
    /// The level of the root table: 3 for a 4-level walk, 2 for a 3-level one.
    top: u8,
    _format: core::marker::PhantomData<F>,
}

impl<F: EntryFormat> PageTable<F> {
    /// An empty 4-level hierarchy whose leaves are at most `largest`.
    pub fn new(mem: &mut impl TableMemory, largest: PageSize) -> Result<Self, MapError> {
        Self::with_levels(mem, largest, 4)
    }

    /// An empty hierarchy of `levels` (3 or 4) levels: 39 or 48 bits of address.
    pub fn with_levels(mem: &mut impl TableMemory, largest: PageSize, levels: u8) -> Result<Self, MapError> {
        if !(3..=4).contains(&levels) {
            return Err(MapError::Misaligned);
        }
        let root = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        Ok(PageTable { root, largest, top: levels - 1, _format: core::marker::PhantomData })
    }

    /// Levels walked from the root: 3 or 4.
    pub fn levels(&self) -> u8 {
        self.top + 1
    }

    /// The first address the hierarchy cannot map.
    pub fn address_limit(&self) -> u64 {
        level_bytes(self.top + 1)
    }

    /// The physical address of the top-level table (for EPTP or CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps `[addr, addr + len)` to `[target, target + len)`, using the largest
    /// pages alignment allows, replacing whatever was mapped there.
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        addr: u64,
        target: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<Flush, MapError> {
        self.check(addr, len)?;
        self.check(target, len)?;
        let mut flush = Flush::NONE;
        let mut offset = 0;
        while offset < len {
            let (a, t) = (addr + offset, target + offset);
            let level = self.best_level(a, t, len - offset);
            let (table, i) = self.slot(mem, a, level, &mut flush)?;
            let old = mem.read(table, i);
            if F::is_present(old) {
                flush = Flush::NEEDED;
                if level > 0 && !F::is_large(old) {
                    free_subtree::<F>(mem, F::address(old), level - 1);
                }
            }
            mem.write(table, i, F::leaf(t, attrs, level));
            offset += level_bytes(level);
        }
        Ok(flush)
    }

    /// Removes every translation in `[addr, addr + len)`, splitting large pages
    /// that the range covers only in part.
    pub fn unmap(&mut self, mem: &mut impl TableMemory, addr: u64, len: u64) -> Result<Flush, MapError> {
        self.check(addr, len)?;
        let mut flush = Flush::NONE;
        let mut offset = 0;
        while offset < len {
            let a = addr + offset;
            let remaining = len - offset;
            let Some((table, i, level)) = self.find(mem, a) else {
                offset += skip_unmapped::<F>(self, mem, a).min(remaining);
                continue;
            };
            let size = level_bytes(level);
            if a.is_multiple_of(size) && remaining >= size {
                mem.write(table, i, 0);
                flush = Flush::NEEDED;
                offset += size;
            } else {
                flush.merge(self.split(mem, table, i, level)?);
            }
        }
        Ok(flush)
    }

    /// Sets the rights of every page in `[addr, addr + len)`, splitting large
    /// pages the range covers only in part. Fails, changing nothing, when part
    /// of the range is unmapped.
    pub fn protect(
        &mut self,
        mem: &mut impl TableMemory,
        addr: u64,
        len: u64,
        perms: Perms,
    ) -> Result<Flush, MapError> {
        self.check(addr, len)?;
        let mut offset = 0;
        while offset < len {
            let a = addr + offset;
            let (_, _, level) = self.find(mem, a).ok_or(MapError::NotMapped(a))?;
            offset += level_bytes(level) - (a % level_bytes(level));
        }
        let mut flush = Flush::NONE;
        let mut offset = 0;
        while offset < len {
            let a = addr + offset;
            let remaining = len - offset;
            let (table, i, level) = self.find(mem, a).ok_or(MapError::NotMapped(a))?;
            let size = level_bytes(level);
            if a.is_multiple_of(size) && remaining >= size {
                let old = mem.read(table, i);
                let mut attrs = F::attrs(old);
                if attrs.perms != perms {
                    attrs.perms = perms;
                    mem.write(table, i, F::leaf(F::address(old), attrs, level));
                    flush = Flush::NEEDED;
                }
                offset += size;
            } else {
                let old = F::attrs(mem.read(table, i));
                if old.perms == perms {
                    // Nothing changes for this large page: no need to split it.
                    offset += (size - a % size).min(remaining);
                    continue;
                }
                flush.merge(self.split(mem, table, i, level)?);
            }
        }
        Ok(flush)
    }

    /// Walks the hierarchy for one address.
    pub fn translate(&self, mem: &impl TableMemory, addr: u64) -> Option<Translation> {
        let (table, i, level) = self.find(mem, addr)?;
        let entry = mem.read(table, i);
        let size = PageSize::from_level(level);
        let offset = addr & (size.bytes() - 1);
        Some(Translation { address: F::address(entry) + offset, attrs: F::attrs(entry), size })
    }

    /// Splits the large page holding `addr` (if any) down to 4 KiB pages.
    pub fn split_to_4k(&mut self, mem: &mut impl TableMemory, addr: u64) -> Result<Flush, MapError> {
        let mut flush = Flush::NONE;
        while let Some((table, i, level)) = self.find(mem, addr) {
            if level == 0 {
                break;
            }
            flush.merge(self.split(mem, table, i, level)?);
        }
        Ok(flush)
    }

    /// Frees every table of the hierarchy, the root included.
    pub fn destroy(self, mem: &mut impl TableMemory) {
        free_subtree::<F>(mem, self.root, self.top);
    }

    /// Calls `f(address, translation)` for every leaf, in address order.
    pub fn for_each_leaf(&self, mem: &impl TableMemory, mut f: impl FnMut(u64, Translation)) {
        walk_leaves::<F>(mem, self.root, self.top, 0, &mut f);
    }

    fn best_level(&self, addr: u64, target: u64, remaining: u64) -> u8 {
        let mut level = self.largest.level();
        while level > 0 {
            let size = level_bytes(level);
            if addr.is_multiple_of(size) && target.is_multiple_of(size) && remaining >= size {
                break;
            }
            level -= 1;
        }
        level
    }

    /// The table and index where a leaf of `level` for `addr` lives, creating
    /// tables and splitting large pages above it on the way.
    fn slot(
        &mut self,
        mem: &mut impl TableMemory,
        addr: u64,
        level: u8,
        flush: &mut Flush,
    ) -> Result<(u64, usize), MapError> {
        let mut table = self.root;
        let mut l = self.top;
        while l > level {
            let i = index(addr, l);
            let entry = mem.read(table, i);
            if !F::is_present(entry) {
                let next = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
                mem.write(table, i, F::table(next));
            } else if F::is_large(entry) {
                flush.merge(self.split(mem, table, i, l)?);
            }
            table = F::address(mem.read(table, i));
            l -= 1;
        }
        Ok((table, index(addr, level)))
    }

    /// Finds the present leaf mapping `addr`: (table, index, level).
    fn find(&self, mem: &impl TableMemory, addr: u64) -> Option<(u64, usize, u8)> {
        if addr >= self.address_limit() {
            return None;
        }
        let mut table = self.root;
        let mut level = self.top;
        loop {
            let i = index(addr, level);
            let entry = mem.read(table, i);
            if !F::is_present(entry) {
                return None;
            }
            if level == 0 || (level <= 2 && F::is_large(entry)) {
                return Some((table, i, level));
            }
            table = F::address(entry);
            level -= 1;
        }
    }

    /// Replaces the large leaf at `table[i]` (of `level`) by a table of 512
    /// leaves one level down with the same attributes.
    fn split(&mut self, mem: &mut impl TableMemory, table: u64, i: usize, level: u8) -> Result<Flush, MapError> {
        let entry = mem.read(table, i);
        let next = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        let base = F::address(entry);
        let attrs = F::attrs(entry);
        let step = level_bytes(level - 1);
        for j in 0..ENTRIES {
            mem.write(next, j, F::leaf(base + j as u64 * step, attrs, level - 1));
        }
        mem.write(table, i, F::table(next));
        // Same translations, but the cached large page must go.
        Ok(Flush::NEEDED)
    }
}

/// How many bytes from `addr` up to the next possibly-mapped boundary.
fn skip_unmapped<F: EntryFormat>(pt: &PageTable<F>, mem: &impl TableMemory, addr: u64) -> u64 {
    let mut table = pt.root;
    let mut level = pt.top;
    loop {
        let entry = mem.read(table, index(addr, level));
        if !F::is_present(entry) || level == 0 {
            let size = level_bytes(level);
            return size - addr % size;
        }
        table = F::address(entry);
        level -= 1;
    }
}

fn free_subtree<F: EntryFormat>(mem: &mut impl TableMemory, table: u64, level: u8) {
    if level > 0 {
        for i in 0..ENTRIES {
            let entry = mem.read(table, i);
            if F::is_present(entry) && !F::is_large(entry) {
                free_subtree::<F>(mem, F::address(entry), level - 1);
            }
        }
    }
    mem.free_table(table);
}

fn walk_leaves<F: EntryFormat>(
    mem: &impl TableMemory,
    table: u64,
    level: u8,
    base: u64,
    f: &mut impl FnMut(u64, Translation),
) {
    for i in 0..ENTRIES {
        let entry = mem.read(table, i);
        if !F::is_present(entry) {
            continue;
        }
        let addr = base + i as u64 * level_bytes(level);
        if level == 0 || F::is_large(entry) {
            let t =
                Translation { address: F::address(entry), attrs: F::attrs(entry), size: PageSize::from_level(level) };
            f(addr, t);
        } else {
            walk_leaves::<F>(mem, F::address(entry), level - 1, addr, f);
        }
    }
}

impl<F: EntryFormat> PageTable<F> {
    /// Page-aligned, not wrapping, and inside the hierarchy's address space.
    fn check(&self, addr: u64, len: u64) -> Result<(), MapError> {
        let end = addr.checked_add(len).ok_or(MapError::Misaligned)?;
        if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || end > self.address_limit() {
            return Err(MapError::Misaligned);
        }
        Ok(())
    }
}

/// Table memory in ordinary heap allocations, for host tests, tools and
/// the fuzz harness.
#[cfg(any(test, feature = "testing"))]
pub mod host {
    use super::TableMemory;
    use alloc::boxed::Box;
    use alloc::collections::BTreeMap;

    /// Tables live in boxes, keyed by invented, page-aligned "physical" addresses.
    #[derive(Default)]
    pub struct HeapTables {
        tables: BTreeMap<u64, Box<[u64; 512]>>,
        next: u64,
        /// Fail allocations after this many (to test out-of-memory paths).
        pub limit: Option<usize>,
        pub allocated: usize,
    }

    impl HeapTables {
        pub fn with_limit(limit: usize) -> Self {
            HeapTables { limit: Some(limit), ..Default::default() }
        }

        pub fn live(&self) -> usize {
            self.tables.len()
        }

        /// An entry, or `None` when `table` is no live table (what a
        /// device model reads where the hardware would find no memory).
        pub fn get(&self, table: u64, index: usize) -> Option<u64> {
            self.tables.get(&table)?.get(index).copied()
        }
    }

    impl TableMemory for HeapTables {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.limit.is_some_and(|l| self.allocated >= l) {
                return None;
            }
            self.next += 0x1000;
            self.allocated += 1;
            // High invented addresses so they cannot be confused with mapped ones.
            let addr = 0x7_0000_0000 + self.next;
            self.tables.insert(addr, Box::new([0; 512]));
            Some(addr)
        }

        fn free_table(&mut self, table: u64) {
            assert!(self.tables.remove(&table).is_some(), "double free of table {table:#x}");
        }

        fn read(&self, table: u64, index: usize) -> u64 {
            self.tables[&table][index]
        }

        fn write(&mut self, table: u64, index: usize, entry: u64) {
            self.tables.get_mut(&table).expect("write to a freed table")[index] = entry;
        }
    }
}
