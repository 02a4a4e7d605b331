//! The TIS (TPM 1.2) and PTP FIFO (TPM 2.0) interface, as a driver: the
//! same registers the vTIS emulates for guests, seen from the other side.
//! Every wait is bounded; a chip that stops answering is reported.

use alloc::vec::Vec;

use super::{Transport, TransportError};
use crate::platform::Mmio;

mod reg {
    pub const ACCESS: u64 = 0x00;
    pub const STS: u64 = 0x18;
    pub const BURST: u64 = 0x19;
    pub const FIFO: u64 = 0x24;
    pub const DID_VID: u64 = 0xf00;
}

mod access {
    pub const VALID: u8 = 0x80;
    pub const ACTIVE: u8 = 0x20;
    pub const REQUEST: u8 = 0x02;
}

mod sts {
    pub const VALID: u8 = 0x80;
    pub const COMMAND_READY: u8 = 0x40;
    pub const GO: u8 = 0x20;
    pub const DATA_AVAIL: u8 = 0x10;
    pub const EXPECT: u8 = 0x08;
}

/// Register polls before a wait counts as failed: far more than the
/// longest command (RSA key generation takes seconds on slow chips).
const POLLS: u32 = 50_000_000;

/// The largest response CTVM accepts.
const MAX_RESPONSE: usize = 4096;

/// One locality of a TIS/FIFO chip. `regs` is the whole 5-page window.
pub struct Tis<M: Mmio> {
    regs: M,
    locality: u8,
}

impl<M: Mmio> Tis<M> {
    /// Requests `locality` and waits until it is granted.
    pub fn open(regs: M, locality: u8) -> Result<Self, TransportError> {
        let mut tis = Tis { regs, locality };
        tis.request()?;
        Ok(tis)
    }

    fn request(&mut self) -> Result<(), TransportError> {
        let at = self.at(reg::ACCESS);
        let held = |a: u8| a & (access::VALID | access::ACTIVE) == access::VALID | access::ACTIVE;
        if held(self.regs.read8(at)) {
            return Ok(());
        }
        self.regs.write8(at, access::REQUEST);
        for _ in 0..POLLS {
            if held(self.regs.read8(at)) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(TransportError::Timeout("the locality"))
    }

    fn at(&self, offset: u64) -> u64 {
        (u64::from(self.locality) << 12) + offset
    }

    /// The chip's vendor and device ids.
    pub fn did_vid(&mut self) -> u32 {
        let at = self.at(reg::DID_VID);
        self.regs.read32(at)
    }

    fn status(&mut self) -> u8 {
        let at = self.at(reg::STS);
        self.regs.read8(at)
    }

    fn wait(&mut self, mask: u8, value: u8, what: &'static str) -> Result<(), TransportError> {
        for _ in 0..POLLS {
            if self.status() & mask == value {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(TransportError::Timeout(what))
    }

    fn burst(&mut self) -> Result<usize, TransportError> {
        let at = self.at(reg::BURST);
        for _ in 0..POLLS {
            let count = u16::from(self.regs.read8(at)) | u16::from(self.regs.read8(at + 1)) << 8;
            if count > 0 {
                return Ok(usize::from(count));
            }
            core::hint::spin_loop();
        }
        Err(TransportError::Timeout("a burst count"))
    }

    fn read_fifo(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), TransportError> {
        let fifo = self.at(reg::FIFO);
        while out.len() < n {
            self.wait(sts::VALID | sts::DATA_AVAIL, sts::VALID | sts::DATA_AVAIL, "response data")?;
            let burst = self.burst()?.min(n - out.len());
            for _ in 0..burst {
                let b = self.regs.read8(fifo);
                out.push(b);
            }
        }
        Ok(())
    }

    /// Gives the locality up and returns the registers.
    pub fn close(mut self) -> M {
        self.relinquish();
        self.regs
    }
}

impl<M: Mmio> Transport for Tis<M> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        if command.len() < 10 || command.len() > MAX_RESPONSE {
            return Err(TransportError::TooLong);
        }
        self.request()?;
        let sts_at = self.at(reg::STS);
        let fifo = self.at(reg::FIFO);
        // Ready for a command.
        self.regs.write8(sts_at, sts::COMMAND_READY);
        self.wait(sts::COMMAND_READY, sts::COMMAND_READY, "command ready")?;
        // All bytes but the last, in bursts; the chip must then expect more.
        let (last, body) = command.split_last().ok_or(TransportError::TooLong)?;
        let mut sent = 0;
        while sent < body.len() {
            let burst = self.burst()?.min(body.len() - sent);
            for &b in &body[sent..sent + burst] {
                self.regs.write8(fifo, b);
            }
            sent += burst;
            self.wait(sts::VALID, sts::VALID, "status valid")?;
            if self.status() & sts::EXPECT == 0 {
                return Err(TransportError::Protocol("the chip stopped expecting command bytes"));
            }
        }
        self.regs.write8(fifo, *last);
        self.wait(sts::VALID, sts::VALID, "status valid")?;
        if self.status() & sts::EXPECT != 0 {
            return Err(TransportError::Protocol("the chip expects more bytes than the command has"));
        }
        self.regs.write8(sts_at, sts::GO);
        // The header gives the response's size.
        let mut response = Vec::with_capacity(64);
        self.read_fifo(&mut response, 10)?;
        let size = u32::from_be_bytes([response[2], response[3], response[4], response[5]]) as usize;
        if !(10..=MAX_RESPONSE).contains(&size) {
            self.regs.write8(sts_at, sts::COMMAND_READY);
            return Err(TransportError::Protocol("response size out of range"));
        }
        self.read_fifo(&mut response, size)?;
        self.wait(sts::VALID, sts::VALID, "status valid")?;
        let more = self.status() & sts::DATA_AVAIL != 0;
        self.regs.write8(sts_at, sts::COMMAND_READY);
        if more {
            return Err(TransportError::Protocol("more response bytes than the response says"));
        }
        Ok(response)
    }

    fn relinquish(&mut self) {
        let at = self.at(reg::ACCESS);
        self.regs.write8(at, access::ACTIVE);
    }
}

/// A TIS register window over the vTIS model: the driver and the model
/// the guests see, tested against each other.
#[cfg(test)]
pub mod fake {
    use alloc::boxed::Box;

    use crate::devices::tis::{Tis as Model, TpmBackend};
    use crate::platform::Mmio;

    pub struct Chip(pub Model<Box<dyn TpmBackend>>);

    impl Chip {
        pub fn new(backend: Box<dyn TpmBackend>) -> Self {
            Chip(Model::new(backend, 0))
        }
    }

    impl Mmio for Chip {
        fn read32(&mut self, offset: u64) -> u32 {
            self.0.read(offset, 4) as u32
        }
        fn write32(&mut self, offset: u64, value: u32) {
            self.0.write(offset, 4, u64::from(value));
        }
        fn read8(&mut self, offset: u64) -> u8 {
            self.0.read(offset, 1) as u8
        }
        fn write8(&mut self, offset: u64, value: u8) {
            self.0.write(offset, 1, u64::from(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Chip;
    use super::*;
    use crate::devices::tis::TpmBackend;
    use alloc::boxed::Box;

    struct Echo;
    impl TpmBackend for Echo {
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            let mut r = command.to_vec();
            r[1] = locality;
            r
        }
    }

    #[test]
    fn commands_go_through_the_fifo_and_back() {
        let mut tis = Tis::open(Chip::new(Box::new(Echo)), 0).unwrap();
        assert_eq!(tis.did_vid(), 0x0001_1014);
        // Longer than a burst of the model (it answers 4 bytes at a time).
        let mut cmd = alloc::vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 1, 0x44];
        cmd.extend(0..200u8);
        let n = cmd.len() as u32;
        cmd[2..6].copy_from_slice(&n.to_be_bytes());
        let r = tis.transmit(&cmd).unwrap();
        assert_eq!(r.len(), cmd.len());
        assert_eq!(&r[10..], &cmd[10..]);
        // Another command on the same locality, after giving it up (it is
        // requested again), then another locality.
        tis.relinquish();
        assert_eq!(tis.transmit(&cmd).unwrap(), r);
        let chip = tis.close();
        let mut tis = Tis::open(chip, 2).unwrap();
        let mut small = alloc::vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7e];
        small[1] = 0x01;
        assert_eq!(tis.transmit(&small).unwrap()[1], 2, "sent from locality 2");
    }

    /// A chip that answers whatever bytes it was given: short, lying or
    /// overlong responses, as a broken or hostile chip would.
    struct RawChip {
        response: Vec<u8>,
        received: Vec<u8>,
        at: usize,
        go: bool,
        grant: bool,
    }

    impl Mmio for RawChip {
        fn read32(&mut self, o: u64) -> u32 {
            u32::from(self.read8(o))
        }
        fn write32(&mut self, o: u64, v: u32) {
            self.write8(o, v as u8)
        }
        fn read8(&mut self, o: u64) -> u8 {
            match o & 0xfff {
                0x00 if self.grant => 0xa1,
                0x00 => 0x81,
                0x18 if self.go => 0x80 | if self.at < self.response.len() { 0x10 } else { 0 },
                0x18 => {
                    let declared = self
                        .received
                        .get(2..6)
                        .map_or(usize::MAX, |b| u32::from_be_bytes(b.try_into().unwrap()) as usize);
                    0xc0 | if self.received.len() < declared { 0x08 } else { 0 }
                }
                0x19 => 4,
                0x24 => {
                    self.at += 1;
                    self.response.get(self.at - 1).copied().unwrap_or(0xff)
                }
                _ => 0,
            }
        }
        fn write8(&mut self, o: u64, v: u8) {
            match (o & 0xfff, v) {
                (0x18, 0x20) => self.go = true,
                (0x18, 0x40) => {
                    self.go = false;
                    self.received.clear();
                }
                (0x24, b) => self.received.push(b),
                _ => {}
            }
        }
    }

    fn raw(response: &[u8]) -> RawChip {
        RawChip { response: response.to_vec(), received: Vec::new(), at: 0, go: false, grant: true }
    }

    const STARTUP: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0];

    #[test]
    fn a_short_lying_or_overlong_response_is_refused() {
        let mut tis = Tis::open(raw(&[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]), 0).unwrap();
        assert_eq!(tis.transmit(&STARTUP).unwrap(), [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]);
        let mut tis = Tis::open(raw(&[0x80, 0x01, 0, 0, 0, 4, 0, 0, 0, 0]), 0).unwrap();
        assert_eq!(tis.transmit(&STARTUP), Err(TransportError::Protocol("response size out of range")));
        let mut tis = Tis::open(raw(&[0x80, 0x01, 0, 0x10, 0, 0, 0, 0, 0, 0]), 0).unwrap();
        assert_eq!(tis.transmit(&STARTUP), Err(TransportError::Protocol("response size out of range")));
        let mut tis = Tis::open(raw(&[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0, 0xee, 0xee]), 0).unwrap();
        assert_eq!(tis.transmit(&STARTUP), Err(TransportError::Protocol("more response bytes than the response says")));
        assert_eq!(tis.transmit(&[0u8; 5]), Err(TransportError::TooLong));
    }

    #[test]
    fn a_chip_that_never_grants_the_locality_times_out() {
        let chip = RawChip { grant: false, ..raw(&[]) };
        assert_eq!(Tis::open(chip, 0).err(), Some(TransportError::Timeout("the locality")));
    }
}
