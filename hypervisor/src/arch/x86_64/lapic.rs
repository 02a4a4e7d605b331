//! The hypervisor's own use of the local APIC: this CPU's APIC ID, and the
//! IPIs it sends (INIT and start-up IPIs to bring CPUs up, NMIs to signal
//! them, start-up IPIs as doorbells for vCPUs waiting for one). The APIC
//! may be in xAPIC or x2APIC mode (a pass-through guest owns it and may
//! switch it), so each send looks which.

use core::sync::atomic::{AtomicU64, Ordering};

use super::cpu;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_ID: u32 = 0x802;
const X2APIC_ICR: u32 = 0x830;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const DELIVERY_PENDING: u32 = 1 << 12;
const IRR: u64 = 0x200;
const PPR: u64 = 0xa0;
const X2APIC_IRR: u32 = 0x820;
const X2APIC_PPR: u32 = 0x80a;

const NMI: u32 = 4 << 8;
const INIT_ASSERT: u32 = (5 << 8) | (1 << 14) | (1 << 15);
const STARTUP: u32 = 6 << 8;
const ALL_EXCLUDING_SELF: u32 = 3 << 18;

/// IPIs this CPU's hypervisor sent, for the report.
pub static SENT: AtomicU64 = AtomicU64::new(0);

fn apic_base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 processor.
    unsafe { cpu::rdmsr(IA32_APIC_BASE) }
}

fn x2apic() -> bool {
    apic_base() & APIC_BASE_X2APIC != 0
}

fn mmio(offset: u64) -> *mut u32 {
    ((apic_base() & 0x000f_ffff_ffff_f000) + offset) as *mut u32
}

fn read(offset: u64) -> u32 {
    // SAFETY: a register of this CPU's xAPIC page, which the boot page
    // tables map (the first 4 GiB) and the MTRRs keep uncached.
    unsafe { core::ptr::read_volatile(mmio(offset)) }
}

fn write(offset: u64, value: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(mmio(offset), value) }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    if x2apic() {
        // SAFETY: the x2APIC ID MSR exists in x2APIC mode.
        unsafe { cpu::rdmsr(X2APIC_ID) as u32 }
    } else {
        read(0x20) >> 24
    }
}

/// This CPU's interrupt request register (eight words, vector 0 first) and
/// processor priority, as the guest that owns the APIC left them: what it
/// would be delivered at its next VM entry (see `exits::apic::deliverable`).
pub fn requests() -> ([u32; 8], u32) {
    if x2apic() {
        // SAFETY: the IRR and PPR MSRs exist in x2APIC mode; reads change nothing.
        let read = |msr: u32| unsafe { cpu::rdmsr(msr) as u32 };
        (core::array::from_fn(|i| read(X2APIC_IRR + i as u32)), read(X2APIC_PPR))
    } else {
        (core::array::from_fn(|i| read(IRR + 0x10 * i as u64)), read(PPR))
    }
}

/// Sends an IPI in physical destination mode. In xAPIC mode, ICR_HIGH
/// holds what a guest on this CPU wrote last (it may write ICR_LOW next):
/// it is put back.
fn send(destination: u32, low: u32) {
    SENT.fetch_add(1, Ordering::Relaxed);
    if x2apic() {
        // SAFETY: the ICR MSR exists in x2APIC mode; the IPI is one of the
        // hypervisor's own (see the callers).
        unsafe { cpu::wrmsr(X2APIC_ICR, (u64::from(destination) << 32) | u64::from(low)) };
        return;
    }
    while read(ICR_LOW) & DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
    let saved = read(ICR_HIGH);
    write(ICR_HIGH, destination << 24);
    write(ICR_LOW, low);
    while read(ICR_LOW) & DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
    write(ICR_HIGH, saved);
}

/// An NMI: the hypervisor's cross-CPU signal.
pub fn send_nmi(apic_id: u32) {
    send(apic_id, NMI);
}

/// An NMI to every other CPU (stopping the machine).
pub fn send_nmi_to_others() {
    send(0, NMI | ALL_EXCLUDING_SELF);
}

/// INIT: puts a CPU into the wait-for-SIPI state. Only for CPUs not yet
/// under the hypervisor (bringing them up); in VMX operation INIT is
/// blocked or exits.
pub fn send_init(apic_id: u32) {
    send(apic_id, INIT_ASSERT);
}

/// A start-up IPI: starts a CPU in wait-for-SIPI at `vector * 0x1000`, or
/// (a vCPU in the guest's wait-for-SIPI state) makes it exit.
pub fn send_startup(apic_id: u32, vector: u8) {
    send(apic_id, STARTUP | u32::from(vector));
}
