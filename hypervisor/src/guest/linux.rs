//! The Linux x86 boot protocol, 64-bit entry: checking a bzImage, choosing
//! where its kernel goes, building the e820 map and `boot_params`.
//!
//! Everything here is pure (bytes in, bytes and addresses out), so it is
//! tested on the host. References: Documentation/arch/x86/boot.rst and
//! arch/x86/include/uapi/asm/bootparam.h in the Linux tree.

use alloc::vec::Vec;
use core::fmt;

use super::boot64::{self, EntryState, Selectors};
use super::memory::{GuestMemory, HostPhys, OutOfRange};
use crate::mm::frames::Region;

/// Where the hypervisor puts what the kernel needs at entry: in low memory,
/// which Linux keeps reserved (it never allocates the first MiB).
pub mod boot_data {
    use super::Selectors;

    pub const BOOT_PARAMS: u64 = 0x7_0000;
    pub const CMDLINE: u64 = 0x7_1000;
    pub const CMDLINE_MAX: usize = 4095;
    /// Page tables, GDT and TSS for the 64-bit entry.
    pub const START_STRUCTURES: u64 = 0x7_2000;
    /// Room for the ACPI tables the hypervisor adds.
    pub const ACPI: u64 = 0x7_9000;
    /// The measured-launch event log the TCPA table points at.
    pub const EVENT_LOG: u64 = 0x7_c000;
    pub const END: u64 = 0x8_0000;
    /// `__BOOT_CS` and `__BOOT_DS` as the boot protocol requires.
    pub const SELECTORS: Selectors = Selectors { code: 0x10, data: 0x18, tss: 0x20 };

    pub const fn region() -> crate::mm::frames::Region {
        crate::mm::frames::Region::new(BOOT_PARAMS, END)
    }
}

/// The oldest protocol with the 64-bit entry point (XLF_KERNEL_64): 2.12.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `boot_params.acpi_rsdp_addr` exists from 2.14 on.
pub const RSDP_PROTOCOL: u16 = 0x020e;

/// e820 entry types.
pub mod e820 {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;
    pub const ACPI: u32 = 3;
    pub const NVS: u32 = 4;
    pub const UNUSABLE: u32 = 5;
    /// How many entries `boot_params` holds.
    pub const MAX_ENTRIES: usize = 128;
}

/// Offsets in the setup header (the same in the file and in `boot_params`).
mod off {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    // boot_params only.
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const E820_TABLE: usize = 0x2d0;
}

const XLF_KERNEL_64: u16 = 1 << 0;
const LOADED_HIGH: u8 = 1 << 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// No 0xAA55 boot flag or no "HdrS" magic: not a bzImage.
    NotBzImage,
    /// The boot protocol is older than the 64-bit entry needs.
    TooOld {
        version: u16,
    },
    /// The kernel has no 64-bit entry point (XLF_KERNEL_64 clear).
    No64BitEntry,
    /// Header fields point outside the file, or are inconsistent.
    Malformed(&'static str),
    /// No room in guest RAM for the kernel's `init_size`.
    NoRoomForKernel {
        init_size: u64,
    },
    CmdlineTooLong {
        len: usize,
        max: usize,
    },
    TooManyE820Entries,
    /// A write fell outside the guest's RAM.
    OutsideGuestMemory(u64),
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxError::NotBzImage => write!(f, "not a bzImage (no boot flag 0xAA55 and \"HdrS\" header)"),
            LinuxError::TooOld { version } => write!(
                f,
                "boot protocol {}.{:02} is too old: the 64-bit entry needs {}.{:02} (Linux 3.8 or later)",
                version >> 8,
                version & 0xff,
                MIN_PROTOCOL >> 8,
                MIN_PROTOCOL & 0xff
            ),
            LinuxError::No64BitEntry => write!(f, "the kernel has no 64-bit entry point (not an x86-64 kernel?)"),
            LinuxError::Malformed(what) => write!(f, "malformed bzImage: {what}"),
            LinuxError::NoRoomForKernel { init_size } => {
                write!(f, "no room in guest RAM for the kernel ({} MiB needed)", init_size >> 20)
            }
            LinuxError::CmdlineTooLong { len, max } => {
                write!(f, "command line of {len} bytes exceeds the kernel's {max}")
            }
            LinuxError::TooManyE820Entries => write!(f, "the memory map needs more than 128 e820 entries"),
            LinuxError::OutsideGuestMemory(a) => write!(f, "{a:#x} is outside the guest's memory"),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// A checked bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    pub bytes: &'a [u8],
    pub version: u16,
    /// Offset of the protected-mode kernel in the file.
    pub kernel_offset: usize,
    pub kernel_alignment: u64,
    pub relocatable: bool,
    pub pref_address: u64,
    /// Memory the kernel needs from its load address to decompress and start.
    pub init_size: u64,
    pub cmdline_max: usize,
    /// End of the setup header (copied into `boot_params`).
    header_end: usize,
}

impl<'a> BzImage<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, LinuxError> {
        if u16_at(bytes, off::BOOT_FLAG) != 0xaa55 || bytes.get(off::HEADER..off::HEADER + 4) != Some(b"HdrS") {
            return Err(LinuxError::NotBzImage);
        }
        let version = u16_at(bytes, off::VERSION);
        if version < MIN_PROTOCOL {
            return Err(LinuxError::TooOld { version });
        }
        if u16_at(bytes, off::XLOADFLAGS) & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::No64BitEntry);
        }
        let setup_sects = match bytes[off::SETUP_SECTS] {
            0 => 4,
            n => usize::from(n),
        };
        let kernel_offset = (setup_sects + 1) * 512;
        if kernel_offset + 0x200 >= bytes.len() {
            return Err(LinuxError::Malformed("setup sectors extend past the end of the file"));
        }
        // The byte after the 2-byte jump at 0x200 is the header length.
        let header_end = off::JUMP + 2 + usize::from(bytes[off::JUMP + 1]);
        if header_end < off::INIT_SIZE + 4 || header_end > kernel_offset {
            return Err(LinuxError::Malformed("setup header length"));
        }
        let kernel_alignment = u64::from(u32_at(bytes, off::KERNEL_ALIGNMENT));
        if !kernel_alignment.is_power_of_two() || kernel_alignment < 0x1000 {
            return Err(LinuxError::Malformed("kernel_alignment is not a power of two"));
        }
        let init_size = u64::from(u32_at(bytes, off::INIT_SIZE));
        let payload = (bytes.len() - kernel_offset) as u64;
        if init_size < payload {
            return Err(LinuxError::Malformed("init_size is smaller than the kernel"));
        }
        Ok(BzImage {
            bytes,
            version,
            kernel_offset,
            kernel_alignment,
            relocatable: bytes[off::RELOCATABLE] != 0,
            pref_address: u64_at(bytes, off::PREF_ADDRESS),
            init_size,
            cmdline_max: u32_at(bytes, off::CMDLINE_SIZE) as usize,
            header_end,
        })
    }

    /// The protected-mode kernel, copied to the load address.
    pub fn kernel(&self) -> &'a [u8] {
        &self.bytes[self.kernel_offset..]
    }

    /// Picks where the kernel goes: its preferred address if free, else the
    /// lowest aligned place inside `ram` clear of `avoid`, below `limit`.
    pub fn load_address(&self, ram: &[Region], avoid: &[Region], limit: u64) -> Result<u64, LinuxError> {
        let fits = |start: u64| {
            let Some(end) = start.checked_add(self.init_size) else { return false };
            let span = Region::new(start, end);
            end <= limit
                && ram.iter().any(|r| r.start <= start && end <= r.end)
                && !avoid.iter().any(|a| a.overlaps(&span))
        };
        if fits(self.pref_address) {
            return Ok(self.pref_address);
        }
        if self.relocatable {
            let align = self.kernel_alignment;
            for r in ram {
                let mut start = r.start.next_multiple_of(align);
                while start.saturating_add(self.init_size) <= r.end.min(limit) {
                    if fits(start) {
                        return Ok(start);
                    }
                    start += align;
                }
            }
        }
        Err(LinuxError::NoRoomForKernel { init_size: self.init_size })
    }
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub region: Region,
    pub kind: u32,
}

/// Rank of a type when ranges overlap: anything but RAM wins over RAM, and
/// among the others the more restrictive wins.
fn rank(kind: u32) -> u8 {
    match kind {
        e820::RAM => 0,
        e820::ACPI => 1,
        e820::NVS => 2,
        e820::UNUSABLE => 3,
        _ => 4, // reserved and unknown types
    }
}

/// The map the guest sees: the firmware's map with `overlays` (the
/// hypervisor's memory as reserved, the boot data as ACPI, ...) laid over
/// it. Overlapping entries are resolved by [`rank`]; an overlay beats the
/// firmware wherever it applies. Adjacent equal entries merge.
pub fn build_e820(firmware: &[E820Entry], overlays: &[E820Entry]) -> Result<Vec<E820Entry>, LinuxError> {
    // Empty entries (firmware does report zero-length ones) cover nothing:
    // inside another entry they must not change its type.
    let firmware: Vec<&E820Entry> = firmware.iter().filter(|e| !e.region.is_empty()).collect();
    let overlays: Vec<&E820Entry> = overlays.iter().filter(|e| !e.region.is_empty()).collect();
    let mut points: Vec<u64> = firmware.iter().chain(&overlays).flat_map(|e| [e.region.start, e.region.end]).collect();
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<E820Entry> = Vec::new();
    for w in points.windows(2) {
        let piece = Region::new(w[0], w[1]);
        let overlay = overlays.iter().filter(|e| e.region.overlaps(&piece)).max_by_key(|e| rank(e.kind));
        let firmware_kind =
            firmware.iter().filter(|e| e.region.overlaps(&piece)).map(|e| e.kind).max_by_key(|&k| rank(k));
        let Some(kind) = overlay.map(|e| e.kind).or(firmware_kind) else { continue };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.region.end == piece.start => last.region.end = piece.end,
            _ => out.push(E820Entry { region: piece, kind }),
        }
    }
    if out.len() > e820::MAX_ENTRIES {
        return Err(LinuxError::TooManyE820Entries);
    }
    Ok(out)
}

/// Where the pieces of the boot went, for `boot_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootLayout {
    pub cmdline_addr: u64,
    pub cmdline_len: usize,
    pub initrd: Option<Region>,
    pub rsdp: Option<u64>,
}

/// Builds the 4 KiB zero page for the 64-bit entry.
pub fn boot_params(image: &BzImage<'_>, e820_map: &[E820Entry], layout: &BootLayout) -> Result<[u8; 4096], LinuxError> {
    if layout.cmdline_len > image.cmdline_max {
        return Err(LinuxError::CmdlineTooLong { len: layout.cmdline_len, max: image.cmdline_max });
    }
    if e820_map.len() > e820::MAX_ENTRIES {
        return Err(LinuxError::TooManyE820Entries);
    }
    let mut bp = [0u8; 4096];
    bp[off::SETUP_SECTS..image.header_end].copy_from_slice(&image.bytes[off::SETUP_SECTS..image.header_end]);
    let put32 = |bp: &mut [u8; 4096], at: usize, v: u32| bp[at..at + 4].copy_from_slice(&v.to_le_bytes());
    bp[off::TYPE_OF_LOADER] = 0xff; // "undefined" boot loader
    bp[off::LOADFLAGS] |= LOADED_HIGH;
    put32(&mut bp, off::CMD_LINE_PTR, layout.cmdline_addr as u32);
    put32(&mut bp, off::EXT_CMD_LINE_PTR, (layout.cmdline_addr >> 32) as u32);
    if let Some(initrd) = layout.initrd {
        put32(&mut bp, off::RAMDISK_IMAGE, initrd.start as u32);
        put32(&mut bp, off::EXT_RAMDISK_IMAGE, (initrd.start >> 32) as u32);
        put32(&mut bp, off::RAMDISK_SIZE, initrd.len() as u32);
        put32(&mut bp, off::EXT_RAMDISK_SIZE, (initrd.len() >> 32) as u32);
    }
    if let Some(rsdp) = layout.rsdp.filter(|_| image.version >= RSDP_PROTOCOL) {
        bp[off::ACPI_RSDP_ADDR..off::ACPI_RSDP_ADDR + 8].copy_from_slice(&rsdp.to_le_bytes());
    }
    bp[off::E820_ENTRIES] = e820_map.len() as u8;
    for (i, e) in e820_map.iter().enumerate() {
        let at = off::E820_TABLE + i * 20;
        bp[at..at + 8].copy_from_slice(&e.region.start.to_le_bytes());
        bp[at + 8..at + 16].copy_from_slice(&e.region.len().to_le_bytes());
        put32(&mut bp, at + 16, e.kind);
    }
    Ok(bp)
}

impl From<OutOfRange> for LinuxError {
    fn from(e: OutOfRange) -> Self {
        LinuxError::OutsideGuestMemory(e.0)
    }
}

/// What goes into the guest for its first instruction.
pub struct LoadPlan<'a> {
    pub image: &'a BzImage<'a>,
    pub load_address: u64,
    pub e820: &'a [E820Entry],
    pub cmdline: &'a str,
    pub initrd: Option<Region>,
    pub rsdp: Option<u64>,
}

/// Copies the kernel to its load address, writes `boot_params`, the command
/// line and the start structures, and returns the 64-bit entry state
/// (RIP = load address + 0x200, RSI = `boot_params`).
pub fn load(mem: &GuestMemory, phys: &impl HostPhys, plan: &LoadPlan<'_>) -> Result<EntryState, LinuxError> {
    let max = plan.image.cmdline_max.min(boot_data::CMDLINE_MAX);
    if plan.cmdline.len() > max {
        return Err(LinuxError::CmdlineTooLong { len: plan.cmdline.len(), max });
    }
    let layout = BootLayout {
        cmdline_addr: boot_data::CMDLINE,
        cmdline_len: plan.cmdline.len(),
        initrd: plan.initrd,
        rsdp: plan.rsdp,
    };
    let params = boot_params(plan.image, plan.e820, &layout)?;
    mem.write(phys, plan.load_address, plan.image.kernel())?;
    mem.write(phys, boot_data::BOOT_PARAMS, &params)?;
    mem.write(phys, boot_data::CMDLINE, plan.cmdline.as_bytes())?;
    mem.write(phys, boot_data::CMDLINE + plan.cmdline.len() as u64, &[0])?;
    let mut state = boot64::write_start_structures(
        mem,
        phys,
        boot_data::START_STRUCTURES,
        boot_data::SELECTORS,
        plan.load_address + 0x200,
    )?;
    state.rsi = boot_data::BOOT_PARAMS;
    // The kernel sets up its own stack at once; this one only covers the gap.
    state.rsp = boot_data::BOOT_PARAMS;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const MIB: u64 = 1 << 20;

    /// A synthetic bzImage with the fields the loader reads.
    fn bzimage(version: u16, xloadflags: u16, init_size: u32) -> Vec<u8> {
        let setup_sects = 3usize;
        let mut b = vec![0u8; (setup_sects + 1) * 512 + 0x4000];
        b[off::SETUP_SECTS] = setup_sects as u8;
        b[off::BOOT_FLAG..off::BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[off::JUMP] = 0xeb;
        b[off::JUMP + 1] = 0x6a; // header runs to 0x26c
        b[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrS");
        b[off::VERSION..off::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        b[off::KERNEL_ALIGNMENT..off::KERNEL_ALIGNMENT + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[off::RELOCATABLE] = 1;
        b[off::XLOADFLAGS..off::XLOADFLAGS + 2].copy_from_slice(&xloadflags.to_le_bytes());
        b[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        b[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&init_size.to_le_bytes());
        b
    }

    #[test]
    fn parses_a_modern_kernel() {
        let b = bzimage(0x020f, 0x7f, 0x3378000);
        let k = BzImage::parse(&b).unwrap();
        assert_eq!(k.version, 0x020f);
        assert_eq!(k.kernel_offset, 4 * 512);
        assert_eq!(k.kernel().len(), 0x4000);
        assert_eq!((k.pref_address, k.init_size, k.cmdline_max), (0x100_0000, 0x3378000, 2047));
    }

    #[test]
    fn refuses_what_is_not_a_usable_bzimage() {
        assert_eq!(BzImage::parse(b"\x7fELF"), Err(LinuxError::NotBzImage));
        let mut b = bzimage(0x020f, 0x7f, 0x100_0000);
        b[off::HEADER] = b'X';
        assert_eq!(BzImage::parse(&b), Err(LinuxError::NotBzImage));
        let old = bzimage(0x020a, 0x7f, 0x100_0000);
        let err = BzImage::parse(&old).unwrap_err();
        assert_eq!(err, LinuxError::TooOld { version: 0x020a });
        assert!(alloc::format!("{err}").contains("2.10 is too old"));
        assert_eq!(BzImage::parse(&bzimage(0x020f, 0, 0x100_0000)), Err(LinuxError::No64BitEntry));
        let mut b = bzimage(0x020f, 0x7f, 0x100_0000);
        b[off::SETUP_SECTS] = 200;
        assert!(matches!(BzImage::parse(&b), Err(LinuxError::Malformed(_))));
        let mut b = bzimage(0x020f, 0x7f, 0x100_0000);
        b[off::KERNEL_ALIGNMENT] = 3;
        assert!(matches!(BzImage::parse(&b), Err(LinuxError::Malformed(_))));
        assert!(matches!(BzImage::parse(&bzimage(0x020f, 0x7f, 0x100)), Err(LinuxError::Malformed(_))));
        // Every truncation fails cleanly.
        let good = bzimage(0x020f, 0x7f, 0x100_0000);
        for len in 0..0x900 {
            assert!(BzImage::parse(&good[..len]).is_err());
        }
    }

    #[test]
    fn load_address_prefers_pref_address_then_relocates() {
        let b = bzimage(0x020f, 0x7f, (40 * MIB) as u32);
        let k = BzImage::parse(&b).unwrap();
        let ram = [Region::new(MIB, 512 * MIB)];
        assert_eq!(k.load_address(&ram, &[], 4 << 30), Ok(16 * MIB));
        // An initrd where the kernel would decompress pushes it higher, aligned.
        let initrd = Region::new(30 * MIB, 31 * MIB);
        assert_eq!(k.load_address(&ram, &[initrd], 4 << 30), Ok(32 * MIB));
        // No room at all.
        let small = [Region::new(MIB, 40 * MIB)];
        assert_eq!(k.load_address(&small, &[], 4 << 30), Err(LinuxError::NoRoomForKernel { init_size: 40 * MIB }));
        // A kernel that cannot relocate must get its preferred address.
        let mut b = bzimage(0x020f, 0x7f, (40 * MIB) as u32);
        b[off::RELOCATABLE] = 0;
        let k = BzImage::parse(&b).unwrap();
        assert!(k.load_address(&ram, &[initrd], 4 << 30).is_err());
    }

    fn e(start: u64, end: u64, kind: u32) -> E820Entry {
        E820Entry { region: Region::new(start, end), kind }
    }

    #[test]
    fn e820_overlays_reserve_hypervisor_memory_and_merge() {
        let firmware = [
            e(0, 0x9fc00, e820::RAM),
            e(0x9fc00, 0xa0000, e820::RESERVED),
            e(0xf0000, 0x100000, e820::RESERVED),
            e(0x100000, 0x3fff0000, e820::RAM),
            e(0x3fff0000, 0x40000000, e820::ACPI),
            // Overlapping firmware entries: the reserved one wins.
            e(0x3000_0000, 0x3000_1000, e820::RESERVED),
            e(0xfffc0000, 0x1_0000_0000, e820::RESERVED),
        ];
        let overlays = [
            e(0x200000, 0x400000, e820::RESERVED),     // hypervisor image and heap
            e(0x3c000000, 0x3fff0000, e820::RESERVED), // hypervisor pool at the top of RAM
            e(0x70000, 0x80000, e820::ACPI),           // boot data with ACPI tables
        ];
        let map = build_e820(&firmware, &overlays).unwrap();
        assert_eq!(
            map,
            vec![
                e(0, 0x70000, e820::RAM),
                e(0x70000, 0x80000, e820::ACPI),
                e(0x80000, 0x9fc00, e820::RAM),
                e(0x9fc00, 0xa0000, e820::RESERVED),
                e(0xf0000, 0x100000, e820::RESERVED),
                e(0x100000, 0x200000, e820::RAM),
                e(0x200000, 0x400000, e820::RESERVED),
                e(0x400000, 0x3000_0000, e820::RAM),
                e(0x3000_0000, 0x3000_1000, e820::RESERVED),
                e(0x3000_1000, 0x3c000000, e820::RAM),
                e(0x3c000000, 0x3fff0000, e820::RESERVED),
                e(0x3fff0000, 0x40000000, e820::ACPI),
                e(0xfffc0000, 0x1_0000_0000, e820::RESERVED),
            ]
        );
        // An overlay over a hole stays an entry of its own.
        let map = build_e820(&[e(0, 0x1000, e820::RAM)], &[e(0x5000, 0x6000, e820::RESERVED)]).unwrap();
        assert_eq!(map, vec![e(0, 0x1000, e820::RAM), e(0x5000, 0x6000, e820::RESERVED)]);
        // A zero-length entry inside RAM covers nothing.
        let map = build_e820(&[e(0, 0x10_0000, e820::RAM), e(0x8000, 0x8000, e820::NVS)], &[]).unwrap();
        assert_eq!(map, vec![e(0, 0x10_0000, e820::RAM)]);
    }

    #[test]
    fn load_places_kernel_params_cmdline_and_entry() {
        use crate::guest::memory::fake::FakePhys;
        let b = bzimage(0x020f, 0x7f, (8 * MIB) as u32);
        let k = BzImage::parse(&b).unwrap();
        let phys = FakePhys::new(0, (32 * MIB) as usize);
        let mut mem = GuestMemory::new();
        mem.add(Region::new(0, 32 * MIB), 0).unwrap();
        let map = [e(0, 32 * MIB, e820::RAM)];
        let plan = LoadPlan {
            image: &k,
            load_address: 16 * MIB,
            e820: &map,
            cmdline: "console=ttyS0 quiet",
            initrd: None,
            rsdp: None,
        };
        let state = load(&mem, &phys, &plan).unwrap();
        assert_eq!(state.rip, 16 * MIB + 0x200);
        assert_eq!(state.rsi, boot_data::BOOT_PARAMS);
        assert_eq!(state.selectors.code, 0x10);
        let bytes = phys.bytes.borrow();
        assert_eq!(&bytes[(16 * MIB) as usize..(16 * MIB) as usize + 16], &k.kernel()[..16]);
        let cmd = boot_data::CMDLINE as usize;
        assert_eq!(&bytes[cmd..cmd + 20], b"console=ttyS0 quiet\0");
        assert_eq!(u32_at(&bytes[..], boot_data::BOOT_PARAMS as usize + off::CMD_LINE_PTR), boot_data::CMDLINE as u32);
        drop(bytes);
        // A kernel outside guest memory is refused, not written.
        let far = LoadPlan { load_address: 32 * MIB - 0x1000, ..plan };
        assert!(matches!(load(&mem, &phys, &far), Err(LinuxError::OutsideGuestMemory(_))));
        let long = "x".repeat(3000);
        let plan = LoadPlan { cmdline: &long, load_address: 16 * MIB, ..far };
        assert!(matches!(load(&mem, &phys, &plan), Err(LinuxError::CmdlineTooLong { .. })));
    }

    #[test]
    fn e820_has_a_limit() {
        let firmware: Vec<E820Entry> = (0..200u64)
            .map(|i| e(i * 0x2000, i * 0x2000 + 0x1000, if i % 2 == 0 { e820::RAM } else { e820::RESERVED }))
            .collect();
        assert_eq!(build_e820(&firmware, &[]), Err(LinuxError::TooManyE820Entries));
    }

    #[test]
    fn boot_params_carry_header_cmdline_initrd_e820_and_rsdp() {
        let b = bzimage(0x020f, 0x7f, 0x100_0000);
        let k = BzImage::parse(&b).unwrap();
        let map = [e(0, 0x9f000, e820::RAM), e(0x100000, 0x4000_0000, e820::RAM)];
        let layout = BootLayout {
            cmdline_addr: 0x7_1000,
            cmdline_len: 30,
            initrd: Some(Region::new(0x800_0000, 0x880_0000)),
            rsdp: Some(0x7_9000),
        };
        let bp = boot_params(&k, &map, &layout).unwrap();
        assert_eq!(&bp[off::HEADER..off::HEADER + 4], b"HdrS");
        assert_eq!(bp[off::TYPE_OF_LOADER], 0xff);
        assert_eq!(u32_at(&bp, off::CMD_LINE_PTR), 0x7_1000);
        assert_eq!(u32_at(&bp, off::RAMDISK_IMAGE), 0x800_0000);
        assert_eq!(u32_at(&bp, off::RAMDISK_SIZE), 0x80_0000);
        assert_eq!(u64_at(&bp, off::ACPI_RSDP_ADDR), 0x7_9000);
        assert_eq!(bp[off::E820_ENTRIES], 2);
        assert_eq!(u64_at(&bp, off::E820_TABLE + 20), 0x100000);
        assert_eq!(u64_at(&bp, off::E820_TABLE + 28), 0x3ff0_0000);
        assert_eq!(u32_at(&bp, off::E820_TABLE + 36), e820::RAM);
        // Nothing past the header is copied from the image.
        assert_eq!(bp[0x26c..0x2d0].iter().filter(|&&x| x != 0).count(), 0);
        let long = BootLayout { cmdline_len: 4000, ..layout };
        assert_eq!(boot_params(&k, &map, &long).unwrap_err(), LinuxError::CmdlineTooLong { len: 4000, max: 2047 });
        // Protocol 2.13 has no acpi_rsdp_addr: it stays zero.
        let b = bzimage(0x020d, 0x7f, 0x100_0000);
        let k = BzImage::parse(&b).unwrap();
        assert_eq!(u64_at(&boot_params(&k, &map, &layout).unwrap(), off::ACPI_RSDP_ADDR), 0);
    }
}
