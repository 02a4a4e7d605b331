//! Scenario hooks of the test image (`ctvm-test`, feature `test-hooks`):
//! attacks the release image cannot be made to perform. Each runs only
//! when its `test.*` option is on the test image's command line.
//!
//! - `test.fault`: a page fault inside the hypervisor (scenario
//!   `hypervisor-fault`).
//! - `test.corrupt-guest=NAME`: a guest whose VM entry must fail (scenario
//!   `entry-failure`).
//! - `test.stall-ap=N`: CPU N stops before VMXON without a word; the boot
//!   CPU reports it and goes on without it (scenario `smp-ap-stall`).
//! - `test.dma=edu`: QEMU's `edu` device, programmed by the hypervisor as a
//!   guest would, DMAs into guest memory, into the hypervisor and into a
//!   page the kernel view protects (scenario `qemu-vtd`).
//! - `test.vtpm-seal`: the durable vTPM's roots over the platform TPM as
//!   the boot path uses them (a state key sealed and unsealed through
//!   `PlatformRoot`, the counter moved through a version table of
//!   `tpm::host`), where
//!   QEMU gives a TPM but no VT-x to run a guest on (scenarios `qemu-tpm*`).

use alloc::string::String;

use log::info;

use super::cpu::{self, PortConfigSpace};
use super::iommu;
use super::mmio::MmioRegion;
use crate::mm::paging::Perms;
use crate::pci::ConfigSpace;
use crate::platform::Mmio;

/// The `test.*` options.
#[derive(Default)]
pub struct Options {
    pub fault: bool,
    pub corrupt_guest: Option<String>,
    pub dma: bool,
    pub stall_ap: Option<usize>,
    pub vtpm_seal: bool,
}

impl Options {
    /// Takes one command-line option; `false` if it is not a test option.
    pub fn accept(&mut self, key: &str, value: &str) -> bool {
        match key {
            "test.fault" => self.fault = true,
            "test.corrupt-guest" => self.corrupt_guest = Some(value.into()),
            "test.dma" if value == "edu" => self.dma = true,
            "test.stall-ap" => match value.parse::<usize>() {
                Ok(cpu) if cpu > 0 => self.stall_ap = Some(cpu),
                _ => log::warn!("test.stall-ap must name an AP (1 or more); ignored"),
            },
            "test.vtpm-seal" => self.vtpm_seal = true,
            _ => return false,
        }
        true
    }

    /// Whether this option needs the DMA view built as if a guest owned the
    /// devices (read before the heap exists).
    pub fn makes_device_owner(key: &str, value: &str) -> bool {
        key == "test.dma" && value == "edu"
    }
}

/// `test.vtpm-seal`: a state key sealed to the platform TPM and found again
/// from the blob prefix it makes; the host's CA secret sealed; the counter
/// moved to a version table's fence two steps up and a commit of a table
/// never handed out refused. The outcomes across power cycles and
/// configurations are host-tested against libtpms
/// (`hypervisor/tests/durable_vtpm.rs`).
pub fn vtpm_seal() {
    use crate::tpm::anchor::{PlatformRoot, RollbackAnchor, SealingRoot};
    use crate::tpm::host::Host;
    let fail = |what: &str| log::error!("test vtpm-seal: FAIL: {what}");
    let Some(chip) = super::platform::Sealer::found() else {
        return fail("no platform TPM measured the launch");
    };
    let mut random = super::entropy::HardwarePlatform::new();
    let mut entropy = |b: &mut [u8]| vtpm_core::Platform::fill_random(&mut random, b);
    let host = Host::open(chip, [0x5c; 32], &[], &mut entropy);
    if let (true, line) = host.report() {
        return fail(&line);
    }
    let root = PlatformRoot::new(chip, [0x5c; 32], host.clone());
    let (key, prefix) = match root.new_key(&mut entropy) {
        Ok(k) => k,
        Err(e) => return fail(&alloc::format!("{e}")),
    };
    let mut file = prefix.clone();
    file.extend_from_slice(b"state blob");
    match root.open_key(&file) {
        Ok((again, p, rest)) if again.id() == key.id() && p == prefix && rest == b"state blob" => info!(
            "test vtpm-seal: ok: a state key sealed to PCRs {:?} ({} bytes in front of each blob) and unsealed",
            super::platform::seal_pcrs(),
            prefix.len()
        ),
        Ok(_) => return fail("the unsealed key is not the sealed one"),
        Err(e) => return fail(&alloc::format!("{e}")),
    }
    let mut counter = host.anchor("test");
    let start = match chip_counter(chip) {
        Ok(v) => v,
        Err(e) => return fail(&alloc::format!("the counter reads {e}")),
    };
    match counter.record("test", 3) {
        Ok(Some(_)) => {}
        other => return fail(&alloc::format!("no version table handed out: {other:?}")),
    }
    if let Err(e) = counter.commit("test", 3) {
        return fail(&e.0);
    }
    match (chip_counter(chip), counter.commit("test", 4)) {
        (Ok(v), Err(_)) if v == start + 2 => {
            info!("test vtpm-seal: ok: the platform counter {start} -> {v} (a version table's fence), and no commit of a table not handed out")
        }
        other => fail(&alloc::format!("the counter after a commit: {other:?}")),
    }
}

fn chip_counter(chip: super::platform::Sealer) -> Result<u64, String> {
    crate::tpm::anchor::PlatformSeal::counter(&chip, false)
}

/// Reads unmapped memory: the fault handler must report and stop.
pub fn fault() -> ! {
    info!("test.fault: reading unmapped memory at 64 GiB");
    // SAFETY: deliberately faults; the handler reports and stops the machine.
    unsafe { core::ptr::read_volatile(0x10_0000_0000 as *const u64) };
    unreachable!("the read above faults")
}

/// A page of the hypervisor's own data, known bytes in it: what a device
/// must neither overwrite nor read.
#[repr(C, align(4096))]
struct Page([u8; 4096]);
static mut HYPERVISOR_PAGE: Page = Page([0x5a; 4096]);

const EDU_ID: u32 = 0x11e8_1234;
const EDU_BUFFER: u64 = 0x40000;
/// edu's DMA mask: addresses above 256 MiB are clamped.
const EDU_LIMIT: u64 = 256 << 20;

struct Edu {
    regs: MmioRegion,
    source_id: u16,
}

impl Edu {
    fn find() -> Option<Edu> {
        let mut cfg = PortConfigSpace;
        for device in 0..32u8 {
            if cfg.read32(0, device, 0, 0) != EDU_ID {
                continue;
            }
            let command = cfg.read32(0, device, 0, 4);
            // Memory space and bus mastering: the device may now DMA.
            cfg.write32(0, device, 0, 4, command | 0b110);
            let bar = cfg.read32(0, device, 0, 0x10) & !0xf;
            let regs = MmioRegion::new(u64::from(bar), 1 << 20)?;
            return Some(Edu { regs, source_id: u16::from(device) << 3 });
        }
        None
    }

    /// One transfer between guest-physical (= host-physical) `ram` and the
    /// device's buffer; `to_ram` is a device write. Waits for its end.
    fn transfer(&mut self, ram: u64, to_ram: bool, len: u64) -> bool {
        let (src, dst) = if to_ram { (EDU_BUFFER, ram) } else { (ram, EDU_BUFFER) };
        self.regs.write64(0x80, src);
        self.regs.write64(0x88, dst);
        self.regs.write64(0x90, len);
        self.regs.write64(0x98, 1 | (u64::from(to_ram) << 1));
        let start = cpu::rdtsc();
        while self.regs.read64(0x98) & 1 != 0 {
            if cpu::rdtsc().wrapping_sub(start) > 1 << 36 {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }
}

fn read_page(address: u64, len: usize) -> alloc::vec::Vec<u8> {
    // SAFETY: identity-mapped RAM the test chose (guest memory or its own page).
    unsafe { core::slice::from_raw_parts(address as *const u8, len) }.to_vec()
}

fn fill(address: u64, byte: u8, len: usize) {
    // SAFETY: as above; guest memory no guest uses in this test image.
    unsafe { core::ptr::write_bytes(address as *mut u8, byte, len) };
}

fn check(ok: bool, what: core::fmt::Arguments<'_>) {
    if ok {
        info!("test dma: ok: {what}");
    } else {
        log::error!("test dma: FAIL: {what}");
    }
}

/// [`check`] of a kernel-view change: a failure says why containment was lost.
fn check_followed(followed: Result<(), crate::platform::dma::ContainmentLost>, what: core::fmt::Arguments<'_>) {
    match followed {
        Ok(()) => check(true, what),
        Err(lost) => check(false, format_args!("{what}: DMA containment lost: {lost}")),
    }
}

/// The ACPI PM timer (3.579545 MHz) at its port, for wall-clock costs.
fn pm_timer(port: u16) -> u32 {
    // SAFETY: the FADT's PM timer block; reading it has no side effect.
    unsafe { cpu::inl(port) & 0x00ff_ffff }
}

/// The edu device attacks through the IOMMU, as a guest that programmed
/// it would.
pub fn edu_dma(pm_timer_port: Option<u16>) {
    let Some(mut edu) = Edu::find() else {
        log::error!("test dma: FAIL: no edu device (1234:11e8) on bus 0");
        return;
    };
    if !iommu::active() {
        log::error!("test dma: FAIL: no IOMMU took over");
        return;
    }
    let (bus, dev) = (edu.source_id >> 8, (edu.source_id >> 3) & 31);
    info!("test dma: edu at {bus:02x}:{dev:02x}.0");
    // Three guest pages devices may write, below edu's DMA limit.
    let mut pages =
        (0x8000..EDU_LIMIT >> 12).rev().map(|p| p << 12).filter(|&p| iommu::device_perms(p) == Some(Perms::RW));
    let (Some(a), Some(b), Some(c)) = (pages.next(), pages.next(), pages.next()) else {
        log::error!("test dma: FAIL: no guest memory granted to devices below 256 MiB");
        return;
    };
    let secret = core::ptr::addr_of!(HYPERVISOR_PAGE) as u64;
    let before = read_page(secret, 64);

    // 1. Guest memory: read by the device from A, written back to B.
    let pattern: alloc::vec::Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) ^ 0xa5).collect();
    // SAFETY: A is guest memory no guest uses in the test image.
    unsafe { core::ptr::copy_nonoverlapping(pattern.as_ptr(), a as *mut u8, 64) };
    fill(b, 0, 64);
    let done = edu.transfer(a, false, 64) && edu.transfer(b, true, 64);
    check(
        done && read_page(b, 64) == pattern,
        format_args!("edu DMA into guest memory {b:#x} arrived (read from {a:#x})"),
    );
    check(iommu::report_faults() == 0, format_args!("no fault for guest memory"));

    // 2. The hypervisor's page: a device write faults, memory unchanged.
    let _ = edu.transfer(secret, true, 64);
    check(iommu::report_faults() >= 1, format_args!("edu's write into the hypervisor at {secret:#x} faulted"));
    check(read_page(secret, 64) == before, format_args!("hypervisor page {secret:#x} unchanged"));

    // 3. ... and a device read of it gets none of its bytes (QEMU fills a
    // failed read with its own value; 0x5a is not among them).
    let _ = edu.transfer(secret, false, 64);
    check(iommu::report_faults() >= 1, format_args!("edu's read of the hypervisor at {secret:#x} faulted"));
    let _ = edu.transfer(b, true, 64);
    let _ = iommu::report_faults();
    check(!read_page(b, 64).contains(&0x5a), format_args!("the device read none of the hypervisor's bytes"));

    // 4. A page the kernel view protects (as kernel text after the agent's lock).
    fill(c, 0xc3, 64);
    let start = cpu::rdtsc();
    let followed = iommu::kernel_view_changed(c, Perms::RX);
    let ticks = cpu::rdtsc().wrapping_sub(start);
    check_followed(followed, format_args!("the kernel-view change of {c:#x} reached every unit"));
    let _ = edu.transfer(c, true, 64);
    check(iommu::report_faults() >= 1, format_args!("edu's write into the protected page {c:#x} faulted"));
    check(read_page(c, 64).iter().all(|&x| x == 0xc3), format_args!("protected page {c:#x} unchanged"));
    let _ = edu.transfer(c, false, 64);
    check(iommu::report_faults() == 0, format_args!("devices may still read the protected page"));
    info!("test dma: the kernel-view change took {ticks} TSC ticks (table update and IOTLB invalidation)");

    // 5. The cost of keeping the tables in step: many changes, timed.
    if let Some(port) = pm_timer_port {
        const ROUNDS: u32 = 200;
        let t0 = pm_timer(port);
        let s0 = cpu::rdtsc();
        let mut followed = Ok(());
        for _ in 0..ROUNDS {
            followed = followed.and(iommu::kernel_view_changed(c, Perms::RWX));
            followed = followed.and(iommu::kernel_view_changed(c, Perms::RX));
        }
        check_followed(followed, format_args!("every timed kernel-view change reached every unit"));
        let pm = pm_timer(port).wrapping_sub(t0) & 0x00ff_ffff;
        let tsc = cpu::rdtsc().wrapping_sub(s0);
        let ns = u64::from(pm) * 1_000_000_000 / 3_579_545 / u64::from(2 * ROUNDS);
        info!(
            "test dma: cost of one kernel-view change on the DMA tables: {ns} ns, {} TSC ticks ({} changes)",
            tsc / u64::from(2 * ROUNDS),
            2 * ROUNDS
        );
    }
    let followed = iommu::kernel_view_changed(c, Perms::RWX);
    check_followed(followed, format_args!("{c:#x} writable to devices again"));
    info!("test dma: done");
}
