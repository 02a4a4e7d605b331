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
/// From a module's view (where every event exits), the interrupt is
/// delivered in the kernel view.
pub fn external_interrupt(ctx: &mut ExitContext<'_>) -> Action {
    if let crate::integrity::View::Module(m) = ctx.view() {
        return super::integrity::module_event(ctx, m);
    }
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

/// XCR0 components (SDM Vol. 1, 13.3).
pub mod xcr0 {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
    pub const MPX: u64 = 0b11 << 3;
    pub const AVX512: u64 = 0b111 << 5;
    pub const AMX: u64 = 0b11 << 17;
}

/// The legacy area and the XSAVE header: where component 2 may start.
const XSAVE_HEADER_END: u32 = 576;

/// The XSAVE components guests may enable: what the processor supports in
/// XCR0 and what fits, at its architectural offset, in the `area` bytes the
/// hypervisor switches guests' state through (AMX's 8 KiB of tile data does
/// not fit a 4 KiB area, so it is never offered). Components that only go
/// in pairs or groups are offered whole or not at all. 0 without XSAVE.
pub fn xcr0_offered(cpuid: &dyn Fn(u32, u32) -> [u32; 4], area: u32) -> u64 {
    if cpuid(1, 0)[2] & (1 << 26) == 0 {
        return 0;
    }
    let [eax, _, _, edx] = cpuid(0xd, 0);
    let supported = (u64::from(edx) << 32) | u64::from(eax);
    if supported & (xcr0::X87 | xcr0::SSE) != xcr0::X87 | xcr0::SSE {
        return 0;
    }
    let mut offered = xcr0::X87 | xcr0::SSE;
    for i in 2..63u32 {
        if supported & (1 << i) == 0 {
            continue;
        }
        let [size, offset, _, _] = cpuid(0xd, i);
        if offset >= XSAVE_HEADER_END && offset.checked_add(size).is_some_and(|end| end <= area) {
            offered |= 1 << i;
        }
    }
    for group in [xcr0::MPX, xcr0::AVX512, xcr0::AMX] {
        if offered & group != group {
            offered &= !group;
        }
    }
    if offered & xcr0::AVX == 0 {
        offered &= !xcr0::AVX512;
    }
    offered
}

/// Whether XSETBV may load `value` into XCR0, given what is offered: the
/// processor's rules (x87 always; AVX needs SSE; MPX, AVX-512 and AMX each
/// whole; AVX-512 needs AVX) and nothing beyond the offer.
pub fn xcr0_valid(value: u64, offered: u64) -> bool {
    let whole = |group: u64| value & group == 0 || value & group == group;
    value & xcr0::X87 != 0
        && value & !offered == 0
        && (value & xcr0::AVX == 0 || value & xcr0::SSE != 0)
        && whole(xcr0::MPX)
        && whole(xcr0::AVX512)
        && whole(xcr0::AMX)
        && (value & xcr0::AVX512 == 0 || value & xcr0::AVX != 0)
}

const CR4_OSXSAVE: u64 = 1 << 18;

/// XSETBV, checked as the processor would before it reaches the hardware:
/// no guest value may make the host's own XSETBV fault, which would stop
/// every guest.
pub fn xsetbv(ctx: &mut ExitContext<'_>) -> Action {
    let offered = ctx.host.xcr0_offered();
    // Without XSAVE (or with CR4.OSXSAVE clear) the instruction does not exist.
    if offered == 0 || ctx.vcpu.read(Field::Cr4) & CR4_OSXSAVE == 0 {
        inject_exception(ctx.vcpu, VECTOR_UD, None);
        return Action::Resume;
    }
    let user = crate::vcpu::cpl(ctx.vcpu) != 0;
    let regs = ctx.vcpu.regs();
    let (index, value) = (regs.rcx as u32, (regs.rdx << 32) | (regs.rax & 0xffff_ffff));
    if user || index != 0 || !xcr0_valid(value, offered) {
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
    use crate::vcpu::{ExitInfo, VcpuState};

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
        // (rcx, value, accepted) with the fake host offering x87|SSE|AVX.
        for (rcx, value, ok) in
            [(0, 0x7, true), (0, 0x3, true), (0, 0x2, false), (0, 0x5, false), (1, 0x7, false), (0, 0xe7, false)]
        {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.regs.rcx = rcx;
            v.regs.rax = value;
            v.write(Field::Cr4, CR4_OSXSAVE);
            let host = FakeHost::default();
            let exit = ExitInfo { reason: reason::XSETBV, instruction_len: 3, ..Default::default() };
            let phys = crate::guest::memory::fake::FakePhys::new(0, 0);
            let mut ctx =
                ExitContext { guest: &mut g, vcpu: &mut v, exit: &exit, host: &host, phys: &phys, control: None };
            assert_eq!(dispatch(&mut ctx), Action::Resume);
            assert_eq!(v.injected().is_none(), ok, "xcr{rcx} = {value:#x}");
            assert_eq!(*host.xcr0.borrow() == value, ok);
            assert_eq!(g.xcr0 == value, ok);
        }
    }

    /// A CPU that supports x87, SSE, AVX, MPX, AVX-512, PKRU and AMX, at
    /// Sapphire Rapids' offsets.
    fn big_cpu(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (1, _) => [0, 0, 1 << 26, 0],
            (0xd, 0) => [0x6_02ff, 0, 0x2b00, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 3) => [64, 960, 0, 0],
            (0xd, 4) => [64, 1024, 0, 0],
            (0xd, 5) => [64, 1088, 0, 0],
            (0xd, 6) => [512, 1152, 0, 0],
            (0xd, 7) => [1024, 1664, 0, 0],
            (0xd, 9) => [8, 2688, 0, 0],
            (0xd, 17) => [64, 2752, 0, 0],
            (0xd, 18) => [8192, 2816, 0, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn only_what_fits_the_switch_area_is_offered_and_groups_go_whole() {
        // AMX's tile data does not fit 4 KiB: neither AMX component is offered.
        assert_eq!(xcr0_offered(&big_cpu, 4096), 0x2ff);
        // With AVX-512's upper halves cut off, AVX-512 goes as a whole.
        assert_eq!(xcr0_offered(&big_cpu, 1664), 0x1f);
        // No XSAVE: nothing, and XSETBV does not exist.
        assert_eq!(xcr0_offered(&|_, _| [0; 4], 4096), 0);
    }

    #[test]
    fn xcr0_rules_are_the_processors() {
        let all = 0x6_02ff;
        for (value, ok) in [
            (0x3, true),
            (0x7, true),
            (0x1f, true),
            (0xe7, true),
            (0x6_0003, true),
            (0x2, false),         // no x87
            (0x5, false),         // AVX without SSE
            (0xb, false),         // MPX's BNDREGS without BNDCSR
            (0x13, false),        // BNDCSR without BNDREGS
            (0x67, false),        // part of AVX-512
            (0xe3, false),        // AVX-512 without AVX
            (0x2_0003, false),    // XTILECFG without XTILEDATA
            (0x4_0003, false),    // XTILEDATA without XTILECFG
            (1 << 40 | 3, false), // beyond the offer
        ] {
            assert_eq!(xcr0_valid(value, all), ok, "{value:#x}");
        }
        assert!(!xcr0_valid(0x6_0003, 0x2ff), "AMX not offered");
    }

    #[test]
    fn xsetbv_without_osxsave_or_from_user_space_faults() {
        for (cr4, ss, fault) in [(0, 0x93, 6), (CR4_OSXSAVE, 0x93 | (3 << 5), 13)] {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.regs.rax = 0x3;
            v.write(Field::Cr4, cr4);
            v.write(Field::SsAccessRights, ss);
            let exit = ExitInfo { reason: reason::XSETBV, instruction_len: 3, ..Default::default() };
            assert_eq!(run(&mut g, &mut v, exit), Action::Resume);
            assert_eq!(v.injected().map(|i| i.0), Some(fault));
            assert_eq!(g.xcr0, 1, "unchanged");
        }
        // A host that offers nothing (XSAVE off): #UD, and the host's XSETBV never runs.
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.regs.rax = 0x3;
        v.write(Field::Cr4, CR4_OSXSAVE);
        let host = FakeHost { xcr0_offered: Some(0), ..Default::default() };
        let exit = ExitInfo { reason: reason::XSETBV, instruction_len: 3, ..Default::default() };
        let phys = crate::guest::memory::fake::FakePhys::new(0, 0);
        let mut ctx = ExitContext { guest: &mut g, vcpu: &mut v, exit: &exit, host: &host, phys: &phys, control: None };
        assert_eq!(dispatch(&mut ctx), Action::Resume);
        assert_eq!(v.injected(), Some((6, None)));
        assert_eq!(*host.xcr0.borrow(), 0, "the host's XSETBV never ran");
    }
}
