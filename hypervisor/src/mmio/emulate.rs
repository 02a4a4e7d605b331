//! The emulation step for one trapped access: fetch the instruction at RIP
//! through the guest's page tables, decode it, check it against what the
//! processor reported, perform it on the device, write the destination
//! register, advance RIP.
//!
//! Only 64-bit code is emulated: there CS's base is 0, so RIP is the
//! linear address of the instruction. Anything that cannot be emulated
//! exactly returns an [`MmioError`] and leaves the guest's state untouched
//! (the device has not been accessed either); the caller stops the guest.

use alloc::string::String;
use core::fmt;

use iced_x86::{OpKind, Register};

use super::decode::{self, gpr, DecodeError, Extend, Gpr, MmioOp, Source};
use super::walk::{self, Paging, WalkError, MAX_INSTRUCTION_LEN};
use super::MmioDevice;
use crate::arch::x86_64::vmx::ept::{Access, ViolationInfo};
use crate::guest::memory::{GuestMemory, HostPhys};
use crate::vcpu::{skip_instruction, ExitInfo, Field, VcpuState};

const EFER_LMA: u64 = 1 << 10;
const CS_LONG: u64 = 1 << 13;
const CS_DB: u64 = 1 << 14;
const PAGE_SIZE: u64 = 0x1000;

/// What was emulated (for tracing and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulated {
    pub op: MmioOp,
    /// Offset of the access from the window's base.
    pub offset: u64,
    /// The value read (before extension) or written.
    pub value: u64,
    /// Instruction length; RIP moved by this much.
    pub len: u8,
}

/// Why an access was not emulated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The code segment is not 64-bit (16, 32).
    NotLongMode {
        bitness: u32,
    },
    Fetch(WalkError),
    Decode(DecodeError),
    /// The processor reported `access`, the instruction does the other
    /// (or an instruction fetch from the window).
    Direction {
        access: Access,
        store: bool,
    },
    /// The faulting address lies below the window's base.
    OutsideWindow {
        base: u64,
    },
    /// The access does not fit in the faulting page.
    CrossesPage {
        size: u8,
    },
    /// The instruction's memory operand is not the faulting address (an
    /// access that starts in the page before the window).
    AddressMismatch {
        linear: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotLongMode { bitness } => {
                write!(f, "only 64-bit code is emulated (this is {bitness}-bit)")
            }
            Reason::Fetch(e) => write!(f, "cannot fetch the instruction: {e}"),
            Reason::Decode(e) => write!(f, "{e}"),
            Reason::Direction { access, store } => {
                if *access == Access::Execute {
                    f.write_str("instruction fetch from an emulated MMIO window")
                } else {
                    let does = if *store { "stores" } else { "loads" };
                    write!(
                        f,
                        "the processor reported a {} but the instruction {does}",
                        access.name()
                    )
                }
            }
            Reason::OutsideWindow { base } => {
                write!(f, "the address is below the window at {base:#x}")
            }
            Reason::CrossesPage { size } => {
                write!(f, "its {size}-byte access crosses a page boundary")
            }
            Reason::AddressMismatch { linear } => write!(
                f,
                "its memory operand (guest-linear {linear:#x}) is not the faulting address"
            ),
        }
    }
}

/// A trapped access that was not emulated, with what is known of the
/// instruction. Displays as one line for the stop report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioError {
    pub rip: u64,
    pub gpa: u64,
    /// The bytes fetched at RIP (the instruction's own when it decoded).
    pub bytes: [u8; MAX_INSTRUCTION_LEN],
    pub len: u8,
    /// The instruction's text, when it decoded.
    pub text: Option<String>,
    pub reason: Reason,
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot emulate ")?;
        match &self.text {
            Some(text) => write!(f, "`{text}` (")?,
            None if self.len > 0 => f.write_str("the instruction (")?,
            None => f.write_str("the access")?,
        }
        for (i, b) in self.bytes.iter().take(usize::from(self.len)).enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        if self.text.is_some() || self.len > 0 {
            f.write_str(")")?;
        }
        write!(
            f,
            " at rip {:#x}, guest-physical {:#x}: {}",
            self.rip, self.gpa, self.reason
        )
    }
}

/// Emulates the access that caused `exit` (an EPT violation at
/// `exit.guest_physical`) against `device`, whose window starts at
/// guest-physical `base`. On success the destination register (loads) is
/// written and RIP is past the instruction; on error nothing changed.
pub fn emulate(
    vcpu: &mut dyn VcpuState,
    exit: &ExitInfo,
    memory: &GuestMemory,
    phys: &impl HostPhys,
    device: &mut dyn MmioDevice,
    base: u64,
) -> Result<Emulated, MmioError> {
    let rip = vcpu.read(Field::Rip);
    let gpa = exit.guest_physical;
    let mut error = MmioError {
        rip,
        gpa,
        bytes: [0; MAX_INSTRUCTION_LEN],
        len: 0,
        text: None,
        reason: Reason::OutsideWindow { base },
    };
    let fail = |mut error: MmioError, reason| {
        error.reason = reason;
        Err(error)
    };

    let bitness = bitness(vcpu);
    if bitness != 64 {
        return fail(error, Reason::NotLongMode { bitness });
    }
    let paging = Paging::from_vcpu(vcpu);
    let fetched = match walk::fetch_instruction(memory, phys, &paging, rip, &mut error.bytes) {
        Ok(n) => n,
        Err(e) => return fail(error, Reason::Fetch(e)),
    };
    error.len = fetched as u8;
    let decoded = match decode::decode(&error.bytes[..fetched], bitness, rip) {
        Ok(d) => d,
        Err(e) => {
            if let DecodeError::Unsupported { text, .. } = &e {
                error.text = Some(text.clone());
            }
            return fail(error, Reason::Decode(e));
        }
    };
    error.len = decoded.len;
    error.text = Some(decode::describe(&decoded.instruction));
    let op = decoded.op;
    let size = op.size();

    let access = ViolationInfo::from_qualification(exit.qualification).access;
    let expected = if op.is_store() {
        Access::Write
    } else {
        Access::Read
    };
    if access != expected {
        return fail(
            error,
            Reason::Direction {
                access,
                store: op.is_store(),
            },
        );
    }
    let Some(offset) = gpa.checked_sub(base) else {
        return fail(error, Reason::OutsideWindow { base });
    };
    if (gpa & (PAGE_SIZE - 1)) + u64::from(size) > PAGE_SIZE {
        return fail(error, Reason::CrossesPage { size });
    }
    if let Some(linear) = operand_address(vcpu, &decoded.instruction) {
        if linear & (PAGE_SIZE - 1) != gpa & (PAGE_SIZE - 1) {
            return fail(error, Reason::AddressMismatch { linear });
        }
    }

    let mask = size_mask(size);
    let value = match op {
        MmioOp::Load { dst, extend, .. } => {
            let raw = device.read(offset, size) & mask;
            let widened = match extend {
                Extend::Sign => sign_extend(raw, size),
                Extend::Zero | Extend::None => raw,
            };
            write_gpr(vcpu, dst, widened);
            raw
        }
        MmioOp::Store { src, .. } => {
            let v = match src {
                Source::Gpr(g) => read_gpr(vcpu, g),
                Source::Imm(imm) => imm,
            } & mask;
            device.write(offset, size, v);
            v
        }
    };
    let done = ExitInfo {
        instruction_len: u64::from(decoded.len),
        ..*exit
    };
    skip_instruction(vcpu, &done);
    Ok(Emulated {
        op,
        offset,
        value,
        len: decoded.len,
    })
}

/// The code segment's default size: 64 in IA-32e mode with CS.L, else 32
/// or 16 by CS.D.
fn bitness(vcpu: &dyn VcpuState) -> u32 {
    let cs = vcpu.read(Field::CsAccessRights);
    if vcpu.read(Field::Efer) & EFER_LMA != 0 && cs & CS_LONG != 0 {
        64
    } else if cs & CS_DB != 0 {
        32
    } else {
        16
    }
}

/// The linear address of the instruction's memory operand (64-bit mode:
/// only FS and GS have a base).
fn operand_address(vcpu: &mut dyn VcpuState, instruction: &iced_x86::Instruction) -> Option<u64> {
    let operand =
        (0..instruction.op_count()).find(|&i| instruction.op_kind(i) == OpKind::Memory)?;
    let rsp = vcpu.read(Field::Rsp);
    let fs = vcpu.read(Field::FsBase);
    let gs = vcpu.read(Field::GsBase);
    let regs = *vcpu.regs();
    instruction.virtual_address(operand, 0, |reg, _, _| match reg {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(fs),
        Register::GS => Some(gs),
        _ => gpr(reg).map(|g| regs.get(g.index, rsp)),
    })
}

const fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

const fn sign_extend(value: u64, size: u8) -> u64 {
    match size {
        1 => value as u8 as i8 as i64 as u64,
        2 => value as u16 as i16 as i64 as u64,
        4 => value as u32 as i32 as i64 as u64,
        _ => value,
    }
}

fn read_gpr(vcpu: &mut dyn VcpuState, g: Gpr) -> u64 {
    let rsp = vcpu.read(Field::Rsp);
    let full = vcpu.regs().get(g.index, rsp);
    if g.high_byte {
        (full >> 8) & 0xff
    } else {
        full & size_mask(g.size)
    }
}

/// Writes a register as the processor does: 8- and 16-bit destinations
/// merge into the old value, 32-bit ones zero-extend to 64 bits.
fn write_gpr(vcpu: &mut dyn VcpuState, g: Gpr, value: u64) {
    let rsp = vcpu.read(Field::Rsp);
    let old = vcpu.regs().get(g.index, rsp);
    let new = match (g.size, g.high_byte) {
        (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (old & !0xff) | (value & 0xff),
        (2, _) => (old & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
    if vcpu.regs().set(g.index, new).is_none() {
        vcpu.write(Field::Rsp, new);
    }
}
