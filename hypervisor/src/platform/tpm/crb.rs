//! The Command Response Buffer interface of TPM 2.0 (TCG PC Client PTP,
//! 6.5): a locality is requested, the command written into the command
//! buffer, started, and the response read from the response buffer. CTVM
//! drives only buffers inside the locality's own 4 KiB page (QEMU's and
//! Intel PTT's layout); a chip whose buffers are elsewhere in memory is
//! refused, since that memory would first have to be taken from guests.

use alloc::vec::Vec;

use super::{Transport, TransportError};
use crate::platform::Mmio;

mod reg {
    pub const LOC_STATE: u64 = 0x00;
    pub const LOC_CTRL: u64 = 0x08;
    pub const LOC_STS: u64 = 0x0c;
    pub const CTRL_REQ: u64 = 0x40;
    pub const CTRL_STS: u64 = 0x44;
    pub const CTRL_START: u64 = 0x4c;
    pub const CMD_SIZE: u64 = 0x58;
    pub const CMD_LADDR: u64 = 0x5c;
    pub const CMD_HADDR: u64 = 0x60;
    pub const RSP_SIZE: u64 = 0x64;
    pub const RSP_ADDR: u64 = 0x68;
}

const LOC_REQUEST: u32 = 1;
const LOC_RELINQUISH: u32 = 2;
const LOC_GRANTED: u32 = 1;
const LOC_STATE_VALID: u32 = 1 << 7;
const REQ_CMD_READY: u32 = 1;
const REQ_GO_IDLE: u32 = 2;
const STS_ERROR: u32 = 1;
const STS_IDLE: u32 = 2;

const POLLS: u32 = 50_000_000;

/// One locality of a CRB chip; `regs` is that locality's 4 KiB page at
/// physical `page`.
pub struct Crb<M: Mmio> {
    regs: M,
    cmd: (u64, usize),
    rsp: (u64, usize),
}

impl<M: Mmio> Crb<M> {
    pub fn open(mut regs: M, page: u64) -> Result<Self, TransportError> {
        if regs.read32(reg::LOC_STATE) & LOC_STATE_VALID == 0 {
            return Err(TransportError::Protocol("no CRB registers"));
        }
        request(&mut regs)?;
        let cmd_addr = u64::from(regs.read32(reg::CMD_LADDR)) | (u64::from(regs.read32(reg::CMD_HADDR)) << 32);
        let cmd_size = regs.read32(reg::CMD_SIZE) as usize;
        let rsp_addr = regs.read64(reg::RSP_ADDR);
        let rsp_size = regs.read32(reg::RSP_SIZE) as usize;
        let inside = |addr: u64, size: usize| {
            let offset = addr.wrapping_sub(page);
            (0x80..0x1000).contains(&offset) && offset + size as u64 <= 0x1000 && size >= 10
        };
        if !inside(cmd_addr, cmd_size) || !inside(rsp_addr, rsp_size) {
            return Err(TransportError::Protocol("CRB buffers outside the locality's page"));
        }
        Ok(Crb { regs, cmd: (cmd_addr - page, cmd_size), rsp: (rsp_addr - page, rsp_size) })
    }

    /// Goes idle, gives the locality up and returns the registers.
    pub fn close(mut self) -> M {
        self.relinquish();
        self.regs
    }
}

fn request<M: Mmio>(regs: &mut M) -> Result<(), TransportError> {
    if regs.read32(reg::LOC_STS) & LOC_GRANTED != 0 {
        return Ok(());
    }
    regs.write32(reg::LOC_CTRL, LOC_REQUEST);
    poll(regs, reg::LOC_STS, LOC_GRANTED, LOC_GRANTED, "the locality")
}

fn poll<M: Mmio>(regs: &mut M, at: u64, mask: u32, value: u32, what: &'static str) -> Result<(), TransportError> {
    for _ in 0..POLLS {
        if regs.read32(at) & mask == value {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(TransportError::Timeout(what))
}

impl<M: Mmio> Transport for Crb<M> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        if command.len() < 10 || command.len() > self.cmd.1 {
            return Err(TransportError::TooLong);
        }
        request(&mut self.regs)?;
        self.regs.write32(reg::CTRL_REQ, REQ_CMD_READY);
        poll(&mut self.regs, reg::CTRL_REQ, REQ_CMD_READY, 0, "command ready")?;
        poll(&mut self.regs, reg::CTRL_STS, STS_IDLE, 0, "the chip to leave idle")?;
        for (i, &b) in command.iter().enumerate() {
            self.regs.write8(self.cmd.0 + i as u64, b);
        }
        self.regs.write32(reg::CTRL_START, 1);
        poll(&mut self.regs, reg::CTRL_START, 1, 0, "the command to complete")?;
        if self.regs.read32(reg::CTRL_STS) & STS_ERROR != 0 {
            return Err(TransportError::Protocol("the chip reports a fatal error"));
        }
        let read = |regs: &mut M, at: u64, n: usize| (0..n).map(|i| regs.read8(at + i as u64)).collect::<Vec<u8>>();
        let mut response = read(&mut self.regs, self.rsp.0, 10);
        let size = u32::from_be_bytes([response[2], response[3], response[4], response[5]]) as usize;
        if !(10..=self.rsp.1).contains(&size) {
            return Err(TransportError::Protocol("response size out of range"));
        }
        response.extend(read(&mut self.regs, self.rsp.0 + 10, size - 10));
        self.regs.write32(reg::CTRL_REQ, REQ_GO_IDLE);
        Ok(response)
    }

    fn relinquish(&mut self) {
        self.regs.write32(reg::CTRL_REQ, REQ_GO_IDLE);
        self.regs.write32(reg::LOC_CTRL, LOC_RELINQUISH);
    }
}

/// A model of QEMU's tpm-crb page (buffers at 0x80, 3968 bytes) with a
/// backend behind it.
#[cfg(test)]
pub mod fake {
    use alloc::boxed::Box;

    use crate::devices::tis::TpmBackend;
    use crate::platform::Mmio;

    pub struct Chip {
        pub backend: Box<dyn TpmBackend>,
        page: [u8; 0x1000],
        granted: bool,
        pub idle: bool,
        /// Where the chip says its buffers are (tests move them).
        pub buffer: u64,
    }

    impl Chip {
        pub fn new(backend: Box<dyn TpmBackend>) -> Self {
            let mut c = Chip { backend, page: [0; 0x1000], granted: false, idle: true, buffer: 0xfed4_0080 };
            c.set32(0x00, 1 << 7);
            c
        }
        fn set32(&mut self, at: usize, v: u32) {
            self.page[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        fn get32(&self, at: usize) -> u32 {
            u32::from_le_bytes(self.page[at..at + 4].try_into().unwrap())
        }
    }

    impl Mmio for Chip {
        fn read32(&mut self, o: u64) -> u32 {
            match o {
                0x0c => u32::from(self.granted),
                0x44 => u32::from(self.idle) << 1,
                0x58 | 0x64 => 0xf80,
                0x5c | 0x68 => self.buffer as u32,
                0x60 | 0x6c => (self.buffer >> 32) as u32,
                o => self.get32(o as usize),
            }
        }
        fn write32(&mut self, o: u64, v: u32) {
            match o {
                0x08 if v & 1 != 0 => self.granted = true,
                0x08 if v & 2 != 0 => self.granted = false,
                0x40 if v & 1 != 0 => self.idle = false,
                0x40 if v & 2 != 0 => self.idle = true,
                0x4c if v & 1 != 0 && self.granted && !self.idle => {
                    let size = u32::from_be_bytes(self.page[0x82..0x86].try_into().unwrap()) as usize;
                    let command = self.page[0x80..0x80 + size.clamp(10, 0xf80)].to_vec();
                    let response = self.backend.execute(0, &command);
                    self.page[0x80..0x80 + response.len()].copy_from_slice(&response);
                }
                o => self.set32(o as usize, v),
            }
        }
        fn read8(&mut self, o: u64) -> u8 {
            self.page[o as usize]
        }
        fn write8(&mut self, o: u64, v: u8) {
            self.page[o as usize] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Chip;
    use super::*;
    use crate::devices::tis::TpmBackend;
    use alloc::boxed::Box;

    struct Reverse;
    impl TpmBackend for Reverse {
        fn execute(&mut self, _: u8, command: &[u8]) -> Vec<u8> {
            let mut r = command.to_vec();
            r[10..].reverse();
            r
        }
    }

    #[test]
    fn commands_go_through_the_buffers() {
        let mut crb = Crb::open(Chip::new(Box::new(Reverse)), 0xfed4_0000).unwrap();
        let cmd = [0x80, 0x01, 0, 0, 0, 13, 0, 0, 1, 0x7e, 1, 2, 3];
        assert_eq!(crb.transmit(&cmd).unwrap(), [0x80, 0x01, 0, 0, 0, 13, 0, 0, 1, 0x7e, 3, 2, 1]);
        let chip = crb.close();
        assert!(chip.idle);
        let too_long = alloc::vec![0u8; 0x1000];
        let mut crb = Crb::open(chip, 0xfed4_0000).unwrap();
        assert_eq!(crb.transmit(&too_long), Err(TransportError::TooLong));
    }

    /// A chip (or firmware) pointing the buffers at guest memory is refused.
    #[test]
    fn buffers_outside_the_page_are_refused() {
        let mut chip = Chip::new(Box::new(Reverse));
        chip.buffer = 0x1000_0000;
        assert!(matches!(Crb::open(chip, 0xfed4_0000), Err(TransportError::Protocol(_))));
        let mut chip = Chip::new(Box::new(Reverse));
        chip.buffer = 0xfed4_0f00;
        assert!(Crb::open(chip, 0xfed4_0000).is_err(), "a buffer running past the page");
    }
}
