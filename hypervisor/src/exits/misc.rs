//! The small handlers: stops, #UD for hidden instructions, HLT, XSETBV.

use alloc::format;

use super::{Action, ExitContext, StopReason};
use crate::vcpu::{inject_exception, skip_instruction, Field, VECTOR_GP, VECTOR_UD};

pub fn triple_fault(ctx: &mut ExitContext<'_>) -> Action {
    Action::Stop(StopReason::TripleFault { rip: ctx.vcpu.read(Field::Rip) })
}

pub fn init_signal(_: &mut ExitContext<'_>) -> Action {
    Action::Stop(StopReason::Reset { what: "INIT signal" })
}

/// With no interrupt sources for emulated-device guests, a halted vCPU
/// would never wake: stop it and say why rather than spin.
pub fn hlt(ctx: &mut ExitContext<'_>) -> Action {
    Action::Stop(StopReason::Halted { rip: ctx.vcpu.read(Field::Rip) })
}

pub fn undefined_opcode(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_UD, None);
    Action::Resume
}

/// Instructions that need nothing emulated (INVD, WBINVD: caches are coherent here).
pub fn skip(ctx: &mut ExitContext<'_>) -> Action {
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

pub fn rdtsc(ctx: &mut ExitContext<'_>) -> Action {
    let tsc = ctx.host.rdtsc();
    let regs = ctx.vcpu.regs();
    regs.rax = tsc & 0xffff_ffff;
    regs.rdx = tsc >> 32;
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

/// The host took an interrupt while the guest ran; the guest waits its turn.
pub fn external_interrupt(_: &mut ExitContext<'_>) -> Action {
    Action::Yield
}

pub fn preemption_timer(_: &mut ExitContext<'_>) -> Action {
    Action::Yield
}

pub fn entry_failed(ctx: &mut ExitContext<'_>) -> Action {
    Action::Stop(StopReason::EntryFailed {
        reason: ctx.exit.reason,
        qualification: ctx.exit.qualification,
        detail: format!("guest rip {:#x}", ctx.vcpu.read(Field::Rip)),
    })
}

/// XSETBV, checked as the processor would before it reaches the hardware.
pub fn xsetbv(ctx: &mut ExitContext<'_>) -> Action {
    let regs = ctx.vcpu.regs();
    let (index, value) = (regs.rcx as u32, (regs.rdx << 32) | (regs.rax & 0xffff_ffff));
    let supported = {
        let [eax, _, _, edx] = ctx.host.cpuid(0xd, 0);
        (u64::from(edx) << 32) | u64::from(eax)
    };
    const X87: u64 = 1 << 0;
    const SSE: u64 = 1 << 1;
    const AVX: u64 = 1 << 2;
    const AVX512: u64 = 0b111 << 5;
    let valid = index == 0
        && value & X87 != 0
        && value & !supported == 0
        && (value & AVX == 0 || value & SSE != 0)
        && (value & AVX512 == 0 || (value & AVX512 == AVX512 && value & AVX != 0));
    if !valid {
        inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
        return Action::Resume;
    }
    ctx.guest.xcr0 = value;
    ctx.host.set_xcr0(value);
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::{run, FakeHost};
    use crate::exits::{dispatch, ExitContext};
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::ExitInfo;

    #[test]
    fn triple_fault_and_hlt_stop_the_guest() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let e = ExitInfo { reason: reason::TRIPLE_FAULT, ..Default::default() };
        assert_eq!(run(&mut g, &mut v, e), Action::Stop(StopReason::TripleFault { rip: 0x10_0000 }));
        let e = ExitInfo { reason: reason::HLT, ..Default::default() };
        assert_eq!(run(&mut g, &mut v, e), Action::Stop(StopReason::Halted { rip: 0x10_0000 }));
    }

    #[test]
    fn xsetbv_is_checked() {
        // (rcx, value, accepted) with the fake host supporting x87|SSE|AVX.
        for (rcx, value, ok) in
            [(0, 0x7, true), (0, 0x3, true), (0, 0x2, false), (0, 0x5, false), (1, 0x7, false), (0, 0xe7, false)]
        {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.regs.rcx = rcx;
            v.regs.rax = value;
            let host = FakeHost::default();
            let exit = ExitInfo { reason: reason::XSETBV, instruction_len: 3, ..Default::default() };
            let mut ctx = ExitContext { guest: &mut g, vcpu: &mut v, exit: &exit, host: &host };
            assert_eq!(dispatch(&mut ctx), Action::Resume);
            assert_eq!(v.injected().is_none(), ok, "xcr{rcx} = {value:#x}");
            assert_eq!(*host.xcr0.borrow() == value, ok);
            assert_eq!(g.xcr0 == value, ok);
        }
    }
}
