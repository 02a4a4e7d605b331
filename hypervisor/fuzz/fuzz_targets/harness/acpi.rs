//! The `acpi` target: the RSDP → RSDT/XSDT → FADT walk over firmware
//! memory the input fills (tables at chosen places, with right or wrong
//! checksums and lengths, pointers anywhere).
//!
//! Properties: the walk reads only inside the 4 GiB it may address and
//! never allocates for a table longer than 64 KiB; every table `read_table`
//! returns is at least a header long, sums to zero and is the bytes at its
//! address; every entry `tables` lists was read from the root table's
//! pointers; the PM1a port found is the FADT's.

use std::cell::Cell;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::acpi::{self, Rsdp};
use hypervisor::guest::memory::HostPhys;

/// Firmware memory: `bytes` at `base`, all-ones elsewhere below 4 GiB (as
/// unbacked physical addresses read); any read at or above 4 GiB panics.
struct Firmware {
    base: u64,
    bytes: Vec<u8>,
    read: Cell<u64>,
}

impl HostPhys for Firmware {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        let end = hpa.checked_add(buf.len() as u64).expect("read wraps");
        assert!(end <= 4 << 30, "read above 4 GiB: {hpa:#x}+{:#x}", buf.len());
        assert!(buf.len() <= 64 * 1024, "read of {:#x} bytes", buf.len());
        self.read.set(self.read.get() + buf.len() as u64);
        for (i, b) in buf.iter_mut().enumerate() {
            let at = hpa + i as u64;
            *b = at.checked_sub(self.base).and_then(|o| self.bytes.get(o as usize)).copied().unwrap_or(0xff);
        }
    }
    fn write(&self, hpa: u64, _: &[u8]) {
        panic!("the ACPI walk wrote firmware memory at {hpa:#x}");
    }
    fn compare_exchange_u64(&self, hpa: u64, _: u64, _: u64) -> bool {
        panic!("the ACPI walk wrote firmware memory at {hpa:#x}");
    }
}

#[derive(Arbitrary, Debug)]
struct Table {
    signature: u8,
    /// Offset in the firmware area (or an address anywhere).
    at: Result<u16, u32>,
    body: Vec<u8>,
    fix_length: bool,
    fix_checksum: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    revision: u8,
    rsdp_fix: bool,
    root: u16,
    xsdt: Option<u16>,
    tables: Vec<Table>,
    /// Root-table entries: indices of the tables above, or raw addresses.
    entries: Vec<Result<u8, u64>>,
}

const BASE: u64 = 0xe_0000;
const SIGNATURES: [&[u8; 4]; 6] = [b"RSDT", b"XSDT", b"FACP", b"APIC", b"DMAR", b"TPM2"];

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut fw = Firmware { base: BASE, bytes: vec![0; 0x2_0000], read: Cell::new(0) };
    let address = |t: &Table| match t.at {
        Ok(off) => BASE + u64::from(off),
        Err(any) => u64::from(any),
    };
    let root_at = BASE + u64::from(input.root);
    let xsdt_at = input.xsdt.map(|x| BASE + u64::from(x));
    // The root tables, then the others, each written where it says.
    let root = |sig: &[u8; 4], at: u64, width: usize, fw: &mut Firmware| {
        let mut body = Vec::new();
        for e in input.entries.iter().take(16) {
            let a = match e {
                Ok(i) => input.tables.get(usize::from(*i) % input.tables.len().max(1)).map_or(0, address),
                Err(any) => *any,
            };
            body.extend_from_slice(&a.to_le_bytes()[..width]);
        }
        put(fw, at, sig, &body, true, true);
    };
    root(b"RSDT", root_at, 4, &mut fw);
    if let Some(x) = xsdt_at {
        root(b"XSDT", x, 8, &mut fw);
    }
    for t in input.tables.iter().take(8) {
        let sig = SIGNATURES[usize::from(t.signature) % SIGNATURES.len()];
        put(&mut fw, address(t), sig, &t.body, t.fix_length, t.fix_checksum);
    }
    let mut rsdp = vec![0u8; 36];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[15] = input.revision;
    rsdp[16..20].copy_from_slice(&(root_at as u32).to_le_bytes());
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt_at.unwrap_or(0).to_le_bytes());
    if input.rsdp_fix {
        rsdp[8] = 0u8.wrapping_sub(acpi::checksum(&rsdp[..20]));
        rsdp[32] = 0u8.wrapping_sub(acpi::checksum(&rsdp[..36]));
    }
    let Ok(parsed) = Rsdp::parse(&rsdp) else { return };
    if let Ok(tables) = acpi::tables(&fw, &parsed) {
        for t in &tables {
            assert!(t.address.checked_add(8).is_some_and(|e| e <= 4 << 30), "{t:?}");
            if let Ok(bytes) = acpi::read_table(&fw, t.address) {
                assert!(bytes.len() >= 36 && bytes.len() <= 64 * 1024);
                assert_eq!(acpi::checksum(&bytes), 0, "a table with a bad checksum was accepted");
                assert_eq!(&bytes[..4], &t.signature, "signature not the table's");
                let mut again = vec![0; bytes.len()];
                fw.read(t.address, &mut again);
                assert_eq!(bytes, again, "table bytes are not memory's");
                if &t.signature == b"FACP" {
                    let _ = acpi::pm1a_control_port(&bytes);
                }
            }
        }
    }
    if let Ok(port) = acpi::find_pm1a_control_port(&fw, &rsdp) {
        assert_ne!(port, 0);
    }
}

/// Writes a table (header + body) at `at` if it fits the firmware area.
fn put(fw: &mut Firmware, at: u64, sig: &[u8; 4], body: &[u8], fix_length: bool, fix_checksum: bool) {
    let mut t = vec![0u8; 36];
    t[..4].copy_from_slice(sig);
    t.extend_from_slice(body);
    if fix_length {
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
    } else if let Some(b) = body.get(..4) {
        t[4..8].copy_from_slice(b);
    }
    if fix_checksum {
        t[9] = 0u8.wrapping_sub(acpi::checksum(&t));
    }
    let Some(off) = at.checked_sub(fw.base) else { return };
    let off = off as usize;
    if let Some(dst) = fw.bytes.get_mut(off..off + t.len()) {
        dst.copy_from_slice(&t);
    }
}
