//! The guest-access service: every read or write the hypervisor makes in a
//! guest's memory on the guest's behalf goes through here.
//!
//! An access states for whom it is made (a [`Principal`]: the privilege
//! level and the EPT view) and is checked as the processor would check that
//! principal's own access, and then some:
//! - the guest's page tables: U/S, R/W (with CR0.WP), XD, SMEP and SMAP. A
//!   refusal here is the page fault the processor would raise
//!   ([`AccessError::PageFault`]);
//! - the view's EPT rights on the page, and that the page is the guest's
//!   RAM (never MMIO, never the hypervisor's memory). A refusal here is the
//!   EPT violation the processor would take ([`AccessError::Refused`]),
//!   which the caller reports.
//!
//! Every page of an access is checked before a byte moves, so a refused
//! access changes nothing. Guest structures are copied in once
//! ([`GuestAccess::read_vec`]): callers parse the copy and never read the
//! guest's memory again for what they checked. A write sets the accessed
//! and dirty bits as the processor would (the dirty bit is how the guest
//! knows a page must be written back), by compare-and-exchange, so an entry
//! the guest changed meanwhile is never written back over. Reads and
//! fetches leave the tables alone: the accessed bit only ages pages, and the
//! processor set it already when it ran the instruction that exited.
//!
//! [`Inspector`] is the hypervisor's own look at guest memory (the words on
//! a stack when it judges a branch, the pages behind a registered range):
//! it only reads, requires guest RAM, and changes nothing, not even an
//! accessed bit. The raw walker ([`walk`]) is private to this module.

mod walk;

use alloc::vec::Vec;
use core::fmt;

pub use walk::{Paging, WalkError};

use super::memory::{GuestMemory, HostPhys};
use crate::integrity::control::GuestControl;
use crate::integrity::View;
use crate::mm::paging::Perms;
use crate::vcpu::{cpl, inject_exception, VcpuState, VECTOR_GP};
use walk::{Walk, CR0_WP, CR4_SMAP, CR4_SMEP, PAGE_SIZE};

/// The longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

const VECTOR_PF: u8 = 14;

/// For whom an access is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    /// 0 for the kernel, 3 for user space.
    pub cpl: u8,
    /// The EPT view the guest runs in.
    pub view: View,
}

impl Principal {
    /// The guest kernel in its own view (what the agent's hypercalls are).
    pub const KERNEL: Principal = Principal { cpl: 0, view: View::Kernel };

    /// Whoever runs the instruction that exited.
    pub fn current(vcpu: &dyn VcpuState, view: View) -> Self {
        Principal { cpl: cpl(vcpu), view }
    }

    fn is_user(self) -> bool {
        self.cpl == 3
    }
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Fetch,
}

impl Kind {
    fn needs(self) -> Perms {
        match self {
            Kind::Read => Perms::READ,
            Kind::Write => Perms::WRITE,
            Kind::Fetch => Perms::EXECUTE,
        }
    }
}

/// Why an access was not made. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The guest's own tables refuse it: the processor would raise #PF at
    /// `address` with this error code.
    PageFault { address: u64, code: u32 },
    /// Not a canonical address: #GP.
    NotCanonical { address: u64 },
    /// The guest's tables allow it, but the page (or a table on the way) is
    /// not the guest's RAM, or the principal's view gives no such right.
    Refused { address: u64, gpa: u64, kind: Kind },
    /// A paging mode the walker does not implement.
    Unsupported(&'static str),
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AccessError::PageFault { address, code } => {
                write!(f, "guest-linear {address:#x}: page fault (error code {code:#x})")
            }
            AccessError::NotCanonical { address } => write!(f, "guest-linear {address:#x} is not canonical"),
            AccessError::Refused { address, gpa, kind } => write!(
                f,
                "guest-linear {address:#x} (guest-physical {gpa:#x}): {} refused (not the guest's RAM, or not allowed in its view)",
                match kind {
                    Kind::Read => "read",
                    Kind::Write => "write",
                    Kind::Fetch => "instruction fetch",
                }
            ),
            AccessError::Unsupported(mode) => write!(f, "{mode} is not supported"),
        }
    }
}

impl AccessError {
    /// Queues for the guest what the processor would deliver: #PF (with CR2)
    /// or #GP. Returns false for [`AccessError::Refused`] and
    /// [`AccessError::Unsupported`], which are the hypervisor's to handle.
    pub fn deliver(self, vcpu: &mut dyn VcpuState) -> bool {
        match self {
            AccessError::PageFault { address, code } => {
                vcpu.regs().cr2 = address;
                inject_exception(vcpu, VECTOR_PF, Some(code));
                true
            }
            AccessError::NotCanonical { .. } => {
                inject_exception(vcpu, VECTOR_GP, Some(0));
                true
            }
            AccessError::Refused { .. } | AccessError::Unsupported(_) => false,
        }
    }
}

/// Page-fault error code bits.
mod pf {
    pub const PROTECTION: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RESERVED: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

/// The pieces of `len` bytes at `gva` that stay within one page:
/// (address, offset in the buffer, length).
fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = gva.wrapping_add(done as u64);
        let n = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(len - done);
        let item = (at, done, n);
        done += n;
        Some(item)
    })
}

/// Guest memory as one principal may use it.
pub struct GuestAccess<'a> {
    memory: &'a GuestMemory,
    phys: &'a dyn HostPhys,
    paging: Paging,
    who: Principal,
    /// The guest's EPT views; without them the guest's RAM is all it has,
    /// with every right.
    views: Option<&'a dyn GuestControl>,
}

/// How many times an access is walked again when the guest changed an
/// entry between the walk and the setting of its accessed bit.
const RETRIES: usize = 4;

impl<'a> GuestAccess<'a> {
    pub fn new(
        memory: &'a GuestMemory,
        phys: &'a dyn HostPhys,
        paging: Paging,
        who: Principal,
        views: Option<&'a dyn GuestControl>,
    ) -> Self {
        GuestAccess { memory, phys, paging, who, views }
    }

    pub fn principal(&self) -> Principal {
        self.who
    }

    /// Walks `address` for `kind` and checks every right; the guest-physical
    /// address and the walk (for the accessed and dirty bits).
    fn check(&self, address: u64, kind: Kind) -> Result<Walk, AccessError> {
        let w = walk::walk(self.memory, &self.phys, &self.paging, address).map_err(|e| self.walk_error(e, kind))?;
        let user = self.who.is_user();
        let smap = self.paging.cr4 & CR4_SMAP != 0;
        let smep = self.paging.cr4 & CR4_SMEP != 0;
        let wp = self.paging.cr0 & CR0_WP != 0;
        let denied = match kind {
            Kind::Read => !w.user && user || w.user && !user && smap,
            Kind::Write => {
                if user {
                    !w.user || !w.writable
                } else {
                    w.user && smap || !w.writable && wp
                }
            }
            Kind::Fetch => !w.executable || (if user { !w.user } else { w.user && smep }),
        };
        if denied {
            return Err(AccessError::PageFault { address, code: pf::PROTECTION | self.fault_bits(kind) });
        }
        let page = w.gpa & !(PAGE_SIZE - 1);
        let view_allows = match self.views {
            Some(v) => v.perms(self.who.view, page).is_some_and(|p| p.contains(kind.needs())),
            None => true,
        };
        if !view_allows || !self.memory.contains(w.gpa) {
            return Err(AccessError::Refused { address, gpa: w.gpa, kind });
        }
        Ok(w)
    }

    fn fault_bits(&self, kind: Kind) -> u32 {
        let mut code = if self.who.is_user() { pf::USER } else { 0 };
        match kind {
            Kind::Read => {}
            Kind::Write => code |= pf::WRITE,
            Kind::Fetch => {
                let nx = self.paging.efer & walk::EFER_NXE != 0;
                if nx || self.paging.cr4 & CR4_SMEP != 0 {
                    code |= pf::FETCH;
                }
            }
        }
        code
    }

    fn walk_error(&self, e: WalkError, kind: Kind) -> AccessError {
        match e {
            WalkError::NotCanonical { linear } => AccessError::NotCanonical { address: linear },
            WalkError::NotPresent { linear, .. } => {
                AccessError::PageFault { address: linear, code: self.fault_bits(kind) }
            }
            WalkError::Reserved { linear, .. } => {
                AccessError::PageFault { address: linear, code: pf::PROTECTION | pf::RESERVED | self.fault_bits(kind) }
            }
            WalkError::OutsideRam { linear, gpa } => AccessError::Refused { address: linear, gpa, kind },
            WalkError::UnsupportedMode(mode) => AccessError::Unsupported(mode),
        }
    }

    /// Sets the accessed bits of a write's entries and the leaf's dirty
    /// bit, as the processor would. False if the guest changed an entry
    /// since the walk: nothing is written back over it.
    fn mark_written(&self, w: &Walk) -> bool {
        for (i, &(at, entry)) in w.entries[..w.levels].iter().enumerate() {
            let leaf = i + 1 == w.levels;
            let bits = walk::ACCESSED | if leaf { walk::DIRTY } else { 0 };
            if entry & bits == bits {
                continue;
            }
            match self.memory.compare_exchange_u64(&self.phys, at, entry, entry | bits) {
                Ok(true) => {}
                _ => return false,
            }
        }
        true
    }

    /// Checks one piece of a write and marks its entries, walking again if
    /// the guest changed them meanwhile.
    fn checked_write(&self, address: u64) -> Result<u64, AccessError> {
        for _ in 0..RETRIES {
            let w = self.check(address, Kind::Write)?;
            if self.mark_written(&w) {
                return Ok(w.gpa);
            }
        }
        // The guest keeps rewriting the entry under us: refuse rather than race.
        Err(AccessError::Refused { address, gpa: 0, kind: Kind::Write })
    }

    fn range_ok(&self, gva: u64, len: usize) -> Result<(), AccessError> {
        gva.checked_add(len as u64).map(|_| ()).ok_or(AccessError::NotCanonical { address: gva })
    }

    /// Copies `buf.len()` bytes in.
    pub fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.range_ok(gva, buf.len())?;
        for (at, offset, n) in chunks(gva, buf.len()) {
            let gpa = self.check(at, Kind::Read)?.gpa;
            self.ram_range(at, gpa, n, Kind::Read)?;
            self.memory
                .read(&self.phys, gpa, &mut buf[offset..offset + n])
                .map_err(|_| self.refused(at, gpa, Kind::Read))?;
        }
        Ok(())
    }

    /// Copies a guest structure in, once.
    pub fn read_vec(&self, gva: u64, len: usize) -> Result<Vec<u8>, AccessError> {
        let mut buf = alloc::vec![0u8; len];
        self.read(gva, &mut buf)?;
        Ok(buf)
    }

    pub fn read_u64(&self, gva: u64) -> Result<u64, AccessError> {
        let mut b = [0u8; 8];
        self.read(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies `data` out. Every page of the destination is checked first;
    /// the data then goes where those translations said (it may land in the
    /// guest's own page tables, and must not redirect the rest of it).
    pub fn write(&self, gva: u64, data: &[u8]) -> Result<(), AccessError> {
        self.range_ok(gva, data.len())?;
        let mut pieces = Vec::new();
        for (at, offset, n) in chunks(gva, data.len()) {
            let gpa = self.check(at, Kind::Write)?.gpa;
            self.ram_range(at, gpa, n, Kind::Write)?;
            pieces.push((at, offset, n));
        }
        let mut targets = Vec::with_capacity(pieces.len());
        for &(at, offset, n) in &pieces {
            targets.push((self.checked_write(at)?, offset, n, at));
        }
        for (gpa, offset, n, at) in targets {
            self.memory
                .write(&self.phys, gpa, &data[offset..offset + n])
                .map_err(|_| self.refused(at, gpa, Kind::Write))?;
        }
        Ok(())
    }

    /// Fetches up to [`MAX_INSTRUCTION_LEN`] bytes at `rip`, each page
    /// checked for execution. Returns how many bytes were fetched: fewer
    /// when a later page cannot be (the instruction may end before it);
    /// fails only if the first byte cannot be.
    pub fn fetch_instruction(&self, rip: u64, buf: &mut [u8; MAX_INSTRUCTION_LEN]) -> Result<usize, AccessError> {
        let mut got = 0usize;
        while got < MAX_INSTRUCTION_LEN {
            let at = rip.wrapping_add(got as u64);
            let step = self.fetch_run(at, &mut buf[got..]);
            match step {
                Ok(n) => got += n,
                Err(e) if got == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(got)
    }

    /// Reads as many bytes at `at` as fit in `out` without leaving its page
    /// or its piece of guest RAM (at least one).
    fn fetch_run(&self, at: u64, out: &mut [u8]) -> Result<usize, AccessError> {
        let gpa = self.check(at, Kind::Fetch)?.gpa;
        let (_, contiguous) = self.memory.translate(gpa).ok_or(self.refused(at, gpa, Kind::Fetch))?;
        let page_left = PAGE_SIZE - (at & (PAGE_SIZE - 1));
        let n = (out.len() as u64).min(page_left).min(contiguous) as usize;
        self.memory.read(&self.phys, gpa, &mut out[..n]).map_err(|_| self.refused(at, gpa, Kind::Fetch))?;
        Ok(n)
    }

    /// The whole piece must be guest RAM: a page may end the RAM mid-way,
    /// or hold a hole between two backings, and a write is refused before
    /// any of it lands.
    fn ram_range(&self, at: u64, gpa: u64, n: usize, kind: Kind) -> Result<(), AccessError> {
        let end = gpa.saturating_add(n as u64);
        let mut p = gpa;
        while p < end {
            let (_, run) = self.memory.translate(p).ok_or(self.refused(at, gpa, kind))?;
            p = p.saturating_add(run);
        }
        Ok(())
    }

    fn refused(&self, address: u64, gpa: u64, kind: Kind) -> AccessError {
        AccessError::Refused { address, gpa, kind }
    }
}

/// The hypervisor's own reads of guest memory: through the guest's tables,
/// guest RAM only, no rights checked and nothing changed.
pub struct Inspector<'a> {
    memory: &'a GuestMemory,
    phys: &'a dyn HostPhys,
    paging: Paging,
}

impl<'a> Inspector<'a> {
    pub fn new(memory: &'a GuestMemory, phys: &'a dyn HostPhys, paging: Paging) -> Self {
        Inspector { memory, phys, paging }
    }

    /// The guest-physical address behind `gva`, in guest RAM.
    pub fn translate(&self, gva: u64) -> Result<u64, WalkError> {
        let gpa = walk::translate(self.memory, &self.phys, &self.paging, gva)?;
        if self.memory.contains(gpa) {
            Ok(gpa)
        } else {
            Err(WalkError::OutsideRam { linear: gva, gpa })
        }
    }

    pub fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        gva.checked_add(buf.len() as u64).ok_or(WalkError::NotCanonical { linear: gva })?;
        for (at, offset, n) in chunks(gva, buf.len()) {
            let gpa = self.translate(at)?;
            self.memory
                .read(&self.phys, gpa, &mut buf[offset..offset + n])
                .map_err(|_| WalkError::OutsideRam { linear: at, gpa })?;
        }
        Ok(())
    }

    pub fn read_u64(&self, gva: u64) -> Result<u64, WalkError> {
        let mut b = [0u8; 8];
        self.read(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
pub mod testing {
    pub use super::walk::testing::*;
}

#[cfg(test)]
mod tests;
