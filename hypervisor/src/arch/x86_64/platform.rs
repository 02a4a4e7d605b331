//! Start-up of the platform pieces, before VMX and before any guest: the
//! ACPI tables CTVM needs, the IOMMU, the platform TPM and tboot. Each
//! piece that is missing is said so on the console, and CTVM goes on.
//!
//! Then the way out: [`power_off`] is the only way the hypervisor ends a
//! run once the platform is up (DMA faults reported, the platform TPM shut
//! down in order, tboot's shutdown entry called after a measured launch).

use alloc::string::String;
use alloc::vec::Vec;

use log::{info, warn};

use super::{iommu, power};
use crate::acpi;
use crate::boot_info::BootInfo;
use crate::guest::linux::{self, boot_data, e820, E820Entry};
use crate::mm::frames::Region;
use crate::mm::phys::Identity;
use crate::platform::{dma, dmar};

/// What the platform pieces found and took.
pub struct Platform {
    /// Register blocks the guest must never reach (the remapping units'):
    /// absent from its EPT like the hypervisor's memory.
    pub hidden: Vec<Region>,
}

/// The firmware ACPI tables by signature, read whole and checksummed.
fn firmware_table(boot: &BootInfo, signature: &[u8; 4]) -> Option<Vec<u8>> {
    let rsdp = acpi::Rsdp::parse(boot.rsdp.as_deref()?).ok()?;
    let tables = acpi::tables(&Identity, &rsdp).ok()?;
    let t = tables.iter().find(|t| &t.signature == signature)?;
    acpi::read_table(&Identity, t.address).ok()
}

/// The guest's e820 map as `vmm` builds it for a guest that owns the
/// machine: the firmware's map with the hypervisor's ranges and the boot
/// data reserved.
fn device_owner_e820(boot: &BootInfo, keep: &[Region]) -> Vec<E820Entry> {
    let mut overlays: Vec<E820Entry> = keep.iter().map(|&r| E820Entry { region: r, kind: e820::RESERVED }).collect();
    overlays.push(E820Entry { region: boot_data::region(), kind: e820::RESERVED });
    linux::build_e820(&boot.memory, &overlays).unwrap_or_default()
}

/// Brings the platform up. `keep` is what the hypervisor keeps (image,
/// pool, other guests' modules); `device_owner`: a guest will own the
/// machine's devices (DMA into its memory is then allowed).
pub fn start(boot: &BootInfo, keep: &[Region], device_owner: bool) -> Platform {
    let mut platform = Platform { hidden: Vec::new() };
    start_iommu(boot, keep, device_owner, &mut platform);
    platform
}

fn start_iommu(boot: &BootInfo, keep: &[Region], device_owner: bool, platform: &mut Platform) {
    let Some(table) = firmware_table(boot, b"DMAR") else {
        warn!("DMA is not contained: no IOMMU (no ACPI DMAR table); a device a guest programs can write anywhere");
        return;
    };
    let dmar = match dmar::parse(&table) {
        Ok(d) if !d.units.is_empty() => d,
        Ok(_) => {
            warn!("DMA is not contained: the DMAR table lists no remapping unit");
            return;
        }
        Err(e) => {
            warn!("DMA is not contained: the DMAR table is malformed ({e})");
            return;
        }
    };
    platform.hidden.extend(dmar.units.iter().map(|u| Region::new(u.base, u.base + u.size.max(4096))));
    let (grants, refused) = if device_owner {
        dma::pass_through_grants(&device_owner_e820(boot, keep), keep, &dmar.reserved)
    } else {
        (Vec::new(), Vec::new())
    };
    // A guest that owns the devices programs its own MSIs and IOAPIC
    // entries in compatibility format, which remapping would block.
    let remap_interrupts = !device_owner;
    match iommu::take_over(&dmar, &grants, refused, remap_interrupts) {
        Ok(s) => {
            info!(
                "DMA contained: {} remapping unit(s), {}-level tables, devices reach {} MiB of guest memory{}",
                s.units,
                s.levels,
                s.granted >> 20,
                if s.pmr_was_on { "; TXT's protected memory ranges handed over" } else { "" }
            );
            for r in &s.refused_rmrr {
                warn!("DMA: firmware reserved region {r:?} overlaps the hypervisor: not mapped for devices");
            }
            if s.interrupt_remapping {
                info!("interrupt remapping on: no device interrupt reaches a CPU (no guest owns the devices)");
            } else if device_owner {
                info!(
                    "interrupt remapping off: the guest that owns the devices programs their interrupts itself; \
                     the hypervisor takes no device interrupt (it runs with interrupts masked)"
                );
            }
        }
        Err(why) => warn!("DMA is not contained: {why}"),
    }
}

/// Ends the run: reports the last DMA faults, then powers off (or halts)
/// with `code`.
pub fn power_off(code: u8) -> ! {
    iommu::report_faults();
    power::stop_machine(code)
}

/// VT-x is absent (an emulator without VMX): the platform pieces ran, no
/// guest can. A clean stop, not a fault.
pub fn without_vmx(why: String) -> ! {
    info!("VT-x is missing ({why}): the platform pieces ran; no guest can run on this processor; powering off");
    power_off(power::EXIT_NO_VMX)
}
