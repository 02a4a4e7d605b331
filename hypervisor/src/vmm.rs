//! The virtual machine monitor proper: guests created from boot modules,
//! scheduled round-robin on this CPU, each exit dispatched to the generic
//! handlers, and a report when every guest has stopped.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use log::{error, info, warn};

use crate::arch::x86_64::cpu::{self, HostCpu};
use crate::arch::x86_64::vmx::enable::Vmx;
use crate::arch::x86_64::vmx::vcpu::{Ept, TrapAllBitmaps, Vcpu};
use crate::boot_info::Module;
use crate::console;
use crate::exits::{self, Action, ExitContext, StopReason};
use crate::guest::config::{self, GuestConfig};
use crate::guest::loader;
use crate::guest::memory::GuestMemory;
use crate::guest::{CrLimits, Guest, RunState};
use crate::mm::frames::Region;
use crate::mm::paging::{Attrs, MemType, Perms};
use crate::mm::phys::{self, Identity};

/// A guest with its virtual CPU and memory.
pub struct Vm {
    pub guest: Guest,
    vcpu: Option<Vcpu>,
    ept: Option<Ept>,
    ram: Option<Region>,
}

/// The syscall MSRs that live in hardware while a guest runs.
const SHADOWED_MSRS: [u32; 6] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102, 0xc000_0103];

impl Vm {
    fn create(
        vmx: &Vmx,
        bitmaps: &TrapAllBitmaps,
        config: GuestConfig,
        image: &[u8],
        timeslice: Option<u32>,
    ) -> Result<Vm, String> {
        let limits = CrLimits {
            cr0_fixed0: vmx.msrs.cr0_fixed0,
            cr0_fixed1: vmx.msrs.cr0_fixed1,
            cr4_fixed0: vmx.msrs.cr4_fixed0,
            cr4_fixed1: vmx.msrs.cr4_fixed1,
            unrestricted: vmx.controls.features.unrestricted_guest,
        };
        let size = config.mem_bytes;
        let hpa =
            phys::alloc_zeroed(size, 2 << 20).ok_or_else(|| format!("no {} MiB of free RAM for it", size >> 20))?;
        let ram = Region::new(hpa, hpa + size);
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, size), hpa).map_err(|_| "overlapping memory")?;
        let mut vm = Vm { guest: Guest::new(config, memory, limits), vcpu: None, ept: None, ram: Some(ram) };

        let mut ept = Ept::new(vmx).ok_or("no memory for EPT tables")?;
        ept.map(0, hpa, size, Attrs::new(Perms::RWX, MemType::WriteBack))
            .map_err(|e| format!("EPT mapping failed: {e:?}"))?;
        vm.ept = Some(ept);
        let entry = loader::load_native(&vm.guest.memory, &Identity, image, vm.guest.name(), &vm.guest.config.args)
            .map_err(|e| format!("{e}"))?;
        let vcpu = Vcpu::new_native(vmx, vm.ept.as_ref().expect("set above"), bitmaps, &entry, timeslice)?;
        vm.vcpu = Some(vcpu);
        Ok(vm)
    }

    /// Returns the guest's memory and tables to the pool.
    fn tear_down(&mut self) {
        self.vcpu = None;
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

/// Creates a VM per guest module. A module that fails to load is reported
/// and skipped; the others still run.
/// `corrupt` names a guest whose initial state is broken on purpose (a test knob).
pub fn create_vms(vmx: &Vmx, modules: &[Module], bitmaps: &TrapAllBitmaps, corrupt: Option<&str>) -> Vec<Vm> {
    let guest_modules: Vec<&Module> = modules.iter().filter(|m| config::is_guest_module(&m.cmdline)).collect();
    let ignored = modules.len() - guest_modules.len();
    if ignored > 0 {
        warn!("{ignored} boot module(s) without guest=NAME are ignored");
    }
    // Time slicing only matters with more than one guest.
    let timeslice = (guest_modules.len() > 1 && vmx.controls.features.preemption_timer)
        .then_some(TIMESLICE_TICKS >> vmx.msrs.preemption_timer_rate());
    let mut vms = Vec::new();
    for (i, module) in guest_modules.into_iter().enumerate() {
        let config = match config::parse(&module.cmdline) {
            Ok(c) => c,
            Err(e) => {
                error!("boot module {i}: {e}; skipped");
                continue;
            }
        };
        if vms.iter().any(|vm: &Vm| vm.guest.name() == config.name) {
            error!("boot module {i}: a guest named {} exists already; skipped", config.name);
            continue;
        }
        let name = config.name.clone();
        // SAFETY: GRUB loaded the module there, and the frame allocator
        // excludes module ranges, so nothing else writes to it.
        let image =
            unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) };
        match Vm::create(vmx, bitmaps, config, image, timeslice) {
            Ok(mut vm) => {
                info!("guest {name}: loaded, {} MiB of RAM", vm.guest.config.mem_bytes >> 20);
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
            if let Some(prev) = current.filter(|&p| vms[p].vcpu.is_some()) {
                vms[prev].vcpu.as_mut().expect("checked").save_extended_state(vmx);
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
                let detail = failure.unwrap_or_default();
                break Action::Stop(StopReason::LaunchFailed(detail));
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
        match action {
            Action::Stop(reason) => {
                vm.stop(reason);
                current = None;
            }
            Action::Yield | Action::Resume => {}
        }
        next = i + 1;
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
