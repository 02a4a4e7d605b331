//! The guest kernel proper.

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use guest_agent::start_info::{self, StartInfo};
use guest_agent::{Call, Capabilities, Error};

// The hypervisor enters in 64-bit mode with RSP at the top of guest RAM and
// RDI pointing at the StartInfo.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    and rsp, -16
    xor ebp, ebp
    call guest_main
2:  hlt
    jmp 2b
"#
);

// ---------------------------------------------------------------- console

const COM1: u16 = 0x3f8;

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O in the guest; the hypervisor decides what it reaches.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // Wait for the transmit holding register to be empty, as a real driver does.
            let mut spins = 0u32;
            while inb(COM1 + 5) & 0x20 == 0 && spins < 1_000_000 {
                spins += 1;
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(Console, $($arg)*);
    }};
}

mod tpm;

// ---------------------------------------------------------------- faults

/// Bytes to skip when the next fault is the expected one; 0 = none expected.
static SKIP_ON_FAULT: AtomicU64 = AtomicU64::new(0);
/// The vector of the last expected fault taken, or u64::MAX.
static LAST_FAULT: AtomicU64 = AtomicU64::new(u64::MAX);

global_asm!(
    r#"
    .section .text
    .balign 16
fault_gp:
    push 13
    jmp fault_common
    .balign 16
fault_ud:
    push 0
    push 6
    jmp fault_common
    .balign 16
fault_other:
    push 0
    push 255
    jmp fault_common
fault_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, rsp
    call guest_fault
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

    .section .rodata
    .global guest_fault_stubs
guest_fault_stubs:
    .quad fault_gp, fault_ud, fault_other
"#
);

#[repr(C)]
struct FaultFrame {
    regs: [u64; 9],
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
extern "C" fn guest_fault(frame: &mut FaultFrame) {
    let skip = SKIP_ON_FAULT.swap(0, Ordering::SeqCst);
    if skip == 0 {
        say!("FAIL: unexpected exception {} at rip {:#x}", frame.vector, frame.rip);
        shutdown(99);
    }
    LAST_FAULT.store(frame.vector, Ordering::SeqCst);
    frame.rip += skip;
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

static mut IDT: [[u64; 2]; 32] = [[0; 2]; 32];

fn install_idt() {
    extern "C" {
        static guest_fault_stubs: [u64; 3];
    }
    let cs: u16;
    // SAFETY: reads CS only.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs) };
    // SAFETY: single-threaded set-up of our own IDT before any fault can happen.
    unsafe {
        let stubs = &*core::ptr::addr_of!(guest_fault_stubs);
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (vector, gate) in idt.iter_mut().enumerate() {
            let handler = match vector {
                13 => stubs[0],
                6 => stubs[1],
                _ => stubs[2],
            };
            gate[0] = (handler & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | ((handler >> 16 & 0xffff) << 48);
            gate[1] = handler >> 32;
        }
        let ptr = DescriptorPointer { limit: (32 * 16 - 1) as u16, base: idt.as_ptr() as u64 };
        asm!("lidt [{}]", in(reg) &ptr, options(nostack));
    }
}

/// Runs `f`, which must fault once with `vector` on an instruction of `len`
/// bytes; returns whether it did.
fn expect_fault(vector: u64, len: u64, f: impl FnOnce()) -> bool {
    LAST_FAULT.store(u64::MAX, Ordering::SeqCst);
    SKIP_ON_FAULT.store(len, Ordering::SeqCst);
    f();
    SKIP_ON_FAULT.store(0, Ordering::SeqCst);
    LAST_FAULT.load(Ordering::SeqCst) == vector
}

// ---------------------------------------------------------------- checks

static FAILURES: AtomicU64 = AtomicU64::new(0);

fn check(ok: bool, what: fmt::Arguments<'_>) {
    if ok {
        say!("ok: {what}");
    } else {
        FAILURES.fetch_add(1, Ordering::SeqCst);
        say!("FAIL: {what}");
    }
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: may fault; the tests arm expect_fault first where it should.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as above.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack)) };
}

fn hypercall(call: Call, args: [u64; 4]) -> (i64, u64, u64, u64) {
    // SAFETY: we run at CPL 0 inside CTVM.
    unsafe { guest_agent::hypercall(call, args) }
}

/// A raw hypercall with arguments in RBX, RCX, RDX, RSI; returns RAX.
fn hypercall_raw_args(nr: u64, args: [u64; 4]) -> i64 {
    let rax: u64;
    // SAFETY: we run at CPL 0 inside CTVM; RBX is swapped through a scratch register.
    unsafe {
        asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) args[0] => _,
            inout("rax") nr => rax,
            inout("rcx") args[1] => _,
            inout("rdx") args[2] => _,
            in("rsi") args[3],
            options(nostack),
        )
    };
    rax as i64
}

fn hypercall_raw(nr: u64) -> i64 {
    let rax: u64;
    // SAFETY: an unknown call number must come back as an error, nothing else.
    unsafe { asm!("vmcall", inout("rax") nr => rax, out("rcx") _, out("rdx") _, options(nostack)) };
    rax as i64
}

fn shutdown(code: u32) -> ! {
    hypercall(Call::Shutdown, [u64::from(code), 0, 0, 0]);
    say!("FAIL: still running after the shutdown hypercall");
    loop {
        // SAFETY: parks the vCPU.
        unsafe { asm!("cli", "hlt") };
    }
}

fn test_basics() {
    let (_, _, ecx, _) = cpuid(1);
    check(ecx & (1 << 5) == 0, format_args!("cpuid hides vmx"));
    check(ecx & (1 << 31) != 0, format_args!("cpuid announces a hypervisor"));

    let (max, b, c, d) = cpuid(guest_agent::CPUID_LEAF_SIGNATURE);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..12].copy_from_slice(&d.to_le_bytes());
    check(
        &sig == guest_agent::CPUID_SIGNATURE && max >= guest_agent::CPUID_LEAF_INTERFACE,
        format_args!("hypervisor leaf signature {}", core::str::from_utf8(&sig).unwrap_or("?")),
    );

    let (status, version, caps, _) = hypercall(Call::Version, [0; 4]);
    let caps = Capabilities(caps);
    check(
        status == 0 && version == u64::from(guest_agent::ABI_VERSION) && caps.contains(Capabilities::SHUTDOWN),
        format_args!("hypercall version {}.{} caps {:#x}", version >> 16, version & 0xffff, caps.0),
    );
    let status = hypercall_raw(0xdead);
    check(Error::from_status(status) == Some(Error::UnknownCall), format_args!("unknown hypercall refused ({status})"));

    let efer = rdmsr(0xc000_0080);
    check(efer & (1 << 10) != 0, format_args!("allowed msr read (EFER {efer:#x})"));
    wrmsr(0xc000_0082, 0xffff_8000_1234_5000);
    check(rdmsr(0xc000_0082) == 0xffff_8000_1234_5000, format_args!("allowed msr write round-trips (LSTAR)"));
    let gp_basic = expect_fault(13, 2, || {
        rdmsr(0x480);
    });
    let gp_fc = expect_fault(13, 2, || wrmsr(0x3a, 0));
    check(gp_basic && gp_fc, format_args!("denied msr raises #GP"));

    let first = inb(0x2f8);
    let second = inb(0x2f8);
    outb(0x2f8, 0x55);
    check(first == 0xff && second == 0xff, format_args!("unknown port reads 0xff"));
}

/// Prints `count` numbered lines with busy work in between, so that guests
/// sharing the CPU interleave their output when time slicing works.
fn test_ticks(count: u32) {
    for i in 1..=count {
        let mut x = 0u64;
        for j in 0..3_000_000u64 {
            x = core::hint::black_box(x.wrapping_add(j));
        }
        say!("tick {i} of {count}");
    }
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter, nothing else.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// TSC ticks per 1000 instructions, from a loop of known length: under an
/// emulator this turns ticks into instructions executed (the hypervisor's
/// included, when a guest exits).
fn ticks_per_kilo_instruction() -> u64 {
    const ROUNDS: u64 = 1_000_000;
    let start = rdtsc();
    // SAFETY: a register-only countdown loop of two instructions per round.
    unsafe { asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) ROUNDS => _, options(nomem, nostack)) };
    ((rdtsc() - start) * 1000 / (2 * ROUNDS)).max(1)
}

/// What an exit costs: a CPUID the hypervisor answers, then the vTIS.
fn test_cost() {
    const N: u64 = 10_000;
    let per_k = ticks_per_kilo_instruction();
    say!("cost calibration: {per_k} ticks per 1000 instructions");
    let start = rdtsc();
    for _ in 0..N {
        core::hint::black_box(cpuid(0x4000_0000));
    }
    tpm::say_cost("CPUID exit", (rdtsc() - start) / N, per_k);
    let start = rdtsc();
    for _ in 0..N {
        core::hint::black_box(rdtsc());
    }
    tpm::say_cost("RDTSC (no exit)", (rdtsc() - start) / N, per_k);
    tpm::cost(rdtsc, per_k);
}

fn test_triple_fault() {
    say!("loading an empty IDT and raising #UD: this guest must be stopped");
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately breaks this guest.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &ptr, options(nostack)) };
}

fn test_wild_write() {
    say!("writing to guest-physical 0x40000000, outside this guest's memory");
    // SAFETY: deliberately touches memory the guest does not own; the page
    // tables map it, the EPT does not.
    unsafe { core::ptr::write_volatile(0x4000_0000 as *mut u64, 0x5a5a) };
}

#[no_mangle]
extern "C" fn guest_main(info: *const StartInfo) -> ! {
    // SAFETY: the hypervisor places a StartInfo at the address in RDI.
    let info = unsafe { &*info };
    if info.magic != start_info::MAGIC {
        say!("FAIL: no start info");
        shutdown(98);
    }
    let name = core::str::from_utf8(info.name()).unwrap_or("?");
    let cmdline = core::str::from_utf8(info.cmdline()).unwrap_or("");
    say!("CTVM test guest {name} starting ({} MiB, \"{cmdline}\")", info.mem_size >> 20);
    install_idt();

    let mut exit = 0u32;
    let mut count = 5u32;
    let mut wide = false;
    let mut test = "basics";
    for word in cmdline.split_ascii_whitespace() {
        match word.split_once('=') {
            Some(("exit", v)) => exit = v.parse().unwrap_or(97),
            Some(("test", v)) => test = v,
            Some(("count", v)) => count = v.parse().unwrap_or(5),
            Some(("tis", v)) => wide = v == "wide",
            _ => {}
        }
    }
    match test {
        "basics" => test_basics(),
        "ticks" => test_ticks(count),
        "vtpm" => tpm::run(wide),
        "cost" => test_cost(),
        "triple-fault" => test_triple_fault(),
        "wild-write" => test_wild_write(),
        other => {
            say!("FAIL: unknown test {other}");
            shutdown(96);
        }
    }
    let failures = FAILURES.load(Ordering::SeqCst);
    if failures == 0 {
        say!("all checks passed");
        shutdown(exit);
    }
    say!("{failures} checks failed");
    shutdown(99)
}

#[panic_handler]
fn panic(p: &core::panic::PanicInfo<'_>) -> ! {
    say!("FAIL: panic: {p}");
    shutdown(95)
}
