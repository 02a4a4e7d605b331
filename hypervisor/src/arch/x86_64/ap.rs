//! Bringing up the application processors: a real-mode trampoline in one
//! page below 1 MiB (which the hypervisor keeps: no guest maps it), INIT
//! then start-up IPIs, and the first 64-bit instructions of each AP: its
//! own stack, GDT, TSS and per-CPU data, then the function the boot CPU
//! handed it. The APs start one after another, so one trampoline serves.

use core::sync::atomic::{AtomicU64, Ordering};

use super::percpu::{self, PerCpu};
use super::{cpu, gdt, lapic, timer, traps};

core::arch::global_asm!(
    r#"
    .section .rodata.ctvm_trampoline, "a"
    .balign 16
    .global ctvm_tramp_start
ctvm_tramp_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    // The first CPU through takes the ticket; any other (one that answered
    // an earlier start-up IPI too late) stops here, off every stack.
    movw $1, %ax
    lock xchgw %ax, (ctvm_tramp_ticket - ctvm_tramp_start)
    testw %ax, %ax
    jnz 1f
    lgdtl (ctvm_tramp_gdtr - ctvm_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    // ljmpl $0x18, $pm32 (the absolute address is patched in)
    .byte 0x66, 0xea
    .global ctvm_tramp_far32
ctvm_tramp_far32:
    .long 0
    .word 0x18
1:
    cli
    hlt
    jmp 1b

    .code32
    .global ctvm_tramp_pm32
ctvm_tramp_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    // movl $page, %ebx (patched)
    .byte 0xbb
    .global ctvm_tramp_base
ctvm_tramp_base:
    .long 0
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl (ctvm_tramp_cr3 - ctvm_tramp_start)(%ebx), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0
    // ljmp $0x08, $long64 (patched)
    .byte 0xea
    .global ctvm_tramp_far64
ctvm_tramp_far64:
    .long 0
    .word 0x08

    .code64
    .global ctvm_tramp_long64
ctvm_tramp_long64:
    movl %ebx, %ebx
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq (ctvm_tramp_stack - ctvm_tramp_start)(%rbx), %rsp
    movq (ctvm_tramp_arg - ctvm_tramp_start)(%rbx), %rdi
    movq (ctvm_tramp_entry - ctvm_tramp_start)(%rbx), %rax
    xorl %ebp, %ebp
    callq *%rax
2:
    cli
    hlt
    jmp 2b

    .balign 8
    .global ctvm_tramp_gdt
ctvm_tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
    .global ctvm_tramp_gdtr
ctvm_tramp_gdtr:
    .word 31
    .long 0
    .balign 8
    .global ctvm_tramp_cr3
ctvm_tramp_cr3:
    .quad 0
    .global ctvm_tramp_stack
ctvm_tramp_stack:
    .quad 0
    .global ctvm_tramp_arg
ctvm_tramp_arg:
    .quad 0
    .global ctvm_tramp_entry
ctvm_tramp_entry:
    .quad 0
    .global ctvm_tramp_ticket
ctvm_tramp_ticket:
    .word 0
    .global ctvm_tramp_end
ctvm_tramp_end:
    .code64
"#,
    options(att_syntax)
);

extern "C" {
    static ctvm_tramp_start: u8;
    static ctvm_tramp_far32: u8;
    static ctvm_tramp_pm32: u8;
    static ctvm_tramp_base: u8;
    static ctvm_tramp_far64: u8;
    static ctvm_tramp_long64: u8;
    static ctvm_tramp_gdt: u8;
    static ctvm_tramp_gdtr: u8;
    static ctvm_tramp_cr3: u8;
    static ctvm_tramp_stack: u8;
    static ctvm_tramp_arg: u8;
    static ctvm_tramp_entry: u8;
    static ctvm_tramp_ticket: u8;
    static ctvm_tramp_end: u8;
}

/// A label's offset in the trampoline.
macro_rules! offset {
    ($label:ident) => {
        // Only the addresses of the assembly's labels are taken.
        core::ptr::addr_of!($label) as u64 - core::ptr::addr_of!(ctvm_tramp_start) as u64
    };
}

/// Bytes of the trampoline's code and data.
pub fn size() -> u64 {
    offset!(ctvm_tramp_end)
}

/// What the boot CPU hands an AP.
pub struct Start {
    /// The AP's per-CPU data, to install (taken by the AP).
    pub percpu: Option<&'static mut PerCpu>,
    /// Zeroed frames for its GDT, TSS and interrupt stacks ([`gdt::CPU_TABLES_SIZE`]).
    pub tables: u64,
    /// EFER, CR0 and CR4 as the boot CPU has them.
    pub efer: u64,
    pub cr0: u64,
    pub cr4: u64,
    /// What the AP runs once it is set up.
    pub main: fn(&'static PerCpu) -> !,
}

/// The APIC ID of the last AP that came up (`u64::MAX`: none yet).
static ALIVE: AtomicU64 = AtomicU64::new(u64::MAX);

fn write_u32(at: u64, value: u32) {
    // SAFETY: inside the trampoline page, which the hypervisor reserved.
    unsafe { core::ptr::write_unaligned(at as *mut u32, value) };
}

fn write_u64(at: u64, value: u64) {
    // SAFETY: as above.
    unsafe { core::ptr::write_unaligned(at as *mut u64, value) };
}

/// Copies the trampoline into `page` (4 KiB aligned, below 1 MiB, RAM the
/// hypervisor keeps) and patches its absolute addresses.
pub fn install(page: u64) {
    let len = size() as usize;
    assert!(len <= 4096 && page.is_multiple_of(4096) && page < 0x10_0000);
    // SAFETY: the page is reserved for the trampoline; the source is the
    // image's copy of it.
    unsafe { core::ptr::copy_nonoverlapping(core::ptr::addr_of!(ctvm_tramp_start), page as *mut u8, len) };
    write_u32(page + offset!(ctvm_tramp_far32), (page + offset!(ctvm_tramp_pm32)) as u32);
    write_u32(page + offset!(ctvm_tramp_base), page as u32);
    write_u32(page + offset!(ctvm_tramp_far64), (page + offset!(ctvm_tramp_long64)) as u32);
    write_u32(page + offset!(ctvm_tramp_gdtr) + 2, (page + offset!(ctvm_tramp_gdt)) as u32);
    write_u64(page + offset!(ctvm_tramp_cr3), cpu::read_cr3());
    write_u64(page + offset!(ctvm_tramp_entry), ap_entry as *const () as u64);
}

/// Starts the AP with this APIC ID on `stack` (its top) and waits until it
/// runs on it. On failure the AP is put back into wait-for-SIPI with INIT
/// (it never runs hypervisor or guest code).
pub fn start(page: u64, apic_id: u32, stack_top: u64, start: &'static mut Start) -> Result<(), &'static str> {
    write_u64(page + offset!(ctvm_tramp_stack), stack_top);
    write_u64(page + offset!(ctvm_tramp_arg), start as *mut Start as u64);
    write_u32(page + offset!(ctvm_tramp_ticket), 0);
    ALIVE.store(u64::MAX, Ordering::SeqCst);
    let vector = (page >> 12) as u8;
    // The MP initialisation protocol: INIT, 10 ms, start-up, 200 us, start-up.
    lapic::send_init(apic_id);
    timer::pit_wait_us(10_000);
    for _ in 0..2 {
        lapic::send_startup(apic_id, vector);
        timer::pit_wait_us(200);
        if ALIVE.load(Ordering::SeqCst) == u64::from(apic_id) {
            return Ok(());
        }
    }
    for _ in 0..100 {
        timer::pit_wait_us(1000);
        if ALIVE.load(Ordering::SeqCst) == u64::from(apic_id) {
            return Ok(());
        }
    }
    lapic::send_init(apic_id);
    Err("it did not answer its start-up IPIs within 100 ms")
}

/// The AP's first Rust code, on its own stack.
extern "C" fn ap_entry(start: &'static mut Start) -> ! {
    // SAFETY: the boot CPU's EFER, CR0 and CR4 (NX, write protection,
    // caches), which its page tables and code rely on too.
    unsafe {
        cpu::wrmsr(0xc000_0080, start.efer);
        cpu::write_cr0(start.cr0);
        cpu::write_cr4(start.cr4);
    }
    // SAFETY: the boot CPU allocated these frames for this AP alone.
    let ist = unsafe { gdt::init_ap(start.tables) };
    traps::init();
    let Some(p) = start.percpu.take().filter(|p| p.apic_id == lapic::id()) else {
        // Another CPU than the one started: it must not run as this one.
        cpu::halt_forever()
    };
    p.ist = ist;
    percpu::install(p);
    ALIVE.store(u64::from(percpu::current().apic_id), Ordering::SeqCst);
    (start.main)(percpu::current())
}
