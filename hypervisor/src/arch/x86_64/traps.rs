//! The hypervisor's IDT. Any exception in hypervisor code is a bug: it is
//! reported (vector, error code, RIP, CR2, registers, a frame-pointer
//! backtrace) and the machine is stopped cleanly.

use core::fmt::Write as _;

use spin::Once;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::{cpu, gdt};

core::arch::global_asm!(
    r#"
    .macro ctvm_stub vector, has_error
    .balign 16
ctvm_exception_\vector:
    .if \has_error == 0
    push 0
    .endif
    push \vector
    jmp ctvm_exception_common
    .endm

    .section .text.ctvm_traps, "ax"
    ctvm_stub 0, 0
    ctvm_stub 1, 0
    ctvm_stub 3, 0
    ctvm_stub 4, 0
    ctvm_stub 5, 0
    ctvm_stub 6, 0
    ctvm_stub 7, 0
    ctvm_stub 8, 1
    ctvm_stub 9, 0
    ctvm_stub 10, 1
    ctvm_stub 11, 1
    ctvm_stub 12, 1
    ctvm_stub 13, 1
    ctvm_stub 14, 1
    ctvm_stub 15, 0
    ctvm_stub 16, 0
    ctvm_stub 17, 1
    ctvm_stub 18, 0
    ctvm_stub 19, 0
    ctvm_stub 20, 0
    ctvm_stub 21, 1
    ctvm_stub 22, 0
    ctvm_stub 23, 0
    ctvm_stub 24, 0
    ctvm_stub 25, 0
    ctvm_stub 26, 0
    ctvm_stub 27, 0
    ctvm_stub 28, 0
    ctvm_stub 29, 1
    ctvm_stub 30, 1
    ctvm_stub 31, 0
    ctvm_stub 32, 0

    // An NMI in the hypervisor is not an error: another CPU's signal, or
    // the guest's (a watchdog, a counter), which is held for it.
    .balign 16
ctvm_nmi:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push rbp
    mov rbp, rsp
    and rsp, -16
    cld
    call ctvm_nmi_in_hypervisor
    mov rsp, rbp
    pop rbp
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

ctvm_exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call ctvm_exception
    ud2

    .section .rodata.ctvm_traps, "a"
    .balign 8
    .global ctvm_exception_stubs
ctvm_exception_stubs:
    .quad ctvm_exception_0, ctvm_exception_1, ctvm_nmi, ctvm_exception_3
    .quad ctvm_exception_4, ctvm_exception_5, ctvm_exception_6, ctvm_exception_7
    .quad ctvm_exception_8, ctvm_exception_9, ctvm_exception_10, ctvm_exception_11
    .quad ctvm_exception_12, ctvm_exception_13, ctvm_exception_14, ctvm_exception_15
    .quad ctvm_exception_16, ctvm_exception_17, ctvm_exception_18, ctvm_exception_19
    .quad ctvm_exception_20, ctvm_exception_21, ctvm_exception_22, ctvm_exception_23
    .quad ctvm_exception_24, ctvm_exception_25, ctvm_exception_26, ctvm_exception_27
    .quad ctvm_exception_28, ctvm_exception_29, ctvm_exception_30, ctvm_exception_31
    .quad ctvm_exception_32
    "#
);

/// NMIs taken while the hypervisor itself ran.
pub static NMI_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Sorts an NMI taken in the hypervisor: a kick needs nothing more (the CPU
/// looks at what changed before it enters a guest); a guest's is held for
/// the guest. Touches atomics only: it may interrupt any hypervisor code.
#[no_mangle]
extern "C" fn ctvm_nmi_in_hypervisor() {
    NMI_COUNT.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    let this = super::percpu::try_current();
    // A CPU out of VMX for good: back to its HLT, nothing else.
    if this.is_some_and(|p| crate::smp::PARK.parked(p.index)) {
        return;
    }
    if super::power::stopping() {
        super::cpu::halt_forever();
    }
    if let Some(p) = this {
        crate::smp::SIGNALS.nmi_in_hypervisor(p.index);
    }
}

extern "C" {
    static ctvm_exception_stubs: [u64; 33];
}

/// What the stubs push, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One 16-byte IDT gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    flags: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const ABSENT: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, flags: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    /// A present 64-bit interrupt gate (interrupts stay off in the handler).
    fn interrupt(handler: u64, selector: u16, ist: Option<u16>) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist: ist.map_or(0, |slot| slot as u8 + 1),
            flags: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Loads the IDT: every exception vector, plus vector 32 as a catch-all for a
/// stray interrupt (the hypervisor runs with interrupts off). Every CPU
/// loads the same table: it is read-only, and each CPU's TSS gives it its
/// own interrupt stacks.
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = Idt([Gate::ABSENT; 256]);
        let selector = gdt::selectors().code.0;
        // SAFETY: the stub table is defined in the assembly above.
        let stubs = unsafe { &*core::ptr::addr_of!(ctvm_exception_stubs) };
        for (vector, &stub) in stubs.iter().enumerate() {
            let ist = match vector {
                8 => Some(gdt::IST_DOUBLE_FAULT),
                2 => Some(gdt::IST_NMI),
                18 => Some(gdt::IST_MACHINE_CHECK),
                _ => None,
            };
            idt.0[vector] = Gate::interrupt(stub, selector, ist);
        }
        idt
    });
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the table is static and every present gate points at a stub.
    unsafe { lidt(&pointer) };
}

/// The IDT base, for the VMCS host state.
pub fn idt_base() -> u64 {
    IDT.get().map_or(0, |idt| idt as *const Idt as u64)
}

const NAMES: [&str; 33] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved",
    "stray interrupt",
];

#[no_mangle]
extern "C" fn ctvm_exception(frame: &TrapFrame) -> ! {
    crate::console::force_unlock();
    super::serial::force_unlock();
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("unknown");
    crate::console::write_line(format_args!(
        "ctvm: FATAL: exception {} ({name}) in the hypervisor, error code {:#x}, cpu {}",
        frame.vector,
        frame.error_code,
        super::percpu::try_current().map_or(0, |p| p.index)
    ));
    crate::console::write_line(format_args!(
        "ctvm:   rip {:#018x}  rsp {:#018x}  rflags {:#x}  cr2 {:#018x}",
        frame.rip,
        frame.rsp,
        frame.rflags,
        cpu::read_cr2()
    ));
    crate::console::write_line(format_args!(
        "ctvm:   rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    ));
    print_backtrace(frame.rbp);
    super::power::stop_machine(super::power::EXIT_HYPERVISOR_FAULT)
}

/// Follows the frame-pointer chain, trusting only addresses inside the
/// hypervisor's stacks.
pub fn print_backtrace(mut rbp: u64) {
    let (stack, ists) = match super::percpu::try_current() {
        Some(p) => (p.stack.clone(), p.ist.clone()),
        None => (ctvm_boot::boot_stack(), gdt::boot_ist()),
    };
    let on_stack = |a: u64| stack.contains(&a) || ists.iter().any(|r| r.contains(&a));
    let mut line = heapless_line();
    let _ = write!(line, "ctvm:   backtrace:");
    for _ in 0..24 {
        if !rbp.is_multiple_of(8) || !on_stack(rbp) || !on_stack(rbp + 8) {
            break;
        }
        // SAFETY: both words lie inside a hypervisor stack (checked above).
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if ret == 0 {
            break;
        }
        let _ = write!(line, " {ret:#x}");
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    crate::console::write_line(format_args!("{}", line.as_str()));
}

/// A fixed buffer for building one line without the heap, which may be what broke.
fn heapless_line() -> FixedLine {
    FixedLine { buf: [0; 512], len: 0 }
}

struct FixedLine {
    buf: [u8; 512],
    len: usize,
}

impl FixedLine {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<backtrace>")
    }
}

impl core::fmt::Write for FixedLine {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
