//! ACPI: reading the firmware's tables, and building the ones guests need.
//!
//! Reading the firmware's ACPI tables: the RSDP, the RSDT/XSDT, and the FADT
//! fields the hypervisor needs (the PM1 control port, to see a pass-through
//! guest power off). Tables are firmware input; every length and checksum is
//! checked before use.

pub mod build;

use alloc::vec::Vec;

use crate::guest::memory::HostPhys;

/// A table header's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRef {
    pub signature: [u8; 4],
    pub address: u64,
    pub length: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    BadRsdp,
    BadTable { signature: [u8; 4], address: u64 },
    NotFound([u8; 4]),
}

/// Sum of bytes modulo 256; valid ACPI structures sum to zero.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// The RSDP: where the RSDT (and, from revision 2, the XSDT) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rsdp {
    pub revision: u8,
    pub rsdt: u32,
    pub xsdt: Option<u64>,
}

impl Rsdp {
    pub fn parse(bytes: &[u8]) -> Result<Rsdp, AcpiError> {
        let v1 = bytes.get(..20).ok_or(AcpiError::BadRsdp)?;
        if &v1[..8] != b"RSD PTR " || checksum(v1) != 0 {
            return Err(AcpiError::BadRsdp);
        }
        let revision = v1[15];
        let rsdt = u32::from_le_bytes([v1[16], v1[17], v1[18], v1[19]]);
        let xsdt = if revision >= 2 {
            let v2 = bytes.get(..36).ok_or(AcpiError::BadRsdp)?;
            if checksum(v2) != 0 {
                return Err(AcpiError::BadRsdp);
            }
            let x = u64::from_le_bytes(v2[24..32].try_into().map_err(|_| AcpiError::BadRsdp)?);
            (x != 0).then_some(x)
        } else {
            None
        };
        Ok(Rsdp { revision, rsdt, xsdt })
    }
}

/// Finds the RSDP where BIOS firmware leaves it (ACPI 6.5, 5.2.5.1): the
/// first KiB of the EBDA, then 0xE0000-0xFFFFF, on 16-byte boundaries.
/// For loaders that pass none (multiboot 1). Returns its bytes (36 from
/// revision 2 on, else 20) with every checksum valid.
pub fn find_rsdp(phys: &impl HostPhys) -> Option<Vec<u8>> {
    let mut segment = [0u8; 2];
    phys.read(0x40e, &mut segment);
    let ebda = u64::from(u16::from_le_bytes(segment)) << 4;
    let ebda = (0x8_0000..0xa_0000).contains(&ebda).then_some(ebda..ebda + 1024);
    for area in ebda.into_iter().chain(core::iter::once(0xe_0000..0x10_0000)) {
        for at in (area.start..area.end - 19).step_by(16) {
            let mut candidate = [0u8; 36];
            phys.read(at, &mut candidate[..20]);
            if &candidate[..8] != b"RSD PTR " {
                continue;
            }
            if candidate[15] >= 2 && at + 36 <= 0x10_0000 {
                phys.read(at, &mut candidate);
            }
            if let Ok(rsdp) = Rsdp::parse(&candidate) {
                let len = if rsdp.revision >= 2 { 36 } else { 20 };
                return Some(candidate[..len].to_vec());
            }
        }
    }
    None
}

/// Largest table this code reads (the DSDT can be large; it is not read).
const MAX_TABLE: u32 = 64 * 1024;

/// Tables must lie where the hypervisor can read them (its identity map).
const ADDRESS_LIMIT: u64 = 4 << 30;

/// Reads one whole table, checking its length and checksum.
pub fn read_table(phys: &impl HostPhys, address: u64) -> Result<Vec<u8>, AcpiError> {
    if address.checked_add(36).is_none_or(|end| end > ADDRESS_LIMIT) {
        return Err(AcpiError::BadTable { signature: [0; 4], address });
    }
    let mut header = [0u8; 36];
    phys.read(address, &mut header);
    let signature = [header[0], header[1], header[2], header[3]];
    let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let in_reach = address.checked_add(u64::from(length)).is_some_and(|end| end <= ADDRESS_LIMIT);
    if !(36..=MAX_TABLE).contains(&length) || !in_reach {
        return Err(AcpiError::BadTable { signature, address });
    }
    let mut table = alloc::vec![0u8; length as usize];
    phys.read(address, &mut table);
    if checksum(&table) != 0 {
        return Err(AcpiError::BadTable { signature, address });
    }
    Ok(table)
}

/// The tables the XSDT (preferred) or RSDT lists.
pub fn tables(phys: &impl HostPhys, rsdp: &Rsdp) -> Result<Vec<TableRef>, AcpiError> {
    let (root, entry_size) = match rsdp.xsdt {
        Some(x) => (x, 8),
        None => (u64::from(rsdp.rsdt), 4),
    };
    let sdt = read_table(phys, root)?;
    let mut out = Vec::new();
    for entry in sdt[36..].chunks_exact(entry_size) {
        let address = if entry_size == 8 {
            u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]))
        } else {
            u64::from(u32::from_le_bytes(entry.try_into().unwrap_or([0; 4])))
        };
        if address.checked_add(8).is_none_or(|end| end > ADDRESS_LIMIT) {
            continue;
        }
        let mut header = [0u8; 8];
        phys.read(address, &mut header);
        out.push(TableRef {
            signature: [header[0], header[1], header[2], header[3]],
            address,
            length: u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
        });
    }
    Ok(out)
}

/// The PM1a control port from the FADT (`X_PM1a_CNT_BLK` when it names a
/// port, else `PM1a_CNT_BLK`).
pub fn pm1a_control_port(fadt: &[u8]) -> Option<u16> {
    const PM1A_CNT_BLK: usize = 64;
    const X_PM1A_CNT_BLK: usize = 172;
    if let Some(gas) = fadt.get(X_PM1A_CNT_BLK..X_PM1A_CNT_BLK + 12) {
        let space = gas[0];
        let address = u64::from_le_bytes(gas[4..12].try_into().ok()?);
        if space == 1 && address != 0 {
            return u16::try_from(address).ok();
        }
    }
    let port = u32::from_le_bytes(fadt.get(PM1A_CNT_BLK..PM1A_CNT_BLK + 4)?.try_into().ok()?);
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// The ACPI PM timer's port (`PM_TMR_BLK`): a 3.579545 MHz counter.
pub fn pm_timer_port(fadt: &[u8]) -> Option<u16> {
    const PM_TMR_BLK: usize = 76;
    let port = u32::from_le_bytes(fadt.get(PM_TMR_BLK..PM_TMR_BLK + 4)?.try_into().ok()?);
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// The FADT's I/O ports, as (first port, last port): the SMI command port,
/// then the register blocks PM1a/b event and control, PM2 control, the PM
/// timer, GPE0 and GPE1 (the 32-bit fields, or their `X_` forms when those
/// name ports). The pass-through guest's ACPI driver reaches them directly.
pub fn fadt_ports(fadt: &[u8]) -> Vec<(u16, u16)> {
    // (32-bit block field, its length field, the X_ generic address).
    const BLOCKS: [(usize, usize, usize); 8] = [
        (56, 88, 148), // PM1a_EVT
        (60, 88, 160), // PM1b_EVT
        (64, 89, 172), // PM1a_CNT
        (68, 89, 184), // PM1b_CNT
        (72, 90, 196), // PM2_CNT
        (76, 91, 208), // PM_TMR
        (80, 92, 220), // GPE0
        (84, 93, 232), // GPE1
    ];
    const SMI_CMD: usize = 48;
    let mut out = Vec::new();
    // The SMI command port: where the OS asks the firmware to hand ACPI over.
    if let Some(b) = fadt.get(SMI_CMD..SMI_CMD + 4) {
        if let Ok(port) = u16::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) {
            if port != 0 {
                out.push((port, port));
            }
        }
    }
    for (field, len_field, x_field) in BLOCKS {
        let Some(&len) = fadt.get(len_field) else { continue };
        let x = fadt.get(x_field..x_field + 12).and_then(|g| {
            let address = u64::from_le_bytes(g[4..12].try_into().ok()?);
            (g[0] == 1 && address != 0).then_some(address)
        });
        let legacy = fadt.get(field..field + 4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        let Some(base) = x.or(legacy.filter(|&p| p != 0)) else { continue };
        let (Ok(first), true) = (u16::try_from(base), len > 0) else { continue };
        if let Some(last) = first.checked_add(u16::from(len) - 1) {
            out.push((first, last));
        }
    }
    out
}

/// Finds the FADT through the RSDP copy GRUB handed over.
pub fn find_fadt(phys: &impl HostPhys, rsdp_bytes: &[u8]) -> Result<Vec<u8>, AcpiError> {
    let rsdp = Rsdp::parse(rsdp_bytes)?;
    let facp =
        tables(phys, &rsdp)?.into_iter().find(|t| &t.signature == b"FACP").ok_or(AcpiError::NotFound(*b"FACP"))?;
    read_table(phys, facp.address)
}

/// Finds the FADT through the RSDP copy GRUB handed over, and returns its
/// PM1a control port.
pub fn find_pm1a_control_port(phys: &impl HostPhys, rsdp_bytes: &[u8]) -> Result<u16, AcpiError> {
    pm1a_control_port(&find_fadt(phys, rsdp_bytes)?).ok_or(AcpiError::NotFound(*b"FACP"))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::guest::memory::fake::FakePhys;

    /// Writes a table with a correct checksum at `at`.
    pub fn put_table(phys: &FakePhys, at: u64, signature: &[u8; 4], body: &[u8]) {
        let mut t = alloc::vec![0u8; 36];
        t[..4].copy_from_slice(signature);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[9] = 0u8.wrapping_sub(checksum(&t));
        phys.write(at, &t);
    }

    pub fn rsdp(rsdt: u32, xsdt: Option<u64>) -> Vec<u8> {
        let mut r = alloc::vec![0u8; 36];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[15] = if xsdt.is_some() { 2 } else { 0 };
        r[16..20].copy_from_slice(&rsdt.to_le_bytes());
        r[8] = 0u8.wrapping_sub(checksum(&r[..20]));
        if let Some(x) = xsdt {
            r[20..24].copy_from_slice(&36u32.to_le_bytes());
            r[24..32].copy_from_slice(&x.to_le_bytes());
            r[32] = 0u8.wrapping_sub(checksum(&r));
            Vec::from(&r[..])
        } else {
            Vec::from(&r[..20])
        }
    }

    fn fadt_body(pm1a: u32) -> Vec<u8> {
        let mut body = alloc::vec![0u8; 276 - 36];
        body[64 - 36..68 - 36].copy_from_slice(&pm1a.to_le_bytes());
        body
    }

    #[test]
    fn finds_the_pm1a_port_through_rsdt_and_xsdt() {
        let phys = FakePhys::new(0, 0x10000);
        put_table(&phys, 0x3000, b"FACP", &fadt_body(0xb004));
        put_table(&phys, 0x2000, b"APIC", &[0; 8]);
        let mut rsdt_body = Vec::new();
        rsdt_body.extend_from_slice(&0x2000u32.to_le_bytes());
        rsdt_body.extend_from_slice(&0x3000u32.to_le_bytes());
        put_table(&phys, 0x1000, b"RSDT", &rsdt_body);
        assert_eq!(find_pm1a_control_port(&phys, &rsdp(0x1000, None)), Ok(0xb004));

        let mut xsdt_body = Vec::new();
        xsdt_body.extend_from_slice(&0x3000u64.to_le_bytes());
        put_table(&phys, 0x4000, b"XSDT", &xsdt_body);
        assert_eq!(find_pm1a_control_port(&phys, &rsdp(0x1000, Some(0x4000))), Ok(0xb004));
    }

    #[test]
    fn the_rsdp_is_found_in_the_bios_areas() {
        let phys = FakePhys::new(0, 0x10_0000);
        assert_eq!(find_rsdp(&phys), None);
        // A signature with a bad checksum first, then a good v1 table.
        let mut bad = rsdp(0x1000, None);
        bad[8] ^= 1;
        phys.write(0xe_0010, &bad);
        phys.write(0xf_5a40, &rsdp(0x1234, None));
        assert_eq!(find_rsdp(&phys).map(|r| Rsdp::parse(&r).unwrap().rsdt), Some(0x1234));
        // The EBDA comes first; a v2 RSDP is returned whole.
        phys.write(0x40e, &0x9fc0u16.to_le_bytes());
        phys.write(0x9_fc00 + 0x20, &rsdp(0x5678, Some(0x9000)));
        let found = find_rsdp(&phys).unwrap();
        assert_eq!(found.len(), 36);
        assert_eq!(Rsdp::parse(&found).unwrap().xsdt, Some(0x9000));
    }

    #[test]
    fn fadt_port_blocks() {
        // Bochs' PIIX4: PM1a_EVT 0xb000 (4), PM1a_CNT 0xb004 (2), PM_TMR 0xb008 (4), GPE0 0xafe0 (4).
        let mut fadt = alloc::vec![0u8; 244];
        for (field, value) in [(48usize, 0xb2u32), (56, 0xb000), (64, 0xb004), (76, 0xb008), (80, 0xafe0)] {
            fadt[field..field + 4].copy_from_slice(&value.to_le_bytes());
        }
        fadt[88] = 4;
        fadt[89] = 2;
        fadt[91] = 4;
        fadt[92] = 4;
        assert_eq!(
            fadt_ports(&fadt),
            [(0xb2, 0xb2), (0xb000, 0xb003), (0xb004, 0xb005), (0xb008, 0xb00b), (0xafe0, 0xafe3)]
        );
        assert_eq!(pm_timer_port(&fadt), Some(0xb008));
        assert_eq!(pm_timer_port(&fadt[..78]), None);
        // An X_ block naming memory, not ports, is not taken; one naming ports wins.
        fadt[172] = 0;
        fadt[176..184].copy_from_slice(&0xfed0_0000u64.to_le_bytes());
        fadt[208] = 1;
        fadt[212..220].copy_from_slice(&0x608u64.to_le_bytes());
        assert_eq!(fadt_ports(&fadt)[2..4], [(0xb004, 0xb005), (0x608, 0x60b)]);
        // Short or hostile tables: no panic, blocks that do not fit dropped.
        assert_eq!(fadt_ports(&fadt[..60]), [(0xb2, 0xb2)]);
        fadt[64..68].copy_from_slice(&0xffffu32.to_le_bytes());
        assert!(!fadt_ports(&fadt).contains(&(0xffff, 0x0000)));
    }

    #[test]
    fn bad_checksums_and_lengths_are_refused() {
        let phys = FakePhys::new(0, 0x10000);
        let mut bad = rsdp(0x1000, None);
        bad[8] ^= 1;
        assert_eq!(Rsdp::parse(&bad), Err(AcpiError::BadRsdp));
        assert_eq!(Rsdp::parse(b"RSD PTR"), Err(AcpiError::BadRsdp));
        put_table(&phys, 0x1000, b"RSDT", &[0; 4]);
        phys.bytes.borrow_mut()[0x1020] ^= 0xff;
        assert!(matches!(read_table(&phys, 0x1000), Err(AcpiError::BadTable { .. })));
        // A length below the header size.
        phys.write(0x2000, b"FACP\x10\x00\x00\x00");
        assert!(matches!(read_table(&phys, 0x2000), Err(AcpiError::BadTable { .. })));
    }
}
