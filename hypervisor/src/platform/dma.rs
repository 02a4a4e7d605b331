//! The DMA view: what devices may read and write.
//!
//! Every device is in one domain whose second-level tables map, one to one,
//! the RAM of the guest that owns the machine's devices, and nothing else:
//! not the hypervisor's image, pool and the other guests' memory, not the
//! boot data CTVM writes for the guest, not tboot's memory, not the TIS
//! window, not any device's registers (no peer-to-peer DMA). Without such a
//! guest no device may touch memory at all. Firmware's reserved DMA regions
//! (RMRRs) stay mapped unless they overlap what the hypervisor keeps.
//!
//! The view then follows the guest's kernel view (KEPT): a page the kernel
//! view maps without write rights (kernel text, rodata, the IDT, the syscall
//! table, the kernel's page tables, the agent) is read-only to devices too,
//! a page the kernel view unmaps is unmapped for devices, and mapped again
//! (if it was granted) when the kernel view maps it again. The integrity
//! code reports each change through [`DmaControl::kernel_view_changed`]
//! ([`Remapping`] carries it out on the units). When devices' rights can
//! no longer be shown to follow (tables or an invalidation failed), DMA
//! containment is lost and [`stops`] says which guests stop: fail closed.

use alloc::vec::Vec;

use super::dmar::Reserved;
use super::vtd::format::{context_entry, root_entry, Fault, FaultAccess, SlTable};
use super::vtd::{Unit, VtdError};
use super::Mmio;
use crate::exits::StopReason;
use crate::guest::linux::{e820, E820Entry};
use crate::mm::frames::{Region, PAGE_SIZE};
use crate::mm::paging::{Attrs, Flush, MapError, MemType, PageSize, Perms, TableMemory};

/// The domain id of the one domain.
pub const DOMAIN: u16 = 1;

/// Keeps device access in step with the kernel view. The bare-metal
/// implementation updates the tables and invalidates every unit's IOTLB
/// before returning; a machine without an IOMMU ignores it.
pub trait DmaControl {
    /// The kernel view now grants `perms` on the 4 KiB page at `page`
    /// (empty: unmapped). Devices get at most its read and write rights.
    /// `Err`: that can no longer be shown to hold for every device (a
    /// device may keep more than the kernel view grants): the caller must
    /// stop the guests of [`stops`], not run on.
    fn kernel_view_changed(&mut self, page: u64, perms: Perms) -> Result<(), ContainmentLost>;
}

/// Why devices' rights can no longer be shown to follow the kernel view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainmentLost {
    /// The DMA tables could not take the change of `page` (no memory to
    /// split a large page): devices keep the rights they had.
    Tables { page: u64, error: MapError },
    /// A unit did not confirm the IOTLB invalidation, even after the
    /// driver's recovery of a refused descriptor, or timed out: it may
    /// still hold the old, wider rights.
    Invalidation { unit: u64, error: VtdError },
}

impl core::fmt::Display for ContainmentLost {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Tables { page, error: MapError::OutOfMemory } => {
                write!(f, "devices' rights on {page:#x} could not follow the kernel view: no memory for the DMA tables")
            }
            Self::Tables { page, error } => {
                write!(f, "devices' rights on {page:#x} could not follow the kernel view: {error:?}")
            }
            Self::Invalidation { unit, error } => {
                write!(f, "IOTLB invalidation on the unit at {unit:#x} failed: {error}")
            }
        }
    }
}

/// The machine's remapping units and the one DMA view they all walk: the
/// [`DmaControl`] of a machine with an IOMMU (the arch layer holds one
/// behind its lock and adds only the registers and the frames).
pub struct Remapping<T: TableMemory, M: Mmio> {
    pub units: Vec<Unit<M>>,
    pub view: DmaView<T>,
}

impl<T: TableMemory, M: Mmio> DmaControl for Remapping<T, M> {
    /// Every unit is invalidated even after one failed: the others must not
    /// be left stale too. The first failure is returned.
    fn kernel_view_changed(&mut self, page: u64, perms: Perms) -> Result<(), ContainmentLost> {
        let flush = self.view.set_perms(page, perms).map_err(|error| ContainmentLost::Tables { page, error })?;
        if !flush.is_needed() {
            return Ok(());
        }
        let mut lost = None;
        for u in &mut self.units {
            if let Err(error) = u.invalidate_pages(&mut self.view.mem, DOMAIN, &[page]) {
                lost.get_or_insert(ContainmentLost::Invalidation { unit: u.base, error });
            }
        }
        lost.map_or(Ok(()), Err)
    }
}

/// Which guests stop, and why, once DMA containment is lost: every guest
/// that can program the machine's devices (`owns_devices`; there is at
/// most one, the pass-through guest). The others keep running: the view
/// never mapped their memory, so no device reaches it, stale entry or not.
///
/// The units are left translating on the view as it now is. Turning
/// translation off would let DMA through untranslated, to anything.
/// Pointing the context entries at an empty table takes effect on a unit
/// only through a context-cache and IOTLB invalidation: on the unit that
/// just failed one, that proves nothing; on the others it would only cut
/// devices off from the stopped guest's RAM. That RAM is all a stale entry
/// can reach (the view maps only the device owner's RAM and clean RMRRs,
/// never the hypervisor's memory or another guest's, and the owner's RAM
/// never returns to the pool), and once its guest is stopped nothing relies
/// on what is in it.
pub fn stops<'g, G>(
    lost: &ContainmentLost,
    guests: &'g [G],
    owns_devices: impl Fn(&G) -> bool,
) -> Vec<(&'g G, StopReason)> {
    guests.iter().filter(|g| owns_devices(g)).map(|g| (g, StopReason::DmaContainmentLost(lost.clone()))).collect()
}

/// The device tables: a root table whose 256 buses share one context table
/// whose 256 functions all point at the same second-level hierarchy.
pub struct DmaView<T: TableMemory> {
    table: SlTable,
    pub mem: T,
    root: u64,
    /// What [`DmaView::grant`] covered: the most a device may ever reach.
    granted: Vec<Region>,
}

impl<T: TableMemory> DmaView<T> {
    /// A view in which no device may access anything yet.
    pub fn new(mut mem: T, levels: u8, largest: PageSize) -> Result<Self, MapError> {
        let table = SlTable::with_levels(&mut mem, largest, levels)?;
        let context = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        let (low, high) = context_entry(table.root(), levels, DOMAIN);
        for devfn in 0..256 {
            mem.write(context, 2 * devfn, low);
            mem.write(context, 2 * devfn + 1, high);
        }
        let root = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
        for bus in 0..256 {
            mem.write(root, 2 * bus, root_entry(context));
        }
        Ok(DmaView { table, mem, root, granted: Vec::new() })
    }

    /// The root table, for every unit's RTADDR.
    pub fn root_table(&self) -> u64 {
        self.root
    }

    pub fn levels(&self) -> u8 {
        self.table.levels()
    }

    /// Lets devices read and write `region` (identity mapped).
    pub fn grant(&mut self, region: Region) -> Result<Flush, MapError> {
        let flush = self.table.map(
            &mut self.mem,
            region.start,
            region.start,
            region.len(),
            Attrs::new(Perms::RW, MemType::WriteBack),
        )?;
        self.granted.push(region);
        Ok(flush)
    }

    /// Devices' rights on one page: the read and write parts of `perms`.
    /// A page outside the guest's memory is never mapped by this, whatever
    /// `perms` says: only a page [`DmaView::grant`] covered can change, and
    /// one the kernel view unmapped comes back when it maps it again.
    pub fn set_perms(&mut self, page: u64, perms: Perms) -> Result<Flush, MapError> {
        let page = page & !(PAGE_SIZE - 1);
        let perms = perms & Perms::RW;
        match self.table.translate(&self.mem, page) {
            None if perms.is_empty() => Ok(Flush::NONE),
            None => {
                let end = page.checked_add(PAGE_SIZE).ok_or(MapError::Misaligned)?;
                if !self.granted.iter().any(|g| g.start <= page && end <= g.end) {
                    return Ok(Flush::NONE);
                }
                let _ = self.table.map(&mut self.mem, page, page, PAGE_SIZE, Attrs::new(perms, MemType::WriteBack))?;
                // Not present to present: a unit in caching mode may have
                // cached the absence.
                Ok(Flush::NEEDED)
            }
            Some(_) if perms.is_empty() => self.table.unmap(&mut self.mem, page, PAGE_SIZE),
            Some(_) => self.table.protect(&mut self.mem, page, PAGE_SIZE, perms),
        }
    }

    /// What devices may do at `address`.
    pub fn perms(&self, address: u64) -> Option<Perms> {
        self.table.translate(&self.mem, address).map(|t| t.attrs.perms)
    }

    /// Every mapped range with its rights, in address order (merged).
    pub fn ranges(&self) -> Vec<(Region, Perms)> {
        let mut out: Vec<(Region, Perms)> = Vec::new();
        self.table.for_each_leaf(&self.mem, |a, t| {
            let end = a + t.size.bytes();
            match out.last_mut() {
                Some((r, p)) if r.end == a && *p == t.attrs.perms => r.end = end,
                _ => out.push((Region::new(a, end), t.attrs.perms)),
            }
        });
        out
    }
}

/// What devices may reach when a guest owns the machine's devices: the RAM
/// of its e820 map (built as the guest's own, with `keep_out` reserved),
/// and the RMRRs that stay clear of `keep_out`. Returns the regions to
/// grant and the RMRRs refused.
pub fn pass_through_grants(
    guest_e820: &[E820Entry],
    keep_out: &[Region],
    reserved: &[Reserved],
) -> (Vec<Region>, Vec<Region>) {
    let mut grants = Vec::new();
    for e in guest_e820.iter().filter(|e| e.kind == e820::RAM) {
        let r = e.region.page_aligned_inside();
        if !r.is_empty() {
            subtract(r, keep_out, &mut grants);
        }
    }
    let mut refused = Vec::new();
    for rmrr in reserved {
        let r = Region::new(rmrr.base, rmrr.end);
        if keep_out.iter().any(|k| k.overlaps(&r)) {
            refused.push(r);
        } else {
            grants.push(r);
        }
    }
    grants.sort_by_key(|r| r.start);
    (grants, refused)
}

/// `r` minus every range in `holes` (page-widened), appended to `out`.
fn subtract(r: Region, holes: &[Region], out: &mut Vec<Region>) {
    let mut pieces = alloc::vec![r];
    for h in holes {
        let h = Region::new(h.start & !(PAGE_SIZE - 1), h.end.next_multiple_of(PAGE_SIZE));
        pieces = pieces
            .into_iter()
            .flat_map(|p| {
                if !p.overlaps(&h) {
                    return alloc::vec![p];
                }
                [Region::new(p.start, h.start.max(p.start)), Region::new(h.end.min(p.end), p.end)]
                    .into_iter()
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .collect();
    }
    out.extend(pieces);
}

/// One fault a unit recorded, as its console line:
/// `ctvm: dma-violation device=00:03.0 address=0x200000 access=write reason=0x5 (...) unit=0xfed90000`.
pub struct Violation {
    pub unit: u64,
    pub fault: Fault,
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (bus, dev, func) = self.fault.device();
        let access = match self.fault.access {
            FaultAccess::Read => "read",
            FaultAccess::Write => "write",
            FaultAccess::Interrupt => "interrupt",
        };
        write!(
            f,
            "ctvm: dma-violation device={bus:02x}:{dev:02x}.{func} address={:#x} access={access} reason={:#x} ({}) unit={:#x}",
            self.fault.address,
            self.fault.reason,
            self.fault.reason_text(),
            self.unit
        )
    }
}

/// The largest leaf both the view and every unit support.
pub fn largest_page(units_2m: bool, units_1g: bool) -> PageSize {
    match (units_2m, units_1g) {
        (true, true) => PageSize::Size1G,
        (true, false) => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::vmx::ept::EptTable;
    use crate::guest::linux::build_e820;
    use crate::mm::paging::host::HeapTables;
    use crate::platform::vtd::model::{ModelUnit, Shared};

    const M: u64 = 1 << 20;

    /// Bochs-like firmware map (256 MiB) and a hypervisor at 2 MiB with a
    /// 64 MiB pool at the top, as bare_metal lays them out.
    fn machine() -> (Vec<E820Entry>, Vec<Region>) {
        let firmware = alloc::vec![
            E820Entry { region: Region::new(0, 0x9f000), kind: e820::RAM },
            E820Entry { region: Region::new(0x9f000, 0xa0000), kind: e820::RESERVED },
            E820Entry { region: Region::new(0xe8000, M), kind: e820::RESERVED },
            E820Entry { region: Region::new(M, 0xfff_0000), kind: e820::RAM },
            E820Entry { region: Region::new(0xfff_0000, 0x1000_0000), kind: e820::ACPI },
        ];
        let keep = alloc::vec![
            Region::new(2 * M, 3 * M + 0x4000),
            Region::new(0xb00_0000, 0xf00_0000),
            Region::new(0xfed9_0000, 0xfed9_1000)
        ];
        (firmware, keep)
    }

    fn guest_e820(firmware: &[E820Entry], keep: &[Region]) -> Vec<E820Entry> {
        let overlays: Vec<E820Entry> = keep.iter().map(|&r| E820Entry { region: r, kind: e820::RESERVED }).collect();
        build_e820(firmware, &overlays).unwrap()
    }

    fn view(grants: &[Region]) -> (DmaView<Shared>, Shared) {
        let mem = Shared::default();
        let mut v = DmaView::new(mem.clone(), 3, PageSize::Size2M).unwrap();
        for &g in grants {
            let _ = v.grant(g).unwrap();
        }
        (v, mem)
    }

    /// The attack: a device the guest programs writes over the hypervisor.
    /// With the view enabled on a unit, that write faults and memory keeps
    /// its bytes; the same write into guest RAM lands.
    #[test]
    fn a_device_cannot_write_the_hypervisor() {
        let (firmware, keep) = machine();
        let (grants, _) = pass_through_grants(&guest_e820(&firmware, &keep), &keep, &[]);
        let (mut v, mem) = view(&grants);
        let model = ModelUnit::qemu(mem.clone());
        let mut unit = Unit::probe(model.clone(), 0xfed9_0000, 4096).unwrap();
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        let edu = 3 << 3;
        // QEMU's unit has one fault record: take it after each attempt.
        let mut attempt = |source, address, data: &[u8]| {
            let r = model.dma_write(source, address, data);
            let (faults, overflow) = unit.take_faults();
            assert!(!overflow);
            (r, faults.first().map(|f| (f.device(), f.address, f.access)))
        };
        let write = crate::platform::vtd::format::FaultAccess::Write;
        assert_eq!(attempt(edu, 2 * M + 0x1000, b"PWNED"), (Err(7), Some(((0, 3, 0), 2 * M + 0x1000, write))));
        assert_eq!(model.peek(2 * M + 0x1000), 0, "hypervisor image unmapped and unchanged");
        assert_eq!(attempt(edu, 0xc00_0000, b"X").0, Err(7), "hypervisor pool unmapped");
        assert_eq!(attempt(edu, 0xfed9_0000, b"X").0, Err(7), "no DMA to the unit's own registers");
        assert_eq!(attempt(edu, 0xfff_0000, b"X").0, Err(7), "ACPI tables are not device memory");
        assert_eq!(attempt(edu, 0x40_0000, b"guest"), (Ok(()), None));
        assert_eq!(model.peek(0x40_0000), b'g');
        // Every bus and function is in the same domain: a device on another bus is no different.
        assert_eq!(attempt(0x0508, 2 * M, b"X"), (Err(7), Some(((5, 1, 0), 2 * M, write))));
        assert_eq!(attempt(0x0508, 0x40_1000, b"ok").0, Ok(()));
        // Two faults between polls: one record, the second is an overflow.
        let _ = model.dma_write(edu, 2 * M, b"1");
        let _ = model.dma_write(edu, 2 * M, b"2");
        let (faults, overflow) = unit.take_faults();
        assert_eq!((faults.len(), overflow), (1, true));
        assert_eq!(unit.take_faults().0, [], "records are cleared once taken");
    }

    /// Without a pass-through guest nothing is granted: every DMA faults.
    #[test]
    fn without_a_device_owner_devices_reach_nothing() {
        let (v, mem) = view(&[]);
        let model = ModelUnit::qemu(mem);
        let mut unit = Unit::probe(model.clone(), 0, 4096).unwrap();
        let mut m = v.mem;
        unit.enable(&mut m, v.root, DOMAIN).unwrap();
        assert_eq!(model.dma_write(0x18, 0x40_0000, b"x"), Err(7));
        assert_eq!(model.dma_read(0x18, 0x40_0000), Err(7));
    }

    /// The attack after the agent locks the kernel's layout: a device
    /// rewrites kernel text the kernel view made read-only. Mirroring the
    /// kernel view makes the page read-only to devices; the IOTLB entry the
    /// device warmed before must be invalidated too, or the write lands.
    #[test]
    fn a_device_cannot_write_what_the_kernel_view_protects() {
        let text = 0x100_0000;
        let (mut v, mem) = view(&[Region::new(M, 64 * M)]);
        let model = ModelUnit::qemu(mem.clone());
        let mut unit = Unit::probe(model.clone(), 0, 4096).unwrap();
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        let dev = 3 << 3;
        // Before the lock the kernel view grants RWX: so do devices (RW).
        assert_eq!(model.dma_write(dev, text, b"a"), Ok(()));
        let flush = v.set_perms(text, Perms::RX).unwrap();
        assert!(flush.is_needed());
        assert_eq!(model.dma_write(dev, text, b"b"), Ok(()), "a stale IOTLB entry still allows the write");
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[text]).unwrap();
        assert_eq!(model.dma_write(dev, text, b"c"), Err(5));
        assert_eq!(model.peek(text), b'b');
        assert_eq!(model.dma_read(dev, text), Ok(b'b'), "devices may still read kernel text");
        // The neighbours keep their rights; unmapping follows the kernel view too.
        assert_eq!(model.dma_write(dev, text + 0x1000, b"d"), Ok(()));
        let _ = v.set_perms(text + 0x1000, Perms::empty()).unwrap();
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[text + 0x1000]).unwrap();
        assert_eq!(model.dma_read(dev, text + 0x1000), Err(7));
        assert_eq!(model.log().iotlb_pages, [text, text + 0x1000]);
        // Rights come back when the kernel view gives them back.
        let _ = v.set_perms(text, Perms::RWX).unwrap();
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[text]).unwrap();
        assert_eq!(model.dma_write(dev, text, b"e"), Ok(()));
        // So does the page it unmapped, when it maps it again (an undone
        // change puts back what was there): not present to present, which
        // a unit in caching mode may have cached, so it is invalidated too.
        assert!(v.set_perms(text + 0x1000, Perms::RWX).unwrap().is_needed());
        unit.invalidate_pages(&mut v.mem, DOMAIN, &[text + 0x1000]).unwrap();
        assert_eq!(v.perms(text + 0x1000), Some(Perms::RW));
        assert_eq!(model.dma_write(dev, text + 0x1000, b"f"), Ok(()));
        // Never beyond what was granted.
        assert_eq!(v.set_perms(64 * M, Perms::RWX).unwrap(), Flush::NONE);
        assert_eq!(v.perms(64 * M), None);
    }

    /// A kernel-view change can never widen devices' reach beyond the
    /// guest's memory: a page the view never granted stays unmapped.
    #[test]
    fn kernel_view_changes_never_map_hypervisor_memory() {
        let (mut v, _) = view(&[Region::new(M, 2 * M)]);
        assert_eq!(v.set_perms(2 * M, Perms::RWX).unwrap(), Flush::NONE);
        assert_eq!(v.perms(2 * M), None);
        let _ = v.set_perms(M, Perms::EXECUTE).unwrap();
        assert_eq!(v.perms(M), None, "execute alone is no device right");
    }

    /// One page-table implementation: the device view and the guest's EPT
    /// built from the same e820 agree page for page. No page is writable
    /// by a device that the guest's EPT does not let the guest write, and
    /// the hypervisor's ranges are in neither.
    #[test]
    fn the_dma_view_never_exceeds_the_guest_ept() {
        let (firmware, keep) = machine();
        let map = guest_e820(&firmware, &keep);
        let (grants, _) = pass_through_grants(&map, &keep, &[]);
        let (v, _) = view(&grants);
        let mut mem = HeapTables::default();
        let mut ept = EptTable::new(&mut mem, PageSize::Size2M).unwrap();
        for e in map.iter().filter(|e| matches!(e.kind, e820::RAM | e820::ACPI | e820::NVS)) {
            let r = e.region.page_aligned_inside();
            let _ = ept.map(&mut mem, r.start, r.start, r.len(), Attrs::new(Perms::RWX, MemType::WriteBack)).unwrap();
        }
        for &k in &keep {
            let _ = ept.unmap(&mut mem, k.start & !0xfff, k.end.next_multiple_of(4096) - (k.start & !0xfff)).unwrap();
        }
        for (r, perms) in v.ranges() {
            for page in (r.start..r.end).step_by(4096) {
                let e = ept.translate(&mem, page).expect("device-reachable page outside the guest's EPT");
                assert!(e.attrs.perms.contains(perms), "{page:#x}");
                assert!(!keep.iter().any(|k| k.contains(page)), "{page:#x} is the hypervisor's");
            }
        }
        assert!(v.ranges().iter().map(|(r, _)| r.len()).sum::<u64>() > 100 * M);
    }

    #[test]
    fn reserved_regions_are_granted_unless_they_overlap_the_hypervisor() {
        let (firmware, keep) = machine();
        let rmrr = |base: u64, end: u64| Reserved { segment: 0, base, end, scopes: alloc::vec![] };
        let (grants, refused) = pass_through_grants(
            &guest_e820(&firmware, &keep),
            &keep,
            &[rmrr(0xe8000, 0xf0000), rmrr(2 * M, 2 * M + 0x1000)],
        );
        assert!(grants.contains(&Region::new(0xe8000, 0xf0000)));
        assert_eq!(refused, [Region::new(2 * M, 2 * M + 0x1000)]);
    }

    /// The table side of keeping devices in step with the kernel view:
    /// flips one page's rights many times against the model unit
    /// (page-selective invalidation through the queue included) and prints
    /// the time per change. `cargo test --release -p hypervisor kept_sync_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn kept_sync_cost() {
        let (mut v, mem) = view(&[Region::new(M, 64 * M)]);
        let model = ModelUnit::qemu(mem);
        let mut unit = Unit::probe(model, 0, 4096).unwrap();
        let root = v.root_table();
        unit.enable(&mut v.mem, root, DOMAIN).unwrap();
        let _ = v.set_perms(0x100_0000, Perms::RX).unwrap();
        const N: u32 = 100_000;
        let start = std::time::Instant::now();
        for i in 0..N {
            let perms = if i % 2 == 0 { Perms::RWX } else { Perms::RX };
            let _ = v.set_perms(0x100_0000, perms).unwrap();
        }
        let tables = start.elapsed() / N;
        let start = std::time::Instant::now();
        for i in 0..N {
            let perms = if i % 2 == 0 { Perms::RWX } else { Perms::RX };
            let _ = v.set_perms(0x100_0000, perms).unwrap();
            unit.invalidate_pages(&mut v.mem, DOMAIN, &[0x100_0000]).unwrap();
        }
        let with_queue = start.elapsed() / N;
        std::println!("kernel-view change on the DMA tables: {tables:?} (tables), {with_queue:?} (tables and a modelled invalidation)");
    }

    /// Two of QEMU's units enabled on a view granting 1 MiB..64 MiB (2 MiB
    /// leaves), as `iommu::take_over` builds them; each gives up on a
    /// command after a few polls.
    fn remapping() -> (Remapping<Shared, ModelUnit>, [ModelUnit; 2]) {
        let (mut view, mem) = view(&[Region::new(M, 64 * M)]);
        let models = [ModelUnit::qemu(mem.clone()), ModelUnit::qemu(mem)];
        let mut units = Vec::new();
        for (model, base) in models.iter().zip([0xfed9_0000, 0xfed9_1000]) {
            let mut unit = Unit::probe(model.clone(), base, 4096).unwrap();
            unit.set_polls(1000);
            let root = view.root_table();
            unit.enable(&mut view.mem, root, DOMAIN).unwrap();
            units.push(unit);
        }
        (Remapping { units, view }, models)
    }

    /// A native guest, the device-owning Linux guest, another native one.
    const GUESTS: [(&str, bool); 3] = [("native", false), ("linux", true), ("native2", false)];

    /// The guests [`stops`] stops, by name, with their console line.
    fn stopped(lost: &ContainmentLost) -> Vec<String> {
        stops(lost, &GUESTS, |g| g.1)
            .into_iter()
            .map(|(g, why)| alloc::format!("guest {} stopped: {why}", g.0))
            .collect()
    }

    /// The attack on a unit that will not invalidate: a device warms its
    /// IOTLB on kernel text, the kernel view then protects the text, and the
    /// unit refuses the invalidation twice (the refused descriptor, then
    /// the global one the recovery puts in its place). Its stale entry
    /// still lets the device write the text: the change must come back as
    /// lost containment that stops the device-owning guest (and only it),
    /// not as a log line the guest runs on after.
    #[test]
    fn a_unit_that_will_not_invalidate_stops_the_device_owner() {
        let (mut r, [bad, good]) = remapping();
        let (text, dev) = (0x100_0000, 3 << 3);
        assert_eq!(r.kernel_view_changed(text + 0x1000, Perms::RX), Ok(()), "an honest change");
        for model in [&bad, &good] {
            assert_eq!(model.dma_write(dev, text, b"a"), Ok(()));
        }
        bad.0.borrow_mut().refuse_descriptors = 2;
        let lost = r.kernel_view_changed(text, Perms::RX).unwrap_err();
        assert_eq!(lost, ContainmentLost::Invalidation { unit: 0xfed9_0000, error: VtdError::QueueError });
        assert_eq!(bad.dma_write(dev, text, b"b"), Ok(()), "the failed unit's stale entry still lets the write land");
        assert_eq!(good.dma_write(dev, text, b"c"), Err(5), "the other unit was invalidated all the same");
        assert_eq!(
            stopped(&lost),
            ["guest linux stopped: DMA containment lost: IOTLB invalidation on the unit at 0xfed90000 failed: invalidation queue error"]
        );
        assert!(
            stops(&lost, &GUESTS[..1], |g| g.1).is_empty(),
            "no device owner: nothing reaches memory, nobody stops"
        );
    }

    /// A unit that stops fetching its queue times out: containment lost too.
    #[test]
    fn a_unit_that_times_out_stops_the_device_owner() {
        let (mut r, [_, hung]) = remapping();
        hung.0.borrow_mut().stalled = true;
        let lost = r.kernel_view_changed(0x100_0000, Perms::READ).unwrap_err();
        assert_eq!(
            lost,
            ContainmentLost::Invalidation { unit: 0xfed9_1000, error: VtdError::Timeout("invalidation wait") }
        );
        assert_eq!(
            stopped(&lost),
            ["guest linux stopped: DMA containment lost: IOTLB invalidation on the unit at 0xfed91000 failed: the unit did not complete invalidation wait"]
        );
    }

    /// Protecting one 4 KiB page inside a 2 MiB leaf needs a new table; with
    /// no memory for it the tables keep the old rights and devices write
    /// the page the kernel view protects: containment lost, the owner stops.
    #[test]
    fn rights_the_tables_cannot_take_stop_the_device_owner() {
        let (mut r, [model, _]) = remapping();
        let text = 0x100_0000;
        let full = r.view.mem.0.borrow().allocated;
        r.view.mem.0.borrow_mut().limit = Some(full);
        let lost = r.kernel_view_changed(text, Perms::RX).unwrap_err();
        assert_eq!(lost, ContainmentLost::Tables { page: text, error: MapError::OutOfMemory });
        assert_eq!(r.view.perms(text), Some(Perms::RW));
        assert_eq!(model.dma_write(3 << 3, text, b"x"), Ok(()));
        assert_eq!(
            stopped(&lost),
            ["guest linux stopped: DMA containment lost: devices' rights on 0x1000000 could not follow the kernel view: no memory for the DMA tables"]
        );
        // With memory again, the change follows.
        r.view.mem.0.borrow_mut().limit = None;
        assert_eq!(r.kernel_view_changed(text, Perms::RX), Ok(()));
        assert_eq!(model.dma_write(3 << 3, text, b"y"), Err(5));
    }

    #[test]
    fn violations_read_as_one_line() {
        let fault = Fault::decode(0x20_0000, (1 << 63) | (7 << 32) | 0x18).unwrap();
        let line = alloc::format!("{}", Violation { unit: 0xfed9_0000, fault });
        assert_eq!(
            line,
            "ctvm: dma-violation device=00:03.0 address=0x200000 access=write reason=0x7 (paging entry not present) unit=0xfed90000"
        );
    }

    #[test]
    fn every_bus_and_function_uses_the_one_hierarchy() {
        let (v, mem) = view(&[]);
        let m = mem.0.borrow();
        let root = v.root_table();
        let context = m.read(root, 0) & !0xfff;
        for bus in 0..256 {
            assert_eq!(m.read(root, 2 * bus), context | 1);
        }
        for devfn in 0..256 {
            assert_eq!(m.read(context, 2 * devfn) & !0xfff, v.table.root());
            assert_eq!(m.read(context, 2 * devfn + 1), 1 | (u64::from(DOMAIN) << 8));
        }
    }
}
