//! TPM 2.0 commands (TPM 2.0 Library, part 3), marshalled by hand: the few
//! CTVM sends, each with its response parsed and every size checked.

use alloc::vec::Vec;

use sha2::Digest;

use vtpm_trust::tpm2_session as session;

use super::{In, Out, Transport, TransportError};

/// Command codes.
pub mod cc {
    pub const NV_UNDEFINE_SPACE: u32 = 0x122;
    pub const NV_DEFINE_SPACE: u32 = 0x12a;
    pub const CREATE_PRIMARY: u32 = 0x131;
    pub const NV_INCREMENT: u32 = 0x134;
    pub const STARTUP: u32 = 0x144;
    pub const SHUTDOWN: u32 = 0x145;
    pub const NV_READ: u32 = 0x14e;
    pub const UNSEAL: u32 = 0x15e;
    pub const CREATE: u32 = 0x153;
    pub const LOAD: u32 = 0x157;
    pub const FLUSH_CONTEXT: u32 = 0x165;
    pub const NV_READ_PUBLIC: u32 = 0x169;
    pub const START_AUTH_SESSION: u32 = 0x176;
    pub const GET_CAPABILITY: u32 = 0x17a;
    pub const PCR_READ: u32 = 0x17e;
    pub const POLICY_PCR: u32 = 0x17f;
    pub const PCR_EXTEND: u32 = 0x182;
    pub const POLICY_GET_DIGEST: u32 = 0x189;
}

/// Algorithm ids (TCG algorithm registry).
pub mod alg {
    pub const SHA1: u16 = 0x0004;
    pub const SHA256: u16 = 0x000b;
    pub const SHA384: u16 = 0x000c;
    pub const SHA512: u16 = 0x000d;
}

const ST_NO_SESSIONS: u16 = 0x8001;
const ST_SESSIONS: u16 = 0x8002;
/// The password session: authorization with a plain (here empty) value.
pub const RS_PW: u32 = 0x4000_0009;
pub const RH_OWNER: u32 = 0x4000_0001;
pub const RH_NULL: u32 = 0x4000_0007;

pub const RC_SUCCESS: u32 = 0;
pub const RC_INITIALIZE: u32 = 0x100;
const RC_RETRY: u32 = 0x922;
const RC_TESTING: u32 = 0x90a;
const RC_YIELDED: u32 = 0x908;

/// Why a command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tpm2Error {
    Transport(TransportError),
    /// The chip answered `command` with this response code.
    Rc {
        command: u32,
        rc: u32,
    },
    /// A response that does not parse.
    Malformed {
        command: u32,
    },
    /// A response whose session HMAC is wrong or missing: forged or
    /// altered on its way (refused, whatever it says).
    ResponseHmac {
        command: u32,
    },
}

impl From<TransportError> for Tpm2Error {
    fn from(e: TransportError) -> Self {
        Tpm2Error::Transport(e)
    }
}

impl core::fmt::Display for Tpm2Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "{e}"),
            Self::Rc { command, rc } => write!(f, "command {command:#x} answered {rc:#x}"),
            Self::Malformed { command } => write!(f, "command {command:#x}: malformed response"),
            Self::ResponseHmac { command } => {
                write!(f, "command {command:#x}: the response's session HMAC does not verify (altered on the bus?)")
            }
        }
    }
}

/// The digest of `data` in bank `alg`, for the banks CTVM can compute.
pub fn digest(alg: u16, data: &[u8]) -> Option<Vec<u8>> {
    Some(match alg {
        alg::SHA1 => vtpm_core::sha1(data).to_vec(),
        alg::SHA256 => sha2::Sha256::digest(data).to_vec(),
        alg::SHA384 => sha2::Sha384::digest(data).to_vec(),
        alg::SHA512 => sha2::Sha512::digest(data).to_vec(),
        _ => return None,
    })
}

pub fn digest_size(alg: u16) -> Option<usize> {
    Some(match alg {
        alg::SHA1 => 20,
        alg::SHA256 => 32,
        alg::SHA384 => 48,
        alg::SHA512 => 64,
        _ => return None,
    })
}

pub fn alg_name(alg: u16) -> &'static str {
    match alg {
        alg::SHA1 => "sha1",
        alg::SHA256 => "sha256",
        alg::SHA384 => "sha384",
        alg::SHA512 => "sha512",
        _ => "unknown",
    }
}

/// A whole command: header, handles, an authorization area (one session
/// per entry) when there are sessions, then the parameters.
pub fn command(code: u32, handles: &[u32], sessions: &[Vec<u8>], params: &[u8]) -> Vec<u8> {
    let mut o = Out::default();
    o.u16(if sessions.is_empty() { ST_NO_SESSIONS } else { ST_SESSIONS }).u32(0).u32(code);
    for &h in handles {
        o.u32(h);
    }
    if !sessions.is_empty() {
        let area: Vec<u8> = sessions.concat();
        o.u32(area.len() as u32).bytes(&area);
    }
    o.bytes(params);
    let size = o.0.len() as u32;
    o.0[2..6].copy_from_slice(&size.to_be_bytes());
    o.0
}

/// The password session with an empty password (TPMS_AUTH_COMMAND).
pub fn password_session(password: &[u8]) -> Vec<u8> {
    let mut o = Out::default();
    o.u32(RS_PW).sized(&[]).u8(0).sized(password);
    o.0
}

/// A response split up: its handles, its parameters and the authorization
/// area after them (empty without sessions).
pub struct Response {
    pub handles: Vec<u32>,
    pub params: Vec<u8>,
    pub auth: Vec<u8>,
}

/// Parses a response with `handles` handles; `Err` with its code when the
/// chip refused the command.
pub fn parse_response(code: u32, bytes: &[u8], handles: usize) -> Result<Response, Tpm2Error> {
    let bad = Tpm2Error::Malformed { command: code };
    let mut r = In::new(bytes);
    let tag = r.u16().ok_or(bad)?;
    let size = r.u32().ok_or(bad)? as usize;
    let rc = r.u32().ok_or(bad)?;
    if size != bytes.len() {
        return Err(bad);
    }
    if rc != RC_SUCCESS {
        return Err(Tpm2Error::Rc { command: code, rc });
    }
    let mut hs = Vec::with_capacity(handles);
    for _ in 0..handles {
        hs.push(r.u32().ok_or(bad)?);
    }
    let (params, auth) = match tag {
        ST_SESSIONS => {
            let n = r.u32().ok_or(bad)? as usize;
            (r.take(n).ok_or(bad)?.to_vec(), r.rest().to_vec())
        }
        ST_NO_SESSIONS => (r.rest().to_vec(), Vec::new()),
        _ => return Err(bad),
    };
    Ok(Response { handles: hs, params, auth })
}

/// A PCR selection: which PCRs of one bank.
pub fn selection(alg: u16, pcrs: &[u32]) -> Vec<u8> {
    let mut select = [0u8; 3];
    for &p in pcrs.iter().filter(|&&p| p < 24) {
        select[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut o = Out::default();
    o.u16(alg).u8(3).bytes(&select);
    o.0
}

/// The chip, spoken to in TPM 2.0 commands.
pub struct Tpm2<T: Transport> {
    pub transport: T,
}

impl<T: Transport> Tpm2<T> {
    pub fn new(transport: T) -> Self {
        Tpm2 { transport }
    }

    /// Sends a command, retrying while the chip says it is busy.
    pub fn run(&mut self, code: u32, command: &[u8], handles: usize) -> Result<Response, Tpm2Error> {
        for _ in 0..100 {
            let bytes = self.transport.transmit(command)?;
            match parse_response(code, &bytes, handles) {
                Err(Tpm2Error::Rc { rc: RC_RETRY | RC_TESTING | RC_YIELDED, .. }) => continue,
                other => return other,
            }
        }
        Err(Tpm2Error::Rc { command: code, rc: RC_RETRY })
    }

    /// TPM2_Startup(CLEAR); a chip firmware already started is fine.
    pub fn startup(&mut self) -> Result<bool, Tpm2Error> {
        let c = command(cc::STARTUP, &[], &[], &0u16.to_be_bytes());
        match self.run(cc::STARTUP, &c, 0) {
            Ok(_) => Ok(true),
            Err(Tpm2Error::Rc { rc: RC_INITIALIZE, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// TPM2_Shutdown(CLEAR): an orderly power-off (no dictionary-attack
    /// penalty at the next boot).
    pub fn shutdown(&mut self) -> Result<(), Tpm2Error> {
        let c = command(cc::SHUTDOWN, &[], &[], &0u16.to_be_bytes());
        self.run(cc::SHUTDOWN, &c, 0).map(|_| ())
    }

    /// The allocated PCR banks: the algorithms with at least one PCR selected.
    pub fn pcr_banks(&mut self) -> Result<Vec<u16>, Tpm2Error> {
        let mut p = Out::default();
        p.u32(5).u32(0).u32(16); // TPM_CAP_PCRS
        let c = command(cc::GET_CAPABILITY, &[], &[], &p.0);
        let r = self.run(cc::GET_CAPABILITY, &c, 0)?;
        parse_pcr_banks(&r.params).ok_or(Tpm2Error::Malformed { command: cc::GET_CAPABILITY })
    }

    /// Extends `pcr` with one digest per bank: (algorithm, digest).
    pub fn pcr_extend(&mut self, pcr: u32, digests: &[(u16, Vec<u8>)]) -> Result<(), Tpm2Error> {
        let mut p = Out::default();
        p.u32(digests.len() as u32);
        for (a, d) in digests {
            p.u16(*a).bytes(d);
        }
        let c = command(cc::PCR_EXTEND, &[pcr], &[password_session(&[])], &p.0);
        self.run(cc::PCR_EXTEND, &c, 0).map(|_| ())
    }

    /// Reads PCRs of one bank (at most 8 per command, the chip's limit).
    pub fn pcr_read(&mut self, alg: u16, pcrs: &[u32]) -> Result<Vec<Vec<u8>>, Tpm2Error> {
        let mut p = Out::default();
        p.u32(1).bytes(&selection(alg, pcrs));
        let c = command(cc::PCR_READ, &[], &[], &p.0);
        let r = self.run(cc::PCR_READ, &c, 0)?;
        let bad = Tpm2Error::Malformed { command: cc::PCR_READ };
        let mut i = In::new(&r.params);
        let _update_counter = i.u32().ok_or(bad)?;
        for _ in 0..i.u32().ok_or(bad)? {
            i.u16().ok_or(bad)?;
            let n = i.u8().ok_or(bad)?;
            i.take(usize::from(n)).ok_or(bad)?;
        }
        let count = i.u32().ok_or(bad)?;
        let digests: Vec<Vec<u8>> =
            (0..count).map(|_| i.sized().map(<[u8]>::to_vec).ok_or(bad)).collect::<Result<_, _>>()?;
        if digests.len() != pcrs.len() {
            return Err(bad);
        }
        Ok(digests)
    }
}

/// The objects and sessions sealing needs (TPM 2.0 part 2).
mod object {
    pub const ALG_KEYEDHASH: u16 = 0x0008;
    pub const ALG_AES: u16 = 0x0006;
    pub const ALG_NULL: u16 = 0x0010;
    pub const ALG_CFB: u16 = 0x0043;
    pub const ALG_ECC: u16 = 0x0023;
    pub const ECC_NIST_P256: u16 = 0x0003;
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const NO_DA: u32 = 1 << 10;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SE_HMAC: u8 = 0x00;
    pub const SE_POLICY: u8 = 0x01;
    pub const ALG_SHA256: u16 = super::alg::SHA256;
}

pub use object::{SE_HMAC, SE_POLICY};

/// Session attributes (part 2, TPMA_SESSION).
pub mod attr {
    /// The first command parameter is encrypted.
    pub const DECRYPT: u8 = 0x20;
    /// The first response parameter comes back encrypted.
    pub const ENCRYPT: u8 = 0x40;
}

/// NV index attributes (part 2, 13.4).
pub mod nv {
    pub const AUTHWRITE: u32 = 1 << 2;
    /// TPM_NT_COUNTER in bits 7:4.
    pub const COUNTER: u32 = 1 << 4;
    pub const AUTHREAD: u32 = 1 << 18;
    pub const NO_DA: u32 = 1 << 25;
    pub const RC_NV_UNINITIALIZED: u32 = 0x14a;
    pub const RC_NV_DEFINED: u32 = 0x14c;
}

/// The storage key sealed objects live under: an ECC P-256 primary of the
/// owner hierarchy with an empty authorization. The same template gives the
/// same key at every boot (primary keys derive from the hierarchy's seed),
/// so nothing needs storing; ECC because it is generated in milliseconds.
pub fn storage_key_template() -> Vec<u8> {
    use object::*;
    let mut o = Out::default();
    o.u16(ALG_ECC)
        .u16(alg::SHA256)
        .u32(FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | NO_DA | RESTRICTED | DECRYPT)
        .sized(&[])
        .u16(ALG_AES)
        .u16(128)
        .u16(ALG_CFB)
        .u16(ALG_NULL)
        .u16(ECC_NIST_P256)
        .u16(ALG_NULL)
        .sized(&[])
        .sized(&[]);
    o.0
}

/// A sealed data object: no user authorization at all (only its policy
/// can release it), bound to this chip and parent.
pub fn sealed_object_template(policy: &[u8]) -> Vec<u8> {
    use object::*;
    let mut o = Out::default();
    o.u16(ALG_KEYEDHASH).u16(alg::SHA256).u32(FIXED_TPM | FIXED_PARENT | NO_DA).sized(policy).u16(ALG_NULL).sized(&[]);
    o.0
}

/// The policy digest of `TPM2_PolicyPCR` over `pcrs` of the SHA-256 bank
/// holding `values` (in selection order), from an empty policy.
pub fn policy_pcr_digest(pcrs: &[u32], values: &[Vec<u8>]) -> Vec<u8> {
    let pcr_digest = digest(alg::SHA256, &values.concat()).unwrap_or_default();
    let mut data = alloc::vec![0u8; 32];
    data.extend_from_slice(&cc::POLICY_PCR.to_be_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&selection(alg::SHA256, pcrs));
    data.extend_from_slice(&pcr_digest);
    digest(alg::SHA256, &data).unwrap_or_default()
}

/// A sealed object as the chip returned it: its private and public parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub private: Vec<u8>,
    pub public: Vec<u8>,
}

/// The storage key as the chip created it: its handle, its public P-256
/// point (the salt of a session is sent to it) and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageKey {
    pub handle: u32,
    pub x: Vec<u8>,
    pub y: Vec<u8>,
    pub name: Vec<u8>,
}

/// A salted session as CTVM keeps it: the chip's handle and latest nonce,
/// and the session key (zeroed on drop).
pub struct Session {
    pub handle: u32,
    pub nonce_tpm: Vec<u8>,
    key: Vec<u8>,
}

impl Drop for Session {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// Fresh secrets for one session: the ECDH ephemeral scalar and the
/// caller's nonces (one at the start, one for the command).
pub struct SessionSecrets {
    pub ephemeral: [u8; 32],
    pub nonce_start: [u8; 32],
    pub nonce_command: [u8; 32],
}

impl Drop for SessionSecrets {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.ephemeral);
    }
}

/// The (x, y) of the ECC point in a TPM2B_PUBLIC's body (TPMT_PUBLIC).
fn ecc_point(public: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut i = In::new(public);
    if i.u16()? != object::ALG_ECC {
        return None;
    }
    let _name_alg = i.u16()?;
    let _attributes = i.u32()?;
    i.sized()?;
    if i.u16()? != object::ALG_NULL {
        i.u16()?;
        i.u16()?;
    }
    if i.u16()? != object::ALG_NULL {
        i.u16()?;
    }
    if i.u16()? != object::ECC_NIST_P256 {
        return None;
    }
    if i.u16()? != object::ALG_NULL {
        i.u16()?;
    }
    let x = i.sized()?.to_vec();
    let y = i.sized()?.to_vec();
    Some((x, y))
}

impl<T: Transport> Tpm2<T> {
    /// Creates (re-derives) the storage key.
    pub fn storage_key(&mut self) -> Result<StorageKey, Tpm2Error> {
        let bad = Tpm2Error::Malformed { command: cc::CREATE_PRIMARY };
        let mut p = Out::default();
        // inSensitive: no auth, no data; the template; no outside info or creation PCRs.
        p.u16(4).sized(&[]).sized(&[]).sized(&storage_key_template()).sized(&[]).u32(0);
        let c = command(cc::CREATE_PRIMARY, &[RH_OWNER], &[password_session(&[])], &p.0);
        let r = self.run(cc::CREATE_PRIMARY, &c, 1)?;
        let handle = r.handles[0];
        let parsed = (|| {
            let mut i = In::new(&r.params);
            let (x, y) = ecc_point(i.sized()?)?;
            i.sized()?; // creationData
            i.sized()?; // creationHash
            i.u16()?; // creationTicket
            i.u32()?;
            i.sized()?;
            let name = i.sized()?.to_vec();
            Some(StorageKey { handle, x, y, name })
        })();
        match parsed {
            Some(k) => Ok(k),
            None => {
                let _ = self.flush(handle);
                Err(bad)
            }
        }
    }

    /// TPM2_StartAuthSession, salted by ECDH to `tpm_key`, unbound, with
    /// AES-128-CFB for parameter encryption and SHA-256 for its HMACs.
    pub fn salted_session(
        &mut self,
        tpm_key: &StorageKey,
        kind: u8,
        secrets: &SessionSecrets,
    ) -> Result<Session, Tpm2Error> {
        let bad = Tpm2Error::Malformed { command: cc::START_AUTH_SESSION };
        let (mut salt, point) = session::ecdh_salt(&tpm_key.x, &tpm_key.y, &secrets.ephemeral).ok_or(bad)?;
        let mut p = Out::default();
        p.sized(&secrets.nonce_start)
            .sized(&point)
            .u8(kind)
            .u16(object::ALG_AES)
            .u16(128)
            .u16(object::ALG_CFB)
            .u16(object::ALG_SHA256);
        let c = command(cc::START_AUTH_SESSION, &[tpm_key.handle, RH_NULL], &[], &p.0);
        let r = self.run(cc::START_AUTH_SESSION, &c, 1);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                zeroize::Zeroize::zeroize(&mut salt);
                return Err(e);
            }
        };
        let nonce_tpm = In::new(&r.params).sized().map(<[u8]>::to_vec);
        let key = session::session_key(&salt, nonce_tpm.as_deref().unwrap_or(&[]), &secrets.nonce_start);
        zeroize::Zeroize::zeroize(&mut salt);
        let session = Session { handle: r.handles[0], nonce_tpm: nonce_tpm.unwrap_or_default(), key };
        if session.nonce_tpm.len() < 16 {
            let _ = self.flush(session.handle);
            return Err(bad);
        }
        Ok(session)
    }

    /// Runs `code` with one salted session (not continued): the first
    /// parameter encrypted when `attributes` has DECRYPT, the response's
    /// HMAC checked (a response without one is refused), its first
    /// parameter decrypted when `attributes` has ENCRYPT. Each handle comes
    /// with its name, for cpHash. (CTVM's session commands return no handle.)
    fn run_in_session(
        &mut self,
        code: u32,
        handles: &[(u32, &[u8])],
        session: &mut Session,
        nonce_caller: &[u8],
        attributes: u8,
        mut params: Vec<u8>,
    ) -> Result<Response, Tpm2Error> {
        let bad = Tpm2Error::Malformed { command: code };
        if attributes & attr::DECRYPT != 0 {
            let n = usize::from(u16::from_be_bytes([*params.first().ok_or(bad)?, *params.get(1).ok_or(bad)?]));
            let body = params.get_mut(2..2 + n).ok_or(bad)?;
            session::cfb(&session.key, nonce_caller, &session.nonce_tpm, body, true);
        }
        let names: Vec<&[u8]> = handles.iter().map(|&(_, name)| name).collect();
        let handles: Vec<u32> = handles.iter().map(|&(h, _)| h).collect();
        let cp = session::cp_hash(code, &names, &params);
        let hmac = session::session_hmac(&session.key, &cp, nonce_caller, &session.nonce_tpm, attributes);
        let mut auth = Out::default();
        auth.u32(session.handle).sized(nonce_caller).u8(attributes).sized(&hmac);
        let c = command(code, &handles, &[auth.0], &params);
        let mut r = self.run(code, &c, 0)?;
        let mut i = In::new(&r.auth);
        let nonce_tpm = i.sized().ok_or(bad)?.to_vec();
        let their_attributes = i.u8().ok_or(bad)?;
        let their_hmac = i.sized().ok_or(bad)?;
        if !i.rest().is_empty() || nonce_tpm.len() < 16 {
            return Err(bad);
        }
        let rp = session::rp_hash(code, &r.params);
        let want = session::session_hmac(&session.key, &rp, &nonce_tpm, nonce_caller, their_attributes);
        if !session::hmac_matches(&want, their_hmac) {
            return Err(Tpm2Error::ResponseHmac { command: code });
        }
        session.nonce_tpm = nonce_tpm;
        if attributes & attr::ENCRYPT != 0 {
            let n = usize::from(u16::from_be_bytes([*r.params.first().ok_or(bad)?, *r.params.get(1).ok_or(bad)?]));
            let body = r.params.get_mut(2..2 + n).ok_or(bad)?;
            session::cfb(&session.key, &session.nonce_tpm, nonce_caller, body, false);
        }
        Ok(r)
    }

    pub fn flush(&mut self, handle: u32) -> Result<(), Tpm2Error> {
        let c = command(cc::FLUSH_CONTEXT, &[], &[], &handle.to_be_bytes());
        self.run(cc::FLUSH_CONTEXT, &c, 0).map(|_| ())
    }

    /// Seals `data` under `parent`, releasable only under `policy`; the
    /// data crosses the bus encrypted (`inSensitive` under `session`).
    pub fn create_sealed(
        &mut self,
        parent: &StorageKey,
        session: &mut Session,
        nonce_caller: &[u8],
        data: &[u8],
        policy: &[u8],
    ) -> Result<Sealed, Tpm2Error> {
        let bad = Tpm2Error::Malformed { command: cc::CREATE };
        let mut sensitive = Out::default();
        sensitive.sized(&[]).sized(data);
        let mut p = Out::default();
        p.sized(&sensitive.0).sized(&sealed_object_template(policy)).sized(&[]).u32(0);
        zeroize::Zeroize::zeroize(&mut sensitive.0);
        let r = self.run_in_session(
            cc::CREATE,
            &[(parent.handle, &parent.name)],
            session,
            nonce_caller,
            attr::DECRYPT,
            p.0,
        )?;
        let mut i = In::new(&r.params);
        let private = i.sized().ok_or(bad)?.to_vec();
        let public = i.sized().ok_or(bad)?.to_vec();
        Ok(Sealed { private, public })
    }

    /// Loads a sealed object under `parent`; returns its transient handle
    /// and its name.
    pub fn load(&mut self, parent: u32, sealed: &Sealed) -> Result<(u32, Vec<u8>), Tpm2Error> {
        let mut p = Out::default();
        p.sized(&sealed.private).sized(&sealed.public);
        let c = command(cc::LOAD, &[parent], &[password_session(&[])], &p.0);
        let r = self.run(cc::LOAD, &c, 1)?;
        match In::new(&r.params).sized() {
            Some(name) => Ok((r.handles[0], name.to_vec())),
            None => {
                let _ = self.flush(r.handles[0]);
                Err(Tpm2Error::Malformed { command: cc::LOAD })
            }
        }
    }

    /// TPM2_PolicyPCR: the session's policy now requires these PCRs of
    /// the SHA-256 bank to hold what they hold now.
    pub fn policy_pcr(&mut self, session: u32, pcrs: &[u32]) -> Result<(), Tpm2Error> {
        let mut p = Out::default();
        p.sized(&[]).u32(1).bytes(&selection(alg::SHA256, pcrs));
        let c = command(cc::POLICY_PCR, &[session], &[], &p.0);
        self.run(cc::POLICY_PCR, &c, 0).map(|_| ())
    }

    /// TPM2_Unseal with the salted policy session (which ends with the
    /// command): the data comes back encrypted, under a checked HMAC.
    pub fn unseal(
        &mut self,
        item: u32,
        item_name: &[u8],
        session: &mut Session,
        nonce_caller: &[u8],
    ) -> Result<Vec<u8>, Tpm2Error> {
        let r =
            self.run_in_session(cc::UNSEAL, &[(item, item_name)], session, nonce_caller, attr::ENCRYPT, Vec::new())?;
        In::new(&r.params).sized().map(<[u8]>::to_vec).ok_or(Tpm2Error::Malformed { command: cc::UNSEAL })
    }

    /// Defines an 8-byte monotonic counter at `index`: written and read
    /// with an empty authorization, outside dictionary-attack lockout.
    pub fn nv_define_counter(&mut self, index: u32) -> Result<(), Tpm2Error> {
        let mut public = Out::default();
        public
            .u32(index)
            .u16(alg::SHA256)
            .u32(nv::COUNTER | nv::AUTHWRITE | nv::AUTHREAD | nv::NO_DA)
            .sized(&[])
            .u16(8);
        let mut p = Out::default();
        p.sized(&[]).sized(&public.0);
        let c = command(cc::NV_DEFINE_SPACE, &[RH_OWNER], &[password_session(&[])], &p.0);
        self.run(cc::NV_DEFINE_SPACE, &c, 0).map(|_| ())
    }

    pub fn nv_increment(&mut self, index: u32) -> Result<(), Tpm2Error> {
        let c = command(cc::NV_INCREMENT, &[index, index], &[password_session(&[])], &[]);
        self.run(cc::NV_INCREMENT, &c, 0).map(|_| ())
    }

    /// The counter's value.
    pub fn nv_read_counter(&mut self, index: u32) -> Result<u64, Tpm2Error> {
        let mut p = Out::default();
        p.u16(8).u16(0);
        let c = command(cc::NV_READ, &[index, index], &[password_session(&[])], &p.0);
        let r = self.run(cc::NV_READ, &c, 0)?;
        let data = In::new(&r.params).sized().ok_or(Tpm2Error::Malformed { command: cc::NV_READ })?;
        let bytes: [u8; 8] = data.try_into().map_err(|_| Tpm2Error::Malformed { command: cc::NV_READ })?;
        Ok(u64::from_be_bytes(bytes))
    }
}

/// The algorithms of a TPMS_CAPABILITY_DATA for TPM_CAP_PCRS that select
/// at least one PCR.
fn parse_pcr_banks(params: &[u8]) -> Option<Vec<u16>> {
    let mut i = In::new(params);
    let _more = i.u8()?;
    if i.u32()? != 5 {
        return None;
    }
    let count = i.u32()?;
    let mut banks = Vec::new();
    for _ in 0..count.min(16) {
        let a = i.u16()?;
        let n = i.u8()?;
        if i.take(usize::from(n))?.iter().any(|&b| b != 0) {
            banks.push(a);
        }
    }
    Some(banks)
}

/// A TPM 2.0 for host tests: PCR banks (SHA-1, SHA-256 allocated), start-up
/// state, and the commands the measured launch sends.
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::devices::tis::TpmBackend;
    use alloc::collections::BTreeMap;

    pub struct FakeTpm2 {
        pub started: bool,
        pub banks: Vec<u16>,
        pub pcrs: BTreeMap<(u16, u32), Vec<u8>>,
        pub commands: Vec<u32>,
    }

    impl Default for FakeTpm2 {
        fn default() -> Self {
            FakeTpm2 {
                started: false,
                banks: alloc::vec![alg::SHA1, alg::SHA256],
                pcrs: BTreeMap::new(),
                commands: Vec::new(),
            }
        }
    }

    pub fn reply(rc: u32, params: &[u8]) -> Vec<u8> {
        let mut o = Out::default();
        o.u16(ST_NO_SESSIONS).u32(10 + params.len() as u32).u32(rc).bytes(params);
        o.0
    }

    impl FakeTpm2 {
        pub fn pcr(&self, alg: u16, index: u32) -> Vec<u8> {
            self.pcrs.get(&(alg, index)).cloned().unwrap_or_else(|| alloc::vec![0; digest_size(alg).unwrap()])
        }
    }

    impl TpmBackend for FakeTpm2 {
        fn execute(&mut self, _: u8, c: &[u8]) -> Vec<u8> {
            let mut i = In::new(c);
            let (tag, _, code) = (i.u16().unwrap(), i.u32().unwrap(), i.u32().unwrap());
            self.commands.push(code);
            if code != cc::STARTUP && !self.started {
                return reply(RC_INITIALIZE, &[]);
            }
            match code {
                cc::STARTUP if self.started => reply(RC_INITIALIZE, &[]),
                cc::STARTUP => {
                    self.started = true;
                    reply(0, &[])
                }
                cc::SHUTDOWN => reply(0, &[]),
                cc::GET_CAPABILITY => {
                    let mut p = Out::default();
                    p.u8(0).u32(5).u32(self.banks.len() as u32);
                    for &b in &self.banks {
                        p.u16(b).u8(3).bytes(&[0xff, 0xff, 0xff]);
                    }
                    reply(0, &p.0)
                }
                cc::PCR_EXTEND => {
                    assert_eq!(tag, ST_SESSIONS);
                    let pcr = i.u32().unwrap();
                    let area = i.u32().unwrap() as usize;
                    i.take(area).unwrap();
                    let n = i.u32().unwrap();
                    for _ in 0..n {
                        let a = i.u16().unwrap();
                        let d = i.take(digest_size(a).unwrap()).unwrap();
                        if self.banks.contains(&a) {
                            let mut both = self.pcr(a, pcr);
                            both.extend_from_slice(d);
                            self.pcrs.insert((a, pcr), digest(a, &both).unwrap());
                        }
                    }
                    let mut r = Out::default();
                    r.u16(ST_SESSIONS).u32(0).u32(0).u32(0).bytes(&[0, 0, 0, 0, 0]);
                    let n = r.0.len() as u32;
                    r.0[2..6].copy_from_slice(&n.to_be_bytes());
                    r.0
                }
                cc::PCR_READ => {
                    let _count = i.u32().unwrap();
                    let a = i.u16().unwrap();
                    let _n = i.u8().unwrap();
                    let sel = i.take(3).unwrap().to_vec();
                    let pcrs: Vec<u32> = (0..24).filter(|p| sel[*p as usize / 8] & (1 << (p % 8)) != 0).collect();
                    let mut p = Out::default();
                    p.u32(7).u32(1).u16(a).u8(3).bytes(&sel).u32(pcrs.len() as u32);
                    for &x in &pcrs {
                        p.sized(&self.pcr(a, x));
                    }
                    reply(0, &p.0)
                }
                _ => reply(0x143, &[]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeTpm2;
    use super::*;
    use crate::platform::tpm::tis::{fake::Chip, Tis};
    use alloc::boxed::Box;

    #[test]
    fn commands_marshal_as_part_3_says() {
        // TPM2_Startup(CLEAR), byte for byte.
        assert_eq!(command(cc::STARTUP, &[], &[], &[0, 0]), [0x80, 0x01, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0]);
        // TPM2_PCR_Extend(12) with the empty password session and one SHA-256 digest.
        let c = command(cc::PCR_EXTEND, &[12], &[password_session(&[])], &{
            let mut p = Out::default();
            p.u32(1).u16(alg::SHA256).bytes(&[0xaa; 32]);
            p.0
        });
        let mut want = alloc::vec![0x80, 0x02, 0, 0, 0, 0, 0, 0, 1, 0x82, 0, 0, 0, 12, 0, 0, 0, 9];
        want.extend_from_slice(&[0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0x0b]);
        want.extend_from_slice(&[0xaa; 32]);
        let n = want.len() as u8;
        want[5] = n;
        assert_eq!(c, want);
        assert_eq!(selection(alg::SHA1, &[0, 12, 13, 23]), [0, 4, 3, 1, 0x30, 0x80]);
    }

    #[test]
    fn responses_are_checked() {
        assert_eq!(parse_response(1, &fake::reply(0x101, &[]), 0).err(), Some(Tpm2Error::Rc { command: 1, rc: 0x101 }));
        let mut lying = fake::reply(0, &[1, 2]);
        lying[5] = 99;
        assert_eq!(parse_response(1, &lying, 0).err(), Some(Tpm2Error::Malformed { command: 1 }));
        assert_eq!(parse_response(1, &fake::reply(0, &[]), 1).err(), Some(Tpm2Error::Malformed { command: 1 }));
        // A sessions response whose parameterSize runs past the end.
        let mut r = Out::default();
        r.u16(ST_SESSIONS).u32(14).u32(0).u32(50);
        assert!(parse_response(1, &r.0, 0).is_err());
        // Banks: only those with PCRs selected count.
        let mut p = Out::default();
        p.u8(0)
            .u32(5)
            .u32(3)
            .u16(alg::SHA1)
            .u8(3)
            .bytes(&[0, 0, 0])
            .u16(alg::SHA256)
            .u8(3)
            .bytes(&[0xff; 3])
            .u16(alg::SHA384)
            .u8(3)
            .bytes(&[1, 0, 0]);
        assert_eq!(parse_pcr_banks(&p.0), Some(alloc::vec![alg::SHA256, alg::SHA384]));
        assert_eq!(parse_pcr_banks(&p.0[..20]), None);
    }

    #[test]
    fn extend_and_read_back_through_the_tis() {
        let chip = Chip::new(Box::new(FakeTpm2::default()));
        let mut tpm = Tpm2::new(Tis::open(chip, 0).unwrap());
        assert!(tpm.startup().unwrap());
        assert!(!tpm.startup().unwrap(), "a second start-up is no error");
        assert_eq!(tpm.pcr_banks().unwrap(), [alg::SHA1, alg::SHA256]);
        let d1 = digest(alg::SHA1, b"x").unwrap();
        let d256 = digest(alg::SHA256, b"x").unwrap();
        tpm.pcr_extend(12, &[(alg::SHA1, d1.clone()), (alg::SHA256, d256.clone())]).unwrap();
        let mut want = alloc::vec![0u8; 32];
        want.extend_from_slice(&d256);
        assert_eq!(
            tpm.pcr_read(alg::SHA256, &[12, 13]).unwrap(),
            [digest(alg::SHA256, &want).unwrap(), alloc::vec![0; 32]]
        );
        tpm.shutdown().unwrap();
    }
}
