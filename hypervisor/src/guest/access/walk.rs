//! Guest-linear to guest-physical translation through the guest's own page
//! tables: the private walker of the guest-access service.
//!
//! Every table entry is read through [`GuestMemory::read`], so a table the
//! guest placed outside its RAM is an error, never a host access. The walk
//! reports what the guest's tables allow (user, write, execute, each the
//! conjunction over all levels) and where the entries are, so that the
//! service can check rights and set the accessed and dirty bits as the
//! processor would.

use core::fmt;

use crate::guest::memory::{GuestMemory, HostPhys};
use crate::vcpu::{Field, VcpuState};

pub(super) const CR0_PG: u64 = 1 << 31;
pub(super) const CR0_WP: u64 = 1 << 16;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
pub(super) const CR4_SMEP: u64 = 1 << 20;
pub(super) const CR4_SMAP: u64 = 1 << 21;
const EFER_LMA: u64 = 1 << 10;
pub(super) const EFER_NXE: u64 = 1 << 11;

pub(super) const PRESENT: u64 = 1 << 0;
pub(super) const WRITABLE: u64 = 1 << 1;
pub(super) const USER: u64 = 1 << 2;
pub(super) const ACCESSED: u64 = 1 << 5;
pub(super) const DIRTY: u64 = 1 << 6;
const PAGE_SIZE_BIT: u64 = 1 << 7;
pub(super) const XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
pub(super) const PAGE_SIZE: u64 = 0x1000;

/// The guest's paging controls, as the VMCS holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    pub fn from_vcpu(vcpu: &dyn VcpuState) -> Self {
        Paging {
            cr0: vcpu.read(Field::Cr0),
            cr3: vcpu.read(Field::Cr3),
            cr4: vcpu.read(Field::Cr4),
            efer: vcpu.read(Field::Efer),
        }
    }

    /// 4-level paging (IA-32e mode with CR4.LA57 clear).
    pub const fn four_level(cr3: u64) -> Self {
        Paging { cr0: CR0_PG | 1, cr3, cr4: CR4_PAE, efer: EFER_LMA | (1 << 8) | EFER_NXE }
    }
}

/// Why a guest-linear address has no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Bits 63:47 are not a sign extension of bit 47.
    NotCanonical { linear: u64 },
    /// The entry at `level` (4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE) has P = 0.
    NotPresent { linear: u64, level: u8 },
    /// The entry at `level` has a reserved bit set.
    Reserved { linear: u64, level: u8, entry: u64 },
    /// A paging structure or the byte itself lies outside guest RAM.
    OutsideRam { linear: u64, gpa: u64 },
    /// A paging mode this walker does not implement.
    UnsupportedMode(&'static str),
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LEVEL: [&str; 5] = ["", "PTE", "PDE", "PDPTE", "PML4E"];
        let name = |level: u8| LEVEL.get(usize::from(level)).copied().unwrap_or("entry");
        match *self {
            WalkError::NotCanonical { linear } => {
                write!(f, "guest-linear {linear:#x} is not canonical")
            }
            WalkError::NotPresent { linear, level } => {
                write!(f, "guest-linear {linear:#x} is not mapped ({} not present)", name(level))
            }
            WalkError::Reserved { linear, level, entry } => {
                write!(f, "guest-linear {linear:#x}: reserved bits set in {} {entry:#x}", name(level))
            }
            WalkError::OutsideRam { linear, gpa } => {
                write!(f, "guest-linear {linear:#x} leads to guest-physical {gpa:#x}, outside guest RAM")
            }
            WalkError::UnsupportedMode(mode) => write!(f, "{mode} is not supported"),
        }
    }
}

/// Reserved bits of a large-page entry, between the PAT bit (12) and the
/// page's base address.
const fn large_page_reserved(level: u8) -> u64 {
    match level {
        3 => 0x3fff_e000, // 1 GiB: bits 29:13
        _ => 0x001f_e000, // 2 MiB: bits 20:13
    }
}

/// One translation: where the byte is, what the guest's tables allow for
/// it, and the entries walked (for the accessed and dirty bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    pub gpa: u64,
    /// U/S set at every level.
    pub user: bool,
    /// R/W set at every level.
    pub writable: bool,
    /// XD clear at every level (always, with EFER.NXE clear).
    pub executable: bool,
    /// (guest-physical address, value) of each entry, PML4E first; `levels`
    /// of them are valid. None without paging.
    pub entries: [(u64, u64); 4],
    pub levels: usize,
}

impl Walk {
    fn unpaged(gpa: u64) -> Self {
        Walk { gpa, user: true, writable: true, executable: true, entries: [(0, 0); 4], levels: 0 }
    }
}

/// Translates a guest-linear address.
pub fn translate(memory: &GuestMemory, phys: &impl HostPhys, paging: &Paging, linear: u64) -> Result<u64, WalkError> {
    walk(memory, phys, paging, linear).map(|w| w.gpa)
}

/// Walks the guest's tables for a guest-linear address.
pub fn walk(memory: &GuestMemory, phys: &impl HostPhys, paging: &Paging, linear: u64) -> Result<Walk, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        // No paging: linear addresses are 32-bit physical addresses.
        return Ok(Walk::unpaged(linear & 0xffff_ffff));
    }
    if paging.efer & EFER_LMA == 0 || paging.cr4 & CR4_PAE == 0 {
        return Err(WalkError::UnsupportedMode(if paging.cr4 & CR4_PAE == 0 {
            "32-bit paging"
        } else {
            "PAE paging outside long mode"
        }));
    }
    if paging.cr4 & CR4_LA57 != 0 {
        return Err(WalkError::UnsupportedMode("5-level paging"));
    }
    if !crate::vcpu::is_canonical(linear) {
        return Err(WalkError::NotCanonical { linear });
    }
    let nx = paging.efer & EFER_NXE != 0;
    let reserved_xd = if nx { 0 } else { XD };
    let mut out = Walk { gpa: 0, user: true, writable: true, executable: true, entries: [(0, 0); 4], levels: 0 };
    let mut table = paging.cr3 & ADDR_MASK;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (linear >> shift) & 0x1ff;
        let entry_gpa = table | (index * 8);
        let mut raw = [0u8; 8];
        memory.read(phys, entry_gpa, &mut raw).map_err(|_| WalkError::OutsideRam { linear, gpa: entry_gpa })?;
        let entry = u64::from_le_bytes(raw);
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { linear, level });
        }
        let reserved = |entry: u64| WalkError::Reserved { linear, level, entry };
        if entry & reserved_xd != 0 {
            return Err(reserved(entry));
        }
        out.entries[out.levels] = (entry_gpa, entry);
        out.levels += 1;
        out.user &= entry & USER != 0;
        out.writable &= entry & WRITABLE != 0;
        out.executable &= !nx || entry & XD == 0;
        let large = entry & PAGE_SIZE_BIT != 0;
        if large && level == 4 {
            return Err(reserved(entry));
        }
        if large && level > 1 {
            if entry & large_page_reserved(level) != 0 {
                return Err(reserved(entry));
            }
            let page_mask = (1u64 << shift) - 1;
            out.gpa = (entry & ADDR_MASK & !page_mask) | (linear & page_mask);
            return Ok(out);
        }
        table = entry & ADDR_MASK;
    }
    out.gpa = table | (linear & (PAGE_SIZE - 1));
    Ok(out)
}

#[cfg(test)]
pub mod testing {
    //! A guest with RAM and 4-level page tables built in it, for host tests.
    use super::*;
    use crate::guest::memory::fake::FakePhys;
    use crate::mm::frames::Region;

    pub const RAM: u64 = 0x40_0000; // 4 MiB of guest RAM at guest-physical 0
    pub const HOST_BASE: u64 = 0x1000_0000;
    pub const PML4: u64 = 0x1000;

    pub struct TestGuest {
        pub memory: GuestMemory,
        pub phys: FakePhys,
        next_table: u64,
    }

    impl Default for TestGuest {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestGuest {
        /// RAM at 0..4 MiB, an empty PML4 at 0x1000, tables from 0x2000 on.
        pub fn new() -> Self {
            let mut memory = GuestMemory::new();
            memory.add(Region::new(0, RAM), HOST_BASE).unwrap();
            TestGuest { memory, phys: FakePhys::new(HOST_BASE, RAM as usize), next_table: 0x2000 }
        }

        pub fn paging(&self) -> Paging {
            Paging::four_level(PML4)
        }

        pub fn write(&self, gpa: u64, data: &[u8]) {
            self.memory.write(&self.phys, gpa, data).unwrap();
        }

        pub fn read_u64(&self, gpa: u64) -> u64 {
            let mut b = [0; 8];
            self.memory.read(&self.phys, gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        }

        pub fn set_entry(&self, table: u64, index: u64, entry: u64) {
            self.write(table + index * 8, &entry.to_le_bytes());
        }

        /// The table the entry at `index` of `table` points to, creating it.
        fn next(&mut self, table: u64, index: u64) -> u64 {
            let e = self.read_u64(table + index * 8);
            if e & PRESENT != 0 {
                return e & ADDR_MASK;
            }
            let t = self.next_table;
            self.next_table += 0x1000;
            self.set_entry(table, index, t | 0x7);
            t
        }

        /// Maps one page of `size` (4 KiB, 2 MiB or 1 GiB) at `linear` to
        /// `gpa`, present, writable and user.
        pub fn map(&mut self, linear: u64, gpa: u64, size: u64) {
            self.map_with(linear, gpa, size, 0x7);
        }

        /// As [`Self::map`], with the leaf's flags (P, R/W, U/S, XD...) given.
        pub fn map_with(&mut self, linear: u64, gpa: u64, size: u64, flags: u64) {
            let idx = |level: u32| (linear >> (12 + 9 * (level - 1))) & 0x1ff;
            let pdpt = self.next(PML4, idx(4));
            if size == 1 << 30 {
                self.set_entry(pdpt, idx(3), gpa | flags | 0x80);
                return;
            }
            let pd = self.next(pdpt, idx(3));
            if size == 2 << 20 {
                self.set_entry(pd, idx(2), gpa | flags | 0x80);
                return;
            }
            let pt = self.next(pd, idx(2));
            self.set_entry(pt, idx(1), gpa | flags);
        }

        /// The address of the entry that maps `linear` at `level`.
        pub fn entry_address(&self, linear: u64, level: u32) -> u64 {
            let mut table = PML4;
            for l in (level + 1..=4).rev() {
                let i = (linear >> (12 + 9 * (l - 1))) & 0x1ff;
                table = self.read_u64(table + i * 8) & ADDR_MASK;
            }
            table + ((linear >> (12 + 9 * (level - 1))) & 0x1ff) * 8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn translates_4k_2m_and_1g_pages() {
        let mut g = TestGuest::new();
        g.map(0xffff_8000_0000_1000, 0x20_3000, 0x1000);
        g.map(0xffff_8000_4020_0000, 0x20_0000, 2 << 20);
        g.map(0x0000_7f00_8000_0000, 0, 1 << 30);
        let p = g.paging();
        let cases = [
            (0xffff_8000_0000_1234u64, 0x20_3234u64),
            (0xffff_8000_0000_1fff, 0x20_3fff),
            (0xffff_8000_4020_0000, 0x20_0000),
            (0xffff_8000_403f_fffe, 0x3f_fffe),
            (0x0000_7f00_8000_0000, 0),
            (0x0000_7f00_8012_3456, 0x12_3456),
            (0x0000_7f00_bfff_ffff, 0x3fff_ffff),
        ];
        for (linear, gpa) in cases {
            assert_eq!(translate(&g.memory, &g.phys, &p, linear), Ok(gpa), "{linear:#x}");
        }
    }

    #[test]
    fn not_present_at_each_level() {
        let mut g = TestGuest::new();
        let p = g.paging();
        let va = 0xffff_8000_0000_5000u64;
        assert_eq!(translate(&g.memory, &g.phys, &p, va), Err(WalkError::NotPresent { linear: va, level: 4 }));
        g.map(va, 0x5000, 0x1000);
        assert_eq!(translate(&g.memory, &g.phys, &p, va), Ok(0x5000));
        for level in 1..=4u32 {
            let mut g = TestGuest::new();
            g.map(va, 0x5000, 0x1000);
            let at = g.entry_address(va, level);
            let e = g.read_u64(at);
            g.write(at, &(e & !1).to_le_bytes());
            assert_eq!(
                translate(&g.memory, &g.phys, &p, va),
                Err(WalkError::NotPresent { linear: va, level: level as u8 }),
                "level {level}"
            );
        }
    }

    #[test]
    fn reserved_bits_are_reported() {
        let va = 0x4000_0000u64;
        let p = Paging::four_level(PML4);
        // PS in a PML4E.
        let mut g = TestGuest::new();
        g.map(va, 0x5000, 0x1000);
        let at = g.entry_address(va, 4);
        let e = g.read_u64(at) | 0x80;
        g.write(at, &e.to_le_bytes());
        assert_eq!(translate(&g.memory, &g.phys, &p, va), Err(WalkError::Reserved { linear: va, level: 4, entry: e }));
        // A misaligned 2 MiB page (bit 13 set).
        let mut g = TestGuest::new();
        g.map(va, 0x20_0000 | 0x2000, 2 << 20);
        assert!(matches!(translate(&g.memory, &g.phys, &p, va), Err(WalkError::Reserved { level: 2, .. })));
        // A misaligned 1 GiB page (bit 21 set).
        let mut g = TestGuest::new();
        g.map(va, 0x20_0000, 1 << 30);
        assert!(matches!(translate(&g.memory, &g.phys, &p, va), Err(WalkError::Reserved { level: 3, .. })));
        // XD with EFER.NXE clear is reserved; with it set it is not.
        let mut g = TestGuest::new();
        g.map(va, 0x5000, 0x1000);
        let at = g.entry_address(va, 1);
        g.write(at, &(g.read_u64(at) | XD).to_le_bytes());
        assert_eq!(translate(&g.memory, &g.phys, &p, va), Ok(0x5000));
        let no_nx = Paging { efer: p.efer & !EFER_NXE, ..p };
        assert!(matches!(translate(&g.memory, &g.phys, &no_nx, va), Err(WalkError::Reserved { level: 1, .. })));
    }

    #[test]
    fn tables_outside_guest_ram_are_not_followed() {
        let va = 0x4000_0000u64;
        let p = Paging::four_level(PML4);
        // CR3 itself outside RAM.
        let g = TestGuest::new();
        let far = Paging::four_level(0x8000_0000);
        assert_eq!(
            translate(&g.memory, &g.phys, &far, va),
            Err(WalkError::OutsideRam {
                linear: va,
                gpa: 0x8000_0000 // PML4 entry 0
            })
        );
        // A PDE pointing to a page table far beyond RAM (and beyond any host buffer).
        let mut g = TestGuest::new();
        g.map(va, 0x5000, 0x1000);
        let at = g.entry_address(va, 2);
        g.write(at, &(0x000f_ffff_ffff_f000u64 | 7).to_le_bytes());
        assert_eq!(
            translate(&g.memory, &g.phys, &p, va),
            Err(WalkError::OutsideRam { linear: va, gpa: 0x000f_ffff_ffff_f000 })
        );
    }

    #[test]
    fn paging_modes() {
        let g = TestGuest::new();
        let unpaged = Paging { cr0: 1, ..Paging::default() };
        assert_eq!(translate(&g.memory, &g.phys, &unpaged, 0x1_0000_1234), Ok(0x1234));
        let base = Paging::four_level(PML4);
        let modes = [
            (Paging { cr4: 0, efer: 0, ..base }, "32-bit paging"),
            (Paging { efer: 0, ..base }, "PAE paging outside long mode"),
            (Paging { cr4: base.cr4 | CR4_LA57, ..base }, "5-level paging"),
        ];
        for (p, name) in modes {
            assert_eq!(translate(&g.memory, &g.phys, &p, 0x1000), Err(WalkError::UnsupportedMode(name)));
        }
        assert_eq!(
            translate(&g.memory, &g.phys, &base, 0x0000_8000_0000_0000),
            Err(WalkError::NotCanonical { linear: 0x0000_8000_0000_0000 })
        );
    }

    #[test]
    fn errors_read_well() {
        let e = WalkError::NotPresent { linear: 0x1000, level: 2 };
        assert_eq!(alloc::format!("{e}"), "guest-linear 0x1000 is not mapped (PDE not present)");
        let e = WalkError::OutsideRam { linear: 0x1000, gpa: 0x8000_0000 };
        assert_eq!(alloc::format!("{e}"), "guest-linear 0x1000 leads to guest-physical 0x80000000, outside guest RAM");
    }
}
