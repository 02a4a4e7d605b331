//! A model of one VT-d remapping unit for host tests: its registers, its
//! invalidation queue, an IOTLB that keeps translations until they are
//! invalidated, and device DMA translated through the tables in memory the
//! way the hardware walks them (written from the specification, not from
//! the driver). Tests run the driver against it and then attack it with
//! DMA.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use super::{fsts, gcmd, reg};
use crate::mm::paging::host::HeapTables;
use crate::mm::paging::TableMemory;
use crate::platform::Mmio;

/// Table memory shared between the driver and the model.
#[derive(Clone, Default)]
pub struct Shared(pub Rc<RefCell<HeapTables>>);

impl TableMemory for Shared {
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.borrow_mut().alloc_table()
    }
    fn free_table(&mut self, table: u64) {
        self.0.borrow_mut().free_table(table)
    }
    fn read(&self, table: u64, index: usize) -> u64 {
        self.0.borrow().read(table, index)
    }
    fn write(&mut self, table: u64, index: usize, entry: u64) {
        self.0.borrow_mut().write(table, index, entry)
    }
}

/// What the model was asked to do, for assertions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log {
    pub context_invalidations: usize,
    pub iotlb_global: usize,
    pub iotlb_domain: usize,
    pub iotlb_pages: Vec<u64>,
    pub iec_invalidations: usize,
    pub write_buffer_flushes: usize,
}

pub struct State {
    regs: BTreeMap<u64, u32>,
    mem: Shared,
    pub cap: u64,
    pub ecap: u64,
    status: u32,
    root: u64,
    irta: u64,
    head: u64,
    /// (source id, page) -> (target page, writable, readable)
    iotlb: BTreeMap<(u16, u64), (u64, bool, bool)>,
    records: Vec<Option<(u64, u64)>>,
    pub log: Log,
    /// Memory behind the unit: the bytes a DMA reaches, by page.
    pub ram: BTreeMap<u64, Vec<u8>>,
    pub blocked_compat: BTreeSet<u16>,
    /// Descriptors still to refuse (FSTS.IQE, the head left on them), as a
    /// unit does with one it cannot carry out.
    pub refuse_descriptors: u32,
    /// The unit fetches no descriptor any more (hung): every wait for the
    /// queue times out.
    pub stalled: bool,
}

/// The register block (what the driver holds) and the device side (what
/// the test holds) of one modelled unit.
#[derive(Clone)]
pub struct ModelUnit(pub Rc<RefCell<State>>);

/// QEMU 7.2's intel-iommu with its defaults (PLATFORM-S2): 3-level walks,
/// 2 MiB pages, page-selective invalidation, queued invalidation and
/// interrupt remapping, fault records at 0x220, IOTLB registers at 0xf0.
pub const QEMU_CAP: u64 = 0x00d2_008c_2226_0206;
pub const QEMU_ECAP: u64 = 0x00f0_0f4a;

impl ModelUnit {
    pub fn new(mem: Shared, cap: u64, ecap: u64) -> Self {
        ModelUnit(Rc::new(RefCell::new(State {
            regs: BTreeMap::new(),
            mem,
            cap,
            ecap,
            status: 0,
            root: 0,
            irta: 0,
            head: 0,
            iotlb: BTreeMap::new(),
            records: Vec::new(),
            log: Log::default(),
            ram: BTreeMap::new(),
            blocked_compat: BTreeSet::new(),
            refuse_descriptors: 0,
            stalled: false,
        })))
    }

    pub fn qemu(mem: Shared) -> Self {
        Self::new(mem, QEMU_CAP, QEMU_ECAP)
    }

    pub fn status(&self) -> u32 {
        self.0.borrow().status
    }

    /// The fault status register as the unit holds it.
    pub fn fault_status(&self) -> u32 {
        self.0.borrow().regs.get(&reg::FSTS).copied().unwrap_or(0)
    }

    pub fn log(&self) -> Log {
        self.0.borrow().log.clone()
    }

    pub fn set_status(&self, bits: u32) {
        self.0.borrow_mut().status |= bits;
    }

    /// A device writes `data` at `address`: translated, or refused with a
    /// fault record as the hardware would. Returns the fault reason.
    pub fn dma_write(&self, source_id: u16, address: u64, data: &[u8]) -> Result<(), u8> {
        let mut s = self.0.borrow_mut();
        let target = s.translate(source_id, address, true)?;
        let page = s.ram.entry(target & !0xfff).or_insert_with(|| alloc::vec![0; 4096]);
        let at = (target & 0xfff) as usize;
        page[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn dma_read(&self, source_id: u16, address: u64) -> Result<u8, u8> {
        let mut s = self.0.borrow_mut();
        let target = s.translate(source_id, address, false)?;
        Ok(s.ram.get(&(target & !0xfff)).map_or(0, |p| p[(target & 0xfff) as usize]))
    }

    /// What memory holds at `address` (no translation: the CPU's view).
    pub fn peek(&self, address: u64) -> u8 {
        self.0.borrow().ram.get(&(address & !0xfff)).map_or(0, |p| p[(address & 0xfff) as usize])
    }

    /// A device sends an MSI: remappable format with `index`, or
    /// compatibility format. Returns the vector delivered, or the fault.
    pub fn interrupt(&self, source_id: u16, remappable: Option<u16>) -> Result<u8, u8> {
        let mut s = self.0.borrow_mut();
        if s.status & gcmd::IRE == 0 {
            return Ok(0);
        }
        let Some(index) = remappable else {
            if s.status & gcmd::CFI != 0 {
                return Ok(0);
            }
            s.blocked_compat.insert(source_id);
            return Err(s.fault(source_id, 0, 0x25, false));
        };
        let size = 2u64 << (s.irta & 0xf);
        if u64::from(index) >= size {
            return Err(s.fault(source_id, u64::from(index) << 48, 0x20, false));
        }
        // 16-byte entries: the table spans pages when it has more than 256.
        let at = (s.irta & !0xfff) + 16 * u64::from(index);
        let (page, slot) = (at & !0xfff, ((at & 0xfff) / 8) as usize);
        let (low, high) = (s.table(page, slot).unwrap_or(0), s.table(page, slot + 1).unwrap_or(0));
        if low & 1 == 0 {
            return Err(s.fault(source_id, u64::from(index) << 48, 0x22, false));
        }
        if (high >> 18) & 3 == 1 && high as u16 != source_id {
            return Err(s.fault(source_id, u64::from(index) << 48, 0x26, false));
        }
        Ok((low >> 16) as u8)
    }
}

impl State {
    /// An entry of the tables in memory; `None` where there is no memory
    /// (a pointer the driver never set, or garbage).
    fn table(&self, table: u64, index: usize) -> Option<u64> {
        self.mem.0.borrow().get(table, index)
    }

    fn fault(&mut self, source_id: u16, address: u64, reason: u8, read: bool) -> u8 {
        let high = (1u64 << 63) | (u64::from(read) << 62) | (u64::from(reason) << 32) | u64::from(source_id);
        let records = ((self.cap >> 40) & 0xff) as usize + 1;
        self.records.resize(records, None);
        if let Some(slot) = self.records.iter_mut().find(|r| r.is_none()) {
            *slot = Some((address & !0xfff, high));
        } else {
            let f = self.regs.entry(reg::FSTS).or_default();
            *f |= fsts::PFO;
        }
        reason
    }

    fn translate(&mut self, source_id: u16, address: u64, write: bool) -> Result<u64, u8> {
        if self.status & gcmd::TE == 0 {
            return Ok(address);
        }
        let page = address & !0xfff;
        let offset = address & 0xfff;
        if let Some(&(target, w, r)) = self.iotlb.get(&(source_id, page)) {
            return if (write && w) || (!write && r) {
                Ok(target | offset)
            } else {
                Err(self.fault(source_id, address, if write { 5 } else { 6 }, !write))
            };
        }
        let bus = (source_id >> 8) as usize;
        let devfn = (source_id & 0xff) as usize;
        let Some(root) = self.table(self.root, 2 * bus) else {
            return Err(self.fault(source_id, address, 8, !write));
        };
        if root & 1 == 0 {
            return Err(self.fault(source_id, address, 1, !write));
        }
        let context = root & !0xfff;
        let (Some(low), Some(high)) = (self.table(context, 2 * devfn), self.table(context, 2 * devfn + 1)) else {
            return Err(self.fault(source_id, address, 9, !write));
        };
        if low & 1 == 0 {
            return Err(self.fault(source_id, address, 2, !write));
        }
        let levels = match high & 7 {
            1 => 3,
            2 => 4,
            _ => return Err(self.fault(source_id, address, 3, !write)),
        };
        let sagaw = (self.cap >> 8) & 0x1f;
        if sagaw & (1 << (levels - 2)) == 0 || (low >> 2) & 3 != 0 {
            return Err(self.fault(source_id, address, 3, !write));
        }
        if address >> (12 + 9 * levels) != 0 {
            return Err(self.fault(source_id, address, 4, !write));
        }
        let mut table = low & !0xfff;
        let mut level = levels - 1;
        loop {
            let Some(entry) = self.table(table, ((address >> (12 + 9 * level)) & 511) as usize) else {
                return Err(self.fault(source_id, address, 7, !write));
            };
            let (r, w) = (entry & 1 != 0, entry & 2 != 0);
            if !r && !w {
                return Err(self.fault(source_id, address, 7, !write));
            }
            // Reserved bits: SNP (11) and, in legacy mode, anything but R, W, PS and the address.
            if entry & (1 << 11) != 0 || entry & 0xfff & !0x83 != 0 {
                return Err(self.fault(source_id, address, 0xc, !write));
            }
            let large = level > 0 && entry & (1 << 7) != 0;
            if level == 0 || large {
                let size = 1u64 << (12 + 9 * level);
                let target = (entry & 0x000f_ffff_ffff_f000 & !(size - 1)) | (address & (size - 1) & !0xfff);
                self.iotlb.insert((source_id, page), (target, w, r));
                if (write && !w) || (!write && !r) {
                    return Err(self.fault(source_id, address, if write { 5 } else { 6 }, !write));
                }
                return Ok(target | offset);
            }
            table = entry & 0x000f_ffff_ffff_f000;
            level -= 1;
        }
    }

    fn process_queue(&mut self, tail: u64) {
        let iqa = u64::from(self.regs.get(&reg::IQA).copied().unwrap_or(0))
            | (u64::from(self.regs.get(&(reg::IQA + 4)).copied().unwrap_or(0)) << 32);
        let page = iqa & !0xfff;
        while self.head != tail && !self.stalled {
            if self.refuse_descriptors > 0 {
                self.refuse_descriptors -= 1;
                *self.regs.entry(reg::FSTS).or_default() |= fsts::IQE;
                return;
            }
            let slot = (self.head * 2) as usize;
            let (Some(low), Some(high)) = (self.table(page, slot), self.table(page, slot + 1)) else {
                let f = self.regs.entry(reg::FSTS).or_default();
                *f |= fsts::IQE;
                return;
            };
            match low & 0xf {
                0x1 => self.log.context_invalidations += 1,
                0x2 => match (low >> 4) & 3 {
                    1 => {
                        self.log.iotlb_global += 1;
                        self.iotlb.clear();
                    }
                    2 => {
                        self.log.iotlb_domain += 1;
                        self.iotlb.clear();
                    }
                    3 => {
                        let p = high & !0xfff;
                        self.log.iotlb_pages.push(p);
                        self.iotlb.retain(|&(_, page), _| page != p);
                    }
                    _ => self.regs.insert(reg::FSTS, fsts::IQE).map_or((), |_| ()),
                },
                0x4 => self.log.iec_invalidations += 1,
                0x5 => {
                    if low & (1 << 5) != 0 {
                        let address = high & !3;
                        let Some(old) = self.table(address & !0xfff, ((address & 0xfff) / 8) as usize) else {
                            let f = self.regs.entry(reg::FSTS).or_default();
                            *f |= fsts::IQE;
                            return;
                        };
                        let shift = (address & 4) * 8;
                        let value = (old & !(0xffff_ffffu64 << shift)) | ((low >> 32) << shift);
                        self.mem.write(address & !0xfff, ((address & 0xfff) / 8) as usize, value);
                    }
                }
                _ => {
                    let f = self.regs.entry(reg::FSTS).or_default();
                    *f |= fsts::IQE;
                    return;
                }
            }
            self.head = (self.head + 1) % 256;
        }
    }

    fn reg64(&self, offset: u64) -> u64 {
        u64::from(self.regs.get(&offset).copied().unwrap_or(0))
            | (u64::from(self.regs.get(&(offset + 4)).copied().unwrap_or(0)) << 32)
    }
}

impl Mmio for ModelUnit {
    fn read32(&mut self, offset: u64) -> u32 {
        let s = self.0.borrow();
        let fault_base = ((s.cap >> 24) & 0x3ff) * 16;
        let records = ((s.cap >> 40) & 0xff) + 1;
        match offset {
            reg::VER => 0x10,
            reg::CAP => s.cap as u32,
            o if o == reg::CAP + 4 => (s.cap >> 32) as u32,
            reg::ECAP => s.ecap as u32,
            o if o == reg::ECAP + 4 => (s.ecap >> 32) as u32,
            reg::GSTS => s.status,
            reg::FSTS => {
                let pending = if s.records.iter().any(Option::is_some) { fsts::PPF } else { 0 };
                s.regs.get(&reg::FSTS).copied().unwrap_or(0) | pending
            }
            reg::IQH => (s.head << 4) as u32,
            o if o >= fault_base && o < fault_base + 16 * records => {
                let i = ((o - fault_base) / 16) as usize;
                let (low, high) = s.records.get(i).copied().flatten().unwrap_or((0, 0));
                let q = if (o - fault_base) % 16 < 8 { low } else { high };
                if o % 8 == 0 {
                    q as u32
                } else {
                    (q >> 32) as u32
                }
            }
            o => s.regs.get(&o).copied().unwrap_or(0),
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let mut s = self.0.borrow_mut();
        let fault_base = ((s.cap >> 24) & 0x3ff) * 16;
        let iotlb = ((s.ecap >> 8) & 0x3ff) * 16 + 8;
        match offset {
            reg::GCMD => {
                // One-shot commands latch their register; persistent ones follow the bit.
                if value & gcmd::SRTP != 0 {
                    s.root = s.reg64(reg::RTADDR) & !0xfff;
                    s.status |= 1 << 30;
                }
                if value & gcmd::SIRTP != 0 {
                    s.irta = s.reg64(reg::IRTA);
                    s.status |= gcmd::SIRTP;
                }
                if value & gcmd::WBF != 0 {
                    s.log.write_buffer_flushes += 1;
                }
                for bit in [gcmd::TE, gcmd::QIE, gcmd::IRE, gcmd::CFI] {
                    if value & bit != 0 {
                        s.status |= bit;
                    } else {
                        s.status &= !bit;
                    }
                }
                if value & gcmd::QIE == 0 {
                    s.head = 0;
                }
            }
            o if o == reg::CCMD + 4 => {
                if value & (1 << 31) != 0 {
                    s.log.context_invalidations += 1;
                }
                s.regs.insert(o, value & !(1 << 31));
            }
            o if o == iotlb + 4 => {
                if value & (1 << 31) != 0 {
                    match (value >> 28) & 3 {
                        1 => s.log.iotlb_global += 1,
                        2 => s.log.iotlb_domain += 1,
                        _ => {
                            let page = s.reg64(iotlb - 8) & !0xfff;
                            s.log.iotlb_pages.push(page);
                        }
                    }
                    s.iotlb.clear();
                }
                s.regs.insert(o, value & !(1 << 31));
            }
            reg::IQT => {
                s.regs.insert(reg::IQT, value);
                if s.status & gcmd::QIE != 0 {
                    s.process_queue(u64::from(value >> 4) & 0xff);
                }
            }
            reg::FSTS => {
                let f = s.regs.entry(reg::FSTS).or_default();
                let resumes = *f & value & fsts::IQE != 0;
                *f &= !(value & (fsts::PFO | fsts::IQE));
                // Clearing a queue error resumes fetching at the head.
                if resumes && s.status & gcmd::QIE != 0 {
                    let tail = u64::from(s.regs.get(&reg::IQT).copied().unwrap_or(0) >> 4) & 0xff;
                    s.process_queue(tail);
                }
            }
            reg::PMEN => {
                // The status bit follows the enable bit at once.
                s.regs.insert(reg::PMEN, if value & (1 << 31) != 0 { value | 1 } else { 0 });
            }
            o if o >= fault_base && o % 16 == 12 && value & (1 << 31) != 0 => {
                let i = ((o - fault_base) / 16) as usize;
                if let Some(r) = s.records.get_mut(i) {
                    *r = None;
                }
            }
            o => {
                s.regs.insert(o, value);
            }
        }
    }

    fn write8(&mut self, offset: u64, value: u8) {
        let word = self.read32(offset & !3);
        let shift = (offset & 3) * 8;
        self.write32(offset & !3, (word & !(0xff << shift)) | (u32::from(value) << shift));
    }
}
