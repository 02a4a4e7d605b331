//! The kernel's own objects in its heap. Credentials, tasks, pids and the
//! like come from slab caches of their own; the slab a guest-physical page
//! belongs to is named in the kernel's `struct page` array (`vmemmap`).
//! So when an isolated module first writes a heap page, the hypervisor
//! reads that page's `struct page` and refuses the page if it serves a
//! protected cache. The array itself is read-only to every module (else a
//! module would rename the cache of the page it wants), and grants of heap
//! pages are revoked periodically, since a page a module was granted may
//! later be freed and serve a protected cache.

use alloc::vec::Vec;

use guest_agent::integrity as abi;

use super::layout::{is_kernel_address, Range};

/// Where the kernel's `struct page` array is and which caches it protects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMap {
    /// `vmemmap`: the `struct page` of page frame `n` is at `vmemmap + n * size`.
    pub vmemmap: u64,
    pub page_struct_size: u64,
    /// Where a slab's head `struct page` holds its cache.
    pub slab_cache_offset: u64,
    /// The protected caches, with the name reports give their objects.
    pub caches: Vec<(u64, &'static str)>,
    /// The guest-physical page behind each page of the array (for guest
    /// RAM), zero where the kernel did not map one.
    backing: Vec<u64>,
    /// Where a `struct page` holds its type, and the mask and value that
    /// mark a page table there.
    table_type: Option<(u64, u32, u32)>,
    /// The protected caches by slot, zero where absent.
    slots: [u64; abi::PROTECTED_CACHES],
    /// Fields of protected objects every module may write: (cache, object
    /// stride, offset, size).
    fields: Vec<(u64, u64, u64, u64)>,
}

/// What a page's `struct page` says it holds.
enum Holds {
    /// A page table.
    Table,
    /// Objects of a slab cache, from the guest-physical address on.
    Slab { cache: u64, base: u64 },
}

/// What [`ObjectMap::object_at`] calls a page typed as a page table.
pub const PAGE_TABLE: &str = "page-table";

/// Why the agent's description of the `struct page` array is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadObjectMap;

/// A `struct page` is 64 bytes on x86-64 kernels without debug options;
/// anything outside these bounds is not one.
const PAGE_STRUCT_MIN: u32 = 32;
const PAGE_STRUCT_MAX: u32 = 256;

/// Where every x86-64 `struct page` (and a page table's `ptdesc`) holds
/// `compound_head` (bit 0 set in a tail page) and `mapping`.
const COMPOUND_HEAD_OFFSET: u64 = 8;
const MAPPING_OFFSET: u64 = 24;

/// Larger than any object of the protected caches (a `task_struct` is
/// about 10 KiB).
const OBJECT_STRIDE_MAX: u64 = 1 << 16;

impl ObjectMap {
    /// From the layout's fields; `None` when the agent gave no array (the
    /// kernel's objects are then not protected, and the caller says so).
    pub fn from_wire(
        vmemmap: u64,
        size: u32,
        slab_cache_offset: u32,
        caches: &[u64; abi::PROTECTED_CACHES],
    ) -> Result<Option<Self>, BadObjectMap> {
        let caches_by_slot = caches;
        if vmemmap == 0 {
            return Ok(None);
        }
        let sane = is_kernel_address(vmemmap)
            && vmemmap & 0xfff == 0
            && (PAGE_STRUCT_MIN..=PAGE_STRUCT_MAX).contains(&size)
            && size.is_multiple_of(8)
            && slab_cache_offset.is_multiple_of(8)
            && slab_cache_offset >= 8
            && slab_cache_offset + 8 <= size;
        if !sane {
            return Err(BadObjectMap);
        }
        let caches: Vec<(u64, &'static str)> = caches
            .iter()
            .zip(abi::PROTECTED_CACHES_NAMES)
            .filter(|(&c, _)| c != 0)
            .map(|(&c, (_, name))| (c, name))
            .collect();
        if caches.iter().any(|&(c, _)| !is_kernel_address(c)) {
            return Err(BadObjectMap);
        }
        Ok(Some(ObjectMap {
            vmemmap,
            page_struct_size: u64::from(size),
            slab_cache_offset: u64::from(slab_cache_offset),
            caches,
            backing: Vec::new(),
            table_type: None,
            slots: *caches_by_slot,
            fields: Vec::new(),
        }))
    }

    /// The fields of protected objects every module may write (a reference
    /// count its inline helpers change), given the caches' object strides.
    /// Each is 4 or 8 bytes, naturally aligned, inside its object: so never
    /// across a page, as slabs and objects start 8-aligned.
    pub fn set_shared_fields(
        &mut self,
        strides: &[u32; abi::PROTECTED_CACHES],
        fields: &[abi::ObjectField; abi::OBJECT_FIELDS],
    ) -> Result<(), BadObjectMap> {
        let mut kept = Vec::new();
        for f in fields.iter().filter(|f| f.cache != 0) {
            let slot = usize::try_from(f.cache - 1).map_err(|_| BadObjectMap)?;
            let (Some(&cache), Some(&stride)) = (self.slots.get(slot), strides.get(slot)) else {
                return Err(BadObjectMap);
            };
            let stride = u64::from(stride);
            let (offset, size) = (u64::from(f.offset), u64::from(f.size));
            let sane = matches!(size, 4 | 8)
                && offset.is_multiple_of(size)
                && stride.is_multiple_of(8)
                && (8..=OBJECT_STRIDE_MAX).contains(&stride)
                && offset + size <= stride;
            if !sane {
                return Err(BadObjectMap);
            }
            if cache != 0 {
                kept.push((cache, stride, offset, size));
            }
        }
        self.fields = kept;
        Ok(())
    }

    /// How a page table is marked in its `struct page` (`page_type`): a
    /// 32-bit field at `offset`, `(field & mask) == value`. A zero mask
    /// leaves it unknown.
    pub fn set_table_type(&mut self, offset: u32, mask: u32, value: u32) -> Result<(), BadObjectMap> {
        if mask == 0 {
            self.table_type = None;
            return Ok(());
        }
        let sane = offset.is_multiple_of(4) && u64::from(offset) + 8 <= self.page_struct_size && value & !mask == 0;
        if !sane {
            return Err(BadObjectMap);
        }
        self.table_type = Some((u64::from(offset), mask, value));
        Ok(())
    }

    /// The array's guest-virtual range for page frames below `ram_end`.
    pub fn array(&self, ram_end: u64) -> Range {
        let len = (ram_end >> 12).saturating_mul(self.page_struct_size);
        Range::new(self.vmemmap, self.vmemmap.saturating_add(len))
    }

    /// The guest-physical page behind each page of [`Self::array`], in
    /// order, zero where unmapped.
    pub fn set_backing(&mut self, pages: Vec<u64>) {
        self.backing = pages;
    }

    /// The pages holding the array: no module may write them.
    pub fn backing_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.backing.iter().copied().filter(|&p| p != 0)
    }

    /// The page frame whose `struct page` is at guest-virtual `va`.
    pub fn frame_of(&self, va: u64) -> Option<u64> {
        let offset = va.checked_sub(self.vmemmap)?;
        offset.is_multiple_of(self.page_struct_size).then(|| offset / self.page_struct_size)
    }

    /// The guest-physical address of the `struct page` at guest-virtual
    /// `va`, if the array maps it.
    pub fn struct_gpa_of(&self, va: u64) -> Option<u64> {
        self.struct_gpa(va)
    }

    /// The guest-physical address of the `struct page` at guest-virtual `va`.
    fn struct_gpa(&self, va: u64) -> Option<u64> {
        let offset = va.checked_sub(self.vmemmap)?;
        if !offset.is_multiple_of(self.page_struct_size) {
            return None;
        }
        let page = *self.backing.get(usize::try_from(offset >> 12).ok()?)?;
        (page != 0).then_some(page + (offset & 0xfff))
    }

    /// What guest RAM page `gpa` holds: `Ok(Some(name))` for an object of a
    /// protected cache or, [`PAGE_TABLE`], a page typed as a page table
    /// (a process's, made since the last walk), `Ok(None)` for anything else, `Err` when its
    /// `struct page` cannot be read or names an impossible head (refused:
    /// the check fails closed). `read` reads a guest-physical u64.
    pub fn object_at(&self, gpa: u64, read: impl Fn(u64) -> Option<u64>) -> Result<Option<&'static str>, BadObjectMap> {
        Ok(match self.holds(gpa, read)? {
            Holds::Table => Some(PAGE_TABLE),
            Holds::Slab { cache, .. } => self.caches.iter().find(|&&(c, _)| c == cache).map(|&(_, name)| name),
        })
    }

    /// The field every module may write that byte `gpa` of a protected
    /// object lies in, as a guest-physical range; `None` for any other byte.
    pub fn shared_field_at(&self, gpa: u64, read: impl Fn(u64) -> Option<u64>) -> Option<Range> {
        let Ok(Holds::Slab { cache, base }) = self.holds(gpa, read) else { return None };
        let within = gpa.checked_sub(base)?;
        self.fields.iter().filter(|f| f.0 == cache).find_map(|&(_, stride, offset, size)| {
            let start = gpa - within % stride + offset;
            Range::new(start, start + size).contains(gpa).then(|| Range::new(start, start + size))
        })
    }

    /// The word at `offset` in the `struct page` of guest RAM page `gpa`.
    pub fn page_word(&self, gpa: u64, offset: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
        let va = (gpa >> 12).checked_mul(self.page_struct_size)?.checked_add(self.vmemmap)?;
        read(self.struct_gpa(va)?.checked_add(offset)?)
    }

    /// Whether guest RAM page `gpa` may be a page table its `struct page`
    /// does not type (6.1's PUDs; the kernel's own PTE tables on 6.1 and
    /// 6.12): neither a tail of a compound page nor owned through
    /// `mapping` (the page cache's, an anonymous mapping's, or, at the same
    /// word, a slab's cache on 6.1). Only a walk tells such a table from
    /// other plain pages; `true` (a walk) when the `struct page` cannot be
    /// read. The array is read-only to modules, so a module cannot make a
    /// table look otherwise.
    pub fn may_be_untyped_table(&self, gpa: u64, read: impl Fn(u64) -> Option<u64>) -> bool {
        let word = |offset| self.page_word(gpa, offset, &read);
        match (word(COMPOUND_HEAD_OFFSET), word(MAPPING_OFFSET)) {
            (Some(head), Some(mapping)) => head & 1 == 0 && mapping == 0,
            _ => true,
        }
    }

    /// Whether guest-physical `gpa` lies in a slab of the protected cache in
    /// `slot` (the cache itself, not a name: merged caches share one).
    pub fn in_cache(&self, gpa: u64, slot: usize, read: impl Fn(u64) -> Option<u64>) -> bool {
        let cache = self.slots.get(slot).copied().unwrap_or(0);
        cache != 0 && matches!(self.holds(gpa, read), Ok(Holds::Slab { cache: c, .. }) if c == cache)
    }

    /// What guest RAM page `gpa` holds, by its `struct page`.
    fn holds(&self, gpa: u64, read: impl Fn(u64) -> Option<u64>) -> Result<Holds, BadObjectMap> {
        let va = (gpa >> 12)
            .checked_mul(self.page_struct_size)
            .and_then(|o| o.checked_add(self.vmemmap))
            .ok_or(BadObjectMap)?;
        let mut at = self.struct_gpa(va).ok_or(BadObjectMap)?;
        if let Some((offset, mask, value)) = self.table_type {
            let field = read(at + offset).ok_or(BadObjectMap)? as u32;
            if field & mask == value {
                return Ok(Holds::Table);
            }
        }
        // A tail page of a compound page (a slab of several pages) points
        // to its head, bit 0 set; a slab's objects start at its head.
        let head = read(at + COMPOUND_HEAD_OFFSET).ok_or(BadObjectMap)?;
        let mut frame = gpa >> 12;
        if head & 1 != 0 {
            at = self.struct_gpa(head - 1).ok_or(BadObjectMap)?;
            frame = self.frame_of(head - 1).ok_or(BadObjectMap)?;
        }
        let cache = read(at + self.slab_cache_offset).ok_or(BadObjectMap)?;
        Ok(Holds::Slab { cache, base: frame << 12 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;

    const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
    const CRED_JAR: u64 = 0xffff_8880_0100_0000;
    const TASKS: u64 = 0xffff_8880_0100_0100;
    const KMALLOC: u64 = 0xffff_8880_0100_0200;
    const PROC_ENTRIES: u64 = 0xffff_8880_0100_0300;
    const PROC_INODES: u64 = 0xffff_8880_0100_0400;
    /// The array's pages live at 0x70_0000.. in guest RAM.
    const ARRAY_GPA: u64 = 0x70_0000;

    fn map() -> ObjectMap {
        let mut caches = [0; abi::PROTECTED_CACHES];
        caches[0] = CRED_JAR;
        caches[1] = TASKS;
        caches[10] = PROC_ENTRIES;
        caches[11] = PROC_INODES;
        let mut m = ObjectMap::from_wire(VMEMMAP, 64, 24, &caches).unwrap().unwrap();
        // 16 MiB of RAM: 4096 frames, 64 pages of array; the 3rd unmapped.
        let pages = (0..64).map(|i| if i == 2 { 0 } else { ARRAY_GPA + i * 0x1000 }).collect();
        m.set_backing(pages);
        assert_eq!(m.array(16 << 20), Range::new(VMEMMAP, VMEMMAP + 64 * 0x1000));
        m
    }

    /// Guest memory holding `struct page`s: frame → (word 1, slab cache).
    fn memory(frames: &[(u64, u64, u64)]) -> BTreeMap<u64, u64> {
        let mut mem = BTreeMap::new();
        for &(pfn, compound, cache) in frames {
            let at = ARRAY_GPA + pfn * 64;
            mem.insert(at + 8, compound);
            mem.insert(at + 24, cache);
        }
        mem
    }

    #[test]
    fn a_page_of_a_protected_cache_is_named() {
        let m = map();
        let mem = memory(&[
            (0x10, 0, CRED_JAR),
            (0x11, 0, KMALLOC),
            (0x20, 0, TASKS),
            (0x21, VMEMMAP + 0x20 * 64 + 1, 0),
            (0x40, 0, PROC_ENTRIES),
            (0x41, 0, PROC_INODES),
        ]);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(m.object_at(0x10_123, read), Ok(Some("cred")));
        assert_eq!(m.object_at(0x11_000, read), Ok(None));
        // A tail page of a task_struct slab is judged by its head.
        assert_eq!(m.object_at(0x21_ff8, read), Ok(Some("task")));
        // procfs: an entry's operations, an inode's i_fop.
        assert_eq!(m.object_at(0x40_080, read), Ok(Some("proc-entry")));
        assert_eq!(m.object_at(0x41_7c0, read), Ok(Some("proc-inode")));
        // A page that is no slab (word at the offset is not a cache).
        assert_eq!(m.object_at(0x30_000, read), Ok(None));
    }

    /// Only a plain page may be an untyped table: a slab's page (its cache
    /// where 6.1 keeps `mapping`), a page cache page, a compound page's
    /// tail cannot; a page whose `struct page` is unmapped may.
    #[test]
    fn only_a_plain_page_may_be_an_untyped_table() {
        let m = map();
        let mem =
            memory(&[(0x10, 0, CRED_JAR), (0x11, 0, 0xffff_8880_0200_0000), (0x12, VMEMMAP + 1, 0), (0x13, 0, 0)]);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert!(!m.may_be_untyped_table(0x10_000, read), "a slab page");
        assert!(!m.may_be_untyped_table(0x11_000, read), "a page with a mapping");
        assert!(!m.may_be_untyped_table(0x12_000, read), "a tail page");
        assert!(m.may_be_untyped_table(0x13_000, read), "a plain page");
        // Frames 0x80.. have their struct pages on the array's unmapped page.
        assert!(m.may_be_untyped_table(0x80_000, read), "unknown: a walk decides");
        assert!(m.may_be_untyped_table(0x13_000, |_| None), "unreadable: a walk decides");
    }

    #[test]
    fn a_reference_count_is_found_in_every_object_of_its_cache() {
        let mut m = map();
        let mut strides = [0; abi::PROTECTED_CACHES];
        strides[1] = 0x2880; // task_struct: objects across the pages of an order-3 slab
        let mut fields = [abi::ObjectField::default(); abi::OBJECT_FIELDS];
        fields[0] = abi::ObjectField { cache: 2, offset: 0x18, size: 4, reserved: 0 };
        m.set_shared_fields(&strides, &fields).unwrap();
        // A slab of eight frames from 0x20: the head, then tails.
        let head = VMEMMAP + 0x20 * 64;
        let frames: Vec<(u64, u64, u64)> = (0..8).map(|i| (0x20 + i, if i == 0 { 0 } else { head + 1 }, 0)).collect();
        let mut mem = memory(&frames);
        mem.insert(ARRAY_GPA + 0x20 * 64 + 24, TASKS);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        // The third object starts at 0x20_000 + 2 * 0x2880 = 0x25_100, on a tail page.
        let count = 0x25_100 + 0x18;
        assert_eq!(m.shared_field_at(count, read), Some(Range::new(count, count + 4)));
        assert_eq!(m.shared_field_at(count + 3, read), Some(Range::new(count, count + 4)));
        assert_eq!(m.shared_field_at(count + 4, read), None, "beside it");
        assert_eq!(m.shared_field_at(count - 1, read), None);
        assert_eq!(m.shared_field_at(0x20_018, read), Some(Range::new(0x20_018, 0x20_01c)), "the first object's");
        // Another cache's object at the same offset: none.
        let creds = memory(&[(0x10, 0, CRED_JAR)]);
        assert_eq!(m.shared_field_at(0x10_018, |a| creds.get(&a).copied().or(Some(0))), None);
        // Descriptions that cannot hold are refused.
        for (cache, offset, size, stride) in
            [(9, 0, 4, 0x100), (2, 2, 4, 0x100), (2, 0, 2, 0x100), (2, 0xfc, 8, 0x100), (2, 0, 4, 0), (2, 0, 4, 0x104)]
        {
            let mut strides = strides;
            strides[1] = stride;
            fields[0] = abi::ObjectField { cache, offset, size, reserved: 0 };
            assert_eq!(
                m.set_shared_fields(&strides, &fields),
                Err(BadObjectMap),
                "{cache} {offset} {size} {stride:#x}"
            );
        }
    }

    #[test]
    fn a_page_typed_as_a_page_table_is_named() {
        let mut m = map();
        // 6.1's encoding: PG_table cleared under PAGE_TYPE_BASE.
        m.set_table_type(48, 0xf000_0200, 0xf000_0000).unwrap();
        let mut mem = memory(&[(0x10, 0, CRED_JAR), (0x11, 0, KMALLOC)]);
        mem.insert(ARRAY_GPA + 0x40 * 64 + 48, 0xffff_fdff); // a table
        mem.insert(ARRAY_GPA + 0x41 * 64 + 48, 0xffff_ff7f); // a free (buddy) page
        mem.insert(ARRAY_GPA + 0x42 * 64 + 48, 0x0000_0003); // mapped four times
        mem.insert(ARRAY_GPA + 0x10 * 64 + 48, 0xffff_ffff); // a slab's
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(m.object_at(0x40_000, read), Ok(Some(PAGE_TABLE)));
        assert_eq!(m.object_at(0x41_000, read), Ok(None));
        assert_eq!(m.object_at(0x42_000, read), Ok(None));
        assert_eq!(m.object_at(0x10_000, read), Ok(Some("cred")));
        // 6.12's: the top byte.
        m.set_table_type(48, 0xff00_0000, 0xf200_0000).unwrap();
        mem.insert(ARRAY_GPA + 0x40 * 64 + 48, 0xf200_0000);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(m.object_at(0x40_000, read), Ok(Some(PAGE_TABLE)));
        assert_eq!(m.object_at(0x41_000, read), Ok(None));
        // A description that cannot hold: refused; none given: unknown.
        for (offset, mask, value) in [(50, 0xff00_0000, 0xf200_0000), (60, 1, 1), (48, 0xff00_0000, 0xf2)] {
            assert_eq!(m.set_table_type(offset, mask, value), Err(BadObjectMap), "{offset} {mask:#x} {value:#x}");
        }
        m.set_table_type(0, 0, 0).unwrap();
        assert_eq!(m.object_at(0x40_000, read), Ok(None));
    }

    #[test]
    fn what_cannot_be_read_is_refused() {
        let m = map();
        // Frames 0x80..0xc0 have their struct pages on the unmapped page.
        assert_eq!(m.object_at(0x90_000, |_| Some(0)), Err(BadObjectMap));
        // Beyond the array.
        assert_eq!(m.object_at(64 << 20, |_| Some(0)), Err(BadObjectMap));
        // An unreadable struct page.
        assert_eq!(m.object_at(0x10_000, |_| None), Err(BadObjectMap));
        // A head pointer outside the array, or not at a struct page.
        let mem = memory(&[(0x12, 0xffff_8880_0000_0001, 0), (0x13, VMEMMAP + 8 + 1, 0)]);
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(m.object_at(0x12_000, read), Err(BadObjectMap));
        assert_eq!(m.object_at(0x13_000, read), Err(BadObjectMap));
        assert_eq!(m.backing_pages().count(), 63);
    }

    #[test]
    fn the_agents_description_is_checked() {
        let none = [0; abi::PROTECTED_CACHES];
        assert_eq!(ObjectMap::from_wire(0, 64, 24, &none), Ok(None));
        for (vmemmap, size, offset) in [
            (0x1000, 64, 24),
            (VMEMMAP + 8, 64, 24),
            (VMEMMAP, 12, 8),
            (VMEMMAP, 64, 64),
            (VMEMMAP, 64, 0),
            (VMEMMAP, 64, 20),
        ] {
            assert_eq!(
                ObjectMap::from_wire(vmemmap, size, offset, &none),
                Err(BadObjectMap),
                "{vmemmap:#x} {size} {offset}"
            );
        }
        let mut user = none;
        user[3] = 0x4000;
        assert_eq!(ObjectMap::from_wire(VMEMMAP, 64, 24, &user), Err(BadObjectMap));
        let mut slots = none;
        (slots[0], slots[7], slots[8]) = (CRED_JAR, TASKS, KMALLOC);
        let got = ObjectMap::from_wire(VMEMMAP, 64, 24, &slots).unwrap().unwrap();
        assert_eq!(got.caches, vec![(CRED_JAR, "cred"), (TASKS, "mm"), (KMALLOC, "kmem-cache")]);
    }
}
