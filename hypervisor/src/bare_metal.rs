//! Start-up on bare metal: console, descriptor tables, memory, VMX, guests.

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use hypervisor::arch::x86_64::percpu::{self, PerCpu};
use hypervisor::arch::x86_64::vmx::enable::{enable, Vmx, VmxError};
use hypervisor::arch::x86_64::{cpu, gdt, lapic, platform, power, serial, timer, traps};
use hypervisor::boot_info::{self, Loader, Mb1, Memory};
use hypervisor::console;
use hypervisor::guest::config;
use hypervisor::guest::linux::{boot_data, e820};
use hypervisor::integrity::api::ApiPolicy;
use hypervisor::integrity::policy::Policy;
use hypervisor::mm::frames::{self, FrameAllocator, Region};
use hypervisor::mm::phys;
use hypervisor::smp::{self, CpuSet};
use hypervisor::vmm;
use linked_list_allocator::LockedHeap;
use log::{error, info, warn};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The heap serves hypervisor bookkeeping; guest memory and page tables come
/// from the frame allocator.
const HEAP_SIZE: u64 = 16 << 20;

/// RAM the hypervisor keeps for itself when a guest owns the machine: heap,
/// page tables, VMCSs, native guests' memory. `hv.pool=SIZE` changes it.
const DEFAULT_POOL: u64 = 96 << 20;

/// Frames above this are not mapped by the boot page tables.
const ADDRESSABLE_LIMIT: u64 = 4 << 30;

#[no_mangle]
extern "C" fn ctvm_main(magic: u32, info_addr: u64) -> ! {
    // SAFETY: no per-CPU data yet: GS must not point anywhere.
    unsafe { cpu::wrmsr(0xc000_0101, 0) };
    serial::init();
    console::init(serial::write_bytes, log::LevelFilter::Info);
    let boot_ist = gdt::init();
    traps::init();
    info!("CTVM {} starting", env!("CARGO_PKG_VERSION"));

    let loader = match magic {
        ctvm_boot::MULTIBOOT2_BOOTLOADER_MAGIC => {
            // SAFETY: a multiboot2 loader passed this pointer with the magic above.
            let mb = match unsafe { multiboot2::BootInformation::load(info_addr as *const _) } {
                Ok(mb) => mb,
                Err(e) => fatal(format_args!("the multiboot2 information is unusable: {e:?}")),
            };
            // Before any typed getter: the crate's assert on a malformed tag.
            if let Err(e) = boot_info::check(&mb) {
                fatal(format_args!("the multiboot2 information is unusable: {e:?}"));
            }
            Loader::V2(mb)
        }
        // tboot (after GRUB's `multiboot`) passes multiboot 1 on.
        ctvm_boot::MULTIBOOT1_BOOTLOADER_MAGIC => match Mb1::new(low_memory(), info_addr) {
            Some(mb) => Loader::V1(mb),
            None => fatal(format_args!("the multiboot information at {info_addr:#x} is out of reach")),
        },
        _ => {
            error!("not started by a multiboot loader (magic {magic:#x}); halting");
            power::stop_machine(power::EXIT_HYPERVISOR_FAULT);
        }
    };

    let image = ctvm_boot::image_range();
    let image = Region::new(image.start, image.end);
    let mut excluded: [Region; 72] = [Region::default(); 72];
    let mut count = 0;
    for r in core::iter::once(image).chain(loader.boot_ranges()) {
        if count == excluded.len() {
            fatal(format_args!("too many boot modules"));
        }
        excluded[count] = r;
        count += 1;
    }
    let mut free =
        match frames::free_memory::<{ phys::REGIONS }>(loader.memory_map(), &excluded[..count], ADDRESSABLE_LIMIT) {
            Ok(free) => free,
            Err(_) => fatal(format_args!("the memory map is too fragmented")),
        };
    // With a guest that owns the machine, the hypervisor keeps one block of
    // RAM (its pool) and leaves the rest to that guest.
    let pass_through = loader.module_cmdlines().any(config::is_pass_through_module);
    // The test image's DMA test builds the DMA view as for a device owner
    // (read before the heap exists: no allocation).
    #[cfg(feature = "test-hooks")]
    let pass_through = pass_through
        || boot_info::options(loader.cmdline())
            .any(|(k, v)| hypervisor::arch::x86_64::testing::Options::makes_device_owner(k, v));
    let mut pool = None;
    if pass_through {
        let cmdline = loader.cmdline();
        let size = boot_info::options(cmdline)
            .find(|(k, _)| *k == "hv.pool")
            .and_then(|(_, v)| config::parse_size(v))
            .unwrap_or(DEFAULT_POOL)
            .next_multiple_of(2 << 20);
        let Some(block) = free.highest_block(size, 2 << 20, ADDRESSABLE_LIMIT) else {
            fatal(format_args!("no {} MiB block of RAM for the hypervisor's pool", size >> 20))
        };
        let mut only = frames::RegionSet::new();
        if only.insert(block).is_err() {
            fatal(format_args!("pool set-up"));
        }
        free = only;
        pool = Some(block);
    }
    let mut frames: FrameAllocator<{ phys::REGIONS }> = FrameAllocator::new(free);
    let Some(heap) = frames.allocate(HEAP_SIZE, 2 << 20) else {
        fatal(format_args!("no room for a {} MiB heap", HEAP_SIZE >> 20))
    };
    // SAFETY: the frames are free RAM, identity mapped, and handed to the heap alone.
    unsafe { HEAP.lock().init(heap as *mut u8, HEAP_SIZE as usize) };

    let mut boot = match loader.parse() {
        Ok(b) => b,
        Err(e) => fatal(format_args!("boot information: {e:?}")),
    };
    if boot.rsdp.is_none() {
        boot.rsdp = hypervisor::acpi::find_rsdp(&phys::Identity);
    }
    // The APs' real-mode trampoline: a page of low RAM that no boot
    // structure uses, and that a Linux guest's boot data does not take.
    let trampoline = {
        let ram: Vec<Region> = boot.memory.iter().filter(|e| e.kind == e820::RAM).map(|e| e.region).collect();
        let mut avoid = alloc::vec![image, boot_data::region()];
        // The boot ranges without the whole first MiB (kept from the frame
        // allocator, not from the trampoline): the loader's own structures.
        avoid.extend(loader.boot_ranges().filter(|r| *r != Region::new(0, 1 << 20)));
        avoid.extend(boot.modules.iter().map(|m| m.range));
        smp::trampoline_page(&ram, &avoid)
    };
    let mut vtpm_seed = None;
    #[cfg(feature = "test-hooks")]
    let mut tests = hypervisor::arch::x86_64::testing::Options::default();
    for (key, value) in boot_info::options(&boot.cmdline) {
        match key {
            #[cfg(feature = "test-hooks")]
            key if tests.accept(key, value) => {}
            // tboot's shared page: read by the platform start-up.
            "hv.pool" | "tboot" => {}
            "vtpm.seed" => match hypervisor::tpm::parse_seed(value.as_bytes()) {
                Some(seed) => {
                    log::warn!("vtpm.seed on the command line: a measuring GRUB logs it in clear; use a module");
                    vtpm_seed = Some(seed);
                }
                None => log::warn!("vtpm.seed must be 64 hexadecimal digits; ignored"),
            },
            "log" => match console::parse_level(value) {
                Some(level) => log::set_max_level(level),
                None => log::warn!("unknown log level {value:?}"),
            },
            "exit" => match power::ExitMethod::parse(value) {
                Some(m) => power::set_method(m),
                None => log::warn!("unknown exit method {value:?}"),
            },
            other => log::warn!("unknown option {other:?} on the command line"),
        }
    }
    info!(
        "image {:?}, {} MiB free RAM in {} regions, {} modules, command line {:?}",
        image,
        frames.free_bytes() >> 20,
        frames.regions().len(),
        boot.modules.len(),
        boot.cmdline
    );
    phys::install(frames);
    mask_legacy_pic();
    let bsp = Box::leak(Box::new(PerCpu::new(0, lapic::id(), ctvm_boot::boot_stack(), boot_ist)));
    let bsp_apic = bsp.apic_id;
    percpu::install(bsp);
    let tsc_per_ms = timer::calibrate();

    // Memory a pass-through guest must not see: the image, the pool, and the
    // modules of the other guests.
    let mut hypervisor_ranges = alloc::vec![image];
    hypervisor_ranges.extend(pool);
    hypervisor_ranges.extend(trampoline.map(|page| Region::new(page, page + 4096)));
    hypervisor_ranges.extend(
        boot.modules
            .iter()
            .filter(|m| !config::is_pass_through_module(&m.cmdline) && config::initrd_owner(&m.cmdline).is_none())
            .map(|m| m.range),
    );
    // The platform pieces (IOMMU, platform TPM, tboot) before VMX and
    // before any guest: they run even where VT-x is missing.
    let platform = platform::start(&boot, &hypervisor_ranges, pass_through);
    hypervisor_ranges.extend(platform.hidden.iter().copied());
    #[cfg(feature = "test-hooks")]
    if tests.dma {
        hypervisor::arch::x86_64::testing::edu_dma(platform::pm_timer_port(&boot));
    }
    #[cfg(feature = "test-hooks")]
    if tests.vtpm_seal {
        hypervisor::arch::x86_64::testing::vtpm_seal();
    }

    let vmx: &'static Vmx = match enable() {
        Ok(vmx) => Box::leak(Box::new(vmx)),
        Err(e @ VmxError::NoVmx) => platform::without_vmx(alloc::format!("{e}")),
        Err(e) => fatal(format_args!("cannot use VT-x: {e}")),
    };
    vmx.report();
    info!("VMX on");
    // Every CPU the firmware lists, the boot CPU first, each into VMX.
    let apic_ids = machine_cpus(boot.rsdp.as_deref(), bsp_apic);
    #[cfg(feature = "test-hooks")]
    let stall_ap = tests.stall_ap;
    #[cfg(not(feature = "test-hooks"))]
    let stall_ap = None;
    let online = match trampoline {
        Some(page) => vmm::start_aps(vmx, page, &apic_ids, stall_ap),
        None => {
            warn!("no free page below 1 MiB for the APs' trampoline: CTVM runs on the boot CPU alone");
            CpuSet::single(0)
        }
    };
    if online.len() > 1 {
        power::others_online();
    }
    info!(
        "{} of {} CPUs run under the hypervisor (APIC IDs {:?}); TSC {} kHz",
        online.len(),
        apic_ids.len(),
        online.iter().map(|c| apic_ids[c]).collect::<Vec<_>>(),
        tsc_per_ms
    );
    #[cfg(feature = "test-hooks")]
    if tests.fault {
        hypervisor::arch::x86_64::testing::fault();
    }
    // The seed as a file: GRUB measures a module's digest, not its contents.
    if let Some(m) = boot.modules.iter().find(|m| m.cmdline.trim() == config::SEED_MODULE) {
        match hypervisor::tpm::parse_seed(vmm::module_bytes(m)) {
            Some(seed) => vtpm_seed = Some(seed),
            None => log::warn!("the vtpm.seed module must hold 64 hexadecimal digits; ignored"),
        }
    }
    let policy = trusted_module_policy(&boot.modules);
    let module_digest =
        |name: &str| boot.modules.iter().find(|m| m.cmdline.trim() == name).map(|m| sha256(&[vmm::module_bytes(m)]));
    let policy_digest = module_digest(config::POLICY_MODULE);
    let api_digest = module_digest(config::API_MODULE);
    // SAFETY: the ranges are the image's read-only segments, mapped and
    // never written.
    let hypervisor_digest = sha256(
        &ctvm_boot::readonly_ranges()
            .map(|r| unsafe { core::slice::from_raw_parts(r.start as *const u8, (r.end - r.start) as usize) }),
    );
    info!(
        "hypervisor image: code and read-only data SHA-256 {}",
        hypervisor::tpm::config_event::to_hex(&hypervisor_digest)
    );
    let api = kernel_api_policy(&boot.modules);
    // The PCI devices' I/O ports, found before any guest can move them.
    let pci_io = hypervisor::pci::io_ranges(&mut cpu::PortConfigSpace);
    // This CPU's local APIC: its page, unless it runs in x2APIC mode.
    // SAFETY: IA32_APIC_BASE exists on every x86-64 processor.
    let apic_base = unsafe { cpu::rdmsr(0x1b) };
    let lapic = (apic_base & (1 << 10) == 0).then_some(apic_base & 0x000f_ffff_ffff_f000);
    let machine = vmm::Machine {
        modules: &boot.modules,
        firmware_map: &boot.memory,
        hypervisor_ranges: &hypervisor_ranges,
        rsdp: boot.rsdp.as_deref(),
        vtpm_seed,
        hypervisor_digest,
        policy_digest,
        api_digest,
        policy: &policy,
        api: api.as_ref(),
        pci_io: &pci_io,
        lapic,
        online,
        apic_ids: &apic_ids,
    };
    if vtpm_seed.is_none() {
        info!("no vtpm.seed: vTPM endorsement keys are new at every boot");
    }
    #[cfg(feature = "test-hooks")]
    let corrupt_guest = tests.corrupt_guest.as_deref();
    #[cfg(not(feature = "test-hooks"))]
    let corrupt_guest = None;
    let vms = vmm::create_vms(vmx, &machine, corrupt_guest);
    if vms.is_empty() {
        info!("no guests configured");
    } else {
        vmm::run(vmx, &vms);
        vmm::report(&vms);
    }
    info!("all guests stopped; powering off");
    platform::power_off(power::EXIT_OK)
}

/// The machine's CPUs as APIC IDs, the boot CPU's first, then the others
/// in the MADT's order. Without a readable MADT, the boot CPU alone.
fn machine_cpus(rsdp: Option<&[u8]>, bsp: u32) -> Vec<u32> {
    use hypervisor::acpi;
    let mut ids = alloc::vec![bsp];
    let madt = rsdp
        .and_then(|b| acpi::Rsdp::parse(b).ok())
        .and_then(|rsdp| acpi::tables(&phys::Identity, &rsdp).ok())
        .and_then(|tables| tables.into_iter().find(|t| &t.signature == b"APIC"))
        .and_then(|t| acpi::read_table(&phys::Identity, t.address).ok());
    match madt.as_deref().map(acpi::build::madt_cpus) {
        Some(Some(cpus)) => ids.extend(cpus.into_iter().filter(|&id| id != bsp)),
        _ => warn!("no readable MADT: CTVM runs on the boot CPU alone"),
    }
    ids
}

/// SHA-256 over `parts`, in order.
fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// 32 bytes from 64 hexadecimal digits.
/// The digests of the modules guests may trust, from the module whose
/// command line is `ctvm.policy`. A malformed policy trusts nothing: every
/// guest naming a module in `trust=` then refuses to start.
fn trusted_module_policy(modules: &[boot_info::Module]) -> Policy {
    let Some(m) = modules.iter().find(|m| m.cmdline.trim() == config::POLICY_MODULE) else {
        return Policy::default();
    };
    let parsed = core::str::from_utf8(vmm::module_bytes(m))
        .map_err(|_| alloc::string::String::from("not UTF-8"))
        .and_then(|text| Policy::parse(text).map_err(|e| alloc::format!("{e}")));
    match parsed {
        Ok(p) => {
            info!("ctvm.policy: {} trusted module digest(s)", p.entries.len());
            p
        }
        Err(e) => {
            error!("ctvm.policy: {e}; no module is trusted");
            Policy::default()
        }
    }
}

/// What isolated modules may call, from the module whose command line is
/// `ctvm.api`. Without one, or with a malformed one, there is none: every
/// guest asking for integrity then refuses to start.
fn kernel_api_policy(modules: &[boot_info::Module]) -> Option<alloc::sync::Arc<ApiPolicy>> {
    let m = modules.iter().find(|m| m.cmdline.trim() == config::API_MODULE)?;
    let parsed = core::str::from_utf8(vmm::module_bytes(m))
        .map_err(|_| alloc::string::String::from("not UTF-8"))
        .and_then(|text| ApiPolicy::parse(text).map_err(|e| alloc::format!("{e}")));
    match parsed {
        Ok(p) => {
            let (allowed, denied) = p.counts();
            info!(
                "ctvm.api: kernel {}: {allowed} exports allowed to isolated modules, {denied} in {} dangerous groups",
                p.kernel,
                p.groups.len()
            );
            Some(alloc::sync::Arc::new(p))
        }
        Err(e) => {
            error!("ctvm.api: {e}; guests asking for integrity will not start");
            None
        }
    }
}

/// The hypervisor runs with interrupts off and gives emulated-device guests
/// none: the legacy PIC is masked so no stray IRQ reaches a guest exit.
fn mask_legacy_pic() {
    // SAFETY: writing the interrupt masks of both 8259s only masks interrupts.
    unsafe {
        cpu::outb(0x21, 0xff);
        cpu::outb(0xa1, 0xff);
    }
}

/// Physical memory below 4 GiB (the boot page tables' identity mapping),
/// for reading multiboot 1 structures at the addresses the loader gave.
fn low_memory() -> Memory<'static> {
    const BASE: u64 = 0x1000;
    // SAFETY: the boot page tables map the first 4 GiB one to one, and
    // only the bytes the loader's structures name are ever read.
    let bytes = unsafe { core::slice::from_raw_parts(BASE as *const u8, ((4u64 << 30) - BASE) as usize) };
    Memory { base: BASE, bytes }
}

fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    error!("{args}; halting");
    power::stop_machine(power::EXIT_HYPERVISOR_FAULT)
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo<'_>) -> ! {
    console::force_unlock();
    serial::force_unlock();
    console::write_line(format_args!("ctvm: FATAL: hypervisor panic: {panic}"));
    let rbp: u64;
    // SAFETY: reads the frame pointer register only.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp) };
    traps::print_backtrace(rbp);
    power::stop_machine(power::EXIT_HYPERVISOR_FAULT)
}
