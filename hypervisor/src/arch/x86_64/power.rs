//! Stopping the machine: how CTVM ends a run under an emulator or on hardware.

use core::sync::atomic::{AtomicU8, Ordering};

use super::cpu;

/// How to power off, chosen on the command line (`exit=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitMethod {
    /// Halt the CPU (real hardware: the operator sees the last lines).
    Halt = 0,
    /// Bochs: the string "Shutdown" on port 0x8900.
    Bochs = 1,
    /// QEMU `-device isa-debug-exit,iobase=0xf4`: QEMU exits with (code << 1) | 1.
    QemuDebugExit = 2,
}

impl ExitMethod {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "halt" => Self::Halt,
            "bochs" => Self::Bochs,
            "qemu" => Self::QemuDebugExit,
            _ => return None,
        })
    }
}

/// Exit code when every guest stopped and the hypervisor is done.
pub const EXIT_OK: u8 = 0;
/// Exit code when the processor has no VT-x (an emulator without VMX): the
/// platform pieces ran, and the run ends cleanly without guests.
pub const EXIT_NO_VMX: u8 = 0x10;
/// Exit code after a fault or panic inside the hypervisor.
pub const EXIT_HYPERVISOR_FAULT: u8 = 0x7f;

static METHOD: AtomicU8 = AtomicU8::new(ExitMethod::Halt as u8);

pub fn set_method(method: ExitMethod) {
    METHOD.store(method as u8, Ordering::Relaxed);
}

/// Powers the machine off (emulators) or halts it (hardware).
pub fn stop_machine(code: u8) -> ! {
    super::serial::drain();
    match METHOD.load(Ordering::Relaxed) {
        m if m == ExitMethod::Bochs as u8 => {
            for &b in b"Shutdown" {
                // SAFETY: Bochs' shutdown port; selected explicitly on the command line.
                unsafe { cpu::outb(0x8900, b) };
            }
        }
        m if m == ExitMethod::QemuDebugExit as u8 => {
            // SAFETY: QEMU's isa-debug-exit device; selected explicitly on the command line.
            unsafe { cpu::outl(0xf4, u32::from(code)) };
        }
        _ => {}
    }
    cpu::halt_forever()
}
