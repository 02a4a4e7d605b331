//! Control-register accesses. The guest/host masks make writes to CR0.NE,
//! CR0.PE/PG and CR4.VMXE exit; the guest sees its own values through the
//! read shadows while the real registers keep what VMX requires.

use super::{Action, ExitContext, StopReason};
use crate::vcpu::{inject_exception, skip_instruction, Field, VECTOR_GP};

/// A CR access, from its exit qualification (SDM Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    MovTo { cr: u8, gpr: u8 },
    MovFrom { cr: u8, gpr: u8 },
    Clts,
    Lmsw,
}

impl CrAccess {
    pub const fn from_qualification(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => CrAccess::MovTo { cr, gpr },
            1 => CrAccess::MovFrom { cr, gpr },
            2 => CrAccess::Clts,
            _ => CrAccess::Lmsw,
        }
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_VMXE: u64 = 1 << 13;

fn read_gpr(ctx: &mut ExitContext<'_>, gpr: u8) -> u64 {
    let rsp = ctx.vcpu.read(Field::Rsp);
    ctx.vcpu.regs().get(gpr, rsp)
}

fn write_gpr(ctx: &mut ExitContext<'_>, gpr: u8, value: u64) {
    if ctx.vcpu.regs().set(gpr, value).is_none() {
        ctx.vcpu.write(Field::Rsp, value);
    }
}

fn gp(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let rip = ctx.vcpu.read(Field::Rip);
    let limits = ctx.guest.cr_limits;
    match CrAccess::from_qualification(ctx.exit.qualification) {
        CrAccess::MovTo { cr: 0, gpr } => {
            let value = read_gpr(ctx, gpr);
            let old = ctx.vcpu.read(Field::Cr0ReadShadow);
            if value >> 32 != 0 || (value & CR0_PG != 0 && value & CR0_PE == 0) {
                return gp(ctx);
            }
            if (value ^ old) & (CR0_PG | CR0_PE) != 0 {
                // Leaving or entering paging would need the IA-32e entry control
                // and EFER.LMA to follow; no guest kind here does that yet.
                return Action::Stop(StopReason::Unsupported { what: "switching CR0.PE/PG", rip });
            }
            let mut must_be_1 = limits.cr0_fixed0;
            if limits.unrestricted {
                must_be_1 &= !(CR0_PE | CR0_PG);
            }
            ctx.vcpu.write(Field::Cr0ReadShadow, value);
            ctx.vcpu.write(Field::Cr0, (value | must_be_1) & limits.cr0_fixed1);
        }
        CrAccess::MovTo { cr: 4, gpr } => {
            let value = read_gpr(ctx, gpr);
            // VMX is hidden; bits the processor lacks fault as they would on hardware.
            if value & CR4_VMXE != 0 || value & !limits.cr4_fixed1 != 0 {
                return gp(ctx);
            }
            ctx.vcpu.write(Field::Cr4ReadShadow, value);
            ctx.vcpu.write(Field::Cr4, (value | limits.cr4_fixed0) & limits.cr4_fixed1);
        }
        // CR3-load/store exiting is forced on by some processors.
        CrAccess::MovTo { cr: 3, gpr } => {
            let value = read_gpr(ctx, gpr);
            ctx.vcpu.write(Field::Cr3, value & !(1 << 63));
        }
        CrAccess::MovFrom { cr: 3, gpr } => {
            let value = ctx.vcpu.read(Field::Cr3);
            write_gpr(ctx, gpr, value);
        }
        CrAccess::MovTo { .. } | CrAccess::MovFrom { .. } => {
            return Action::Stop(StopReason::Unsupported { what: "this control-register access", rip });
        }
        CrAccess::Clts | CrAccess::Lmsw => {
            return Action::Stop(StopReason::Unsupported { what: "CLTS/LMSW on a masked CR0 bit", rip });
        }
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};

    fn mov_to(cr: u64, value: u64) -> (Action, FakeVcpu) {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.write(Field::Cr0ReadShadow, 0x8000_0031);
        v.regs.rbx = value;
        let exit = ExitInfo {
            reason: reason::CR_ACCESS,
            qualification: cr | (3 << 8),
            instruction_len: 3,
            ..Default::default()
        };
        let a = run(&mut g, &mut v, exit);
        (a, v)
    }

    #[test]
    fn cr4_writes_keep_vmxe_and_hide_it() {
        let (a, v) = mov_to(4, 0x20 | (1 << 18));
        assert_eq!(a, Action::Resume);
        assert_eq!(v.read(Field::Cr4ReadShadow), 0x20 | (1 << 18));
        assert_eq!(v.read(Field::Cr4), 0x20 | (1 << 18) | CR4_VMXE);
        assert_eq!(v.read(Field::Rip), 0x10_0003);
    }

    #[test]
    fn cr4_vmxe_and_unknown_bits_fault() {
        assert_eq!(mov_to(4, CR4_VMXE).1.injected(), Some((13, Some(0))));
        assert_eq!(mov_to(4, 1 << 40).1.injected(), Some((13, Some(0))));
    }

    #[test]
    fn cr0_keeps_ne_set_in_hardware() {
        let (a, v) = mov_to(0, 0x8000_0011);
        assert_eq!(a, Action::Resume);
        assert_eq!(v.read(Field::Cr0ReadShadow), 0x8000_0011);
        assert_eq!(v.read(Field::Cr0), 0x8000_0031);
        assert_eq!(mov_to(0, 0x8000_0000).1.injected(), Some((13, Some(0))));
        assert!(matches!(mov_to(0, 0x31).0, Action::Stop(StopReason::Unsupported { .. })));
    }

    #[test]
    fn qualification_decodes() {
        assert_eq!(CrAccess::from_qualification(0x304), CrAccess::MovTo { cr: 4, gpr: 3 });
        assert_eq!(CrAccess::from_qualification(0x413), CrAccess::MovFrom { cr: 3, gpr: 4 });
        assert_eq!(CrAccess::from_qualification(0x20), CrAccess::Clts);
    }
}
