//! Guest-linear to guest-physical translation through the guest's own page
//! tables, and instruction fetch at a guest RIP.
//!
//! Every table entry is read through [`GuestMemory::read`], so a table the
//! guest placed outside its RAM is an error, never a host access. The walk
//! only translates: it neither checks access rights (the processor already
//! did, for the access that exited) nor sets accessed/dirty bits.

use core::fmt;

use crate::guest::memory::{GuestMemory, HostPhys};
use crate::vcpu::{Field, VcpuState};

/// The longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

const PAGE_SIZE: u64 = 0x1000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

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

/// Translates a guest-linear address.
pub fn translate(memory: &GuestMemory, phys: &impl HostPhys, paging: &Paging, linear: u64) -> Result<u64, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        // No paging: linear addresses are 32-bit physical addresses.
        return Ok(linear & 0xffff_ffff);
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
    let reserved_xd = if paging.efer & EFER_NXE == 0 { XD } else { 0 };
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
        let large = entry & PAGE_SIZE_BIT != 0;
        if large && level == 4 {
            return Err(reserved(entry));
        }
        if large && level > 1 {
            if entry & large_page_reserved(level) != 0 {
                return Err(reserved(entry));
            }
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Ok(table | (linear & (PAGE_SIZE - 1)))
}

/// Fetches up to [`MAX_INSTRUCTION_LEN`] bytes at guest-linear `rip`,
/// translating each page separately. Returns how many bytes were fetched:
/// fewer when the next page is not mapped or not guest RAM (the
/// instruction may end before it). Fails only if the first byte cannot be
/// fetched.
pub fn fetch_instruction(
    memory: &GuestMemory,
    phys: &impl HostPhys,
    paging: &Paging,
    rip: u64,
    buf: &mut [u8; MAX_INSTRUCTION_LEN],
) -> Result<usize, WalkError> {
    let mut got = 0usize;
    while got < MAX_INSTRUCTION_LEN {
        let linear = rip.wrapping_add(got as u64);
        let step = match fetch_run(memory, phys, paging, linear, &mut buf[got..]) {
            Ok(n) => n,
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
        };
        got += step;
    }
    Ok(got)
}

/// Reads as many bytes at `linear` as fit in `out` without leaving its page
/// or its piece of guest RAM (at least one).
fn fetch_run(
    memory: &GuestMemory,
    phys: &impl HostPhys,
    paging: &Paging,
    linear: u64,
    out: &mut [u8],
) -> Result<usize, WalkError> {
    let gpa = translate(memory, phys, paging, linear)?;
    let outside = WalkError::OutsideRam { linear, gpa };
    let (_, contiguous) = memory.translate(gpa).ok_or(outside)?;
    let page_left = PAGE_SIZE - (linear & (PAGE_SIZE - 1));
    let n = (out.len() as u64).min(page_left).min(contiguous) as usize;
    let dst = out.get_mut(..n).ok_or(outside)?;
    memory.read(phys, gpa, dst).map_err(|_| outside)?;
    Ok(n)
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

        /// Maps one page of `size` (4 KiB, 2 MiB or 1 GiB) at `linear` to `gpa`.
        pub fn map(&mut self, linear: u64, gpa: u64, size: u64) {
            let idx = |level: u32| (linear >> (12 + 9 * (level - 1))) & 0x1ff;
            let pdpt = self.next(PML4, idx(4));
            if size == 1 << 30 {
                self.set_entry(pdpt, idx(3), gpa | 0x87);
                return;
            }
            let pd = self.next(pdpt, idx(3));
            if size == 2 << 20 {
                self.set_entry(pd, idx(2), gpa | 0x87);
                return;
            }
            let pt = self.next(pd, idx(2));
            self.set_entry(pt, idx(1), gpa | 0x7);
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

    const CODE: u64 = 0x30_0000;

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
    fn fetch_crosses_a_page_boundary_through_separate_translations() {
        let mut g = TestGuest::new();
        // Two linear pages that are far apart physically, in reverse order.
        let va = 0xffff_ffff_8000_0000u64;
        g.map(va, CODE + 0x5000, 0x1000);
        g.map(va + 0x1000, CODE, 0x1000);
        let code: [u8; 15] = core::array::from_fn(|i| 0xa0 + i as u8);
        g.write(CODE + 0x5000 + 0xff9, &code[..7]);
        g.write(CODE, &code[7..]);
        let mut buf = [0; 15];
        let n = fetch_instruction(&g.memory, &g.phys, &g.paging(), va + 0xff9, &mut buf).unwrap();
        assert_eq!(n, 15);
        assert_eq!(buf, code);
    }

    #[test]
    fn fetch_stops_at_the_end_of_mapped_memory() {
        let mut g = TestGuest::new();
        let va = 0x7000_0000u64;
        g.map(va, CODE, 0x1000);
        g.write(CODE + 0xffc, &[1, 2, 3, 4]);
        let mut buf = [0; 15];
        // The next page is not mapped: 4 bytes.
        assert_eq!(fetch_instruction(&g.memory, &g.phys, &g.paging(), va + 0xffc, &mut buf), Ok(4));
        assert_eq!(&buf[..4], &[1, 2, 3, 4]);
        // The next page maps outside guest RAM: still 4 bytes.
        g.map(va + 0x1000, 0x8000_0000, 0x1000);
        assert_eq!(fetch_instruction(&g.memory, &g.phys, &g.paging(), va + 0xffc, &mut buf), Ok(4));
        // The first byte unmapped or outside RAM: an error.
        assert_eq!(
            fetch_instruction(&g.memory, &g.phys, &g.paging(), va + 0x1000, &mut buf),
            Err(WalkError::OutsideRam { linear: va + 0x1000, gpa: 0x8000_0000 })
        );
        assert_eq!(
            fetch_instruction(&g.memory, &g.phys, &g.paging(), va + 0x2000, &mut buf),
            Err(WalkError::NotPresent { linear: va + 0x2000, level: 1 })
        );
        // RAM that ends inside the fetch window (unpaged: linear = physical).
        let unpaged = Paging { cr0: 1, ..Paging::default() };
        g.write(RAM - 3, &[7, 8, 9]);
        assert_eq!(fetch_instruction(&g.memory, &g.phys, &unpaged, RAM - 3, &mut buf), Ok(3));
        assert_eq!(&buf[..3], &[7, 8, 9]);
    }

    #[test]
    fn errors_read_well() {
        let e = WalkError::NotPresent { linear: 0x1000, level: 2 };
        assert_eq!(alloc::format!("{e}"), "guest-linear 0x1000 is not mapped (PDE not present)");
        let e = WalkError::OutsideRam { linear: 0x1000, gpa: 0x8000_0000 };
        assert_eq!(alloc::format!("{e}"), "guest-linear 0x1000 leads to guest-physical 0x80000000, outside guest RAM");
    }
}
