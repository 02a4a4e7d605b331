//! The local APIC of a pass-through guest. Its interrupt command register
//! (ICR) sends IPIs, and INIT and start-up IPIs start CPUs, so both of its
//! forms are watched: in xAPIC mode the APIC's page is mapped read-only
//! and every write is emulated, checked and passed on; in x2APIC mode the
//! ICR MSR's writes exit.
//!
//! Every IPI is routed to the guest's own vCPUs:
//! - INIT and start-up IPIs are never sent for real (a real INIT takes a
//!   CPU out of VMX): they become events in the target vCPUs' mailboxes
//!   (`smp::startup`), which the hypervisor applies as the SDM describes.
//!   One that would reach a CPU the guest was not given is refused whole,
//!   and reported (`kind=start-cpu`).
//! - NMIs travel the same way, so that the hypervisor's own NMIs and the
//!   guest's are never confused (`smp::signal`).
//! - Fixed and lowest-priority IPIs go out as written when the guest owns
//!   every CPU of the machine; otherwise they are sent one by one, in
//!   physical mode, to the vCPUs they address, and what they address
//!   beyond those is refused and reported (`kind=foreign-ipi`).
//! - SMIs and the reserved delivery modes are refused.
//!
//! The APIC ID register is the hypervisor's address for the CPU, so its
//! writes are dropped; everything else the guest writes reaches its APIC
//! unchanged.

use alloc::vec::Vec;

use super::{integrity, ExitContext};
use crate::integrity::ViolationKind;
use crate::mmio::MmioDevice;
use crate::smp::VcpuEvent;

/// xAPIC register offsets.
pub const APIC_ID: u64 = 0x20;
pub const LDR: u64 = 0xd0;
pub const DFR: u64 = 0xe0;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;

/// Delivery modes (ICR bits 10:8).
mod delivery {
    pub const FIXED: u8 = 0;
    pub const LOWEST: u8 = 1;
    pub const NMI: u8 = 4;
    pub const INIT: u8 = 5;
    pub const STARTUP: u8 = 6;
}

const LOGICAL: u64 = 1 << 11;
const LEVEL_ASSERT: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
/// The bits of an ICR's low word a unicast copy keeps: vector, delivery
/// mode, level and trigger mode.
const UNICAST_KEEP: u64 = 0xff | (7 << 8) | LEVEL_ASSERT | TRIGGER_LEVEL;

/// A vCPU's logical destination in xAPIC mode, as its guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Logical {
    pub ldr: u32,
    pub dfr: u32,
}

impl Default for Logical {
    fn default() -> Self {
        // The values after reset: no logical ID, flat model.
        Logical { ldr: 0, dfr: 0xffff_ffff }
    }
}

/// The guest's CPUs as its APICs address them.
#[derive(Clone, Debug)]
pub struct GuestCpus {
    /// Each vCPU's APIC ID, by vCPU index (the physical CPU's: the guest
    /// owns that CPU's APIC).
    pub apic_ids: Vec<u32>,
    /// The guest owns every CPU of the machine, so whatever its IPIs
    /// reach is its own.
    pub whole_machine: bool,
    /// The vCPU whose exit is being handled.
    pub current: usize,
    /// Each vCPU's xAPIC logical destination.
    pub logical: Vec<Logical>,
    /// Events for vCPUs, posted to their mailboxes once the exit is handled.
    pub outbox: Vec<(usize, VcpuEvent)>,
}

impl GuestCpus {
    pub fn new(apic_ids: Vec<u32>, whole_machine: bool) -> Self {
        let logical = alloc::vec![Logical::default(); apic_ids.len()];
        GuestCpus { apic_ids, whole_machine, current: 0, logical, outbox: Vec::new() }
    }
}

/// An IPI as the ICR describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub delivery: u8,
    pub logical: bool,
    /// Level de-assert (level 0 with level trigger): only INIT uses it, and
    /// processors since the Pentium 4 ignore it.
    pub deassert: bool,
    pub shorthand: u8,
    pub destination: u32,
    pub x2apic: bool,
}

impl Ipi {
    /// Decodes a write: `low` is the ICR's low word; `destination` its
    /// high word (xAPIC: bits 31:24 of ICR_HIGH; x2APIC: all 32 bits).
    pub fn decode(low: u32, high: u32, x2apic: bool) -> Ipi {
        let low = u64::from(low);
        Ipi {
            vector: low as u8,
            delivery: ((low >> 8) & 7) as u8,
            logical: low & LOGICAL != 0,
            deassert: low & TRIGGER_LEVEL != 0 && low & LEVEL_ASSERT == 0,
            shorthand: ((low >> 18) & 3) as u8,
            destination: if x2apic { high } else { high >> 24 },
            x2apic,
        }
    }

    fn broadcast(&self) -> bool {
        self.destination == if self.x2apic { u32::MAX } else { 0xff }
    }

    /// Whether a CPU with this APIC ID (and, in xAPIC mode, this logical
    /// destination) is addressed by the destination field.
    fn addresses(&self, apic_id: u32, logical: Logical) -> bool {
        if self.broadcast() {
            return true;
        }
        match (self.logical, self.x2apic) {
            (false, true) => self.destination == apic_id,
            (false, false) => self.destination == apic_id & 0xff,
            // x2APIC logical: cluster in 31:16, one bit per CPU in 15:0,
            // both fixed by the x2APIC ID.
            (true, true) => self.destination >> 16 == apic_id >> 4 && self.destination & (1 << (apic_id & 0xf)) != 0,
            (true, false) => {
                let (id, dest) = (logical.ldr >> 24, self.destination);
                if logical.dfr >> 28 == 0xf {
                    dest & id != 0
                } else {
                    dest >> 4 == id >> 4 && dest & id & 0xf != 0
                }
            }
        }
    }
}

/// What becomes of an IPI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Out as written: every CPU it can reach is the guest's.
    AsWritten,
    /// One physical IPI to each of these vCPUs.
    Unicast(Vec<usize>),
    /// Events for these vCPUs' mailboxes.
    Post(Vec<(usize, VcpuEvent)>),
    /// Nothing to send.
    Drop,
}

/// The route, and what was refused of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    pub refused: Option<ViolationKind>,
}

/// Routes an IPI among the guest's vCPUs (see the module's description).
pub fn route(cpus: &GuestCpus, ipi: &Ipi) -> Decision {
    let all = 0..cpus.apic_ids.len();
    let logical = |i: usize| cpus.logical.get(i).copied().unwrap_or_default();
    // The vCPUs addressed, and whether CPUs beyond the guest's are too.
    let (targets, foreign): (Vec<usize>, bool) = match ipi.shorthand {
        1 => (alloc::vec![cpus.current], false),
        2 => (all.collect(), !cpus.whole_machine),
        3 => (all.filter(|&i| i != cpus.current).collect(), !cpus.whole_machine),
        _ => {
            let t: Vec<usize> = all.filter(|&i| ipi.addresses(cpus.apic_ids[i], logical(i))).collect();
            // A physical unicast to an APIC ID the guest does not own, or a
            // broadcast, reaches beyond it (a logical destination only
            // reaches CPUs whose guests gave them that logical ID).
            let foreign = !cpus.whole_machine && !ipi.logical && (ipi.broadcast() || t.is_empty());
            (t, foreign)
        }
    };
    let refuse = |kind| Decision { route: Route::Drop, refused: Some(kind) };
    let post = |event: VcpuEvent| Route::Post(targets.iter().map(|&t| (t, event)).collect());
    let partial = foreign.then_some(ViolationKind::ForeignIpi);
    match ipi.delivery {
        delivery::FIXED | delivery::LOWEST if cpus.whole_machine => Decision { route: Route::AsWritten, refused: None },
        delivery::FIXED | delivery::LOWEST => {
            // Lowest priority picks one of the addressed CPUs.
            let t = if ipi.delivery == delivery::LOWEST { targets.into_iter().take(1).collect() } else { targets };
            Decision { route: Route::Unicast(t), refused: partial }
        }
        delivery::NMI => Decision { route: post(VcpuEvent::Nmi), refused: partial },
        delivery::INIT if ipi.deassert => Decision { route: Route::Drop, refused: None },
        delivery::INIT | delivery::STARTUP if foreign => refuse(ViolationKind::StartCpu),
        delivery::INIT => Decision { route: post(VcpuEvent::Init), refused: None },
        delivery::STARTUP => Decision { route: post(VcpuEvent::Startup(ipi.vector)), refused: None },
        // SMI, remote read, ExtINT and the reserved mode.
        _ => refuse(ViolationKind::ForeignIpi),
    }
}

/// The ICR of one vCPU's APIC: where its writes go.
pub trait IcrSink {
    /// Writes the ICR: `low` and the destination `high` word (xAPIC: the
    /// ICR_HIGH register's value).
    fn send(&mut self, low: u32, high: u32);
}

/// Carries a decision out: sends what goes out, queues what is posted,
/// and returns what was refused.
pub fn deliver(cpus: &mut GuestCpus, ipi: &Ipi, low: u32, high: u32, sink: &mut dyn IcrSink) -> Option<ViolationKind> {
    let decision = route(cpus, ipi);
    match decision.route {
        Route::AsWritten => sink.send(low, high),
        Route::Unicast(targets) => {
            // Physical mode, no shorthand, to each APIC ID in turn.
            let low = (u64::from(low) & UNICAST_KEEP) as u32;
            for t in targets {
                let id = cpus.apic_ids[t];
                sink.send(low, if ipi.x2apic { id } else { id << 24 });
            }
        }
        Route::Post(events) => cpus.outbox.extend(events),
        Route::Drop => {}
    }
    decision.refused
}

/// The vector a local APIC delivers next, from its interrupt request
/// register (eight 32-bit words, vector 0 first) and its processor
/// priority: the highest requested vector whose priority class is above
/// the processor's (SDM Vol. 3A, 11.8.3.1). `None`: nothing to deliver.
pub fn deliverable(irr: &[u32; 8], ppr: u32) -> Option<u8> {
    let (word, bits) = irr.iter().enumerate().rev().find(|(_, &w)| w != 0)?;
    let vector = (word * 32 + 31 - bits.leading_zeros() as usize) as u8;
    (vector >> 4 > (ppr as u8) >> 4).then_some(vector)
}

/// A write to the ICR in x2APIC form (the ICR MSR): routed, sent through
/// the MSR; what was refused is reported.
pub fn x2apic_icr_write(ctx: &mut ExitContext<'_>, value: u64) {
    struct Msr<'a>(&'a dyn super::HostCpu);
    impl IcrSink for Msr<'_> {
        fn send(&mut self, low: u32, high: u32) {
            self.0.write_msr(super::msr::X2APIC_ICR, (u64::from(high) << 32) | u64::from(low));
        }
    }
    let ipi = Ipi::decode(value as u32, (value >> 32) as u32, true);
    let refused = deliver(&mut ctx.guest.cpus, &ipi, value as u32, (value >> 32) as u32, &mut Msr(ctx.host));
    if let Some(kind) = refused {
        integrity::refusal(ctx, kind, value);
    }
}

/// The physical APIC behind the guest's writes.
pub trait ApicRegisters {
    fn read(&mut self, offset: u64) -> u32;
    fn write(&mut self, offset: u64, value: u32);
}

/// The xAPIC page as the emulator sees it: reads and writes go to the
/// real APIC (32-bit registers, 16-byte aligned), but for the ICR, whose
/// writes are routed, and the APIC ID, whose writes are dropped.
pub struct XapicWindow<'a> {
    pub apic: &'a mut dyn ApicRegisters,
    pub cpus: &'a mut GuestCpus,
    /// What was refused, and the ICR (x2APIC layout) that asked for it.
    pub refused: Option<(ViolationKind, u64)>,
}

struct Registers<'a>(&'a mut dyn ApicRegisters, u32);

impl IcrSink for Registers<'_> {
    fn send(&mut self, low: u32, high: u32) {
        if high != self.1 {
            self.0.write(ICR_HIGH, high);
        }
        self.0.write(ICR_LOW, low);
        // The guest's ICR_HIGH is its own again for its next write.
        if high != self.1 {
            self.0.write(ICR_HIGH, self.1);
        }
    }
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
        let value = value as u32;
        let current = self.cpus.current;
        match register {
            APIC_ID => return,
            ICR_LOW => {
                let high = self.apic.read(ICR_HIGH);
                let ipi = Ipi::decode(value, high, false);
                let mut sink = Registers(&mut *self.apic, high);
                if let Some(kind) = deliver(self.cpus, &ipi, value, high, &mut sink) {
                    self.refused = Some((kind, (u64::from(high) << 32) | u64::from(value)));
                }
                return;
            }
            LDR => {
                if let Some(l) = self.cpus.logical.get_mut(current) {
                    l.ldr = value;
                }
            }
            DFR => {
                if let Some(l) = self.cpus.logical.get_mut(current) {
                    l.dfr = value;
                }
            }
            _ => {}
        }
        self.apic.write(register, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn the_next_interrupt_is_the_highest_request_above_the_processor_priority() {
        let mut irr = [0u32; 8];
        assert_eq!(deliverable(&irr, 0), None, "nothing requested");
        irr[7] = 1 << 12; // 0xec, the local timer
        irr[1] = 1 << 3; // 0x23
        assert_eq!(deliverable(&irr, 0), Some(0xec));
        assert_eq!(deliverable(&irr, 0xd0), Some(0xec), "class 0xe above 0xd");
        assert_eq!(deliverable(&irr, 0xe0), None, "the same class as the one in service waits");
        assert_eq!(deliverable(&irr, 0xef), None);
        irr[7] = 0;
        assert_eq!(deliverable(&irr, 0x10), Some(0x23));
        assert_eq!(deliverable(&irr, 0x20), None, "the highest request decides, not a lower one");
        irr[0] = 1;
        assert_eq!(deliverable(&irr, 0x20), None);
    }

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

    /// A guest with CPUs of APIC IDs 0 and 1 on a machine with more.
    fn two_of_four() -> GuestCpus {
        GuestCpus::new(vec![0, 1], false)
    }

    fn xapic(cpus: &mut GuestCpus, writes: &[(u64, u32)]) -> (Apic, Option<(ViolationKind, u64)>) {
        let mut apic = Apic::default();
        let mut w = XapicWindow { apic: &mut apic, cpus, refused: None };
        for &(o, v) in writes {
            w.write(o, 4, u64::from(v));
        }
        let refused = w.refused;
        (apic, refused)
    }

    #[test]
    fn linux_bringing_up_its_second_cpu_posts_init_and_startups() {
        let mut cpus = two_of_four();
        // Linux's wakeup_secondary_cpu_via_init: INIT assert, INIT
        // de-assert, then two start-up IPIs, each after ICR_HIGH.
        let (apic, refused) = xapic(
            &mut cpus,
            &[
                (ICR_HIGH, 1 << 24),
                (ICR_LOW, 0xc500),
                (ICR_HIGH, 1 << 24),
                (ICR_LOW, 0x8500),
                (ICR_HIGH, 1 << 24),
                (ICR_LOW, 0x0699),
                (ICR_HIGH, 1 << 24),
                (ICR_LOW, 0x0699),
            ],
        );
        assert_eq!(refused, None);
        assert_eq!(cpus.outbox, [(1, VcpuEvent::Init), (1, VcpuEvent::Startup(0x99)), (1, VcpuEvent::Startup(0x99))]);
        // No INIT or start-up IPI ever reached the real ICR.
        assert!(apic.writes.iter().all(|&(o, _)| o != ICR_LOW));
    }

    #[test]
    fn init_and_startup_to_a_cpu_the_guest_does_not_own_are_refused() {
        for low in [0x4500, 0x069a] {
            let mut cpus = two_of_four();
            let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 2 << 24), (ICR_LOW, low)]);
            assert_eq!(refused, Some((ViolationKind::StartCpu, (2u64 << 56) | u64::from(low))));
            assert!(cpus.outbox.is_empty());
            assert_eq!(apic.writes, [(ICR_HIGH, 2 << 24)]);
        }
        // Broadcast shorthands that would reach other CPUs: refused whole.
        for low in [0xc4500, 0x8_4500, 0xc_069a] {
            let mut cpus = two_of_four();
            let (_, refused) = xapic(&mut cpus, &[(ICR_LOW, low)]);
            assert_eq!(refused.map(|r| r.0), Some(ViolationKind::StartCpu), "{low:#x}");
            assert!(cpus.outbox.is_empty());
        }
        // The same shorthand from a guest that owns the machine: virtualised.
        let mut cpus = GuestCpus::new(vec![0, 1, 2], true);
        cpus.current = 1;
        let (_, refused) = xapic(&mut cpus, &[(ICR_LOW, 0xc_4500)]);
        assert_eq!(refused, None);
        assert_eq!(cpus.outbox, [(0, VcpuEvent::Init), (2, VcpuEvent::Init)]);
    }

    #[test]
    fn fixed_ipis_go_out_as_written_on_a_whole_machine_and_one_by_one_otherwise() {
        let mut cpus = GuestCpus::new(vec![0, 1], true);
        let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 3 << 24), (ICR_LOW, 0x08ec)]);
        assert_eq!((refused, apic.writes), (None, vec![(ICR_HIGH, 3 << 24), (ICR_LOW, 0x08ec)]));

        // Logical flat destination 0b11 from a guest on part of the
        // machine: each of its vCPUs with a matching LDR gets a physical copy.
        let mut cpus = two_of_four();
        cpus.logical[0] = Logical { ldr: 1 << 24, dfr: u32::MAX };
        cpus.logical[1] = Logical { ldr: 2 << 24, dfr: u32::MAX };
        let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 3 << 24), (ICR_LOW, 0x08fb)]);
        assert_eq!(refused, None);
        assert_eq!(
            apic.writes[1..],
            [
                (ICR_HIGH, 0),
                (ICR_LOW, 0xfb),
                (ICR_HIGH, 3 << 24),
                (ICR_HIGH, 1 << 24),
                (ICR_LOW, 0xfb),
                (ICR_HIGH, 3 << 24)
            ]
        );
        // All-excluding-self: the guest's other CPU only, and the rest reported.
        let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 0), (ICR_LOW, 0xc_00fd)]);
        assert_eq!(refused.map(|r| r.0), Some(ViolationKind::ForeignIpi));
        assert_eq!(apic.writes[1..], [(ICR_HIGH, 1 << 24), (ICR_LOW, 0xfd), (ICR_HIGH, 0)]);
        // A physical IPI to a CPU it does not own: nothing sent, reported.
        let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 3 << 24), (ICR_LOW, 0x00fd)]);
        assert_eq!(refused.map(|r| r.0), Some(ViolationKind::ForeignIpi));
        assert_eq!(apic.writes, [(ICR_HIGH, 3 << 24)]);
    }

    #[test]
    fn nmis_are_posted_never_sent_and_smis_refused() {
        let mut cpus = GuestCpus::new(vec![0, 1], true);
        let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 1 << 24), (ICR_LOW, 0x0400)]);
        assert_eq!(refused, None);
        assert_eq!(cpus.outbox, [(1, VcpuEvent::Nmi)]);
        assert_eq!(apic.writes, [(ICR_HIGH, 1 << 24)]);
        for mode in [2u32, 3, 7] {
            let mut cpus = GuestCpus::new(vec![0, 1], true);
            let (apic, refused) = xapic(&mut cpus, &[(ICR_HIGH, 1 << 24), (ICR_LOW, mode << 8)]);
            assert_eq!(refused.map(|r| r.0), Some(ViolationKind::ForeignIpi), "mode {mode}");
            assert_eq!(apic.writes.len(), 1);
        }
    }

    #[test]
    fn the_apic_id_stays_and_logical_ids_are_tracked() {
        let mut cpus = two_of_four();
        cpus.current = 1;
        let (apic, _) = xapic(&mut cpus, &[(APIC_ID, 7 << 24), (LDR, 4 << 24), (DFR, 0x0fff_ffff), (0xb0, 0)]);
        assert_eq!(apic.writes, [(LDR, 4 << 24), (DFR, 0x0fff_ffff), (0xb0, 0)]);
        assert_eq!(cpus.logical[1], Logical { ldr: 4 << 24, dfr: 0x0fff_ffff });
        // Cluster model: cluster 0, member bit 2.
        let ipi = Ipi::decode(0x08ec, 0x04 << 24, false);
        assert_eq!(route(&cpus, &ipi).route, Route::Unicast(vec![1]));
        let ipi = Ipi::decode(0x08ec, 0x14 << 24, false);
        assert_eq!(route(&cpus, &ipi).route, Route::Unicast(vec![]));
    }

    #[test]
    fn x2apic_destinations() {
        let cpus = GuestCpus::new(vec![0, 17, 18], false);
        let phys = Ipi::decode(0x00ec, 17, true);
        assert_eq!(route(&cpus, &phys), Decision { route: Route::Unicast(vec![1]), refused: None });
        // Logical: cluster 1, members 1 and 2 (IDs 17 and 18).
        let logical = Ipi::decode(0x08ec, (1 << 16) | 0b110, true);
        assert_eq!(route(&cpus, &logical).route, Route::Unicast(vec![1, 2]));
        let broadcast = Ipi::decode(0x0400, u32::MAX, true);
        assert_eq!(
            route(&cpus, &broadcast),
            Decision {
                route: Route::Post(vec![(0, VcpuEvent::Nmi), (1, VcpuEvent::Nmi), (2, VcpuEvent::Nmi)]),
                refused: Some(ViolationKind::ForeignIpi)
            }
        );
        let init = Ipi::decode(0x4500, 5, true);
        assert_eq!(route(&cpus, &init).refused, Some(ViolationKind::StartCpu));
    }

    #[test]
    fn every_icr_value_is_routed_to_the_guests_own_vcpus() {
        // Hostile input: every pattern of the low word's fields, several destinations.
        let cpus = GuestCpus::new(vec![0, 1], false);
        for low in (0..0x10_0000u32).step_by(0x1f3) {
            for high in [0, 1 << 24, 2 << 24, 0xff << 24, u32::MAX] {
                for x2 in [false, true] {
                    let d = route(&cpus, &Ipi::decode(low, high, x2));
                    let vcpus: Vec<usize> = match d.route {
                        Route::Unicast(t) => t,
                        Route::Post(e) => e.into_iter().map(|(t, _)| t).collect(),
                        Route::AsWritten => panic!("{low:#x}: out as written from part of the machine"),
                        Route::Drop => Vec::new(),
                    };
                    assert!(vcpus.iter().all(|&t| t < 2), "{low:#x} {high:#x}");
                }
            }
        }
    }
}
