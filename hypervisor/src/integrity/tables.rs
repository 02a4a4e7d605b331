//! The guest's page tables, which no module may write: the kernel's
//! (below its top-level table's kernel half, shared by every process) and
//! every process's, found through x86's `pgd_list`.
//!
//! EPT judges the guest-physical page, but the page tables decide which
//! linear address reaches it. A module that edited one would point a kernel
//! address at other code, or map a credential writable into a user process,
//! which runs in the kernel view. So the hypervisor walks the tables and
//! classifies every level; the walk is pure over a reader of guest-physical
//! tables, bounded, and takes nothing the guest says on trust but where the
//! tables are (a table outside guest RAM is none).

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::layout::is_kernel_address;
use super::objects::ObjectMap;

/// Most page-table pages one walk follows (Linux has some hundreds for
/// the kernel and a few dozen per process).
pub const MAX_TABLES: usize = 1 << 16;

/// Most processes' top-level tables read from `pgd_list`.
pub const MAX_PROCESSES: usize = 1 << 14;

/// The entries of a 4 KiB table.
pub type Table = [u64; 512];

/// Present entries that point to a table (not a large page).
const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// A top-level table to walk from, and its first entry to follow (256 for
/// a kernel half alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub table: u64,
    pub first: usize,
}

/// What a walk found: every table, sorted and without duplicates, and
/// whether that is all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Walk {
    pub tables: Vec<u64>,
    /// Every table was read and followed: false when one could not be read
    /// or the walk stopped at [`MAX_TABLES`]. Only a whole walk may show
    /// that a table is gone.
    pub whole: bool,
}

/// The roots and every table below them down to the page tables (PML4 →
/// PDPT → PD → PT). Tables `known` accepts are neither followed nor
/// returned (they were walked before); tables outside guest RAM (`in_ram`)
/// are no tables to protect.
pub fn walk(
    roots: &[Root],
    read: impl Fn(u64) -> Option<Table>,
    in_ram: impl Fn(u64) -> bool,
    known: impl Fn(u64) -> bool,
) -> Walk {
    let mut found = BTreeSet::new();
    let mut level: Vec<(u64, usize)> = Vec::new();
    for r in roots.iter().filter(|r| in_ram(r.table) && r.first < 512) {
        if found.insert(r.table) {
            level.push((r.table, r.first));
        }
    }
    let mut whole = true;
    // Three levels below the top: PDPTs, PDs, PTs.
    for depth in 0..3 {
        let mut next = Vec::new();
        for &(table, first) in &level {
            let Some(entries) = read(table) else {
                whole = false;
                continue;
            };
            for &e in &entries[first..] {
                let child = e & ADDRESS;
                if e & PRESENT == 0 || e & LARGE != 0 || !in_ram(child) || known(child) {
                    continue;
                }
                if found.len() >= MAX_TABLES {
                    return Walk { tables: found.into_iter().collect(), whole: false };
                }
                if found.insert(child) && depth < 2 {
                    next.push((child, 0));
                }
            }
        }
        level = next;
    }
    Walk { tables: found.into_iter().collect(), whole }
}

/// Pages of a task's kernel stack (`THREAD_SIZE`, 16 KiB on x86-64).
pub const STACK_PAGES: usize = 4;

/// A task's kernel stack as the kernel's tables map it: its linear address
/// (16 KiB-aligned) and the guest-physical page behind each of its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stack {
    pub va: u64,
    pub pages: [u64; STACK_PAGES],
}

impl Stack {
    /// Each page's linear and guest-physical address.
    pub fn pages(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.iter().enumerate().map(|(i, &gpa)| (self.va + 0x1000 * i as u64, gpa))
    }
}

/// Every task stack the kernel half of top-level table `root` maps. The
/// direct map reaches a stack's pages too, at other linear addresses; only
/// these tables say which physical pages are stacks. A stack is vmalloc'd:
/// four 4 KiB pages mapped at a 16 KiB-aligned address, with the page below
/// unmapped (vmalloc's guard page), and `is_stack` accepts it given its
/// address and first page (where the kernel's end-of-stack mark is). Also
/// says whether every table was read (only then may a stack be gone).
pub fn stacks(
    root: u64,
    read: impl Fn(u64) -> Option<Table>,
    in_ram: impl Fn(u64) -> bool,
    is_stack: impl Fn(u64, u64) -> bool,
) -> (Vec<Stack>, bool) {
    let mut runs = Runs { mapped_to: 0, start: 0, pages: [0; STACK_PAGES], len: 0, found: Vec::new() };
    let mut whole = true;
    let mut tables = 0;
    let mut open = |t: u64, whole: &mut bool| {
        tables += 1;
        let table = (tables <= MAX_TABLES && in_ram(t)).then(|| read(t)).flatten();
        *whole &= table.is_some();
        table
    };
    let Some(pml4) = open(root, &mut whole) else { return (Vec::new(), false) };
    for (i4, &e4) in pml4.iter().enumerate().skip(256) {
        let va4 = 0xffff_0000_0000_0000 | (i4 as u64) << 39;
        let Some(pdpt) = runs.descend(e4, va4, 1 << 39, &mut |t| open(t, &mut whole)) else { continue };
        for (i3, &e3) in pdpt.iter().enumerate() {
            let va3 = va4 | (i3 as u64) << 30;
            let Some(pd) = runs.descend(e3, va3, 1 << 30, &mut |t| open(t, &mut whole)) else { continue };
            for (i2, &e2) in pd.iter().enumerate() {
                let va2 = va3 | (i2 as u64) << 21;
                let Some(pt) = runs.descend(e2, va2, 1 << 21, &mut |t| open(t, &mut whole)) else { continue };
                for (i1, &e1) in pt.iter().enumerate() {
                    if e1 & PRESENT != 0 {
                        runs.page(va2 | (i1 as u64) << 12, e1 & ADDRESS, &is_stack);
                    }
                }
            }
        }
    }
    (runs.found, whole)
}

/// The walk's state in linear-address order: how far the mapped range
/// reaches, and the run of pages that may become a stack.
struct Runs {
    mapped_to: u64,
    start: u64,
    pages: [u64; STACK_PAGES],
    len: usize,
    found: Vec<Stack>,
}

impl Runs {
    /// The table entry `e` maps `size` bytes at `va`: the table below, if it
    /// points to one; a large page is mapped memory, but never a stack.
    fn descend(&mut self, e: u64, va: u64, size: u64, open: &mut impl FnMut(u64) -> Option<Table>) -> Option<Table> {
        if e & PRESENT == 0 {
            return None;
        }
        if e & LARGE != 0 && size < 1 << 39 {
            self.len = 0;
            self.mapped_to = va + size;
            return None;
        }
        open(e & ADDRESS)
    }

    /// A 4 KiB page mapped at `va`.
    fn page(&mut self, va: u64, gpa: u64, is_stack: &impl Fn(u64, u64) -> bool) {
        let below_mapped = self.mapped_to == va;
        self.mapped_to = va + 0x1000;
        if self.len > 0 && va == self.start + 0x1000 * self.len as u64 {
            self.pages[self.len] = gpa;
            self.len += 1;
            if self.len == STACK_PAGES {
                self.len = 0;
                if is_stack(self.start, self.pages[0]) {
                    self.found.push(Stack { va: self.start, pages: self.pages });
                }
            }
        } else if va.is_multiple_of(0x1000 * STACK_PAGES as u64) && !below_mapped {
            self.start = va;
            self.pages[0] = gpa;
            self.len = 1;
        } else {
            self.len = 0;
        }
    }
}

/// Where the processes' top-level tables are listed: x86's `pgd_list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessList {
    /// The list head (guest-virtual, in the kernel image's data).
    pub head: u64,
    /// Where a `struct page` holds the list link.
    pub link_offset: u64,
    /// Pages per top-level table: 2 with page-table isolation.
    pub pgd_pages: u64,
    /// Where a top-level table's `struct page` names its `mm_struct`
    /// (`pt_mm`), if the agent said.
    pub owner_offset: Option<u64>,
}

/// Why the agent's description of the list is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadProcessList;

impl ProcessList {
    /// From the layout's fields: `None` without a list (processes' tables
    /// are then not protected, and the caller says so). The list is linked
    /// through the `struct page` array, so it needs one.
    pub fn from_wire(
        head: u64,
        link_offset: u32,
        pgd_pages: u32,
        owner_offset: u32,
        objects: Option<&ObjectMap>,
    ) -> Result<Option<Self>, BadProcessList> {
        if head == 0 {
            return Ok(None);
        }
        let objects = objects.ok_or(BadProcessList)?;
        let sane = is_kernel_address(head)
            && head.is_multiple_of(8)
            && link_offset.is_multiple_of(8)
            && u64::from(link_offset) + 16 <= objects.page_struct_size
            && matches!(pgd_pages, 1 | 2)
            && owner_offset.is_multiple_of(8)
            && u64::from(owner_offset) + 8 <= objects.page_struct_size;
        if !sane {
            return Err(BadProcessList);
        }
        Ok(Some(ProcessList {
            head,
            link_offset: u64::from(link_offset),
            pgd_pages: u64::from(pgd_pages),
            owner_offset: (owner_offset != 0).then_some(u64::from(owner_offset)),
        }))
    }

    /// The guest-physical pages of every listed top-level table (each
    /// followed by its user copy with page-table isolation), starting from
    /// `first`, the head's `next`. Each link is a `struct page`'s, read at
    /// its place in the array (`read` takes a guest-physical address); the
    /// walk stops at the head, at a link that is no `struct page`, or at
    /// the bound. Whether it came back to the head says whether the list
    /// was read whole (a list changed under the walk on another CPU may
    /// not be).
    pub fn roots(&self, first: u64, objects: &ObjectMap, read: impl Fn(u64) -> Option<u64>) -> (Vec<u64>, bool) {
        let mut out = Vec::new();
        let mut node = first;
        let mut seen = BTreeSet::new();
        while node != self.head && out.len() < MAX_PROCESSES * 2 && seen.insert(node) {
            let Some(page) = node.checked_sub(self.link_offset) else { break };
            let (Some(frame), Some(at)) = (objects.frame_of(page), objects.struct_gpa_of(page)) else { break };
            let pgd = frame << 12;
            out.extend((0..self.pgd_pages).map(|i| pgd + i * 0x1000));
            let Some(next) = read(at + self.link_offset) else { break };
            node = next;
        }
        (out, node == self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;

    const RAM: u64 = 64 << 20;

    fn table(entries: &[(usize, u64)]) -> Table {
        let mut t = [0u64; 512];
        for &(i, e) in entries {
            t[i] = e;
        }
        t
    }

    fn reader(mem: &BTreeMap<u64, Table>) -> impl Fn(u64) -> Option<Table> + '_ {
        |at| Some(mem.get(&at).copied().unwrap_or([0; 512]))
    }

    #[test]
    fn every_level_below_the_roots_is_found_and_large_pages_end_the_walk() {
        let mut mem = BTreeMap::new();
        // PML4 0x1000: user entry 0 → PDPT 0x2000, kernel entry 511 → PDPT 0x3000.
        mem.insert(0x1000, table(&[(0, 0x2003), (511, 0x3003), (300, 0x0)]));
        // PDPT 0x3000: a 1 GiB page, a PD, a not-present entry.
        mem.insert(0x3000, table(&[(0, 0x4000_0083), (1, 0x4003), (2, 0x5002)]));
        // PD 0x4000: a 2 MiB page and a PT; an entry outside RAM.
        mem.insert(0x4000, table(&[(0, 0x20_0083), (1, 0x6003), (2, RAM | 3)]));
        // PT 0x6000: its entries are pages, never followed.
        mem.insert(0x6000, table(&[(0, 0x7003)]));
        let in_ram = |a: u64| a < RAM;
        let kernel = walk(&[Root { table: 0x1000, first: 256 }], reader(&mem), in_ram, |_| false);
        assert_eq!(kernel, Walk { tables: vec![0x1000, 0x3000, 0x4000, 0x6000], whole: true });
        let all = walk(&[Root { table: 0x1000, first: 0 }], reader(&mem), in_ram, |_| false);
        assert_eq!(all, Walk { tables: vec![0x1000, 0x2000, 0x3000, 0x4000, 0x6000], whole: true });
        // A PDPT that cannot be read: found, and the walk is not whole.
        let unreadable = |at: u64| (at != 0x3000).then(|| reader(&mem)(at)).flatten();
        let part = walk(&[Root { table: 0x1000, first: 0 }], unreadable, in_ram, |_| false);
        assert_eq!(part, Walk { tables: vec![0x1000, 0x2000, 0x3000], whole: false });
        // Known tables are neither followed nor returned.
        let process = walk(&[Root { table: 0x1000, first: 0 }], reader(&mem), in_ram, |t| t == 0x3000);
        assert_eq!(process.tables, vec![0x1000, 0x2000]);
    }

    #[test]
    fn a_hostile_hierarchy_is_bounded() {
        // Every entry of every table points at the next page: a walk that
        // followed everything would visit far more than the bound.
        let read = |at: u64| Some(core::array::from_fn(|i| ((at + 0x1000 * (i as u64 + 1)) % RAM) | 3));
        let found = walk(&[Root { table: 0, first: 0 }], read, |a| a < RAM, |_| false);
        assert!(found.tables.len() <= MAX_TABLES + 1);
        // Every entry a table of its own: 512 PDPTs, 262,144 PDs.
        let fan_out = |at: u64| Some(core::array::from_fn(|i| (at * 512 + 0x1000 * (i as u64 + 1)) | 3));
        let cut = walk(&[Root { table: 0, first: 0 }], fan_out, |_| true, |_| false);
        assert_eq!(cut.tables.len(), MAX_TABLES);
        assert!(!cut.whole, "a walk cut at the bound shows no table gone");
        // A table that points at itself is found once.
        let looped = walk(&[Root { table: 0x1000, first: 0 }], |_| Some([0x1003; 512]), |a| a < RAM, |_| false);
        assert_eq!(looped, Walk { tables: vec![0x1000], whole: true });
    }

    const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
    const HEAD: u64 = 0xffff_ffff_8300_0040;
    const ARRAY_GPA: u64 = 0x70_0000;

    fn objects() -> ObjectMap {
        let mut m =
            ObjectMap::from_wire(VMEMMAP, 64, 24, &[0; guest_agent::integrity::PROTECTED_CACHES]).unwrap().unwrap();
        m.set_backing((0..256).map(|i| ARRAY_GPA + i * 0x1000).collect());
        m
    }

    #[test]
    fn the_list_gives_each_process_table_and_its_user_copy() {
        let o = objects();
        let list = ProcessList::from_wire(HEAD, 8, 2, 32, Some(&o)).unwrap().unwrap();
        let link = |frame: u64| VMEMMAP + frame * 64 + 8;
        // head → frame 0x100 → frame 0x240 → head.
        let mut mem = BTreeMap::new();
        mem.insert(ARRAY_GPA + 0x100 * 64 + 8, link(0x240));
        mem.insert(ARRAY_GPA + 0x240 * 64 + 8, HEAD);
        let read = |a: u64| mem.get(&a).copied();
        assert_eq!(list.roots(link(0x100), &o, read), (vec![0x10_0000, 0x10_1000, 0x24_0000, 0x24_1000], true));
        // An empty list.
        assert_eq!(list.roots(HEAD, &o, read), (vec![], true));
        // A link that is no struct page, or a cycle, ends the walk: not whole.
        assert_eq!(list.roots(VMEMMAP + 3, &o, read), (vec![], false));
        let mut cyc = BTreeMap::new();
        cyc.insert(ARRAY_GPA + 0x100 * 64 + 8, link(0x100));
        assert_eq!(list.roots(link(0x100), &o, |a| cyc.get(&a).copied()), (vec![0x10_0000, 0x10_1000], false));
    }

    #[test]
    fn the_agents_description_is_checked() {
        let o = objects();
        assert_eq!(ProcessList::from_wire(0, 8, 2, 32, None), Ok(None));
        assert_eq!(ProcessList::from_wire(HEAD, 8, 2, 32, None), Err(BadProcessList));
        for (head, link, pages, owner) in [
            (0x4000, 8, 2, 32),
            (HEAD + 4, 8, 2, 32),
            (HEAD, 12, 2, 32),
            (HEAD, 56, 2, 32),
            (HEAD, 8, 3, 32),
            (HEAD, 8, 2, 36),
            (HEAD, 8, 2, 64),
        ] {
            let got = ProcessList::from_wire(head, link, pages, owner, Some(&o));
            assert_eq!(got, Err(BadProcessList), "{head:#x} {link} {pages} {owner}");
        }
        let list = ProcessList::from_wire(HEAD, 48, 1, 0, Some(&o)).unwrap().unwrap();
        assert_eq!(list.owner_offset, None, "not given");
    }
    #[test]
    fn stacks_are_four_pages_at_16k_above_a_hole_with_the_mark() {
        const K: u64 = 0xffff_c900_0000_0000; // PML4 entry 402.
        let mut mem = BTreeMap::new();
        mem.insert(0x1000, table(&[(402, 0x2003), (300, 0x2_0083)]));
        mem.insert(0x2000, table(&[(0, 0x3003)]));
        // PD 0x3000: PT 0x4000 for 0..2 MiB, PT 0x5000 for 2..4 MiB.
        mem.insert(0x3000, table(&[(0, 0x4003), (1, 0x5003)]));
        let page = |gpa: u64| gpa | 3;
        mem.insert(
            0x4000,
            table(&[
                // A stack at 16 KiB (4 pages), the guard below it unmapped.
                (4, page(0x10_0000)),
                (5, page(0x20_0000)),
                (6, page(0x30_0000)),
                (7, page(0x40_0000)),
                // Four pages at 48 KiB, but the page below (44 KiB) mapped.
                (11, page(0x50_0000)),
                (12, page(0x51_0000)),
                (13, page(0x52_0000)),
                (14, page(0x53_0000)),
                (15, page(0x54_0000)),
                // Three pages at 128 KiB: too short.
                (32, page(0x60_0000)),
                (33, page(0x61_0000)),
                (34, page(0x62_0000)),
                // A stack whose mark is gone.
                (64, page(0x70_0000)),
                (65, page(0x71_0000)),
                (66, page(0x72_0000)),
                (67, page(0x73_0000)),
                // A stack in the table's last four entries.
                (508, page(0x80_0000)),
                (509, page(0x81_0000)),
                (510, page(0x82_0000)),
                (511, page(0x83_0000)),
            ]),
        );
        mem.insert(
            0x5000,
            table(&[
                (0, page(0x90_0000)),
                (4, page(0xa0_0000)),
                (5, page(0xa1_0000)),
                (6, page(0xa2_0000)),
                (7, page(0xa3_0000)),
            ]),
        );
        let marked = |_va: u64, gpa: u64| gpa != 0x70_0000;
        let (found, whole) = stacks(0x1000, reader(&mem), |a| a < RAM, marked);
        assert!(whole);
        let vas: Vec<u64> = found.iter().map(|s| s.va - K).collect();
        assert_eq!(vas, vec![0x4000, 0x1f_c000, 0x20_4000]);
        assert_eq!(found[0].pages, [0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000]);
        // In the next table: 2 MiB is mapped right above the last stack, so
        // only the run at 2 MiB + 16 KiB, above a hole, is one.
        assert_eq!(found[2].pages, [0xa0_0000, 0xa1_0000, 0xa2_0000, 0xa3_0000]);
        // An unreadable table: what was read, and not whole.
        let partial = |at: u64| (at != 0x5000).then(|| reader(&mem)(at)).flatten();
        let (found, whole) = stacks(0x1000, partial, |a| a < RAM, marked);
        assert!(!whole);
        assert_eq!(found.len(), 2);
        // The user half is never walked; a root outside RAM is no walk.
        assert_eq!(stacks(RAM, reader(&mem), |a| a < RAM, marked), (vec![], false));
    }

    #[test]
    fn a_stack_right_above_a_mapped_page_of_the_previous_table_is_none() {
        let mut mem = BTreeMap::new();
        mem.insert(0x1000, table(&[(402, 0x2003)]));
        mem.insert(0x2000, table(&[(0, 0x3003)]));
        mem.insert(0x3000, table(&[(0, 0x4003), (1, 0x5003)]));
        mem.insert(0x4000, table(&[(511, 0x9003)]));
        mem.insert(0x5000, table(&[(0, 0x10_0003), (1, 0x11_0003), (2, 0x12_0003), (3, 0x13_0003)]));
        assert_eq!(stacks(0x1000, reader(&mem), |a| a < RAM, |_, _| true), (vec![], true));
        mem.insert(0x4000, table(&[]));
        assert_eq!(stacks(0x1000, reader(&mem), |a| a < RAM, |_, _| true).0.len(), 1);
    }
}
