//! EPT violations and misconfigurations. Guest RAM is mapped with full
//! rights, so a violation means an access outside it (or, once integrity
//! views exist, to protected memory): the guest is stopped with a report.

use alloc::format;

pub use crate::arch::x86_64::vmx::ept::Access;
use crate::arch::x86_64::vmx::ept::ViolationInfo;

use super::{Action, ExitContext, StopReason};
use crate::vcpu::Field;

pub fn violation(ctx: &mut ExitContext<'_>) -> Action {
    let info = ViolationInfo::from_qualification(ctx.exit.qualification);
    let gpa = ctx.exit.guest_physical;
    Action::Stop(StopReason::EptViolation {
        gpa,
        access: info.access,
        rip: ctx.vcpu.read(Field::Rip),
        linear: info.linear_valid.then_some(ctx.exit.guest_linear),
        guest_memory: ctx.guest.memory.contains(gpa),
    })
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
    use crate::vcpu::ExitInfo;

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
