//! Thin wrappers over privileged instructions: MSRs, CPUID, control
//! registers, port I/O, the TSC and the hardware random number generator.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, CpuidResult};

pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this processor, or the read raises #GP.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; we run at CPL 0.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and accept the value; the write may change how the
/// processor behaves in any way the MSR controls.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

macro_rules! control_register {
    ($read:ident, $write:ident, $reg:literal) => {
        pub fn $read() -> u64 {
            let value: u64;
            // SAFETY: reading a control register has no side effects at CPL 0.
            unsafe { asm!(concat!("mov {}, ", $reg), out(reg) value, options(nomem, nostack, preserves_flags)) };
            value
        }

        /// # Safety
        /// The new value changes paging or protection for the whole hypervisor.
        pub unsafe fn $write(value: u64) {
            // SAFETY: the caller guarantees the value keeps the hypervisor running.
            unsafe { asm!(concat!("mov ", $reg, ", {}"), in(reg) value, options(nostack, preserves_flags)) };
        }
    };
}

control_register!(read_cr0, write_cr0, "cr0");
control_register!(read_cr3, write_cr3, "cr3");
control_register!(read_cr4, write_cr4, "cr4");

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// CR2 only matters to the guest that runs next; any value is harmless to the host.
pub unsafe fn write_cr2(value: u64) {
    // SAFETY: see above.
    unsafe { asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and side-effect free.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// # Safety
/// Port I/O reaches devices directly.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller owns the device behind the port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// # Safety
/// Port I/O reaches devices directly.
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller owns the device behind the port.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// # Safety
/// Port I/O reaches devices directly; reads can have side effects.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller owns the device behind the port.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Ends any blocking of NMIs on this CPU with an IRET to the next
/// instruction (the only architectural way). NMIs stay blocked in the
/// hypervisor after a VM exit caused by one until an IRET; Bochs also
/// keeps them blocked after a start-up IPI ended a wait-for-SIPI in a
/// guest. Harmless when nothing is blocked.
pub fn end_nmi_blocking() {
    // SAFETY: builds a 64-bit IRET frame for the current CS:RIP, SS:RSP and
    // RFLAGS and returns through it: control, stack and flags are unchanged.
    unsafe {
        asm!(
            "mov {ss:x}, ss",
            "mov {rsp}, rsp",
            "push {ss}",
            "push {rsp}",
            "pushfq",
            "mov {ss:x}, cs",
            "push {ss}",
            "lea {rsp}, [rip + 2f]",
            "push {rsp}",
            "iretq",
            "2:",
            ss = out(reg) _,
            rsp = out(reg) _,
        )
    };
}

/// # Safety
/// Port I/O reaches devices directly; reads can have side effects.
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: the caller owns the device behind the port.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts disabled, HLT parks the CPU; NMIs return here.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Hardware entropy: RDSEED when present, else (or when RDSEED stays empty,
/// as it may under load: it waits for fresh entropy) RDRAND, each retried
/// as Intel recommends. `None` when neither exists or both keep failing.
pub fn hardware_random() -> Option<u64> {
    let has_rdseed = cpuid(7, 0).ebx & (1 << 18) != 0;
    let has_rdrand = cpuid(1, 0).ecx & (1 << 30) != 0;
    let retried = |read: fn() -> Option<u64>| (0..32).find_map(|_| read());
    has_rdseed.then(|| retried(rdseed)).flatten().or_else(|| has_rdrand.then(|| retried(rdrand)).flatten())
}

/// One RDSEED; the caller checked CPUID.
fn rdseed() -> Option<u64> {
    let (value, ok): (u64, u8);
    // SAFETY: only called where CPUID says RDSEED exists; writes registers only.
    unsafe { asm!("rdseed {}", "setc {}", out(reg) value, out(reg_byte) ok, options(nomem, nostack)) };
    (ok != 0).then_some(value)
}

/// One RDRAND; the caller checked CPUID.
fn rdrand() -> Option<u64> {
    let (value, ok): (u64, u8);
    // SAFETY: only called where CPUID says RDRAND exists; writes registers only.
    unsafe { asm!("rdrand {}", "setc {}", out(reg) value, out(reg_byte) ok, options(nomem, nostack)) };
    (ok != 0).then_some(value)
}

/// The host processor as the exit handlers see it.
pub struct HostCpu {
    /// The XCR0 components guests may enable.
    pub xcr0_offered: u64,
    /// The local APIC's page (xAPIC mode), identity-mapped uncached.
    pub lapic: u64,
}

impl crate::exits::HostCpu for HostCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = cpuid(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn rdtsc(&self) -> u64 {
        rdtsc()
    }

    fn read_msr(&self, msr: u32) -> u64 {
        // SAFETY: the MSR policy only names architectural MSRs every x86-64 CPU has.
        unsafe { rdmsr(msr) }
    }

    fn write_msr(&self, msr: u32, value: u64) {
        // SAFETY: only the syscall MSRs, validated by the policy; the hypervisor
        // itself never uses them.
        unsafe { wrmsr(msr, value) }
    }

    fn port_read(&self, port: u16, size: u8) -> u32 {
        let value: u32;
        // SAFETY: only ports the policy guards for a pass-through guest, which
        // owns the device behind them.
        unsafe {
            match size {
                1 => value = u32::from(inb(port)),
                2 => {
                    let v: u16;
                    asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags));
                    value = u32::from(v);
                }
                _ => asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)),
            }
        }
        value
    }

    fn port_write(&self, port: u16, size: u8, value: u32) {
        // SAFETY: as above.
        unsafe {
            match size {
                1 => outb(port, value as u8),
                2 => asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack, preserves_flags)),
                _ => outl(port, value),
            }
        }
    }

    fn lapic_read(&self, offset: u64) -> u32 {
        // SAFETY: a 16-byte-aligned register of the local APIC's page, which
        // the boot page tables map (the first 4 GiB), and MTRRs keep uncached.
        unsafe { core::ptr::read_volatile((self.lapic + (offset & 0xff0)) as *const u32) }
    }

    fn lapic_write(&self, offset: u64, value: u32) {
        // SAFETY: as above; the guest owns its APIC, and the caller refused
        // the writes that would start a CPU.
        unsafe { core::ptr::write_volatile((self.lapic + (offset & 0xff0)) as *mut u32, value) }
    }

    fn xcr0_offered(&self) -> u64 {
        self.xcr0_offered
    }

    fn set_xcr0(&self, value: u64) {
        // SAFETY: the XSETBV handler validated the value against CPUID.0xD.
        unsafe {
            asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
        };
    }
}

/// PCI configuration mechanism #1, through ports 0xCF8 and 0xCFC.
pub struct PortConfigSpace;

impl crate::pci::ConfigSpace for PortConfigSpace {
    fn read32(&mut self, bus: u8, device: u8, function: u8, offset: u8) -> u32 {
        let value: u32;
        // SAFETY: the configuration ports, used by the hypervisor alone
        // before any guest runs.
        unsafe {
            outl(0xcf8, crate::pci::address(bus, device, function, offset));
            asm!("in eax, dx", in("dx") 0xcfcu16, out("eax") value, options(nomem, nostack, preserves_flags));
        }
        value
    }

    fn write32(&mut self, bus: u8, device: u8, function: u8, offset: u8, value: u32) {
        // SAFETY: as above.
        unsafe {
            outl(0xcf8, crate::pci::address(bus, device, function, offset));
            outl(0xcfc, value);
        }
    }
}

/// The debug address registers DR0-DR3 and the status register DR6, which
/// VMX does not switch (DR7 and DEBUGCTL are in the VMCS): saved and
/// restored when guests share the CPU.
pub fn read_debug_registers() -> [u64; 5] {
    let (dr0, dr1, dr2, dr3, dr6): (u64, u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effect.
    unsafe {
        asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack));
        asm!("mov {}, dr1", out(reg) dr1, options(nomem, nostack));
        asm!("mov {}, dr2", out(reg) dr2, options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) dr3, options(nomem, nostack));
        asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack));
    }
    [dr0, dr1, dr2, dr3, dr6]
}

pub fn write_debug_registers(regs: [u64; 5]) {
    // SAFETY: breakpoints armed in DR0-3 only fire when DR7 enables them,
    // and the host's DR7 is 0x400 after every VM exit; DR6 is status.
    unsafe {
        asm!("mov dr0, {}", in(reg) regs[0], options(nomem, nostack));
        asm!("mov dr1, {}", in(reg) regs[1], options(nomem, nostack));
        asm!("mov dr2, {}", in(reg) regs[2], options(nomem, nostack));
        asm!("mov dr3, {}", in(reg) regs[3], options(nomem, nostack));
        asm!("mov dr6, {}", in(reg) regs[4] | 0xffff_0ff0, options(nomem, nostack));
    }
}
