//! RDMSR and WRMSR through an allow-list. State the VMCS holds goes to the
//! VMCS; the syscall MSRs, which the hypervisor never uses, are written
//! through to the hardware and shadowed for guest switches; a few read-only
//! values come from the host. Everything else raises #GP, as a CPU does for
//! an MSR it lacks.

use super::{Action, ExitContext};
use crate::vcpu::{inject_exception, is_canonical, skip_instruction, Field, VECTOR_GP};

pub mod index {
    pub const TSC: u32 = 0x10;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

use index::*;

/// Where an allowed MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    Vmcs(Field),
    /// Hardware register written through, shadowed per guest.
    Shadowed,
    /// The host's value, read-only.
    HostReadOnly,
    /// The time-stamp counter, read-only.
    Tsc,
}

fn home(msr: u32) -> Option<Home> {
    Some(match msr {
        EFER => Home::Vmcs(Field::Efer),
        PAT => Home::Vmcs(Field::Pat),
        FS_BASE => Home::Vmcs(Field::FsBase),
        GS_BASE => Home::Vmcs(Field::GsBase),
        SYSENTER_CS => Home::Vmcs(Field::SysenterCs),
        SYSENTER_ESP => Home::Vmcs(Field::SysenterEsp),
        SYSENTER_EIP => Home::Vmcs(Field::SysenterEip),
        STAR | LSTAR | CSTAR | SFMASK | KERNEL_GS_BASE | TSC_AUX => Home::Shadowed,
        MISC_ENABLE => Home::HostReadOnly,
        TSC => Home::Tsc,
        _ => return None,
    })
}

const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;
/// EFER bits a running 64-bit guest may change: LME/LMA are fixed once in long mode.
const EFER_WRITABLE: u64 = EFER_SCE | EFER_NXE;

/// Whether a value is acceptable for an MSR, as the hardware would check it.
fn valid(msr: u32, value: u64, current: u64) -> bool {
    match msr {
        EFER => (value ^ current) & !EFER_WRITABLE == 0,
        PAT => (0..8).all(|i| matches!((value >> (8 * i)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7)),
        FS_BASE | GS_BASE | KERNEL_GS_BASE | LSTAR | CSTAR | SYSENTER_ESP | SYSENTER_EIP => is_canonical(value),
        SYSENTER_CS | TSC_AUX | SFMASK => value >> 32 == 0,
        _ => true,
    }
}

fn shadow_slot(g: &mut crate::guest::MsrShadow, msr: u32) -> &mut u64 {
    match msr {
        STAR => &mut g.star,
        LSTAR => &mut g.lstar,
        CSTAR => &mut g.cstar,
        SFMASK => &mut g.sfmask,
        KERNEL_GS_BASE => &mut g.kernel_gs_base,
        _ => &mut g.tsc_aux,
    }
}

/// For pass-through guests the MSR bitmap lets everything through except
/// these: the VMX capability MSRs and IA32_FEATURE_CONTROL (VMX is hidden),
/// and writes to the TSC (the hypervisor's clock too).
pub fn pass_through_traps() -> impl Iterator<Item = (u32, bool, bool)> {
    // (msr, trap reads, trap writes)
    let vmx = (crate::arch::x86_64::vmx::caps::msr::BASIC..=crate::arch::x86_64::vmx::caps::msr::VMFUNC)
        .map(|m| (m, true, true));
    [(FEATURE_CONTROL, true, true), (TSC, false, true)].into_iter().chain(vmx)
}

const FEATURE_CONTROL: u32 = 0x3a;
/// What a pass-through guest reads in IA32_FEATURE_CONTROL: locked, VMX off.
const FEATURE_CONTROL_LOCKED_OFF: u64 = 1;

/// RDMSR/WRMSR exits of a pass-through guest: the guarded MSRs above, and
/// MSRs outside the bitmap's ranges (hypervisor and AMD ranges), which
/// this Intel processor does not implement for guests.
fn pass_through(ctx: &mut ExitContext<'_>, write: bool) -> Action {
    let msr = ctx.vcpu.regs().rcx as u32;
    match (msr, write) {
        (FEATURE_CONTROL, false) => {
            let regs = ctx.vcpu.regs();
            regs.rax = FEATURE_CONTROL_LOCKED_OFF;
            regs.rdx = 0;
        }
        (TSC, true) => {
            log::debug!("guest {}: write to the TSC ignored", ctx.guest.name());
        }
        _ => return deny(ctx),
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

fn deny(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

pub fn rdmsr(ctx: &mut ExitContext<'_>) -> Action {
    if ctx.guest.platform.is_pass_through() {
        return pass_through(ctx, false);
    }
    let msr = ctx.vcpu.regs().rcx as u32;
    let value = match home(msr) {
        Some(Home::Vmcs(field)) => ctx.vcpu.read(field),
        Some(Home::Shadowed) => *shadow_slot(&mut ctx.guest.msrs, msr),
        Some(Home::HostReadOnly) => ctx.host.read_msr(msr),
        Some(Home::Tsc) => ctx.host.rdtsc(),
        None => return deny(ctx),
    };
    let regs = ctx.vcpu.regs();
    regs.rax = value & 0xffff_ffff;
    regs.rdx = value >> 32;
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

pub fn wrmsr(ctx: &mut ExitContext<'_>) -> Action {
    if ctx.guest.platform.is_pass_through() {
        return pass_through(ctx, true);
    }
    let regs = ctx.vcpu.regs();
    let msr = regs.rcx as u32;
    let value = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    match home(msr) {
        Some(Home::Vmcs(field)) => {
            if !valid(msr, value, ctx.vcpu.read(field)) {
                return deny(ctx);
            }
            ctx.vcpu.write(field, value);
        }
        Some(Home::Shadowed) => {
            if !valid(msr, value, 0) {
                return deny(ctx);
            }
            *shadow_slot(&mut ctx.guest.msrs, msr) = value;
            ctx.host.write_msr(msr, value);
        }
        Some(Home::HostReadOnly | Home::Tsc) | None => return deny(ctx),
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::FakeHost;
    use crate::exits::{dispatch, ExitContext};
    use crate::guest::{test_guest, Guest};
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};

    fn access(g: &mut Guest, v: &mut FakeVcpu, host: &FakeHost, write: bool, msr: u32, value: u64) -> Action {
        v.regs.rcx = u64::from(msr);
        v.regs.rax = value & 0xffff_ffff;
        v.regs.rdx = value >> 32;
        let exit = ExitInfo {
            reason: if write { reason::WRMSR } else { reason::RDMSR },
            instruction_len: 2,
            ..Default::default()
        };
        let mut ctx = ExitContext { guest: g, vcpu: v, exit: &exit, host };
        dispatch(&mut ctx)
    }

    /// (msr, write?, value, allowed?) for the test guests' policy.
    #[test]
    fn allow_list_table() {
        let cases: &[(u32, bool, u64, bool)] = &[
            (EFER, false, 0, true),
            (EFER, true, 0xd01, true),  // set SCE and NXE
            (EFER, true, 0x001, false), // clear LME/LMA: refused
            (PAT, true, 0x0007_0406_0007_0406, true),
            (PAT, true, 0x0002_0000_0000_0000, false), // type 2 is reserved
            (FS_BASE, true, 0xffff_8000_0000_0000, true),
            (FS_BASE, true, 0x0000_8000_0000_0000, false), // non-canonical
            (LSTAR, true, 0xffff_ffff_8100_0000, true),
            (STAR, true, 0x0023_0010_0000_0000, true),
            (TSC_AUX, true, 1 << 32, false),
            (TSC, false, 0, true),
            (TSC, true, 5, false),
            (MISC_ENABLE, false, 0, true),
            (MISC_ENABLE, true, 1, false),
            (0x3a, false, 0, false), // IA32_FEATURE_CONTROL
            (0x3a, true, 5, false),
            (0x480, false, 0, false), // IA32_VMX_BASIC
            (0x1b, false, 0, false),  // APIC base: no LAPIC for test guests
            (0xdead_beef, false, 0, false),
        ];
        for &(msr, write, value, allowed) in cases {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.write(Field::Efer, 0x500);
            let host = FakeHost::default();
            assert_eq!(access(&mut g, &mut v, &host, write, msr, value), Action::Resume);
            let faulted = v.injected() == Some((13, Some(0)));
            assert_eq!(!faulted, allowed, "msr {msr:#x} write={write} value={value:#x}");
            let rip = v.read(Field::Rip);
            assert_eq!(rip, if allowed { 0x10_0002 } else { 0x10_0000 }, "msr {msr:#x}");
        }
    }

    #[test]
    fn shadowed_msrs_write_through_and_read_back() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let host = FakeHost::default();
        access(&mut g, &mut v, &host, true, LSTAR, 0xffff_ffff_8123_4567);
        assert_eq!(host.msr_writes.borrow().as_slice(), &[(LSTAR, 0xffff_ffff_8123_4567)]);
        access(&mut g, &mut v, &host, false, LSTAR, 0);
        assert_eq!((v.regs.rdx << 32) | v.regs.rax, 0xffff_ffff_8123_4567);
    }

    #[test]
    fn pass_through_guests_see_vmx_locked_off() {
        let host = FakeHost::default();
        for (msr, write, allowed, value) in [
            (0x3a, false, true, 1u64),
            (0x3a, true, false, 0),
            (0x480, false, false, 0),
            (0x491, false, false, 0),
            (0x10, true, true, 0),
            (0x4000_0000, false, false, 0),
        ] {
            let mut g = test_guest();
            g.platform = crate::guest::Platform::PassThrough { pm1a_control: None };
            let mut v = FakeVcpu::new();
            access(&mut g, &mut v, &host, write, msr, 0);
            assert_eq!(v.injected().is_none(), allowed, "msr {msr:#x} write={write}");
            if allowed && !write {
                assert_eq!(v.regs.rax, value);
            }
        }
        assert!(host.msr_writes.borrow().is_empty(), "nothing reaches the hardware");
        assert!(pass_through_traps().any(|(m, r, w)| m == 0x3a && r && w));
    }

    #[test]
    fn vmcs_msrs_land_in_the_vmcs() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let host = FakeHost::default();
        access(&mut g, &mut v, &host, true, GS_BASE, 0x1234_5000);
        assert_eq!(v.read(Field::GsBase), 0x1234_5000);
        access(&mut g, &mut v, &host, false, TSC, 0);
        assert_eq!(v.regs.rax, 123_456);
    }
}
