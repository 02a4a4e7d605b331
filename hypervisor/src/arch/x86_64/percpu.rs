//! Per-CPU data: each CPU's GS base points at its [`PerCpu`] (also the
//! VMCS's host GS base, so it survives every VM exit), whose first word is
//! its own address.

use core::ops::Range;
use core::sync::atomic::{AtomicPtr, Ordering};

use super::cpu;
use crate::smp::MAX_CPUS;

const IA32_GS_BASE: u32 = 0xc000_0101;

/// What the hypervisor keeps per physical CPU.
#[repr(C)]
pub struct PerCpu {
    /// Its own address, read through `gs:[0]`.
    this: u64,
    /// The hypervisor's CPU index: 0 for the boot CPU, then the MADT's order.
    pub index: usize,
    pub apic_id: u32,
    /// The hypervisor stack the CPU runs on.
    pub stack: Range<u64>,
    /// Its interrupt stacks (double fault, NMI, machine check).
    pub ist: [Range<u64>; 3],
}

impl PerCpu {
    pub fn new(index: usize, apic_id: u32, stack: Range<u64>, ist: [Range<u64>; 3]) -> PerCpu {
        PerCpu { this: 0, index, apic_id, stack, ist }
    }
}

/// Every CPU's data, by index, once it runs under the hypervisor.
static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// A CPU's data (its APIC ID, to signal it), once it is installed.
pub fn of(index: usize) -> Option<&'static PerCpu> {
    let p = CPUS.get(index)?.load(Ordering::Acquire);
    // SAFETY: only installed, leaked PerCpus are published.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Makes `p` this CPU's per-CPU data.
pub fn install(p: &'static mut PerCpu) {
    p.this = p as *const PerCpu as u64;
    if let Some(slot) = CPUS.get(p.index) {
        slot.store(p as *mut PerCpu, Ordering::Release);
    }
    // SAFETY: GS_BASE exists on every x86-64 CPU; the hypervisor uses GS
    // for nothing else, and `p` lives as long as the machine runs.
    unsafe { cpu::wrmsr(IA32_GS_BASE, p.this) };
}

/// This CPU's data. Only called after [`install`] ran on this CPU (the
/// boot CPU installs it before any guest exists, the others first thing).
pub fn current() -> &'static PerCpu {
    let this: u64;
    // SAFETY: GS points at this CPU's PerCpu, whose first word is its address.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) this, options(nostack, readonly, preserves_flags)) };
    // SAFETY: installed PerCpus are leaked, so 'static.
    unsafe { &*(this as *const PerCpu) }
}

/// This CPU's data, if installed yet (for fault and NMI handlers, which may
/// run before).
pub fn try_current() -> Option<&'static PerCpu> {
    // SAFETY: reading GS_BASE has no side effects.
    let base = unsafe { cpu::rdmsr(IA32_GS_BASE) };
    // SAFETY: a non-zero GS base is only ever an installed PerCpu.
    (base != 0).then(|| unsafe { &*(base as *const PerCpu) })
}

/// The GS base to restore after every VM exit.
pub fn gs_base() -> u64 {
    // SAFETY: as above.
    unsafe { cpu::rdmsr(IA32_GS_BASE) }
}
