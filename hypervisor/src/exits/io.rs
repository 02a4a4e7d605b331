//! Port I/O. Guests with emulated devices trap every port: COM1 reaches the
//! vUART, port 0x92 (A20) is pinned, and everything else reads all-ones and
//! ignores writes, logged once per port and guest.

use log::info;

use super::{Action, ExitContext, StopReason};
use crate::console;
use crate::devices::uart;
use crate::guest::Platform;
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

/// Emulator control ports (Bochs' shutdown port, QEMU's isa-debug-exit):
/// only the hypervisor may end the run.
const EMULATOR_PORTS: [u16; 5] = [0x8900, 0xf4, 0xf5, 0xf6, 0xf7];

/// ACPI PM1 control: writing SLP_EN with a sleep type enters that state.
const PM1_SLP_EN: u32 = 1 << 13;

/// The 8042 keyboard controller's command port: command 0xFE pulses the
/// CPU reset line.
const PORT_8042_COMMAND: u16 = 0x64;
const I8042_RESET: u32 = 0xfe;
/// The PCI reset control register: bit 2 resets the machine.
const PORT_RESET_CONTROL: u16 = 0xcf9;
const RESET_CONTROL_RESET: u32 = 1 << 2;

/// The ports a pass-through guest cannot reach directly: they exit and are
/// handled here. Every other port goes straight to the hardware. A guest
/// resetting or powering off the machine would end the hypervisor with it.
pub fn guarded_ports(pm1a_control: Option<u16>) -> impl Iterator<Item = u16> {
    let pm1a = pm1a_control.into_iter().flat_map(|p| [p, p.wrapping_add(1)]);
    [PORT_A20, PORT_8042_COMMAND, PORT_RESET_CONTROL].into_iter().chain(EMULATOR_PORTS).chain(pm1a)
}

/// A pass-through guest's device port that can end the machine: a sleep
/// request (PM1a control) or a reset (8042 command 0xFE, reset control bit 2)
/// stops the guest instead, and the hypervisor then decides what happens to
/// the machine. Anything else reaches the hardware.
fn guarded_hardware_port(ctx: &mut ExitContext<'_>, access: IoAccess, pm1a: bool) -> Action {
    let mask = (1u64 << (8 * u32::from(access.size.min(4)))) - 1;
    if access.input {
        let value = u64::from(ctx.host.port_read(access.port, access.size));
        let rax = &mut ctx.vcpu.regs().rax;
        *rax = if access.size == 4 { value } else { (*rax & !mask) | (value & mask) };
    } else {
        let value = (ctx.vcpu.regs().rax & mask) as u32;
        if pm1a && value & PM1_SLP_EN != 0 {
            return Action::Stop(StopReason::AcpiSleep { sleep_type: ((value >> 10) & 7) as u16 });
        }
        if access.port == PORT_8042_COMMAND && access.size == 1 && value == I8042_RESET {
            return Action::Stop(StopReason::Reset { what: "keyboard-controller reset" });
        }
        if access.port == PORT_RESET_CONTROL && access.size == 1 && value & RESET_CONTROL_RESET != 0 {
            return Action::Stop(StopReason::Reset { what: "reset-control register" });
        }
        ctx.host.port_write(access.port, access.size, value);
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
    if let Platform::PassThrough { pm1a_control } = ctx.guest.platform {
        let port = access.port;
        // Emulator ports, and A20 written as a byte, stay emulated below.
        // Everything else reaches the hardware through the guard, including
        // wider accesses that merely overlap a guarded port (PCI's 32-bit
        // 0xCF8 covers 0xCF9).
        let emulated = EMULATOR_PORTS.contains(&port) || (port == PORT_A20 && access.size == 1);
        if !emulated {
            return guarded_hardware_port(ctx, access, pm1a_control == Some(port));
        }
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

    #[test]
    fn pass_through_sleep_request_stops_the_guest() {
        let mut g = test_guest();
        g.platform = Platform::PassThrough { pm1a_control: Some(0xb004) };
        // SLP_TYP 5 with SLP_EN: Linux's power-off on Bochs.
        let (a, _) = io(&mut g, 0xb004, 2, false, (5 << 10) | (1 << 13));
        assert_eq!(a, Action::Stop(StopReason::AcpiSleep { sleep_type: 5 }));
        // Without SLP_EN the write reaches the hardware (checked through FakeHost in msr tests' style).
        let (a, rax) = io(&mut g, 0xb004, 2, true, 0xffff_0000);
        assert_eq!(a, Action::Resume);
        assert_eq!(rax, 0xffff_0000 | u64::from(0xb004u32 ^ 0x5a5a) & 0xffff);
        // The emulator's shutdown port is not the guest's to use.
        let (a, _) = io(&mut g, 0x8900, 1, false, u64::from(b'S'));
        assert_eq!(a, Action::Resume);
        let (a, _) = io(&mut g, 0x64, 1, false, 0xfe);
        assert_eq!(a, Action::Stop(StopReason::Reset { what: "keyboard-controller reset" }));
        let (a, _) = io(&mut g, 0xcf9, 1, false, 0x06);
        assert_eq!(a, Action::Stop(StopReason::Reset { what: "reset-control register" }));
        assert_eq!(io(&mut g, 0x64, 1, false, 0x60).0, Action::Resume);
        // A PCI configuration address written as a dword spans 0xCF9: it must
        // reach the hardware, not be taken for a reset.
        let (a, _) = io(&mut g, 0xcf8, 4, false, 0x8000_0004);
        assert_eq!(a, Action::Resume);
        let (_, rax) = io(&mut g, 0xcf8, 4, true, 0);
        assert_eq!(rax, u64::from(0xcf8u32 ^ 0x5a5a));
        let guarded: alloc::vec::Vec<u16> = guarded_ports(Some(0xb004)).collect();
        assert!(guarded.contains(&0x8900) && guarded.contains(&0xb005) && guarded.contains(&0x92));
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
