//! What GRUB told us: the memory map, the modules with their command lines,
//! our own command line, and the ACPI RSDP when the firmware has one.

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

    #[test]
    fn options_split_words() {
        let v: Vec<_> = options(" log=debug  verbose exit=bochs ").collect();
        assert_eq!(v, [("log", "debug"), ("verbose", ""), ("exit", "bochs")]);
    }
}
