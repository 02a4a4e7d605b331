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

/// Finds the FADT through the RSDP copy GRUB handed over, and returns its
/// PM1a control port.
pub fn find_pm1a_control_port(phys: &impl HostPhys, rsdp_bytes: &[u8]) -> Result<u16, AcpiError> {
    let rsdp = Rsdp::parse(rsdp_bytes)?;
    let facp =
        tables(phys, &rsdp)?.into_iter().find(|t| &t.signature == b"FACP").ok_or(AcpiError::NotFound(*b"FACP"))?;
    let fadt = read_table(phys, facp.address)?;
    pm1a_control_port(&fadt).ok_or(AcpiError::NotFound(*b"FACP"))
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
