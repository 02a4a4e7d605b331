//! Loading a CTVM-native guest: an ELF64 kernel placed at its physical
//! addresses, plus the structures a 64-bit start needs (page tables, GDT,
//! TSS) and the [`StartInfo`] record, all inside the guest's own RAM.
//!
//! The image bytes come from a boot module and are checked as hostile input:
//! every header field is bounds-checked before use.

use core::fmt;

use guest_agent::start_info::StartInfo;

use super::boot64::{self, EntryState};
use super::memory::{GuestMemory, HostPhys, OutOfRange};

/// Guest-physical layout of a native guest's start, below the image.
pub mod layout {
    use crate::guest::boot64::Selectors;

    /// Page tables, GDT and TSS (see `boot64`).
    pub const START_STRUCTURES: u64 = 0x1000;
    pub const START_INFO: u64 = 0x8000;
    /// Nothing of the image may load below this.
    pub const IMAGE_MIN: u64 = 0x10_0000;
    pub const SELECTORS: Selectors = Selectors { code: 0x08, data: 0x10, tss: 0x18 };

    const _: () = assert!(START_STRUCTURES + crate::guest::boot64::SIZE <= START_INFO);
    const _: () = assert!(START_INFO + guest_agent::start_info::SIZE as u64 <= IMAGE_MIN);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    NotElf,
    Not64BitLittleEndian,
    NotX86_64,
    NotExecutable,
    /// A header or segment lies outside the file.
    Truncated,
    /// A segment lies outside guest RAM or below [`layout::IMAGE_MIN`].
    SegmentOutOfRange {
        paddr: u64,
        memsz: u64,
    },
    EntryOutsideImage(u64),
    NoLoadableSegment,
    /// Guest RAM too small for the start-up structures and a stack.
    TooLittleMemory,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotElf => write!(f, "not an ELF file"),
            LoadError::Not64BitLittleEndian => write!(f, "not a 64-bit little-endian ELF"),
            LoadError::NotX86_64 => write!(f, "not an x86-64 ELF"),
            LoadError::NotExecutable => write!(f, "not an executable (ET_EXEC) ELF"),
            LoadError::Truncated => write!(f, "truncated ELF: a header or segment lies outside the file"),
            LoadError::SegmentOutOfRange { paddr, memsz } => {
                write!(f, "segment at {paddr:#x}+{memsz:#x} lies outside guest RAM or below {:#x}", layout::IMAGE_MIN)
            }
            LoadError::EntryOutsideImage(e) => write!(f, "entry point {e:#x} is not in a loaded executable segment"),
            LoadError::NoLoadableSegment => write!(f, "no loadable segment"),
            LoadError::TooLittleMemory => write!(f, "guest RAM too small"),
        }
    }
}

impl From<OutOfRange> for LoadError {
    fn from(e: OutOfRange) -> Self {
        LoadError::SegmentOutOfRange { paddr: e.0, memsz: 0 }
    }
}

/// `n` bytes at `at`; offsets come from the file, so `at + n` may overflow.
fn bytes_at(b: &[u8], at: usize, n: usize) -> Result<&[u8], LoadError> {
    at.checked_add(n).and_then(|end| b.get(at..end)).ok_or(LoadError::Truncated)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, LoadError> {
    let s = bytes_at(b, at, 2)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, LoadError> {
    Ok(u32::from_le_bytes(bytes_at(b, at, 4)?.try_into().map_err(|_| LoadError::Truncated)?))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, LoadError> {
    Ok(u64::from_le_bytes(bytes_at(b, at, 8)?.try_into().map_err(|_| LoadError::Truncated)?))
}

/// One PT_LOAD segment, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub file_offset: usize,
    pub file_size: usize,
    pub mem_size: u64,
    pub executable: bool,
}

/// Parses an ELF64 x86-64 executable into its loadable segments and entry.
pub fn parse_elf(image: &[u8], mem_size: u64) -> Result<(alloc::vec::Vec<Segment>, u64), LoadError> {
    if image.get(0..4) != Some(b"\x7fELF") {
        return Err(LoadError::NotElf);
    }
    if image.get(4) != Some(&2) || image.get(5) != Some(&1) {
        return Err(LoadError::Not64BitLittleEndian);
    }
    if u16_at(image, 16)? != 2 {
        return Err(LoadError::NotExecutable);
    }
    if u16_at(image, 18)? != 62 {
        return Err(LoadError::NotX86_64);
    }
    let entry = u64_at(image, 24)?;
    let phoff = usize::try_from(u64_at(image, 32)?).map_err(|_| LoadError::Truncated)?;
    let phentsize = usize::from(u16_at(image, 54)?);
    let phnum = usize::from(u16_at(image, 56)?);
    if phentsize < 56 {
        return Err(LoadError::Truncated);
    }
    let mut segments = alloc::vec::Vec::new();
    for i in 0..phnum {
        let ph =
            phoff.checked_add(i.checked_mul(phentsize).ok_or(LoadError::Truncated)?).ok_or(LoadError::Truncated)?;
        if u32_at(image, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let flags = u32_at(image, ph + 4)?;
        let offset = u64_at(image, ph + 8)?;
        let paddr = u64_at(image, ph + 24)?;
        let filesz = u64_at(image, ph + 32)?;
        let memsz = u64_at(image, ph + 40)?;
        let file_end = offset.checked_add(filesz).ok_or(LoadError::Truncated)?;
        if file_end > image.len() as u64 || filesz > memsz {
            return Err(LoadError::Truncated);
        }
        let mem_end = paddr.checked_add(memsz);
        if paddr < layout::IMAGE_MIN || mem_end.is_none_or(|end| end > mem_size) {
            return Err(LoadError::SegmentOutOfRange { paddr, memsz });
        }
        segments.push(Segment {
            paddr,
            file_offset: offset as usize,
            file_size: filesz as usize,
            mem_size: memsz,
            executable: flags & 1 != 0,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadableSegment);
    }
    let entry_ok = segments.iter().any(|s| s.executable && entry >= s.paddr && entry < s.paddr + s.mem_size);
    if !entry_ok {
        return Err(LoadError::EntryOutsideImage(entry));
    }
    Ok((segments, entry))
}

/// Loads the image and builds the 64-bit start-up state. The guest's RAM
/// must start at guest-physical 0.
pub fn load_native(
    mem: &GuestMemory,
    phys: &impl HostPhys,
    image: &[u8],
    name: &str,
    cmdline: &str,
) -> Result<EntryState, LoadError> {
    let size = mem.size();
    if size < 2 * layout::IMAGE_MIN {
        return Err(LoadError::TooLittleMemory);
    }
    let (segments, entry) = parse_elf(image, size)?;
    mem.zero(phys, 0, size)?;
    for s in &segments {
        mem.write(phys, s.paddr, &image[s.file_offset..s.file_offset + s.file_size])?;
    }

    let mut state = boot64::write_start_structures(mem, phys, layout::START_STRUCTURES, layout::SELECTORS, entry)?;
    let info = StartInfo::new(name, size, cmdline);
    mem.write(phys, layout::START_INFO, &info.to_bytes())?;
    state.rsp = size.min(boot64::IDENTITY_MAPPED) - 16;
    state.rdi = layout::START_INFO;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory::fake::FakePhys;
    use crate::mm::frames::Region;
    use alloc::vec;
    use alloc::vec::Vec;

    const MIB: u64 = 1 << 20;

    /// A minimal ELF64: one header, `segments` program headers, then data.
    fn elf(entry: u64, segments: &[(u64, &[u8], u64, u32)]) -> Vec<u8> {
        let phoff = 64usize;
        let data_start = phoff + 56 * segments.len();
        let mut out = vec![0u8; data_start];
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (paddr, data, memsz, flags)) in segments.iter().enumerate() {
            let ph = phoff + i * 56;
            let offset = out.len() as u64;
            out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            out[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            out[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    fn guest_ram(size: u64) -> (GuestMemory, FakePhys) {
        let phys = FakePhys::new(0x4000_0000, size as usize);
        let mut mem = GuestMemory::new();
        mem.add(Region::new(0, size), 0x4000_0000).unwrap();
        (mem, phys)
    }

    #[test]
    fn loads_segments_and_builds_the_start_state() {
        let (mem, phys) = guest_ram(4 * MIB);
        let image = elf(MIB, &[(MIB, &[0x90, 0xf4], 0x2000, 5), (MIB + 0x2000, b"data", 0x1000, 6)]);
        let state = load_native(&mem, &phys, &image, "alpha", "test=basics").unwrap();
        assert_eq!(state.rip, MIB);
        assert_eq!(state.rsp, 4 * MIB - 16);
        assert_eq!(state.cr3, layout::START_STRUCTURES);
        let bytes = phys.bytes.borrow();
        assert_eq!(&bytes[MIB as usize..MIB as usize + 2], &[0x90, 0xf4]);
        assert_eq!(&bytes[(MIB + 0x2000) as usize..][..4], b"data");
        // bss is zero, the PML4 points at the PDPT, the last PD entry maps 4 GiB - 2 MiB.
        assert_eq!(bytes[(MIB + 2) as usize], 0);
        let word = |at: u64| u64::from_le_bytes(bytes[at as usize..at as usize + 8].try_into().unwrap());
        assert_eq!(word(layout::START_STRUCTURES), (layout::START_STRUCTURES + 0x1000) | 3);
        assert_eq!(word(layout::START_STRUCTURES + 0x5000 + 511 * 8), ((4u64 << 30) - (2 << 20)) | 0x83);
        assert_eq!(word(state.gdt_base + 8), 0x00af_9a00_0000_ffff);
        assert_eq!(word(layout::START_INFO), guest_agent::start_info::MAGIC);
    }

    #[test]
    fn hostile_images_are_refused() {
        let (mem, phys) = guest_ram(4 * MIB);
        let good = elf(MIB, &[(MIB, &[0x90], 0x1000, 5)]);
        assert_eq!(load_native(&mem, &phys, b"MZ\x90\x00", "a", ""), Err(LoadError::NotElf));
        let mut bad = good.clone();
        bad[4] = 1;
        assert_eq!(load_native(&mem, &phys, &bad, "a", ""), Err(LoadError::Not64BitLittleEndian));
        let mut bad = good.clone();
        bad[18] = 3;
        assert_eq!(load_native(&mem, &phys, &bad, "a", ""), Err(LoadError::NotX86_64));
        // Every truncation of a good image fails cleanly.
        for len in 0..good.len() {
            assert!(load_native(&mem, &phys, &good[..len], "a", "").is_err(), "len {len}");
        }
        // A segment into the start-up structures, past RAM, or wrapping.
        for paddr in [0x1000, 4 * MIB - 0x800, u64::MAX - 0x10] {
            let img = elf(paddr, &[(paddr, &[0x90], 0x1000, 5)]);
            assert!(matches!(load_native(&mem, &phys, &img, "a", ""), Err(LoadError::SegmentOutOfRange { .. })));
        }
        // Entry outside any executable segment.
        let img = elf(MIB + 0x1000, &[(MIB, &[0x90], 0x1000, 5), (MIB + 0x1000, &[0], 0x1000, 6)]);
        assert_eq!(load_native(&mem, &phys, &img, "a", ""), Err(LoadError::EntryOutsideImage(MIB + 0x1000)));
        // A huge program-header count pointing past the file.
        let mut img = good.clone();
        img[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(load_native(&mem, &phys, &img, "a", ""), Err(LoadError::Truncated));
        let (small, phys_small) = guest_ram(MIB);
        assert_eq!(load_native(&small, &phys_small, &good, "a", ""), Err(LoadError::TooLittleMemory));
    }
}
