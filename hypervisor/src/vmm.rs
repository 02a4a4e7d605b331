//! The virtual machine monitor proper: guests created from boot modules,
//! scheduled round-robin on this CPU, each exit dispatched to the generic
//! handlers, and a report when every guest has stopped.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::{error, info, warn};

use crate::acpi;
use crate::arch::x86_64::cpu::{self, HostCpu};
use crate::arch::x86_64::entropy::HardwarePlatform;
use crate::arch::x86_64::platform::Sealer;
use crate::arch::x86_64::vmx::bitmaps::{IoBitmap, MsrBitmap};
use crate::arch::x86_64::vmx::caps::{PrimaryControls, SecondaryControls};
use crate::arch::x86_64::vmx::enable::Vmx;
use crate::arch::x86_64::vmx::vcpu::{current, Bitmaps, Ept, Vcpu, VcpuSetup};
use crate::boot_info::Module;
use crate::console;
use crate::exits::{self, Action, ExitContext, StopReason};
use crate::guest::config::{self, GuestConfig, GuestKind};
use crate::guest::linux::{self, boot_data, e820, BzImage, E820Entry, LoadPlan};
use crate::guest::memory::GuestMemory;
use crate::guest::{loader, CrLimits, Guest, Platform, PortSet, RunState};
use crate::integrity::control::{ControlError, GuestControl};
use crate::integrity::{GuestIntegrity, View};
use crate::mm::frames::{Region, PAGE_SIZE};
use crate::mm::paging::{Attrs, MemType, Perms};
use crate::mm::phys::{self, Identity};
use crate::tpm::anchor::{
    CounterElsewhere, NoCounter, PlatformCounter, PlatformRoot, RollbackAnchor, SealingRoot, SeedRoot,
};
use crate::tpm::config_event::{config_event, IntegrityMode, SecurityConfig};
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
    /// Memory the hypervisor keeps (image, frame pool, modules of other
    /// guests): reserved in a pass-through guest's e820 and absent from its EPT.
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
    /// The APIC ID of the CPU the guests run on.
    pub apic_id: u32,
}

/// A guest with its virtual CPU and memory.
pub struct Vm {
    pub guest: Guest,
    vcpu: Option<Vcpu>,
    /// The guest's EPT: its only view, or the kernel view (KEPT).
    ept: Option<Ept>,
    /// One view per isolated module (MEPT).
    module_views: BTreeMap<u32, Ept>,
    bitmaps: Option<Bitmaps>,
    /// The bitmaps of the module views: every port and MSR write exits.
    module_bitmaps: Option<Bitmaps>,
    /// DR0-DR3 and DR6 while another guest runs.
    debug_registers: [u64; 5],
    /// RAM taken from the frame pool (native guests only).
    ram: Option<Region>,
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

/// The durable guest the platform TPM's one monotonic counter guards: the
/// first in module order (keep that order: a guest that takes the counter
/// over later finds its older versions below it and refuses them).
static COUNTER_OWNER: spin::Mutex<Option<String>> = spin::Mutex::new(None);

/// Whether `guest` gets the platform counter (the first to ask does).
fn claim_counter(guest: &str) -> bool {
    let mut owner = COUNTER_OWNER.lock();
    owner.get_or_insert_with(|| String::from(guest)) == guest
}

pub fn module_bytes(module: &Module) -> &'static [u8] {
    // SAFETY: GRUB loaded the module there, the frame allocator never hands
    // out module ranges, and no guest's EPT maps a module it does not own.
    unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) }
}

impl Vm {
    fn empty(guest: Guest) -> Vm {
        Vm {
            guest,
            vcpu: None,
            ept: None,
            module_views: BTreeMap::new(),
            bitmaps: None,
            module_bitmaps: None,
            debug_registers: [0, 0, 0, 0, 0xffff_0ff0],
            ram: None,
        }
    }

    /// A native guest: RAM from the frame pool, emulated devices only.
    fn create_native(
        vmx: &Vmx,
        config: GuestConfig,
        image: &[u8],
        timeslice: Option<u32>,
        machine: &Machine<'_>,
    ) -> Result<Vm, String> {
        let size = config.mem_bytes;
        let hpa =
            phys::alloc_zeroed(size, 2 << 20).ok_or_else(|| format!("no {} MiB of free RAM for it", size >> 20))?;
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, size), hpa).map_err(|_| "overlapping memory")?;
        let mut vm = Vm::empty(Guest::new(config, Platform::Emulated, memory, cr_limits(vmx)));
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
        let setup = VcpuSetup { entry: &entry, bitmaps: &bitmaps, timeslice, pass_through: false };
        vm.vcpu = Some(Vcpu::new(vmx, &ept, &setup)?);
        vm.ept = Some(ept);
        vm.bitmaps = Some(bitmaps);
        Ok(vm)
    }

    /// A Linux guest on the pass-through platform: the machine's devices and
    /// RAM, identity-mapped, except the hypervisor's memory and the TIS window.
    fn create_linux(
        vmx: &Vmx,
        config: GuestConfig,
        kernel: &Module,
        initrd: Option<&Module>,
        machine: &Machine<'_>,
        timeslice: Option<u32>,
    ) -> Result<Vm, String> {
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
        let mut vm = Vm::empty(Guest::new(config, platform, memory, cr_limits(vmx)));
        vm.guest.integrity = integrity;
        if vm.guest.integrity.is_some() {
            vm.guest.capabilities |= guest_agent::Capabilities::INTEGRITY;
        }

        let ept = pass_through_ept(vmx, &map, machine.hypervisor_ranges, machine.lapic)?;
        if vm.guest.config.vtpm {
            let cmdline = vm.guest.config.args.clone();
            vm.attach_vtpm(machine, module_bytes(kernel), cmdline.as_bytes(), initrd.map(module_bytes))?;
        }
        let rsdp = install_acpi(&vm.guest, machine);
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
        let setup = VcpuSetup { entry: &entry, bitmaps: &bitmaps, timeslice, pass_through: true };
        vm.vcpu = Some(Vcpu::new(vmx, &ept, &setup)?);
        vm.ept = Some(ept);
        vm.bitmaps = Some(bitmaps);
        vm.module_bitmaps = Some(module_bitmaps);
        Ok(vm)
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
        // With a platform TPM the state key is sealed to CTVM's measured
        // configuration and its counter guards the first durable guest;
        // without one, the seed and no counter (both reported as weaker).
        let sealer = Sealer::found();
        let root: Option<alloc::boxed::Box<dyn SealingRoot>> = match (machine.vtpm_seed, sealer) {
            (Some(seed), Some(chip)) => Some(alloc::boxed::Box::new(PlatformRoot::new(chip, seed))),
            (Some(seed), None) => Some(alloc::boxed::Box::new(SeedRoot::new(seed))),
            (None, _) => None,
        };
        let anchor: alloc::boxed::Box<dyn RollbackAnchor> = match sealer {
            Some(chip) if config.vtpm_durable && claim_counter(&name) => {
                alloc::boxed::Box::new(PlatformCounter::new(chip, &name))
            }
            Some(_) if config.vtpm_durable => alloc::boxed::Box::new(CounterElsewhere),
            _ => alloc::boxed::Box::new(NoCounter),
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
        let integrity = match config.integrity {
            Some(crate::integrity::Mode::Enforce) => IntegrityMode::Enforce,
            Some(crate::integrity::Mode::Audit) => IntegrityMode::Audit,
            None => IntegrityMode::Off,
        };
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

    /// Returns the guest's memory and tables to the pool.
    fn tear_down(&mut self) {
        self.vcpu = None;
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

    fn stop(&mut self, reason: StopReason) {
        if let Some(line) = self.guest.uart.flush() {
            console::guest_line(self.guest.name(), &line);
        }
        info!("guest {} stopped: {reason}", self.guest.name());
        self.guest.state = RunState::Stopped(reason);
        self.tear_down();
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
        current::set_eptp(eptp);
        current::set_event_exiting(matches!(view, View::Module(_)));
        // The bitmaps go with the view: a module's traps every port and MSR write.
        if let Some(module_bitmaps) = self.module_bitmaps {
            current::set_bitmaps(if view == View::Kernel { self.bitmaps } else { module_bitmaps });
        }
        Ok(())
    }

    fn set_perms(&mut self, view: View, page: u64, perms: Perms) -> Result<(), ControlError> {
        // Module views map pages one to one, with the kernel view's memory type.
        let mem_type = self.kernel.translate(page).map_or(MemType::WriteBack, |t| t.attrs.mem_type);
        let ept = self.view(view)?;
        let result = if perms.is_empty() {
            ept.unmap(page, PAGE_SIZE)
        } else if ept.translate(page).is_some() {
            ept.protect(page, PAGE_SIZE, perms)
        } else {
            ept.map(page, page, PAGE_SIZE, Attrs::new(perms, mem_type))
        };
        // Devices never write what the kernel view does not (DMA view in step with KEPT).
        if view == View::Kernel && result.is_ok() {
            crate::arch::x86_64::iommu::kernel_view_changed(page, perms);
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
        let ept = Ept::new(self.vmx).ok_or(ControlError)?;
        if let Some(old) = self.modules.insert(module, ept) {
            old.destroy();
        }
        Ok(())
    }

    fn destroy_view(&mut self, module: u32) {
        if let Some(ept) = self.modules.remove(&module) {
            ept.destroy();
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
    }

    fn trap_descriptor_tables(&mut self) {
        if !current::enable_secondary_control(self.vmx, SecondaryControls::DTABLE_EXITING) {
            warn!("descriptor-table exiting is not available: LGDT/LIDT are not trapped");
        }
    }

    fn trap_msr_writes(&mut self, msrs: &[u32]) {
        for &msr in msrs {
            self.bitmaps.trap_msr_write(msr);
        }
    }
}

/// Writes the pass-through guest's ACPI overlay into the boot data area: a
/// MADT listing only the guest's CPU, and with a vTPM a TCPA table with the
/// event log and an SSDT with the TPM device; a new RSDP, RSDT and XSDT list
/// them with the firmware's other tables. Returns the new RSDP's address.
/// Without firmware ACPI tables the guest still finds the TPM with
/// `tpm_tis.force=1`.
fn install_acpi(guest: &Guest, machine: &Machine<'_>) -> Option<u64> {
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
        Some(bytes) => match acpi::build::madt_for(&bytes, &[machine.apic_id]) {
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

/// Creates a VM per guest module. A module that fails to load is reported
/// and skipped; the others still run. `corrupt` (test image only) names a guest whose initial
/// state is broken on purpose (a test knob).
pub fn create_vms(vmx: &Vmx, machine: &Machine<'_>, corrupt: Option<&str>) -> Vec<Vm> {
    #[cfg(not(feature = "test-hooks"))]
    let _ = corrupt;
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
    // Time slicing only matters with more than one guest.
    let timeslice = (guest_modules.len() > 1 && vmx.controls.features.preemption_timer)
        .then_some(TIMESLICE_TICKS >> vmx.msrs.preemption_timer_rate());
    let mut vms: Vec<Vm> = Vec::new();
    for (i, module) in guest_modules.into_iter().enumerate() {
        let config = match config::parse(&module.cmdline) {
            Ok(c) => c,
            Err(e) => {
                error!("boot module {i}: {e}; skipped");
                continue;
            }
        };
        let name = config.name.clone();
        if vms.iter().any(|vm| vm.guest.name() == name) {
            error!("boot module {i}: a guest named {name} exists already; skipped");
            continue;
        }
        let created = match config.kind {
            GuestKind::Native => Vm::create_native(vmx, config, module_bytes(module), timeslice, machine),
            GuestKind::Linux if vms.iter().any(|vm| vm.guest.platform.is_pass_through()) => {
                Err(String::from("only one guest can own the machine's devices"))
            }
            GuestKind::Linux => {
                let initrd = initrds.iter().copied().find(|m| config::initrd_owner(&m.cmdline) == Some(&name));
                Vm::create_linux(vmx, config, module, initrd, machine, timeslice)
            }
        };
        match created {
            #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
            Ok(mut vm) => {
                info!("guest {name}: loaded");
                // Only the test image can break a guest on purpose.
                #[cfg(feature = "test-hooks")]
                if corrupt == Some(name.as_str()) {
                    warn!("guest {name}: corrupting its initial CR4 (test.corrupt-guest)");
                    if let Some(vcpu) = vm.vcpu.as_mut() {
                        vcpu.test_corrupt_guest_cr4();
                    }
                }
                vms.push(vm);
            }
            Err(why) => error!("guest {name}: could not be loaded: {why}"),
        }
    }
    vms
}

/// TSC ticks per time slice (about 10 ms at 1 GHz; the exact length does not matter).
const TIMESLICE_TICKS: u32 = 10_000_000;

/// Runs every guest until all have stopped.
pub fn run(vmx: &Vmx, vms: &mut [Vm]) {
    let lapic = vms.iter().find_map(|vm| match vm.guest.platform {
        Platform::PassThrough { lapic, .. } => lapic,
        Platform::Emulated => None,
    });
    let host = HostCpu { xcr0_offered: vmx.xcr0_offered, lapic: lapic.unwrap_or(0xfee0_0000) };
    let mut current: Option<usize> = None;
    let mut next = 0;
    while let Some(i) = (0..vms.len()).map(|k| (next + k) % vms.len()).find(|&k| vms[k].guest.is_running()) {
        if current != Some(i) {
            if let Some(prev) = current {
                switch_away(vmx, &mut vms[prev]);
            }
            switch_to(vmx, &mut vms[i]);
            current = Some(i);
        }
        let vm = &mut vms[i];
        let action = loop {
            let vcpu = vm.vcpu.as_mut().expect("running guests have a vCPU");
            let (exit, failure) = vcpu.run(vmx);
            let handling = cpu::rdtsc();
            if exit.reason == u16::MAX {
                // VMLAUNCH/VMRESUME itself failed (bad control or host state).
                break Action::Stop(StopReason::LaunchFailed(failure.unwrap_or_default()));
            }
            let mut views = match (&vm.guest.integrity, vm.ept.as_mut(), vm.bitmaps.as_ref()) {
                (Some(_), Some(kernel), Some(bitmaps)) => Some(Views {
                    vmx,
                    kernel,
                    modules: &mut vm.module_views,
                    bitmaps,
                    module_bitmaps: vm.module_bitmaps.as_ref(),
                }),
                _ => None,
            };
            let control = views.as_mut().map(|v| v as &mut dyn GuestControl);
            let mut ctx =
                ExitContext { guest: &mut vm.guest, vcpu, exit: &exit, host: &host, phys: &Identity, control };
            let action = exits::dispatch(&mut ctx);
            let action = match (action, failure) {
                (Action::Stop(StopReason::EntryFailed { reason, qualification, .. }), Some(detail)) => {
                    Action::Stop(StopReason::EntryFailed { reason, qualification, detail })
                }
                (a, _) => a,
            };
            vm.guest.exits.add_ticks(exit.reason, cpu::rdtsc().wrapping_sub(handling));
            crate::arch::x86_64::iommu::poll();
            if action != Action::Resume {
                break action;
            }
        };
        if let Action::Stop(reason) = action {
            vm.stop(reason);
            current = None;
        }
        next = i + 1;
    }
}

/// Saves what the guest left in hardware before another guest runs.
fn switch_away(vmx: &Vmx, vm: &mut Vm) {
    let Some(vcpu) = vm.vcpu.as_mut() else { return };
    vcpu.save_extended_state(vmx);
    vm.debug_registers = cpu::read_debug_registers();
    let s = &mut vm.guest.msrs;
    for (msr, slot) in SHADOWED_MSRS.into_iter().zip([
        &mut s.star,
        &mut s.lstar,
        &mut s.cstar,
        &mut s.sfmask,
        &mut s.kernel_gs_base,
        &mut s.tsc_aux,
    ]) {
        // SAFETY: architectural syscall MSRs, present on every x86-64 CPU.
        *slot = unsafe { cpu::rdmsr(msr) };
    }
}

fn switch_to(vmx: &Vmx, vm: &mut Vm) {
    let xcr0 = vm.guest.xcr0;
    let msrs = vm.guest.msrs;
    let vcpu = vm.vcpu.as_mut().expect("running guests have a vCPU");
    vcpu.load();
    vcpu.restore_extended_state(vmx, xcr0);
    cpu::write_debug_registers(vm.debug_registers);
    let values = [msrs.star, msrs.lstar, msrs.cstar, msrs.sfmask, msrs.kernel_gs_base, msrs.tsc_aux];
    for (msr, value) in SHADOWED_MSRS.into_iter().zip(values) {
        // SAFETY: architectural syscall MSRs; the hypervisor does not use them.
        unsafe { cpu::wrmsr(msr, value) };
    }
}

/// The exit counts of every guest, then a total per guest.
pub fn report(vms: &[Vm]) {
    info!("VM exits by reason:");
    for vm in vms {
        info!("  guest {}", vm.guest.name());
        for (reason, name, count) in vm.guest.exits.seen() {
            let mean = vm.guest.exits.mean_ticks(reason);
            info!("    {reason:>3} {name:<28} {count:>10}   {mean:>8} ticks each");
        }
        info!("  total {} {}", vm.guest.name(), vm.guest.exits.total());
        for (kind, count) in vm.guest.refusals.seen() {
            info!("  refused {}: {kind} {count}", vm.guest.name());
        }
        if let Some(i) = &vm.guest.integrity {
            let s = i.engine.stats;
            info!(
                "  integrity {}: {} view switches, {} thunk branches, {} pages granted, {} text pokes let through, {} violations",
                vm.guest.name(),
                s.switches,
                s.branches,
                s.grants,
                s.pokes,
                s.violations
            );
        }
    }
    let (free, total) = phys::usage();
    info!("free RAM {} of {} MiB", free >> 20, total >> 20);
}
