//! VMCALL: decoding and validating a hypercall, then serving it.

use guest_agent::{Call, Error, Registers, ABI_VERSION};

use super::{Action, ExitContext, StopReason};
use crate::vcpu::{cpl, skip_instruction};

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Version,
    Shutdown { code: u32 },
}

/// Checks every argument; a bad call is refused with an error code and
/// changes nothing.
pub fn decode(regs: &Registers) -> Result<Request, Error> {
    match Call::from_raw(regs.rax).ok_or(Error::UnknownCall)? {
        Call::Version => Ok(Request::Version),
        Call::Shutdown => {
            let code = u32::try_from(regs.rbx).map_err(|_| Error::InvalidArgument)?;
            Ok(Request::Shutdown { code })
        }
    }
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let user_mode = cpl(ctx.vcpu) != 0;
    let regs = ctx.vcpu.regs();
    let call = Registers { rax: regs.rax, rbx: regs.rbx, rcx: regs.rcx, rdx: regs.rdx, rsi: regs.rsi };
    let result = if user_mode { Err(Error::NotPermitted) } else { decode(&call) };
    let action = match result {
        Ok(Request::Version) => {
            let caps = ctx.guest.capabilities;
            let regs = ctx.vcpu.regs();
            regs.rax = 0;
            regs.rbx = u64::from(ABI_VERSION);
            regs.rcx = caps;
            Action::Resume
        }
        Ok(Request::Shutdown { code }) => return Action::Stop(StopReason::Shutdown { code }),
        Err(e) => {
            ctx.vcpu.regs().rax = e.code() as u64;
            Action::Resume
        }
    };
    skip_instruction(ctx.vcpu, ctx.exit);
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, Field, VcpuState};

    fn regs(rax: u64, rbx: u64) -> Registers {
        Registers { rax, rbx, ..Default::default() }
    }

    #[test]
    fn arguments_are_validated() {
        assert_eq!(decode(&regs(0, 0)), Ok(Request::Version));
        assert_eq!(decode(&regs(1, 42)), Ok(Request::Shutdown { code: 42 }));
        assert_eq!(decode(&regs(1, u64::from(u32::MAX))), Ok(Request::Shutdown { code: u32::MAX }));
        assert_eq!(decode(&regs(1, 1 << 32)), Err(Error::InvalidArgument));
        assert_eq!(decode(&regs(2, 0)), Err(Error::UnknownCall));
        assert_eq!(decode(&regs(u64::MAX, 0)), Err(Error::UnknownCall));
    }

    fn call(rax: u64, rbx: u64, ss_dpl: u64) -> (Action, FakeVcpu) {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.regs.rax = rax;
        v.regs.rbx = rbx;
        v.write(Field::SsAccessRights, 0x93 | (ss_dpl << 5));
        let exit = ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() };
        let a = run(&mut g, &mut v, exit);
        (a, v)
    }

    #[test]
    fn version_returns_abi_and_capabilities() {
        let (a, v) = call(0, 0, 0);
        assert_eq!(a, Action::Resume);
        assert_eq!((v.regs.rax, v.regs.rbx), (0, u64::from(ABI_VERSION)));
        assert_ne!(v.regs.rcx & guest_agent::Capabilities::SHUTDOWN, 0);
        assert_eq!(v.read(Field::Rip), 0x10_0003);
    }

    #[test]
    fn shutdown_stops_with_the_exit_code() {
        assert_eq!(call(1, 7, 0).0, Action::Stop(StopReason::Shutdown { code: 7 }));
    }

    #[test]
    fn errors_come_back_in_rax_and_change_nothing_else() {
        let (a, v) = call(1, 1 << 40, 0);
        assert_eq!(a, Action::Resume);
        assert_eq!(v.regs.rax as i64, Error::InvalidArgument.code());
        assert_eq!(v.regs.rbx, 1 << 40);
        let (_, v) = call(77, 0, 0);
        assert_eq!(v.regs.rax as i64, Error::UnknownCall.code());
    }

    #[test]
    fn user_mode_may_not_call() {
        let (a, v) = call(1, 0, 3);
        assert_eq!(a, Action::Resume);
        assert_eq!(v.regs.rax as i64, Error::NotPermitted.code());
    }
}
