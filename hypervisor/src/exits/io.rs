//! Port I/O. Guests with emulated devices trap every port: COM1 reaches the
//! vUART, port 0x92 (A20) is pinned, and everything else reads all-ones and
//! ignores writes, logged once per port and guest.

use log::info;

use super::{Action, ExitContext, StopReason};
use crate::arch::x86_64::vmx::bitmaps::IoBitmap;
use crate::console;
use crate::devices::uart;
use crate::guest::{Platform, PortSet};
use crate::integrity::{View, ViolationKind};
use crate::vcpu::{skip_instruction, Field};

/// An I/O instruction, from its exit qualification (SDM Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    pub size: u8,
    pub input: bool,
    pub string: bool,
}

impl IoAccess {
    pub const fn from_qualification(q: u64) -> Self {
        IoAccess {
            size: ((q & 7) + 1) as u8,
            input: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// System control port A: bit 1 enables A20. Writes could disable A20 and
/// make the guest's addresses wrap, so they are ignored.
const PORT_A20: u16 = 0x92;

/// ACPI PM1 control: writing SLP_EN with a sleep type enters that state.
const PM1_SLP_EN: u32 = 1 << 13;

/// The 8042 keyboard controller's command port: command 0xFE pulses the
/// CPU reset line.
const PORT_8042_COMMAND: u16 = 0x64;
/// The PCI reset control register: bit 2 resets the machine.
const PORT_RESET_CONTROL: u16 = 0xcf9;
const RESET_CONTROL_RESET: u32 = 1 << 2;

/// The 8042's "write output port" command: its next data byte drives the
/// CPU reset line (bit 0) and A20 (bit 1), through port 0x60, which passes.
const I8042_WRITE_OUTPUT: u32 = 0xd1;
/// The PCI configuration address: only a dword access at 0xCF8 reaches it.
const PORT_PCI_ADDRESS: u16 = 0xcf8;

/// The ports a pass-through guest's kernel reaches without an exit: the
/// PC's legacy devices it owns, each with why letting it through is safe.
/// The ACPI register blocks of the FADT and the PCI devices' I/O BARs are
/// added at start; every other port exits, and is emulated as absent
/// unless it is guarded below. Left out on purpose: the ISA DMA controller
/// (0x00-0x1F, 0x81-0x9F, 0xC0-0xDF), whose transfers reach the low 16 MiB
/// of physical memory, the hypervisor's included, and COM1, which the
/// hypervisor's console owns.
pub const LEGACY_PASS: &[(u16, u16, &str)] = &[
    (0x20, 0x21, "8259 interrupt controller (master)"),
    (0x40, 0x43, "8254 timer"),
    (0x60, 0x60, "8042 keyboard data (its commands on 0x64 are guarded)"),
    (0x61, 0x61, "NMI status and the timer's gate 2"),
    (0x70, 0x71, "RTC and CMOS"),
    (0x80, 0x80, "POST code, Linux's I/O delay port"),
    (0xa0, 0xa1, "8259 interrupt controller (slave)"),
    (0x170, 0x177, "ATA, secondary channel"),
    (0x1f0, 0x1f7, "ATA, primary channel"),
    (0x2e8, 0x2ef, "COM4"),
    (0x2f8, 0x2ff, "COM2"),
    (0x376, 0x376, "ATA, secondary control"),
    (0x378, 0x37f, "LPT1"),
    (0x3b0, 0x3df, "VGA"),
    (0x3e8, 0x3ef, "COM3"),
    (0x3f6, 0x3f6, "ATA, primary control"),
    (0x4d0, 0x4d1, "ELCR: interrupt trigger modes"),
    (0xcf8, 0xcf8, "PCI configuration address (a dword; 0xCF9 beside it is the reset register)"),
    (0xcfa, 0xcff, "PCI configuration data"),
];

/// The ports of a pass-through guest that exit and are handled here rather
/// than treated as absent: resets, the power-off register, A20 and COM1.
fn guarded(port: u16, pm1a_control: Option<u16>) -> bool {
    matches!(port, PORT_A20 | PORT_8042_COMMAND | PORT_RESET_CONTROL)
        || uart::PORTS.contains(&port)
        || pm1a_control.is_some_and(|p| port == p || port == p.wrapping_add(1))
}

/// The pass-through guest's I/O bitmaps: (kernel view, module views). The
/// kernel view passes `allowed` (the legacy list, ACPI blocks, PCI BARs)
/// minus the guarded ports; a module's view passes nothing.
pub fn pass_through_bitmaps(allowed: &PortSet, pm1a_control: Option<u16>) -> (IoBitmap, IoBitmap) {
    let mut kernel = IoBitmap::trap_all();
    let mut passed = IoBitmap::pass_all();
    passed.trap((0..=u16::MAX).filter(|&p| allowed.contains(p) && !guarded(p, pm1a_control)));
    for (k, p) in kernel.0.iter_mut().zip(passed.0.iter()) {
        *k &= !p;
    }
    (kernel, IoBitmap::trap_all())
}

/// What becomes of one byte written to a guarded port.
#[derive(Debug, PartialEq)]
enum Guard {
    Pass,
    /// Refused: the byte goes nowhere.
    Drop,
    /// A reset or a sleep request: the guest stops instead, and the
    /// hypervisor decides what becomes of the machine.
    Stop(StopReason),
}

fn guard_write(port: u16, byte: u8, pm1a_control: Option<u16>) -> Guard {
    let byte = u32::from(byte);
    match port {
        // Commands 0xF0-0xFF pulse the output lines whose bit is clear;
        // bit 0 is the reset line.
        PORT_8042_COMMAND if byte >= 0xf0 && byte & 1 == 0 => {
            Guard::Stop(StopReason::Reset { what: "keyboard-controller reset" })
        }
        // "Write output port" would let port 0x60, which passes, drive the
        // reset line and A20.
        PORT_8042_COMMAND if byte == I8042_WRITE_OUTPUT => Guard::Drop,
        PORT_RESET_CONTROL if byte & RESET_CONTROL_RESET != 0 => {
            Guard::Stop(StopReason::Reset { what: "reset-control register" })
        }
        // SLP_EN is bit 13 of the 16-bit PM1 control register: bit 5 of its
        // second byte, SLP_TYP bits 2-4 of it.
        _ if pm1a_control.is_some_and(|p| port == p.wrapping_add(1)) && byte & (PM1_SLP_EN >> 8) != 0 => {
            Guard::Stop(StopReason::AcpiSleep { sleep_type: ((byte >> 2) & 7) as u16 })
        }
        _ => Guard::Pass,
    }
}

/// The real COM1, through the host's port I/O.
struct HostCom1<'a>(&'a dyn super::HostCpu);

impl uart::HostSerial for HostCom1<'_> {
    fn read(&mut self, offset: u16) -> u8 {
        self.0.port_read(uart::BASE + offset, 1) as u8
    }
    fn write(&mut self, offset: u16, value: u8) {
        self.0.port_write(uart::BASE + offset, 1, u32::from(value));
    }
}

/// A port exit of a pass-through guest: an access that touches a port off
/// the allow-list or a guarded one.
fn pass_through(ctx: &mut ExitContext<'_>, access: IoAccess, pm1a_control: Option<u16>) -> Action {
    // An isolated module reaches no port: reported, and emulated as absent.
    if let View::Module(_) = ctx.view() {
        super::integrity::refusal(ctx, ViolationKind::ModulePortIo, u64::from(access.port));
        return absent(ctx, access);
    }
    let lanes = || (0..access.size).map(|i| access.port.wrapping_add(u16::from(i)));
    let hardware = |p: u16| ctx.guest.ports_passed.contains(p) || guarded(p, pm1a_control);
    let whole = access.port == PORT_PCI_ADDRESS && access.size == 4
        || lanes().all(|p| hardware(p) && p != PORT_A20 && !uart::PORTS.contains(&p));
    let mask = (1u64 << (8 * u32::from(access.size))) - 1;
    if access.input {
        let value = if whole {
            u64::from(ctx.host.port_read(access.port, access.size))
        } else {
            let mut v = 0u64;
            for (i, p) in lanes().enumerate() {
                v |= u64::from(pass_through_read_byte(ctx, p)) << (8 * i);
            }
            v
        };
        let rax = &mut ctx.vcpu.regs().rax;
        *rax = if access.size == 4 { value } else { (*rax & !mask) | (value & mask) };
    } else {
        let value = ctx.vcpu.regs().rax & mask;
        let pci_address = access.port == PORT_PCI_ADDRESS && access.size == 4;
        let mut dropped = false;
        if !pci_address {
            for (i, p) in lanes().enumerate() {
                match guard_write(p, (value >> (8 * i)) as u8, pm1a_control) {
                    Guard::Pass => {}
                    Guard::Drop => dropped = true,
                    Guard::Stop(stop) => return Action::Stop(stop),
                }
            }
        }
        if dropped {
            note_unhandled(ctx, access.port, "refused write");
        } else if whole {
            ctx.host.port_write(access.port, access.size, value as u32);
        } else {
            for (i, p) in lanes().enumerate() {
                pass_through_write_byte(ctx, p, (value >> (8 * i)) as u8);
            }
        }
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

fn pass_through_read_byte(ctx: &mut ExitContext<'_>, port: u16) -> u8 {
    if uart::PORTS.contains(&port) {
        let host = ctx.host;
        ctx.guest.serial.read(port - uart::BASE, &mut HostCom1(host))
    } else if port == PORT_A20 {
        0x02
    } else if ctx.guest.ports_passed.contains(port) || guarded(port, None) {
        ctx.host.port_read(port, 1) as u8
    } else {
        note_unhandled(ctx, port, "read");
        0xff
    }
}

fn pass_through_write_byte(ctx: &mut ExitContext<'_>, port: u16, value: u8) {
    if uart::PORTS.contains(&port) {
        let host = ctx.host;
        if let Some(byte) = ctx.guest.serial.write(port - uart::BASE, value, &mut HostCom1(host)) {
            console::guest_bytes(ctx.guest.name(), &[byte]);
        }
    } else if port == PORT_A20 {
        // Bit 0 resets the CPU, bit 1 gates A20: neither is the guest's.
    } else if ctx.guest.ports_passed.contains(port) || guarded(port, None) {
        ctx.host.port_write(port, 1, u32::from(value));
    } else {
        note_unhandled(ctx, port, "write");
    }
}

/// An access to no device: reads give all-ones, writes go nowhere.
fn absent(ctx: &mut ExitContext<'_>, access: IoAccess) -> Action {
    if access.input {
        let rax = &mut ctx.vcpu.regs().rax;
        *rax = match access.size {
            1 => *rax | 0xff,
            2 => *rax | 0xffff,
            _ => 0xffff_ffff,
        };
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

fn read_byte(ctx: &mut ExitContext<'_>, port: u16) -> u8 {
    if uart::PORTS.contains(&port) && !ctx.guest.platform.is_pass_through() {
        ctx.guest.uart.read(port)
    } else if port == PORT_A20 {
        0x02
    } else {
        note_unhandled(ctx, port, "read");
        0xff
    }
}

fn write_byte(ctx: &mut ExitContext<'_>, port: u16, value: u8) {
    if uart::PORTS.contains(&port) && !ctx.guest.platform.is_pass_through() {
        if let Some(line) = ctx.guest.uart.write(port, value) {
            console::guest_line(ctx.guest.name(), &line);
        }
    } else {
        note_unhandled(ctx, port, "write");
    }
}

fn note_unhandled(ctx: &mut ExitContext<'_>, port: u16, what: &str) {
    if ctx.guest.ports_logged.first_time(port) {
        info!(
            "guest {}: unhandled port {port:#x} ({what}); reads give 0xff, writes are ignored (logged once)",
            ctx.guest.name()
        );
    }
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let access = IoAccess::from_qualification(ctx.exit.qualification);
    if access.string {
        return Action::Stop(StopReason::Unsupported {
            what: "string port I/O (INS/OUTS)",
            rip: ctx.vcpu.read(Field::Rip),
        });
    }
    if let Platform::PassThrough { pm1a_control, .. } = ctx.guest.platform {
        return pass_through(ctx, access, pm1a_control);
    }
    // Multi-byte accesses reach consecutive ports, as on the ISA bus.
    if access.input {
        let mut value = 0u64;
        for i in 0..access.size {
            let byte = read_byte(ctx, access.port.wrapping_add(u16::from(i)));
            value |= u64::from(byte) << (8 * i);
        }
        let rax = &mut ctx.vcpu.regs().rax;
        *rax = match access.size {
            1 => (*rax & !0xff) | value,
            2 => (*rax & !0xffff) | value,
            _ => value, // a 32-bit destination zero-extends into RAX
        };
    } else {
        let rax = ctx.vcpu.regs().rax;
        for i in 0..access.size {
            write_byte(ctx, access.port.wrapping_add(u16::from(i)), (rax >> (8 * i)) as u8);
        }
    }
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::{test_guest, Guest};
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};
    use alloc::vec::Vec;

    fn qual(port: u16, size: u8, input: bool) -> u64 {
        (u64::from(port) << 16) | u64::from(size - 1) | (u64::from(input) << 3)
    }

    fn io(g: &mut Guest, port: u16, size: u8, input: bool, rax: u64) -> (Action, u64) {
        let mut v = FakeVcpu::new();
        v.regs.rax = rax;
        let exit = ExitInfo {
            reason: reason::IO_INSTRUCTION,
            qualification: qual(port, size, input),
            instruction_len: 1,
            ..Default::default()
        };
        let a = run(g, &mut v, exit);
        let expected_rip = if a == Action::Resume { 0x10_0001 } else { 0x10_0000 };
        assert_eq!(v.read(Field::Rip), expected_rip);
        (a, v.regs.rax)
    }

    #[test]
    fn qualification_decodes() {
        let a = IoAccess::from_qualification(qual(0x3fd, 1, true));
        assert_eq!(a, IoAccess { port: 0x3fd, size: 1, input: true, string: false });
        assert_eq!(IoAccess::from_qualification(qual(0xcf8, 4, false)).size, 4);
    }

    #[test]
    fn uart_output_forms_lines() {
        let mut g = test_guest();
        for b in b"hi\n" {
            assert_eq!(io(&mut g, 0x3f8, 1, false, u64::from(*b)).0, Action::Resume);
        }
        assert_eq!(g.uart.lines, 1);
        // LSR says the transmitter is empty; the upper bytes of RAX survive a byte read.
        assert_eq!(io(&mut g, 0x3fd, 1, true, 0x1234_5600).1, 0x1234_5660);
    }

    #[test]
    fn unknown_ports_read_ones_and_are_logged_once() {
        let mut g = test_guest();
        assert_eq!(io(&mut g, 0x2f8, 1, true, 0).1, 0xff);
        assert_eq!(io(&mut g, 0x2f8, 2, true, 0xffff_ffff_0000_0000).1, 0xffff_ffff_0000_ffff);
        assert_eq!(io(&mut g, 0xcfc, 4, true, 0xffff_ffff_0000_0000).1, 0xffff_ffff);
        assert!(!g.ports_logged.first_time(0x2f8));
        assert!(!g.ports_logged.first_time(0x2f9));
        assert!(g.ports_logged.first_time(0x2fa));
    }

    #[test]
    fn a20_stays_on() {
        let mut g = test_guest();
        io(&mut g, 0x92, 1, false, 0);
        assert_eq!(io(&mut g, 0x92, 1, true, 0).1, 0x02);
    }

    /// A pass-through guest with Bochs' PM1a control port on its allow-list.
    fn pass_through_guest() -> Guest {
        let mut g = test_guest();
        g.platform = Platform::PassThrough { pm1a_control: Some(0xb004), lapic: None };
        for &(first, last, _) in LEGACY_PASS.iter().chain(&[(0xb000, 0xb00b, "ACPI")]) {
            (first..=last).for_each(|p| g.ports_passed.insert(p));
        }
        g
    }

    /// Runs one port exit with a host that records what reaches it.
    fn pt_io(g: &mut Guest, port: u16, size: u8, input: bool, rax: u64) -> (Action, u64, Vec<(u16, u8, u32)>) {
        let mut v = FakeVcpu::new();
        v.regs.rax = rax;
        let exit = ExitInfo {
            reason: reason::IO_INSTRUCTION,
            qualification: qual(port, size, input),
            instruction_len: 1,
            ..Default::default()
        };
        let host = crate::exits::testing::FakeHost::default();
        let phys = crate::guest::memory::fake::FakePhys::new(0, 0);
        let mut ctx =
            crate::exits::ExitContext { guest: g, vcpu: &mut v, exit: &exit, host: &host, phys: &phys, control: None };
        let a = crate::exits::dispatch(&mut ctx);
        let writes = host.port_writes.borrow().clone();
        (a, v.regs.rax, writes)
    }

    #[test]
    fn pass_through_sleep_request_stops_the_guest() {
        let mut g = pass_through_guest();
        // SLP_TYP 5 with SLP_EN: Linux's power-off on Bochs.
        let (a, _, _) = pt_io(&mut g, 0xb004, 2, false, (5 << 10) | (1 << 13));
        assert_eq!(a, Action::Stop(StopReason::AcpiSleep { sleep_type: 5 }));
        // The same through the register's second byte alone.
        let (a, _, w) = pt_io(&mut g, 0xb005, 1, false, (5 << 2) | (1 << 5));
        assert_eq!(a, Action::Stop(StopReason::AcpiSleep { sleep_type: 5 }));
        assert!(w.is_empty(), "it never reached the chipset");
        // Without SLP_EN the write reaches the hardware.
        let (a, _, w) = pt_io(&mut g, 0xb004, 2, false, 1);
        assert_eq!((a, w), (Action::Resume, alloc::vec![(0xb004, 2, 1)]));
    }

    #[test]
    fn no_width_of_access_resets_the_machine_behind_the_hypervisor() {
        // (port, size, value): the reset register, the 8042's reset pulse,
        // fast reset through port 0x92, each as bytes and wider.
        for (port, size, value, stops) in [
            (0xcf9, 1, 0x06, true),
            (0xcf9, 2, 0x0006, true),
            (0xcf9, 4, 0x0000_0006, true),
            (0xcf8, 2, 0x0600, true), // the high byte lands on 0xCF9
            (0x64, 1, 0xfe, true),
            (0x64, 2, 0x00fe, true),
            (0x63, 2, 0xfe00, true),
            (0x64, 1, 0xf0, true), // any pulse with bit 0 clear
            (0x92, 1, 0x01, false),
            (0x92, 2, 0x0001, false),
            (0x91, 4, 0x0000_0100, false),
        ] {
            let mut g = pass_through_guest();
            let (a, _, writes) = pt_io(&mut g, port, size, false, value);
            if stops {
                assert!(matches!(a, Action::Stop(StopReason::Reset { .. })), "{port:#x}/{size}: {a:?}");
            } else {
                assert_eq!(a, Action::Resume, "{port:#x}/{size}");
            }
            // Nothing that could reset reached the hardware: no byte at 0x92,
            // no reset value at 0xCF9 or 0x64.
            for (p, s, v) in writes {
                for k in 0..s {
                    let lane = p + u16::from(k);
                    assert!(
                        lane != 0x92 && lane != 0xcf9 && lane != 0x64,
                        "{port:#x}/{size}: reached {lane:#x} ({v:#x})"
                    );
                }
            }
        }
        // "Write output port" is refused: 0x60 then cannot drive the reset line.
        let mut g = pass_through_guest();
        let (a, _, w) = pt_io(&mut g, 0x64, 1, false, 0xd1);
        assert_eq!((a, w), (Action::Resume, alloc::vec![]));
        // Ordinary 8042 commands and PCI's configuration address go through.
        let (a, _, w) = pt_io(&mut g, 0x64, 1, false, 0x60);
        assert_eq!((a, w), (Action::Resume, alloc::vec![(0x64, 1, 0x60)]));
        let (_, _, w) = pt_io(&mut g, 0xcf8, 4, false, 0x8000_0004);
        assert_eq!(w, [(0xcf8, 4, 0x8000_0004)], "a dword at 0xCF8 is the configuration address");
        let (_, rax, _) = pt_io(&mut g, 0xcf8, 4, true, 0);
        assert_eq!(rax, u64::from(0xcf8u32 ^ 0x5a5a));
    }

    #[test]
    fn ports_off_the_allow_list_are_absent() {
        // The ISA DMA controller, whose transfers could reach the hypervisor's memory.
        let mut g = pass_through_guest();
        for port in [0x00u16, 0x0a, 0x81, 0xc0, 0xd6, 0x8900] {
            let (a, _, w) = pt_io(&mut g, port, 1, false, 0x55);
            assert_eq!((a, w), (Action::Resume, alloc::vec![]), "{port:#x}");
            assert_eq!(pt_io(&mut g, port, 1, true, 0x1200).1, 0x12ff, "{port:#x} reads as absent");
        }
        // A listed device's port reaches the hardware.
        assert_eq!(pt_io(&mut g, 0x70, 1, false, 0x8f).2, [(0x70, 1, 0x8f)]);
        // The bitmaps: the kernel view passes the list but not the guarded
        // ports; a module's view passes nothing.
        let (kernel, module) = pass_through_bitmaps(&g.ports_passed, Some(0xb004));
        assert!(!kernel.traps(0x70) && !kernel.traps(0xb008) && !kernel.traps(0xcf8));
        for p in [0x00, 0x92, 0x64, 0xcf9, 0x3f8, 0x3fd, 0xb004, 0xb005, 0x8900] {
            assert!(kernel.traps(p), "{p:#x}");
        }
        assert!((0..=u16::MAX).all(|p| module.traps(p)));
    }

    #[test]
    fn an_isolated_module_reaches_no_port() {
        use crate::integrity::{GuestIntegrity, Mode, View};
        let mut g = pass_through_guest();
        let mut integrity = GuestIntegrity::new(Mode::Enforce, alloc::vec![]);
        integrity.local.view = View::Module(3);
        g.integrity = Some(integrity);
        for (port, size, input) in [(0xcf9, 1, false), (0xcf8, 4, false), (0x70, 1, true), (0x3f8, 1, false)] {
            let (a, rax, w) = pt_io(&mut g, port, size, input, 0x06);
            assert_eq!((a, w), (Action::Resume, alloc::vec![]), "{port:#x}");
            if input {
                assert_eq!(rax & 0xff, 0xff);
            }
        }
        let kinds: Vec<u32> = g.integrity.as_mut().unwrap().engine.violations.take(9).map(|r| r.kind).collect();
        assert_eq!(kinds, [crate::integrity::ViolationKind::ModulePortIo as u32; 4]);
    }

    #[test]
    fn com1_output_is_the_hypervisors_to_print() {
        let mut g = pass_through_guest();
        let (a, _, w) = pt_io(&mut g, 0x3f8, 1, false, u64::from(b'x'));
        assert_eq!((a, w), (Action::Resume, alloc::vec![]), "the byte never reaches the chip directly");
        // The divisor the guest programs stays its own.
        pt_io(&mut g, 0x3fb, 1, false, 0x80);
        let (_, _, w) = pt_io(&mut g, 0x3f8, 1, false, 0x0c);
        assert!(w.is_empty());
    }

    #[test]
    fn string_io_is_refused_not_skipped() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        let exit = ExitInfo {
            reason: reason::IO_INSTRUCTION,
            qualification: qual(0x3f8, 1, false) | (1 << 4),
            instruction_len: 2,
            ..Default::default()
        };
        assert!(matches!(run(&mut g, &mut v, exit), Action::Stop(StopReason::Unsupported { .. })));
        assert_eq!(v.read(Field::Rip), 0x10_0000);
    }
}
