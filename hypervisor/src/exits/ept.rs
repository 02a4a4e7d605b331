//! EPT violations and misconfigurations. Guest RAM is mapped with full
//! rights, so a violation means an access outside it (or, once integrity
//! views exist, to protected memory): the guest is stopped with a report.

use alloc::format;

pub use crate::arch::x86_64::vmx::ept::Access;
use crate::arch::x86_64::vmx::ept::ViolationInfo;

use super::apic;
use super::{Action, ExitContext, StopReason};
use crate::devices::tis;
use crate::guest::access::{GuestAccess, Paging, Principal};
use crate::guest::Platform;
use crate::mmio;
use crate::vcpu::Field;

pub fn violation(ctx: &mut ExitContext<'_>) -> Action {
    if let Some(action) = super::integrity::ept_violation(ctx) {
        return action;
    }
    let info = ViolationInfo::from_qualification(ctx.exit.qualification);
    let gpa = ctx.exit.guest_physical;
    let who = ctx.principal();
    let paging = Paging::from_vcpu(ctx.vcpu);
    if let Platform::PassThrough { lapic: Some(lapic), .. } = ctx.guest.platform {
        if gpa & !0xfff == lapic {
            return apic_write(ctx, lapic, who, paging);
        }
    }
    let guest = &mut *ctx.guest;
    if let Some(vtpm) = guest.vtpm.as_mut() {
        if (tis::BASE..tis::BASE + tis::SIZE).contains(&gpa) {
            let memory = GuestAccess::new(&guest.memory, ctx.phys, paging, who, ctx.control.as_deref());
            return match mmio::emulate(ctx.vcpu, ctx.exit, &memory, &mut vtpm.tis, tis::BASE) {
                Ok(_) => Action::Resume,
                Err(e) => Action::Stop(StopReason::Mmio(format!("{e}"))),
            };
        }
    }
    Action::Stop(StopReason::EptViolation {
        gpa,
        access: info.access,
        rip: ctx.vcpu.read(Field::Rip),
        linear: info.linear_valid.then_some(ctx.exit.guest_linear),
        guest_memory: ctx.guest.memory.contains(gpa),
    })
}

/// The real APIC, through the host.
struct HostApic<'a>(&'a dyn super::HostCpu);

impl apic::ApicRegisters for HostApic<'_> {
    fn read(&mut self, offset: u64) -> u32 {
        self.0.lapic_read(offset)
    }
    fn write(&mut self, offset: u64, value: u32) {
        self.0.lapic_write(offset, value)
    }
}

/// A write to the local APIC's page, which is mapped read-only: emulated,
/// and passed on but for the ICR, whose IPIs are routed (`apic`).
fn apic_write(ctx: &mut ExitContext<'_>, lapic: u64, who: Principal, paging: Paging) -> Action {
    let guest = &mut *ctx.guest;
    let mut window = apic::XapicWindow { apic: &mut HostApic(ctx.host), cpus: &mut guest.cpus, refused: None };
    let memory = GuestAccess::new(&guest.memory, ctx.phys, paging, who, ctx.control.as_deref());
    let result = mmio::emulate(ctx.vcpu, ctx.exit, &memory, &mut window, lapic);
    let refused = window.refused;
    match result {
        Ok(_) => {
            if let Some((kind, icr)) = refused {
                super::integrity::refusal(ctx, kind, icr);
            }
            Action::Resume
        }
        Err(e) => Action::Stop(StopReason::Mmio(format!("{e}"))),
    }
}

pub fn misconfiguration(ctx: &mut ExitContext<'_>) -> Action {
    Action::Stop(StopReason::HypervisorError(format!(
        "EPT misconfiguration at guest-physical {:#x}",
        ctx.exit.guest_physical
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};

    #[test]
    fn a_write_outside_guest_memory_stops_the_guest() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let exit = ExitInfo {
            reason: reason::EPT_VIOLATION,
            qualification: (1 << 1) | (1 << 7) | (1 << 8),
            guest_physical: 0x4000_0000,
            guest_linear: 0x4000_0000,
            ..Default::default()
        };
        assert_eq!(
            run(&mut g, &mut v, exit),
            Action::Stop(StopReason::EptViolation {
                gpa: 0x4000_0000,
                access: Access::Write,
                rip: 0x10_0000,
                linear: Some(0x4000_0000),
                guest_memory: false,
            })
        );
    }

    #[test]
    fn the_tis_window_goes_to_the_vtpm_when_there_is_one() {
        let exit = ExitInfo {
            reason: reason::EPT_VIOLATION,
            qualification: 1 << 0,
            guest_physical: tis::BASE + 0xf00,
            ..Default::default()
        };
        // No vTPM: an access outside guest memory like any other.
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        assert!(matches!(run(&mut g, &mut v, exit), Action::Stop(StopReason::EptViolation { .. })));
        // A vTPM: the access is emulated; here the guest has no page tables,
        // so the instruction cannot be fetched and the guest stops with a clear report.
        let mut g = test_guest();
        g.vtpm = Some(crate::tpm::GuestTpm::new(alloc::boxed::Box::new(crate::tpm::fake::FakeTpm::default())));
        let mut v = FakeVcpu::new();
        v.write(crate::vcpu::Field::Cr0, 0x8000_0031);
        v.write(crate::vcpu::Field::Efer, 0x500);
        v.write(crate::vcpu::Field::CsAccessRights, 0xa09b);
        match run(&mut g, &mut v, exit) {
            Action::Stop(StopReason::Mmio(why)) => assert!(why.contains("cannot"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fetch_inside_guest_memory_is_reported_as_protected() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let exit = ExitInfo {
            reason: reason::EPT_VIOLATION,
            qualification: 1 << 2,
            guest_physical: 0x1000,
            ..Default::default()
        };
        let Action::Stop(StopReason::EptViolation { access, guest_memory, linear, .. }) = run(&mut g, &mut v, exit)
        else {
            panic!("not stopped")
        };
        assert_eq!((access, guest_memory, linear), (Access::Execute, true, None));
    }
}
