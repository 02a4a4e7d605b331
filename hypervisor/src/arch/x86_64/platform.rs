//! Start-up of the platform pieces, before VMX and before any guest: the
//! ACPI tables CTVM needs, the IOMMU, the platform TPM and tboot. Each
//! piece that is missing is said so on the console, and CTVM goes on.
//!
//! Then the way out: [`power_off`] is the only way the hypervisor ends a
//! run once the platform is up (DMA faults reported, the platform TPM shut
//! down in order, tboot's shutdown entry called after a measured launch).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use log::{debug, info, warn};
use spin::Mutex;

use super::mmio::MmioRegion;
use super::{cpu, iommu, power};
use crate::acpi;
use crate::boot_info::BootInfo;
use crate::guest::linux::{self, boot_data, e820, E820Entry};
use crate::guest::memory::HostPhys;
use crate::mm::frames::Region;
use crate::mm::phys::Identity;
use crate::platform::tpm::launch::{self, PlatformTpm};
use crate::platform::tpm::seal;
use crate::platform::tpm::tpm2::alg_name;
use crate::platform::tpm::{self, crb::Crb, tis::Tis, Family, Interface, Transport};
use crate::platform::{dma, dmar, tboot, txt};

/// The platform TPM, kept for the hypervisor's own use after the launch.
pub type Chip = PlatformTpm<Box<dyn Transport + Send>>;

static PLATFORM_TPM: Mutex<Option<Chip>> = Mutex::new(None);

/// Runs `f` on the platform TPM, if there is one (sealing the vTPM state
/// key, the monotonic counter).
pub fn with_platform_tpm<R>(f: impl FnOnce(&mut Chip) -> R) -> Option<R> {
    PLATFORM_TPM.lock().as_mut().map(f)
}

/// What the platform pieces found and took.
pub struct Platform {
    /// What the guest must never reach, absent from its EPT like the
    /// hypervisor's memory and reserved in its e820: the remapping units'
    /// registers, tboot's memory and log, the TXT heap and what SINIT
    /// protects.
    pub hidden: Vec<Region>,
}

/// tboot's shared page after a measured launch: where to go at shutdown.
static TBOOT: Mutex<Option<tboot::Shared>> = Mutex::new(None);

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
    if cpu::hardware_random().is_none() {
        warn!(
            "no hardware random number generator (RDSEED and RDRAND absent or failing): the vTPMs' keys and nonces \
             and the platform TPM's session secrets come from the time-stamp counter, which an attacker may guess"
        );
    }
    let mut platform = Platform { hidden: Vec::new() };
    let sinit_dmar = start_tboot(boot, &mut platform);
    let mut keep = keep.to_vec();
    keep.extend(platform.hidden.iter().copied());
    start_iommu(boot, &keep, device_owner, sinit_dmar, &mut platform);
    start_tpm(boot);
    platform
}

/// Copies `len` bytes of physical memory.
fn read_phys(address: u64, len: usize) -> Vec<u8> {
    let mut buf = alloc::vec![0u8; len];
    Identity.read(address, &mut buf);
    buf
}

/// What tboot left: its log (measured launch or not), and after a measured
/// launch its shared page and the TXT heap. Returns SINIT's copy of the
/// DMAR table, if any.
fn start_tboot(boot: &BootInfo, platform: &mut Platform) -> Option<Vec<u8>> {
    let log = tboot::parse_log(&read_phys(tboot::LOG_ADDR, tboot::LOG_SIZE as usize));
    if let Some(l) = &log {
        info!(
            "tboot {}: its memory log at {:#x} ({} bytes used) stays reserved",
            l.version.as_deref().unwrap_or("(version unknown)"),
            tboot::LOG_ADDR,
            l.used
        );
        platform.hidden.push(Region::new(tboot::LOG_ADDR, tboot::LOG_ADDR + tboot::LOG_SIZE));
    }
    let shared = match tboot::shared_page_address(&boot.cmdline) {
        Ok(address) => {
            let mut page = [0u8; 4096];
            Identity.read(address, &mut page);
            tboot::parse_shared(address, &page)
        }
        Err(e) => Err(e),
    };
    let shared = match shared {
        Ok(s) => s,
        Err(tboot::TbootError::NotLaunched) => {
            if log.is_some() {
                info!(
                    "tboot: no measured launch (no TXT): no shared page was handed over, nothing to call at shutdown"
                );
            }
            return None;
        }
        Err(e) => {
            warn!("tboot: {e}: the shared page is ignored (no measured launch is assumed)");
            return None;
        }
    };
    info!(
        "tboot: measured launch: shared page {:#x} (version {}), tboot's memory {:?} kept, shutdown entry {:#x}, {} CPU(s) waiting for SIPI",
        shared.address, shared.version, shared.tboot, shared.shutdown_entry, shared.waiting_cpus
    );
    platform.hidden.push(shared.tboot);
    // TXT's register spaces: a guest must not open localities 2 and 3 or
    // clear the secrets flag (TXT.CMD.NO-SECRETS) behind CTVM's back.
    platform.hidden.extend([txt::reg::PRIVATE_SPACE, txt::reg::PUBLIC_SPACE]);
    *TBOOT.lock() = Some(shared);
    start_txt(platform)
}

/// The TXT heap, after a measured launch.
fn start_txt(platform: &mut Platform) -> Option<Vec<u8>> {
    let mut regs = MmioRegion::new(txt::reg::PUBLIC_BASE, 0x1000)?;
    use crate::platform::Mmio;
    if regs.read64(txt::reg::STS) & txt::reg::STS_SENTER_DONE == 0 {
        warn!("tboot: TXT.STS says SENTER did not complete: the TXT heap is not read");
        return None;
    }
    let (base, size) = (regs.read64(txt::reg::HEAP_BASE), regs.read64(txt::reg::HEAP_SIZE));
    if size == 0 || size > 16 << 20 || base.checked_add(size).is_none_or(|e| e > 4 << 30) {
        warn!("TXT: heap {base:#x}+{size:#x} out of reach");
        return None;
    }
    platform.hidden.push(Region::new(base, base + size));
    match txt::parse(&read_phys(base, size as usize)) {
        Ok(heap) => {
            info!(
                "TXT: heap {base:#x}+{size:#x}: SINIT-to-MLE data version {}, {} memory descriptor(s), DMAR copy of {} bytes; PMRs low {:?} high {:?}",
                heap.sinit_mle_version,
                heap.mdrs.len(),
                heap.dmar.as_ref().map_or(0, Vec::len),
                heap.pmr_low,
                heap.pmr_high
            );
            platform.hidden.extend(heap.reserved());
            heap.dmar
        }
        Err(e) => {
            warn!("TXT: the heap does not parse ({e:?})");
            None
        }
    }
}

/// The PCRs the vTPM state key is sealed to: CTVM's configuration, and
/// after a measured launch the dynamic PCRs SINIT and tboot extended
/// (17: tboot and its policy, 18: what tboot measured, CTVM included).
pub fn seal_pcrs() -> Vec<u32> {
    let mut pcrs = alloc::vec![launch::PCR_CONFIG];
    if TBOOT.lock().is_some() {
        pcrs.extend([17, 18]);
    }
    pcrs
}

fn nonce() -> [u8; 20] {
    let mut out = [0u8; 20];
    for chunk in out.chunks_mut(8) {
        let r = cpu::hardware_random().unwrap_or_else(cpu::rdtsc).to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    out
}

/// The vTPM state key's side in the platform TPM, for `vtpm_trust`:
/// seals `key` to [`seal_pcrs`]; the blob goes with the vTPM's state.
pub fn seal_vtpm_key(key: &[u8; 32]) -> Result<Vec<u8>, String> {
    let pcrs = seal_pcrs();
    with_platform_tpm(|chip| seal::seal_key(chip, key, &pcrs, &mut nonce))
        .ok_or_else(|| String::from("no platform TPM"))?
        .map_err(|e| alloc::format!("{e}"))
}

/// Releases a key [`seal_vtpm_key`] sealed: only under the same CTVM
/// configuration (and, after TXT, the same measured launch).
pub fn unseal_vtpm_key(blob: &[u8]) -> Result<[u8; 32], String> {
    with_platform_tpm(|chip| seal::unseal_key(chip, blob, &mut nonce))
        .ok_or_else(|| String::from("no platform TPM"))?
        .map_err(|e| alloc::format!("{e}"))
}

/// CTVM's monotonic counter in the platform TPM (created on first use):
/// `advance` moves it forward by one; returns its value.
pub fn vtpm_counter(advance: bool) -> Result<u64, String> {
    with_platform_tpm(|chip| seal::vtpm_counter(chip, advance, &mut nonce))
        .ok_or_else(|| String::from("no platform TPM"))?
        .map_err(|e| alloc::format!("{e}"))
}

/// The platform TPM behind the vTPM roots (`tpm::anchor::PlatformRoot`
/// and `tpm::host::Host`): the three calls above.
#[derive(Clone, Copy, Debug)]
pub struct Sealer;

impl Sealer {
    /// The sealer, when the platform TPM measured CTVM's launch (without
    /// that, nothing to seal to).
    pub fn found() -> Option<Sealer> {
        with_platform_tpm(|_| Sealer)
    }
}

impl crate::tpm::anchor::PlatformSeal for Sealer {
    fn seal(&self, key: &[u8; 32]) -> Result<Vec<u8>, String> {
        seal_vtpm_key(key)
    }

    fn unseal(&self, sealed: &[u8]) -> Result<[u8; 32], String> {
        unseal_vtpm_key(sealed)
    }

    fn counter(&self, advance: bool) -> Result<u64, String> {
        vtpm_counter(advance)
    }
}

/// The ACPI PM timer's port, from the FADT.
pub fn pm_timer_port(boot: &BootInfo) -> Option<u16> {
    acpi::pm_timer_port(&acpi::find_fadt(&Identity, boot.rsdp.as_deref()?).ok()?)
}

/// TSC ticks per microsecond, from the ACPI PM timer (3.579545 MHz) over
/// about 5 ms; `None` without one.
fn tsc_per_us(boot: &BootInfo) -> Option<u64> {
    let port = pm_timer_port(boot)?;
    // SAFETY: the FADT's PM timer block; reading it has no side effect.
    let read = || unsafe { cpu::inl(port) } & 0x00ff_ffff;
    let (p0, t0) = (read(), cpu::rdtsc());
    let mut p1 = p0;
    while (p1.wrapping_sub(p0) & 0x00ff_ffff) < 17_898 {
        p1 = read();
    }
    let ticks = cpu::rdtsc().wrapping_sub(t0);
    let us = u64::from(p1.wrapping_sub(p0) & 0x00ff_ffff) * 1_000_000 / 3_579_545;
    (us > 0).then(|| (ticks / us).max(1))
}

/// Finds the platform TPM through ACPI, starts it, and measures CTVM's
/// configuration and its guests into it with a TCG event log (see
/// `platform::tpm::launch`). The log and the PCRs go to the console at
/// `log=debug`, for a verifier.
fn start_tpm(boot: &BootInfo) {
    let tpm2_table = firmware_table(boot, b"TPM2");
    let tcpa_table = firmware_table(boot, b"TCPA");
    let (family, interface) = match tpm::from_acpi(tpm2_table.as_deref(), tcpa_table.as_deref()) {
        Ok(found) => found,
        Err(e) => {
            warn!("no platform TPM ({e}): CTVM's launch is not measured, the vTPM state key cannot be sealed");
            return;
        }
    };
    let opened: Result<Box<dyn Transport + Send>, tpm::TransportError> = match interface {
        Interface::Tis => MmioRegion::new(tpm::TPM_BASE, tpm::TPM_WINDOW)
            .ok_or(tpm::TransportError::Protocol("out of reach"))
            .and_then(|regs| Tis::open(regs, 0))
            .map(|t| Box::new(t) as Box<dyn Transport + Send>),
        Interface::Crb { base } => MmioRegion::new(base, 0x1000)
            .ok_or(tpm::TransportError::Protocol("out of reach"))
            .and_then(|regs| Crb::open(regs, base))
            .map(|t| Box::new(t) as Box<dyn Transport + Send>),
    };
    let what = match (family, interface) {
        (Family::V12, _) => "1.2 via TIS",
        (Family::V2, Interface::Tis) => "2.0 via TIS",
        (Family::V2, Interface::Crb { .. }) => "2.0 via CRB",
    };
    let transport = match opened {
        Ok(t) => t,
        Err(e) => {
            warn!("platform TPM {what}: {e}; CTVM's launch is not measured");
            return;
        }
    };
    let mut chip: Chip = PlatformTpm::new(family, transport);
    let modules: Vec<(&[u8], &str)> =
        boot.modules.iter().map(|m| (crate::vmm::module_bytes(m), m.cmdline.as_str())).collect();
    let measurements = launch::measurements(&boot.cmdline, &modules);
    let per_us = tsc_per_us(boot);
    let start = cpu::rdtsc();
    let result = launch::measure(&mut chip, &measurements, &mut cpu::rdtsc);
    let total = cpu::rdtsc().wrapping_sub(start);
    match result {
        Ok(l) => {
            let banks: Vec<&str> = l.banks.iter().map(|&b| alg_name(b)).collect();
            let us =
                |ticks: u64| per_us.map_or(alloc::format!("{ticks} TSC ticks"), |r| alloc::format!("{} us", ticks / r));
            info!(
                "platform TPM {what}: {}; banks {}; {} events measured into PCRs {} and {}",
                if l.started { "started by CTVM" } else { "started by firmware" },
                banks.join(" "),
                measurements.len(),
                launch::PCR_CONFIG,
                launch::PCR_GUESTS
            );
            info!(
                "platform TPM: the measured launch took {} ({} in TPM commands, {} hashing)",
                us(total),
                us(l.tpm_ticks),
                us(l.hash_ticks)
            );
            for (pcr, bank, value) in &l.pcrs {
                debug!("platform-pcr {pcr} {} {}", alg_name(*bank), launch::hex(value));
            }
            for chunk in l.log.chunks(96) {
                debug!("platform-log {}", launch::hex(chunk));
            }
            debug!("platform-log end ({} bytes)", l.log.len());
            *PLATFORM_TPM.lock() = Some(chip);
        }
        Err(e) => warn!("platform TPM {what}: the measured launch failed: {e}"),
    }
}

fn start_iommu(
    boot: &BootInfo,
    keep: &[Region],
    device_owner: bool,
    sinit_dmar: Option<Vec<u8>>,
    platform: &mut Platform,
) {
    // After a measured launch, SINIT's verified copy rather than firmware's.
    let Some(table) = sinit_dmar.or_else(|| firmware_table(boot, b"DMAR")) else {
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

/// Ends the run: takes every other CPU out of VMX (see `park`), reports
/// the last DMA faults, shuts the platform TPM down in order, leaves VMX,
/// then powers off (or halts) with `code`. After a measured launch, tboot
/// ends it instead (see [`tboot_shutdown`]).
pub fn power_off(code: u8) -> ! {
    super::park::others();
    iommu::report_faults();
    if let Some(chip) = PLATFORM_TPM.lock().as_mut() {
        if let PlatformTpm::V2(t) = chip {
            if let Err(e) = t.shutdown() {
                warn!("platform TPM: orderly shutdown failed: {e}");
            }
        }
        // tboot asks for its own locality at shutdown.
        match chip {
            PlatformTpm::V2(t) => t.transport.relinquish(),
            PlatformTpm::V12(t) => t.transport.relinquish(),
        }
    }
    if let Some(shared) = TBOOT.lock().clone() {
        tboot_shutdown(&shared, tboot::Shutdown::Halt);
    }
    super::vmx::enable::leave();
    power::stop_machine(code)
}

/// Hands the machine back to tboot: it caps the dynamic PCRs, scrubs
/// secrets, leaves the measured environment and halts (or reboots).
/// CTVM asks for a halt at power-off rather than S5: an S5 needs the
/// sleep type from the DSDT's AML, which CTVM does not interpret.
fn tboot_shutdown(shared: &tboot::Shared, kind: tboot::Shutdown) -> ! {
    info!("tboot: calling its shutdown entry {:#x} ({kind:?}): PCRs capped, secrets scrubbed", shared.shutdown_entry);
    super::serial::drain();
    super::vmx::enable::leave();
    // SAFETY: the shared page was validated (tboot's UUID, version, an
    // entry inside tboot's memory, which no guest or device could reach);
    // the first 4 GiB are identity mapped as tboot's 64-bit entry expects,
    // interrupts are off, and nothing of CTVM runs after this.
    unsafe {
        core::ptr::write_volatile((shared.address + 28) as *mut u32, kind as u32);
        core::arch::asm!("cli", "jmp {}", in(reg) shared.shutdown_entry, options(noreturn));
    }
}

/// VT-x is absent (an emulator without VMX): the platform pieces ran, no
/// guest can. A clean stop, not a fault.
pub fn without_vmx(why: String) -> ! {
    info!("VT-x is missing ({why}): the platform pieces ran; no guest can run on this processor; powering off");
    power_off(power::EXIT_NO_VMX)
}
