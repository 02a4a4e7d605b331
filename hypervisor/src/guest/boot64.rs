//! The structures a guest needs to start directly in 64-bit mode: identity
//! page tables for the first 4 GiB, a GDT and a TSS. Shared by native guests
//! and the Linux 64-bit boot protocol, which differ only in where these go
//! and in their selectors.

use super::memory::{GuestMemory, HostPhys, OutOfRange};

/// Bytes the structures occupy from their base: PML4, PDPT, four page
/// directories, then the GDT and TSS in the last page.
pub const SIZE: u64 = 0x7000;
const PML4: u64 = 0;
const PDPT: u64 = 0x1000;
const PD: u64 = 0x2000;
const GDT: u64 = 0x6000;
const TSS: u64 = 0x6100;
pub const TSS_LIMIT: u32 = 0x67;
pub const IDENTITY_MAPPED: u64 = 4 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selectors {
    pub code: u16,
    pub data: u16,
    /// The TSS takes two GDT slots from here.
    pub tss: u16,
}

/// Register state for the first instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub tss_base: u64,
    pub selectors: Selectors,
}

/// Writes the page tables, GDT and TSS at `base` and returns the entry state
/// for `rip`, with RSP, RDI and RSI zero for the caller to fill in.
pub fn write_start_structures(
    mem: &GuestMemory,
    phys: &impl HostPhys,
    base: u64,
    selectors: Selectors,
    rip: u64,
) -> Result<EntryState, OutOfRange> {
    // Identity map the first 4 GiB: guest-virtual = guest-physical. What lies
    // beyond guest RAM is mapped too, so a stray access reaches the EPT and
    // is reported there rather than as a guest page fault.
    const PRESENT_WRITABLE: u64 = 0b11;
    const LARGE: u64 = 1 << 7;
    mem.write(phys, base + PML4, &((base + PDPT) | PRESENT_WRITABLE).to_le_bytes())?;
    for i in 0..4u64 {
        let pd = base + PD + i * 0x1000;
        mem.write(phys, base + PDPT + i * 8, &(pd | PRESENT_WRITABLE).to_le_bytes())?;
        let mut table = [0u8; 4096];
        for (j, entry) in table.chunks_exact_mut(8).enumerate() {
            let addr = (i * 512 + j as u64) << 21;
            entry.copy_from_slice(&(addr | PRESENT_WRITABLE | LARGE).to_le_bytes());
        }
        mem.write(phys, pd, &table)?;
    }

    let tss = base + TSS;
    let tss_low = u64::from(TSS_LIMIT)
        | ((tss & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, 64-bit available TSS
        | (((tss >> 24) & 0xff) << 56);
    let gdt_limit = selectors.tss + 16 - 1;
    let mut gdt = [0u8; 256];
    let mut put = |selector: u16, descriptor: u64| {
        let at = usize::from(selector & !7);
        if let Some(slot) = gdt.get_mut(at..at + 8) {
            slot.copy_from_slice(&descriptor.to_le_bytes());
        }
    };
    put(selectors.code, 0x00af_9a00_0000_ffff); // 64-bit code
    put(selectors.data, 0x00cf_9200_0000_ffff); // flat data
    put(selectors.tss, tss_low);
    put(selectors.tss + 8, tss >> 32);
    mem.write(phys, base + GDT, &gdt[..usize::from(gdt_limit) + 1])?;
    // An I/O map base past the limit: no I/O permission bitmap.
    mem.write(phys, tss + 0x66, &(TSS_LIMIT as u16 + 1).to_le_bytes())?;

    Ok(EntryState {
        rip,
        rsp: 0,
        rdi: 0,
        rsi: 0,
        cr3: base + PML4,
        gdt_base: base + GDT,
        gdt_limit,
        tss_base: tss,
        selectors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory::fake::FakePhys;
    use crate::mm::frames::Region;

    #[test]
    fn tables_map_4_gib_and_the_gdt_holds_the_selectors() {
        let phys = FakePhys::new(0, 0x10_0000);
        let mut mem = GuestMemory::new();
        mem.add(Region::new(0, 0x10_0000), 0).unwrap();
        let sel = Selectors { code: 0x10, data: 0x18, tss: 0x20 };
        let e = write_start_structures(&mem, &phys, 0x7_2000, sel, 0x100_0200).unwrap();
        assert_eq!((e.cr3, e.gdt_base, e.tss_base, e.gdt_limit), (0x7_2000, 0x7_8000, 0x7_8100, 0x2f));
        let b = phys.bytes.borrow();
        let word = |at: u64| u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
        assert_eq!(word(0x7_2000), 0x7_3000 | 3);
        assert_eq!(word(0x7_3000 + 24), 0x7_7000 | 3);
        assert_eq!(word(0x7_4000 + 8), (2 << 20) | 0x83);
        assert_eq!(word(0x7_8010), 0x00af_9a00_0000_ffff);
        assert_eq!(word(0x7_8018), 0x00cf_9200_0000_ffff);
        // The TSS descriptor points at the TSS.
        let tss = word(0x7_8020);
        assert_eq!(((tss >> 16) & 0xff_ffff) | (((tss >> 56) & 0xff) << 24), 0x7_8100);
    }
}
