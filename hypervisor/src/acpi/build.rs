//! Building the ACPI tables a guest uses to find its virtual TPM: a TCPA
//! table pointing at the measured-launch event log, an SSDT declaring the
//! TPM (PNP0C31) at the TIS window, and copies of the RSDP, RSDT and XSDT
//! that list them next to the firmware's own tables.

use alloc::vec::Vec;

use super::checksum;

/// A table header with a correct checksum around `body`.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, set below
    t.extend_from_slice(b"CTVM  "); // OEM ID
    t.extend_from_slice(b"CTVMVTPM"); // OEM table ID
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"CTVM"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = 0u8.wrapping_sub(checksum(&t));
    t
}

/// The TCPA table of a TPM 1.2 client platform: where the event log is and
/// how long its area is (TCG ACPI Specification, 1.2 client).
pub fn tcpa(log_address: u64, log_area: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0u16.to_le_bytes()); // platform class: client
    body.extend_from_slice(&log_area.to_le_bytes()); // LAML
    body.extend_from_slice(&log_address.to_le_bytes()); // LASA
    table(b"TCPA", 2, &body)
}

/// An AML package length: the length counts its own encoding bytes.
fn pkg_length(content: usize) -> Vec<u8> {
    if content + 1 < 0x40 {
        return alloc::vec![(content + 1) as u8];
    }
    let total = content + 2;
    assert!(total < 0x1000, "AML object too large for a 2-byte package length");
    alloc::vec![0x40 | (total & 0xf) as u8, (total >> 4) as u8]
}

fn with_pkg_length(op: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(content.len()));
    out.extend_from_slice(content);
    out
}

/// `PNP0C31` as an EISA ID: three 5-bit letters and four hex digits.
const EISA_PNP0C31: [u8; 4] = [0x41, 0xd0, 0x0c, 0x31];

/// An SSDT with
/// `Scope (\_SB) { Device (TPM) { Name (_HID, EisaId ("PNP0C31"))
///   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, base, len) })
///   Name (_STA, 0x0F) } }`.
pub fn ssdt_tpm(base: u32, len: u32) -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const DWORD_PREFIX: u8 = 0x0c;
    const BYTE_PREFIX: u8 = 0x0a;
    const BUFFER_OP: u8 = 0x11;
    let mut crs = alloc::vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, read-write
    crs.extend_from_slice(&base.to_le_bytes());
    crs.extend_from_slice(&len.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut buffer = alloc::vec![BYTE_PREFIX, crs.len() as u8];
    buffer.extend_from_slice(&crs);

    let mut device = b"TPM_".to_vec();
    device.push(NAME_OP);
    device.extend_from_slice(b"_HID");
    device.push(DWORD_PREFIX);
    device.extend_from_slice(&EISA_PNP0C31);
    device.push(NAME_OP);
    device.extend_from_slice(b"_CRS");
    device.extend(with_pkg_length(&[BUFFER_OP], &buffer));
    device.push(NAME_OP);
    device.extend_from_slice(b"_STA");
    device.extend_from_slice(&[BYTE_PREFIX, 0x0f]);

    let mut scope = b"\\_SB_".to_vec();
    scope.extend(with_pkg_length(&[0x5b, 0x82], &device)); // DeviceOp
    let aml = with_pkg_length(&[0x10], &scope); // ScopeOp
    table(b"SSDT", 2, &aml)
}

/// An RSDT listing 32-bit table addresses.
pub fn rsdt(entries: &[u32]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"RSDT", 1, &body)
}

/// An XSDT listing 64-bit table addresses.
pub fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"XSDT", 1, &body)
}

/// An ACPI 2.0 RSDP (36 bytes) with both checksums set.
pub fn rsdp(rsdt: u32, xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(b"CTVM  ");
    r[15] = 2;
    r[16..20].copy_from_slice(&rsdt.to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = 0u8.wrapping_sub(checksum(&r[..20]));
    r[32] = 0u8.wrapping_sub(checksum(&r));
    r
}

/// Where the pieces of a guest's ACPI overlay go in its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub rsdp: u64,
}

/// Lays out the hypervisor's tables and a new RSDP, RSDT and XSDT at `base`
/// (fitting in `len` bytes). The firmware's tables (`(address, signature)`)
/// stay where they are and are listed first, except those a new table of
/// the same signature replaces (the MADT); the other new tables follow.
/// Returns the bytes to write at `base` and the RSDP address.
pub fn overlay(base: u64, len: usize, firmware: &[(u64, [u8; 4])], tables: &[Vec<u8>]) -> Option<(Vec<u8>, Overlay)> {
    let mut out = Vec::new();
    let place = |out: &mut Vec<u8>, bytes: &[u8]| -> u64 {
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
        let at = base + out.len() as u64;
        out.extend_from_slice(bytes);
        at
    };
    let mut entries: Vec<(u64, [u8; 4])> = firmware.to_vec();
    for t in tables {
        let signature: [u8; 4] = t.get(..4)?.try_into().ok()?;
        let at = place(&mut out, t);
        match entries.iter_mut().find(|(_, s)| *s == signature) {
            Some(entry) => entry.0 = at,
            None => entries.push((at, signature)),
        }
    }
    let addresses: Vec<u64> = entries.iter().map(|e| e.0).collect();
    let narrow: Option<Vec<u32>> = addresses.iter().map(|&e| u32::try_from(e).ok()).collect();
    let rsdt_at = place(&mut out, &rsdt(&narrow?));
    let xsdt_at = place(&mut out, &xsdt(&addresses));
    let rsdp_at = place(&mut out, &rsdp(u32::try_from(rsdt_at).ok()?, xsdt_at));
    (out.len() <= len).then_some((out, Overlay { rsdp: rsdp_at }))
}

/// MADT entry types.
mod madt {
    pub const LOCAL_APIC: u8 = 0;
    pub const LOCAL_APIC_NMI: u8 = 4;
    pub const LOCAL_X2APIC: u8 = 9;
    pub const LOCAL_X2APIC_NMI: u8 = 0xa;
    /// The processor UID that means "all processors" in the NMI entries.
    pub const ALL_PROCESSORS: u32 = 0xff;
    pub const ALL_X2_PROCESSORS: u32 = 0xffff_ffff;
}

/// The enabled processors the MADT lists, as APIC IDs in the table's order
/// (the order in which CTVM numbers them: its boot CPU comes first anyway).
/// Disabled and duplicate entries are left out. `None` if the table is
/// malformed.
pub fn madt_cpus(madt: &[u8]) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for (kind, entry) in madt_entries(madt)? {
        let u32_at = |o: usize| entry.get(o..o + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let cpu = match kind {
            madt::LOCAL_APIC => Some((u32::from(*entry.get(3)?), u32_at(4)?)),
            madt::LOCAL_X2APIC => Some((u32_at(4)?, u32_at(8)?)),
            _ => None,
        };
        if let Some((id, flags)) = cpu {
            if flags & 1 != 0 && !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Some(ids)
}

/// A MADT's entries (type, bytes), each checked to lie within the table.
fn madt_entries(madt: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let length = u32::from_le_bytes(madt.get(4..8)?.try_into().ok()?) as usize;
    if length < 44 || length > madt.len() || &madt[..4] != b"APIC" {
        return None;
    }
    let mut entries = Vec::new();
    let mut at = 44;
    while at < length {
        let (kind, size) = (*madt.get(at)?, usize::from(*madt.get(at + 1)?));
        entries.push((kind, madt.get(at..at + size).filter(|_| size >= 2 && at + size <= length)?));
        at += size;
    }
    Some(entries)
}

/// The firmware's MADT with only the processors whose APIC IDs are in
/// `apic_ids`: the guest sees, and starts, exactly the CPUs it is given.
/// The interrupt controllers, overrides and the other entries stay as the
/// firmware wrote them. `None` if the table is malformed.
pub fn madt_for(firmware: &[u8], apic_ids: &[u32]) -> Option<Vec<u8>> {
    let mut kept_uids = Vec::new();
    let mut entries = Vec::new();
    for (kind, entry) in madt_entries(firmware)? {
        let u32_at = |o: usize| entry.get(o..o + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let keep = match kind {
            madt::LOCAL_APIC => {
                let (uid, id) = (u32::from(*entry.get(2)?), u32::from(*entry.get(3)?));
                let keep = apic_ids.contains(&id);
                if keep {
                    kept_uids.push(uid);
                }
                keep
            }
            madt::LOCAL_X2APIC => {
                let (id, uid) = (u32_at(4)?, u32_at(12)?);
                let keep = apic_ids.contains(&id);
                if keep {
                    kept_uids.push(uid);
                }
                keep
            }
            _ => true,
        };
        if keep {
            entries.push((kind, entry));
        }
    }
    // NMI wiring for processors that are gone goes too.
    entries.retain(|(kind, entry)| match *kind {
        madt::LOCAL_APIC_NMI => {
            let uid = u32::from(entry.get(2).copied().unwrap_or(0));
            uid == madt::ALL_PROCESSORS || kept_uids.contains(&uid)
        }
        madt::LOCAL_X2APIC_NMI => {
            let uid = entry.get(4..8).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
            uid == madt::ALL_X2_PROCESSORS || kept_uids.contains(&uid)
        }
        _ => true,
    });
    let mut t = firmware[..44].to_vec();
    for (_, entry) in entries {
        t.extend_from_slice(entry);
    }
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(checksum(&t));
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::Rsdp;

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [tcpa(0x7c000, 0x4000), ssdt_tpm(0xfed4_0000, 0x5000), rsdt(&[1, 2]), xsdt(&[3])] {
            assert_eq!(checksum(&t), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        }
        let t = tcpa(0x7c000, 0x4000);
        assert_eq!(t.len(), 50);
        assert_eq!(u32::from_le_bytes(t[38..42].try_into().unwrap()), 0x4000);
        assert_eq!(u64::from_le_bytes(t[42..50].try_into().unwrap()), 0x7c000);
        let r = Rsdp::parse(&rsdp(0x1000, 0x2000)).unwrap();
        assert_eq!((r.rsdt, r.xsdt), (0x1000, Some(0x2000)));
    }

    #[test]
    fn package_lengths_encode_one_or_two_bytes() {
        assert_eq!(pkg_length(10), [11]);
        assert_eq!(pkg_length(62), [63]);
        // 63 content bytes need two length bytes: 65 in total.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
    }

    #[test]
    fn the_ssdt_declares_pnp0c31_at_the_tis_window() {
        let t = ssdt_tpm(0xfed4_0000, 0x5000);
        let aml = &t[36..];
        assert_eq!(aml[0], 0x10);
        assert!(aml.windows(4).any(|w| w == EISA_PNP0C31));
        assert!(aml.windows(4).any(|w| w == 0xfed4_0000u32.to_le_bytes()));
    }

    fn tpm_tables() -> Vec<Vec<u8>> {
        alloc::vec![tcpa(0x7c000, 0x4000), ssdt_tpm(0xfed4_0000, 0x5000)]
    }

    #[test]
    fn overlay_lists_firmware_tables_first_and_fits() {
        let firmware = [(0x3fff_0000, *b"FACP"), (0x3fff_1000, *b"APIC")];
        let (bytes, o) = overlay(0x79000, 0x3000, &firmware, &tpm_tables()).unwrap();
        let at = (o.rsdp - 0x79000) as usize;
        let r = Rsdp::parse(&bytes[at..]).unwrap();
        let xsdt_at = (r.xsdt.unwrap() - 0x79000) as usize;
        let len = u32::from_le_bytes(bytes[xsdt_at + 4..xsdt_at + 8].try_into().unwrap()) as usize;
        let entries: Vec<u64> =
            bytes[xsdt_at + 36..xsdt_at + len].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries[..2], [0x3fff_0000, 0x3fff_1000]);
        assert_eq!(&bytes[(entries[2] - 0x79000) as usize..][..4], b"TCPA");
        assert_eq!(&bytes[(entries[3] - 0x79000) as usize..][..4], b"SSDT");
        assert!(overlay(0x79000, 64, &[], &tpm_tables()).is_none(), "too small an area is refused");
        // A new MADT takes the firmware's place in the lists.
        let mut tables = tpm_tables();
        tables.push(table(b"APIC", 4, &[0; 8]));
        let (bytes, o) = overlay(0x79000, 0x3000, &firmware, &tables).unwrap();
        let r = Rsdp::parse(&bytes[(o.rsdp - 0x79000) as usize..]).unwrap();
        let xsdt_at = (r.xsdt.unwrap() - 0x79000) as usize;
        let entries: Vec<u64> = bytes[xsdt_at + 36..xsdt_at + 36 + 32]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries[0], 0x3fff_0000);
        assert_eq!(&bytes[(entries[1] - 0x79000) as usize..][..4], b"APIC", "in the firmware MADT's place");
        assert_eq!(entries.len(), 4);
    }

    /// Bochs' MADT with two processors: LAPICs (UID 0, ID 0) and (UID 1,
    /// ID 1), an IOAPIC, an override, LAPIC NMIs for UID 0xff and UID 1.
    fn two_cpu_madt() -> Vec<u8> {
        let mut body = alloc::vec![0, 0, 0xe0, 0xfe, 1, 0, 0, 0];
        body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
        body.extend_from_slice(&[0, 8, 1, 1, 1, 0, 0, 0]);
        body.extend_from_slice(&[1, 12, 2, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        body.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&[4, 6, 0xff, 5, 0, 1]);
        body.extend_from_slice(&[4, 6, 1, 5, 0, 1]);
        table(b"APIC", 3, &body)
    }

    #[test]
    fn the_madt_names_the_machines_cpus() {
        let fw = two_cpu_madt();
        assert_eq!(madt_cpus(&fw), Some(alloc::vec![0, 1]));
        // A disabled processor, an x2APIC one, a duplicate.
        let mut body = alloc::vec![0, 0, 0xe0, 0xfe, 1, 0, 0, 0];
        body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
        body.extend_from_slice(&[0, 8, 1, 3, 0, 0, 0, 0]);
        body.extend_from_slice(&[9, 16, 0, 0, 0x00, 0x01, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0]);
        body.extend_from_slice(&[0, 8, 2, 0, 1, 0, 0, 0]);
        assert_eq!(madt_cpus(&table(b"APIC", 3, &body)), Some(alloc::vec![0, 0x100]));
        // Malformed tables.
        let mut bad = fw.clone();
        bad[44 + 9] = 0;
        assert_eq!(madt_cpus(&bad), None);
        assert_eq!(madt_cpus(&fw[..40]), None);
        assert_eq!(madt_cpus(b"FACP"), None);
    }

    #[test]
    fn the_madt_lists_only_the_guests_cpus() {
        let fw = two_cpu_madt();
        let t = madt_for(&fw, &[0]).unwrap();
        assert_eq!(checksum(&t), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        let entries = &t[44..];
        // One LAPIC (ID 0), the IOAPIC, the override and the all-processor NMI.
        assert_eq!(
            entries,
            &[
                0, 8, 0, 0, 1, 0, 0, 0, 1, 12, 2, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0, 2, 10, 0, 0, 2, 0, 0, 0, 0, 0, 4, 6,
                0xff, 5, 0, 1,
            ][..]
        );
        assert_eq!(&t[..36][10..], &fw[..36][10..], "the firmware's header (OEM ...) stays");
        // Malformed: an entry running past the table, a zero-sized entry.
        let mut bad = fw.clone();
        bad[44 + 9] = 200;
        assert_eq!(madt_for(&bad, &[0]), None);
        let mut bad = fw.clone();
        bad[44 + 9] = 0;
        assert_eq!(madt_for(&bad, &[0]), None);
        assert_eq!(madt_for(&fw[..40], &[0]), None);
    }
}
