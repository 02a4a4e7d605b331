//! The hypervisor's GDT and TSS, one pair per CPU (a TSS is busy on the CPU
//! that loaded it, and its interrupt stacks are that CPU's). The TSS
//! supplies separate stacks for double faults, NMIs and machine checks, so
//! a stack overflow still reports. The boot CPU's live in the image, so
//! faults report from the first instruction on; the other CPUs' come from
//! the frame pool.

use core::ops::Range;

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

/// One CPU's descriptor tables and interrupt stacks.
#[repr(C, align(4096))]
pub struct CpuTables {
    ist: [Stack; 3],
    tss: TaskStateSegment,
    gdt: GlobalDescriptorTable,
}

/// The bytes a [`CpuTables`] takes, for the frame allocation.
pub const CPU_TABLES_SIZE: u64 = core::mem::size_of::<CpuTables>() as u64;

static mut BOOT_CPU: CpuTables = CpuTables {
    ist: [const { Stack([0; IST_STACK_SIZE]) }; 3],
    tss: TaskStateSegment::new(),
    gdt: GlobalDescriptorTable::new(),
};

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

/// Every CPU's GDT has the same layout, hence the same selectors.
static SELECTORS: Once<Selectors> = Once::new();

/// Fills `t` in place and loads it on this CPU: GDT, TSS and every segment
/// register. Returns its interrupt stacks.
///
/// # Safety
/// `t` is used by this CPU alone, from now until the machine stops.
unsafe fn load(t: *mut CpuTables) -> [Range<u64>; 3] {
    let ist: [Range<u64>; 3] = core::array::from_fn(|slot| {
        // SAFETY: only the address is taken.
        let base = unsafe { core::ptr::addr_of!((*t).ist[slot]) } as u64;
        base..base + IST_STACK_SIZE as u64
    });
    let mut tss = TaskStateSegment::new();
    for (slot, stack) in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK].into_iter().enumerate() {
        tss.interrupt_stack_table[stack as usize] = VirtAddr::new(ist[slot].end);
    }
    // SAFETY: the caller owns `t`; the TSS is written before a descriptor
    // points at it, and both stay where they are.
    let (tss, gdt) = unsafe {
        core::ptr::addr_of_mut!((*t).tss).write(tss);
        core::ptr::addr_of_mut!((*t).gdt).write(GlobalDescriptorTable::new());
        (&*core::ptr::addr_of!((*t).tss), &mut *core::ptr::addr_of_mut!((*t).gdt))
    };
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_selector = gdt.append(Descriptor::tss_segment(tss));
    let selectors = SELECTORS.call_once(|| Selectors { code, data, tss: tss_selector });
    assert!(selectors.code == code && selectors.data == data && selectors.tss == tss_selector);
    // SAFETY: the GDT is in memory this CPU keeps; the selectors come from it.
    unsafe {
        gdt.load_unsafe();
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss_selector);
    }
    ist
}

/// The boot CPU's interrupt stacks (for the fault handler, which may run
/// before the per-CPU data is installed).
pub fn boot_ist() -> [Range<u64>; 3] {
    core::array::from_fn(|slot| {
        // SAFETY: only the address is taken.
        let base = unsafe { core::ptr::addr_of!(BOOT_CPU.ist[slot]) } as u64;
        base..base + IST_STACK_SIZE as u64
    })
}

/// The boot CPU's tables, loaded first thing.
pub fn init() -> [Range<u64>; 3] {
    // SAFETY: called once, on the boot CPU, before any other CPU runs.
    unsafe { load(core::ptr::addr_of_mut!(BOOT_CPU)) }
}

/// Another CPU's tables, in zeroed frames of at least [`CPU_TABLES_SIZE`]
/// bytes that it alone uses.
///
/// # Safety
/// `frames` is such memory, identity mapped, and 4 KiB aligned.
pub unsafe fn init_ap(frames: u64) -> [Range<u64>; 3] {
    // SAFETY: as the caller promises.
    unsafe { load(frames as *mut CpuTables) }
}

pub fn selectors() -> &'static Selectors {
    SELECTORS.get().expect("gdt::init ran")
}

/// This CPU's TSS base, for the VMCS host state: read from the descriptor
/// the task register selects.
pub fn tss_base() -> u64 {
    let gdt = gdt_base();
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    let selector = u64::from(tr >> 3);
    // SAFETY: TR selects a 16-byte TSS descriptor of this CPU's GDT, which
    // `load` built.
    let (low, high) = unsafe {
        let entry = (gdt + selector * 8) as *const u64;
        (core::ptr::read(entry), core::ptr::read(entry.add(1)))
    };
    ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | ((high & 0xffff_ffff) << 32)
}

/// The GDT base, for the VMCS host state.
pub fn gdt_base() -> u64 {
    x86_64::instructions::tables::sgdt().base.as_u64()
}
