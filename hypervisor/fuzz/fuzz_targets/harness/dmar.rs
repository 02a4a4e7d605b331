//! The `dmar` target: the ACPI DMA Remapping table (`platform::dmar::parse`),
//! which comes from firmware or from SINIT's copy in the TXT heap and
//! decides where the remapping units are and which memory stays mapped for
//! devices. The first byte picks raw bytes or a table the input describes:
//! remapping units (DRHD) and reserved regions (RMRR) with device scopes,
//! other structure types, each field honest or not (a base of 0, unaligned
//! or above 2^52, a region that wraps, a scope with a broken path, a length
//! that lies), a checksum right or not, trailing bytes past the length.
//!
//! Properties:
//! * a described table parses exactly as the harness's own reading of the
//!   VT-d rules says: accepted with the units and regions it holds, or
//!   refused (an independent model, not the parser's code);
//! * bytes past the header's length change nothing;
//! * whatever is accepted, raw bytes included, holds only values CTVM can
//!   act on: unit bases nonzero, page aligned, below 2^52 and distinct, at
//!   most 32 units and 64 regions, regions page aligned and non-empty,
//!   scope paths of at least one hop with device <= 31 and function <= 7.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::acpi::checksum;
use hypervisor::platform::dmar::{self, DeviceScope, Dmar, Reserved, ScopeKind, Unit};

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 4 == 0 {
        check(&dmar::parse(rest));
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else { return };
    let (table, expected) = input.build();
    let got = dmar::parse(&table);
    check(&got);
    assert_eq!(got.as_ref().ok(), expected.as_ref(), "the table {table:02x?} ({input:?})");
    // Bytes past the length are not the table's.
    let mut longer = table.clone();
    longer.extend_from_slice(&input.trailing);
    assert_eq!(dmar::parse(&longer), got, "trailing bytes changed the parse");
}

/// What every accepted table holds, whatever its bytes.
pub fn check(parsed: &Result<Dmar, dmar::DmarError>) {
    let Ok(d) = parsed else { return };
    assert!(d.units.len() <= dmar::MAX_UNITS && d.reserved.len() <= dmar::MAX_RESERVED, "{d:?}");
    for (i, u) in d.units.iter().enumerate() {
        assert!(u.base != 0 && u.base % 4096 == 0 && u.base < 1 << 52, "unit base {:#x}", u.base);
        assert!(d.units[..i].iter().all(|o| o.base != u.base), "two units at {:#x}", u.base);
        assert!(u.size.is_power_of_two() && (4096..=128 << 20).contains(&u.size), "unit size {:#x}", u.size);
        u.scopes.iter().for_each(scope_ok);
    }
    for r in &d.reserved {
        assert!(r.base % 4096 == 0 && r.end % 4096 == 0 && r.base < r.end, "region {:#x}..{:#x}", r.base, r.end);
        r.scopes.iter().for_each(scope_ok);
    }
}

fn scope_ok(s: &DeviceScope) {
    assert!(!s.path.is_empty() && s.path.iter().all(|&(d, f)| d <= 31 && f <= 7), "{s:?}");
}

/// A register base: page-aligned in the 52-bit space, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Base {
    Page(u32),
    Any(u64),
}

impl Base {
    fn value(self) -> u64 {
        match self {
            Base::Page(p) => u64::from(p) << 12,
            Base::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Scope {
    kind: u8,
    enumeration_id: u8,
    bus: u8,
    path: Vec<(u8, u8)>,
    /// Added to the length field (a lie, unless 0).
    lie: i8,
}

#[derive(Arbitrary, Debug)]
enum Structure {
    Drhd {
        flags: u8,
        size: u8,
        segment: u16,
        base: Base,
        scopes: Vec<Scope>,
    },
    Rmrr {
        segment: u16,
        base: Base,
        pages: u16,
        limit_low: u16,
        scopes: Vec<Scope>,
    },
    /// Any other type, ignored when its length is honest.
    Other {
        kind: u16,
        body: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    width: u8,
    flags: u8,
    structures: Vec<Structure>,
    /// A structure whose length field lies: (index, value).
    lying_length: Option<(u8, u16)>,
    bad_checksum: bool,
    trailing: Vec<u8>,
}

/// Most hops a scope's one-byte length can hold.
const HOPS: usize = (255 - 6) / 2;

fn scope_bytes(s: &Scope) -> Vec<u8> {
    let len = 6 + 2 * s.path.len().min(HOPS);
    let mut b = vec![s.kind, (len as u8).wrapping_add(s.lie as u8), 0, 0, s.enumeration_id, s.bus];
    for &(d, f) in s.path.iter().take(HOPS) {
        b.extend_from_slice(&[d, f]);
    }
    b
}

/// The model's reading of one scope with an honest length: `None` if VT-d
/// 8.3.1 says it is broken (no hop, a device above 31 or function above 7).
fn scope_model(s: &Scope) -> Option<DeviceScope> {
    let path: Vec<(u8, u8)> = s.path.iter().take(HOPS).copied().collect();
    (!path.is_empty() && path.iter().all(|&(d, f)| d < 32 && f < 8)).then_some(DeviceScope {
        kind: match s.kind {
            1 => ScopeKind::Endpoint,
            2 => ScopeKind::Bridge,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::AcpiNamespace,
            k => ScopeKind::Other(k),
        },
        enumeration_id: s.enumeration_id,
        start_bus: s.bus,
        path,
    })
}

impl Input {
    /// The table's bytes and what the VT-d rules make of it (`None`: refused).
    fn build(&self) -> (Vec<u8>, Option<Dmar>) {
        let mut model = Some(Dmar {
            host_address_width: self.width.saturating_add(1),
            intr_remap: self.flags & 1 != 0,
            x2apic_opt_out: self.flags & 2 != 0,
            dma_ctrl_opt_in: self.flags & 4 != 0,
            ..Dmar::default()
        });
        let mut body = Vec::new();
        let lie = self.lying_length.map(|(i, v)| (usize::from(i) % self.structures.len().max(1), v));
        // A length that lies (a structure's or a scope's) makes the bytes
        // after it parse as whatever they happen to be: such a table is held
        // to the invariants only.
        let mut judged = true;
        for (i, s) in self.structures.iter().take(40).enumerate() {
            let mut bytes = Vec::new();
            let kind = match s {
                Structure::Drhd { .. } => 0u16,
                Structure::Rmrr { .. } => 1,
                Structure::Other { kind, .. } => (*kind).max(2),
            };
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(&[0, 0]);
            let scopes = match s {
                Structure::Drhd { flags, size, segment, base, scopes } => {
                    bytes.extend_from_slice(&[*flags, *size]);
                    bytes.extend_from_slice(&segment.to_le_bytes());
                    bytes.extend_from_slice(&base.value().to_le_bytes());
                    scopes.as_slice()
                }
                Structure::Rmrr { segment, base, pages, limit_low, scopes } => {
                    let base = base.value();
                    let limit =
                        base.wrapping_add(u64::from(*pages) << 12).wrapping_add(u64::from(*limit_low)).wrapping_sub(1);
                    bytes.extend_from_slice(&[0, 0]);
                    bytes.extend_from_slice(&segment.to_le_bytes());
                    bytes.extend_from_slice(&base.to_le_bytes());
                    bytes.extend_from_slice(&limit.to_le_bytes());
                    scopes.as_slice()
                }
                Structure::Other { body, .. } => {
                    bytes.extend_from_slice(&body[..body.len().min(200)]);
                    &[]
                }
            };
            for sc in scopes.iter().take(8) {
                bytes.extend_from_slice(&scope_bytes(sc));
            }
            let honest_len = bytes.len().min(usize::from(u16::MAX)) as u16;
            let len = match lie {
                Some((at, v)) if at == i && v != honest_len => {
                    judged = false;
                    v
                }
                _ => honest_len,
            };
            if scopes.iter().take(8).any(|sc| sc.lie != 0) {
                judged = false;
            }
            bytes[2..4].copy_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&bytes);
            let Some(m) = model.as_mut() else { continue };
            let scopes: Option<Vec<DeviceScope>> = scopes.iter().take(8).map(scope_model).collect();
            match s {
                Structure::Drhd { flags, size, segment, base, .. } => {
                    let base = base.value();
                    // Zero, unaligned, above 2^52, a second unit there, one too many.
                    let refused = base == 0
                        || base % 4096 != 0
                        || base >= 1 << 52
                        || m.units.iter().any(|u| u.base == base)
                        || m.units.len() == dmar::MAX_UNITS;
                    if refused {
                        model = None;
                    } else if let Some(scopes) = scopes {
                        m.units.push(Unit {
                            base,
                            size: 4096 << (*size).min(15),
                            segment: *segment,
                            include_all: flags & 1 != 0,
                            scopes,
                        });
                    } else {
                        model = None;
                    }
                }
                Structure::Rmrr { segment, base, pages, limit_low, .. } => {
                    let base = base.value();
                    let end =
                        base.checked_add(u64::from(*pages) << 12).and_then(|e| e.checked_add(u64::from(*limit_low)));
                    match end {
                        Some(end) if base % 4096 == 0 && end % 4096 == 0 && end > base && end != 0 => {
                            if m.reserved.len() == dmar::MAX_RESERVED {
                                model = None;
                            } else if let Some(scopes) = scopes {
                                m.reserved.push(Reserved { segment: *segment, base, end, scopes });
                            } else {
                                model = None;
                            }
                        }
                        _ => model = None,
                    }
                }
                Structure::Other { .. } => {}
            }
        }
        let mut table = b"DMAR".to_vec();
        table.extend_from_slice(&((48 + body.len()) as u32).to_le_bytes());
        table.extend_from_slice(&[1, 0]);
        // OEM id and table id, revisions and creator: 26 bytes.
        table.extend_from_slice(b"CTVMFZDMARTABLE\0");
        table.extend_from_slice(&[0; 10]);
        table.push(self.width);
        table.push(self.flags);
        table.extend_from_slice(&[0; 10]);
        table.extend_from_slice(&body);
        let sum = checksum(&table);
        table[9] = 0u8.wrapping_sub(sum);
        if self.bad_checksum {
            table[9] = table[9].wrapping_add(1);
            model = None;
        } else if !judged {
            // Not judged: the parse is only held to the invariants.
            let parsed = dmar::parse(&table).ok();
            return (table, parsed);
        }
        (table, model)
    }
}
