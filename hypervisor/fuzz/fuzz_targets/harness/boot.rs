//! The `boot` target: what boot modules and GRUB hand the hypervisor. The
//! first byte picks the parser:
//! * multiboot2 boot information (`check`, `BootInfo::parse`, the memory map
//!   and the ranges kept from the allocator), from any bytes behind a valid
//!   total size, or from tags the input describes (sizes that lie, short
//!   module, memory-map and RSDP tags);
//! * command lines: `options`, the guest's line (`config::parse` and the
//!   module classifiers), `vtpm.seed`'s 64 hex digits (`hex32`), and the
//!   same bytes as a durable vTPM's state blob (`tpm::setup::prepare`);
//! * bzImage: `BzImage::parse`, `load_address`, `boot_params`;
//! * ELF test guests: `parse_elf`;
//! * `ctvm.policy`: `Policy::parse`, then `Entry::check` on code bytes;
//!   the same text as `ctvm.api` (`ApiPolicy::parse`, `classify`);
//! * e820: `build_e820` from firmware entries and overlays.
//!
//! Properties: a parsed value stays inside its input (segments inside the
//! image and the guest's memory, the kernel inside the bzImage, a load
//! address inside RAM, aligned, clear of what must be avoided and below the
//! limit), a seed is exactly 64 hex digits and says what they say, a state
//! blob the fuzzer makes is refused and leaves the vTPM in failure mode
//! (nothing authentic can come of it), a guest's
//! memory is whole 2 MiB pages, policy masks stay inside the code, a
//! relocation against a symbol the kernel does not export never passes, and
//! an e820 map is sorted and without overlaps.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::boot_info::{self, BootInfo};
use hypervisor::guest::config;
use hypervisor::guest::linux::{self, BootLayout, BzImage, E820Entry};
use hypervisor::guest::loader;
use hypervisor::integrity::api::{ApiPolicy, Class};
use hypervisor::integrity::layout::Range;
use hypervisor::integrity::policy::{Kernel, Mismatch, Policy, Sections};
use hypervisor::mm::frames::Region;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 7 {
        0 => multiboot(rest),
        1 => command_line(rest),
        2 => guest_config(rest),
        3 => bzimage(rest),
        4 => elf(rest),
        5 => policy(rest),
        _ => e820(rest),
    }
}

/// A multiboot2 tag: a type the hypervisor reads (command line, module,
/// memory map, RSDPs) or any, its payload, and a size field that may lie.
#[derive(Arbitrary, Debug)]
struct Tag {
    typ: Result<u8, u32>,
    payload: Vec<u8>,
    size: Option<u32>,
}

/// The tags, each 8-aligned, then the end tag; a memory map's payload
/// starts as GRUB's does (entry size 24, version 0) unless it is short.
fn tags(data: &[u8]) -> Vec<u8> {
    let Ok(tags) = <Vec<Tag>>::arbitrary_take_rest(Unstructured::new(data)) else { return Vec::new() };
    let mut b = Vec::new();
    for t in tags.iter().take(12) {
        let typ = match t.typ {
            Ok(k) => [1, 3, 6, 14, 15, 4, 5, 8][usize::from(k) % 8],
            Err(any) => any,
        };
        let mut payload = t.payload.clone();
        if typ == 6 && payload.len() >= 8 && payload[0] & 1 == 0 {
            payload[..8].copy_from_slice(&[24, 0, 0, 0, 0, 0, 0, 0]);
        }
        b.extend_from_slice(&typ.to_le_bytes());
        b.extend_from_slice(&t.size.unwrap_or(8 + payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&payload);
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
    b
}

fn multiboot(data: &[u8]) {
    use multiboot2::{BootInformation, BootInformationHeader};
    // Tags the input describes (first byte's top bit), or raw bytes.
    let structured;
    let data = match data.split_first() {
        Some((flags, rest)) if flags & 0x80 != 0 => {
            structured = tags(rest);
            &structured[..]
        }
        _ => data,
    };
    // An 8-aligned copy whose header states its real size, as GRUB's would.
    let len = (8 + data.len()).div_ceil(8) * 8;
    let mut words = vec![0u64; len / 8];
    // SAFETY: `words` is `len` bytes of initialised, writable memory, viewed
    // as bytes only for the lifetime of `bytes`.
    let bytes = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) };
    bytes[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    bytes[8..8 + data.len()].copy_from_slice(data);
    // SAFETY: the header says `len` bytes, which `words` holds, 8-aligned;
    // the crate checks every tag against that size.
    let Ok(mb) = (unsafe { BootInformation::load(words.as_ptr().cast::<BootInformationHeader>()) }) else {
        return;
    };
    let areas = boot_info::memory_map(&mb).count();
    let ranges = boot_info::boot_ranges(&mb).count();
    let checked = boot_info::check(&mb);
    let parsed = BootInfo::parse(&mb);
    if let Err(e) = checked {
        // A structure that fails the check is read no further.
        assert_eq!((areas, ranges), (0, 2), "{e:?}");
        assert_eq!(parsed.as_ref().err(), Some(&e));
    }
    let Ok(info) = parsed else { return };
    for m in &info.modules {
        assert!(m.range.start <= m.range.end, "{m:?}");
    }
    for e in &info.memory {
        assert!(e.region.start <= e.region.end, "{e:?}");
    }
    assert!(info.rsdp.as_ref().is_none_or(|r| r.len() == 20 || r.len() == 36));
    let _ = boot_info::options(&info.cmdline).count();
}

fn command_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for (key, value) in boot_info::options(&text) {
        let word = |s: &str| !s.contains(|c: char| c.is_ascii_whitespace());
        assert!(word(key) && word(value) && !key.contains('='), "{key:?}={value:?}");
    }
    match boot_info::hex32(data) {
        Some(seed) => {
            assert_eq!(data.len(), 64);
            let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, String::from_utf8_lossy(data).to_ascii_lowercase(), "seed read wrong");
        }
        None => assert!(data.len() != 64 || !data.iter().all(u8::is_ascii_hexdigit), "a valid seed refused"),
    }
    state_blob(data);
}

/// The bytes as the state blob GRUB handed a durable vTPM (`vtpm.state=`).
fn state_blob(data: &[u8]) {
    use hypervisor::tpm::anchor::{NoCounter, SeedRoot};
    use hypervisor::tpm::setup::{prepare, Failure, Outcome, Request, VtpmMode};
    let root = SeedRoot::new([7; 32]);
    let request = Request {
        guest: "fuzz",
        mode: VtpmMode::Durable { reset: false },
        root: Some(&root),
        seed: Some([7; 32]),
        blob: Some(data),
    };
    let setup = prepare(&request, Box::new(NoCounter), || super::tis::FuzzPlatform::new(1), Box::new(|b| b.fill(0)));
    assert!(matches!(setup.outcome, Outcome::Failed(Failure::Refused(_))), "a made-up blob: {:?}", setup.outcome);
}

fn guest_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = config::initrd_owner(&text);
    let _ = (config::is_pass_through_module(&text), config::is_data_module(&text), config::is_guest_module(&text));
    if let Some(size) = config::parse_size(&text) {
        let _ = size;
    }
    if let Ok(c) = config::parse(&text) {
        assert!(!c.name.is_empty(), "a guest without a name");
        assert_eq!(c.mem_bytes % (2 << 20), 0, "guest memory {:#x} is not whole 2 MiB pages", c.mem_bytes);
    }
}

#[derive(Arbitrary, Debug)]
struct Placement {
    ram: Vec<(u32, u32)>,
    avoid: Vec<(u32, u32)>,
    limit: u64,
    cmdline: (u32, u16),
    initrd: Option<(u32, u32)>,
    rsdp: Option<u32>,
}

fn region((start, len): (u32, u32)) -> Region {
    Region::new(u64::from(start) << 8, (u64::from(start) << 8) + (u64::from(len) << 8))
}

fn bzimage(data: &[u8]) {
    // The placement first (small), then the image (the rest).
    let mut u = Unstructured::new(data);
    let Ok(split) = u.int_in_range(0..=64usize) else { return };
    let Ok(head) = u.bytes(split.min(u.len())) else { return };
    let image = u.take_rest();
    let Ok(bz) = BzImage::parse(image) else { return };
    let k = bz.kernel();
    assert!(k.as_ptr() >= image.as_ptr() && k.len() <= image.len(), "kernel outside the image");
    let Ok(p) = Placement::arbitrary_take_rest(Unstructured::new(head)) else { return };
    let ram: Vec<Region> = p.ram.iter().take(4).map(|&r| region(r)).collect();
    let avoid: Vec<Region> = p.avoid.iter().take(4).map(|&r| region(r)).collect();
    if let Ok(at) = bz.load_address(&ram, &avoid, p.limit) {
        let end = at.checked_add(bz.init_size).expect("load range wraps");
        let placed = Region::new(at, end);
        assert!(end <= p.limit, "kernel at {at:#x}..{end:#x} above the limit {:#x}", p.limit);
        assert!(ram.iter().any(|r| r.start <= at && end <= r.end), "kernel at {at:#x}..{end:#x} outside RAM");
        assert!(!avoid.iter().any(|a| a.overlaps(&placed)), "kernel at {at:#x}..{end:#x} over a range to avoid");
        if bz.kernel_alignment.is_power_of_two() && at != bz.pref_address {
            assert_eq!(at % bz.kernel_alignment, 0, "load address {at:#x} misaligned");
        }
    }
    let e820: Vec<E820Entry> = ram.iter().map(|&region| E820Entry { region, kind: 1 }).collect();
    let layout = BootLayout {
        cmdline_addr: u64::from(p.cmdline.0),
        cmdline_len: usize::from(p.cmdline.1),
        initrd: p.initrd.map(region),
        rsdp: p.rsdp.map(u64::from),
    };
    let _ = linux::boot_params(&bz, &e820, &layout);
}

fn elf(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mem) = u.int_in_range(0..=64u32) else { return };
    let mem_size = u64::from(mem) << 20;
    let image = u.take_rest();
    let Ok((segments, entry)) = loader::parse_elf(image, mem_size) else { return };
    let _ = entry;
    for s in &segments {
        let end = s.paddr.checked_add(s.mem_size).expect("segment wraps");
        assert!(end <= mem_size, "segment {s:?} past the guest's {mem_size:#x} bytes");
        assert!(s.file_offset.checked_add(s.file_size).is_some_and(|e| e <= image.len()), "{s:?} past the file");
        assert!(s.file_size as u64 <= s.mem_size, "{s:?}");
    }
}

fn policy(data: &[u8]) {
    // A policy file, then code bytes after a NUL.
    let (text, code) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = core::str::from_utf8(text) else { return };
    api_policy(text);
    let Ok(p) = Policy::parse(text) else { return };
    // Every symbol resolves, one name nowhere: a relocation against it
    // never passes.
    let symbol = |name: &str| (name != "nowhere").then_some(0xffff_ffff_8100_0000u64 + name.len() as u64);
    let is_return_thunk = |a: u64| a == 0xffff_ffff_81e0_0000;
    let kernel = Kernel { symbol: &symbol, is_return_thunk: &is_return_thunk };
    for e in &p.entries {
        let total = e.text_len + e.init_len + e.rodata_len + e.roinit_len;
        for &(off, len) in &e.masks {
            assert!(off.checked_add(len).is_some_and(|end| end <= total), "mask {off:#x}+{len:#x} past {total:#x}");
        }
        let at = |base: u64, len: u64| Range::new(base, base + len);
        let sections = Sections {
            text: at(0xffff_ffff_c000_0000, e.text_len),
            init: at(0xffff_ffff_d000_0000, e.init_len),
            rodata: at(0xffff_ffff_e000_0000, e.rodata_len),
            ro_after_init: at(0xffff_ffff_e800_0000, e.roinit_len),
            data: at(0xffff_ffff_f000_0000, 0x1000),
            ..Default::default()
        };
        let mut bytes: Vec<u8> = code.iter().copied().cycle().take(total.min(1 << 16) as usize).collect();
        if bytes.len() as u64 == total {
            let result = e.check(&sections, &mut bytes, &kernel);
            if result.is_ok() {
                assert!(!e.symbols().any(|n| n == "nowhere"), "an unresolved relocation passed");
            }
            // Once the relocations pass, the digest is of the masked bytes.
            if matches!(result, Ok(()) | Err(Mismatch::Digest(_))) {
                for &(off, len) in &e.masks {
                    assert!(bytes[off as usize..(off + len) as usize].iter().all(|&b| b == 0), "mask not zeroed");
                }
            }
        }
        let mut short = bytes.clone();
        short.pop();
        assert!(e.check(&sections, &mut short, &kernel).is_err() || total == 0, "a short module passed");
        assert!(p.get(&e.name).is_some());
    }
}

fn e820(data: &[u8]) {
    let Ok((firmware, overlays)) =
        <(Vec<(u64, u64, u8)>, Vec<(u64, u64, u8)>)>::arbitrary_take_rest(Unstructured::new(data))
    else {
        return;
    };
    let entry =
        |&(s, n, k): &(u64, u64, u8)| E820Entry { region: Region::new(s, s.saturating_add(n)), kind: u32::from(k % 6) };
    let firmware: Vec<E820Entry> = firmware.iter().take(32).map(entry).collect();
    let overlays: Vec<E820Entry> = overlays.iter().take(8).map(entry).collect();
    let Ok(map) = linux::build_e820(&firmware, &overlays) else { return };
    for e in &map {
        assert!(e.region.start < e.region.end, "empty entry {e:?}");
    }
    for w in map.windows(2) {
        assert!(w[0].region.end <= w[1].region.start, "unsorted or overlapping: {:?} {:?}", w[0], w[1]);
    }
}

/// A kernel-API policy: what it allows is exactly its `allow` lines; any
/// other name is denied.
fn api_policy(text: &str) {
    let Ok(p) = ApiPolicy::parse(text) else { return };
    let allowed: Vec<&str> = text
        .lines()
        .filter_map(|l| match l.split('#').next()?.trim().split_ascii_whitespace().collect::<Vec<_>>()[..] {
            ["allow", name] => Some(name),
            _ => None,
        })
        .collect();
    assert_eq!(p.counts().0, allowed.len(), "allowed names miscounted");
    for n in &allowed {
        assert_eq!(p.classify(n.as_bytes()), Class::Allowed, "{n}");
    }
    assert_ne!(p.classify(b"\xffnot-a-name"), Class::Allowed);
}
