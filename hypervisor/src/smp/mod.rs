//! Every CPU under the hypervisor: the generic, host-tested side.
//!
//! - [`cpuset`]: sets of CPUs and the `cpus=` syntax.
//! - [`exclusive`]: one vCPU running its guest alone, while it is out of
//!   the kernel's integrity view or has a page opened.
//! - [`park`]: every other CPU out of VMX before the machine is handed
//!   back (power-off, tboot's shutdown).
//! - [`signal`]: the cross-CPU signal (NMI) and the publish/catch-up
//!   protocol behind shootdowns: a change made in shared memory reaches
//!   every CPU before that CPU runs guest code again.
//! - [`startup`]: the guest's INIT, start-up and NMI IPIs as events in the
//!   target vCPU's mailbox, and the SDM's start-up state machine.
//!
//! Only the sending of NMIs and start-up IPIs, INVEPT, the VMCS writes,
//! VMXOFF and the halting are arch code (`arch::x86_64`, `vmm`).

pub mod cpuset;
pub mod exclusive;
pub mod park;
pub mod signal;
pub mod startup;

use crate::mm::frames::Region;

pub use cpuset::{CpuSet, MAX_CPUS};
pub use exclusive::Exclusive;
pub use park::{Park, Parked};
pub use signal::{Round, Signals};
pub use startup::{Activity, Mailbox, VcpuEvent};

/// The machine's CPUs' signals (the hypervisor's NMIs and the epoch they
/// catch up with).
pub static SIGNALS: Signals = Signals::new();

/// The request that takes the other CPUs out of VMX at power-off.
pub static PARK: Park = Park::new();

/// The page for the APs' real-mode trampoline: the lowest 4 KiB page below
/// 1 MiB, past the real-mode interrupt table's, that `ram` holds whole and
/// that touches nothing in `avoid`. The hypervisor keeps it: guests never
/// map it.
pub fn trampoline_page(ram: &[Region], avoid: &[Region]) -> Option<u64> {
    (1..0x100u64).map(|p| p << 12).find(|&page| {
        let r = Region::new(page, page + 0x1000);
        ram.iter().any(|m| m.start <= r.start && r.end <= m.end)
            && !avoid.iter().any(|a| a.start < r.end && r.start < a.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trampoline_page_is_low_free_ram() {
        let ram = [Region::new(0, 0x9f000), Region::new(0x10_0000, 0x1000_0000)];
        assert_eq!(trampoline_page(&ram, &[]), Some(0x1000));
        let avoid = [Region::new(0x1000, 0x1001), Region::new(0x2000, 0x8000)];
        assert_eq!(trampoline_page(&ram, &avoid), Some(0x8000));
        // Nothing but high RAM, or low RAM all taken: none.
        assert_eq!(trampoline_page(&ram[1..], &[]), None);
        assert_eq!(trampoline_page(&ram, &[Region::new(0, 0x10_0000)]), None);
        // A partial page of RAM does not do.
        assert_eq!(trampoline_page(&[Region::new(0x1800, 0x2fff)], &[]), None);
    }
}
