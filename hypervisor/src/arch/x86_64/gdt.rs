//! The hypervisor's own GDT and TSS. The TSS supplies separate stacks for
//! double faults, NMIs and machine checks, so a stack overflow still reports.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slots (1-based in the IDT, 0-based here).
pub const IST_DOUBLE_FAULT: u16 = 0;
pub const IST_NMI: u16 = 1;
pub const IST_MACHINE_CHECK: u16 = 2;

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; IST_STACK_SIZE]);

static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

struct Tables {
    gdt: GlobalDescriptorTable,
    selectors: Selectors,
}

static TSS: Once<TaskStateSegment> = Once::new();
static TABLES: Once<Tables> = Once::new();

/// Loads the GDT and TSS and reloads every segment register.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for (slot, stack) in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK].into_iter().enumerate() {
            // SAFETY: only the address is taken; each stack is used by the CPU alone.
            let base = unsafe { core::ptr::addr_of!(IST_STACKS[slot]) } as u64;
            tss.interrupt_stack_table[stack as usize] = VirtAddr::new(base + IST_STACK_SIZE as u64);
        }
        tss
    });
    let tables = TABLES.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables { gdt, selectors: Selectors { code, data, tss } }
    });
    tables.gdt.load();
    // SAFETY: the selectors come from the GDT just loaded.
    unsafe {
        CS::set_reg(tables.selectors.code);
        DS::set_reg(tables.selectors.data);
        ES::set_reg(tables.selectors.data);
        SS::set_reg(tables.selectors.data);
        load_tss(tables.selectors.tss);
    }
}

pub fn selectors() -> &'static Selectors {
    &TABLES.get().expect("gdt::init ran").selectors
}

/// The TSS base, for the VMCS host state.
pub fn tss_base() -> u64 {
    TSS.get().expect("gdt::init ran") as *const TaskStateSegment as u64
}

/// The GDT base, for the VMCS host state.
pub fn gdt_base() -> u64 {
    x86_64::instructions::tables::sgdt().base.as_u64()
}

/// The IST stacks, for the fault handler to recognise frames on them.
pub fn ist_stack_ranges() -> [core::ops::Range<u64>; 3] {
    core::array::from_fn(|slot| {
        // SAFETY: only the address is taken.
        let base = unsafe { core::ptr::addr_of!(IST_STACKS[slot]) } as u64;
        base..base + IST_STACK_SIZE as u64
    })
}
