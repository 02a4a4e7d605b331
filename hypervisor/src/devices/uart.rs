//! A virtual 16550 UART, transmit side: enough for polled console output.
//! Bytes collect into lines that the hypervisor prints with the guest's name.

use alloc::vec::Vec;

/// COM1's ports.
pub const BASE: u16 = 0x3f8;
pub const PORTS: core::ops::RangeInclusive<u16> = BASE..=BASE + 7;

/// Longest line kept before it is flushed anyway.
const MAX_LINE: usize = 512;

const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;

#[derive(Default)]
pub struct Uart {
    line: Vec<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    /// Lines completed so far.
    pub lines: u64,
}

impl Uart {
    /// A register write. Returns a finished line to print, if one completed.
    pub fn write(&mut self, port: u16, value: u8) -> Option<Vec<u8>> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match port.wrapping_sub(BASE) {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            0 => return self.transmit(value),
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            1 => self.ier = value & 0x0f,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scratch = value,
            _ => {}
        }
        None
    }

    /// A register read. The transmitter is always ready; nothing is ever received.
    pub fn read(&self, port: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match port.wrapping_sub(BASE) {
            0 if dlab => self.divisor as u8,
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => 0x01, // IIR: no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_IDLE,
            6 => 0xb0, // MSR: CTS, DSR, DCD
            7 => self.scratch,
            _ => 0,
        }
    }

    fn transmit(&mut self, byte: u8) -> Option<Vec<u8>> {
        match byte {
            b'\n' => Some(self.take_line()),
            b'\r' => None,
            _ => {
                self.line.push(byte);
                (self.line.len() >= MAX_LINE).then(|| self.take_line())
            }
        }
    }

    fn take_line(&mut self) -> Vec<u8> {
        self.lines += 1;
        core::mem::take(&mut self.line)
    }

    /// What is left unprinted when the guest stops.
    pub fn flush(&mut self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then(|| self.take_line())
    }
}

/// The real UART behind [`SerialFront`]: register reads and writes by
/// offset from COM1's base.
pub trait HostSerial {
    fn read(&mut self, offset: u16) -> u8;
    fn write(&mut self, offset: u16, value: u8);
}

const IER_RX: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_FIFO: u8 = 0xc0;
const MCR_LOOPBACK: u8 = 0x10;
/// Data ready, overrun, parity, framing errors, break: what only the real
/// receiver knows.
const LSR_RECEIVER: u8 = 0x1f;

/// COM1 as the pass-through guest sees it: the real chip's receiver and
/// interrupt line, a transmitter the hypervisor owns. What the guest sends
/// comes back to the caller to print under the guest's name, so the guest
/// can never write the hypervisor's console directly; the line settings
/// (divisor, LCR), FIFO control and loopback are the guest's own and never
/// reach the chip, so the hypervisor's console keeps working whatever the
/// guest programs. Received bytes, their status and the interrupt enables
/// for receive and transmit-empty go to the real UART, so the guest's
/// driver works unchanged, interrupts included.
#[derive(Default)]
pub struct SerialFront {
    ier: u8,
    lcr: u8,
    mcr: u8,
    fcr: u8,
    scratch: u8,
    divisor: u16,
    /// The transmitter emptied since IIR last said so.
    thre_pending: bool,
}

impl SerialFront {
    /// A write to register `offset`; returns a byte the guest transmitted.
    pub fn write(&mut self, offset: u16, value: u8, real: &mut dyn HostSerial) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            0 => {
                // Sent at once: the transmitter is empty again.
                self.thre_pending = true;
                return Some(value);
            }
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            1 => {
                let enabling_thre = value & IER_THRE != 0 && self.ier & IER_THRE == 0;
                self.ier = value & 0x0f;
                if enabling_thre {
                    self.thre_pending = true;
                }
                real.write(1, self.ier & (IER_RX | IER_THRE));
            }
            2 => self.fcr = value,
            3 => self.lcr = value,
            4 => {
                self.mcr = value & 0x1f;
                // DTR, RTS and OUT2 (the PC's interrupt gate); never loopback,
                // which would swallow the hypervisor's own output.
                real.write(4, value & 0x0b);
            }
            7 => self.scratch = value,
            _ => {}
        }
        None
    }

    /// A read of register `offset`.
    pub fn read(&mut self, offset: u16, real: &mut dyn HostSerial) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor as u8,
            0 => real.read(0),
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => {
                // Reading the real IIR also acknowledges its transmit-empty
                // interrupt; the guest's is this front's own.
                let real_iir = real.read(2) & 0x0f;
                let fifo = if self.fcr & 1 != 0 { IIR_FIFO } else { 0 };
                let receiving = matches!(real_iir, 0x4 | 0x6 | 0xc);
                if receiving && self.ier & IER_RX != 0 {
                    real_iir | fifo
                } else if self.thre_pending && self.ier & IER_THRE != 0 {
                    self.thre_pending = false;
                    IIR_THRE | fifo
                } else {
                    IIR_NONE | fifo
                }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => (real.read(5) & LSR_RECEIVER) | LSR_THR_EMPTY | LSR_TX_IDLE,
            6 if self.mcr & MCR_LOOPBACK != 0 => {
                // Loopback: DTR to DSR, RTS to CTS, OUT1 to RI, OUT2 to DCD.
                let m = self.mcr;
                ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            }
            6 => real.read(6),
            7 => self.scratch,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real UART that records writes and answers reads from a table.
    #[derive(Default)]
    struct Chip {
        regs: [u8; 8],
        writes: Vec<(u16, u8)>,
    }

    impl HostSerial for Chip {
        fn read(&mut self, offset: u16) -> u8 {
            self.regs[usize::from(offset)]
        }
        fn write(&mut self, offset: u16, value: u8) {
            self.writes.push((offset, value));
        }
    }

    #[test]
    fn linux_autoconfig_finds_a_16550a_without_touching_the_line_settings() {
        let (mut f, mut chip) = (SerialFront::default(), Chip::default());
        // IER read back, scratch register, divisor through DLAB.
        f.write(1, 0x0f, &mut chip);
        assert_eq!(f.read(1, &mut chip), 0x0f);
        f.write(1, 0, &mut chip);
        f.write(7, 0xa5, &mut chip);
        assert_eq!(f.read(7, &mut chip), 0xa5);
        f.write(3, 0x80, &mut chip);
        f.write(0, 0x0c, &mut chip); // 9600 baud
        assert_eq!(f.write(1, 0, &mut chip), None);
        f.write(3, 0x03, &mut chip);
        // FIFO enabled: IIR's top bits say 16550A.
        f.write(2, 0x01, &mut chip);
        assert_eq!(f.read(2, &mut chip) >> 6, 3);
        // Loopback test: MCR 0x1a reads back DCD and CTS in MSR.
        f.write(4, 0x1a, &mut chip);
        assert_eq!(f.read(6, &mut chip) & 0xf0, 0x90);
        // Nothing of the divisor, LCR, FIFO control or loopback reached the chip.
        assert!(chip.writes.iter().all(|&(o, v)| o == 1 || (o == 4 && v & MCR_LOOPBACK == 0)), "{:?}", chip.writes);
        assert!(!chip.writes.contains(&(4, 0x1a)));
    }

    #[test]
    fn output_comes_back_input_and_interrupts_are_the_chips() {
        let (mut f, mut chip) = (SerialFront::default(), Chip::default());
        assert_eq!(f.write(0, b'x', &mut chip), Some(b'x'));
        // Interrupts on: the chip raises the line for received data.
        f.write(1, IER_RX | IER_THRE, &mut chip);
        assert_eq!(chip.writes.last(), Some(&(1, IER_RX | IER_THRE)));
        // THRE is pending once after enabling, then after each byte sent.
        assert_eq!(f.read(2, &mut chip) & 0x0f, IIR_THRE);
        assert_eq!(f.read(2, &mut chip) & 0x0f, IIR_NONE);
        f.write(0, b'y', &mut chip);
        assert_eq!(f.read(2, &mut chip) & 0x0f, IIR_THRE);
        // A received byte: IIR and LSR from the chip, RBR read from it.
        chip.regs[2] = 0x04;
        chip.regs[5] = 0x01;
        chip.regs[0] = b'k';
        assert_eq!(f.read(2, &mut chip) & 0x0f, 0x04);
        assert_eq!(f.read(5, &mut chip), 0x61);
        assert_eq!(f.read(0, &mut chip), b'k');
    }

    fn send(u: &mut Uart, s: &[u8]) -> Vec<Vec<u8>> {
        s.iter().filter_map(|&b| u.write(BASE, b)).collect()
    }

    #[test]
    fn bytes_become_lines() {
        let mut u = Uart::default();
        assert_eq!(send(&mut u, b"hello\r\nworld\npart"), vec![b"hello".to_vec(), b"world".to_vec()]);
        assert_eq!(u.flush(), Some(b"part".to_vec()));
        assert_eq!(u.flush(), None);
        assert_eq!(u.lines, 3);
    }

    #[test]
    fn long_lines_are_split_not_lost() {
        let mut u = Uart::default();
        let lines = send(&mut u, &[b'x'; 1100]);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(u.flush().unwrap().len(), 1100 - 2 * MAX_LINE);
    }

    #[test]
    fn divisor_latch_does_not_print() {
        let mut u = Uart::default();
        u.write(BASE + 3, 0x80);
        assert_eq!(u.write(BASE, b'\n'), None);
        u.write(BASE + 1, 0x00);
        assert_eq!(u.read(BASE), b'\n');
        u.write(BASE + 3, 0x03);
        assert_eq!(u.read(BASE + 3), 0x03);
        assert_eq!(u.read(BASE + 5) & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert_eq!(send(&mut u, b"a\n"), vec![b"a".to_vec()]);
    }
}
