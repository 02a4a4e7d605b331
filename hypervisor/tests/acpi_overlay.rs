//! The ACPI tables CTVM gives a guest, read back by parsers that are not
//! CTVM's: the `acpi` crate walks RSDP → XSDT → tables and checks every
//! checksum, and ACPICA's `iasl` (the AML compiler Linux's ACPI code comes
//! from) disassembles the SSDT.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::rc::Rc;

use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use hypervisor::acpi::build;

const BASE: u64 = 0x7_9000;
const FIRMWARE_TABLE: u64 = 0x7_8000;

/// Guest memory from 0x70000, as a buffer.
#[derive(Clone)]
struct Memory(Rc<RefCell<Vec<u8>>>);

impl Memory {
    fn ptr(&self, phys: usize) -> *mut u8 {
        let mut b = self.0.borrow_mut();
        let off = phys.checked_sub(0x7_0000).expect("the parser read below the overlay");
        assert!(off < b.len(), "the parser read outside the overlay: {phys:#x}");
        // SAFETY: in bounds of the buffer, which outlives every mapping in these tests.
        unsafe { b.as_mut_ptr().add(off) }
    }
}

impl AcpiHandler for Memory {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let virt = NonNull::new(self.ptr(physical_address).cast()).unwrap();
        // SAFETY: the pointer is into the test's buffer, valid for `size` bytes.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, self.clone()) }
    }
    fn unmap_physical_region<T>(_: &PhysicalMapping<Self, T>) {}
}

/// The overlay plus one stand-in firmware table, in a buffer.
fn guest_memory() -> (Memory, build::Overlay, Vec<u8>) {
    let mut mem = vec![0u8; 0x1_0000];
    // The firmware's MADT: two processors (APIC IDs 0 and 1) and an IOAPIC.
    let mut apic = b"APIC".to_vec();
    apic.extend_from_slice(&0u32.to_le_bytes());
    apic.extend_from_slice(&[3, 0]);
    apic.extend_from_slice(b"BOCHS BXPCAPIC");
    apic.extend_from_slice(&[0; 12]);
    apic.extend_from_slice(&[0, 0, 0xe0, 0xfe, 1, 0, 0, 0]);
    apic.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
    apic.extend_from_slice(&[0, 8, 1, 1, 1, 0, 0, 0]);
    apic.extend_from_slice(&[1, 12, 2, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
    let len = apic.len() as u32;
    apic[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = apic.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    apic[9] = 0u8.wrapping_sub(sum);
    let at = (FIRMWARE_TABLE - 0x7_0000) as usize;
    mem[at..at + apic.len()].copy_from_slice(&apic);
    // The guest's: its one CPU, and its vTPM.
    let tables =
        [build::madt_for(&apic, &[0]).unwrap(), build::tcpa(0x7_c000, 0x4000), build::ssdt_tpm(0xfed4_0000, 0x5000)];
    let (bytes, overlay) = build::overlay(BASE, 0x3000, &[(FIRMWARE_TABLE, *b"APIC")], &tables).unwrap();
    let at = (BASE - 0x7_0000) as usize;
    mem[at..at + bytes.len()].copy_from_slice(&bytes);
    let ssdt_at = bytes.windows(4).position(|w| w == b"SSDT").unwrap();
    let len = u32::from_le_bytes(bytes[ssdt_at + 4..ssdt_at + 8].try_into().unwrap()) as usize;
    let ssdt = bytes[ssdt_at..ssdt_at + len].to_vec();
    (Memory(Rc::new(RefCell::new(mem))), overlay, ssdt)
}

#[test]
fn the_acpi_crate_walks_the_overlay() {
    let (mem, overlay, _) = guest_memory();
    // SAFETY: the RSDP address points into the test's buffer.
    let tables = unsafe { AcpiTables::from_rsdp(mem, overlay.rsdp as usize) }.expect("a valid RSDP and XSDT");
    // The crate skips any table whose signature, OEM ID or checksum is wrong.
    let mut names: Vec<String> = tables.headers().map(|h| h.signature.as_str().to_string()).collect();
    names.sort();
    assert_eq!(names, ["APIC", "SSDT", "TCPA"]);
    // The MADT the guest finds lists its one processor and the IOAPIC.
    let madt = tables.find_table::<acpi::madt::Madt>().expect("a MADT");
    assert_ne!(madt.physical_start(), FIRMWARE_TABLE as usize, "the guest's MADT, not the firmware's");
    let (mut cpus, mut ioapics) = (0, 0);
    for entry in madt.get().entries() {
        match entry {
            acpi::madt::MadtEntry::LocalApic(e) => {
                assert_eq!(e.apic_id, 0);
                cpus += 1;
            }
            acpi::madt::MadtEntry::IoApic(_) => ioapics += 1,
            _ => {}
        }
    }
    assert_eq!((cpus, ioapics), (1, 1));
    let ssdts: Vec<_> = tables.ssdts().collect();
    assert_eq!(ssdts.len(), 1);
    assert!(ssdts[0].length > 20, "the SSDT carries AML");
}

#[test]
fn iasl_disassembles_the_ssdt_to_the_tpm_device() {
    let (_, _, ssdt) = guest_memory();
    let dir = std::env::temp_dir().join(format!("ctvm-ssdt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let aml = dir.join("ssdt.aml");
    std::fs::write(&aml, &ssdt).unwrap();
    let out = std::process::Command::new("iasl")
        .current_dir(&dir)
        .args(["-d", "ssdt.aml"])
        .output()
        .expect("iasl is missing: install the Debian package acpica-tools (cargo xtask test does)");
    assert!(out.status.success(), "iasl failed: {}", String::from_utf8_lossy(&out.stderr));
    let dsl = std::fs::read_to_string(dir.join("ssdt.dsl")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if std::env::var_os("CTVM_SHOW_SSDT").is_some() {
        println!("{dsl}");
    }
    assert!(dsl.contains("Device (TPM)"), "{dsl}");
    assert!(dsl.contains("EisaId (\"PNP0C31\")"), "{dsl}");
    assert!(dsl.contains("Memory32Fixed (ReadWrite,"), "{dsl}");
    assert!(dsl.contains("0xFED40000"), "{dsl}");
    assert!(dsl.contains("0x00005000"), "{dsl}");
    assert!(!dsl.contains("Invalid"), "{dsl}");
}
