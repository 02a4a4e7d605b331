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

#[cfg(test)]
mod tests {
    use super::*;

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
