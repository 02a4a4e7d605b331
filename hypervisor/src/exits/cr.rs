//! Control-register accesses. The guest/host masks make writes to CR0.NE,
//! CR0.PE/PG and CR4.VMXE exit; the guest sees its own values through the
//! read shadows while the real registers keep what VMX requires. With
//! unrestricted guests, CR0.PE and CR0.PG may change (a vCPU started by a
//! start-up IPI goes from real mode to long mode): entering or leaving
//! paging with EFER.LME set moves EFER.LMA and the IA-32e mode entry
//! control with it, as the processor would.

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
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const ENTRY_IA32E_MODE: u64 = 1 << 9;
const CS_LONG: u64 = 1 << 13;

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

/// MOV to CR0 (and LMSW): checked as the processor would, then the read
/// shadow takes the guest's value and CR0 the value with VMX's fixed bits.
fn write_cr0(ctx: &mut ExitContext<'_>, value: u64) -> Action {
    let rip = ctx.vcpu.read(Field::Rip);
    let limits = ctx.guest.cr_limits;
    let old = ctx.vcpu.read(Field::Cr0ReadShadow);
    if value >> 32 != 0 || (value & CR0_PG != 0 && value & CR0_PE == 0) {
        return gp(ctx);
    }
    if (value ^ old) & (CR0_PG | CR0_PE) != 0 {
        if !limits.unrestricted {
            // Without unrestricted guests the processor needs PE and PG.
            return Action::Stop(StopReason::Unsupported { what: "switching CR0.PE/PG", rip });
        }
        let efer = ctx.vcpu.read(Field::Efer);
        let entry = ctx.vcpu.read(Field::EntryControls);
        if value & CR0_PG != 0 && old & CR0_PG == 0 && efer & EFER_LME != 0 {
            // Paging on with LME: IA-32e mode, which needs PAE.
            if ctx.vcpu.read(Field::Cr4) & CR4_PAE == 0 {
                return gp(ctx);
            }
            ctx.vcpu.write(Field::Efer, efer | EFER_LMA);
            ctx.vcpu.write(Field::EntryControls, entry | ENTRY_IA32E_MODE);
        } else if value & CR0_PG == 0 && old & CR0_PG != 0 && efer & EFER_LMA != 0 {
            // Paging off leaves IA-32e mode, from compatibility mode only.
            if ctx.vcpu.read(Field::CsAccessRights) & CS_LONG != 0 {
                return gp(ctx);
            }
            ctx.vcpu.write(Field::Efer, efer & !EFER_LMA);
            ctx.vcpu.write(Field::EntryControls, entry & !ENTRY_IA32E_MODE);
        }
    }
    let mut must_be_1 = limits.cr0_fixed0;
    if limits.unrestricted {
        must_be_1 &= !(CR0_PE | CR0_PG);
    }
    // Once integrity is locked, clearing CR0.WP is refused.
    if super::integrity::control_register_write(ctx, old, value, super::integrity::CR0_WP) {
        skip_instruction(ctx.vcpu, ctx.exit);
        return Action::Resume;
    }
    ctx.vcpu.write(Field::Cr0ReadShadow, value);
    ctx.vcpu.write(Field::Cr0, (value | must_be_1) & limits.cr0_fixed1);
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let rip = ctx.vcpu.read(Field::Rip);
    let limits = ctx.guest.cr_limits;
    match CrAccess::from_qualification(ctx.exit.qualification) {
        CrAccess::MovTo { cr: 0, gpr } => {
            let value = read_gpr(ctx, gpr);
            return write_cr0(ctx, value);
        }
        CrAccess::MovTo { cr: 4, gpr } => {
            let value = read_gpr(ctx, gpr);
            // VMX is hidden; bits the processor lacks fault as they would on hardware.
            if value & CR4_VMXE != 0 || value & !limits.cr4_fixed1 != 0 {
                return gp(ctx);
            }
            let old = ctx.vcpu.read(Field::Cr4ReadShadow);
            let guarded = super::integrity::CR4_SMEP | super::integrity::CR4_SMAP;
            if super::integrity::control_register_write(ctx, old, value, guarded) {
                skip_instruction(ctx.vcpu, ctx.exit);
                return Action::Resume;
            }
            ctx.vcpu.write(Field::Cr4ReadShadow, value);
            ctx.vcpu.write(Field::Cr4, (value | limits.cr4_fixed0) & limits.cr4_fixed1);
        }
        // CR3-load/store exiting is forced on by some processors; a
        // module's view makes the loads exit too, and they are refused.
        CrAccess::MovTo { cr: 3, gpr } => {
            let value = read_gpr(ctx, gpr);
            if !super::integrity::cr3_load(ctx, value) {
                ctx.vcpu.write(Field::Cr3, value & !(1 << 63));
            }
        }
        CrAccess::MovFrom { cr: 3, gpr } => {
            let value = ctx.vcpu.read(Field::Cr3);
            write_gpr(ctx, gpr, value);
        }
        CrAccess::MovTo { .. } | CrAccess::MovFrom { .. } => {
            return Action::Stop(StopReason::Unsupported { what: "this control-register access", rip });
        }
        // LMSW loads CR0's low four bits, and can set PE but not clear it.
        CrAccess::Lmsw => {
            let source = (ctx.exit.qualification >> 16) & 0xf;
            let old = ctx.vcpu.read(Field::Cr0ReadShadow);
            return write_cr0(ctx, (old & !0xe) | source | (old & CR0_PE));
        }
        CrAccess::Clts => {
            return Action::Stop(StopReason::Unsupported { what: "CLTS on a masked CR0 bit", rip });
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
    }

    /// Runs one CR access on a guest whose processor has (or lacks)
    /// unrestricted guests, from the given CR0 shadow, EFER and CR4.
    fn cr_access(
        unrestricted: bool,
        shadow: u64,
        efer: u64,
        cr4: u64,
        qualification: u64,
        rbx: u64,
    ) -> (Action, FakeVcpu) {
        let mut g = test_guest();
        g.cr_limits.unrestricted = unrestricted;
        let mut v = FakeVcpu::new();
        v.write(Field::Cr0ReadShadow, shadow);
        v.write(Field::Efer, efer);
        v.write(Field::Cr4, cr4);
        v.regs.rbx = rbx;
        let exit = ExitInfo { reason: reason::CR_ACCESS, qualification, instruction_len: 3, ..Default::default() };
        let a = run(&mut g, &mut v, exit);
        (a, v)
    }

    #[test]
    fn a_started_vcpu_goes_from_real_mode_to_long_mode() {
        // Without unrestricted guests, PE and PG stay.
        assert!(matches!(
            cr_access(false, 0x8000_0031, 0, 0, 3 << 8, 0x31).0,
            Action::Stop(StopReason::Unsupported { .. })
        ));
        // Real mode (INIT's CR0) to protected mode.
        let (a, v) = cr_access(true, 0x6000_0010, 0, 0, 3 << 8, 0x11);
        assert_eq!((a, v.read(Field::Cr0ReadShadow), v.read(Field::Cr0)), (Action::Resume, 0x11, 0x31));
        // LMSW sets PE too, and cannot clear it.
        let (_, v) = cr_access(true, 0x6000_0010, 0, 0, (3 << 4) | (0x1 << 16), 0);
        assert_eq!(v.read(Field::Cr0ReadShadow), 0x6000_0011);
        let (_, v) = cr_access(true, 0x11, 0, 0, 3 << 4, 0);
        assert_eq!(v.read(Field::Cr0ReadShadow), 0x11);
        // Paging with LME: LMA and the IA-32e mode entry control follow.
        let (_, v) = cr_access(true, 0x11, EFER_LME, CR4_PAE, 3 << 8, 0x8005_0033);
        assert_eq!(v.read(Field::Efer), EFER_LME | EFER_LMA);
        assert_eq!(v.read(Field::EntryControls) & ENTRY_IA32E_MODE, ENTRY_IA32E_MODE);
        assert_eq!(v.read(Field::Cr0), 0x8005_0033);
        // ... but not without PAE.
        assert_eq!(cr_access(true, 0x11, EFER_LME, 0, 3 << 8, 0x8000_0011).1.injected(), Some((13, Some(0))));
        // Paging off from compatibility mode leaves IA-32e mode.
        let (_, v) = cr_access(true, 0x8000_0011, EFER_LME | EFER_LMA, CR4_PAE, 3 << 8, 0x11);
        assert_eq!(v.read(Field::Efer), EFER_LME);
        // Without LME, paging stays 32-bit.
        let (_, v) = cr_access(true, 0x11, 0, 0, 3 << 8, 0x8000_0011);
        assert_eq!((v.read(Field::Efer), v.read(Field::EntryControls)), (0, 0));
    }

    #[test]
    fn qualification_decodes() {
        assert_eq!(CrAccess::from_qualification(0x304), CrAccess::MovTo { cr: 4, gpr: 3 });
        assert_eq!(CrAccess::from_qualification(0x413), CrAccess::MovFrom { cr: 3, gpr: 4 });
        assert_eq!(CrAccess::from_qualification(0x20), CrAccess::Clts);
    }
}
