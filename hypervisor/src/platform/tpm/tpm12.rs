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
    /// The owner's and the SRK's secrets: [`WELL_KNOWN`] unless the chip
    /// was provisioned otherwise (swtpm_setup's "well-known" is the SHA-1
    /// of the 20 zero bytes, for one).
    pub owner_auth: [u8; 20],
    pub srk_auth: [u8; 20],
}

impl<T: Transport> Tpm12<T> {
    pub fn new(transport: T) -> Self {
        Tpm12 { transport, owner_auth: WELL_KNOWN, srk_auth: WELL_KNOWN }
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

/// The well-known secret (20 zero bytes): SRK and owner authorization on
/// a chip owned with `tpm_takeownership -z`, and the authorization CTVM
/// gives its own sealed data and counter (the PCRs, not a secret, guard
/// the sealed key; only CTVM reaches the chip).
pub const WELL_KNOWN: [u8; 20] = [0; 20];
pub const SRK: u32 = 0x4000_0000;
const OWNER: u32 = 0x4000_0001;
const ET_SRK: u16 = 0x0004;
const ET_OWNER: u16 = 0x0002;

/// An authorization session: its handle, the chip's last nonce, and for
/// OSAP the shared secret.
struct Session {
    handle: u32,
    nonce_even: [u8; 20],
    secret: [u8; 20],
}

fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    vtpm_core::crypto::sha1_parts(parts)
}

/// One authorization block (TPM_AUTH section of a command).
fn auth_block(s: &Session, param_digest: &[u8; 20], nonce_odd: &[u8; 20]) -> Vec<u8> {
    let mac = vtpm_core::crypto::hmac_sha1(&s.secret, &[param_digest, &s.nonce_even, nonce_odd, &[0]]);
    let mut o = Out::default();
    o.u32(s.handle).bytes(nonce_odd).u8(0).bytes(&mac);
    o.0
}

/// A PCR selection of PCRs below 24.
fn pcr_selection(pcrs: &[u32]) -> [u8; 5] {
    let mut s = [0, 3, 0, 0, 0];
    for &p in pcrs.iter().filter(|&&p| p < 24) {
        s[2 + (p / 8) as usize] |= 1 << (p % 8);
    }
    s
}

/// The composite hash of `values` for `pcrs` (TPM_PCR_COMPOSITE).
pub fn composite_digest(pcrs: &[u32], values: &[[u8; 20]]) -> [u8; 20] {
    let flat: Vec<u8> = values.concat();
    sha1(&[&pcr_selection(pcrs), &(flat.len() as u32).to_be_bytes(), &flat])
}

/// TPM_STORED_DATA's length, from its own size fields.
fn stored_data_len(bytes: &[u8]) -> Option<usize> {
    let mut i = In::new(bytes);
    i.take(4)?;
    let info = i.u32()? as usize;
    i.take(info)?;
    let enc = i.u32()? as usize;
    i.take(enc)?;
    Some(12 + info + enc)
}

impl<T: Transport> Tpm12<T> {
    fn oiap(&mut self, secret: [u8; 20]) -> Result<Session, Tpm12Error> {
        let r = self.run(ord::OIAP, &command(TAG_RQU_COMMAND, ord::OIAP, &[]))?;
        let bad = Tpm12Error::Malformed { ordinal: ord::OIAP };
        let mut i = In::new(&r);
        let handle = i.u32().ok_or(bad)?;
        let nonce_even = i.take(20).ok_or(bad)?.try_into().map_err(|_| bad)?;
        Ok(Session { handle, nonce_even, secret })
    }

    fn osap(
        &mut self,
        entity_type: u16,
        entity: u32,
        usage: &[u8; 20],
        nonce_odd_osap: &[u8; 20],
    ) -> Result<Session, Tpm12Error> {
        let mut b = Out::default();
        b.u16(entity_type).u32(entity).bytes(nonce_odd_osap);
        let r = self.run(ord::OSAP, &command(TAG_RQU_COMMAND, ord::OSAP, &b.0))?;
        let bad = Tpm12Error::Malformed { ordinal: ord::OSAP };
        let mut i = In::new(&r);
        let handle = i.u32().ok_or(bad)?;
        let nonce_even: [u8; 20] = i.take(20).ok_or(bad)?.try_into().map_err(|_| bad)?;
        let nonce_even_osap: [u8; 20] = i.take(20).ok_or(bad)?.try_into().map_err(|_| bad)?;
        let secret = vtpm_core::crypto::hmac_sha1(usage, &[&nonce_even_osap, nonce_odd_osap]);
        Ok(Session { handle, nonce_even, secret })
    }

    /// Seals `data` under the SRK to `pcrs` holding `values`. `nonces`
    /// are three fresh random values (OSAP's, the command's, unused).
    pub fn seal(
        &mut self,
        data: &[u8],
        pcrs: &[u32],
        values: &[[u8; 20]],
        nonces: [[u8; 20]; 2],
    ) -> Result<Vec<u8>, Tpm12Error> {
        let srk_auth = self.srk_auth;
        let s = self.osap(ET_SRK, SRK, &srk_auth, &nonces[0])?;
        let key = sha1(&[&s.secret, &s.nonce_even]);
        let enc_auth: Vec<u8> = key.iter().zip(WELL_KNOWN).map(|(a, b)| a ^ b).collect();
        let release = composite_digest(pcrs, values);
        let mut info = Out::default();
        info.bytes(&pcr_selection(pcrs)).bytes(&release).bytes(&release);
        let mut params = Out::default();
        params.bytes(&enc_auth).u32(info.0.len() as u32).bytes(&info.0).u32(data.len() as u32).bytes(data);
        let digest = sha1(&[&ord::SEAL.to_be_bytes(), &params.0]);
        let mut body = Out::default();
        body.u32(SRK).bytes(&params.0).bytes(&auth_block(&s, &digest, &nonces[1]));
        let r = self.run(ord::SEAL, &command(TAG_RQU_AUTH1, ord::SEAL, &body.0))?;
        let len = stored_data_len(&r).ok_or(Tpm12Error::Malformed { ordinal: ord::SEAL })?;
        Ok(r[..len].to_vec())
    }

    /// Unseals what [`Tpm12::seal`] returned (the chip checks the PCRs).
    pub fn unseal(&mut self, stored: &[u8], nonces: [[u8; 20]; 2]) -> Result<Vec<u8>, Tpm12Error> {
        let bad = Tpm12Error::Malformed { ordinal: ord::UNSEAL };
        if stored_data_len(stored) != Some(stored.len()) {
            return Err(bad);
        }
        let srk = self.oiap(self.srk_auth)?;
        let data = self.oiap(WELL_KNOWN)?;
        let digest = sha1(&[&ord::UNSEAL.to_be_bytes(), stored]);
        let mut body = Out::default();
        body.u32(SRK)
            .bytes(stored)
            .bytes(&auth_block(&srk, &digest, &nonces[0]))
            .bytes(&auth_block(&data, &digest, &nonces[1]));
        let r = self.run(ord::UNSEAL, &command(TAG_RQU_AUTH2, ord::UNSEAL, &body.0))?;
        let mut i = In::new(&r);
        let n = i.u32().ok_or(bad)? as usize;
        Ok(i.take(n).ok_or(bad)?.to_vec())
    }

    /// Creates a monotonic counter labelled `label` (owner authorization,
    /// well-known); returns its id.
    pub fn create_counter(&mut self, label: [u8; 4], nonces: [[u8; 20]; 2]) -> Result<u32, Tpm12Error> {
        let owner_auth = self.owner_auth;
        let s = self.osap(ET_OWNER, OWNER, &owner_auth, &nonces[0])?;
        let key = sha1(&[&s.secret, &s.nonce_even]);
        let enc_auth: Vec<u8> = key.iter().zip(WELL_KNOWN).map(|(a, b)| a ^ b).collect();
        let digest = sha1(&[&ord::CREATE_COUNTER.to_be_bytes(), &enc_auth, &label]);
        let mut body = Out::default();
        body.bytes(&enc_auth).bytes(&label).bytes(&auth_block(&s, &digest, &nonces[1]));
        let r = self.run(ord::CREATE_COUNTER, &command(TAG_RQU_AUTH1, ord::CREATE_COUNTER, &body.0))?;
        In::new(&r).u32().ok_or(Tpm12Error::Malformed { ordinal: ord::CREATE_COUNTER })
    }

    /// Increments counter `id`; returns its new value.
    pub fn increment_counter(&mut self, id: u32, nonce: [u8; 20]) -> Result<u64, Tpm12Error> {
        let s = self.oiap(WELL_KNOWN)?;
        let digest = sha1(&[&ord::INCREMENT_COUNTER.to_be_bytes(), &id.to_be_bytes()]);
        let mut body = Out::default();
        body.u32(id).bytes(&auth_block(&s, &digest, &nonce));
        let r = self.run(ord::INCREMENT_COUNTER, &command(TAG_RQU_AUTH1, ord::INCREMENT_COUNTER, &body.0))?;
        counter_value(&r).ok_or(Tpm12Error::Malformed { ordinal: ord::INCREMENT_COUNTER })
    }

    /// The id of the counter labelled `label`, if the chip has one
    /// (TPM_GetCapability of the counter handles, then their labels).
    pub fn find_counter(&mut self, label: [u8; 4]) -> Result<Option<u32>, Tpm12Error> {
        const GET_CAPABILITY: u32 = 0x65;
        const CAP_HANDLE: u32 = 0x14;
        const RT_COUNTER: u32 = 0x06;
        let mut b = Out::default();
        b.u32(CAP_HANDLE).u32(4).u32(RT_COUNTER);
        let r = self.run(GET_CAPABILITY, &command(TAG_RQU_COMMAND, GET_CAPABILITY, &b.0))?;
        let bad = Tpm12Error::Malformed { ordinal: GET_CAPABILITY };
        let mut i = In::new(&r);
        let size = i.u32().ok_or(bad)? as usize;
        let mut list = In::new(i.take(size).ok_or(bad)?);
        for _ in 0..list.u16().ok_or(bad)? {
            let id = list.u32().ok_or(bad)?;
            let v = self.run(ord::READ_COUNTER, &command(TAG_RQU_COMMAND, ord::READ_COUNTER, &id.to_be_bytes()))?;
            if v.get(2..6) == Some(&label[..]) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    pub fn read_counter(&mut self, id: u32) -> Result<u64, Tpm12Error> {
        let r = self.run(ord::READ_COUNTER, &command(TAG_RQU_COMMAND, ord::READ_COUNTER, &id.to_be_bytes()))?;
        counter_value(&r).ok_or(Tpm12Error::Malformed { ordinal: ord::READ_COUNTER })
    }
}

/// The value of a TPM_COUNTER_VALUE (tag, 4-byte label, u32 count).
fn counter_value(r: &[u8]) -> Option<u64> {
    let mut i = In::new(r);
    i.take(6)?;
    i.u32().map(u64::from)
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
