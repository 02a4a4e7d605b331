//! A CPU's way out of VMX for good, and the power-off CPU's request that
//! takes every other one there (the protocol is `smp::park`).
//!
//! A parked CPU has cleared its current VMCS, left VMX operation and
//! cleared CR4.VMXE, so INIT reaches it again (VMX root operation blocks
//! INIT) and tboot's shutdown finds it quiet. It halts with interrupts
//! masked; an NMI returns it to its HLT (see `traps`), never into VMX code.

use log::{info, warn};

use super::vmx::enable;
use super::{cpu, lapic, percpu, timer};
use crate::smp::{PARK, SIGNALS};

/// How long the CPU that powers off waits for the others.
const PATIENCE_US: u64 = 1_000_000;
/// How often it nudges those that have not answered: an NMI or a start-up
/// IPI that arrives while a CPU is in the hypervisor is gone by the time it
/// enters a guest or halts.
const NUDGE_US: u64 = 1_000;

/// Parks this CPU if the CPU that powers off asks it to. Called where the
/// CPU holds nothing another may need: before it enters a guest, while it
/// waits outside one, and when idle.
pub fn if_asked(cpu: usize) {
    if PARK.asked(cpu) {
        here(cpu)
    }
}

/// This CPU's idle loop once it has no vCPU left: it halts, and parks when
/// asked (the request's NMI wakes it).
pub fn idle(cpu: usize) -> ! {
    loop {
        if_asked(cpu);
        // SAFETY: with interrupts masked HLT waits for an NMI (or INIT,
        // which VMX operation blocks); the NMI handler returns here.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Leaves VMX on this CPU, says so, and halts for good.
fn here(cpu: usize) -> ! {
    SIGNALS.left(cpu);
    // SAFETY: only CPUs that entered VMX are asked (`Park::entered_vmx`
    // comes right after VMXON), and this one runs no guest after this.
    unsafe { enable::off_here() };
    PARK.acknowledge(cpu);
    cpu::halt_forever()
}

/// On the CPU that powers off, while it is still in VMX: asks every other
/// CPU in VMX to park, waits up to a second for them, and names those that
/// did not. Returns at once if another CPU asked already: this one parks.
pub fn others() {
    let this = percpu::try_current().map_or(0, |p| p.index);
    let asked = match PARK.ask(this) {
        Ok(asked) => asked,
        Err(by) => {
            warn!("CPU {this}: CPU {by} powers the machine off already; this one leaves VMX and halts");
            here(this)
        }
    };
    if asked.is_empty() {
        return;
    }
    let nudge = |cpu: usize| {
        if let Some(p) = percpu::of(cpu) {
            // The NMI exits a guest and wakes an idle CPU; the start-up IPI
            // exits a wait for one (where NMIs are blocked), as `Vm::stop`'s.
            lapic::send_nmi(p.apic_id);
            lapic::send_startup(p.apic_id, 0);
        }
    };
    let deadline = timer::deadline_us(PATIENCE_US);
    let mut next = 0;
    let outcome = PARK.wait(&asked, &mut |pending| {
        if timer::passed(next) {
            pending.iter().for_each(nudge);
            next = timer::deadline_us(NUDGE_US);
        }
        core::hint::spin_loop();
        timer::passed(deadline)
    });
    for cpu in outcome.silent.iter() {
        warn!(
            "CPU {cpu} (APIC {}) did not leave VMX within {} ms: it stays in VMX operation, perhaps in a guest",
            percpu::of(cpu).map_or(u32::MAX, |p| p.apic_id),
            PATIENCE_US / 1000
        );
    }
    let n = outcome.left.len();
    let plural = if n == 1 { "" } else { "s" };
    if this == 0 {
        info!("{n} application processor{plural} left VMX");
    } else {
        info!("{n} other CPU{plural} left VMX (CPU {this} powers off)");
    }
}
