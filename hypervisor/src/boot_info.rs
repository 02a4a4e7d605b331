//! What the loader told us: the memory map, the modules with their command
//! lines, our own command line, and the ACPI RSDP when the firmware has one.
//!
//! GRUB starts CTVM with multiboot2; tboot, which GRUB must start with
//! multiboot 1 (see the README), passes multiboot 1 on. [`Loader`] reads
//! either.

use alloc::string::String;
use alloc::vec::Vec;

use multiboot2::{BootInformation, MemoryAreaType, TagType};

use crate::guest::linux::E820Entry;
use crate::mm::frames::{MemoryKind, Region};

/// One multiboot2 module: a file GRUB loaded and the arguments after its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub range: Region,
    pub cmdline: String,
}

/// The boot information, copied out of GRUB's structure.
#[derive(Clone, Debug)]
pub struct BootInfo {
    pub cmdline: String,
    pub modules: Vec<Module>,
    /// The firmware's memory map, with its e820 types.
    pub memory: Vec<E820Entry>,
    /// A copy of the RSDP (v2 preferred), for building guests' ACPI tables.
    pub rsdp: Option<Vec<u8>>,
}

/// Why the boot information cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    NoMemoryMap,
    /// A module or memory-map tag of `size` bytes that cannot hold its
    /// fields (or a memory map whose entries are not whole 24-byte ones).
    MalformedTag {
        typ: u32,
        size: u32,
    },
}

/// Memory-map entries, as GRUB writes them and the crate reads them.
const MEMORY_AREA_SIZE: usize = 24;

/// Whether every module and memory-map tag can hold what the multiboot2
/// crate reads from it: its typed getters assert on short tags and on
/// memory-map entries of another size, which would be a panic at boot.
/// Nothing else in this module reads a tag that did not pass.
pub fn check(mb: &BootInformation<'_>) -> Result<(), BootInfoError> {
    for tag in mb.tags() {
        let payload = tag.payload();
        let fits = if tag.header().typ == TagType::Module {
            payload.len() >= 8
        } else if tag.header().typ == TagType::Mmap {
            let entry_size = payload.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            let areas = payload.len().checked_sub(8);
            entry_size == Some(MEMORY_AREA_SIZE) && areas.is_some_and(|n| n.is_multiple_of(MEMORY_AREA_SIZE))
        } else {
            true
        };
        if !fits {
            return Err(BootInfoError::MalformedTag { typ: tag.header().typ.get(), size: tag.header().size });
        }
    }
    Ok(())
}

/// The memory map as (region, kind), without allocating: this runs before
/// the heap exists. Lengths that would wrap are clipped. Empty if the
/// structure fails [`check`].
pub fn memory_map<'a>(mb: &'a BootInformation<'a>) -> impl Iterator<Item = (Region, MemoryKind)> + Clone + 'a {
    let tag = check(mb).ok().and_then(|()| mb.memory_map_tag());
    tag.into_iter().flat_map(|tag| tag.memory_areas()).map(|area| {
        let start = area.start_address();
        let region = Region::new(start, start.saturating_add(area.size()));
        let kind = if area.typ() == MemoryAreaType::Available { MemoryKind::Available } else { MemoryKind::Reserved };
        (region, kind)
    })
}

/// The ranges the frame allocator must never hand out: the first MiB (BIOS
/// data, real-mode structures), the modules, and GRUB's information itself.
/// The caller adds the hypervisor image. Without the modules if the
/// structure fails [`check`].
pub fn boot_ranges<'a>(mb: &'a BootInformation<'a>) -> impl Iterator<Item = Region> + 'a {
    let info = Region::new(mb.start_address() as u64, mb.end_address() as u64);
    let modules = check(mb)
        .ok()
        .into_iter()
        .flat_map(|()| mb.module_tags())
        .map(|m| Region::new(u64::from(m.start_address()), u64::from(m.end_address().max(m.start_address()))));
    [Region::new(0, 1 << 20), info].into_iter().chain(modules)
}

/// Memory as the multiboot 1 structures are read from it: `bytes` holds
/// physical `[base, base + len)`. Every address in the structures is
/// loader input and is checked against it.
#[derive(Clone, Copy)]
pub struct Memory<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl<'a> Memory<'a> {
    pub fn get(&self, addr: u64, len: usize) -> Option<&'a [u8]> {
        let at = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.bytes.get(at..at.checked_add(len)?)
    }

    fn u32(&self, addr: u64) -> Option<u32> {
        Some(u32::from_le_bytes(self.get(addr, 4)?.try_into().ok()?))
    }

    fn u64(&self, addr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.get(addr, 8)?.try_into().ok()?))
    }

    /// A NUL-terminated string of at most `max` bytes (invalid UTF-8: empty).
    fn c_str(&self, addr: u64, max: usize) -> &'a str {
        let mut len = 0;
        while len < max && self.get(addr + len as u64, 1).is_some_and(|b| b[0] != 0) {
            len += 1;
        }
        self.get(addr, len).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("")
    }
}

/// The longest command line or module string read from multiboot 1.
const MB1_STRING_MAX: usize = 4096;
/// More modules or memory-map entries than this is no real loader.
const MB1_MAX_ENTRIES: u32 = 256;

mod mb1_flags {
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODS: u32 = 1 << 3;
    pub const MMAP: u32 = 1 << 6;
}

/// The multiboot 1 information structure.
#[derive(Clone, Copy)]
pub struct Mb1<'a> {
    mem: Memory<'a>,
    addr: u64,
    flags: u32,
}

impl<'a> Mb1<'a> {
    /// The fixed part of the information is 88 bytes (up to the VBE fields).
    pub fn new(mem: Memory<'a>, addr: u64) -> Option<Self> {
        mem.get(addr, 88)?;
        Some(Mb1 { mem, addr, flags: mem.u32(addr)? })
    }

    pub fn cmdline(&self) -> &'a str {
        if self.flags & mb1_flags::CMDLINE == 0 {
            return "";
        }
        self.mem.u32(self.addr + 16).map_or("", |a| self.mem.c_str(u64::from(a), MB1_STRING_MAX))
    }

    fn mods(&self) -> (u64, u32) {
        if self.flags & mb1_flags::MODS == 0 {
            return (0, 0);
        }
        let count = self.mem.u32(self.addr + 20).unwrap_or(0).min(MB1_MAX_ENTRIES);
        (u64::from(self.mem.u32(self.addr + 24).unwrap_or(0)), count)
    }

    /// (range, command line) of each module.
    pub fn modules(&self) -> impl Iterator<Item = (Region, &'a str)> + Clone + 'a {
        let (table, count) = self.mods();
        let mem = self.mem;
        (0..u64::from(count)).map_while(move |i| {
            let at = table + 16 * i;
            let (start, end, string) = (mem.u32(at)?, mem.u32(at + 4)?, mem.u32(at + 8)?);
            let cmdline = if string == 0 { "" } else { mem.c_str(u64::from(string), MB1_STRING_MAX) };
            Some((Region::new(u64::from(start), u64::from(end.max(start))), cmdline))
        })
    }

    /// (region, e820 type) of each memory-map entry; lengths that would wrap are clipped.
    pub fn memory_map(&self) -> impl Iterator<Item = (Region, u32)> + Clone + 'a {
        let (mut at, end) = if self.flags & mb1_flags::MMAP != 0 {
            let length = u64::from(self.mem.u32(self.addr + 44).unwrap_or(0));
            let table = u64::from(self.mem.u32(self.addr + 48).unwrap_or(0));
            (table, table + length)
        } else {
            (0, 0)
        };
        let mem = self.mem;
        let mut left = MB1_MAX_ENTRIES;
        core::iter::from_fn(move || {
            if at >= end || left == 0 {
                return None;
            }
            left -= 1;
            // Each entry: size (not counting itself), base, length, type.
            let size = u64::from(mem.u32(at)?);
            let (base, len, kind) = (mem.u64(at + 4)?, mem.u64(at + 12)?, mem.u32(at + 20)?);
            at = at.checked_add(size.max(20) + 4)?;
            Some((Region::new(base, base.saturating_add(len)), kind))
        })
    }

    /// Where the loader's structures lie: the information, the module
    /// table and strings, the memory map and the command line.
    pub fn ranges(&self) -> impl Iterator<Item = Region> + 'a {
        let info = Region::new(self.addr, self.addr + 88);
        let (table, count) = self.mods();
        let mods = Region::new(table, table + 16 * u64::from(count));
        let mmap = if self.flags & mb1_flags::MMAP != 0 {
            let table = u64::from(self.mem.u32(self.addr + 48).unwrap_or(0));
            Region::new(table, table + u64::from(self.mem.u32(self.addr + 44).unwrap_or(0)))
        } else {
            Region::default()
        };
        let cmdline = self.cmdline();
        let cmdline_at =
            if self.flags & mb1_flags::CMDLINE != 0 { self.mem.u32(self.addr + 16).unwrap_or(0) } else { 0 };
        let cmdline = Region::new(u64::from(cmdline_at), u64::from(cmdline_at) + cmdline.len() as u64 + 1);
        let mem = self.mem;
        let strings = (0..u64::from(count)).filter_map(move |i| {
            let at = u64::from(mem.u32(table + 16 * i + 8)?);
            Some(Region::new(at, at + mem.c_str(at, MB1_STRING_MAX).len() as u64 + 1))
        });
        [info, mods, mmap, cmdline].into_iter().chain(strings).filter(|r| !r.is_empty())
    }
}

/// Either of two iterators over the same items.
#[derive(Clone)]
pub enum Either<A, B> {
    A(A),
    B(B),
}

impl<T, A: Iterator<Item = T>, B: Iterator<Item = T>> Iterator for Either<A, B> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            Either::A(a) => a.next(),
            Either::B(b) => b.next(),
        }
    }
}

/// The information a multiboot2 or multiboot 1 loader left.
pub enum Loader<'a> {
    V2(BootInformation<'a>),
    V1(Mb1<'a>),
}

impl<'a> Loader<'a> {
    /// The memory map for the frame allocator, without allocating.
    pub fn memory_map(&'a self) -> impl Iterator<Item = (Region, MemoryKind)> + Clone + 'a {
        match self {
            Loader::V2(mb) => Either::A(memory_map(mb)),
            Loader::V1(mb) => Either::B(mb.memory_map().map(|(r, kind)| {
                (r, if kind == crate::guest::linux::e820::RAM { MemoryKind::Available } else { MemoryKind::Reserved })
            })),
        }
    }

    /// What the frame allocator must never hand out (the caller adds the image).
    pub fn boot_ranges(&'a self) -> impl Iterator<Item = Region> + 'a {
        match self {
            Loader::V2(mb) => Either::A(boot_ranges(mb)),
            Loader::V1(mb) => Either::B(
                core::iter::once(Region::new(0, 1 << 20)).chain(mb.ranges()).chain(mb.modules().map(|(r, _)| r)),
            ),
        }
    }

    pub fn cmdline(&'a self) -> &'a str {
        match self {
            Loader::V2(mb) => mb.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or(""),
            Loader::V1(mb) => mb.cmdline(),
        }
    }

    pub fn module_cmdlines(&'a self) -> impl Iterator<Item = &'a str> + 'a {
        match self {
            Loader::V2(mb) => Either::A(mb.module_tags().map(|m| m.cmdline().unwrap_or(""))),
            Loader::V1(mb) => Either::B(mb.modules().map(|(_, c)| c)),
        }
    }

    /// Copies everything out (needs the heap). A multiboot 1 loader gives
    /// no RSDP: the caller searches the BIOS areas for it.
    pub fn parse(&'a self) -> Result<BootInfo, BootInfoError> {
        match self {
            Loader::V2(mb) => BootInfo::parse(mb),
            Loader::V1(mb) => {
                let memory: Vec<E820Entry> = mb.memory_map().map(|(region, kind)| E820Entry { region, kind }).collect();
                if memory.is_empty() {
                    return Err(BootInfoError::NoMemoryMap);
                }
                let modules = mb.modules().map(|(range, c)| Module { range, cmdline: c.into() }).collect();
                Ok(BootInfo { cmdline: mb.cmdline().into(), modules, memory, rsdp: None })
            }
        }
    }
}

impl BootInfo {
    /// Copies everything out of GRUB's structure (needs the heap).
    pub fn parse(mb: &BootInformation<'_>) -> Result<Self, BootInfoError> {
        check(mb)?;
        if mb.memory_map_tag().is_none() {
            return Err(BootInfoError::NoMemoryMap);
        }
        let cmdline = mb.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or("").into();
        let modules = mb
            .module_tags()
            .map(|m| Module {
                range: Region::new(u64::from(m.start_address()), u64::from(m.end_address().max(m.start_address()))),
                cmdline: m.cmdline().unwrap_or("").into(),
            })
            .collect();
        let rsdp = rsdp_copy(mb, TagType::AcpiV2, 36).or_else(|| rsdp_copy(mb, TagType::AcpiV1, 20));
        let memory = mb
            .memory_map_tag()
            .into_iter()
            .flat_map(|tag| tag.memory_areas())
            .map(|area| E820Entry {
                region: Region::new(area.start_address(), area.start_address().saturating_add(area.size())),
                kind: area.typ().val(),
            })
            .collect();
        Ok(BootInfo { cmdline, modules, memory, rsdp })
    }
}

/// The RSDP copy GRUB put in its first tag of type `typ` (the firmware's
/// RSDP after the tag header): `len` bytes (20 for ACPI 1.0, 36 for 2.0),
/// or `None` when the tag is too short to hold them. Read as the tag's
/// payload, whose size the crate checked against the structure's: the typed
/// getters (`rsdp_v1_tag`) panic on a short tag, and nothing here reads past
/// a tag's end.
fn rsdp_copy(mb: &BootInformation<'_>, typ: TagType, len: usize) -> Option<Vec<u8>> {
    let tag = mb.tags().find(|t| t.header().typ == typ)?;
    tag.payload().get(..len).map(<[u8]>::to_vec)
}

/// `key=value` words of a command line. A word without `=` has an empty value.
pub fn options(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline.split_ascii_whitespace().map(|word| word.split_once('=').unwrap_or((word, "")))
}

/// 32 bytes from exactly 64 hexadecimal digits (a vTPM seed, a policy
/// digest), or `None`.
pub fn hex32(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |b: u8| (b as char).to_digit(16);
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use multiboot2::{BootInformationHeader, Builder, CommandLineTag, MemoryArea, MemoryMapTag, ModuleTag};

    #[test]
    fn parses_memory_modules_and_cmdline() {
        let mbi = Builder::new()
            .cmdline(CommandLineTag::new("log=debug exit=bochs"))
            .add_module(ModuleTag::new(0x30_0000, 0x30_8000, "guest=alpha mem=16M -- test=hello"))
            .add_module(ModuleTag::new(0x40_0000, 0x40_1000, ""))
            .mmap(MemoryMapTag::new(&[
                MemoryArea::new(0, 0x9f000, MemoryAreaType::Available),
                MemoryArea::new(0x100000, 0x3ff00000, MemoryAreaType::Available),
                MemoryArea::new(0xfffc0000, 0x40000, MemoryAreaType::Reserved),
                MemoryArea::new(0x1000, u64::MAX, MemoryAreaType::AcpiAvailable),
            ]))
            .build();
        // SAFETY: the builder produced a well-formed structure that outlives `mb`.
        let mb = unsafe { BootInformation::load(core::ptr::addr_of!(*mbi).cast::<BootInformationHeader>()) }.unwrap();
        let info = BootInfo::parse(&mb).unwrap();
        assert_eq!(info.cmdline, "log=debug exit=bochs");
        assert_eq!(info.modules.len(), 2);
        assert_eq!(info.modules[0].range, Region::new(0x30_0000, 0x30_8000));
        assert_eq!(info.modules[0].cmdline, "guest=alpha mem=16M -- test=hello");
        assert_eq!(info.memory[1], E820Entry { region: Region::new(0x100000, 0x40000000), kind: 1 });
        assert_eq!(info.memory[2].kind, 2);
        // A length that would wrap is clipped; the type is kept for the e820 map.
        assert_eq!(info.memory[3], E820Entry { region: Region::new(0x1000, u64::MAX), kind: 3 });
        // For the frame allocator, non-RAM types count as reserved.
        let kinds: Vec<_> = memory_map(&mb).map(|(_, k)| k).collect();
        assert_eq!(kinds, [MemoryKind::Available, MemoryKind::Available, MemoryKind::Reserved, MemoryKind::Reserved]);
        assert!(info.rsdp.is_none());
        let excluded: Vec<_> = boot_ranges(&mb).collect();
        assert!(excluded.contains(&Region::new(0x30_0000, 0x30_8000)));
        assert!(excluded.contains(&Region::new(0, 1 << 20)));
    }

    #[test]
    fn missing_memory_map_is_an_error() {
        let mbi = Builder::new().cmdline(CommandLineTag::new("x")).build();
        // SAFETY: as above.
        let mb = unsafe { BootInformation::load(core::ptr::addr_of!(*mbi).cast::<BootInformationHeader>()) }.unwrap();
        assert_eq!(BootInfo::parse(&mb).unwrap_err(), BootInfoError::NoMemoryMap);
    }

    /// A multiboot 1 structure as tboot hands it on: the information at
    /// 0x10000, modules, strings and a memory map, in one buffer.
    fn mb1_memory() -> Vec<u8> {
        let base = 0x10000u64;
        let mut m = alloc::vec![0u8; 0x1000];
        let put32 = |m: &mut Vec<u8>, at: u64, v: u32| {
            let at = (at - base) as usize;
            m[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        put32(&mut m, base, (1 << 2) | (1 << 3) | (1 << 6));
        put32(&mut m, base + 16, 0x10400);
        put32(&mut m, base + 20, 2);
        put32(&mut m, base + 24, 0x10200);
        put32(&mut m, base + 44, 2 * 24);
        put32(&mut m, base + 48, 0x10300);
        for (i, (start, end, string)) in
            [(0x30_0000u32, 0x30_8000u32, 0x10500u32), (0x40_0000, 0x40_1000, 0x10600)].iter().enumerate()
        {
            let at = 0x10200 + 16 * i as u64;
            put32(&mut m, at, *start);
            put32(&mut m, at + 4, *end);
            put32(&mut m, at + 8, *string);
        }
        for (i, (b, l, t)) in [(0u64, 0x9f000u64, 1u32), (0x10_0000, 0x3ff0_0000, 1)].iter().enumerate() {
            let at = (0x10300 - base) as usize + 24 * i;
            m[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
            m[at + 4..at + 12].copy_from_slice(&b.to_le_bytes());
            m[at + 12..at + 20].copy_from_slice(&l.to_le_bytes());
            m[at + 20..at + 24].copy_from_slice(&t.to_le_bytes());
        }
        for (at, text) in
            [(0x10400u64, "exit=qemu log=debug"), (0x10500, "guest=alpha -- x"), (0x10600, "initrd=alpha")]
        {
            let at = (at - base) as usize;
            m[at..at + text.len()].copy_from_slice(text.as_bytes());
        }
        m
    }

    #[test]
    fn multiboot1_as_tboot_hands_it_on() {
        let bytes = mb1_memory();
        let mem = Memory { base: 0x10000, bytes: &bytes };
        let loader = Loader::V1(Mb1::new(mem, 0x10000).unwrap());
        assert_eq!(loader.cmdline(), "exit=qemu log=debug");
        assert_eq!(loader.module_cmdlines().collect::<Vec<_>>(), ["guest=alpha -- x", "initrd=alpha"]);
        let map: Vec<_> = loader.memory_map().collect();
        assert_eq!(
            map,
            [
                (Region::new(0, 0x9f000), MemoryKind::Available),
                (Region::new(0x10_0000, 0x4000_0000), MemoryKind::Available)
            ]
        );
        let info = loader.parse().unwrap();
        assert_eq!(info.modules[1].range, Region::new(0x40_0000, 0x40_1000));
        assert_eq!(info.memory[1].kind, 1);
        assert!(info.rsdp.is_none());
        // The structures themselves and the modules stay out of the allocator.
        let ranges: Vec<Region> = loader.boot_ranges().collect();
        for r in [
            Region::new(0x10000, 0x10058),
            Region::new(0x10200, 0x10220),
            Region::new(0x10300, 0x10330),
            Region::new(0x30_0000, 0x30_8000),
        ] {
            assert!(ranges.contains(&r), "{r:?}");
        }
    }

    /// Addresses and counts in the structure are loader input: outside the
    /// memory they are refused, huge counts are capped, nothing panics.
    #[test]
    fn hostile_multiboot1_is_contained() {
        let mut bytes = mb1_memory();
        bytes[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[16..20].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let mem = Memory { base: 0x10000, bytes: &bytes };
        let mb = Mb1::new(mem, 0x10000).unwrap();
        assert_eq!(mb.cmdline(), "");
        assert!(mb.modules().count() <= 256);
        assert!(mb.memory_map().count() <= 256);
        let _ = mb.ranges().count();
        assert!(Mb1::new(mem, 0x10fb0).is_none(), "the information must fit");
        // A memory-map entry whose size field is 0 still advances.
        let mut bytes = mb1_memory();
        bytes[0x300..0x304].copy_from_slice(&0u32.to_le_bytes());
        let mb = Mb1::new(Memory { base: 0x10000, bytes: &bytes }, 0x10000).unwrap();
        assert_eq!(mb.memory_map().count(), 2);
    }

    #[test]
    fn options_split_words() {
        let v: Vec<_> = options(" log=debug  verbose exit=bochs ").collect();
        assert_eq!(v, [("log", "debug"), ("verbose", ""), ("exit", "bochs")]);
    }
}
