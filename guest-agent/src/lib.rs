//! The CTVM hypercall ABI: the one definition of hypercall numbers, argument
//! structures, version, capability bits and error codes, shared by the
//! hypervisor and every guest-side agent.
//!
//! # Calling convention
//! A guest executes `VMCALL` at CPL 0 with the call number in RAX and up to
//! four arguments in RBX, RCX, RDX and RSI. The hypervisor returns a status in
//! RAX: zero or a positive value for success, a negative [`Error`] code
//! otherwise. Extra results come back in RBX, RCX and RDX as each call says.
//! Guest pointers are guest-virtual addresses, translated by the hypervisor
//! through the guest's own page tables and bounds-checked.
#![no_std]

#[cfg(feature = "c-header")]
extern crate alloc;

pub mod integrity;
pub mod start_info;
pub mod vtpm_store;

/// ABI version: major in the high 16 bits, minor in the low 16 bits. A
/// different major is incompatible; a higher minor only adds calls (2.1:
/// the durable vTPM's store channel, 0x30 and 0x31).
pub const ABI_VERSION: u32 = abi_version(2, 1);

/// Packs a major and minor version the way [`ABI_VERSION`] holds them.
pub const fn abi_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// The 12-byte signature returned in EBX, ECX, EDX of CPUID leaf 0x40000000.
pub const CPUID_SIGNATURE: &[u8; 12] = b"CTVMCTVMCTVM";
/// The first hypervisor CPUID leaf: EAX gives the highest leaf.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// EAX = [`ABI_VERSION`], EBX = [`Capabilities`] bits.
pub const CPUID_LEAF_INTERFACE: u32 = 0x4000_0001;

/// Hypercall numbers, passed in RAX.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Returns 0; RBX = [`ABI_VERSION`], RCX = [`Capabilities`] bits.
    Version = 0,
    /// Stops the calling guest. RBX = exit code (a `u32`).
    Shutdown = 1,
    /// RBX = address of an [`integrity::KernelLayout`], RCX = its size.
    KernelRegister = 0x10,
    /// Locks the registered layout and turns the protections on; nothing
    /// can change the layout afterwards. RBX = address of the agent's own
    /// [`integrity::ModuleInfo`], RCX = its size: the agent is pinned (its
    /// code must match its `ctvm.policy` entry), and from now on only its
    /// code may make the integrity calls. Returns the agent's module id.
    KernelLock = 0x11,
    /// RBX = address of an [`integrity::ModuleInfo`], RCX = its size.
    /// Returns the module's id in RAX (zero or positive).
    ModuleRegister = 0x12,
    /// RBX = module id: the module finished its init; its init ranges go.
    ModuleLive = 0x13,
    /// RBX = module id: the module is going away; its view is revoked.
    ModuleUnregister = 0x14,
    /// RBX = address of an array of [`integrity::ViolationRecord`], RCX =
    /// how many fit. Returns how many were written; RBX = records dropped so far.
    ViolationsRead = 0x15,
    /// RBX = the base of a kernel stack the kernel just made for a new task
    /// (16 KiB-aligned, its end-of-stack mark there): from now on CTVM
    /// knows its pages as a stack's, whatever address reaches them, rather
    /// than from its next look at the kernel's tables. The agent reports
    /// each task from the kernel's `task_newtask` tracepoint, before any
    /// module can learn of the task.
    StackNew = 0x16,
    /// Reads the measured-launch event log (TCG 1.2 format): RBX = buffer
    /// address, RCX = buffer size (at most 64 KiB), RDX = offset in the log.
    /// Copies what fits and returns the log's total size.
    EventLogRead = 0x20,
    /// The durable vTPM's next state blob for the store service
    /// ([`vtpm_store`]): RBX = buffer address, RCX = buffer size. Returns
    /// the blob's size (0: nothing to store) with RBX = its version; a
    /// buffer too small gives [`Error::NoSpace`] with RBX = the size needed.
    VtpmStoreFetch = 0x30,
    /// The store service wrote and synced the blob of version RBX.
    VtpmStoreDone = 0x31,
}

impl Call {
    /// Decodes a call number; `None` for numbers this ABI version lacks.
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Version,
            1 => Self::Shutdown,
            0x10 => Self::KernelRegister,
            0x11 => Self::KernelLock,
            0x12 => Self::ModuleRegister,
            0x13 => Self::ModuleLive,
            0x14 => Self::ModuleUnregister,
            0x15 => Self::ViolationsRead,
            0x16 => Self::StackNew,
            0x20 => Self::EventLogRead,
            0x30 => Self::VtpmStoreFetch,
            0x31 => Self::VtpmStoreDone,
            _ => return None,
        })
    }
}

/// What the hypervisor offers this guest, returned by [`Call::Version`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// [`Call::Shutdown`] is available.
    pub const SHUTDOWN: u64 = 1 << 0;
    /// The guest has a virtual TPM at 0xFED40000.
    pub const VTPM: u64 = 1 << 1;
    /// The measured-launch event log can be read.
    pub const EVENT_LOG: u64 = 1 << 2;
    /// Run-time kernel integrity (KEPT/MEPT) calls are available.
    pub const INTEGRITY: u64 = 1 << 3;
    /// The vTPM is durable: its store service's calls are available.
    pub const VTPM_STORE: u64 = 1 << 4;

    pub const fn contains(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
}

/// Negative status codes returned in RAX.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The call number is unknown.
    UnknownCall = -1,
    /// An argument is out of range or malformed.
    InvalidArgument = -2,
    /// A guest pointer does not translate, or the range crosses into memory
    /// the guest does not own.
    BadAddress = -3,
    /// The call is not allowed from this guest, privilege level or state.
    NotPermitted = -4,
    /// The object is locked and cannot change any more.
    Locked = -5,
    /// A fixed-size table is full.
    NoSpace = -6,
    /// The named object does not exist.
    NotFound = -7,
    /// The object exists already.
    Exists = -8,
}

impl Error {
    pub const fn code(self) -> i64 {
        self as i64
    }

    /// Decodes a status returned in RAX; `None` for success values.
    pub const fn from_status(status: i64) -> Option<Self> {
        Some(match status {
            -1 => Self::UnknownCall,
            -2 => Self::InvalidArgument,
            -3 => Self::BadAddress,
            -4 => Self::NotPermitted,
            -5 => Self::Locked,
            -6 => Self::NoSpace,
            -7 => Self::NotFound,
            -8 => Self::Exists,
            _ => return None,
        })
    }
}

/// The registers of one hypercall, as the guest set them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
}

/// Guest side: issues a hypercall. Returns (RAX, RBX, RCX, RDX) after the call.
///
/// # Safety
/// Must run at CPL 0 inside a CTVM guest; outside a hypervisor `VMCALL` raises #UD.
#[cfg(target_arch = "x86_64")]
pub unsafe fn hypercall(call: Call, args: [u64; 4]) -> (i64, u64, u64, u64) {
    let (rax, rbx, rcx, rdx): (u64, u64, u64, u64);
    // SAFETY: the caller guarantees we run as a CTVM guest at CPL 0. RBX is
    // reserved by LLVM, so it is swapped through a scratch register.
    unsafe {
        core::arch::asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) args[0] => rbx,
            inout("rax") call as u64 => rax,
            inout("rcx") args[1] => rcx,
            inout("rdx") args[2] => rdx,
            in("rsi") args[3],
            options(nostack),
        );
    }
    (rax as i64, rbx, rcx, rdx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_numbers_round_trip() {
        for call in [
            Call::Version,
            Call::Shutdown,
            Call::KernelRegister,
            Call::KernelLock,
            Call::ModuleRegister,
            Call::ModuleLive,
            Call::ModuleUnregister,
            Call::ViolationsRead,
            Call::EventLogRead,
            Call::VtpmStoreFetch,
            Call::VtpmStoreDone,
        ] {
            assert_eq!(Call::from_raw(call as u64), Some(call));
        }
        assert_eq!(Call::from_raw(2), None);
        assert_eq!(Call::from_raw(u64::MAX), None);
    }

    #[test]
    fn error_codes_are_negative_and_round_trip() {
        for code in -8..=-1 {
            let err = Error::from_status(code).expect("defined code");
            assert_eq!(err.code(), code);
        }
        assert_eq!(Error::from_status(0), None);
        assert_eq!(Error::from_status(-9), None);
    }
}
