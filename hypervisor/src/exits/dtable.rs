//! Descriptor-table instructions, which exit once integrity is locked
//! (descriptor-table exiting): LGDT/LIDT are refused after the lock as
//! violations; SGDT/SIDT/SLDT/STR and LLDT/LTR are emulated.

use super::{integrity, Action, ExitContext, StopReason};
use crate::guest::access::AccessError;
use crate::vcpu::{inject_exception, skip_instruction, Field, VECTOR_GP};

/// The instruction-information field of exits 46 and 47 (SDM Tables 28-10, 28-11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub scale: u8,
    pub address_size: u8,
    pub register_operand: bool,
    pub register: u8,
    pub segment: u8,
    pub index: Option<u8>,
    pub base: Option<u8>,
    pub identity: u8,
}

impl Operand {
    pub const fn decode(info: u64) -> Self {
        Operand {
            scale: (info & 3) as u8,
            register: ((info >> 3) & 0xf) as u8,
            address_size: ((info >> 7) & 7) as u8,
            register_operand: info & (1 << 10) != 0,
            segment: ((info >> 15) & 7) as u8,
            index: if info & (1 << 22) == 0 { Some(((info >> 18) & 0xf) as u8) } else { None },
            base: if info & (1 << 27) == 0 { Some(((info >> 23) & 0xf) as u8) } else { None },
            identity: ((info >> 28) & 3) as u8,
        }
    }
}

/// The linear address of a memory operand: base + index * scale + displacement
/// (64-bit code: segment bases are zero except FS and GS).
fn linear(ctx: &mut ExitContext<'_>, op: &Operand) -> u64 {
    let rsp = ctx.vcpu.read(Field::Rsp);
    let regs = *ctx.vcpu.regs();
    let mut addr = ctx.exit.qualification;
    if let Some(b) = op.base {
        addr = addr.wrapping_add(regs.get(b, rsp));
    }
    if let Some(i) = op.index {
        addr = addr.wrapping_add(regs.get(i, rsp) << op.scale);
    }
    match op.segment {
        4 => addr = addr.wrapping_add(ctx.vcpu.read(Field::FsBase)),
        5 => addr = addr.wrapping_add(ctx.vcpu.read(Field::GsBase)),
        _ => {}
    }
    match op.address_size {
        0 => addr & 0xffff,
        1 => addr & 0xffff_ffff,
        _ => addr,
    }
}

/// What Linux's UMIP emulation gives user space for SGDT and SIDT: a limit
/// of 0 and these bases (arch/x86/kernel/umip.c); SLDT and STR give 0.
pub const UMIP_DUMMY_GDT_BASE: u64 = 0xffff_ffff_fffe_0000;
pub const UMIP_DUMMY_IDT_BASE: u64 = 0xffff_ffff_ffff_0000;

fn general_protection(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

/// An operand the principal may not access: the fault the processor would
/// raise, or, for a page its view may not write, a reported refusal and
/// the instruction skipped with nothing written.
fn access_failed(ctx: &mut ExitContext<'_>, e: AccessError) -> Action {
    if e.deliver(ctx.vcpu) {
        return Action::Resume;
    }
    match e {
        AccessError::Refused { address, gpa, kind } => integrity::refused_access(ctx, address, gpa, kind),
        _ => Action::Stop(StopReason::Unsupported {
            what: "a descriptor-table operand in this paging mode",
            rip: ctx.vcpu.read(Field::Rip),
        }),
    }
}

/// The descriptor-table instructions, which exit once integrity is locked.
/// They run as their principal would run them: the operand is read or
/// written through the guest-access service, checked against the guest's
/// page tables and the view. User space gets what UMIP would give it, never
/// the real tables' addresses, and never a write where it could not write
/// itself.
pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let op = Operand::decode(ctx.exit.instruction_info);
    let user = ctx.principal().cpl != 0;
    let gdt = ctx.exit.reason == super::reason::DESCRIPTOR_TABLE;
    if gdt {
        let (base_field, limit_field, dummy) = match op.identity & 1 {
            0 => (Field::GdtrBase, Field::GdtrLimit, UMIP_DUMMY_GDT_BASE),
            _ => (Field::IdtrBase, Field::IdtrLimit, UMIP_DUMMY_IDT_BASE),
        };
        let at = linear(ctx, &op);
        if op.identity < 2 {
            // SGDT/SIDT: limit, then the 64-bit base.
            let (limit, base) =
                if user { (0, dummy) } else { (ctx.vcpu.read(limit_field) as u16, ctx.vcpu.read(base_field)) };
            let mut bytes = [0u8; 10];
            bytes[..2].copy_from_slice(&limit.to_le_bytes());
            bytes[2..].copy_from_slice(&base.to_le_bytes());
            if let Err(e) = ctx.access().write(at, &bytes) {
                return access_failed(ctx, e);
            }
        } else {
            // LGDT/LIDT are privileged.
            if user {
                return general_protection(ctx);
            }
            let mut bytes = [0u8; 10];
            if let Err(e) = ctx.access().read(at, &mut bytes) {
                return access_failed(ctx, e);
            }
            let limit = u64::from(u16::from_le_bytes([bytes[0], bytes[1]]));
            let base = u64::from_le_bytes(bytes[2..].try_into().unwrap_or([0; 8]));
            if integrity::descriptor_table_load(ctx, base) {
                skip_instruction(ctx.vcpu, ctx.exit);
                return Action::Resume;
            }
            ctx.vcpu.write(base_field, base);
            ctx.vcpu.write(limit_field, limit);
        }
    } else {
        match op.identity {
            // SLDT/STR: the selector to a register or memory.
            0 | 1 => {
                let field = if op.identity == 0 { Field::LdtrSelector } else { Field::TrSelector };
                let selector = if user { 0 } else { ctx.vcpu.read(field) };
                if op.register_operand {
                    let rsp = ctx.vcpu.read(Field::Rsp);
                    let old = ctx.vcpu.regs().get(op.register, rsp);
                    let value = (old & !0xffff) | selector;
                    if ctx.vcpu.regs().set(op.register, value).is_none() {
                        ctx.vcpu.write(Field::Rsp, value);
                    }
                } else {
                    let at = linear(ctx, &op);
                    if let Err(e) = ctx.access().write(at, &(selector as u16).to_le_bytes()) {
                        return access_failed(ctx, e);
                    }
                }
            }
            // LLDT/LTR are privileged.
            _ if user => return general_protection(ctx),
            // LLDT/LTR load descriptors from the GDT; CTVM does not emulate
            // them (the kernel runs them before the lock, when they do not exit).
            _ => {
                let rip = ctx.vcpu.read(Field::Rip);
                return Action::Stop(StopReason::Unsupported { what: "LLDT/LTR after the integrity lock", rip });
            }
        }
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_information_decodes() {
        // LIDT [rax + rbx*4 + disp]: scale 2, 64-bit addresses, DS, index RBX, base RAX, identity 3.
        // (base register 0 = RAX in bits 26:23)
        let info = 2 | (2 << 7) | (3 << 15) | (3 << 18) | (3 << 28);
        let op = Operand::decode(info);
        assert_eq!(
            op,
            Operand {
                scale: 2,
                address_size: 2,
                register_operand: false,
                register: 0,
                segment: 3,
                index: Some(3),
                base: Some(0),
                identity: 3
            }
        );
        let no_index = Operand::decode((1 << 22) | (1 << 27));
        assert_eq!((no_index.index, no_index.base), (None, None));
    }
}
