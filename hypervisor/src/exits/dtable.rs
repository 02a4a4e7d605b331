//! Descriptor-table instructions, which exit once integrity is locked
//! (descriptor-table exiting): LGDT/LIDT are refused after the lock as
//! violations; SGDT/SIDT/SLDT/STR and LLDT/LTR are emulated.

use super::{integrity, Action, ExitContext, StopReason};
use crate::guest::virt;
use crate::mmio::walk::Paging;
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

fn fault(ctx: &mut ExitContext<'_>) -> Action {
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let op = Operand::decode(ctx.exit.instruction_info);
    let paging = Paging::from_vcpu(ctx.vcpu);
    let gdt = ctx.exit.reason == super::reason::DESCRIPTOR_TABLE;
    if gdt {
        let (base_field, limit_field) = match op.identity & 1 {
            0 => (Field::GdtrBase, Field::GdtrLimit),
            _ => (Field::IdtrBase, Field::IdtrLimit),
        };
        let at = linear(ctx, &op);
        if op.identity < 2 {
            // SGDT/SIDT: limit, then the 64-bit base.
            let mut bytes = [0u8; 10];
            bytes[..2].copy_from_slice(&(ctx.vcpu.read(limit_field) as u16).to_le_bytes());
            bytes[2..].copy_from_slice(&ctx.vcpu.read(base_field).to_le_bytes());
            if virt::write(&ctx.guest.memory, &ctx.phys, &paging, at, &bytes).is_err() {
                return fault(ctx);
            }
        } else {
            let mut bytes = [0u8; 10];
            if virt::read(&ctx.guest.memory, &ctx.phys, &paging, at, &mut bytes).is_err() {
                return fault(ctx);
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
                let selector = ctx.vcpu.read(field);
                if op.register_operand {
                    let rsp = ctx.vcpu.read(Field::Rsp);
                    let old = ctx.vcpu.regs().get(op.register, rsp);
                    let value = (old & !0xffff) | selector;
                    if ctx.vcpu.regs().set(op.register, value).is_none() {
                        ctx.vcpu.write(Field::Rsp, value);
                    }
                } else {
                    let at = linear(ctx, &op);
                    if virt::write(&ctx.guest.memory, &ctx.phys, &paging, at, &(selector as u16).to_le_bytes()).is_err()
                    {
                        return fault(ctx);
                    }
                }
            }
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
