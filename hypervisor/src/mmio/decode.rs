//! Decoding the instruction that touched an emulated MMIO window, with
//! `iced-x86`, into the few forms that drivers use on device registers.
//!
//! Supported: MOV to and from memory at 8/16/32/64 bits (88, 89, 8A, 8B),
//! MOV of an immediate to memory (C6, C7, including REX.W C7 with its
//! sign-extended imm32), MOV with a memory offset (A0..A3), MOVZX (0F B6/B7),
//! MOVSX (0F BE/BF) and MOVSXD (63), with any prefixes the processor accepts
//! on them (REX, 66h, 67h, segment overrides), any ModRM/SIB form and
//! RIP-relative addressing. AH, CH, DH and BH are supported.
//!
//! Everything else is refused with the instruction's text, never skipped:
//! string instructions (MOVS, STOS, LODS, ...), read-modify-write
//! instructions (ADD, OR, AND, INC, XCHG, CMPXCHG, ... with or without LOCK),
//! and SSE/AVX moves; EVEX (AVX-512), XOP and 3DNow! encodings are not
//! decoded at all (iced's `no_evex`, `no_xop`, `no_d3now`, for size) and are
//! refused as invalid. XCHG with memory is refused: it is an atomic
//! read-modify-write (implicitly locked) whose two halves would both reach
//! the device, which no driver of a TIS or similar register file does.

use alloc::format;
use alloc::string::String;
use core::fmt::{self, Write};

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, MemorySize, OpKind, Register};

/// A general-purpose register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr {
    /// The full register's encoding (0 = RAX ... 15 = R15).
    pub index: u8,
    /// Width in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// AH, CH, DH or BH: bits 15:8 of register `index` (0..=3).
    pub high_byte: bool,
}

/// How a loaded value widens to the destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Same width (MOV).
    None,
    /// MOVZX.
    Zero,
    /// MOVSX, MOVSXD.
    Sign,
}

/// What a store writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Gpr(Gpr),
    /// Already sign-extended to 64 bits where the encoding does that (REX.W C7).
    Imm(u64),
}

/// An MMIO access, as the instruction performs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Read `size` bytes and write them, extended, to `dst`.
    Load { size: u8, dst: Gpr, extend: Extend },
    /// Write the low `size` bytes of `src`.
    Store { size: u8, src: Source },
}

impl MmioOp {
    /// The access width in bytes.
    pub const fn size(&self) -> u8 {
        match *self {
            MmioOp::Load { size, .. } | MmioOp::Store { size, .. } => size,
        }
    }

    pub const fn is_store(&self) -> bool {
        matches!(self, MmioOp::Store { .. })
    }
}

/// A decoded, emulable instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub op: MmioOp,
    /// Instruction length, to advance RIP.
    pub len: u8,
    /// The decoded instruction, for cross-checks (effective address).
    pub instruction: Instruction,
}

/// Why an instruction cannot be emulated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does (the fetch stopped at
    /// unmapped memory).
    Truncated,
    /// Not a valid instruction in this mode.
    Invalid,
    /// A valid instruction of `len` bytes that is not emulated: its text and why.
    Unsupported { text: String, len: u8, why: &'static str },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("the instruction runs into unmapped memory"),
            DecodeError::Invalid => f.write_str("not a valid instruction"),
            DecodeError::Unsupported { why, .. } => f.write_str(why),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Load(Extend),
    Store,
}

/// The emulable forms: (kind, memory access size).
fn form(code: Code) -> Option<(Kind, u8)> {
    use Code::*;
    const PLAIN: Extend = Extend::None;
    const ZERO: Extend = Extend::Zero;
    const SIGN: Extend = Extend::Sign;
    let load = |e, s| Some((Kind::Load(e), s));
    let store = |s| Some((Kind::Store, s));
    match code {
        Mov_r8_rm8 | Mov_AL_moffs8 => load(PLAIN, 1),
        Mov_r16_rm16 | Mov_AX_moffs16 => load(PLAIN, 2),
        Mov_r32_rm32 | Mov_EAX_moffs32 => load(PLAIN, 4),
        Mov_r64_rm64 | Mov_RAX_moffs64 => load(PLAIN, 8),
        Movzx_r16_rm8 | Movzx_r32_rm8 | Movzx_r64_rm8 => load(ZERO, 1),
        Movzx_r16_rm16 | Movzx_r32_rm16 | Movzx_r64_rm16 => load(ZERO, 2),
        Movsx_r16_rm8 | Movsx_r32_rm8 | Movsx_r64_rm8 => load(SIGN, 1),
        Movsx_r16_rm16 | Movsx_r32_rm16 | Movsx_r64_rm16 | Movsxd_r16_rm16 => load(SIGN, 2),
        Movsxd_r32_rm32 | Movsxd_r64_rm32 => load(SIGN, 4),
        Mov_rm8_r8 | Mov_rm8_imm8 | Mov_moffs8_AL => store(1),
        Mov_rm16_r16 | Mov_rm16_imm16 | Mov_moffs16_AX => store(2),
        Mov_rm32_r32 | Mov_rm32_imm32 | Mov_moffs32_EAX => store(4),
        Mov_rm64_r64 | Mov_rm64_imm32 | Mov_moffs64_RAX => store(8),
        _ => None,
    }
}

/// The size of a scalar memory operand.
fn scalar_size(size: MemorySize) -> Option<u8> {
    match size {
        MemorySize::UInt8 | MemorySize::Int8 => Some(1),
        MemorySize::UInt16 | MemorySize::Int16 => Some(2),
        MemorySize::UInt32 | MemorySize::Int32 => Some(4),
        MemorySize::UInt64 | MemorySize::Int64 => Some(8),
        _ => None,
    }
}

/// A general-purpose register from iced's numbering.
pub fn gpr(reg: Register) -> Option<Gpr> {
    let n = reg as u32;
    let (first, size) = match n {
        _ if (Register::AL as u32..=Register::R15L as u32).contains(&n) => (Register::AL, 1),
        _ if (Register::AX as u32..=Register::R15W as u32).contains(&n) => (Register::AX, 2),
        _ if (Register::EAX as u32..=Register::R15D as u32).contains(&n) => (Register::EAX, 4),
        _ if (Register::RAX as u32..=Register::R15 as u32).contains(&n) => (Register::RAX, 8),
        _ => return None,
    };
    let i = (n - first as u32) as u8;
    // Byte registers: AL CL DL BL, AH CH DH BH, then SPL BPL SIL DIL R8L..R15L.
    let (index, high_byte) = match (size, i) {
        (1, 4..=7) => (i - 4, true),
        (1, 8..) => (i - 4, false),
        _ => (i, false),
    };
    Some(Gpr { index, size, high_byte })
}

/// Decodes the instruction at the start of `bytes` (fetched at `rip`) in a
/// code segment of `bitness` 16, 32 or 64.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Result<Decoded, DecodeError> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => DecodeError::Truncated,
            _ => DecodeError::Invalid,
        });
    }
    let unsupported =
        |why| DecodeError::Unsupported { text: describe(&instruction), len: instruction.len() as u8, why };
    let Some((kind, size)) = form(instruction.code()) else {
        return Err(unsupported(refusal(&instruction)));
    };
    // The memory operand: 0 for stores, 1 for loads.
    let mem_operand = match kind {
        Kind::Store => 0,
        Kind::Load(_) => 1,
    };
    if instruction.op_kind(mem_operand) != OpKind::Memory {
        return Err(unsupported("it does not access memory"));
    }
    if scalar_size(instruction.memory_size()) != Some(size) {
        return Err(unsupported("its memory operand size is inconsistent"));
    }
    let op = match kind {
        Kind::Load(extend) => {
            let dst = gpr(instruction.op0_register())
                .ok_or_else(|| unsupported("its destination is not a general-purpose register"))?;
            MmioOp::Load { size, dst, extend }
        }
        Kind::Store => {
            let src = match instruction.op1_kind() {
                OpKind::Register => Source::Gpr(
                    gpr(instruction.op1_register())
                        .ok_or_else(|| unsupported("its source is not a general-purpose register"))?,
                ),
                _ => Source::Imm(
                    instruction
                        .try_immediate(1)
                        .map_err(|_| unsupported("its source is not a register or an immediate"))?,
                ),
            };
            MmioOp::Store { size, src }
        }
    };
    Ok(Decoded { op, len: instruction.len() as u8, instruction })
}

/// Why a valid instruction is refused, by family.
fn refusal(instruction: &Instruction) -> &'static str {
    let ops = 0..instruction.op_count();
    if ops.clone().any(|i| {
        matches!(
            instruction.op_kind(i),
            OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    }) {
        "string instructions are not emulated on MMIO"
    } else if instruction.has_lock_prefix() {
        "LOCK-prefixed read-modify-write is not emulated on MMIO"
    } else if matches!(instruction.mnemonic(), iced_x86::Mnemonic::Xchg) {
        "XCHG with memory is an atomic read-modify-write, not emulated on MMIO"
    } else if ops
        .clone()
        .any(|i| instruction.op_kind(i) == OpKind::Register && gpr(instruction.op_register(i)).is_none())
    {
        "only general-purpose registers are emulated on MMIO"
    } else {
        "only MOV, MOVZX and MOVSX are emulated on MMIO"
    }
}

/// The instruction in Intel syntax, as far as an error report needs it
/// (lowercase mnemonic, registers, sized memory operand, immediates).
pub fn describe(instruction: &Instruction) -> String {
    let mut s = String::new();
    if instruction.has_lock_prefix() {
        s.push_str("lock ");
    }
    if instruction.has_rep_prefix() {
        s.push_str("rep ");
    } else if instruction.has_repne_prefix() {
        s.push_str("repne ");
    }
    let _ = write!(s, "{:?}", instruction.mnemonic());
    s.make_ascii_lowercase();
    for i in 0..instruction.op_count() {
        s.push_str(if i == 0 { " " } else { ", " });
        let reg_name = |r: Register| format!("{r:?}").to_ascii_lowercase();
        match instruction.op_kind(i) {
            OpKind::Register => s.push_str(&reg_name(instruction.op_register(i))),
            OpKind::Memory => {
                let size = match scalar_size(instruction.memory_size()) {
                    Some(1) => "byte ",
                    Some(2) => "word ",
                    Some(4) => "dword ",
                    Some(8) => "qword ",
                    _ => "",
                };
                s.push_str(size);
                if instruction.segment_prefix() != Register::None {
                    let _ = write!(s, "{}:", reg_name(instruction.segment_prefix()));
                }
                s.push('[');
                let base = instruction.memory_base();
                let disp = instruction.memory_displacement64();
                if base == Register::RIP || base == Register::EIP {
                    let _ = write!(s, "{disp:#x}");
                } else {
                    let mut parts = 0;
                    if base != Register::None {
                        s.push_str(&reg_name(base));
                        parts += 1;
                    }
                    if instruction.memory_index() != Register::None {
                        if parts > 0 {
                            s.push('+');
                        }
                        s.push_str(&reg_name(instruction.memory_index()));
                        let scale = instruction.memory_index_scale();
                        if scale > 1 {
                            let _ = write!(s, "*{scale}");
                        }
                        parts += 1;
                    }
                    let signed = disp as i64;
                    if parts == 0 {
                        let _ = write!(s, "{disp:#x}");
                    } else if signed < 0 && instruction.memory_displ_size() != 0 {
                        let _ = write!(s, "-{:#x}", signed.unsigned_abs());
                    } else if disp != 0 {
                        let _ = write!(s, "+{disp:#x}");
                    }
                }
                s.push(']');
            }
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI => s.push_str("[rsi]"),
            OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI => s.push_str("[rdi]"),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                let _ = write!(s, "{:#x}", instruction.near_branch_target());
            }
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {
                let _ = write!(s, "{:#x}", instruction.try_immediate(i).unwrap_or(0));
            }
            _ => s.push('?'),
        }
    }
    s
}

/// The length of any valid 64-bit instruction at the start of `bytes` (to
/// skip one the hypervisor refused), or `None` if it does not decode.
pub fn instruction_length(bytes: &[u8]) -> Option<u8> {
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    let instruction = decoder.decode();
    (!instruction.is_invalid()).then(|| instruction.len() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn r(index: u8, size: u8) -> Gpr {
        Gpr { index, size, high_byte: false }
    }
    /// AH, CH, DH, BH.
    const fn h(index: u8) -> Gpr {
        Gpr { index, size: 1, high_byte: true }
    }
    const fn ld(size: u8, dst: Gpr, extend: Extend) -> MmioOp {
        MmioOp::Load { size, dst, extend }
    }
    const fn st(size: u8, src: Gpr) -> MmioOp {
        MmioOp::Store { size, src: Source::Gpr(src) }
    }
    const fn imm(size: u8, value: u64) -> MmioOp {
        MmioOp::Store { size, src: Source::Imm(value) }
    }
    const SAME: Extend = Extend::None;
    const SIGN: Extend = Extend::Sign;
    const ZERO: Extend = Extend::Zero;

    const RAX: u8 = 0;
    const RCX: u8 = 1;
    const RDX: u8 = 2;
    const RBX: u8 = 3;
    const RSP: u8 = 4;
    const RSI: u8 = 6;

    /// Every supported form, as GNU as encodes it (bytes checked with
    /// `as --64` and `objdump -d -M intel`).
    const SUPPORTED: &[(&str, &[u8], MmioOp)] = &[
        ("mov al, [rax]", &[0x8a, 0x00], ld(1, r(RAX, 1), SAME)),
        ("mov ax, [rbx]", &[0x66, 0x8b, 0x03], ld(2, r(RAX, 2), SAME)),
        ("mov eax, [rcx]", &[0x8b, 0x01], ld(4, r(RAX, 4), SAME)),
        ("mov rax, [rdx]", &[0x48, 0x8b, 0x02], ld(8, r(RAX, 8), SAME)),
        ("mov r9b, [rsi]", &[0x44, 0x8a, 0x0e], ld(1, r(9, 1), SAME)),
        ("mov r15w, [rdi+0x10]", &[0x66, 0x44, 0x8b, 0x7f, 0x10], ld(2, r(15, 2), SAME)),
        ("mov r8d, [rax+rbx*4+0x24]", &[0x44, 0x8b, 0x44, 0x98, 0x24], ld(4, r(8, 4), SAME)),
        ("mov r12, [r13+0]", &[0x4d, 0x8b, 0x65, 0x00], ld(8, r(12, 8), SAME)),
        ("mov ah, [rax]", &[0x8a, 0x20], ld(1, h(RAX), SAME)),
        ("mov bh, [rdx]", &[0x8a, 0x3a], ld(1, h(RBX), SAME)),
        ("mov sil, [rax]", &[0x40, 0x8a, 0x30], ld(1, r(RSI, 1), SAME)),
        ("movzx eax, byte [rdi+0x24]", &[0x0f, 0xb6, 0x47, 0x24], ld(1, r(RAX, 4), ZERO)),
        ("movzx eax, word [rdi]", &[0x0f, 0xb7, 0x07], ld(2, r(RAX, 4), ZERO)),
        ("movzx r10, byte [rax]", &[0x4c, 0x0f, 0xb6, 0x10], ld(1, r(10, 8), ZERO)),
        ("movzx cx, byte [rax]", &[0x66, 0x0f, 0xb6, 0x08], ld(1, r(RCX, 2), ZERO)),
        ("movsx eax, byte [rax]", &[0x0f, 0xbe, 0x00], ld(1, r(RAX, 4), SIGN)),
        ("movsx rdx, word [rax]", &[0x48, 0x0f, 0xbf, 0x10], ld(2, r(RDX, 8), SIGN)),
        ("movsx r11w, byte [rax]", &[0x66, 0x44, 0x0f, 0xbe, 0x18], ld(1, r(11, 2), SIGN)),
        ("movsxd rax, dword [rbx]", &[0x48, 0x63, 0x03], ld(4, r(RAX, 8), SIGN)),
        ("mov al, [moffs64]", &[0xa0, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], ld(1, r(RAX, 1), SAME)),
        ("mov ax, [moffs64]", &[0x66, 0xa1, 0x18, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], ld(2, r(RAX, 2), SAME)),
        ("mov eax, [moffs64]", &[0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0], ld(4, r(RAX, 4), SAME)),
        ("mov rax, [moffs64]", &[0x48, 0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0], ld(8, r(RAX, 8), SAME)),
        ("mov eax, [ecx] (67h)", &[0x67, 0x8b, 0x01], ld(4, r(RAX, 4), SAME)),
        ("mov eax, [rip+0x100]", &[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], ld(4, r(RAX, 4), SAME)),
        ("mov ecx, fs:[rax]", &[0x64, 0x8b, 0x08], ld(4, r(RCX, 4), SAME)),
        ("mov esp, [rax]", &[0x8b, 0x20], ld(4, r(RSP, 4), SAME)),
        ("mov [rax], cl", &[0x88, 0x08], st(1, r(RCX, 1))),
        ("mov [rax], cx", &[0x66, 0x89, 0x08], st(2, r(RCX, 2))),
        ("mov [rax], ecx", &[0x89, 0x08], st(4, r(RCX, 4))),
        ("mov [rax], rcx", &[0x48, 0x89, 0x08], st(8, r(RCX, 8))),
        ("mov [rax], r14b", &[0x44, 0x88, 0x30], st(1, r(14, 1))),
        ("mov [rax], ah", &[0x88, 0x20], st(1, h(RAX))),
        ("mov byte [rax+0x24], 0x40", &[0xc6, 0x40, 0x24, 0x40], imm(1, 0x40)),
        ("mov word [rax], 0x1234", &[0x66, 0xc7, 0x00, 0x34, 0x12], imm(2, 0x1234)),
        ("mov dword [rax], 0x87654321", &[0xc7, 0x00, 0x21, 0x43, 0x65, 0x87], imm(4, 0x8765_4321)),
        ("mov qword [rax], -2", &[0x48, 0xc7, 0x00, 0xfe, 0xff, 0xff, 0xff], imm(8, 0xffff_ffff_ffff_fffe)),
        ("mov [moffs64], al", &[0xa2, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], st(1, r(RAX, 1))),
        ("mov [moffs64], ax", &[0x66, 0xa3, 0x18, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], st(2, r(RAX, 2))),
        ("mov [moffs64], eax", &[0xa3, 0x24, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], st(4, r(RAX, 4))),
        ("mov [moffs64], rax", &[0x48, 0xa3, 0x80, 0x00, 0xd4, 0xfe, 0, 0, 0, 0], st(8, r(RAX, 8))),
        ("mov [r8+r9*8+0x18], r10d", &[0x47, 0x89, 0x54, 0xc8, 0x18], st(4, r(10, 4))),
        ("mov dword [rip+0x20], 0x20", &[0xc7, 0x05, 0x20, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00], imm(4, 0x20)),
    ];

    #[test]
    fn every_supported_form_decodes() {
        for &(name, bytes, op) in SUPPORTED {
            // Trailing bytes (the next instruction) must not matter.
            let mut buf = bytes.to_vec();
            buf.extend_from_slice(&[0x90; 6]);
            let d = decode(&buf, 64, 0x1000).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(d.op, op, "{name}");
            assert_eq!(usize::from(d.len), bytes.len(), "{name}");
            // And with exactly its own bytes.
            assert_eq!(decode(bytes, 64, 0x1000).map(|d| d.op), Ok(op), "{name}");
        }
    }

    #[test]
    fn rip_relative_and_moffs_addresses() {
        let d = decode(&[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], 64, 0x1000).unwrap();
        assert!(d.instruction.is_ip_rel_memory_operand());
        assert_eq!(d.instruction.ip_rel_memory_address(), 0x1106);
        let d = decode(&[0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0], 64, 0).unwrap();
        assert_eq!(d.instruction.memory_displacement64(), 0xfed4_0f00);
    }

    #[test]
    fn registers_map_to_their_encoding() {
        let cases = [
            (Register::AL, r(0, 1)),
            (Register::BH, h(3)),
            (Register::SPL, r(4, 1)),
            (Register::DIL, r(7, 1)),
            (Register::R8L, r(8, 1)),
            (Register::R15L, r(15, 1)),
            (Register::SP, r(4, 2)),
            (Register::R12W, r(12, 2)),
            (Register::EDI, r(7, 4)),
            (Register::R13D, r(13, 4)),
            (Register::RSI, r(6, 8)),
            (Register::R15, r(15, 8)),
        ];
        for (reg, g) in cases {
            assert_eq!(gpr(reg), Some(g), "{reg:?}");
        }
        assert_eq!(gpr(Register::RIP), None);
        assert_eq!(gpr(Register::XMM0), None);
        assert_eq!(gpr(Register::FS), None);
    }

    /// Refused instructions, with the text and the reason given.
    const REFUSED: &[(&[u8], &str, &str)] = &[
        (&[0xa4], "movsb [rdi], [rsi]", "string"),
        (&[0xf3, 0xa5], "rep movsd [rdi], [rsi]", "string"),
        (&[0xaa], "stosb [rdi], al", "string"),
        (&[0xac], "lodsb al, [rsi]", "string"),
        (&[0xf0, 0x83, 0x00, 0x01], "lock add dword [rax], 0x1", "LOCK"),
        (&[0xf0, 0x80, 0x08, 0x01], "lock or byte [rax], 0x1", "LOCK"),
        (&[0x01, 0x08], "add dword [rax], ecx", "only MOV"),
        (&[0x87, 0x08], "xchg dword [rax], ecx", "XCHG"),
        (&[0xc5, 0xfe, 0x6f, 0x00], "vmovdqu ymm0, [rax]", "general-purpose"),
        (&[0xf3, 0x0f, 0x6f, 0x00], "movdqu xmm0, [rax]", "general-purpose"),
        (&[0x89, 0xc8], "mov eax, ecx", "does not access memory"),
        (&[0xf6, 0x00, 0x01], "test byte [rax], 0x1", "only MOV"),
        (&[0x0f, 0xc3, 0x00], "movnti dword [rax], eax", "only MOV"),
        (&[0x0f, 0x0b], "ud2", "only MOV"),
        (&[0xff, 0x40, 0xf0], "inc dword [rax-0x10]", "only MOV"),
    ];

    #[test]
    fn refused_instructions_name_themselves() {
        for &(bytes, text, why) in REFUSED {
            match decode(bytes, 64, 0) {
                Err(DecodeError::Unsupported { text: t, why: w, .. }) => {
                    assert_eq!(t, text);
                    assert!(w.contains(why), "{text}: {w}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_and_truncated_bytes() {
        // LOCK on MOV is #UD; 06 (push es) does not exist in 64-bit mode.
        assert_eq!(decode(&[0xf0, 0x8b, 0x00], 64, 0), Err(DecodeError::Invalid));
        assert_eq!(decode(&[0x06, 0x90, 0x90], 64, 0), Err(DecodeError::Invalid));
        // 15 prefixes and an opcode: longer than any instruction may be.
        let mut long = [0x66u8; 16];
        long[15] = 0x90;
        assert_eq!(decode(&long, 64, 0), Err(DecodeError::Invalid));
        for bytes in [&[][..], &[0x8b], &[0x48, 0x8b], &[0xc7, 0x00, 0x21], &[0xa1, 0, 0, 0]] {
            assert_eq!(decode(bytes, 64, 0), Err(DecodeError::Truncated), "{bytes:x?}");
        }
    }

    #[test]
    fn other_code_sizes_decode_too() {
        // 8B 01 is mov eax, [ecx] in 32-bit code and mov ax, [bx+di] in 16-bit code.
        assert_eq!(decode(&[0x8b, 0x01], 32, 0).unwrap().op, ld(4, r(RAX, 4), SAME));
        assert_eq!(decode(&[0x8b, 0x01], 16, 0).unwrap().op, ld(2, r(RAX, 2), SAME));
        // 48 is DEC EAX outside 64-bit mode, not REX.W.
        assert!(matches!(
            decode(&[0x48, 0x8b, 0x02], 32, 0),
            Err(DecodeError::Unsupported { text, .. }) if text == "dec eax"
        ));
    }
}
