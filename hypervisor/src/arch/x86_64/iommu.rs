//! The machine's VT-d remapping units, taken over before any guest runs,
//! and the hooks that keep them in step afterwards.
//!
//! - [`take_over`]: every unit of the DMAR table gets the DMA view's tables
//!   and translation on (interrupt remapping too when no guest owns the
//!   devices).
//! - [`kernel_view_changed`] (and [`Hook`], its [`DmaControl`] form): the
//!   integrity code calls it whenever the kernel view (KEPT) changes a
//!   page's rights; the table changes and every unit's IOTLB is
//!   invalidated before it returns ([`Remapping`] does it), or it returns
//!   the lost containment for the caller to stop the device owner.
//! - [`poll`]: reads the units' fault records (at most once per
//!   [`POLL_TICKS`]) and reports each as a `ctvm: dma-violation` line.

use alloc::vec::Vec;

use spin::Mutex;

use super::cpu;
use super::mmio::MmioRegion;
use crate::console;
use crate::mm::frames::{Region, PAGE_SIZE};
use crate::mm::paging::{Perms, TableMemory};
use crate::mm::phys;
use crate::platform::dma::{self, ContainmentLost, DmaControl, DmaView, Remapping, Violation, DOMAIN};
use crate::platform::dmar::Dmar;
use crate::platform::vtd::Unit;

/// Page-table frames the units read. Units whose page walks do not snoop
/// the caches (ECAP.C clear) see a write only once its line is flushed.
pub struct DmaTables {
    flush: bool,
}

fn flush_line(address: u64) {
    // SAFETY: CLFLUSH of an identity-mapped hypervisor frame only writes
    // the line back; every x86-64 processor has it.
    unsafe { core::arch::asm!("clflush [{}]", in(reg) address, options(nostack, preserves_flags)) };
}

impl TableMemory for DmaTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = phys::alloc_zeroed(PAGE_SIZE, PAGE_SIZE)?;
        if self.flush {
            (frame..frame + PAGE_SIZE).step_by(64).for_each(flush_line);
        }
        Some(frame)
    }

    fn free_table(&mut self, table: u64) {
        phys::free(table, PAGE_SIZE);
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        phys::Tables.read(table, index)
    }

    fn write(&mut self, table: u64, index: usize, entry: u64) {
        phys::Tables.write(table, index, entry);
        if self.flush {
            flush_line(table + 8 * (index as u64 & 511));
        }
    }
}

struct Iommu {
    remapping: Remapping<DmaTables, MmioRegion>,
    last_poll: u64,
    interrupt_remapping: bool,
}

static IOMMU: Mutex<Option<Iommu>> = Mutex::new(None);

/// What [`take_over`] did, for the boot log.
pub struct Summary {
    pub units: usize,
    pub levels: u8,
    pub granted: u64,
    pub refused_rmrr: Vec<Region>,
    pub pmr_was_on: bool,
    pub interrupt_remapping: bool,
}

/// Takes every unit: builds the DMA view (devices reach `grants` only),
/// points each unit at it, invalidates, turns translation on. With
/// `remap_interrupts`, also turns interrupt remapping on with an empty
/// table: no device interrupt reaches any CPU.
pub fn take_over(
    dmar: &Dmar,
    grants: &[Region],
    refused_rmrr: Vec<Region>,
    remap_interrupts: bool,
) -> Result<Summary, alloc::string::String> {
    use alloc::format;
    let mut units = Vec::new();
    for u in &dmar.units {
        if u.segment != 0 {
            return Err(format!(
                "the unit at {:#x} serves PCI segment {}, which CTVM does not handle",
                u.base, u.segment
            ));
        }
        let regs =
            MmioRegion::new(u.base, u.size.max(PAGE_SIZE)).ok_or(format!("unit at {:#x} out of reach", u.base))?;
        units
            .push(Unit::probe(regs, u.base, u.size.max(PAGE_SIZE)).map_err(|e| format!("unit at {:#x}: {e}", u.base))?);
    }
    let levels = [4u8, 3]
        .into_iter()
        .find(|&l| units.iter().all(|u| u.cap.supports_levels(l)))
        .ok_or("the units have no table depth in common")?;
    let largest = dma::largest_page(units.iter().all(|u| u.cap.pages_2m()), units.iter().all(|u| u.cap.pages_1g()));
    let tables = DmaTables { flush: units.iter().any(|u| !u.ecap.coherent()) };
    let mut view = DmaView::new(tables, levels, largest).map_err(|e| format!("DMA tables: {e:?}"))?;
    for &g in grants {
        let _ = view.grant(g).map_err(|e| format!("DMA tables: {e:?}"))?;
    }
    let root = view.root_table();
    let interrupt_remapping = remap_interrupts && units.iter().all(|u| u.ecap.interrupt_remapping());
    let irt = if interrupt_remapping {
        Some(view.mem.alloc_table().ok_or("no memory for the interrupt table")?)
    } else {
        None
    };
    for u in &mut units {
        u.enable(&mut view.mem, root, DOMAIN).map_err(|e| format!("unit at {:#x}: {e}", u.base))?;
        if let Some(table) = irt {
            // 256 entries, none present.
            u.enable_interrupt_remapping(&mut view.mem, table, 8).map_err(|e| format!("unit at {:#x}: {e}", u.base))?;
        }
    }
    let summary = Summary {
        units: units.len(),
        levels,
        granted: grants.iter().map(Region::len).sum(),
        refused_rmrr,
        pmr_was_on: units.iter().any(|u| u.pmr_was_on),
        interrupt_remapping,
    };
    *IOMMU.lock() = Some(Iommu { remapping: Remapping { units, view }, last_poll: 0, interrupt_remapping });
    Ok(summary)
}

/// Whether DMA is contained (a unit was taken over).
pub fn active() -> bool {
    IOMMU.lock().is_some()
}

pub fn interrupt_remapping() -> bool {
    IOMMU.lock().as_ref().is_some_and(|i| i.interrupt_remapping)
}

/// Devices' rights at `address` (`None`: no access, or no IOMMU).
pub fn device_perms(address: u64) -> Option<Perms> {
    IOMMU.lock().as_ref()?.remapping.view.perms(address)
}

/// The kernel view now grants `perms` on `page`: devices get its read and
/// write rights, effective on every unit when this returns `Ok`; `Err`:
/// containment is lost and the device owner must stop ([`dma::stops`]).
/// Without an IOMMU there is nothing to do.
pub fn kernel_view_changed(page: u64, perms: Perms) -> Result<(), ContainmentLost> {
    match IOMMU.lock().as_mut() {
        Some(iommu) => iommu.remapping.kernel_view_changed(page, perms),
        None => Ok(()),
    }
}

/// [`kernel_view_changed`] as the generic code sees it.
pub struct Hook;

impl DmaControl for Hook {
    fn kernel_view_changed(&mut self, page: u64, perms: Perms) -> Result<(), ContainmentLost> {
        kernel_view_changed(page, perms)
    }
}

/// TSC ticks between two reads of the fault registers from [`poll`].
pub const POLL_TICKS: u64 = 1 << 20;

/// Reports the faults recorded since the last poll, at most once every
/// [`POLL_TICKS`] (an uncached register read per VM exit would cost more
/// than the exit). Returns how many were reported.
pub fn poll() -> usize {
    let now = cpu::rdtsc();
    {
        let mut guard = IOMMU.lock();
        let Some(iommu) = guard.as_mut() else { return 0 };
        if now.wrapping_sub(iommu.last_poll) < POLL_TICKS {
            return 0;
        }
        iommu.last_poll = now;
    }
    report_faults()
}

/// Reports every recorded fault now.
pub fn report_faults() -> usize {
    let mut lines = Vec::new();
    let mut overflowed = Vec::new();
    if let Some(iommu) = IOMMU.lock().as_mut() {
        for u in &mut iommu.remapping.units {
            let (faults, overflow) = u.take_faults();
            lines.extend(faults.into_iter().map(|fault| Violation { unit: u.base, fault }));
            if overflow {
                overflowed.push(u.base);
            }
        }
    }
    for l in &lines {
        console::write_line(format_args!("{l}"));
    }
    for unit in overflowed {
        console::write_line(format_args!(
            "ctvm: dma-violation unit={unit:#x} more faults than the unit could record: some were lost"
        ));
    }
    lines.len()
}
