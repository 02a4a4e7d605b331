//! Copying to and from guest-virtual addresses through the guest's own page
//! tables, page by page, checking every translation. Hypercall arguments go
//! through here: a guest pointer is never followed blindly.

use alloc::vec::Vec;

use super::memory::{GuestMemory, HostPhys};
use crate::mmio::walk::{translate, Paging};

/// A guest-virtual range that does not translate to guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadAddress(pub u64);

const PAGE: u64 = 0x1000;

fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    // (guest-virtual address, offset in the buffer, length) per page touched.
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = gva.wrapping_add(done as u64);
        let n = ((PAGE - (at & (PAGE - 1))) as usize).min(len - done);
        let item = (at, done, n);
        done += n;
        Some(item)
    })
}

fn check_range(gva: u64, len: usize) -> Result<(), BadAddress> {
    gva.checked_add(len as u64).map(|_| ()).ok_or(BadAddress(gva))
}

pub fn read(
    memory: &GuestMemory,
    phys: &impl HostPhys,
    paging: &Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), BadAddress> {
    check_range(gva, buf.len())?;
    for (at, offset, n) in chunks(gva, buf.len()) {
        let gpa = translate(memory, phys, paging, at).map_err(|_| BadAddress(at))?;
        memory.read(phys, gpa, &mut buf[offset..offset + n]).map_err(|_| BadAddress(at))?;
    }
    Ok(())
}

/// Writes only after every page of the destination translated, so a bad
/// pointer changes nothing. The data goes where those translations say: it
/// may land in the guest's own page tables, and must not change where the
/// rest of it goes (or make the rest fail after part was written).
pub fn write(
    memory: &GuestMemory,
    phys: &impl HostPhys,
    paging: &Paging,
    gva: u64,
    data: &[u8],
) -> Result<(), BadAddress> {
    check_range(gva, data.len())?;
    let mut pieces = Vec::new();
    for (at, offset, n) in chunks(gva, data.len()) {
        let gpa = translate(memory, phys, paging, at).map_err(|_| BadAddress(at))?;
        if !memory.contains(gpa) || !memory.contains(gpa + n as u64 - 1) {
            return Err(BadAddress(at));
        }
        pieces.push((at, gpa, offset, n));
    }
    for (at, gpa, offset, n) in pieces {
        memory.write(phys, gpa, &data[offset..offset + n]).map_err(|_| BadAddress(at))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory::fake::FakePhys;
    use crate::mm::frames::Region;

    /// 1 MiB of guest RAM with 4-level tables mapping the low 2 MiB at
    /// virtual 0x4000_0000 (a 2 MiB page), and nothing else.
    fn guest() -> (GuestMemory, FakePhys, Paging) {
        let phys = FakePhys::new(0, 0x10_0000);
        let mut mem = GuestMemory::new();
        mem.add(Region::new(0, 0x10_0000), 0).unwrap();
        let w = |at: u64, v: u64| mem.write(&phys, at, &v.to_le_bytes()).unwrap();
        w(0x1000, 0x2000 | 3); // PML4[0] -> PDPT
        w(0x2000 + 8, 0x3000 | 3); // PDPT[1] (1 GiB) -> PD
        w(0x3000, 0x83); // PD[0]: 2 MiB page at 0
        let paging = Paging { cr0: 0x8000_0031, cr3: 0x1000, cr4: 0x20, efer: 0x500 };
        (mem, phys, paging)
    }

    #[test]
    fn round_trips_across_pages() {
        let (mem, phys, paging) = guest();
        write(&mem, &phys, &paging, 0x4000_5ffe, b"abcd").unwrap();
        assert_eq!(&phys.bytes.borrow()[0x5ffe..0x6002], b"abcd");
        let mut back = [0u8; 4];
        read(&mem, &phys, &paging, 0x4000_5ffe, &mut back).unwrap();
        assert_eq!(&back, b"abcd");
    }

    #[test]
    fn bad_pointers_change_nothing() {
        let (mem, phys, paging) = guest();
        // Unmapped virtual address.
        assert_eq!(write(&mem, &phys, &paging, 0x8000_0000, b"x"), Err(BadAddress(0x8000_0000)));
        // Mapped, but past guest RAM (the 2 MiB page covers more than the 1 MiB of RAM):
        // the first page is fine, the second is not, and neither is written.
        assert!(write(&mem, &phys, &paging, 0x400f_fff0, &[7u8; 32]).is_err());
        assert!(phys.bytes.borrow()[0xffff0..].iter().all(|&b| b == 0));
        // Wrapping.
        assert!(read(&mem, &phys, &paging, u64::MAX - 1, &mut [0; 4]).is_err());
    }
}
