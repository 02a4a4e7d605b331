//! The virtual machine monitor proper: guests created from boot modules,
//! scheduled round-robin on this CPU, each exit dispatched to the generic
//! handlers, and a report when every guest has stopped.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::{error, info, warn};

use crate::acpi;
use crate::arch::x86_64::cpu::{self, HostCpu};
use crate::arch::x86_64::vmx::bitmaps::{IoBitmap, MsrAccess, MsrBitmap};
use crate::arch::x86_64::vmx::enable::Vmx;
use crate::arch::x86_64::vmx::vcpu::{Bitmaps, Ept, Vcpu, VcpuSetup};
use crate::boot_info::Module;
use crate::console;
use crate::exits::{self, Action, ExitContext, StopReason};
use crate::guest::config::{self, GuestConfig, GuestKind};
use crate::guest::linux::{self, boot_data, e820, BzImage, E820Entry, LoadPlan};
use crate::guest::memory::GuestMemory;
use crate::guest::{loader, CrLimits, Guest, Platform, RunState};
use crate::mm::frames::{Region, PAGE_SIZE};
use crate::mm::paging::{Attrs, MemType, Perms};
use crate::mm::phys::{self, Identity};

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
}

/// A guest with its virtual CPU and memory.
pub struct Vm {
    pub guest: Guest,
    vcpu: Option<Vcpu>,
    ept: Option<Ept>,
    bitmaps: Option<Bitmaps>,
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

fn module_bytes(module: &Module) -> &'static [u8] {
    // SAFETY: GRUB loaded the module there, the frame allocator never hands
    // out module ranges, and no guest's EPT maps a module it does not own.
    unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) }
}

impl Vm {
    fn empty(guest: Guest) -> Vm {
        Vm { guest, vcpu: None, ept: None, bitmaps: None, ram: None }
    }

    /// A native guest: RAM from the frame pool, emulated devices only.
    fn create_native(vmx: &Vmx, config: GuestConfig, image: &[u8], timeslice: Option<u32>) -> Result<Vm, String> {
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
        let platform = Platform::PassThrough { pm1a_control };
        let mut vm = Vm::empty(Guest::new(config, platform, memory, cr_limits(vmx)));

        let ept = pass_through_ept(vmx, &map, machine.hypervisor_ranges)?;
        let plan = LoadPlan {
            image: &image,
            load_address,
            e820: &map,
            cmdline: &vm.guest.config.args,
            initrd: initrd_range,
            rsdp: None,
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

        let mut io = IoBitmap::pass_all();
        io.trap(exits::io_guarded_ports(pm1a_control));
        let mut msr = MsrBitmap::pass_all();
        for (index, read, write) in exits::msr_pass_through_traps() {
            if read {
                msr.trap(index, MsrAccess::Read);
            }
            if write {
                msr.trap(index, MsrAccess::Write);
            }
        }
        let bitmaps = Bitmaps::new(&io, &msr).ok_or("no memory for bitmaps")?;
        let setup = VcpuSetup { entry: &entry, bitmaps: &bitmaps, timeslice, pass_through: true };
        vm.vcpu = Some(Vcpu::new(vmx, &ept, &setup)?);
        vm.ept = Some(ept);
        vm.bitmaps = Some(bitmaps);
        Ok(vm)
    }

    /// Returns the guest's memory and tables to the pool.
    fn tear_down(&mut self) {
        self.vcpu = None;
        self.bitmaps = None;
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
fn pass_through_ept(vmx: &Vmx, map: &[E820Entry], hypervisor: &[Region]) -> Result<Ept, String> {
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
    Ok(ept)
}

/// Creates a VM per guest module. A module that fails to load is reported
/// and skipped; the others still run. `corrupt` names a guest whose initial
/// state is broken on purpose (a test knob).
pub fn create_vms(vmx: &Vmx, machine: &Machine<'_>, corrupt: Option<&str>) -> Vec<Vm> {
    let modules = machine.modules;
    let guest_modules: Vec<&Module> = modules.iter().filter(|m| config::is_guest_module(&m.cmdline)).collect();
    let initrds: Vec<&Module> = modules.iter().filter(|m| config::initrd_owner(&m.cmdline).is_some()).collect();
    let ignored = modules.len() - guest_modules.len() - initrds.len();
    if ignored > 0 {
        warn!("{ignored} boot module(s) without guest=NAME or initrd=NAME are ignored");
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
            GuestKind::Native => Vm::create_native(vmx, config, module_bytes(module), timeslice),
            GuestKind::Linux if vms.iter().any(|vm| vm.guest.platform.is_pass_through()) => {
                Err(String::from("only one guest can own the machine's devices"))
            }
            GuestKind::Linux => {
                let initrd = initrds.iter().copied().find(|m| config::initrd_owner(&m.cmdline) == Some(&name));
                Vm::create_linux(vmx, config, module, initrd, machine, timeslice)
            }
        };
        match created {
            Ok(mut vm) => {
                info!("guest {name}: loaded");
                if corrupt == Some(name.as_str()) {
                    warn!("guest {name}: corrupting its initial CR4 (debug.corrupt-guest)");
                    if let Some(vcpu) = vm.vcpu.as_mut() {
                        vcpu.debug_corrupt_guest_cr4();
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
    let host = HostCpu;
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
            if exit.reason == u16::MAX {
                // VMLAUNCH/VMRESUME itself failed (bad control or host state).
                break Action::Stop(StopReason::LaunchFailed(failure.unwrap_or_default()));
            }
            let mut ctx = ExitContext { guest: &mut vm.guest, vcpu, exit: &exit, host: &host };
            let action = exits::dispatch(&mut ctx);
            let action = match (action, failure) {
                (Action::Stop(StopReason::EntryFailed { reason, qualification, .. }), Some(detail)) => {
                    Action::Stop(StopReason::EntryFailed { reason, qualification, detail })
                }
                (a, _) => a,
            };
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
            info!("    {reason:>3} {name:<28} {count:>10}");
        }
        info!("  total {} {}", vm.guest.name(), vm.guest.exits.total());
    }
    let (free, total) = phys::usage();
    info!("free RAM {} of {} MiB", free >> 20, total >> 20);
}
