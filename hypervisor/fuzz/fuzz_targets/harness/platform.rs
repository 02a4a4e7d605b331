//! The `platform` target: what the hypervisor derives from the machine's
//! own description for a pass-through guest. The first byte picks:
//! * the MADT narrowed to the guest's CPUs (`acpi::build::madt_for`), from
//!   a firmware MADT the input builds (processor, NMI and other entries,
//!   lying sizes and lengths, any checksum);
//! * the FADT's I/O port blocks (`acpi::fadt_ports`), from any FADT bytes
//!   with the blocks' fields often set;
//! * the I/O ranges PCI functions decode (`pci::io_ranges`), over a fake
//!   configuration space whose BARs answer the sizing probe as the input
//!   says.
//!
//! Properties: a narrowed MADT is a well-formed table (signature, length
//! field, checksum) with the firmware's header, whose entries are a
//! subsequence of the firmware's, keeping every entry but the processors
//! not given and the NMI wiring of processors gone, and no processor but
//! those given; a refused MADT is malformed. No port range wraps (its first
//! port is at most its last), each is a block the FADT declares (or its SMI
//! command port), and every declared block that fits is there. PCI ranges
//! are I/O BARs of present functions, sorted and unique, and every
//! register the sizing touched is restored.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::acpi::{self, build};
use hypervisor::pci::{self, ConfigSpace};

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => madt(rest),
        1 => fadt(rest),
        _ => pci_ranges(rest),
    }
}

#[derive(Arbitrary, Debug)]
enum MadtEntry {
    Lapic {
        uid: u8,
        id: u8,
        flags: u32,
    },
    X2apic {
        id: u32,
        uid: u32,
        flags: u32,
    },
    LapicNmi {
        uid: u8,
        rest: [u8; 3],
    },
    X2apicNmi {
        uid: u32,
        rest: [u8; 4],
    },
    IoApic([u8; 10]),
    /// Any entry, its size field free to lie.
    Raw {
        kind: u8,
        size: u8,
        body: Vec<u8>,
    },
}

impl MadtEntry {
    fn bytes(&self) -> Vec<u8> {
        let mut b = match self {
            MadtEntry::Lapic { uid, id, flags } => [&[0, 8, *uid, *id][..], &flags.to_le_bytes()].concat(),
            MadtEntry::X2apic { id, uid, flags } => {
                [&[9, 16, 0, 0][..], &id.to_le_bytes(), &flags.to_le_bytes(), &uid.to_le_bytes()].concat()
            }
            MadtEntry::LapicNmi { uid, rest } => [&[4, 6, *uid][..], rest].concat(),
            MadtEntry::X2apicNmi { uid, rest } => [&[0xa, 12, 0, 0][..], &uid.to_le_bytes(), rest].concat(),
            MadtEntry::IoApic(body) => [&[1, 12][..], body].concat(),
            MadtEntry::Raw { kind, size, body } => [&[*kind, *size][..], body].concat(),
        };
        b.truncate(255);
        b
    }
}

#[derive(Arbitrary, Debug)]
struct Madt {
    entries: Vec<MadtEntry>,
    /// The length field: right, or any.
    length: Option<u32>,
    bad_signature: bool,
    header: [u8; 32],
    /// APIC IDs of the guest's CPUs: those of the table's processors (by
    /// index) or any.
    ids: Vec<Result<u8, u32>>,
    /// Bytes after the table (the length field may claim them).
    tail: Vec<u8>,
}

/// A processor entry's (APIC ID, UID), or an NMI entry's UID, as the ACPI
/// specification lays them out.
fn processor(e: &[u8]) -> Option<(u32, u32)> {
    let u32_at = |o: usize| e.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    match e[0] {
        0 => Some((u32::from(*e.get(3)?), u32::from(*e.get(2)?))),
        9 => Some((u32_at(4)?, u32_at(12)?)),
        _ => None,
    }
}

fn nmi_uid(e: &[u8]) -> Option<(u32, u32)> {
    match e[0] {
        4 => Some((u32::from(e.get(2).copied().unwrap_or(0)), 0xff)),
        0xa => Some((e.get(4..8).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap())), u32::MAX)),
        _ => None,
    }
}

/// The entries of a MADT body, or `None` if one does not fit.
fn entries(body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let size = usize::from(*body.get(at + 1)?);
        if size < 2 || at + size > body.len() {
            return None;
        }
        out.push(&body[at..at + size]);
        at += size;
    }
    Some(out)
}

fn madt(data: &[u8]) {
    let Ok(m) = Madt::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut t = Vec::with_capacity(44);
    t.extend_from_slice(if m.bad_signature { b"APIX" } else { b"APIC" });
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(&m.header[..28]);
    t.extend_from_slice(&m.header[24..32]);
    for e in m.entries.iter().take(24) {
        t.extend(e.bytes());
    }
    let length = m.length.unwrap_or(t.len() as u32);
    t[4..8].copy_from_slice(&length.to_le_bytes());
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(acpi::checksum(&t));
    t.extend_from_slice(&m.tail);
    let given: Vec<u32> = m
        .entries
        .iter()
        .take(24)
        .map(|e| e.bytes())
        .filter_map(|b| if b.len() >= 2 { processor(&b).map(|(id, _)| id) } else { None })
        .collect();
    let ids: Vec<u32> = m
        .ids
        .iter()
        .take(8)
        .map(|i| match i {
            Ok(k) => given.get(usize::from(*k)).copied().unwrap_or(u32::from(*k)),
            Err(any) => *any,
        })
        .collect();

    let length = length as usize;
    let well_formed = length >= 44 && length <= t.len() && &t[..4] == b"APIC";
    let firmware = if well_formed { entries(&t[44..length]) } else { None };
    let processors_whole =
        firmware.as_ref().is_some_and(|es| es.iter().all(|e| !matches!(e[0], 0 | 9) || processor(e).is_some()));
    match build::madt_for(&t, &ids) {
        None => assert!(!processors_whole, "a well-formed MADT was refused"),
        Some(out) => {
            assert!(processors_whole, "a malformed MADT was narrowed");
            let firmware = firmware.unwrap();
            assert!(out.len() >= 44 && &out[..4] == b"APIC");
            assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()) as usize, out.len(), "length field");
            assert_eq!(acpi::checksum(&out), 0, "checksum");
            assert_eq!(out[8], t[8], "revision");
            assert_eq!(&out[10..44], &t[10..44], "the firmware's header");
            let kept = entries(&out[44..]).expect("the narrowed MADT's entries fit");
            // The entries the narrowing must keep, in order.
            let kept_uids: Vec<u32> = firmware
                .iter()
                .filter_map(|e| processor(e))
                .filter(|(id, _)| ids.contains(id))
                .map(|(_, uid)| uid)
                .collect();
            let expected: Vec<&[u8]> = firmware
                .iter()
                .copied()
                .filter(|e| match (processor(e), nmi_uid(e)) {
                    (Some((id, _)), _) => ids.contains(&id),
                    (_, Some((uid, all))) => uid == all || kept_uids.contains(&uid),
                    _ => true,
                })
                .collect();
            assert_eq!(kept, expected, "entries kept");
            for e in &kept {
                if let Some((id, _)) = processor(e) {
                    assert!(ids.contains(&id), "processor {id} kept but not given");
                }
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Fadt {
    len: u16,
    /// (field offset, value) writes over a zeroed FADT, mostly at the
    /// fields `fadt_ports` reads.
    fields: Vec<(u8, u64)>,
    raw: Vec<u8>,
}

/// (legacy 32-bit field, its length field, the X_ generic address)
const BLOCKS: [(usize, usize, usize); 8] = [
    (56, 88, 148),
    (60, 88, 160),
    (64, 89, 172),
    (68, 89, 184),
    (72, 90, 196),
    (76, 91, 208),
    (80, 92, 220),
    (84, 93, 232),
];

fn fadt(data: &[u8]) {
    let Ok(f) = Fadt::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let len = usize::from(f.len % 300);
    let mut b = vec![0u8; len];
    for (i, r) in f.raw.iter().enumerate().take(len) {
        b[i] = *r;
    }
    const SPOTS: [usize; 29] = [
        48, 56, 60, 64, 68, 72, 76, 80, 84, 88, 89, 90, 91, 92, 93, 148, 152, 160, 164, 172, 176, 184, 188, 196, 200,
        208, 212, 220, 232,
    ];
    for &(spot, value) in f.fields.iter().take(16) {
        let at = SPOTS[usize::from(spot) % SPOTS.len()] + usize::from(spot / 128) * 4;
        for (k, v) in value.to_le_bytes().iter().enumerate() {
            if let Some(x) = b.get_mut(at + k) {
                *x = *v;
            }
        }
    }
    let ports = acpi::fadt_ports(&b);
    // The blocks as the FADT declares them.
    let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
    let mut declared = Vec::new();
    if let Some(smi) = u32_at(48).filter(|&p| p != 0 && p <= 0xffff) {
        declared.push((smi as u16, smi as u16));
    }
    for (field, len_field, x) in BLOCKS {
        let Some(&n) = b.get(len_field) else { continue };
        let x_port = b.get(x..x + 12).and_then(|g| {
            let address = u64::from_le_bytes(g[4..12].try_into().unwrap());
            (g[0] == 1 && address != 0).then_some(address)
        });
        let Some(base) = x_port.or(u32_at(field).map(u64::from).filter(|&p| p != 0)) else { continue };
        if n > 0 && base + u64::from(n) - 1 <= 0xffff {
            declared.push((base as u16, (base + u64::from(n) - 1) as u16));
        }
    }
    for &(first, last) in &ports {
        assert!(first <= last, "port range {first:#x}..={last:#x} wraps");
    }
    assert_eq!(ports, declared, "ports of {b:02x?}");
}

#[derive(Arbitrary, Debug, Clone)]
struct Function {
    bus: u8,
    device: u8,
    function: u8,
    header: u8,
    command: u16,
    bars: [u32; 6],
    /// What each BAR reads back after all-ones is written (hostile or
    /// broken hardware may answer anything).
    probes: [u32; 6],
}

/// Configuration space: the input's functions, all-ones elsewhere (no
/// device); BARs answer the sizing probe with the input's value.
struct Space {
    regs: BTreeMap<(u8, u8, u8, u8), u32>,
    probes: BTreeMap<(u8, u8, u8, u8), u32>,
    /// Devices present, for a quick "no device" answer.
    present: [bool; 256 * 32],
    /// Sizing in progress: the BAR last written with all-ones.
    probing: Option<(u8, u8, u8, u8)>,
}

impl ConfigSpace for Space {
    fn read32(&mut self, b: u8, d: u8, f: u8, o: u8) -> u32 {
        if !self.present[usize::from(b) * 32 + usize::from(d & 31)] {
            return u32::MAX;
        }
        let key = (b, d & 31, f & 7, o & 0xfc);
        if self.probing == Some(key) {
            return self.probes.get(&key).copied().unwrap_or(0);
        }
        self.regs.get(&key).copied().unwrap_or(if o == 0 { u32::MAX } else { 0 })
    }
    fn write32(&mut self, b: u8, d: u8, f: u8, o: u8, v: u32) {
        let key = (b, d & 31, f & 7, o & 0xfc);
        if self.probing == Some(key) {
            // The BAR's value written back.
            self.probing = None;
        } else if v == u32::MAX && (0x10..0x28).contains(&key.3) {
            self.probing = Some(key);
            return;
        }
        self.regs.insert(key, v);
    }
}

fn pci_ranges(data: &[u8]) {
    let Ok(functions) = <Vec<Function>>::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut space = Space { regs: BTreeMap::new(), probes: BTreeMap::new(), present: [false; 256 * 32], probing: None };
    for f in functions.iter().take(8) {
        let (b, d, func) = (f.bus % 4, f.device % 32, f.function % 8);
        space.present[usize::from(b) * 32 + usize::from(d)] = true;
        space.regs.insert((b, d, func, 0), 0x1234_8086);
        space.regs.insert((b, d, func, 0x04), u32::from(f.command));
        space.regs.insert((b, d, func, 0x0c), u32::from(f.header) << 16);
        for i in 0..6u8 {
            space.regs.insert((b, d, func, 0x10 + 4 * i), f.bars[usize::from(i)]);
            space.probes.insert((b, d, func, 0x10 + 4 * i), f.probes[usize::from(i)]);
        }
    }
    let before = space.regs.clone();
    let ranges = pci::io_ranges(&mut space);
    assert!(space.probing.is_none(), "a BAR left in its sizing state");
    assert!(space.regs == before, "configuration space not restored");
    for &(first, last) in &ranges {
        assert!(first <= last, "I/O range {first:#x}..={last:#x} wraps");
        // An I/O BAR of a present function starts there.
        let found = before
            .iter()
            .any(|(&(_, _, _, o), &v)| (0x10..0x28).contains(&o) && v & 1 == 1 && v & !3 == u32::from(first));
        assert!(found, "I/O range {first:#x}..={last:#x} is no function's I/O BAR");
    }
    assert!(ranges.windows(2).all(|w| w[0] < w[1]), "not sorted and unique: {ranges:x?}");
}
