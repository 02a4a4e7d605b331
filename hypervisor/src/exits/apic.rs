//! The local APIC of a pass-through guest: its interrupt command register
//! is the one way to start a CPU (INIT, then start-up IPIs), so both of its
//! forms are watched. In xAPIC mode the APIC's page is mapped read-only and
//! every write is emulated, checked and passed on; in x2APIC mode the ICR
//! MSR's writes exit. Until every CPU runs under the hypervisor, no guest
//! may start one: such an IPI is refused and reported, and the guest runs
//! on (the IPI is simply never delivered). Everything else the guest writes
//! reaches its APIC unchanged.

use super::{integrity, ExitContext};
use crate::integrity::ViolationKind;
use crate::mmio::MmioDevice;

/// The xAPIC register offsets of the interrupt command register.
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;

const DELIVERY_INIT: u64 = 0b101;
const DELIVERY_STARTUP: u64 = 0b110;

/// Whether an ICR value (the 64-bit x2APIC form: destination in the high
/// half) sends an INIT or a start-up IPI, which start CPUs.
pub const fn starts_cpu(icr: u64) -> bool {
    matches!((icr >> 8) & 7, DELIVERY_INIT | DELIVERY_STARTUP)
}

/// A write to the ICR (x2APIC form); true if it was refused (and
/// reported), false if it may go to the APIC.
pub fn icr_write(ctx: &mut ExitContext<'_>, icr: u64) -> bool {
    if !starts_cpu(icr) {
        return false;
    }
    integrity::refusal(ctx, ViolationKind::StartCpu, icr);
    true
}

/// The physical APIC behind the guest's writes.
pub trait ApicRegisters {
    fn read(&mut self, offset: u64) -> u32;
    fn write(&mut self, offset: u64, value: u32);
}

/// The xAPIC page as the emulator sees it: reads and writes go to the
/// real APIC (32-bit registers, 16-byte aligned), except an ICR write that
/// would start a CPU, which is kept back and handed to the caller.
pub struct XapicWindow<'a> {
    pub apic: &'a mut dyn ApicRegisters,
    /// The ICR value (x2APIC form) of a refused write.
    pub refused: Option<u64>,
}

impl MmioDevice for XapicWindow<'_> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        // The APIC's registers are 32 bits wide; other widths read as the
        // register they start in (the processor's behaviour is undefined).
        let _ = size;
        u64::from(self.apic.read(offset & !0xf))
    }

    fn write(&mut self, offset: u64, size: u8, value: u64) {
        let _ = size;
        let register = offset & !0xf;
        if register == ICR_LOW {
            let icr = (u64::from(self.apic.read(ICR_HIGH)) << 32) | (value & 0xffff_ffff);
            if starts_cpu(icr) {
                self.refused = Some(icr);
                return;
            }
        }
        self.apic.write(register, value as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[derive(Default)]
    struct Apic {
        writes: Vec<(u64, u32)>,
        icr_high: u32,
    }

    impl ApicRegisters for Apic {
        fn read(&mut self, offset: u64) -> u32 {
            if offset == ICR_HIGH {
                self.icr_high
            } else {
                0x1234
            }
        }
        fn write(&mut self, offset: u64, value: u32) {
            if offset == ICR_HIGH {
                self.icr_high = value;
            }
            self.writes.push((offset, value));
        }
    }

    #[test]
    fn init_and_startup_ipis_are_kept_back_everything_else_passes() {
        let mut apic = Apic::default();
        let mut w = XapicWindow { apic: &mut apic, refused: None };
        // Destination APIC 1, then INIT (level assert), then SIPI vector 0x9a.
        w.write(ICR_HIGH, 4, 1 << 24);
        w.write(ICR_LOW, 4, 0x4500);
        assert_eq!(w.refused, Some((1u64 << 56) | 0x4500));
        w.refused = None;
        w.write(ICR_LOW, 4, 0x069a);
        assert!(w.refused.is_some());
        // A fixed IPI, an NMI and an EOI go through.
        w.refused = None;
        w.write(ICR_LOW, 4, 0x00ec);
        w.write(ICR_LOW, 4, 0x0400);
        w.write(0xb0, 4, 0);
        assert_eq!(w.refused, None);
        assert_eq!(apic.writes, [(ICR_HIGH, 1 << 24), (ICR_LOW, 0xec), (ICR_LOW, 0x400), (0xb0, 0)]);
    }

    #[test]
    fn x2apic_icr_values() {
        assert!(starts_cpu(0x0000_0001_0000_4500));
        assert!(starts_cpu(0x0000_0001_0000_0600 | 0x9a));
        assert!(!starts_cpu(0x0000_0001_0000_00ec));
        // All-excluding-self shorthand with INIT: still refused.
        assert!(starts_cpu(0xc_4500));
    }
}
