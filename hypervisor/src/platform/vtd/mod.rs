//! VT-d remapping units: taking them over, keeping their caches in step,
//! reading their fault records, and interrupt remapping.
//!
//! [`Unit`] drives one unit's registers through [`Mmio`] and writes its
//! in-memory structures (root and context tables, invalidation queue,
//! interrupt-remapping table) through [`TableMemory`], so the whole
//! programming sequence runs on the host against a model of the hardware
//! (see the tests). All units share one root table and one set of
//! second-level tables: every device lives in the same domain, the DMA view
//! of [`super::dma`].

pub mod format;

use alloc::vec::Vec;

use super::Mmio;
use crate::mm::paging::TableMemory;
use format::{descriptor, Fault};

/// Register offsets (VT-d 10.4).
pub mod reg {
    pub const VER: u64 = 0x00;
    pub const CAP: u64 = 0x08;
    pub const ECAP: u64 = 0x10;
    pub const GCMD: u64 = 0x18;
    pub const GSTS: u64 = 0x1c;
    pub const RTADDR: u64 = 0x20;
    pub const CCMD: u64 = 0x28;
    pub const FSTS: u64 = 0x34;
    pub const FECTL: u64 = 0x38;
    pub const PMEN: u64 = 0x64;
    pub const IQH: u64 = 0x80;
    pub const IQT: u64 = 0x88;
    pub const IQA: u64 = 0x90;
    pub const IRTA: u64 = 0xb8;
}

/// Global command and status bits (the same bit in GCMD and GSTS).
pub mod gcmd {
    pub const TE: u32 = 1 << 31;
    pub const SRTP: u32 = 1 << 30;
    pub const WBF: u32 = 1 << 27;
    pub const QIE: u32 = 1 << 26;
    pub const IRE: u32 = 1 << 25;
    pub const SIRTP: u32 = 1 << 24;
    pub const CFI: u32 = 1 << 23;
    /// The bits that stay set until cleared; a GCMD write must repeat them.
    pub const PERSISTENT: u32 = TE | QIE | IRE | CFI;
}

/// Fault status.
pub mod fsts {
    pub const PFO: u32 = 1 << 0;
    pub const PPF: u32 = 1 << 1;
    pub const IQE: u32 = 1 << 4;
}

const CCMD_ICC: u64 = 1 << 63;
const CCMD_GLOBAL: u64 = 1 << 61;
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_GLOBAL: u64 = 1 << 60;
const IOTLB_DOMAIN: u64 = 2 << 60;
const IOTLB_PAGE: u64 = 3 << 60;
const IOTLB_DRAIN: u64 = (1 << 49) | (1 << 48);
const PMEN_EPM: u32 = 1 << 31;
const FECTL_IM: u32 = 1 << 31;
const PMEN_PRS: u32 = 1 << 0;

/// The capability register (VT-d 10.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Required write-buffer flushing after table updates.
    pub fn rwbf(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    pub fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// Supported table walks: bit 1 = 3 levels (39 bits), bit 2 = 4 levels (48 bits).
    pub fn sagaw(self) -> u8 {
        ((self.0 >> 8) & 0x1f) as u8
    }
    pub fn supports_levels(self, levels: u8) -> bool {
        matches!(levels, 3 | 4) && self.sagaw() & (1 << (levels - 2)) != 0
    }
    /// Maximum guest address width in bits.
    pub fn mgaw(self) -> u8 {
        ((self.0 >> 16) & 0x3f) as u8 + 1
    }
    /// Offset of the fault-recording registers.
    pub fn fault_offset(self) -> u64 {
        ((self.0 >> 24) & 0x3ff) * 16
    }
    pub fn fault_records(self) -> u64 {
        ((self.0 >> 40) & 0xff) + 1
    }
    pub fn pages_2m(self) -> bool {
        self.0 & (1 << 34) != 0
    }
    pub fn pages_1g(self) -> bool {
        self.0 & (1 << 35) != 0
    }
    /// Page-selective IOTLB invalidation.
    pub fn psi(self) -> bool {
        self.0 & (1 << 39) != 0
    }
    pub fn plmr(self) -> bool {
        self.0 & (1 << 5) != 0
    }
    pub fn phmr(self) -> bool {
        self.0 & (1 << 6) != 0
    }
}

/// The extended capability register (VT-d 10.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecap(pub u64);

impl Ecap {
    /// Page walks snoop the processor caches; without it every table write
    /// must be flushed to memory before the unit may see it.
    pub fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    pub fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Offset of the IOTLB registers.
    pub fn iotlb_offset(self) -> u64 {
        ((self.0 >> 8) & 0x3ff) * 16
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtdError {
    /// A register reads all-ones (nothing there) or offsets outside the block.
    NoUnit,
    /// Neither a 3- nor a 4-level walk in common with the tables.
    Levels {
        sagaw: u8,
    },
    /// A command did not complete: which bit was waited for.
    Timeout(&'static str),
    /// The invalidation queue reported an error (FSTS.IQE).
    QueueError,
    OutOfMemory,
    /// Interrupt remapping needs queued invalidation.
    NoQueuedInvalidation,
}

impl core::fmt::Display for VtdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoUnit => write!(f, "no remapping unit answers at its address"),
            Self::Levels { sagaw } => write!(f, "no usable table depth (SAGAW {sagaw:#x})"),
            Self::Timeout(what) => write!(f, "the unit did not complete {what}"),
            Self::QueueError => write!(f, "invalidation queue error"),
            Self::OutOfMemory => write!(f, "no memory for its tables"),
            Self::NoQueuedInvalidation => write!(f, "no queued invalidation"),
        }
    }
}

/// The registers at fixed offsets end here (PEUADDR, 0xec); the IOTLB
/// registers, wherever ECAP.IRO puts them, come after (QEMU: 0xf0).
const FIXED_REGISTERS_END: u64 = 0xf0;

/// Polls of a status bit before a command counts as failed. Hardware
/// completes in microseconds; emulators in a few polls.
const POLLS: u32 = 10_000_000;

/// Descriptors in the one-page invalidation queue.
const QUEUE_LEN: u64 = 256;

/// The invalidation queue: one page of 16-byte descriptors, and a status
/// word the wait descriptor writes.
struct Queue {
    page: u64,
    status: u64,
    tail: u64,
    sequence: u32,
}

/// One remapping unit, taken over.
pub struct Unit<M: Mmio> {
    regs: M,
    pub base: u64,
    pub cap: Cap,
    pub ecap: Ecap,
    queue: Option<Queue>,
    /// Protected memory regions were on when CTVM took the unit (TXT).
    pub pmr_was_on: bool,
    /// Polls before a command counts as failed ([`POLLS`]).
    polls: u32,
}

impl<M: Mmio> Unit<M> {
    /// Reads the unit's capabilities; refuses a block that reads all-ones
    /// or whose register offsets lie outside `size` bytes, over the
    /// registers at fixed offsets, or over each other (an IOTLB
    /// invalidation written over GCMD would turn translation off).
    pub fn probe(mut regs: M, base: u64, size: u64) -> Result<Self, VtdError> {
        let version = regs.read32(reg::VER);
        let cap = Cap(regs.read64(reg::CAP));
        let ecap = Ecap(regs.read64(reg::ECAP));
        if version == u32::MAX || cap.0 == u64::MAX || ecap.0 == u64::MAX {
            return Err(VtdError::NoUnit);
        }
        let fault_end = cap.fault_offset() + 16 * cap.fault_records();
        let iotlb = ecap.iotlb_offset();
        let iotlb_among_faults = iotlb < fault_end && cap.fault_offset() < iotlb + 16;
        if fault_end > size
            || iotlb + 16 > size
            || cap.fault_offset() < 0x100
            || iotlb < FIXED_REGISTERS_END
            || iotlb_among_faults
        {
            return Err(VtdError::NoUnit);
        }
        Ok(Unit { regs, base, cap, ecap, queue: None, pmr_was_on: false, polls: POLLS })
    }

    /// Gives up on a command after `polls` polls rather than [`POLLS`]: the
    /// fuzz harness's stuck units then cost microseconds, not seconds.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_polls(&mut self, polls: u32) {
        self.polls = polls.max(1);
    }

    fn wait_status(&mut self, mask: u32, set: bool, what: &'static str) -> Result<(), VtdError> {
        for _ in 0..self.polls {
            if (self.regs.read32(reg::GSTS) & mask != 0) == set {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(VtdError::Timeout(what))
    }

    /// Issues a GCMD command, keeping the persistent bits as they are.
    fn command(&mut self, bit: u32, on: bool, what: &'static str) -> Result<(), VtdError> {
        let persistent = self.regs.read32(reg::GSTS) & gcmd::PERSISTENT;
        let value = if on { persistent | bit } else { persistent & !bit };
        self.regs.write32(reg::GCMD, value);
        // One-shot commands report completion by setting their status bit
        // (write-buffer flush by clearing it).
        if bit == gcmd::WBF {
            return self.wait_status(bit, false, what);
        }
        self.wait_status(bit, on, what)
    }

    pub fn status(&mut self) -> u32 {
        self.regs.read32(reg::GSTS)
    }

    /// Points the unit at `root` and turns translation on, invalidating
    /// every cache on the way. A unit firmware left translating keeps
    /// translating throughout (only its tables change), so there is no
    /// window without protection. Then turns off the protected memory
    /// regions TXT may have set: the tables protect from now on.
    pub fn enable(&mut self, mem: &mut impl TableMemory, root: u64, domain: u16) -> Result<(), VtdError> {
        // Faults are polled: no fault-event interrupt to wherever firmware pointed it.
        self.regs.write32(reg::FECTL, FECTL_IM);
        if self.ecap.queued_invalidation() && self.queue.is_none() {
            self.enable_queue(mem)?;
        }
        self.regs.write64(reg::RTADDR, root & !0xfff);
        self.command(gcmd::SRTP, true, "set root table pointer")?;
        self.invalidate_all(mem, domain)?;
        if self.status() & gcmd::TE == 0 {
            self.command(gcmd::TE, true, "enable translation")?;
        }
        let pmen = self.regs.read32(reg::PMEN);
        if (self.cap.plmr() || self.cap.phmr()) && pmen & PMEN_EPM != 0 {
            self.pmr_was_on = true;
            self.regs.write32(reg::PMEN, 0);
            for _ in 0..self.polls {
                if self.regs.read32(reg::PMEN) & PMEN_PRS == 0 {
                    return Ok(());
                }
            }
            return Err(VtdError::Timeout("disable protected memory regions"));
        }
        Ok(())
    }

    fn enable_queue(&mut self, mem: &mut impl TableMemory) -> Result<(), VtdError> {
        // Firmware may have left a queue running: stop it before moving it.
        if self.status() & gcmd::QIE != 0 {
            self.command(gcmd::QIE, false, "disable queued invalidation")?;
        }
        let page = mem.alloc_table().ok_or(VtdError::OutOfMemory)?;
        let status = mem.alloc_table().ok_or(VtdError::OutOfMemory)?;
        self.regs.write64(reg::IQT, 0);
        // 128-bit descriptors (DW = 0), one page (QS = 0).
        self.regs.write64(reg::IQA, page & !0xfff);
        self.command(gcmd::QIE, true, "enable queued invalidation")?;
        self.queue = Some(Queue { page, status, tail: 0, sequence: 0 });
        Ok(())
    }

    /// Submits descriptors then a wait descriptor, and polls its status
    /// write: when this returns `Ok`, the unit has carried them all out.
    /// A descriptor the unit refuses (FSTS.IQE) is replaced, as the
    /// specification asks, by a global IOTLB invalidation (valid, and a
    /// superset of any IOTLB one), the error cleared so the queue drains,
    /// and the whole batch submitted once more on the drained queue.
    fn submit(&mut self, mem: &mut impl TableMemory, descriptors: &[(u64, u64)]) -> Result<(), VtdError> {
        match self.submit_once(mem, descriptors) {
            Err(VtdError::QueueError) if self.regs.read32(reg::FSTS) & fsts::IQE != 0 => {
                self.recover_queue(mem)?;
                self.submit_once(mem, descriptors)
            }
            other => other,
        }
    }

    /// Replaces the descriptor the unit stopped at, clears the error and
    /// waits for the queue to drain to the last wait descriptor.
    fn recover_queue(&mut self, mem: &mut impl TableMemory) -> Result<(), VtdError> {
        log::warn!("DMA: the unit at {:#x} refused a queued invalidation: replaced by a global one", self.base);
        let head = (self.regs.read64(reg::IQH) >> 4) % QUEUE_LEN;
        let Some(q) = self.queue.as_ref() else { return Err(VtdError::NoQueuedInvalidation) };
        let (low, high) = descriptor::iotlb_global();
        mem.write(q.page, (head * 2) as usize, low);
        mem.write(q.page, (head * 2) as usize + 1, high);
        let (status, sequence) = (q.status, q.sequence);
        self.regs.write32(reg::FSTS, fsts::IQE);
        self.wait_for(mem, status, sequence)
    }

    /// Polls a wait descriptor's status write.
    fn wait_for(&mut self, mem: &mut impl TableMemory, status: u64, sequence: u32) -> Result<(), VtdError> {
        for _ in 0..self.polls {
            if mem.read(status, 0) as u32 == sequence {
                return Ok(());
            }
            if self.regs.read32(reg::FSTS) & fsts::IQE != 0 {
                return Err(VtdError::QueueError);
            }
            core::hint::spin_loop();
        }
        Err(VtdError::Timeout("invalidation wait"))
    }

    fn submit_once(&mut self, mem: &mut impl TableMemory, descriptors: &[(u64, u64)]) -> Result<(), VtdError> {
        // Room for the batch and its wait descriptor, behind what the unit
        // has not fetched yet (after a timeout, the queue may not be empty).
        let head = (self.regs.read64(reg::IQH) >> 4) % QUEUE_LEN;
        let Some(q) = self.queue.as_mut() else { return Err(VtdError::NoQueuedInvalidation) };
        let free = (head + QUEUE_LEN - q.tail - 1) % QUEUE_LEN;
        if descriptors.len() as u64 + 1 > free {
            return Err(VtdError::QueueError);
        }
        q.sequence = q.sequence.wrapping_add(1).max(1);
        let sequence = q.sequence;
        mem.write(q.status, 0, 0);
        let wait = descriptor::wait(q.status, sequence);
        for &(low, high) in descriptors.iter().chain(core::iter::once(&wait)) {
            let slot = (q.tail * 2) as usize;
            mem.write(q.page, slot, low);
            mem.write(q.page, slot + 1, high);
            q.tail = (q.tail + 1) % QUEUE_LEN;
        }
        let (status, tail) = (q.status, q.tail);
        self.regs.write64(reg::IQT, tail << 4);
        self.wait_for(mem, status, sequence)
    }

    fn flush_write_buffer(&mut self) -> Result<(), VtdError> {
        if self.cap.rwbf() {
            self.command(gcmd::WBF, true, "write-buffer flush")?;
        }
        Ok(())
    }

    /// Invalidates the context cache and the whole IOTLB.
    pub fn invalidate_all(&mut self, mem: &mut impl TableMemory, _domain: u16) -> Result<(), VtdError> {
        self.flush_write_buffer()?;
        if self.queue.is_some() {
            return self.submit(mem, &[descriptor::context_global(), descriptor::iotlb_global()]);
        }
        self.regs.write64(reg::CCMD, CCMD_ICC | CCMD_GLOBAL);
        self.poll64(reg::CCMD, CCMD_ICC, "context-cache invalidation")?;
        self.register_iotlb(IOTLB_GLOBAL, 0)
    }

    /// Invalidates what the IOTLB may hold for these pages of `domain`
    /// (page-selective when the unit has it and there are few, else the
    /// domain).
    pub fn invalidate_pages(&mut self, mem: &mut impl TableMemory, domain: u16, pages: &[u64]) -> Result<(), VtdError> {
        self.flush_write_buffer()?;
        let selective = self.cap.psi() && pages.len() <= 16;
        if self.queue.is_some() {
            let descriptors: Vec<(u64, u64)> = if selective {
                pages.iter().map(|&p| descriptor::iotlb_page(domain, p)).collect()
            } else {
                alloc::vec![descriptor::iotlb_domain(domain)]
            };
            return self.submit(mem, &descriptors);
        }
        if selective {
            for &p in pages {
                self.regs.write64(self.ecap.iotlb_offset(), p & !0xfff);
                self.register_iotlb(IOTLB_PAGE | (u64::from(domain) << 32), p)?;
            }
            Ok(())
        } else {
            self.register_iotlb(IOTLB_DOMAIN | (u64::from(domain) << 32), 0)
        }
    }

    fn register_iotlb(&mut self, command: u64, _page: u64) -> Result<(), VtdError> {
        let at = self.ecap.iotlb_offset() + 8;
        self.regs.write64(at, IOTLB_IVT | IOTLB_DRAIN | command);
        self.poll64(at, IOTLB_IVT, "IOTLB invalidation")
    }

    fn poll64(&mut self, offset: u64, bit: u64, what: &'static str) -> Result<(), VtdError> {
        for _ in 0..self.polls {
            if self.regs.read64(offset) & bit == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(VtdError::Timeout(what))
    }

    /// Turns interrupt remapping on with the table at `table` holding
    /// 2^`size_log2` entries, compatibility-format interrupts blocked (CFI
    /// stays clear): a device's interrupt reaches a CPU only through a
    /// present entry, and no entry can name an exception vector or an NMI,
    /// SMI, INIT or ExtINT delivery ([`format::irte`]).
    pub fn enable_interrupt_remapping(
        &mut self,
        mem: &mut impl TableMemory,
        table: u64,
        size_log2: u8,
    ) -> Result<(), VtdError> {
        if self.queue.is_none() {
            return Err(VtdError::NoQueuedInvalidation);
        }
        let s = u64::from(size_log2.clamp(1, 16) - 1);
        self.regs.write64(reg::IRTA, (table & !0xfff) | s);
        self.command(gcmd::SIRTP, true, "set interrupt remapping table pointer")?;
        self.submit(mem, &[descriptor::interrupt_entries_global()])?;
        if self.status() & gcmd::CFI != 0 {
            self.command(gcmd::CFI, false, "block compatibility-format interrupts")?;
        }
        self.command(gcmd::IRE, true, "enable interrupt remapping")
    }

    /// After an interrupt-remapping entry changed.
    pub fn invalidate_interrupt_entries(&mut self, mem: &mut impl TableMemory) -> Result<(), VtdError> {
        self.submit(mem, &[descriptor::interrupt_entries_global()])
    }

    /// Takes every pending primary fault record, clearing each, and the
    /// overflow flag. Faults beyond the records' capacity are counted by
    /// the hardware only as an overflow, returned as `overflowed`.
    pub fn take_faults(&mut self) -> (Vec<Fault>, bool) {
        let status = self.regs.read32(reg::FSTS);
        let mut faults = Vec::new();
        if status & fsts::PPF != 0 {
            for i in 0..self.cap.fault_records() {
                let at = self.cap.fault_offset() + 16 * i;
                let high = self.regs.read64(at + 8);
                if let Some(f) = Fault::decode(self.regs.read64(at), high) {
                    faults.push(f);
                    // F is write-1-to-clear, in the record's top dword.
                    self.regs.write32(at + 12, 1 << 31);
                }
            }
        }
        let overflowed = status & fsts::PFO != 0;
        if overflowed {
            self.regs.write32(reg::FSTS, fsts::PFO);
        }
        (faults, overflowed)
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod model;

#[cfg(test)]
mod tests {
    use super::model::{ModelUnit, Shared, QEMU_CAP, QEMU_ECAP};
    use super::*;
    use crate::mm::frames::Region;
    use crate::mm::paging::PageSize;
    use crate::platform::dma::{DmaView, DOMAIN};

    fn view() -> DmaView<Shared> {
        let mut v = DmaView::new(Shared::default(), 3, PageSize::Size2M).unwrap();
        let _ = v.grant(Region::new(1 << 20, 64 << 20)).unwrap();
        v
    }

    /// QEMU's unit, enabled on [`view`]'s tables.
    fn qemu_unit() -> (DmaView<Shared>, ModelUnit, Unit<ModelUnit>) {
        let mut v = view();
        let model = ModelUnit::new(v.mem.clone(), QEMU_CAP, QEMU_ECAP);
        let mut unit = Unit::probe(model.clone(), 0xfed9_0000, 4096).unwrap();
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        (v, model, unit)
    }

    #[test]
    fn enabling_with_queued_invalidation() {
        let (mut v, model, mut unit) = qemu_unit();
        assert_eq!(model.status() & (gcmd::TE | gcmd::QIE), gcmd::TE | gcmd::QIE);
        let log = model.log();
        assert_eq!((log.context_invalidations, log.iotlb_global), (1, 1), "caches invalidated before translation");
        // Many pages at once: one domain invalidation rather than a long queue.
        let pages: alloc::vec::Vec<u64> = (0..40).map(|i| (2 << 20) + i * 4096).collect();
        unit.invalidate_pages(&mut v.mem, DOMAIN, &pages).unwrap();
        assert_eq!(model.log().iotlb_domain, 1);
        // More submissions than the queue has slots wrap around it.
        for i in 0..300 {
            unit.invalidate_pages(&mut v.mem, DOMAIN, &[i << 12]).unwrap();
        }
        assert_eq!(model.log().iotlb_pages.len(), 300);
    }

    /// A descriptor the unit refuses (IQE) is replaced by a global IOTLB
    /// invalidation and the batch carried out again: the call returns only
    /// once no stale translation can be left, and the queue works on.
    #[test]
    fn a_refused_invalidation_is_recovered_not_just_logged() {
        let (mut v, model, mut unit) = qemu_unit();
        let global = model.log().iotlb_global;
        model.0.borrow_mut().refuse_descriptors = 1;
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[0x20_0000]).unwrap();
        let log = model.log();
        assert_eq!(log.iotlb_global, global + 1, "the refused descriptor became a global invalidation");
        assert_eq!(log.iotlb_pages, [0x20_0000], "and the batch ran again");
        assert_eq!(model.fault_status() & fsts::IQE, 0, "error cleared");
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[0x30_0000]).unwrap();
        assert_eq!(model.log().iotlb_pages, [0x20_0000, 0x30_0000]);
        // A unit that refuses everything: an error, never a silent success.
        model.0.borrow_mut().refuse_descriptors = u32::MAX;
        assert!(unit.invalidate_pages(&mut v.mem, DOMAIN, &[0x40_0000]).is_err());
    }

    #[test]
    fn enabling_with_register_invalidation() {
        let mut v = view();
        // No queued invalidation, write-buffer flushing required, 4-level walks.
        let cap = (QEMU_CAP & !(0x1f << 8)) | (1 << 10) | (1 << 4);
        let model = ModelUnit::new(v.mem.clone(), cap, QEMU_ECAP & !0b1010);
        let mut unit = Unit::probe(model.clone(), 0, 4096).unwrap();
        assert!(!unit.cap.supports_levels(3) && unit.cap.supports_levels(4));
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        assert_eq!(model.status() & (gcmd::TE | gcmd::QIE), gcmd::TE);
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[0x20_0000]).unwrap();
        let log = model.log();
        assert_eq!((log.context_invalidations, log.iotlb_global, log.iotlb_pages.as_slice()), (1, 1, &[0x20_0000][..]));
        assert!(log.write_buffer_flushes >= 2);
        assert_eq!(unit.enable_interrupt_remapping(&mut v.mem, 0, 8), Err(VtdError::NoQueuedInvalidation));
    }

    /// Firmware (or TXT's SINIT) left translation and the protected memory
    /// regions on: CTVM switches tables without turning translation off,
    /// then turns the PMRs off.
    #[test]
    fn taking_over_a_translating_unit_keeps_it_translating() {
        let mut v = view();
        let model = ModelUnit::new(v.mem.clone(), QEMU_CAP | (1 << 5), QEMU_ECAP);
        model.set_status(gcmd::TE);
        let mut regs = model.clone();
        regs.write32(reg::PMEN, 1 << 31);
        let mut unit = Unit::probe(model.clone(), 0, 4096).unwrap();
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        assert!(unit.pmr_was_on);
        assert_eq!(regs.read32(reg::PMEN), 0);
        assert_ne!(model.status() & gcmd::TE, 0);
    }

    /// A unit whose ECAP places the IOTLB registers over the registers at
    /// fixed offsets is refused: with IRO 1 the invalidate register would
    /// be GCMD, and the first register-based IOTLB invalidation would write
    /// GCMD with translation off. Nor may they lie among the fault records.
    #[test]
    fn iotlb_registers_must_be_clear_of_the_others() {
        let mem = Shared::default();
        let no_queue = QEMU_ECAP & !0b1010 & !(0x3ff << 8);
        for iro in [0, 1, 2, 0xe, 0x22] {
            let model = ModelUnit::new(mem.clone(), QEMU_CAP, no_queue | (iro << 8));
            assert_eq!(Unit::probe(model, 0, 4096).err(), Some(VtdError::NoUnit), "IRO {iro:#x}");
        }
        // QEMU's 0xf0, and past the fault records, are fine.
        for iro in [0xf, 0x23] {
            let model = ModelUnit::new(mem.clone(), QEMU_CAP, no_queue | (iro << 8));
            assert!(Unit::probe(model, 0, 4096).is_ok(), "IRO {iro:#x}");
        }
    }

    #[test]
    fn a_missing_or_lying_unit_is_refused() {
        struct AllOnes;
        impl Mmio for AllOnes {
            fn read32(&mut self, _: u64) -> u32 {
                u32::MAX
            }
            fn write32(&mut self, _: u64, _: u32) {}
            fn write8(&mut self, _: u64, _: u8) {}
        }
        assert_eq!(Unit::probe(AllOnes, 0, 4096).err(), Some(VtdError::NoUnit));
        // Fault records said to lie beyond the register block.
        let model = ModelUnit::new(Shared::default(), QEMU_CAP | (0x3ff << 24), QEMU_ECAP);
        assert_eq!(Unit::probe(model, 0, 4096).err(), Some(VtdError::NoUnit));
    }

    /// A unit that never completes a command is reported, not waited on forever.
    #[test]
    fn a_stuck_unit_times_out() {
        struct Stuck;
        impl Mmio for Stuck {
            fn read32(&mut self, o: u64) -> u32 {
                match o {
                    reg::CAP => QEMU_CAP as u32,
                    o if o == reg::CAP + 4 => (QEMU_CAP >> 32) as u32,
                    reg::ECAP => QEMU_ECAP as u32,
                    _ => 0,
                }
            }
            fn write32(&mut self, _: u64, _: u32) {}
            fn write8(&mut self, _: u64, _: u8) {}
        }
        let mut v = view();
        let mut unit = Unit::probe(Stuck, 0, 4096).unwrap();
        let root = v.root_table();
        assert!(matches!(unit.enable(&mut v.mem, root, DOMAIN), Err(VtdError::Timeout(_))));
    }

    /// The attack: a device raises an NMI or an exception vector (a
    /// compatibility-format MSI, which names any vector and delivery mode).
    /// With interrupt remapping on, compatibility format is blocked, an
    /// index without a present entry faults, and an entry delivers only its
    /// own vector to the device it names.
    #[test]
    fn devices_cannot_raise_vectors_they_were_not_given() {
        let (mut v, model, mut unit) = qemu_unit();
        let table = v.mem.alloc_table().unwrap();
        let (low, high) = format::irte(0x40, 0, format::Delivery::Fixed, 0x18).unwrap();
        v.mem.write(table, 0, low);
        v.mem.write(table, 1, high);
        unit.enable_interrupt_remapping(&mut v.mem, table, 8).unwrap();
        assert_eq!(model.status() & (gcmd::IRE | gcmd::CFI), gcmd::IRE);
        assert_eq!(model.log().iec_invalidations, 1);
        assert_eq!(model.interrupt(0x18, None), Err(0x25), "compatibility format blocked");
        assert_eq!(model.interrupt(0x18, Some(1)), Err(0x22), "no entry");
        assert_eq!(model.interrupt(0x20, Some(0)), Err(0x26), "another device's entry");
        assert_eq!(model.interrupt(0x18, Some(300)), Err(0x20), "beyond the table");
        assert_eq!(model.interrupt(0x18, Some(0)), Ok(0x40));
        let (faults, _) = unit.take_faults();
        assert_eq!(faults[0].access, format::FaultAccess::Interrupt);
    }
}
