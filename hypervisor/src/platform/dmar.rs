//! The ACPI DMA Remapping Reporting table (Intel VT-d specification,
//! chapter 8): which remapping units exist, where their registers are, which
//! devices each one covers, and the memory firmware keeps using for DMA
//! (RMRRs).
//!
//! The table comes from firmware, or under TXT from SINIT's copy in the TXT
//! heap; either way it is input. Every length is checked against its
//! container, a structure that does not fit or says it is shorter than its
//! own header stops the parse (an unchecked zero length would loop forever),
//! and the values CTVM acts on (register bases, reserved ranges) are
//! validated here so no later code sees a malformed one.

use alloc::vec::Vec;

use super::Reader;
use crate::acpi::checksum;

/// The ACPI header, then host address width, flags and 10 reserved bytes.
const STRUCTURES: usize = 48;

/// More units or reserved regions than any machine has: a table that
/// claims more is refused rather than allocated for.
pub const MAX_UNITS: usize = 32;
pub const MAX_RESERVED: usize = 64;
const MAX_SCOPES: usize = 256;

mod kind {
    pub const DRHD: u16 = 0;
    pub const RMRR: u16 = 1;
}

/// What a device scope names (VT-d 8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Endpoint,
    Bridge,
    IoApic,
    Hpet,
    AcpiNamespace,
    Other(u8),
}

impl ScopeKind {
    fn from(v: u8) -> Self {
        match v {
            1 => Self::Endpoint,
            2 => Self::Bridge,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespace,
            other => Self::Other(other),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    pub kind: ScopeKind,
    /// The IOAPIC or HPET id, or the ACPI device number.
    pub enumeration_id: u8,
    pub start_bus: u8,
    /// (device, function) hops from `start_bus`.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// The source-id (bus:dev.fn) of a scope whose path has one hop.
    pub fn source_id(&self) -> Option<u16> {
        match self.path.as_slice() {
            [(d, f)] => Some(u16::from(self.start_bus) << 8 | u16::from(*d) << 3 | u16::from(*f)),
            _ => None,
        }
    }
}

/// A DMA remapping hardware unit (DRHD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// The register block's physical address (4 KiB aligned).
    pub base: u64,
    /// Its size in bytes (VT-d 3.x `Size` field; 4 KiB before that).
    pub size: u64,
    pub segment: u16,
    /// INCLUDE_PCI_ALL: the unit covers every device of its segment not
    /// listed under another unit.
    pub include_all: bool,
    pub scopes: Vec<DeviceScope>,
}

/// Memory firmware DMAs into behind the OS's back (USB legacy emulation,
/// graphics stolen memory): it must stay mapped for the listed devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub segment: u16,
    /// `[base, end)`, 4 KiB aligned.
    pub base: u64,
    pub end: u64,
    pub scopes: Vec<DeviceScope>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar {
    /// Address bits DMA can use (the field holds N-1).
    pub host_address_width: u8,
    /// The platform supports interrupt remapping.
    pub intr_remap: bool,
    /// Firmware asks the OS not to use x2APIC mode.
    pub x2apic_opt_out: bool,
    /// Firmware kept DMA protection on until the OS takes over.
    pub dma_ctrl_opt_in: bool,
    pub units: Vec<Unit>,
    pub reserved: Vec<Reserved>,
}

/// Why a DMAR table is refused. `at` is the byte offset in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// Not a DMAR table, a bad checksum, or a length beyond the bytes.
    Header,
    /// A structure shorter than its header or running past the table.
    Length {
        at: usize,
    },
    /// A unit's register block is 0, unaligned, or not below 2^52.
    UnitBase {
        at: usize,
    },
    /// Two units at one address.
    DuplicateUnit {
        base: u64,
    },
    /// A device scope that does not fit its structure or has a broken path.
    Scope {
        at: usize,
    },
    /// A reserved region that is empty, unaligned or wraps.
    Region {
        at: usize,
    },
    TooMany,
}

impl core::fmt::Display for DmarError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Header => write!(f, "bad DMAR header (signature, length or checksum)"),
            Self::Length { at } => write!(f, "structure at byte {at} has a bad length"),
            Self::UnitBase { at } => write!(f, "remapping unit at byte {at} has a bad register address"),
            Self::DuplicateUnit { base } => write!(f, "two remapping units at {base:#x}"),
            Self::Scope { at } => write!(f, "bad device scope at byte {at}"),
            Self::Region { at } => write!(f, "bad reserved memory region at byte {at}"),
            Self::TooMany => write!(f, "more units or regions than any machine has"),
        }
    }
}

/// Parses a whole DMAR table (its ACPI header included).
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    let r = Reader(table);
    let length = r.u32(4).ok_or(DmarError::Header)? as usize;
    if table.get(..4) != Some(b"DMAR") || length < STRUCTURES || length > table.len() {
        return Err(DmarError::Header);
    }
    let table = &table[..length];
    if checksum(table) != 0 {
        return Err(DmarError::Header);
    }
    let r = Reader(table);
    let flags = r.u8(37).ok_or(DmarError::Header)?;
    let mut dmar = Dmar {
        host_address_width: r.u8(36).ok_or(DmarError::Header)?.saturating_add(1),
        intr_remap: flags & 1 != 0,
        x2apic_opt_out: flags & 2 != 0,
        dma_ctrl_opt_in: flags & 4 != 0,
        ..Dmar::default()
    };
    let mut at = STRUCTURES;
    while at < length {
        let kind = r.u16(at).ok_or(DmarError::Length { at })?;
        let len = usize::from(r.u16(at + 2).ok_or(DmarError::Length { at })?);
        if len < 4 || at + len > length {
            return Err(DmarError::Length { at });
        }
        let s = Reader(&table[at..at + len]);
        match kind {
            kind::DRHD => {
                if len < 16 {
                    return Err(DmarError::Length { at });
                }
                let base = s.u64(8).ok_or(DmarError::Length { at })?;
                if base == 0 || base % 4096 != 0 || base >= 1 << 52 {
                    return Err(DmarError::UnitBase { at });
                }
                if dmar.units.iter().any(|u| u.base == base) {
                    return Err(DmarError::DuplicateUnit { base });
                }
                if dmar.units.len() == MAX_UNITS {
                    return Err(DmarError::TooMany);
                }
                let size_field = s.u8(5).ok_or(DmarError::Length { at })?;
                dmar.units.push(Unit {
                    base,
                    // 2^size pages; anything above 2^15 pages (128 MiB) is nonsense.
                    size: 4096 << size_field.min(15),
                    segment: s.u16(6).ok_or(DmarError::Length { at })?,
                    include_all: s.u8(4).ok_or(DmarError::Length { at })? & 1 != 0,
                    scopes: scopes(&table[at + 16..at + len], at + 16)?,
                });
            }
            kind::RMRR => {
                if len < 24 {
                    return Err(DmarError::Length { at });
                }
                let base = s.u64(8).ok_or(DmarError::Length { at })?;
                let limit = s.u64(16).ok_or(DmarError::Length { at })?;
                let end = limit.checked_add(1).ok_or(DmarError::Region { at })?;
                if base % 4096 != 0 || end % 4096 != 0 || end <= base {
                    return Err(DmarError::Region { at });
                }
                if dmar.reserved.len() == MAX_RESERVED {
                    return Err(DmarError::TooMany);
                }
                dmar.reserved.push(Reserved {
                    segment: s.u16(6).ok_or(DmarError::Length { at })?,
                    base,
                    end,
                    scopes: scopes(&table[at + 24..at + len], at + 24)?,
                });
            }
            // ATSR, RHSA, ANDD, SATC and later types: nothing CTVM acts on.
            _ => {}
        }
        at += len;
    }
    Ok(dmar)
}

/// The device scopes filling `bytes` (which start at table offset `base`).
fn scopes(bytes: &[u8], base: usize) -> Result<Vec<DeviceScope>, DmarError> {
    let r = Reader(bytes);
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let here = base + at;
        let kind = r.u8(at).ok_or(DmarError::Scope { at: here })?;
        let len = usize::from(r.u8(at + 1).ok_or(DmarError::Scope { at: here })?);
        // Six bytes of header, then two bytes per hop, at least one hop.
        if len < 8 || (len - 6) % 2 != 0 || at + len > bytes.len() {
            return Err(DmarError::Scope { at: here });
        }
        if out.len() == MAX_SCOPES {
            return Err(DmarError::TooMany);
        }
        let path = bytes[at + 6..at + len].chunks_exact(2).map(|hop| (hop[0], hop[1])).collect::<Vec<_>>();
        if path.iter().any(|&(d, f)| d > 31 || f > 7) {
            return Err(DmarError::Scope { at: here });
        }
        out.push(DeviceScope {
            kind: ScopeKind::from(kind),
            enumeration_id: bytes[at + 4],
            start_bus: bytes[at + 5],
            path,
        });
        at += len;
    }
    Ok(out)
}

/// Builds DMAR tables for tests (here and in the hostile-input tests).
#[cfg(test)]
pub mod build {
    use alloc::vec::Vec;

    pub fn scope(kind: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
        let mut s = alloc::vec![kind, (6 + 2 * path.len()) as u8, 0, 0, 0, bus];
        for &(d, f) in path {
            s.extend_from_slice(&[d, f]);
        }
        s
    }

    pub fn drhd(base: u64, include_all: bool, scopes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = scopes.concat();
        let mut s = Vec::new();
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&((16 + body.len()) as u16).to_le_bytes());
        s.push(u8::from(include_all));
        s.push(0);
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    pub fn rmrr(base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = scopes.concat();
        let mut s = Vec::new();
        s.extend_from_slice(&1u16.to_le_bytes());
        s.extend_from_slice(&((24 + body.len()) as u16).to_le_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]);
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&limit.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    /// A whole table with a correct checksum.
    pub fn table(width: u8, flags: u8, structures: &[Vec<u8>]) -> Vec<u8> {
        let mut t = alloc::vec![0u8; 48];
        t[..4].copy_from_slice(b"DMAR");
        t[8] = 1;
        t[36] = width - 1;
        t[37] = flags;
        for s in structures {
            t.extend_from_slice(s);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[9] = 0u8.wrapping_sub(crate::acpi::checksum(&t));
        t
    }

    /// Fixes the length and checksum after a test edited the bytes.
    pub fn reseal(t: &mut [u8]) {
        t[9] = 0;
        t[9] = 0u8.wrapping_sub(crate::acpi::checksum(t));
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    /// QEMU's intel-iommu table (PLATFORM-S2): one unit at 0xFED90000 with
    /// explicit scopes, no RMRR, interrupt remapping on.
    fn qemu_like() -> Vec<u8> {
        table(
            39,
            1,
            &[drhd(
                0xfed9_0000,
                false,
                &[scope(1, 0, &[(3, 0)]), scope(3, 0, &[(0x1f, 0)]), scope(1, 0, &[(0x1f, 2)])],
            )],
        )
    }

    #[test]
    fn parses_units_scopes_and_reserved_regions() {
        let d = parse(&qemu_like()).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert!(d.intr_remap && !d.x2apic_opt_out);
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert_eq!((u.base, u.size, u.include_all), (0xfed9_0000, 4096, false));
        assert_eq!(u.scopes[0].kind, ScopeKind::Endpoint);
        assert_eq!(u.scopes[0].source_id(), Some(3 << 3));
        assert_eq!(u.scopes[1].kind, ScopeKind::IoApic);

        let t = table(
            46,
            0,
            &[
                drhd(0xfed9_0000, false, &[]),
                drhd(0xfed9_1000, true, &[]),
                rmrr(0x7d00_0000, 0x7dff_ffff, &[scope(1, 0, &[(2, 0)])]),
            ],
        );
        let d = parse(&t).unwrap();
        assert_eq!(d.units.len(), 2);
        assert!(d.units[1].include_all);
        assert_eq!((d.reserved[0].base, d.reserved[0].end), (0x7d00_0000, 0x7e00_0000));
    }

    #[test]
    fn unknown_structures_are_skipped() {
        let mut atsr = alloc::vec![2, 0, 8, 0, 0, 0, 0, 0];
        atsr.extend_from_slice(&[]);
        let d = parse(&table(39, 0, &[atsr, drhd(0xfed9_0000, true, &[])])).unwrap();
        assert_eq!(d.units.len(), 1);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let good = qemu_like();
        // Wrong signature, bad checksum, length beyond the bytes, truncated.
        let mut t = good.clone();
        t[0] = b'X';
        assert_eq!(parse(&t), Err(DmarError::Header));
        let mut t = good.clone();
        t[20] ^= 1;
        assert_eq!(parse(&t), Err(DmarError::Header));
        assert_eq!(parse(&good[..good.len() - 1]), Err(DmarError::Header));
        assert_eq!(parse(&good[..30]), Err(DmarError::Header));
        assert_eq!(parse(&[]), Err(DmarError::Header));
        // A length field shorter than the fixed part.
        let mut t = good.clone();
        t[4..8].copy_from_slice(&40u32.to_le_bytes());
        reseal(&mut t);
        assert_eq!(parse(&t), Err(DmarError::Header));
    }

    #[test]
    fn hostile_structure_lengths_are_refused() {
        // Zero length: would loop forever if it were trusted.
        let mut s = drhd(0xfed9_0000, true, &[]);
        s[2..4].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(parse(&table(39, 0, &[s])), Err(DmarError::Length { at: 48 }));
        // Longer than the table.
        let mut s = drhd(0xfed9_0000, true, &[]);
        s[2..4].copy_from_slice(&200u16.to_le_bytes());
        assert_eq!(parse(&table(39, 0, &[s])), Err(DmarError::Length { at: 48 }));
        // A DRHD too short for its own base field.
        let s = alloc::vec![0, 0, 8, 0, 1, 0, 0, 0];
        assert_eq!(parse(&table(39, 0, &[s])), Err(DmarError::Length { at: 48 }));
        // A structure header cut by the end of the table.
        let mut t = table(39, 0, &[drhd(0xfed9_0000, true, &[])]);
        t.extend_from_slice(&[0, 0]);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        reseal(&mut t);
        assert_eq!(parse(&t), Err(DmarError::Length { at: 64 }));
    }

    #[test]
    fn hostile_unit_bases_are_refused() {
        for base in [0, 0xfed9_0010, 1 << 52, !0xfff] {
            assert_eq!(
                parse(&table(39, 0, &[drhd(base, true, &[])])),
                Err(DmarError::UnitBase { at: 48 }),
                "{base:#x}"
            );
        }
        let twice = table(39, 0, &[drhd(0xfed9_0000, false, &[]), drhd(0xfed9_0000, true, &[])]);
        assert_eq!(parse(&twice), Err(DmarError::DuplicateUnit { base: 0xfed9_0000 }));
        let many: Vec<Vec<u8>> = (0..=MAX_UNITS as u64).map(|i| drhd(0xf000_0000 + i * 4096, false, &[])).collect();
        assert_eq!(parse(&table(39, 0, &many)), Err(DmarError::TooMany));
    }

    #[test]
    fn hostile_scopes_are_refused() {
        // A scope whose length runs past its DRHD, one with no hop, an odd
        // path, and a hop naming device 32.
        let mut s = scope(1, 0, &[(3, 0)]);
        s[1] = 12;
        assert!(matches!(parse(&table(39, 0, &[drhd(0xfed9_0000, false, &[s])])), Err(DmarError::Scope { .. })));
        let s = alloc::vec![1, 6, 0, 0, 0, 0];
        assert!(matches!(parse(&table(39, 0, &[drhd(0xfed9_0000, false, &[s])])), Err(DmarError::Scope { .. })));
        let s = alloc::vec![1, 9, 0, 0, 0, 0, 3, 0, 0];
        assert!(matches!(parse(&table(39, 0, &[drhd(0xfed9_0000, false, &[s])])), Err(DmarError::Scope { .. })));
        let s = scope(1, 0, &[(32, 0)]);
        assert!(matches!(parse(&table(39, 0, &[drhd(0xfed9_0000, false, &[s])])), Err(DmarError::Scope { .. })));
        // A zero scope length must not loop.
        let s = alloc::vec![1, 0, 0, 0, 0, 0, 3, 0];
        assert!(matches!(parse(&table(39, 0, &[drhd(0xfed9_0000, false, &[s])])), Err(DmarError::Scope { .. })));
    }

    #[test]
    fn hostile_reserved_regions_are_refused() {
        for (base, limit) in [(0x1000, 0x0fff), (0x1001, 0x1fff), (0x1000, 0x1ffe), (0, u64::MAX)] {
            let t = table(39, 0, &[rmrr(base, limit, &[])]);
            assert!(matches!(parse(&t), Err(DmarError::Region { .. })), "{base:#x}..{limit:#x}");
        }
    }

    /// Every prefix and every single-byte corruption of a valid table parses
    /// or is refused; none panics or loops.
    #[test]
    fn every_truncation_and_corruption_is_handled() {
        let t = table(
            39,
            1,
            &[
                drhd(0xfed9_0000, false, &[scope(1, 0, &[(3, 0)])]),
                rmrr(0x7d00_0000, 0x7d00_ffff, &[scope(1, 0, &[(2, 0)])]),
            ],
        );
        for cut in 0..t.len() {
            let _ = parse(&t[..cut]);
        }
        for i in 0..t.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut bad = t.clone();
                bad[i] = v;
                reseal(&mut bad);
                if let Ok(d) = parse(&bad) {
                    assert!(d.units.iter().all(|u| u.base != 0 && u.base % 4096 == 0));
                    assert!(d.reserved.iter().all(|r| r.base < r.end && r.end % 4096 == 0));
                }
            }
        }
    }
}
