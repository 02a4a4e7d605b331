//! The hypervisor's console: COM1, polled.

use spin::Mutex;
use uart_16550::{Config, Uart16550};

type Port = Uart16550<uart_16550::backend::PioBackend>;

static COM1: Mutex<Option<Port>> = Mutex::new(None);

/// Programs COM1 (115200 8N1). Without a UART the console stays silent.
pub fn init() {
    // SAFETY: COM1 at 0x3F8 belongs to the hypervisor; guests reach it only
    // through the emulated vUART.
    let Ok(mut port) = (unsafe { Uart16550::new_port(0x3f8) }) else {
        return;
    };
    if port.init(Config::default()).is_ok() {
        *COM1.lock() = Some(port);
    }
}

const LCR: u16 = 0x3fb;
const LCR_DLAB: u8 = 0x80;

/// Writes raw bytes, turning `\n` into `\r\n` for terminals.
///
/// A pass-through guest may own COM1 too; the hypervisor writes only while
/// that guest is stopped in an exit, and steps around its divisor latch.
pub fn write_bytes(bytes: &[u8]) {
    let mut guard = COM1.lock();
    let Some(port) = guard.as_mut() else { return };
    // SAFETY: reading and restoring COM1's line control register; the guest
    // is not running while the hypervisor prints.
    let lcr = unsafe { super::cpu::inb(LCR) };
    if lcr & LCR_DLAB != 0 {
        // SAFETY: as above.
        unsafe { super::cpu::outb(LCR, lcr & !LCR_DLAB) };
    }
    for chunk in bytes.split_inclusive(|&b| b == b'\n') {
        match chunk.split_last() {
            Some((b'\n', body)) => {
                port.send_bytes_exact(body);
                port.send_bytes_exact(b"\r\n");
            }
            _ => port.send_bytes_exact(chunk),
        }
    }
    if lcr & LCR_DLAB != 0 {
        // SAFETY: as above.
        unsafe { super::cpu::outb(LCR, lcr) };
    }
}

/// For the fault handler: the lock may be held by the code that faulted.
pub fn force_unlock() {
    if COM1.is_locked() {
        // SAFETY: only called on the way to stopping the machine, on the only
        // CPU that runs hypervisor code.
        unsafe { COM1.force_unlock() };
    }
}

/// Waits until every byte written has left the transmitter, so nothing is
/// lost when the machine powers off right after.
pub fn drain() {
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        if unsafe { super::cpu::inb(0x3fd) } & 0x40 != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}
