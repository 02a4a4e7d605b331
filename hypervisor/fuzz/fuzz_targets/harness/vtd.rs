//! The `vtd` target: the VT-d remapping-unit driver (`platform::vtd::Unit`)
//! and the DMA view (`platform::dma`) driven as bare metal drives them
//! (`arch::x86_64::iommu`), against the host model of a unit
//! (`platform::vtd::model`, written from the specification: registers,
//! invalidation queue, an IOTLB that keeps translations until they are
//! invalidated, DMA translated through the tables in memory).
//!
//! The input describes a machine: one to three units (QEMU's capabilities
//! with features flipped, or any CAP and ECAP values), what firmware left
//! on in each (translation, queued invalidation, interrupt remapping,
//! compatibility format, TXT's protected memory regions), a register block
//! of 4 to 16 KiB; the guest's e820 map, the hypervisor's ranges
//! (`keep_out`) and firmware's reserved regions (RMRRs), from which the
//! grants are computed (`dma::pass_through_grants`) and the units taken
//! over. Then a sequence of operations: the kernel view changing a page's
//! rights (the table update and every unit's IOTLB invalidation,
//! `iommu::kernel_view_changed`), devices behind any unit reading and
//! writing anywhere (guest RAM, the hypervisor, the DMA tables themselves,
//! beyond the address width), fault records taken, invalidations, interrupt
//! remapping turned on and device interrupts raised, units re-enabled, and a
//! unit turning hostile: registers that read what the input says (status,
//! fault status, command completion, fault records, anything) or writes it
//! ignores.
//!
//! Properties, checked after every step against the harness's own
//! reference (not the code under test):
//! * the view grants a page exactly the kernel view's read and write rights
//!   if it is guest RAM clear of the hypervisor's ranges or an RMRR that
//!   overlaps none of them, and nothing otherwise; a page touching the
//!   hypervisor's ranges or holding the DMA tables is never granted;
//! * on a unit whose driver calls all succeeded since it last enabled
//!   honestly, a device's access succeeds exactly when the view grants it:
//!   no stale IOTLB entry survives a permission drop once the call that
//!   made it returns, and a device never reaches memory the view does not
//!   grant;
//! * on an honest unit with QEMU's register layout every driver call
//!   succeeds (interrupt remapping without queued invalidation excepted),
//!   and the fault records taken are exactly the faults the devices caused
//!   (the first as many as the unit records, the rest an overflow);
//! * whatever the registers say, the driver does not panic (it returns
//!   errors, within its poll budget), touches no register outside the
//!   block, never writes the root-table pointer with anything but the
//!   view's root, never turns translation off, and takes at most as many
//!   fault records as the unit has;
//! * with interrupt remapping on, a device's interrupt is delivered only
//!   through a present entry naming that device, with that entry's vector
//!   (never an exception vector), and compatibility format is blocked.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::guest::linux::{e820, E820Entry};
use hypervisor::mm::frames::Region;
use hypervisor::mm::paging::{Perms, TableMemory};
use hypervisor::platform::dma::{self, DmaView, DOMAIN};
use hypervisor::platform::dmar::Reserved;
use hypervisor::platform::vtd::format::{self, Fault, FaultAccess};
use hypervisor::platform::vtd::{gcmd, reg, Unit, VtdError};
use hypervisor::platform::Mmio;
use hypervisor::testing::{ModelUnit, Shared, QEMU_CAP, QEMU_ECAP};

const PAGE: u64 = 4096;
/// Guest addresses the input names: 16 MiB (eight 2 MiB pages), so that
/// operations often meet on the same page.
const SPACE: u64 = 1 << 24;
/// Where `HeapTables` puts table frames (the DMA tables, the queue, the
/// interrupt table): hypervisor memory a device must never reach.
const TABLES: u64 = 0x7_0000_0000;
/// Polls before the driver gives up on a command.
const POLLS: u32 = 64;
const MAX_OPS: usize = 64;

/// CAP bits an input may flip on QEMU's unit: RWBF, PLMR, PHMR, caching
/// mode, SAGAW, 2 MiB and 1 GiB pages, page-selective invalidation.
const CAP_FLIPS: u64 = (0xf << 4) | (0x1f << 8) | (3 << 34) | (1 << 39);
/// ECAP bits: coherent walks, queued invalidation, interrupt remapping.
const ECAP_FLIPS: u64 = 0b1011;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Caps {
    Qemu { cap: u64, ecap: u64 },
    Raw { cap: u64, ecap: u64 },
}

#[derive(Arbitrary, Debug)]
struct UnitSpec {
    caps: Caps,
    /// Left on by firmware: TE, QIE, IRE, CFI (bits 0-3), PMEN (bit 4).
    firmware: u8,
    /// The register block: 4 KiB << (size % 3).
    size: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Where {
    Page(u16),
    /// One of the addresses the machine makes interesting (region edges,
    /// the tables), moved by `delta` pages.
    Edge(u8, i8),
    Any(u64),
    /// A page an earlier operation touched.
    Recent(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Register {
    Gsts,
    Fsts,
    Ccmd,
    Iotlb,
    Pmen,
    Iqh,
    FaultRecord(u8, u8),
    Any(u16),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// With `warm`, every unit's device `source` reads and writes the
    /// page first (filling the IOTLB) and again once the change returns.
    KernelView {
        at: Where,
        perms: u8,
        warm: Option<u16>,
    },
    Dma {
        unit: u8,
        source: u16,
        at: Where,
        offset: u16,
        write: bool,
        value: u8,
    },
    TakeFaults {
        unit: u8,
    },
    Invalidate {
        unit: u8,
        pages: Vec<Where>,
    },
    InvalidateAll {
        unit: u8,
    },
    Enable {
        unit: u8,
    },
    /// The unit's `register` reads `value` for the next `reads` reads (0:
    /// until it turns honest).
    Lie {
        unit: u8,
        register: Register,
        value: u32,
        reads: u8,
    },
    Deaf {
        unit: u8,
    },
    Honest {
        unit: u8,
    },
    InterruptRemapping {
        unit: u8,
        size_log2: u8,
        entries: Vec<(u8, u8, u8, u16, bool)>,
    },
    Interrupt {
        unit: u8,
        source: u16,
        index: Option<u16>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    units: Vec<UnitSpec>,
    /// e820 entries: (start, end, kind), bytes below 16 MiB.
    e820: Vec<(u32, u32, u8)>,
    /// The hypervisor's ranges: (start, length - 1).
    keep_out: Vec<(u32, u32)>,
    /// RMRRs: (first page, pages - 1).
    rmrr: Vec<(u16, u8)>,
    ops: Vec<Op>,
}

/// Register reads the input makes up, and writes it drops.
#[derive(Default)]
struct Lies {
    reads: BTreeMap<u64, (u32, u8)>,
    deaf: bool,
    /// What the driver last read from GSTS.
    last_status: Option<u32>,
    /// The root table the driver must point the unit at.
    root: Option<u64>,
}

/// A unit's register block as the driver sees it: the model behind the
/// lies, with every access checked.
#[derive(Clone)]
struct Regs {
    model: ModelUnit,
    size: u64,
    lies: Rc<RefCell<Lies>>,
}

impl Regs {
    fn inside(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.size),
            "register access at {offset:#x} outside the {:#x}-byte block",
            self.size
        );
    }
}

impl Mmio for Regs {
    fn read32(&mut self, offset: u64) -> u32 {
        self.inside(offset, 4);
        let honest = self.model.read32(offset);
        let mut lies = self.lies.borrow_mut();
        let value = match lies.reads.get_mut(&offset) {
            Some((value, left)) => {
                let value = *value;
                match *left {
                    0 => {}
                    1 => {
                        lies.reads.remove(&offset);
                    }
                    _ => *left -= 1,
                }
                value
            }
            None => honest,
        };
        if offset == reg::GSTS {
            lies.last_status = Some(value);
        }
        value
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.inside(offset, 4);
        let lies = self.lies.borrow();
        if let Some(root) = lies.root {
            if offset == reg::RTADDR || offset == reg::RTADDR + 4 {
                let expected = if offset == reg::RTADDR { root as u32 } else { (root >> 32) as u32 };
                assert_eq!(value, expected, "root-table pointer written with something else");
            }
        }
        if offset == reg::GCMD && value & gcmd::TE == 0 && self.model.status() & gcmd::TE != 0 {
            // Only a unit that said translation was off gets it turned off.
            assert!(
                lies.last_status.is_some_and(|s| s & gcmd::TE == 0),
                "the driver turned translation off: GCMD {value:#x}"
            );
        }
        if !lies.deaf {
            drop(lies);
            self.model.write32(offset, value);
        }
    }

    fn write8(&mut self, offset: u64, value: u8) {
        self.inside(offset, 1);
        if !self.lies.borrow().deaf {
            self.model.write8(offset, value);
        }
    }
}

/// A fault the model recorded (or counted as an overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Recorded {
    source: u16,
    address: u64,
    reason: u8,
    read: bool,
}

struct Irt {
    size: u64,
    /// index -> (vector, source id)
    entries: BTreeMap<u64, (u8, u16)>,
}

struct UnitState {
    model: ModelUnit,
    lies: Rc<RefCell<Lies>>,
    driver: Unit<Regs>,
    /// QEMU's layout with features flipped: an honest unit must work.
    qemu: bool,
    /// Every driver call succeeded since the last honest enable, and the
    /// unit has not lied since: its translations are the view's.
    trusted: bool,
    /// Never lied since probe: its fault records are exactly the faults.
    honest_ever: bool,
    /// Faults since the last take, in recording order.
    pending: Vec<Recorded>,
    irt: Option<Irt>,
}

impl UnitState {
    fn lying(&self) -> bool {
        let l = self.lies.borrow();
        l.deaf || !l.reads.is_empty()
    }

    /// The unit turns hostile: whatever the driver did before may be undone
    /// (interrupt remapping included) until it enables again.
    fn distrust(&mut self) {
        self.trusted = false;
        self.honest_ever = false;
        self.irt = None;
    }

    /// A driver call returned: on an honest unit with QEMU's layout it
    /// must have succeeded; any failure ends the trust.
    fn outcome<T: std::fmt::Debug>(&mut self, what: &str, r: &Result<T, VtdError>) {
        if r.is_err() {
            assert!(!(self.qemu && self.honest_ever), "{what} failed on an honest unit: {r:?}");
            self.trusted = false;
        }
    }
}

struct Machine {
    units: Vec<UnitState>,
    view: DmaView<Shared>,
    ram: Vec<Region>,
    keep: Vec<Region>,
    rmrr: Vec<Region>,
    /// The kernel view's rights, where it changed them (else RWX).
    kernel: BTreeMap<u64, Perms>,
    edges: Vec<u64>,
    /// Pages operations touched, latest last (at most 16).
    recent: Vec<u64>,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let Some(mut m) = Machine::take_over(&input) else { return };
    m.check_view(&[]);
    for op in input.ops.iter().take(MAX_OPS) {
        let pages = m.step(op);
        m.check_view(&pages);
        for p in pages {
            if !m.recent.contains(&p) {
                if m.recent.len() == 16 {
                    m.recent.remove(0);
                }
                m.recent.push(p);
            }
        }
    }
}

fn caps(c: Caps) -> (u64, u64, bool) {
    match c {
        Caps::Qemu { cap, ecap } => (QEMU_CAP ^ (cap & CAP_FLIPS), QEMU_ECAP ^ (ecap & ECAP_FLIPS), true),
        Caps::Raw { cap, ecap } => (cap, ecap, false),
    }
}

impl Machine {
    /// `iommu::take_over`: probe every unit, build the view, enable.
    fn take_over(input: &Input) -> Option<Machine> {
        let mem = Shared::default();
        let mut units = Vec::new();
        for spec in input.units.iter().take(3) {
            let (cap, ecap, qemu) = caps(spec.caps);
            let model = ModelUnit::new(mem.clone(), cap, ecap);
            model.set_status([gcmd::TE, gcmd::QIE, gcmd::IRE, gcmd::CFI].iter().enumerate().fold(0, |s, (i, b)| {
                if spec.firmware & (1 << i) != 0 {
                    s | b
                } else {
                    s
                }
            }));
            if spec.firmware & 16 != 0 {
                model.clone().write32(reg::PMEN, 1 << 31);
            }
            let size = PAGE << (spec.size % 3);
            let lies = Rc::new(RefCell::new(Lies::default()));
            let regs = Regs { model: model.clone(), size, lies: lies.clone() };
            let mut driver = match Unit::probe(regs, 0xfed9_0000 + 0x10000 * units.len() as u64, size) {
                Ok(d) => d,
                Err(e) => {
                    assert_eq!(e, VtdError::NoUnit);
                    assert!(!qemu, "QEMU's unit refused");
                    return None;
                }
            };
            // What probe accepted is a layout the driver can use: fault
            // records and IOTLB registers inside the block, clear of the
            // architectural registers and of each other.
            let (fault, records, iotlb) =
                (driver.cap.fault_offset(), driver.cap.fault_records(), driver.ecap.iotlb_offset());
            assert!(fault >= 0x100 && fault + 16 * records <= size, "fault records at {fault:#x}");
            assert!(iotlb >= 0xf0 && iotlb + 16 <= size, "IOTLB registers at {iotlb:#x}");
            assert!(iotlb + 16 <= fault || fault + 16 * records <= iotlb, "IOTLB registers among the fault records");
            driver.set_polls(POLLS);
            units.push(UnitState {
                model,
                lies,
                driver,
                qemu,
                trusted: false,
                honest_ever: true,
                pending: Vec::new(),
                irt: None,
            });
        }
        if units.is_empty() {
            return None;
        }
        let levels = [4u8, 3].into_iter().find(|&l| units.iter().all(|u| u.driver.cap.supports_levels(l)))?;
        let largest = dma::largest_page(
            units.iter().all(|u| u.driver.cap.pages_2m()),
            units.iter().all(|u| u.driver.cap.pages_1g()),
        );
        let mut view = DmaView::new(mem, levels, largest).expect("tables for an empty view");
        assert_eq!(view.levels(), levels);

        let mut e820 = Vec::new();
        for &(a, b, kind) in input.e820.iter().take(8) {
            let (a, b) = (u64::from(a) % SPACE, u64::from(b) % SPACE);
            let kind = if kind % 3 == 0 { e820::RESERVED } else { e820::RAM };
            e820.push(E820Entry { region: Region::new(a.min(b), a.max(b)), kind });
        }
        let keep: Vec<Region> = input
            .keep_out
            .iter()
            .take(6)
            .map(|&(start, len)| {
                let start = u64::from(start) % SPACE;
                Region::new(start, start + u64::from(len) % (2 << 20) + 1)
            })
            .collect();
        let rmrr: Vec<Reserved> = input
            .rmrr
            .iter()
            .take(4)
            .map(|&(page, pages)| {
                let base = u64::from(page) * PAGE;
                Reserved { segment: 0, base, end: base + (u64::from(pages) + 1) * PAGE, scopes: Vec::new() }
            })
            .collect();
        let (grants, refused) = dma::pass_through_grants(&e820, &keep, &rmrr);
        for r in &refused {
            assert!(keep.iter().any(|k| k.overlaps(r)), "RMRR {r:?} refused though clear of the hypervisor");
        }
        for &g in &grants {
            let _ = view.grant(g).expect("grants below 16 MiB fit the tables");
        }
        let root = view.root_table();
        let mut m = Machine {
            units,
            view,
            ram: e820.iter().filter(|e| e.kind == e820::RAM).map(|e| e.region).collect(),
            keep,
            rmrr: rmrr.iter().map(|r| Region::new(r.base, r.end)).collect(),
            kernel: BTreeMap::new(),
            edges: Vec::new(),
            recent: Vec::new(),
        };
        let mut edges = vec![root, TABLES, TABLES + PAGE, 0, SPACE - PAGE, 1 << 39, 1 << 48];
        for r in m.ram.iter().chain(&m.keep).chain(&m.rmrr).chain(grants.iter()) {
            edges.extend([r.start, r.end, r.end.saturating_sub(1)]);
        }
        for e in &mut edges {
            *e &= !(PAGE - 1);
        }
        edges.sort_unstable();
        edges.dedup();
        m.edges = edges;
        for i in 0..m.units.len() {
            m.units[i].lies.borrow_mut().root = Some(root);
            m.enable(i);
        }
        Some(m)
    }

    fn enable(&mut self, i: usize) {
        let root = self.view.root_table();
        let u = &mut self.units[i];
        let lying = u.lying();
        let r = u.driver.enable(&mut self.view.mem, root, DOMAIN);
        u.outcome("enable", &r);
        if r.is_ok() && !lying && !u.lying() {
            u.trusted = true;
            assert_ne!(u.model.status() & gcmd::TE, 0, "enabled without translation");
            if u.driver.pmr_was_on {
                assert_eq!(u.model.clone().read32(reg::PMEN), 0, "protected memory regions left on");
            }
        }
    }

    fn unit(&self, i: u8) -> usize {
        usize::from(i) % self.units.len()
    }

    fn pick(&self, w: Where) -> u64 {
        match w {
            Where::Page(p) => u64::from(p) * PAGE % SPACE,
            Where::Edge(i, delta) => {
                let base = self.edges[usize::from(i) % self.edges.len()];
                base.wrapping_add_signed(i64::from(delta) * PAGE as i64)
            }
            Where::Any(a) => a & !(PAGE - 1),
            Where::Recent(i) if !self.recent.is_empty() => self.recent[usize::from(i) % self.recent.len()],
            Where::Recent(i) => u64::from(i) * PAGE,
        }
    }

    /// The reference: what devices may do on `page`.
    fn expected(&self, page: u64) -> Perms {
        let Some(end) = page.checked_add(PAGE) else { return Perms::empty() };
        let this = Region::new(page, end);
        let hypervisor = self.keep.iter().any(|k| k.overlaps(&this));
        let ram = self.ram.iter().any(|r| r.start <= page && end <= r.end);
        let reserved = self.rmrr.iter().any(|r| r.contains(page) && !self.keep.iter().any(|k| k.overlaps(r)));
        if (ram && !hypervisor) || reserved {
            self.kernel.get(&page).copied().unwrap_or(Perms::RWX) & Perms::RW
        } else {
            Perms::empty()
        }
    }

    /// The view against the reference on the pages an operation touched
    /// and every interesting edge.
    fn check_view(&self, pages: &[u64]) {
        for &p in pages.iter().chain(&self.edges) {
            let got = self.view.perms(p).unwrap_or(Perms::empty());
            assert_eq!(got, self.expected(p), "devices' rights on {p:#x}");
            if self.keep.iter().any(|k| k.overlaps(&Region::new(p, p.saturating_add(PAGE)))) || p >= TABLES {
                assert!(got.is_empty(), "devices reach hypervisor memory at {p:#x}");
            }
        }
    }

    /// A device behind unit `i` reads or writes one byte: on a trusted unit
    /// it succeeds exactly when the view grants it, and a write lands.
    fn dma(&mut self, i: usize, source: u16, address: u64, write: bool, value: u8) {
        let page = address & !(PAGE - 1);
        let u = &self.units[i];
        let r = if write {
            u.model.dma_write(source, address, &[value]).map(|()| value)
        } else {
            u.model.dma_read(source, address)
        };
        let want = if write { Perms::WRITE } else { Perms::READ };
        if u.trusted {
            let allowed = self.expected(page).contains(want);
            assert_eq!(r.is_ok(), allowed, "device {source:#06x} {want:?} at {address:#x} on unit {i}: {r:?}");
            if write && r.is_ok() {
                assert_eq!(u.model.peek(address), value);
            }
        }
        if let Err(reason) = r {
            self.units[i].pending.push(Recorded { source, address: page, reason, read: !write });
        }
    }

    /// Device `source` behind every unit reads `page` and writes a byte at
    /// `offset` in it.
    fn touch(&mut self, source: u16, page: u64, offset: u64) {
        for i in 0..self.units.len() {
            self.dma(i, source, page, false, 0);
            self.dma(i, source, page | offset, true, 0x5a ^ offset as u8);
        }
    }

    fn step(&mut self, op: &Op) -> Vec<u64> {
        match *op {
            Op::KernelView { at, perms, warm } => {
                let page = self.pick(at);
                if let Some(source) = warm {
                    self.touch(source, page, 8);
                }
                let perms = Perms::from_bits_truncate(perms);
                // `iommu::kernel_view_changed`.
                match self.view.set_perms(page, perms) {
                    Ok(flush) if flush.is_needed() => {
                        for u in &mut self.units {
                            let r = u.driver.invalidate_pages(&mut self.view.mem, DOMAIN, &[page]);
                            u.outcome("invalidate_pages", &r);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => assert!(page >= 1 << 39, "set_perms({page:#x}): {e:?}"),
                }
                // The kernel view's pages are guest memory: below 2^39 here.
                if page < 1 << 39 {
                    self.kernel.insert(page, perms);
                }
                if let Some(source) = warm {
                    self.touch(source, page, 16);
                }
                vec![page]
            }
            Op::Dma { unit, source, at, offset, write, value } => {
                let i = self.unit(unit);
                let page = self.pick(at);
                self.dma(i, source, page | u64::from(offset % PAGE as u16), write, value);
                vec![page]
            }
            Op::TakeFaults { unit } => {
                let i = self.unit(unit);
                let u = &mut self.units[i];
                let (faults, overflowed) = u.driver.take_faults();
                assert!(faults.len() as u64 <= u.driver.cap.fault_records());
                let pending = std::mem::take(&mut u.pending);
                if u.honest_ever {
                    let records = u.driver.cap.fault_records() as usize;
                    let expected: Vec<Fault> = pending.iter().take(records).map(|r| fault(*r)).collect();
                    assert_eq!(faults, expected, "fault records");
                    assert_eq!(overflowed, pending.len() > records, "overflow");
                    assert_eq!(u.driver.take_faults(), (vec![], false), "records cleared once taken");
                }
                vec![]
            }
            Op::Invalidate { unit, ref pages } => {
                let i = self.unit(unit);
                let pages: Vec<u64> = pages.iter().take(40).map(|&w| self.pick(w)).collect();
                let u = &mut self.units[i];
                let r = u.driver.invalidate_pages(&mut self.view.mem, DOMAIN, &pages);
                u.outcome("invalidate_pages", &r);
                pages
            }
            Op::InvalidateAll { unit } => {
                let i = self.unit(unit);
                let u = &mut self.units[i];
                let r = u.driver.invalidate_all(&mut self.view.mem, DOMAIN);
                u.outcome("invalidate_all", &r);
                vec![]
            }
            Op::Enable { unit } => {
                let i = self.unit(unit);
                self.enable(i);
                vec![]
            }
            Op::Lie { unit, register, value, reads } => {
                let i = self.unit(unit);
                let u = &mut self.units[i];
                let offset = match register {
                    Register::Gsts => reg::GSTS,
                    Register::Fsts => reg::FSTS,
                    Register::Ccmd => reg::CCMD + 4,
                    Register::Iotlb => u.driver.ecap.iotlb_offset() + 12,
                    Register::Pmen => reg::PMEN,
                    Register::Iqh => reg::IQH,
                    Register::FaultRecord(record, word) => {
                        let record = u64::from(record) % u.driver.cap.fault_records();
                        u.driver.cap.fault_offset() + 16 * record + 4 * u64::from(word % 4)
                    }
                    Register::Any(o) => u64::from(o) & 0xffc,
                };
                u.lies.borrow_mut().reads.insert(offset, (value, reads));
                u.distrust();
                vec![]
            }
            Op::Deaf { unit } => {
                let i = self.unit(unit);
                let u = &mut self.units[i];
                u.lies.borrow_mut().deaf = true;
                u.distrust();
                vec![]
            }
            Op::Honest { unit } => {
                let i = self.unit(unit);
                let mut l = self.units[i].lies.borrow_mut();
                l.reads.clear();
                l.deaf = false;
                vec![]
            }
            Op::InterruptRemapping { unit, size_log2, ref entries } => {
                let i = self.unit(unit);
                let table = self.view.mem.alloc_table().expect("memory for an interrupt table");
                let mut irt = Irt { size: 2 << (size_log2.clamp(1, 16) - 1), entries: BTreeMap::new() };
                for &(index, vector, destination, source, lowest) in entries.iter().take(16) {
                    let delivery = if lowest { format::Delivery::LowestPriority } else { format::Delivery::Fixed };
                    match format::irte(vector, destination, delivery, source) {
                        Ok((low, high)) => {
                            let index = u64::from(index);
                            self.view.mem.write(table, 2 * index as usize, low);
                            self.view.mem.write(table, 2 * index as usize + 1, high);
                            irt.entries.insert(index, (vector, source));
                        }
                        Err(format::IrteError::ExceptionVector(v)) => assert!(v < 32 && v == vector),
                    }
                }
                let u = &mut self.units[i];
                let lying = u.lying();
                let r = u.driver.enable_interrupt_remapping(&mut self.view.mem, table, size_log2);
                if !u.driver.ecap.queued_invalidation() {
                    assert_eq!(r, Err(VtdError::NoQueuedInvalidation));
                } else {
                    u.outcome("enable_interrupt_remapping", &r);
                }
                if r.is_ok() && !lying && !u.lying() {
                    assert_eq!(
                        u.model.status() & (gcmd::IRE | gcmd::CFI),
                        gcmd::IRE,
                        "remapping on, compatibility blocked"
                    );
                    u.irt = Some(irt);
                } else {
                    u.irt = None;
                }
                vec![]
            }
            Op::Interrupt { unit, source, index } => {
                let i = self.unit(unit);
                let u = &mut self.units[i];
                let r = u.model.interrupt(source, index);
                if let (Some(irt), true) = (&u.irt, u.trusted && !u.lying()) {
                    let expected = match index.map(u64::from) {
                        None => Err(0x25),
                        Some(x) if x >= irt.size => Err(0x20),
                        Some(x) => match irt.entries.get(&x) {
                            None => Err(0x22),
                            Some(&(_, s)) if s != source => Err(0x26),
                            Some(&(vector, _)) => Ok(vector),
                        },
                    };
                    assert_eq!(r, expected, "interrupt from {source:#06x} index {index:?}");
                }
                if let Err(reason) = r {
                    let address = index.map_or(0, |x| u64::from(x) << 48);
                    u.pending.push(Recorded { source, address, reason, read: false });
                }
                vec![]
            }
        }
    }
}

fn fault(r: Recorded) -> Fault {
    let access = if r.reason >= 0x20 {
        FaultAccess::Interrupt
    } else if r.read {
        FaultAccess::Read
    } else {
        FaultAccess::Write
    };
    Fault { source_id: r.source, address: r.address, reason: r.reason, access }
}
