//! The virtual machine monitor proper: guests created from boot modules,
//! their vCPUs placed on the CPUs, each CPU running its own vCPUs
//! round-robin, each exit dispatched to the generic handlers, and a report
//! when every guest has stopped.
//!
//! A guest ([`Vm`]) is shared by the CPUs its vCPUs run on: what every
//! exit handler may change (the generic guest, its EPT views, its
//! bitmaps) sits behind one lock per guest, taken for the handling of one
//! exit, so a guest's exits are handled one at a time, whichever CPUs they
//! come from. Exits are the slow path; one lock keeps every handler's
//! reasoning single-threaded. A vCPU (its VMCS, registers, extended state)
//! belongs to the CPU that runs it, and never moves. Its mailbox takes the
//! INIT, start-up and NMI IPIs its guest's other vCPUs send it
//! (`smp::startup`); its CPU applies them before it next enters.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use log::{error, info, warn};
use spin::{Mutex, Once};

use crate::acpi;
use crate::arch::x86_64::cpu::{self, HostCpu};
use crate::arch::x86_64::entropy::HardwarePlatform;
use crate::arch::x86_64::iommu;
use crate::arch::x86_64::percpu::{self, PerCpu};
use crate::arch::x86_64::platform::Sealer;
use crate::arch::x86_64::vmx::bitmaps::{IoBitmap, MsrBitmap};
use crate::arch::x86_64::vmx::caps::{PrimaryControls, SecondaryControls};
use crate::arch::x86_64::vmx::enable::{self, Vmx};
use crate::arch::x86_64::vmx::vcpu::{self as vmx_vcpu, current, BitmapFrames, Bitmaps, Ept, Start, Vcpu, VcpuSetup};
use crate::arch::x86_64::{lapic, park, power, timer};
use crate::boot_info::Module;
use crate::console;
use crate::exits::{self, reason, Action, ExitContext, StopReason};
use crate::guest::config::{self, GuestConfig, GuestKind};
use crate::guest::linux::{self, boot_data, e820, BzImage, E820Entry, LoadPlan};
use crate::guest::memory::GuestMemory;
use crate::guest::{loader, CrLimits, Guest, Platform, PortSet, RunState, VcpuLocal};
use crate::integrity::control::{ControlError, GuestControl};
use crate::integrity::{GuestIntegrity, View};
use crate::mm::frames::{Region, PAGE_SIZE};
use crate::mm::paging::{Attrs, MemType, Perms};
use crate::mm::phys::{self, Identity};
use crate::platform::dma::{self, ContainmentLost, DmaControl};
use crate::smp::{startup, Activity, CpuSet, Exclusive, Mailbox, VcpuEvent, MAX_CPUS, SIGNALS};
use crate::tpm::anchor::{NoCounter, PlatformRoot, RollbackAnchor, SealingRoot, SeedRoot};
use crate::tpm::config_event::{config_event, IntegrityMode, SecurityConfig};
use crate::tpm::host::Host;
use crate::tpm::setup::{self, Level, VtpmMode};
use crate::tpm::{launch_measurements, GuestTpm};

/// The TPM TIS window, never mapped for a pass-through guest: it belongs to
/// the virtual TPM.
pub const TIS_WINDOW: Region = Region::new(0xfed4_0000, 0xfed4_5000);

/// What the machine looks like, for building guests.
pub struct Machine<'a> {
    pub modules: &'a [Module],
    /// The firmware's memory map with its e820 types.
    pub firmware_map: &'a [E820Entry],
    /// Memory the hypervisor keeps (image, frame pool, the APs'
    /// trampoline, modules of other guests): reserved in a pass-through
    /// guest's e820 and absent from its EPT.
    pub hypervisor_ranges: &'a [Region],
    /// The RSDP copy from the boot loader.
    pub rsdp: Option<&'a [u8]>,
    /// The platform secret vTPM identities derive from (`vtpm.seed=`).
    pub vtpm_seed: Option<[u8; 32]>,
    /// SHA-256 of the hypervisor's code and read-only data, for PCR 11.
    pub hypervisor_digest: [u8; 32],
    /// SHA-256 of the `ctvm.policy` module, for PCR 11.
    pub policy_digest: Option<[u8; 32]>,
    /// SHA-256 of the `ctvm.api` module, for PCR 11.
    pub api_digest: Option<[u8; 32]>,
    /// The trusted-module digests (the `ctvm.policy` module).
    pub policy: &'a crate::integrity::policy::Policy,
    /// What isolated modules may call (the `ctvm.api` module), if given.
    pub api: Option<&'a alloc::sync::Arc<crate::integrity::api::ApiPolicy>>,
    /// The I/O ranges the PCI devices decode.
    pub pci_io: &'a [(u16, u16)],
    /// The local APIC's page, in xAPIC mode.
    pub lapic: Option<u64>,
    /// The CPUs running under the hypervisor.
    pub online: CpuSet,
    /// Every CPU of the machine, by index: its APIC ID (online or not).
    pub apic_ids: &'a [u32],
}

/// Where a vCPU runs, and how to reach it.
struct VcpuHome {
    cpu: usize,
    apic_id: u32,
    mailbox: Mailbox,
    /// TSC ticks between preemption-timer exits, when its CPU is shared.
    timeslice: Option<u32>,
}

/// What a guest's exits may change: behind its lock.
pub struct Shared {
    pub guest: Guest,
    /// The guest's EPT: its only view, or the kernel view (KEPT).
    ept: Option<Ept>,
    /// One view per isolated module (MEPT).
    module_views: BTreeMap<u32, Ept>,
    bitmaps: Option<Bitmaps>,
    /// The bitmaps of the module views: every port and MSR write exits.
    module_bitmaps: Option<Bitmaps>,
    /// RAM taken from the frame pool (native guests only).
    ram: Option<Region>,
    /// Each vCPU's counters, stored when it stops.
    vcpu_stats: Vec<VcpuStats>,
    /// What every vCPU's VMCS must trap once the agent locked the kernel.
    guards: VmcsGuards,
}

/// Exits the integrity lock asks for, in each vCPU's own VMCS: set on the
/// vCPU that locks, then on each other one before it next enters.
#[derive(Clone, Copy, Default)]
struct VmcsGuards {
    /// CR0 and CR4 bits whose changes exit.
    control_registers: (u64, u64),
    descriptor_tables: bool,
    /// Bumped at each change (also in [`Vm::guards_changed`]).
    generation: u64,
}

// SAFETY: a guest's shared state is only ever reached through its lock;
// the raw frames it names (EPT, bitmaps, RAM) are the guest's alone.
unsafe impl Send for Shared {}

/// A guest and its vCPUs.
pub struct Vm {
    pub name: String,
    shared: Mutex<Shared>,
    vcpus: Vec<VcpuHome>,
    /// The CPUs its vCPUs run on.
    cpus: CpuSet,
    /// How its boot vCPU starts (the others wait for a start-up IPI).
    start: Start,
    eptp: u64,
    bitmaps: BitmapFrames,
    pass_through: bool,
    /// Its boot vCPU's initial state is broken on purpose (a test knob).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    corrupt: bool,
    /// It stopped: its vCPUs leave their CPUs.
    stopping: AtomicBool,
    /// The vCPU that runs it alone, if one does (integrity views).
    exclusive: Exclusive,
    /// The generation of its [`VmcsGuards`].
    guards_changed: AtomicU64,
    /// vCPUs not yet dropped by their CPUs.
    live: AtomicUsize,
}

/// A vCPU's counters, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuStats {
    /// VM exits of every kind.
    pub exits: u64,
    /// Of those, NMIs the hypervisor sent (cross-CPU signals).
    pub kicks: u64,
    /// NMIs delivered to the guest.
    pub guest_nmis: u64,
    /// Start-up IPIs that started it.
    pub startups: u64,
}

/// The syscall MSRs that live in hardware while a guest runs.
const SHADOWED_MSRS: [u32; 6] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102, 0xc000_0103];

fn cr_limits(vmx: &Vmx) -> CrLimits {
    CrLimits {
        cr0_fixed0: vmx.msrs.cr0_fixed0,
        cr0_fixed1: vmx.msrs.cr0_fixed1,
        cr4_fixed0: vmx.msrs.cr4_fixed0,
        cr4_fixed1: vmx.msrs.cr4_fixed1,
        unrestricted: vmx.controls.features.unrestricted_guest,
    }
}

/// The host's vTPM roots over the platform TPM (`tpm::host`): opened once,
/// at the first durable guest, from the state blobs of every guest.
static HOST: spin::Once<Host<Sealer>> = spin::Once::new();

/// The host's roots, opened (and said on the console) at the first call.
fn host(machine: &Machine<'_>, chip: Sealer, seed: [u8; 32]) -> Host<Sealer> {
    HOST.call_once(|| {
        let files: Vec<&[u8]> =
            machine.modules.iter().filter(|m| config::state_owner(&m.cmdline).is_some()).map(module_bytes).collect();
        let mut random = HardwarePlatform::new();
        let host = Host::open(chip, seed, &files, &mut |b| vtpm_core::Platform::fill_random(&mut random, b));
        match host.report() {
            (true, line) => error!("{line}"),
            (false, line) => info!("{line}"),
        }
        host
    })
    .clone()
}

pub fn module_bytes(module: &Module) -> &'static [u8] {
    // SAFETY: GRUB loaded the module there, the frame allocator never hands
    // out module ranges, and no guest's EPT maps a module it does not own.
    unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) }
}

/// A guest being built: everything but its placement.
struct Built {
    shared: Shared,
    start: Start,
}

impl Shared {
    fn empty(guest: Guest) -> Shared {
        Shared {
            guest,
            ept: None,
            module_views: BTreeMap::new(),
            bitmaps: None,
            module_bitmaps: None,
            ram: None,
            vcpu_stats: Vec::new(),
            guards: VmcsGuards::default(),
        }
    }
    /// A native guest: RAM from the frame pool, emulated devices only.
    fn create_native(vmx: &Vmx, config: GuestConfig, image: &[u8], machine: &Machine<'_>) -> Result<Built, String> {
        let size = config.mem_bytes;
        let hpa =
            phys::alloc_zeroed(size, 2 << 20).ok_or_else(|| format!("no {} MiB of free RAM for it", size >> 20))?;
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, size), hpa).map_err(|_| "overlapping memory")?;
        let mut vm = Shared::empty(Guest::new(config, Platform::Emulated, memory, cr_limits(vmx)));
        vm.ram = Some(Region::new(hpa, hpa + size));

        let mut ept = Ept::new(vmx).ok_or("no memory for EPT tables")?;
        ept.map(0, hpa, size, Attrs::new(Perms::RWX, MemType::WriteBack))
            .map_err(|e| format!("EPT mapping failed: {e:?}"))?;
        let entry = loader::load_native(&vm.guest.memory, &Identity, image, vm.guest.name(), &vm.guest.config.args)
            .map_err(|e| format!("{e}"))?;
        if vm.guest.config.vtpm {
            let cmdline = vm.guest.config.args.clone();
            vm.attach_vtpm(machine, image, cmdline.as_bytes(), None)?;
        }
        let bitmaps = Bitmaps::new(&IoBitmap::trap_all(), &MsrBitmap::trap_all()).ok_or("no memory for bitmaps")?;
        vm.ept = Some(ept);
        vm.bitmaps = Some(bitmaps);
        Ok(Built { shared: vm, start: Start::Entry(entry) })
    }

    /// A Linux guest on the pass-through platform: the machine's devices and
    /// RAM, identity-mapped, except the hypervisor's memory and the TIS window.
    fn create_linux(
        vmx: &Vmx,
        config: GuestConfig,
        kernel: &Module,
        initrd: Option<&Module>,
        machine: &Machine<'_>,
        apic_ids: &[u32],
    ) -> Result<Built, String> {
        let image = BzImage::parse(module_bytes(kernel)).map_err(|e| format!("{e}"))?;
        let mut overlays: Vec<E820Entry> =
            machine.hypervisor_ranges.iter().map(|&r| E820Entry { region: widen(r), kind: e820::RESERVED }).collect();
        overlays.push(E820Entry { region: boot_data::region(), kind: e820::RESERVED });
        let map = linux::build_e820(machine.firmware_map, &overlays).map_err(|e| format!("{e}"))?;
        let ram: Vec<Region> = map.iter().filter(|e| e.kind == e820::RAM).map(|e| e.region).collect();

        let initrd_range = initrd.map(|m| m.range);
        if let Some(r) = initrd_range {
            if !ram.iter().any(|g| g.start <= r.start && r.end <= g.end) {
                return Err(format!("the initrd at {r:?} is not in the guest's RAM"));
            }
        }
        let mut avoid = alloc::vec![kernel.range, boot_data::region()];
        avoid.extend(initrd_range);
        let load_address = image.load_address(&ram, &avoid, 4 << 30).map_err(|e| format!("{e}"))?;

        // What the loader may write: the guest's RAM, and the boot data page range.
        let mut memory = GuestMemory::new();
        for e in map.iter().filter(|e| matches!(e.kind, e820::RAM | e820::ACPI | e820::NVS)) {
            let r = shrink(e.region);
            if !r.is_empty() {
                memory.add(r, r.start).map_err(|_| "overlapping e820 entries")?;
            }
        }
        memory.add(boot_data::region(), boot_data::region().start).map_err(|_| "boot data overlaps RAM")?;

        let pm1a_control = machine.rsdp.and_then(|rsdp| match acpi::find_pm1a_control_port(&Identity, rsdp) {
            Ok(port) => Some(port),
            Err(e) => {
                warn!("guest {}: no ACPI PM1a control port ({e:?}): its power-off will not be seen", config.name);
                None
            }
        });
        let platform = Platform::PassThrough { pm1a_control, lapic: machine.lapic };
        let mut trusted = Vec::new();
        for name in &config.trusted {
            let entry = machine.policy.get(name);
            trusted
                .push(entry.cloned().ok_or_else(|| format!("trust={name}: no entry for it in a ctvm.policy module"))?);
        }
        let integrity =
            config.integrity.map(|mode| GuestIntegrity::for_guest(mode, trusted, machine.api.cloned())).transpose()?;
        let mut vm = Shared::empty(Guest::new(config, platform, memory, cr_limits(vmx)));
        vm.guest.integrity = integrity;
        if vm.guest.integrity.is_some() {
            vm.guest.capabilities |= guest_agent::Capabilities::INTEGRITY;
        }

        let ept = pass_through_ept(vmx, &map, machine.hypervisor_ranges, machine.lapic)?;
        if vm.guest.config.vtpm {
            let cmdline = vm.guest.config.args.clone();
            vm.attach_vtpm(machine, module_bytes(kernel), cmdline.as_bytes(), initrd.map(module_bytes))?;
        }
        let rsdp = install_acpi(&vm.guest, machine, apic_ids);
        // Counters may count for the guest only where they are switched off on every exit.
        let pmu_version = cpu::cpuid(0xa, 0).eax & 0xff;
        vm.guest.perf_switched = vmx.controls.features.perf_global_ctrl && pmu_version >= 2;
        let plan = LoadPlan {
            image: &image,
            load_address,
            e820: &map,
            cmdline: &vm.guest.config.args,
            initrd: initrd_range,
            rsdp,
        };
        let entry = linux::load(&vm.guest.memory, &Identity, &plan).map_err(|e| format!("{e}"))?;
        info!(
            "guest {}: Linux boot protocol {}.{:02}, kernel at {load_address:#x}, initrd {:?}, {} MiB of RAM",
            vm.guest.name(),
            image.version >> 8,
            image.version & 0xff,
            initrd_range,
            ram.iter().map(Region::len).sum::<u64>() >> 20
        );

        // Ports and MSRs by allow-list: the legacy devices the guest owns,
        // ACPI's register blocks, the PCI devices' ports.
        let mut allowed = PortSet::default();
        let fadt = machine.rsdp.and_then(|rsdp| acpi::find_fadt(&Identity, rsdp).ok()).unwrap_or_default();
        let ranges = exits::io::LEGACY_PASS
            .iter()
            .map(|&(first, last, _)| (first, last))
            .chain(acpi::fadt_ports(&fadt))
            .chain(machine.pci_io.iter().copied());
        for (first, last) in ranges {
            (first..=last).for_each(|p| allowed.insert(p));
        }
        let (io, module_io) = exits::io::pass_through_bitmaps(&allowed, pm1a_control);
        vm.guest.ports_passed = allowed;
        let (msr, module_msr) = exits::msr::pass_through_bitmaps();
        let bitmaps = Bitmaps::new(&io, &msr).ok_or("no memory for bitmaps")?;
        let module_bitmaps = Bitmaps::new(&module_io, &module_msr).ok_or("no memory for bitmaps")?;
        vm.ept = Some(ept);
        vm.bitmaps = Some(bitmaps);
        vm.module_bitmaps = Some(module_bitmaps);
        Ok(Built { shared: vm, start: Start::Entry(entry) })
    }

    /// Gives the guest its vTPM (volatile, or durable from its sealed
    /// state blob: see `tpm::setup`) and measures what it is about to run
    /// (its kernel, command line and initrd; its security configuration
    /// into PCR 11) before its first instruction.
    fn attach_vtpm(
        &mut self,
        machine: &Machine<'_>,
        kernel: &[u8],
        cmdline: &[u8],
        initrd: Option<&[u8]>,
    ) -> Result<(), String> {
        let name = String::from(self.guest.name());
        let config = &self.guest.config;
        let mode =
            if config.vtpm_durable { VtpmMode::Durable { reset: config.vtpm_reset } } else { VtpmMode::Volatile };
        let blob = machine.modules.iter().find(|m| config::state_owner(&m.cmdline) == Some(&name)).map(module_bytes);
        // With a platform TPM the state key, the CA secret and the version
        // table of every durable guest are sealed to CTVM's measured
        // configuration and the table anchored in its counter; without one,
        // the seed and no counter (both reported as weaker).
        let sealer = Sealer::found();
        let host = match (machine.vtpm_seed, sealer) {
            (Some(seed), Some(chip)) if config.vtpm_durable => Some(host(machine, chip, seed)),
            _ => None,
        };
        let root: Option<alloc::boxed::Box<dyn SealingRoot>> = match (machine.vtpm_seed, sealer, &host) {
            (Some(seed), Some(chip), Some(host)) => {
                Some(alloc::boxed::Box::new(PlatformRoot::new(chip, seed, host.clone())))
            }
            (Some(seed), _, _) => Some(alloc::boxed::Box::new(SeedRoot::new(seed))),
            (None, _, _) => None,
        };
        let anchor: alloc::boxed::Box<dyn RollbackAnchor> = match &host {
            Some(host) => alloc::boxed::Box::new(host.anchor(&name)),
            None => alloc::boxed::Box::new(NoCounter),
        };
        let mut nonces = HardwarePlatform::new();
        let request = setup::Request { guest: &name, mode, root: root.as_deref(), seed: machine.vtpm_seed, blob };
        let setup = setup::prepare(
            &request,
            anchor,
            HardwarePlatform::new,
            alloc::boxed::Box::new(move |b: &mut [u8]| vtpm_core::Platform::fill_random(&mut nonces, b)),
        );
        for (level, line) in setup.report(&name, root.as_ref().map_or("nothing", |r| r.name())) {
            match level {
                Level::Info => info!("{line}"),
                Level::Warn => warn!("{line}"),
                Level::Error => error!("{line}"),
            }
        }
        if let Some(ca) = &setup.ca_certificate {
            let digest: [u8; 32] = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(ca)).into();
            info!("vTPM CA certificate (DER SHA-256 {}), for the verifier:", crate::tpm::config_event::to_hex(&digest));
            for line in setup::pem_lines(ca) {
                info!("  {line}");
            }
        }
        let durable = setup.durable();
        let failed = matches!(setup.outcome, setup::Outcome::Failed(_));
        let trust: Vec<&str> = config.trusted.iter().map(String::as_str).collect();
        let integrity = IntegrityMode::of(config.integrity);
        let security = SecurityConfig {
            hypervisor: machine.hypervisor_digest,
            integrity,
            trust: &trust,
            policy: machine.policy_digest,
            api: machine.api_digest,
            // What the configuration asks for, even when the state was refused.
            vtpm_durable: config.vtpm_durable,
        };
        let event = config_event(vtpm_core::sha1, &security);
        let measurements = launch_measurements(vtpm_core::sha1, kernel, cmdline, initrd);
        let vtpm = GuestTpm::launch(setup.prepared, &measurements, &event)
            .map_err(|e| format!("measured launch failed: {e:?}"))?;
        info!(
            "guest {name}: vTPM {}; kernel, command line{} measured into PCRs 8 and 9, configuration ({}) into PCR 11",
            if failed { "in failure mode after its launch was measured" } else { "ready" },
            if initrd.is_some() { " and initrd" } else { "" },
            if security.vtpm_durable { "vtpm=durable" } else { "vtpm=volatile" }
        );
        self.guest.vtpm = Some(vtpm);
        self.guest.capabilities |= guest_agent::Capabilities::VTPM | guest_agent::Capabilities::EVENT_LOG;
        if durable {
            self.guest.capabilities |= guest_agent::Capabilities::VTPM_STORE;
        }
        Ok(())
    }

    /// Returns the guest's memory and tables to the pool, once no CPU runs it.
    fn tear_down(&mut self) {
        self.bitmaps = None;
        self.module_bitmaps = None;
        for (_, view) in core::mem::take(&mut self.module_views) {
            view.destroy();
        }
        if let Some(ept) = self.ept.take() {
            ept.destroy();
        }
        if let Some(ram) = self.ram.take() {
            phys::free(ram.start, ram.len());
        }
    }
}

impl Vm {
    /// Stops the guest: the one line that says why, then every vCPU leaves
    /// its CPU (those inside the guest are signalled, one waiting for a
    /// start-up IPI is woken by one).
    fn stop(&'static self, reason: StopReason) {
        {
            let mut sh = self.shared.lock();
            if sh.guest.is_running() {
                if let Some(line) = sh.guest.uart.flush() {
                    console::guest_line(&self.name, &line);
                }
                info!("guest {} stopped: {reason}", self.name);
                if let Some(line) = crate::exits::integrity::never_locked(&sh.guest) {
                    warn!("{line}");
                }
                let vtpm = sh.guest.vtpm.as_ref().and_then(crate::tpm::GuestTpm::durable_report);
                if let Some(line) = vtpm.and_then(|r| r.unstored(&self.name)) {
                    warn!("{line}");
                }
                sh.guest.state = RunState::Stopped(reason);
            }
        }
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        vmx_vcpu::shootdown(&self.cpus);
        let here = percpu::current().index;
        for home in self.vcpus.iter().filter(|h| h.cpu != here) {
            lapic::send_startup(home.apic_id, 0);
        }
    }

    /// A CPU dropped one of the guest's vCPUs; the last one frees the guest.
    fn vcpu_gone(&self, index: usize, stats: VcpuStats) {
        let mut sh = self.shared.lock();
        if let Some(s) = sh.vcpu_stats.get_mut(index) {
            *s = stats;
        }
        if self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            sh.tear_down();
        }
    }

    /// Posts an event (an IPI the guest sent) to one of its vCPUs and rings
    /// its CPU: an NMI takes it out of the guest; a start-up IPI, which
    /// also wakes a vCPU waiting for one, is repeated until it is taken
    /// (one arriving while the CPU is in the hypervisor is discarded).
    fn post(&self, target: usize, event: VcpuEvent) {
        let Some(home) = self.vcpus.get(target) else { return };
        if home.cpu == percpu::current().index {
            home.mailbox.post(event);
            return;
        }
        if !SIGNALS.post(home.cpu, &home.mailbox, event, &|_| lapic::send_nmi(home.apic_id)) {
            return;
        }
        if let VcpuEvent::Startup(vector) = event {
            for _ in 0..20 {
                lapic::send_startup(home.apic_id, vector);
                let deadline = timer::deadline_us(50);
                while home.mailbox.startup_pending() && !timer::passed(deadline) {
                    core::hint::spin_loop();
                }
                if !home.mailbox.startup_pending() {
                    break;
                }
            }
        }
    }
}

/// The VMX side of a guest's integrity views.
struct Views<'a> {
    vmx: &'a Vmx,
    kernel: &'a mut Ept,
    modules: &'a mut BTreeMap<u32, Ept>,
    bitmaps: &'a Bitmaps,
    /// The module views' bitmaps (every port and MSR write exits), if the
    /// guest has its own for them.
    module_bitmaps: Option<&'a Bitmaps>,
    /// What the other vCPUs' VMCSs must trap too.
    guards: &'a mut VmcsGuards,
    guards_changed: &'a AtomicU64,
    /// Devices' side of the kernel view (the IOMMU).
    dma: &'a mut dyn DmaControl,
    /// How this vCPU keeps the others from what it opens.
    hold: Hold<'a>,
    /// Why the guest must stop after this exit: a module's view was to go
    /// while another vCPU runs it (the view stays until the guest is torn down).
    stop: Option<String>,
    /// The first change of this exit devices could not be shown to
    /// follow: the device owners stop after the exit ([`stop_device_owners`]).
    /// The kernel view's own change stands, so `set_perms` still succeeds.
    dma_lost: Option<ContainmentLost>,
}

/// A vCPU of a guest with several (see `smp::exclusive`), during the
/// handling of its exit: what it must take before it enters a module's view
/// or opens a page of the kernel's. `None`: the guest has one vCPU.
#[derive(Clone, Copy)]
struct Hold<'a>(Option<(&'a Vm, usize)>);

impl Hold<'_> {
    /// Runs the guest alone from now until the vCPU is back in the kernel
    /// view with nothing opened or held.
    fn alone(self) {
        if let Some((vm, vcpu)) = self.0 {
            vmx_vcpu::take_exclusive(&vm.exclusive, vcpu, &vm.cpus);
        }
    }

    /// A module's view lost a right (this CPU flushed its own copy): the
    /// one vCPU that may run a module's view meanwhile, the token holder,
    /// is stopped until it has flushed too; every other CPU flushes on its
    /// way back into the guest, before it can enter a module's view (the
    /// epoch moves on), so none is signalled.
    fn module_view_narrowed(self) {
        let Some((vm, vcpu)) = self.0 else { return };
        let mut targets = CpuSet::new();
        if let Some(home) = vm.exclusive.token_holder().filter(|&h| h != vcpu).and_then(|h| vm.vcpus.get(h)) {
            targets.insert(home.cpu);
        }
        vmx_vcpu::shootdown(&targets);
    }

    /// Before entering a module's view: the module token. The exits that
    /// enter one from the kernel view wait for it before their handling
    /// ([`enters_module`]); should another vCPU hold it all the same, the
    /// view is not entered (that vCPU's grants on its stack are in the
    /// view): the guest stops.
    fn enter_module(self) -> Result<(), ControlError> {
        let Some((vm, vcpu)) = self.0 else { return Ok(()) };
        if vm.exclusive.take_token(vcpu) {
            return Ok(());
        }
        log::error!(
            "vCPU {vcpu} would enter a module's view while vCPU {:?} holds the module token",
            vm.exclusive.token_holder()
        );
        Err(ControlError)
    }
}

impl Views<'_> {
    fn guards_changed(&mut self) {
        self.guards.generation += 1;
        self.guards_changed.store(self.guards.generation, Ordering::SeqCst);
    }
}

impl Views<'_> {
    fn view(&mut self, view: View) -> Result<&mut Ept, ControlError> {
        match view {
            View::Kernel => Ok(self.kernel),
            View::Module(m) => self.modules.get_mut(&m).ok_or(ControlError),
        }
    }
}

impl GuestControl for Views<'_> {
    fn activate_view(&mut self, view: View) -> Result<(), ControlError> {
        let eptp = self.view(view)?.pointer();
        if matches!(view, View::Module(_)) {
            self.hold.enter_module()?;
        }
        if let Some((vm, vcpu)) = self.hold.0 {
            vm.exclusive.token_runs(vcpu, if let View::Module(m) = view { Some(m) } else { None });
        }
        current::set_eptp(eptp);
        current::set_event_exiting(matches!(view, View::Module(_)));
        // A module never loads CR3: its own tables would alias anything.
        // Kernel views keep the loads exit-free, unless the processor forces them.
        let c = &self.vmx.controls;
        let forced = c.procbased_with(&self.vmx.msrs, PrimaryControls::CR3_LOAD_EXITING, false).is_none();
        current::set_primary_control(PrimaryControls::CR3_LOAD_EXITING, forced || matches!(view, View::Module(_)));
        // The bitmaps go with the view: a module's traps every port and MSR write.
        if let Some(module_bitmaps) = self.module_bitmaps {
            current::set_bitmaps(if view == View::Kernel { self.bitmaps } else { module_bitmaps });
        }
        Ok(())
    }

    fn set_perms(&mut self, view: View, page: u64, perms: Perms) -> Result<(), ControlError> {
        // Module views map pages one to one, with the kernel view's memory type.
        let in_kernel = self.kernel.translate(page);
        let mem_type = in_kernel.as_ref().map_or(MemType::WriteBack, |t| t.attrs.mem_type);
        // A right the kernel view gains (a page opened for one step, most
        // often) would serve every vCPU running it: none runs meanwhile.
        if view == View::Kernel && !in_kernel.as_ref().is_some_and(|t| t.attrs.perms.contains(perms)) {
            self.hold.alone();
        }
        let ept = self.view(view)?;
        let now = if view == View::Kernel { in_kernel } else { ept.translate(page) };
        let narrowed = now.as_ref().is_some_and(|t| !perms.contains(t.attrs.perms));
        let result = if perms.is_empty() {
            ept.unmap(page, PAGE_SIZE)
        } else if now.is_some() {
            ept.protect(page, PAGE_SIZE, perms)
        } else {
            ept.map(page, page, PAGE_SIZE, Attrs::new(perms, mem_type))
        };
        if matches!(view, View::Module(_)) && narrowed {
            self.hold.module_view_narrowed();
        }
        // Devices never write what the kernel view does not (DMA view in step with KEPT).
        if view == View::Kernel && result.is_ok() {
            if let Err(lost) = self.dma.kernel_view_changed(page, perms) {
                self.dma_lost.get_or_insert(lost);
            }
        }
        result.map_err(|_| ControlError)
    }

    fn perms(&self, view: View, page: u64) -> Option<Perms> {
        let ept = match view {
            View::Kernel => &*self.kernel,
            View::Module(m) => self.modules.get(&m)?,
        };
        ept.translate(page).map(|t| t.attrs.perms)
    }

    fn create_view(&mut self, module: u32) -> Result<(), ControlError> {
        // Its changes reach other CPUs through `Hold::module_view_narrowed`,
        // not through a shootdown of every CPU of the guest.
        let ept = Ept::new(self.vmx).ok_or(ControlError)?;
        if let Some(old) = self.modules.insert(module, ept) {
            old.destroy();
        }
        Ok(())
    }

    fn destroy_view(&mut self, module: u32) {
        if let Some((vm, vcpu)) = self.hold.0.filter(|(vm, v)| vm.exclusive.other_runs(*v, module)) {
            let holder = vm.exclusive.token_holder();
            self.stop = Some(format!(
                "module {module}'s view was to go while vCPU {holder:?} runs it (vCPU {vcpu} unloads it)"
            ));
            return;
        }
        if let Some(ept) = self.modules.remove(&module) {
            ept.destroy();
            // No CPU may keep translations of tables that are freed.
            self.hold.module_view_narrowed();
        }
    }

    fn set_interrupt_window(&mut self, on: bool) {
        current::set_primary_control(PrimaryControls::INTERRUPT_WINDOW_EXITING, on);
    }

    fn has_monitor_trap(&self) -> bool {
        self.vmx.controls.procbased_with(&self.vmx.msrs, PrimaryControls::MONITOR_TRAP_FLAG, true).is_some()
    }

    fn set_monitor_trap(&mut self, on: bool) {
        current::set_primary_control(PrimaryControls::MONITOR_TRAP_FLAG, on);
    }

    fn intercept_debug_exceptions(&mut self, on: bool) {
        current::set_exception_bitmap_bit(1, on);
    }

    fn guard_control_registers(&mut self, cr0: u64, cr4: u64) {
        current::guard_control_registers(cr0, cr4);
        let (old0, old4) = self.guards.control_registers;
        self.guards.control_registers = (old0 | cr0, old4 | cr4);
        self.guards_changed();
    }

    fn trap_descriptor_tables(&mut self) {
        if !current::enable_secondary_control(self.vmx, SecondaryControls::DTABLE_EXITING) {
            warn!("descriptor-table exiting is not available: LGDT/LIDT are not trapped");
        }
        self.guards.descriptor_tables = true;
        self.guards_changed();
    }

    fn trap_msr_writes(&mut self, msrs: &[u32]) {
        for &msr in msrs {
            self.bitmaps.trap_msr_write(msr);
        }
    }
    fn run_alone(&mut self) {
        self.hold.alone();
    }
}

/// Writes the pass-through guest's ACPI overlay into the boot data area: a
/// MADT listing only the guest's CPUs, and with a vTPM a TCPA table with the
/// event log and an SSDT with the TPM device; a new RSDP, RSDT and XSDT list
/// them with the firmware's other tables. Returns the new RSDP's address.
/// Without firmware ACPI tables the guest still finds the TPM with
/// `tpm_tis.force=1`.
fn install_acpi(guest: &Guest, machine: &Machine<'_>, apic_ids: &[u32]) -> Option<u64> {
    let Some(rsdp) = machine.rsdp.and_then(|b| acpi::Rsdp::parse(b).ok()) else {
        warn!("guest {}: no firmware RSDP: its ACPI tables are the firmware's, or none", guest.name());
        return None;
    };
    let firmware = match acpi::tables(&Identity, &rsdp) {
        Ok(t) => t,
        Err(e) => {
            warn!("guest {}: firmware ACPI tables unreadable ({e:?}): they are left as they are", guest.name());
            return None;
        }
    };
    let mut tables = Vec::new();
    let madt = firmware.iter().find(|t| &t.signature == b"APIC");
    match madt.and_then(|t| acpi::read_table(&Identity, t.address).ok()) {
        Some(bytes) => match acpi::build::madt_for(&bytes, apic_ids) {
            Some(madt) => tables.push(madt),
            None => warn!("guest {}: the firmware's MADT is malformed: it sees every CPU", guest.name()),
        },
        None => warn!("guest {}: no firmware MADT to narrow to its CPU", guest.name()),
    }
    let area = (boot_data::EVENT_LOG - boot_data::ACPI) as usize;
    let log_area = (boot_data::END - boot_data::EVENT_LOG) as u32;
    if let Some(vtpm) = guest.vtpm.as_ref() {
        tables.push(acpi::build::tcpa(boot_data::EVENT_LOG, log_area));
        tables.push(acpi::build::ssdt_tpm(TIS_WINDOW.start as u32, TIS_WINDOW.len() as u32));
        let log = vtpm.log.as_bytes();
        let ok = guest.memory.write(&Identity, boot_data::EVENT_LOG, log).is_ok()
            && guest
                .memory
                .zero(&Identity, boot_data::EVENT_LOG + log.len() as u64, u64::from(log_area) - log.len() as u64)
                .is_ok();
        if !ok {
            warn!("guest {}: the event log does not fit its area", guest.name());
            return None;
        }
    }
    // Hidden from the guest: the DMAR table (the remapping units are the
    // hypervisor's; their registers are absent from the guest's EPT too) and
    // the platform TPM's tables (the guest's TPM is its vTPM).
    let listed: Vec<(u64, [u8; 4])> = firmware
        .iter()
        .filter(|t| !matches!(&t.signature, b"DMAR" | b"TPM2" | b"TCPA"))
        .map(|t| (t.address, t.signature))
        .collect();
    let (bytes, overlay) = acpi::build::overlay(boot_data::ACPI, area, &listed, &tables)?;
    guest.memory.write(&Identity, boot_data::ACPI, &bytes).ok()?;
    Some(overlay.rsdp)
}

/// Whole pages covering `r`.
fn widen(r: Region) -> Region {
    Region::new(r.start & !(PAGE_SIZE - 1), r.end.next_multiple_of(PAGE_SIZE))
}

/// Whole pages inside `r`.
fn shrink(r: Region) -> Region {
    r.page_aligned_inside()
}

/// The identity EPT of a pass-through guest: everything up to the top of
/// RAM (at least 4 GiB, for MMIO) uncacheable, RAM and ACPI memory
/// write-back, minus the hypervisor's memory and the TIS window.
fn pass_through_ept(vmx: &Vmx, map: &[E820Entry], hypervisor: &[Region], lapic: Option<u64>) -> Result<Ept, String> {
    let mut ept = Ept::new(vmx).ok_or("no memory for EPT tables")?;
    let top = map.iter().map(|e| e.region.end).max().unwrap_or(0).max(4 << 30).next_multiple_of(1 << 30);
    let fail = |e| format!("EPT mapping failed: {e:?}");
    ept.map(0, 0, top, Attrs::new(Perms::RWX, MemType::Uncacheable)).map_err(fail)?;
    for e in map.iter().filter(|e| matches!(e.kind, e820::RAM | e820::ACPI | e820::NVS)) {
        let r = shrink(e.region);
        if !r.is_empty() {
            ept.map(r.start, r.start, r.len(), Attrs::new(Perms::RWX, MemType::WriteBack)).map_err(fail)?;
        }
    }
    let boot = boot_data::region();
    ept.map(boot.start, boot.start, boot.len(), Attrs::new(Perms::RWX, MemType::WriteBack)).map_err(fail)?;
    for &r in hypervisor.iter().chain(core::iter::once(&TIS_WINDOW)) {
        let r = widen(r);
        ept.unmap(r.start, r.len()).map_err(fail)?;
    }
    // The local APIC read-only: its writes are checked (no INIT or start-up IPI).
    if let Some(page) = lapic {
        ept.protect(page, PAGE_SIZE, Perms::READ).map_err(fail)?;
    }
    Ok(ept)
}

/// Creates a VM per guest module and places its vCPUs on CPUs. A module
/// that fails to load is reported and skipped; the others still run.
/// `corrupt` names a guest whose initial state is broken on purpose (a
/// test knob, test image only).
pub fn create_vms(vmx: &Vmx, machine: &Machine<'_>, corrupt: Option<&str>) -> Vec<&'static Vm> {
    let modules = machine.modules;
    let guest_modules: Vec<&Module> = modules.iter().filter(|m| config::is_guest_module(&m.cmdline)).collect();
    let initrds: Vec<&Module> = modules.iter().filter(|m| config::initrd_owner(&m.cmdline).is_some()).collect();
    let data = modules.iter().filter(|m| config::is_data_module(&m.cmdline)).count();
    let ignored = modules.len() - guest_modules.len() - initrds.len() - data;
    if ignored > 0 {
        warn!(
            "{ignored} boot module(s) without guest=NAME, initrd=NAME, vtpm.seed, vtpm.state=NAME, ctvm.policy or ctvm.api are ignored"
        );
    }
    // First every guest's CPUs, so that each CPU knows whether it is shared.
    let mut placed: Vec<(&Module, GuestConfig, CpuSet)> = Vec::new();
    for (i, module) in guest_modules.into_iter().enumerate() {
        let config = match config::parse(&module.cmdline) {
            Ok(c) => c,
            Err(e) => {
                error!("boot module {i}: {e}; skipped");
                continue;
            }
        };
        if placed.iter().any(|(_, c, _)| c.name == config.name) {
            error!("boot module {i}: a guest named {} exists already; skipped", config.name);
            continue;
        }
        match config.resolve_cpus(&machine.online) {
            Ok(cpus) => placed.push((module, config, cpus)),
            Err(e) => error!("guest {}: {e}; skipped", config.name),
        }
    }
    let mut load = [0u32; MAX_CPUS];
    for (_, _, cpus) in &placed {
        cpus.iter().for_each(|c| load[c] += 1);
    }
    // Time slicing only matters where a CPU has more than one vCPU.
    let slice = vmx.controls.features.preemption_timer.then_some(TIMESLICE_TICKS >> vmx.msrs.preemption_timer_rate());
    let whole_machine = |cpus: &CpuSet| *cpus == machine.online && cpus.len() == machine.apic_ids.len();
    let mut vms: Vec<&'static Vm> = Vec::new();
    for (module, config, cpus) in placed {
        let name = config.name.clone();
        let apic_ids: Vec<u32> = cpus.iter().map(|c| machine.apic_ids[c]).collect();
        let pass_through = config.kind == GuestKind::Linux;
        let built = match config.kind {
            GuestKind::Native => Shared::create_native(vmx, config, module_bytes(module), machine),
            GuestKind::Linux if vms.iter().any(|vm| vm.pass_through) => {
                Err(String::from("only one guest can own the machine's devices"))
            }
            GuestKind::Linux => {
                let initrd = initrds.iter().copied().find(|m| config::initrd_owner(&m.cmdline) == Some(&name));
                Shared::create_linux(vmx, config, module, initrd, machine, &apic_ids)
            }
        };
        let Built { mut shared, start } = match built {
            Ok(b) => b,
            Err(why) => {
                error!("guest {name}: could not be loaded: {why}");
                continue;
            }
        };
        let Some(ept) = shared.ept.as_mut() else { continue };
        ept.set_cpus(cpus);
        let eptp = ept.pointer();
        let Some(bitmaps) = shared.bitmaps.as_ref().map(Bitmaps::frames) else { continue };
        shared.guest.cpus = crate::exits::apic::GuestCpus::new(apic_ids.clone(), whole_machine(&cpus));
        shared.vcpu_stats = alloc::vec![VcpuStats::default(); cpus.len()];
        let vcpus = cpus
            .iter()
            .map(|c| VcpuHome {
                cpu: c,
                apic_id: machine.apic_ids[c],
                mailbox: Mailbox::default(),
                timeslice: slice.filter(|_| load[c] > 1),
            })
            .collect::<Vec<_>>();
        info!("guest {name}: loaded, on CPU {cpus} ({} vCPU{})", vcpus.len(), if vcpus.len() == 1 { "" } else { "s" });
        let live = AtomicUsize::new(vcpus.len());
        vms.push(Box::leak(Box::new(Vm {
            name,
            shared: Mutex::new(shared),
            vcpus,
            cpus,
            start,
            eptp,
            bitmaps,
            pass_through,
            corrupt: cfg!(feature = "test-hooks") && corrupt == Some(module_name(module)),
            stopping: AtomicBool::new(false),
            exclusive: Exclusive::default(),
            guards_changed: AtomicU64::new(0),
            live,
        })));
    }
    vms
}

/// The `guest=` name of a guest module.
fn module_name(module: &Module) -> &str {
    module.cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix("guest=")).unwrap_or("")
}

/// TSC ticks per time slice (about 10 ms at 1 GHz; the exact length does not matter).
const TIMESLICE_TICKS: u32 = 10_000_000;

/// Bytes of hypervisor stack per AP (as the boot CPU's).
const AP_STACK: u64 = ctvm_boot::BOOT_STACK_SIZE as u64;

/// Where each CPU stands while the boot CPU brings it up.
const STATUS_STARTING: u8 = 0;
const STATUS_READY: u8 = 1;
const STATUS_FAILED: u8 = 2;
static STATUS: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(STATUS_STARTING) }; MAX_CPUS];
/// The CPU `debug.stall-ap=` stops before VMXON (none: `usize::MAX`).
static STALL: AtomicUsize = AtomicUsize::new(usize::MAX);

/// VMX as the boot CPU found it, for the APs.
static VMX: Once<&'static Vmx> = Once::new();

/// The vCPUs each CPU runs (guest, vCPU index), by CPU index: published
/// once every guest is built, which lets the APs go.
type Plan = Vec<Vec<(&'static Vm, usize)>>;
static PLAN: Once<Plan> = Once::new();

/// Every guest, published with [`PLAN`]: a CPU may have to stop a guest
/// it does not run ([`stop_device_owners`]).
static GUESTS: Once<Vec<&'static Vm>> = Once::new();

/// DMA containment is lost: stops every guest that owns the machine's
/// devices, whichever CPU noticed (the decision is `dma::stops`, host-tested).
fn stop_device_owners(lost: &ContainmentLost) {
    let guests = GUESTS.get().map_or(&[][..], Vec::as_slice);
    let stops = dma::stops(lost, guests, |vm| vm.pass_through);
    if stops.is_empty() {
        error!("DMA containment lost: {lost}");
    }
    for (vm, reason) in stops {
        vm.stop(reason);
    }
}

/// Brings up every AP in `apic_ids` (index 0 is this, the boot CPU)
/// through the trampoline at `trampoline`, each into VMX root operation,
/// and returns the CPUs that made it. One that does not is reported and
/// left out: no guest ever sees it. `stall` names a CPU that stops before
/// VMXON without a word (a test knob: the boot CPU must not wait for it).
pub fn start_aps(vmx: &'static Vmx, trampoline: u64, apic_ids: &[u32], stall: Option<usize>) -> CpuSet {
    VMX.call_once(|| vmx);
    if let Some(cpu) = stall {
        STALL.store(cpu, Ordering::SeqCst);
    }
    let mut online = CpuSet::single(0);
    if apic_ids.len() < 2 {
        return online;
    }
    crate::arch::x86_64::ap::install(trampoline);
    // SAFETY: reading EFER has no side effects.
    let efer = unsafe { cpu::rdmsr(0xc000_0080) };
    let (cr0, cr4) = (cpu::read_cr0(), cpu::read_cr4());
    for (index, &apic_id) in apic_ids.iter().enumerate().skip(1) {
        if index >= MAX_CPUS {
            warn!("more than {MAX_CPUS} CPUs: the others stay off");
            break;
        }
        let (Some(stack), Some(tables)) = (
            phys::alloc_zeroed(AP_STACK, PAGE_SIZE),
            phys::alloc_zeroed(crate::arch::x86_64::gdt::CPU_TABLES_SIZE, PAGE_SIZE),
        ) else {
            warn!("CPU {index} (APIC {apic_id}) stays off: no memory for its stacks");
            break;
        };
        let p = Box::leak(Box::new(PerCpu::new(index, apic_id, stack..stack + AP_STACK, Default::default())));
        let start = Box::leak(Box::new(crate::arch::x86_64::ap::Start {
            percpu: Some(p),
            tables,
            efer,
            cr0,
            cr4,
            main: ap_main,
        }));
        if let Err(why) = crate::arch::x86_64::ap::start(trampoline, apic_id, stack + AP_STACK, start) {
            warn!("CPU {index} (APIC {apic_id}) is left out: {why}");
            continue;
        }
        let deadline = timer::deadline_us(1_000_000);
        while STATUS[index].load(Ordering::SeqCst) == STATUS_STARTING && !timer::passed(deadline) {
            core::hint::spin_loop();
        }
        match STATUS[index].load(Ordering::SeqCst) {
            STATUS_READY => online.insert(index),
            STATUS_FAILED => {}
            _ => warn!("CPU {index} (APIC {apic_id}) is left out: it did not turn VMX on within a second"),
        }
    }
    online
}

/// An AP, on its own stack with its own tables: VMX on, then the vCPUs the
/// boot CPU placed here, then idle (NMIs wake it, and it halts again).
fn ap_main(p: &'static PerCpu) -> ! {
    let Some(&vmx) = VMX.get() else { cpu::halt_forever() };
    if STALL.load(Ordering::SeqCst) == p.index {
        cpu::halt_forever();
    }
    if let Err(e) = enable::enable_ap(vmx) {
        error!("CPU {} (APIC {}) cannot use VT-x: {e}; it stays idle", p.index, p.apic_id);
        STATUS[p.index].store(STATUS_FAILED, Ordering::SeqCst);
        cpu::halt_forever();
    }
    info!("CPU {} (APIC {}): VMX on", p.index, p.apic_id);
    STATUS[p.index].store(STATUS_READY, Ordering::SeqCst);
    let plan = loop {
        if let Some(plan) = PLAN.get() {
            break plan;
        }
        // No guest at all: the power-off comes while it waits here.
        park::if_asked(p.index);
        core::hint::spin_loop();
    };
    if let Some(mine) = plan.get(p.index) {
        run_cpu(vmx, p.index, mine);
    }
    park::idle(p.index)
}

/// Runs every guest until all have stopped: the APs run theirs, this (the
/// boot) CPU runs its own, then waits for the others' to finish.
pub fn run(vmx: &'static Vmx, vms: &[&'static Vm]) {
    let mut plan: Plan = alloc::vec![Vec::new(); MAX_CPUS];
    for &vm in vms {
        for (index, home) in vm.vcpus.iter().enumerate() {
            plan[home.cpu].push((vm, index));
        }
    }
    GUESTS.call_once(|| vms.to_vec());
    let plan = PLAN.call_once(|| plan);
    let here = percpu::current().index;
    run_cpu(vmx, here, &plan[here]);
    while vms.iter().any(|vm| vm.live.load(Ordering::SeqCst) > 0) {
        park::if_asked(here);
        core::hint::spin_loop();
    }
}

/// A vCPU on the CPU that runs it.
struct Slot {
    vm: &'static Vm,
    index: usize,
    vcpu: Vcpu,
    local: VcpuLocal,
    /// DR0-DR3 and DR6 while another vCPU uses the CPU.
    debug_registers: [u64; 5],
    activity: Activity,
    /// An NMI waits for the guest to be able to take it.
    nmi_pending: bool,
    stats: VcpuStats,
    /// The generation of the guest's [`VmcsGuards`] its VMCS has.
    guards: u64,
}

fn new_slot(vmx: &Vmx, vm: &'static Vm, index: usize) -> Result<Slot, String> {
    let boot = index == 0;
    let start = if boot { &vm.start } else { &Start::WaitForSipi };
    let setup = VcpuSetup {
        start,
        eptp: vm.eptp,
        bitmaps: vm.bitmaps,
        timeslice: vm.vcpus[index].timeslice,
        pass_through: vm.pass_through,
    };
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
    let mut vcpu = Vcpu::new(vmx, &setup)?;
    // Only the test image can break a guest on purpose.
    #[cfg(feature = "test-hooks")]
    if boot && vm.corrupt {
        warn!("guest {}: corrupting its initial CR4 (test.corrupt-guest)", vm.name);
        vcpu.test_corrupt_guest_cr4();
    }
    Ok(Slot {
        vm,
        index,
        vcpu,
        local: VcpuLocal::default(),
        debug_registers: [0, 0, 0, 0, 0xffff_0ff0],
        activity: if boot { Activity::Running } else { Activity::WaitForSipi },
        nmi_pending: false,
        stats: VcpuStats::default(),
        guards: 0,
    })
}

/// How a vCPU left its CPU.
enum Outcome {
    /// Its time slice ended, or it waits for a start-up IPI on a shared CPU.
    Yield,
    Stop(StopReason),
    /// Its guest stopped.
    Gone,
}

/// One CPU's loop: its vCPUs, round-robin, until every one's guest stopped.
fn run_cpu(vmx: &Vmx, cpu: usize, assigned: &[(&'static Vm, usize)]) {
    let mut slots: Vec<Slot> = Vec::new();
    for &(vm, index) in assigned {
        match new_slot(vmx, vm, index) {
            Ok(s) => slots.push(s),
            Err(why) => {
                vm.stop(StopReason::LoadFailed(why));
                vm.vcpu_gone(index, VcpuStats::default());
            }
        }
    }
    let lapic = assigned.iter().find_map(|(vm, _)| match vm.shared.lock().guest.platform {
        Platform::PassThrough { lapic, .. } => lapic,
        Platform::Emulated => None,
    });
    let host = HostCpu { xcr0_offered: vmx.xcr0_offered, lapic: lapic.unwrap_or(0xfee0_0000) };
    let mut loaded: Option<usize> = None;
    let mut next = 0;
    loop {
        park::if_asked(cpu);
        let mut i = 0;
        while i < slots.len() {
            if !slots[i].vm.stopping.load(Ordering::SeqCst) {
                i += 1;
                continue;
            }
            let slot = slots.remove(i);
            loaded = match loaded {
                Some(l) if l == i => None,
                Some(l) if l > i => Some(l - 1),
                l => l,
            };
            let (vm, index, stats) = (slot.vm, slot.index, slot.stats);
            drop(slot);
            vm.vcpu_gone(index, stats);
        }
        if slots.is_empty() {
            return;
        }
        let count = slots.len();
        // A vCPU waiting for a start-up IPI only enters (and sleeps) on a
        // CPU of its own; on a shared one it is looked at when its mailbox
        // has something.
        let runnable =
            |s: &Slot| s.activity == Activity::Running || count == 1 || !s.vm.vcpus[s.index].mailbox.is_empty();
        let Some(i) = (0..count).map(|k| (next + k) % count).find(|&k| runnable(&slots[k])) else {
            core::hint::spin_loop();
            continue;
        };
        if loaded != Some(i) {
            if let Some(prev) = loaded {
                switch_away(vmx, &mut slots[prev]);
            }
            switch_to(vmx, &mut slots[i]);
            loaded = Some(i);
        }
        if let Outcome::Stop(reason) = run_slot(vmx, cpu, &host, &mut slots[i], count > 1) {
            slots[i].vm.stop(reason);
        }
        next = i + 1;
    }
}

/// Runs one vCPU until its time slice ends, it must wait, or its guest stops.
fn run_slot(vmx: &Vmx, cpu: usize, host: &HostCpu, slot: &mut Slot, shared_cpu: bool) -> Outcome {
    let vm = slot.vm;
    // Since when another vCPU has kept this one out (see `smp::exclusive`).
    let mut held_since: Option<u64> = None;
    loop {
        if vm.stopping.load(Ordering::SeqCst) {
            return Outcome::Gone;
        }
        // Inside first, then the mailbox and the epoch: what another CPU
        // posts or publishes from now on is seen here, or kicks this CPU.
        let epoch = SIGNALS.entering(cpu);
        // The machine is being handed back: out of VMX before any entry.
        park::if_asked(cpu);
        // Another vCPU runs the guest alone: wait outside.
        if vm.exclusive.excludes(slot.index) {
            SIGNALS.left(cpu);
            if shared_cpu {
                return Outcome::Yield;
            }
            let waited = *held_since.get_or_insert_with(cpu::rdtsc);
            if cpu::rdtsc().wrapping_sub(waited) > HELD_REPORT_TICKS {
                held_since = Some(cpu::rdtsc());
                report_held(vm, slot.index);
            }
            core::hint::spin_loop();
            continue;
        }
        if held_since.take().is_some_and(|since| cpu::rdtsc().wrapping_sub(since) > HELD_REPORT_TICKS) {
            warn!("guest {}: vCPU {} has waited long for another, which ran it alone", vm.name, slot.index);
        }
        if vm.guards_changed.load(Ordering::SeqCst) != slot.guards {
            apply_guards(vmx, slot);
        }
        // The IPIs the guest's other vCPUs sent this one.
        let changes = startup::take(&vm.vcpus[slot.index].mailbox, &mut slot.activity);
        if changes.reset {
            slot.vcpu.reset(vmx);
            slot.nmi_pending = false;
        }
        if let Some(vector) = changes.start {
            slot.vcpu.start_at(vector);
            slot.stats.startups += 1;
        }
        slot.nmi_pending |= changes.nmi;
        // An NMI for the guest that arrived while the hypervisor ran.
        if vm.pass_through && SIGNALS.take_guest_nmi(cpu) {
            slot.nmi_pending = true;
        }
        if slot.activity == Activity::WaitForSipi {
            // It runs no guest code there: nothing to catch up with, and
            // (NMIs being blocked) nothing to wait for from it.
            SIGNALS.left(cpu);
            if shared_cpu {
                return Outcome::Yield;
            }
        } else {
            if slot.nmi_pending && slot.vcpu.offer_nmi() {
                slot.nmi_pending = false;
                slot.stats.guest_nmis += 1;
            }
            if let Some(epoch) = epoch {
                vmx_vcpu::invept_all_contexts();
                SIGNALS.caught_up(cpu, epoch);
            }
        }
        let (exit, failure) = slot.vcpu.run(vmx);
        SIGNALS.left(cpu);
        if power::stopping() {
            cpu::halt_forever();
        }
        slot.stats.exits += 1;
        if exit.reason == u16::MAX {
            // VMLAUNCH/VMRESUME itself failed (bad control or host state).
            return Outcome::Stop(StopReason::LaunchFailed(failure.unwrap_or_default()));
        }
        // The hypervisor's own exits, handled without the guest's lock.
        let own = match exit.reason {
            reason::EXCEPTION_OR_NMI if (exit.interruption_info >> 8) & 7 == NMI_TYPE => {
                if SIGNALS.nmi_arrived(cpu) {
                    slot.stats.kicks += 1;
                    true
                } else if !vm.pass_through {
                    // No guest of emulated devices takes the platform's NMIs.
                    true
                } else if slot.local.integrity.view == View::Kernel {
                    slot.nmi_pending = true;
                    true
                } else {
                    // From a module's view: delivered in the kernel view.
                    false
                }
            }
            // A start-up IPI's doorbell: the mailbox says what it was.
            reason::SIPI | reason::NMI_WINDOW => true,
            _ => false,
        };
        if own {
            crate::vcpu::redeliver_interrupted_event(&mut slot.vcpu, &exit);
            continue;
        }
        let (action, outbox, dma_lost) = dispatch(slot, &exit, failure, host);
        // Before this vCPU can enter again (it returns as stopped, below).
        if let Some(lost) = dma_lost {
            stop_device_owners(&lost);
        }
        iommu::poll();
        for (target, event) in outbox {
            vm.post(target, event);
        }
        match action {
            Action::Resume => {}
            Action::Yield => return Outcome::Yield,
            Action::Stop(reason) => return Outcome::Stop(reason),
        }
    }
}

/// Interruption type of an NMI (SDM Vol. 3C, 25.9.2).
const NMI_TYPE: u32 = 2;

/// One exit through the generic handlers, under the guest's lock, with
/// the vCPU's own state swapped in. Returns the IPIs to post, and whether
/// DMA containment was lost in a kernel-view change.
fn dispatch(
    slot: &mut Slot,
    exit: &crate::vcpu::ExitInfo,
    failure: Option<String>,
    host: &HostCpu,
) -> (Action, Vec<(usize, VcpuEvent)>, Option<ContainmentLost>) {
    let handling = cpu::rdtsc();
    let vmx = VMX.get().copied();
    let vm = slot.vm;
    // Another vCPU runs the guest alone, or holds the module token this
    // exit will need: its handling waits (the other needs the lock to let go).
    let mut guard = loop {
        let guard = vm.shared.lock();
        let entry = enters_module(&guard.guest, slot, exit);
        if entry && vm.pass_through && interrupt_comes_first(slot, exit) {
            return (Action::Resume, Vec::new(), None);
        }
        let token_here = vm.exclusive.token_holder().is_none_or(|h| h == slot.index);
        if !vm.exclusive.excludes(slot.index) && (!entry || token_here) {
            break guard;
        }
        drop(guard);
        // A guest that stops while this exit waits: nothing to handle (the
        // caller finds it stopping before any entry).
        if vm.stopping.load(Ordering::SeqCst) {
            return (Action::Resume, Vec::new(), None);
        }
        core::hint::spin_loop();
    };
    let sh = &mut *guard;
    // What the handling takes of the other vCPUs (see `smp::exclusive`):
    // the module token to enter a module's view, the guest alone to open a
    // page of the kernel view, or to read the agent's structures (no other
    // vCPU changes them meanwhile).
    let hold = Hold((vm.vcpus.len() > 1 && sh.guest.integrity.is_some()).then_some((vm, slot.index)));
    if exit.reason == reason::VMCALL {
        hold.alone();
    }
    sh.guest.swap_local(&mut slot.local);
    sh.guest.cpus.current = slot.index;
    let mut iommu = iommu::Hook;
    let mut views = match (vmx, &sh.guest.integrity, sh.ept.as_mut(), sh.bitmaps.as_ref()) {
        (Some(vmx), Some(_), Some(kernel), Some(bitmaps)) => Some(Views {
            vmx,
            kernel,
            modules: &mut sh.module_views,
            bitmaps,
            module_bitmaps: sh.module_bitmaps.as_ref(),
            guards: &mut sh.guards,
            guards_changed: &vm.guards_changed,
            dma: &mut iommu,
            dma_lost: None,
            hold,
            stop: None,
        }),
        _ => None,
    };
    let control = views.as_mut().map(|v| v as &mut dyn GuestControl);
    let mut ctx = ExitContext { guest: &mut sh.guest, vcpu: &mut slot.vcpu, exit, host, phys: &Identity, control };
    let action = exits::dispatch(&mut ctx);
    let (dma_lost, stop) = views.map_or((None, None), |v| (v.dma_lost, v.stop));
    let action = match stop {
        Some(reason) => Action::Stop(StopReason::HypervisorError(reason)),
        None => action,
    };
    let action = match (action, failure) {
        (Action::Stop(StopReason::EntryFailed { reason, qualification, .. }), Some(detail)) => {
            Action::Stop(StopReason::EntryFailed { reason, qualification, detail })
        }
        (a, _) => a,
    };
    // Back in the kernel view with nothing opened or held: the others run
    // again, and may enter a module's view.
    if !sh.guest.integrity.as_ref().is_some_and(|i| i.local.is_busy()) {
        vm.exclusive.release(slot.index);
    }
    slot.guards = sh.guards.generation;
    sh.guest.exits.add_ticks(exit.reason, cpu::rdtsc().wrapping_sub(handling));
    sh.guest.swap_local(&mut slot.local);
    (action, core::mem::take(&mut sh.guest.cpus.outbox), dma_lost)
}

/// Whether this exit of a vCPU in the kernel view enters a module's view:
/// the kernel fetching an isolated module's code (a call, a return, an
/// interrupt's return into it). It needs the module token, and waits while
/// another vCPU holds it (see `smp::exclusive`).
fn enters_module(guest: &Guest, slot: &Slot, exit: &crate::vcpu::ExitInfo) -> bool {
    const FETCH: u64 = 1 << 2;
    exit.reason == reason::EPT_VIOLATION
        && exit.qualification & FETCH != 0
        && slot.local.integrity.view == View::Kernel
        && guest.integrity.as_ref().is_some_and(|i| {
            matches!(i.engine.class_of(exit.guest_physical), Some(crate::integrity::engine::PageClass::ModuleCode(_)))
        })
}

/// Whether the guest takes an interrupt before it enters a module's view:
/// it can take one, and its APIC (which it owns) has one to deliver. Then
/// the entry is not handled yet: the guest takes the interrupt in the
/// kernel's view at once, and its fetch of the module's code exits again
/// once the handler returns. Taken in the module's view, the interrupt
/// would take the vCPU straight out of it again before the module ran an
/// instruction: one more exit, two view switches, and the token given
/// back. A vCPU waiting for the token takes its interrupts meanwhile,
/// rather than holding them off while it waits.
fn interrupt_comes_first(slot: &Slot, exit: &crate::vcpu::ExitInfo) -> bool {
    const VALID: u32 = 1 << 31;
    exit.idt_vectoring_info & VALID == 0 && crate::vcpu::interruptible(&slot.vcpu) && {
        let (irr, ppr) = lapic::requests();
        exits::apic::deliverable(&irr, ppr).is_some()
    }
}

/// TSC ticks a vCPU waits for another that runs the guest alone before
/// it says so (about a second at 3.5 GHz; the exact length does not matter).
const HELD_REPORT_TICKS: u64 = 3_500_000_000;

/// Says that vCPU `vcpu` has waited long for the one that runs the guest
/// alone (and which vCPU holds the module token).
fn report_held(vm: &Vm, vcpu: usize) {
    let (holder, token) = (vm.exclusive.holder(), vm.exclusive.token_holder());
    warn!(
        "guest {}: vCPU {vcpu} has waited long for vCPU {holder:?}, which runs it alone (module token: {token:?})",
        vm.name
    );
}

/// Applies to this vCPU's VMCS what the integrity lock asked of every vCPU.
fn apply_guards(vmx: &Vmx, slot: &mut Slot) {
    let guards = slot.vm.shared.lock().guards;
    if guards.control_registers != (0, 0) {
        current::guard_control_registers(guards.control_registers.0, guards.control_registers.1);
    }
    if guards.descriptor_tables {
        current::enable_secondary_control(vmx, SecondaryControls::DTABLE_EXITING);
    }
    slot.guards = guards.generation;
}

/// Saves what the vCPU left in hardware before another vCPU runs here.
fn switch_away(vmx: &Vmx, slot: &mut Slot) {
    slot.vcpu.save_extended_state(vmx);
    slot.debug_registers = cpu::read_debug_registers();
    let s = &mut slot.local.msrs;
    for (msr, value) in SHADOWED_MSRS.into_iter().zip([
        &mut s.star,
        &mut s.lstar,
        &mut s.cstar,
        &mut s.sfmask,
        &mut s.kernel_gs_base,
        &mut s.tsc_aux,
    ]) {
        // SAFETY: architectural syscall MSRs, present on every x86-64 CPU.
        *value = unsafe { cpu::rdmsr(msr) };
    }
}

fn switch_to(vmx: &Vmx, slot: &mut Slot) {
    let msrs = slot.local.msrs;
    slot.vcpu.load();
    slot.vcpu.restore_extended_state(vmx, slot.local.xcr0);
    cpu::write_debug_registers(slot.debug_registers);
    let values = [msrs.star, msrs.lstar, msrs.cstar, msrs.sfmask, msrs.kernel_gs_base, msrs.tsc_aux];
    for (msr, value) in SHADOWED_MSRS.into_iter().zip(values) {
        // SAFETY: architectural syscall MSRs; the hypervisor does not use them.
        unsafe { cpu::wrmsr(msr, value) };
    }
}

/// The exit counts of every guest, a total per guest, and each vCPU's.
pub fn report(vms: &[&'static Vm]) {
    info!("VM exits by reason:");
    for vm in vms {
        let sh = vm.shared.lock();
        let guest = &sh.guest;
        info!("  guest {}", guest.name());
        for (reason, name, count) in guest.exits.seen() {
            let mean = guest.exits.mean_ticks(reason);
            info!("    {reason:>3} {name:<28} {count:>10}   {mean:>8} ticks each");
        }
        info!("  total {} {}", guest.name(), guest.exits.total());
        for (home, s) in vm.vcpus.iter().zip(&sh.vcpu_stats) {
            info!(
                "  cpu {} (APIC {}): {} exits, {} of them signals from other CPUs; {} NMIs for the guest; started {} times",
                home.cpu,
                home.apic_id,
                s.exits,
                s.kicks,
                s.guest_nmis,
                s.startups
            );
        }
        for (kind, count) in guest.refusals.seen() {
            info!("  refused {}: {kind} {count}", guest.name());
        }
        if let Some(i) = &guest.integrity {
            let s = i.engine.stats;
            info!(
                "  integrity {}: {} view switches, {} thunk branches, {} pages granted, {} page-table walks before a grant, {} text pokes let through, {} violations",
                guest.name(),
                s.switches,
                s.branches,
                s.grants,
                s.table_walks,
                s.pokes,
                s.violations
            );
        }
        if let Some(r) = guest.vtpm.as_ref().and_then(crate::tpm::GuestTpm::durable_report) {
            info!("  {}", r.summary(guest.name()));
        }
    }
    let c = SIGNALS.costs.summary();
    if c.rounds > 0 {
        info!(
            "shootdowns: {} ({} NMIs), {} TSC ticks each on average, {} at most",
            c.rounds, c.kicks, c.mean_ticks, c.most_ticks
        );
    }
    let (free, total) = phys::usage();
    info!("free RAM {} of {} MiB", free >> 20, total >> 20);
}
