//! Time for the hypervisor's own waits (bringing CPUs up, doorbells): the
//! PIT's channel 2, polled, and the TSC calibrated against it once at boot.
//! The PIT is only used before guests run; later waits count TSC ticks.

use core::sync::atomic::{AtomicU64, Ordering};

use super::cpu;

const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL2: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
const PORT_B: u16 = 0x61;
const GATE2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT2: u8 = 1 << 5;

/// TSC ticks per millisecond (0: not calibrated).
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Busy-waits at least `us` microseconds on the PIT (channel 2, one-shot).
/// Before any guest owns the PIT only.
pub fn pit_wait_us(mut us: u64) {
    while us > 0 {
        let chunk = us.min(50_000);
        us -= chunk;
        let count = (chunk * PIT_HZ).div_ceil(1_000_000).clamp(1, 0xffff) as u16;
        // SAFETY: the PIT and port B belong to the hypervisor until a guest
        // runs; the speaker stays off and port B is restored.
        unsafe {
            let b = cpu::inb(PORT_B);
            cpu::outb(PORT_B, b & !(SPEAKER | GATE2));
            // Channel 2, low then high byte, mode 0 (out goes high at terminal count).
            cpu::outb(PIT_COMMAND, 0b1011_0000);
            cpu::outb(PIT_CHANNEL2, count as u8);
            cpu::outb(PIT_CHANNEL2, (count >> 8) as u8);
            cpu::outb(PORT_B, (b & !SPEAKER) | GATE2);
            while cpu::inb(PORT_B) & OUT2 == 0 {
                core::hint::spin_loop();
            }
            cpu::outb(PORT_B, b);
        }
    }
}

/// Measures the TSC against 10 ms of the PIT.
pub fn calibrate() -> u64 {
    let start = cpu::rdtsc();
    pit_wait_us(10_000);
    let per_ms = (cpu::rdtsc().wrapping_sub(start) / 10).max(1);
    TSC_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// TSC ticks per millisecond (a guess of 1 GHz before calibration).
pub fn tsc_per_ms() -> u64 {
    match TSC_PER_MS.load(Ordering::Relaxed) {
        0 => 1_000_000,
        t => t,
    }
}

/// A deadline `us` microseconds from now, in TSC ticks.
pub fn deadline_us(us: u64) -> u64 {
    cpu::rdtsc().wrapping_add(us.saturating_mul(tsc_per_ms()) / 1000)
}

pub fn passed(deadline: u64) -> bool {
    cpu::rdtsc().wrapping_sub(deadline) < (1 << 63)
}
