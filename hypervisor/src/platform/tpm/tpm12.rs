//! TPM 1.2 commands (TPM Main, part 3) for the platform chip.

use alloc::vec::Vec;
use zeroize::Zeroize;

use super::seal::Nonces;
use super::{In, Out, Transport, TransportError};

pub mod ord {
    pub const OIAP: u32 = 0x0a;
    pub const OSAP: u32 = 0x0b;
    pub const EXTEND: u32 = 0x14;
    pub const PCR_READ: u32 = 0x15;
    pub const SEAL: u32 = 0x17;
    pub const UNSEAL: u32 = 0x18;
    pub const OWNER_READ_INTERNAL_PUB: u32 = 0x81;
    pub const FLUSH_SPECIFIC: u32 = 0xba;
    pub const ESTABLISH_TRANSPORT: u32 = 0xe6;
    pub const EXECUTE_TRANSPORT: u32 = 0xe7;
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
    Rc {
        ordinal: u32,
        rc: u32,
    },
    Malformed {
        ordinal: u32,
    },
    /// The SRK is not a key a transport secret can be encrypted to (2048-bit
    /// RSA, OAEP, exponent 65537).
    Srk,
    /// The answer to a command wrapped in the encrypted transport session
    /// lacks the session's HMAC: changed on the bus, or not from the chip
    /// that holds the session's secret.
    TransportHmac {
        ordinal: u32,
    },
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
            Self::Srk => write!(f, "the SRK is not a 2048-bit RSA storage key with exponent 65537"),
            Self::TransportHmac { ordinal } => {
                write!(f, "ordinal {ordinal:#x}: the transport session's answer HMAC does not verify")
            }
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
        response_body(ordinal, &r)
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

/// The body of a whole response after its return code, which must be 0.
fn response_body(ordinal: u32, r: &[u8]) -> Result<Vec<u8>, Tpm12Error> {
    let bad = Tpm12Error::Malformed { ordinal };
    let mut i = In::new(r);
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

    /// Seals `data` under the SRK to `pcrs` holding `values`, inside an
    /// encrypted transport session.
    pub fn seal(
        &mut self,
        data: &[u8],
        pcrs: &[u32],
        values: &[[u8; 20]],
        nonces: Nonces<'_>,
    ) -> Result<Vec<u8>, Tpm12Error> {
        let srk_auth = self.srk_auth;
        let s = self.osap(ET_SRK, SRK, &srk_auth, &nonces())?;
        let key = sha1(&[&s.secret, &s.nonce_even]);
        let enc_auth: Vec<u8> = key.iter().zip(WELL_KNOWN).map(|(a, b)| a ^ b).collect();
        let release = composite_digest(pcrs, values);
        let mut info = Out::default();
        info.bytes(&pcr_selection(pcrs)).bytes(&release).bytes(&release);
        let mut params = Out::default();
        params.bytes(&enc_auth).u32(info.0.len() as u32).bytes(&info.0).u32(data.len() as u32).bytes(data);
        let digest = sha1(&[&ord::SEAL.to_be_bytes(), &params.0]);
        let mut body = Out::default();
        body.u32(SRK).bytes(&params.0).bytes(&auth_block(&s, &digest, &nonces()));
        params.0.zeroize();
        let mut inner = command(TAG_RQU_AUTH1, ord::SEAL, &body.0);
        body.0.zeroize();
        let r = self.encrypted(&inner, 1, 1, nonces);
        inner.zeroize();
        let r = r?;
        let len = stored_data_len(&r).ok_or(Tpm12Error::Malformed { ordinal: ord::SEAL })?;
        Ok(r[..len].to_vec())
    }

    /// Unseals what [`Tpm12::seal`] returned (the chip checks the PCRs),
    /// inside an encrypted transport session.
    pub fn unseal(&mut self, stored: &[u8], nonces: Nonces<'_>) -> Result<Vec<u8>, Tpm12Error> {
        let bad = Tpm12Error::Malformed { ordinal: ord::UNSEAL };
        if stored_data_len(stored) != Some(stored.len()) {
            return Err(bad);
        }
        let srk = self.oiap(self.srk_auth)?;
        let data = self.oiap(WELL_KNOWN)?;
        let digest = sha1(&[&ord::UNSEAL.to_be_bytes(), stored]);
        let mut body = Out::default();
        body.u32(SRK).bytes(stored).bytes(&auth_block(&srk, &digest, &nonces())).bytes(&auth_block(
            &data,
            &digest,
            &nonces(),
        ));
        let mut r = self.encrypted(&command(TAG_RQU_AUTH2, ord::UNSEAL, &body.0), 1, 2, nonces)?;
        let mut i = In::new(&r);
        let out = i.u32().and_then(|n| i.take(n as usize)).map(<[u8]>::to_vec).ok_or(bad);
        r.zeroize();
        out
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

/// An encrypted transport session (TPM Main part 1 §13, part 3 §24). The
/// wrapped command's parameters, and its answer's, cross the bus XORed
/// with MGF1 of the rolling nonces, a direction and a secret that only CTVM
/// and the chip know: CTVM sends it under the SRK's public key. Every
/// answer carries an HMAC under that secret. A listener on a discrete
/// chip's LPC bus therefore reads neither the sealed key going in nor the
/// unsealed key coming back.
struct Wrap {
    handle: u32,
    nonce_even: [u8; 20],
    secret: [u8; 20],
}

impl Drop for Wrap {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

const TAG_TRANSPORT_AUTH: u16 = 0x001d;
const TAG_TRANSPORT_PUBLIC: u16 = 0x001e;
const TRANSPORT_ENCRYPT: u32 = 0x0000_0001;
const ALG_MGF1: u32 = 0x0000_0007;
const ES_NONE: u16 = 0x0001;
const RT_AUTH: u32 = 0x0000_0002;
const RT_TRANS: u32 = 0x0000_0004;
/// An authorization block's length in a command and in an answer.
const AUTH_IN: usize = 45;
const AUTH_OUT: usize = 41;

/// XORs the session's stream for direction `dir` ("in" or "out") into
/// `data`: MGF1-SHA1 of even nonce ‖ odd nonce ‖ dir ‖ secret.
fn transport_xor(data: &mut [u8], even: &[u8; 20], odd: &[u8; 20], dir: &[u8], secret: &[u8; 20]) {
    let mut seed = [even.as_slice(), odd, dir, secret].concat();
    vtpm_core::crypto::mgf1_xor(data, &seed);
    seed.zeroize();
}

/// The modulus of a TPM_PUBKEY that is a 2048-bit RSA OAEP key with
/// exponent 65537, the only kind the OAEP code encrypts to.
fn rsa2048_modulus(r: &[u8]) -> Option<Vec<u8>> {
    const ALG_RSA: u32 = 1;
    const ES_OAEP: u16 = 3;
    let mut i = In::new(r);
    let (alg, enc, _sig) = (i.u32()?, i.u16()?, i.u16()?);
    let parms = i.u32()? as usize;
    let mut p = In::new(i.take(parms)?);
    let (bits, primes) = (p.u32()?, p.u32()?);
    let exponent = p.u32().and_then(|n| p.take(n as usize))?;
    let modulus = i.u32().and_then(|n| i.take(n as usize))?;
    let e65537 = exponent.is_empty() || exponent.iter().skip_while(|&&b| b == 0).eq(&[1, 0, 1]);
    let ok = alg == ALG_RSA && enc == ES_OAEP && bits == 2048 && primes == 2 && e65537 && modulus.len() == 256;
    ok.then(|| modulus.to_vec())
}

impl<T: Transport> Tpm12<T> {
    /// Runs `inner`, a whole command with `handles` input handles, `auths`
    /// authorization blocks and no output handles, inside a fresh encrypted
    /// transport session. Returns the body of its answer (after the return
    /// code), once the session's HMAC over it verified.
    fn encrypted(
        &mut self,
        inner: &[u8],
        handles: usize,
        auths: usize,
        nonces: Nonces<'_>,
    ) -> Result<Vec<u8>, Tpm12Error> {
        let ordinal = inner.get(6..10).map_or(0, |o| u32::from_be_bytes([o[0], o[1], o[2], o[3]]));
        let answer = self
            .establish_transport(nonces)
            .and_then(|wrap| self.execute_transport(wrap, inner, handles, auths, nonces()));
        let mut answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // The inner command's sessions (a 1.2 may have as few as
                // three): the chip ends them only once it ran the command.
                for at in (1..=auths).filter_map(|k| inner.len().checked_sub(AUTH_IN * k)) {
                    if let Some(h) = inner.get(at..at + 4) {
                        self.flush(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), RT_AUTH);
                    }
                }
                return Err(e);
            }
        };
        let body = response_body(ordinal, &answer);
        answer.zeroize();
        body
    }

    /// TPM_FlushSpecific of a session a failure may have left open; an
    /// error (the chip had ended it already) changes nothing.
    fn flush(&mut self, handle: u32, resource: u32) {
        let mut b = Out::default();
        b.u32(handle).u32(resource);
        let _ = self.run(ord::FLUSH_SPECIFIC, &command(TAG_RQU_COMMAND, ord::FLUSH_SPECIFIC, &b.0));
    }

    /// The SRK's modulus, through TPM_OwnerReadInternalPub: a chip owned
    /// the usual way does not give the SRK's public half without the
    /// owner's authorization.
    fn srk_modulus(&mut self, nonce_odd: [u8; 20]) -> Result<Vec<u8>, Tpm12Error> {
        const ORD: u32 = ord::OWNER_READ_INTERNAL_PUB;
        let s = self.oiap(self.owner_auth)?;
        let digest = sha1(&[&ORD.to_be_bytes(), &SRK.to_be_bytes()]);
        let mut body = Out::default();
        body.u32(SRK).bytes(&auth_block(&s, &digest, &nonce_odd));
        let r = self.run(ORD, &command(TAG_RQU_AUTH1, ORD, &body.0))?;
        rsa2048_modulus(&r).ok_or(Tpm12Error::Srk)
    }

    /// TPM_EstablishTransport with a fresh secret, encrypted to the SRK.
    fn establish_transport(&mut self, nonces: Nonces<'_>) -> Result<Wrap, Tpm12Error> {
        const ORD: u32 = ord::ESTABLISH_TRANSPORT;
        let bad = Tpm12Error::Malformed { ordinal: ORD };
        let modulus = self.srk_modulus(nonces())?;
        let secret = nonces();
        let mut seed = [0u8; 32];
        let (a, b) = (nonces(), nonces());
        seed[..20].copy_from_slice(&a);
        seed[20..].copy_from_slice(&b[..12]);
        let mut drbg = vtpm_core::crypto::Drbg::new(seed);
        let mut auth = Out::default();
        auth.u16(TAG_TRANSPORT_AUTH).bytes(&secret);
        let sealed_secret = vtpm_core::crypto::oaep_encrypt(&mut drbg, &modulus, &auth.0);
        auth.0.zeroize();
        let sealed_secret = sealed_secret.ok_or(Tpm12Error::Srk)?;
        let s = self.oiap(self.srk_auth)?;
        let mut params = Out::default();
        params.u16(TAG_TRANSPORT_PUBLIC).u32(TRANSPORT_ENCRYPT).u32(ALG_MGF1).u16(ES_NONE);
        params.u32(sealed_secret.len() as u32).bytes(&sealed_secret);
        let digest = sha1(&[&ORD.to_be_bytes(), &params.0]);
        let mut body = Out::default();
        body.u32(SRK).bytes(&params.0).bytes(&auth_block(&s, &digest, &nonces()));
        let r = self.run(ORD, &command(TAG_RQU_AUTH1, ORD, &body.0))?;
        // transHandle, locality, TPM_CURRENT_TICKS, transNonceEven.
        let mut i = In::new(&r);
        let handle = i.u32().ok_or(bad)?;
        i.take(4 + 32).ok_or(bad)?;
        let nonce_even = i.take(20).and_then(|n| n.try_into().ok()).ok_or(bad)?;
        Ok(Wrap { handle, nonce_even, secret })
    }

    /// TPM_ExecuteTransport of `inner` as the session's last command.
    fn execute_transport(
        &mut self,
        wrap: Wrap,
        inner: &[u8],
        handles: usize,
        auths: usize,
        nonce_odd: [u8; 20],
    ) -> Result<Vec<u8>, Tpm12Error> {
        const ORD: u32 = ord::EXECUTE_TRANSPORT;
        let bad = Tpm12Error::Malformed { ordinal: ORD };
        let ordw = inner.get(6..10).ok_or(bad)?;
        // The parameters: after the handles, before the authorizations.
        let start = 10 + 4 * handles;
        let end = inner.len().checked_sub(AUTH_IN * auths).filter(|&e| e >= start).ok_or(bad)?;
        let h1 = sha1(&[ordw, &inner[start..end]]);
        let mut wrapped = inner.to_vec();
        transport_xor(&mut wrapped[start..end], &wrap.nonce_even, &nonce_odd, b"in", &wrap.secret);
        let size = (wrapped.len() as u32).to_be_bytes();
        let in_digest = sha1(&[&ORD.to_be_bytes(), &size, &h1]);
        let mac = vtpm_core::crypto::hmac_sha1(&wrap.secret, &[&in_digest, &wrap.nonce_even, &nonce_odd, &[0]]);
        let mut body = Out::default();
        body.bytes(&size).bytes(&wrapped).u32(wrap.handle).bytes(&nonce_odd).u8(0).bytes(&mac);
        let r = match self.run(ORD, &command(TAG_RQU_AUTH1, ORD, &body.0)) {
            Ok(r) => r,
            Err(e) => {
                // The chip may keep a session whose command it refused.
                self.flush(wrap.handle, RT_TRANS);
                return Err(e);
            }
        };
        // currentTicks, locality, wrappedRsp, transNonceEven, continue, transAuth.
        let mut i = In::new(&r);
        let ticks = i.take(8).ok_or(bad)?;
        let locality = i.take(4).ok_or(bad)?;
        let mut answer = i.u32().and_then(|n| i.take(n as usize)).ok_or(bad)?.to_vec();
        let even: [u8; 20] = i.take(20).and_then(|n| n.try_into().ok()).ok_or(bad)?;
        let cont = i.take(1).ok_or(bad)?;
        let auth = i.take(20).ok_or(bad)?;
        if !i.rest().is_empty() || answer.get(2..6) != Some(&(answer.len() as u32).to_be_bytes()[..]) {
            return Err(bad);
        }
        let rcw = answer.get(6..10).ok_or(bad)?.to_vec();
        // An answer's parameters: after the header (no output handles
        // here), before its authorizations; none when it failed.
        let end = match (rcw == [0; 4], answer.get(..2)) {
            (false, _) => 10,
            (true, Some([0, 0xc4])) => answer.len(),
            (true, Some([0, 0xc5])) => answer.len().checked_sub(AUTH_OUT).ok_or(bad)?,
            (true, Some([0, 0xc6])) => answer.len().checked_sub(2 * AUTH_OUT).ok_or(bad)?,
            _ => return Err(bad),
        };
        let params = answer.get_mut(10..end).ok_or(bad)?;
        transport_xor(params, &even, &nonce_odd, b"out", &wrap.secret);
        let h2 = sha1(&[&rcw, ordw, params]);
        let rsp_size = (answer.len() as u32).to_be_bytes();
        let out_digest = sha1(&[&[0; 4], &ORD.to_be_bytes(), ticks, locality, &rsp_size, &h2]);
        let expected = vtpm_core::crypto::hmac_sha1(&wrap.secret, &[&out_digest, &even, &nonce_odd, cont]);
        if !vtpm_core::crypto::ct_eq(&expected, auth) {
            answer.zeroize();
            return Err(Tpm12Error::TransportHmac {
                ordinal: u32::from_be_bytes([ordw[0], ordw[1], ordw[2], ordw[3]]),
            });
        }
        Ok(answer)
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
