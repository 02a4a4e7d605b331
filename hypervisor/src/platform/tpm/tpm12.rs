//! TPM 1.2 commands (TPM Main, part 3) for the platform chip.

use alloc::vec::Vec;

use super::{In, Out, Transport, TransportError};

pub mod ord {
    pub const OIAP: u32 = 0x0a;
    pub const OSAP: u32 = 0x0b;
    pub const EXTEND: u32 = 0x14;
    pub const PCR_READ: u32 = 0x15;
    pub const SEAL: u32 = 0x17;
    pub const UNSEAL: u32 = 0x18;
    pub const STARTUP: u32 = 0x99;
    pub const CREATE_COUNTER: u32 = 0xdc;
    pub const INCREMENT_COUNTER: u32 = 0xdd;
    pub const READ_COUNTER: u32 = 0xde;
    pub const RELEASE_COUNTER: u32 = 0xdf;
}

const TAG_RQU_COMMAND: u16 = 0x00c1;
pub const TAG_RQU_AUTH1: u16 = 0x00c2;
pub const TAG_RQU_AUTH2: u16 = 0x00c3;
pub const INVALID_POSTINIT: u32 = 0x26;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tpm12Error {
    Transport(TransportError),
    Rc { ordinal: u32, rc: u32 },
    Malformed { ordinal: u32 },
}

impl From<TransportError> for Tpm12Error {
    fn from(e: TransportError) -> Self {
        Tpm12Error::Transport(e)
    }
}

impl core::fmt::Display for Tpm12Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "{e}"),
            Self::Rc { ordinal, rc } => write!(f, "ordinal {ordinal:#x} answered {rc:#x}"),
            Self::Malformed { ordinal } => write!(f, "ordinal {ordinal:#x}: malformed response"),
        }
    }
}

/// A whole command: tag, size, ordinal, body.
pub fn command(tag: u16, ordinal: u32, body: &[u8]) -> Vec<u8> {
    let mut o = Out::default();
    o.u16(tag).u32(10 + body.len() as u32).u32(ordinal).bytes(body);
    o.0
}

/// The chip, spoken to in TPM 1.2 commands.
pub struct Tpm12<T: Transport> {
    pub transport: T,
}

impl<T: Transport> Tpm12<T> {
    pub fn new(transport: T) -> Self {
        Tpm12 { transport }
    }

    /// Sends a command; returns the response body after the return code.
    pub fn run(&mut self, ordinal: u32, command: &[u8]) -> Result<Vec<u8>, Tpm12Error> {
        let r = self.transport.transmit(command)?;
        let bad = Tpm12Error::Malformed { ordinal };
        let mut i = In::new(&r);
        let _tag = i.u16().ok_or(bad)?;
        if i.u32().ok_or(bad)? as usize != r.len() {
            return Err(bad);
        }
        let rc = i.u32().ok_or(bad)?;
        if rc != 0 {
            return Err(Tpm12Error::Rc { ordinal, rc });
        }
        Ok(i.rest().to_vec())
    }

    /// TPM_Startup(ST_CLEAR); a chip firmware already started is fine.
    pub fn startup(&mut self) -> Result<bool, Tpm12Error> {
        match self.run(ord::STARTUP, &command(TAG_RQU_COMMAND, ord::STARTUP, &1u16.to_be_bytes())) {
            Ok(_) => Ok(true),
            Err(Tpm12Error::Rc { rc: INVALID_POSTINIT, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// TPM_Extend: returns the new value of the PCR.
    pub fn extend(&mut self, pcr: u32, digest: &[u8; 20]) -> Result<[u8; 20], Tpm12Error> {
        let mut b = Out::default();
        b.u32(pcr).bytes(digest);
        let r = self.run(ord::EXTEND, &command(TAG_RQU_COMMAND, ord::EXTEND, &b.0))?;
        r.get(..20).and_then(|d| d.try_into().ok()).ok_or(Tpm12Error::Malformed { ordinal: ord::EXTEND })
    }

    pub fn pcr_read(&mut self, pcr: u32) -> Result<[u8; 20], Tpm12Error> {
        let r = self.run(ord::PCR_READ, &command(TAG_RQU_COMMAND, ord::PCR_READ, &pcr.to_be_bytes()))?;
        r.get(..20).and_then(|d| d.try_into().ok()).ok_or(Tpm12Error::Malformed { ordinal: ord::PCR_READ })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::tpm::tis::{fake::Chip, Tis};
    use crate::tpm::engine;

    struct Entropy(u8);
    impl vtpm_core::Platform for Entropy {
        fn fill_random(&mut self, out: &mut [u8]) {
            for b in out {
                self.0 = self.0.wrapping_mul(31).wrapping_add(7);
                *b = self.0;
            }
        }
        fn ticks_us(&mut self) -> u64 {
            0
        }
    }

    /// The platform driver against the project's own TPM 1.2 engine behind
    /// the vTIS model: start-up, extend, read.
    #[test]
    fn extend_and_read_against_vtpm_core() {
        let backend = engine::backend(engine::guest_tpm("platform", None, || Entropy(1)));
        let mut tpm = Tpm12::new(Tis::open(Chip::new(backend), 0).unwrap());
        assert!(tpm.startup().unwrap());
        assert!(!tpm.startup().unwrap());
        let d = vtpm_core::sha1(b"ctvm");
        let new = tpm.extend(12, &d).unwrap();
        let mut both = [0u8; 40];
        both[20..].copy_from_slice(&d);
        assert_eq!(new, vtpm_core::sha1(&both));
        assert_eq!(tpm.pcr_read(12).unwrap(), new);
        assert!(matches!(tpm.pcr_read(99), Err(Tpm12Error::Rc { .. })));
    }
}
