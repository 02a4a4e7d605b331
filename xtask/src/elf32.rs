//! The tboot-loadable image: CTVM's 64-bit ELF rewritten as a 32-bit ELF
//! with one PT_LOAD segment, as Xen ships `xen.gz`.
//!
//! tboot 1.10.5 cannot load CTVM's ELF64: its image-range code reads the
//! program headers with the 32-bit layout and finds no PT_LOAD. CTVM's
//! entry is 32-bit code anyway (`boot/`), identity-mapped at its physical
//! load address, so the same bytes at the same addresses, described by a
//! 32-bit header, are the same kernel to GRUB and to tboot.

/// Where the image's bytes start in the file (its load address is 4 KiB
/// aligned, so the offset must be too); the multiboot headers at the start
/// of `.text` stay well inside the first 8 KiB, where loaders look.
const IMAGE_OFFSET: usize = 0x1000;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Wraps an ELF64 executable whose loadable segments lie below 4 GiB.
pub fn wrap(elf: &[u8]) -> Result<Vec<u8>, String> {
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return Err("not a 64-bit ELF".into());
    }
    let bad = || "truncated ELF".to_string();
    let entry = u64_at(elf, 0x18).ok_or_else(bad)?;
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(elf, 0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(elf, 0x38).ok_or_else(bad)?);
    // (physical address, file bytes, memory size)
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph).ok_or_else(bad)? != 1 {
            continue;
        }
        let offset = u64_at(elf, ph + 8).ok_or_else(bad)? as usize;
        let paddr = u64_at(elf, ph + 24).ok_or_else(bad)?;
        let filesz = u64_at(elf, ph + 32).ok_or_else(bad)? as usize;
        let memsz = u64_at(elf, ph + 40).ok_or_else(bad)?;
        if memsz == 0 {
            continue;
        }
        let bytes = elf.get(offset..offset + filesz).ok_or_else(bad)?;
        segments.push((paddr, bytes, memsz));
    }
    let base = segments.iter().map(|s| s.0).min().ok_or("no PT_LOAD segment")?;
    let file_end = segments.iter().filter(|s| !s.1.is_empty()).map(|s| s.0 + s.1.len() as u64).max().unwrap_or(base);
    let mem_end = segments.iter().map(|s| s.0 + s.2).max().unwrap_or(base);
    if mem_end > u64::from(u32::MAX) || entry > u64::from(u32::MAX) || base % 0x1000 != 0 {
        return Err("the image must lie below 4 GiB, page aligned".into());
    }
    let mut image = vec![0u8; (file_end - base) as usize];
    for (paddr, bytes, _) in segments.iter().filter(|s| !s.1.is_empty()) {
        let at = (paddr - base) as usize;
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    let mut out = vec![0u8; IMAGE_OFFSET];
    out[..16].copy_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    let put16 = |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut out, 16, 2); // ET_EXEC
    put16(&mut out, 18, 3); // EM_386
    put32(&mut out, 20, 1);
    put32(&mut out, 24, entry as u32);
    put32(&mut out, 28, 52); // program headers right after this header
    put16(&mut out, 40, 52);
    put16(&mut out, 42, 32);
    put16(&mut out, 44, 1);
    put16(&mut out, 46, 40);
    let ph = 52;
    put32(&mut out, ph, 1); // PT_LOAD
    put32(&mut out, ph + 4, IMAGE_OFFSET as u32);
    put32(&mut out, ph + 8, base as u32);
    put32(&mut out, ph + 12, base as u32);
    put32(&mut out, ph + 16, image.len() as u32);
    put32(&mut out, ph + 20, (mem_end - base) as u32);
    put32(&mut out, ph + 24, 7); // RWX: one segment holds code and data
    put32(&mut out, ph + 28, 0x1000);
    out.extend_from_slice(&image);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny ELF64 with text at 2 MiB, data after a gap, and bss.
    fn elf64() -> Vec<u8> {
        let mut e = vec![0u8; 0x3000];
        e[..5].copy_from_slice(b"\x7fELF\x02");
        e[0x18..0x20].copy_from_slice(&0x20_0048u64.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let mut ph = |i: usize, off: u64, paddr: u64, filesz: u64, memsz: u64| {
            let p = 64 + i * 56;
            e[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(0, 0x1000, 0x20_0000, 0x10, 0x10);
        ph(1, 0x2000, 0x20_3000, 0x8, 0x8);
        ph(2, 0x2ff0, 0x20_4000, 0, 0x5000);
        e[0x1000..0x1010].copy_from_slice(b"text-text-text-t");
        e[0x2000..0x2008].copy_from_slice(b"datadata");
        e
    }

    #[test]
    fn one_segment_holds_every_byte_at_its_address() {
        let w = wrap(&elf64()).unwrap();
        assert_eq!(&w[..5], b"\x7fELF\x01");
        assert_eq!(u32_at(&w, 24), Some(0x20_0048));
        assert_eq!(u16_at(&w, 44), Some(1));
        let (offset, paddr, filesz, memsz) = (
            u32_at(&w, 56).unwrap() as usize,
            u32_at(&w, 64).unwrap(),
            u32_at(&w, 68).unwrap(),
            u32_at(&w, 72).unwrap(),
        );
        assert_eq!((offset, paddr, filesz, memsz), (0x1000, 0x20_0000, 0x3008, 0x9000));
        assert_eq!(&w[offset..offset + 16], b"text-text-text-t");
        assert_eq!(&w[offset + 0x3000..offset + 0x3008], b"datadata");
        assert!(w[offset + 0x10..offset + 0x3000].iter().all(|&b| b == 0), "gaps are zero");
    }

    #[test]
    fn refuses_what_is_not_an_elf64() {
        assert!(wrap(b"\x7fELF\x01").is_err());
        assert!(wrap(&elf64()[..0x40]).is_err());
    }
}
