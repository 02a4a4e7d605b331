//! The permanent state (what a chip keeps in NV) and the saved volatile
//! state (what TPM_SaveState keeps for Startup(ST_STATE)), and their blobs.
//!
//! Blob layout: `magic (8) ‖ version u32 ‖ body length u32 ‖ body ‖
//! SHA1(magic ‖ version ‖ length ‖ body)`. A blob is parsed completely into
//! fresh values before anything is replaced, so a bad blob is never half
//! loaded.

use crate::crypto::{self, DrbgSnapshot, RsaKey};
use crate::flags::{PermanentFlags, StclearFlags};
use crate::key::Key;
use crate::marshal::{Put, Reader};
use crate::nv::NvStore;
use crate::pcr::{PcrBank, NUM_PCRS};
use crate::secret::Secret;
use alloc::vec::Vec;

const PERMANENT_MAGIC: &[u8; 8] = b"CTVMTPMP";
const SAVED_MAGIC: &[u8; 8] = b"CTVMTPMS";
/// Version of both blob formats.
pub const STATE_VERSION: u32 = 1;
/// Version of a permanent blob that holds a deferred EK
/// ([`Endorsement::Deferred`]); other permanent blobs stay at
/// [`STATE_VERSION`], so that an engine without deferred EKs still reads
/// them and refuses the others by their version.
pub const PERMANENT_VERSION_DEFERRED_EK: u32 = 2;
/// Version of a saved state that carries the dictionary-attack state
/// (libtpms keeps it in TPM_STCLEAR_DATA, which SaveState preserves).
/// Version 1 saved states still load, with a zero count.
pub const SAVED_VERSION_DA: u32 = 2;

/// Why a state blob was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than its header and checksum, or than its length field says.
    Truncated,
    /// Not a blob of this kind (wrong magic).
    BadMagic,
    /// Written by an unknown format version.
    UnsupportedVersion(u32),
    /// The checksum does not match: the blob was corrupted.
    ChecksumMismatch,
    /// The checksum matched but the content does not parse or is
    /// inconsistent (e.g. a key that does not rebuild).
    Malformed,
    /// A saved state that belongs to another permanent state (another
    /// owner or another chip).
    WrongTpm,
}

impl core::fmt::Display for StateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StateError::Truncated => f.write_str("state blob truncated"),
            StateError::BadMagic => f.write_str("not a vTPM state blob"),
            StateError::UnsupportedVersion(v) => write!(f, "unsupported state version {v}"),
            StateError::ChecksumMismatch => f.write_str("state blob checksum mismatch"),
            StateError::Malformed => f.write_str("state blob content malformed"),
            StateError::WrongTpm => f.write_str("saved state belongs to another TPM state"),
        }
    }
}

fn seal_blob(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len().saturating_add(36));
    v.put(magic);
    v.put_u32(version);
    v.put_sized32(body);
    let sum = crypto::sha1(&v);
    v.put(&sum);
    v
}

/// Checks a blob's frame and checksum; returns its version (one of
/// `versions`) and body.
fn open_blob<'a>(magic: &[u8; 8], versions: &[u32], blob: &'a [u8]) -> Result<(u32, &'a [u8]), StateError> {
    let Some(split) = blob.len().checked_sub(20) else {
        return Err(StateError::Truncated);
    };
    let (content, sum) = blob.split_at(split);
    let mut r = Reader::new(content);
    let m = r.bytes(8).map_err(|_| StateError::Truncated)?;
    if m != magic {
        return Err(StateError::BadMagic);
    }
    let version = r.u32().map_err(|_| StateError::Truncated)?;
    let body = r.sized32().map_err(|_| StateError::Truncated)?;
    if r.remaining() != 0 {
        // Length field and blob length disagree.
        return Err(StateError::Truncated);
    }
    if !crypto::ct_eq(&crypto::sha1(content), sum) {
        return Err(StateError::ChecksumMismatch);
    }
    if !versions.contains(&version) {
        return Err(StateError::UnsupportedVersion(version));
    }
    Ok((version, body))
}

/// The owner's part of the permanent state.
#[derive(Clone, Debug)]
pub struct Owner {
    pub auth: Secret,
    pub tpm_proof: Secret,
    pub srk: Key,
}

/// The endorsement key, or what it will be generated from.
// One per chip: an allocation for the key would save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Endorsement {
    /// No EK: TPM_CreateEndorsementKeyPair may create one.
    Absent,
    /// The EK exists for every command's purpose but is not generated yet:
    /// the DRBG state its generation starts from. An RSA-2048 generation
    /// takes seconds (tens of seconds in an emulator) and most boots never
    /// use the EK, so the first command that needs it generates it; the
    /// key is the one generating at once from this state would have made.
    Deferred(DrbgSnapshot),
    /// The EK.
    Present(RsaKey),
}

impl Endorsement {
    /// True unless there is no EK at all (a deferred EK exists).
    pub fn exists(&self) -> bool {
        !matches!(self, Endorsement::Absent)
    }

    /// The key, once generated.
    pub fn key(&self) -> Option<&RsaKey> {
        match self {
            Endorsement::Present(k) => Some(k),
            _ => None,
        }
    }
}

/// Everything that survives a power cycle.
#[derive(Clone, Debug)]
pub struct Permanent {
    pub flags: PermanentFlags,
    pub ek: Endorsement,
    pub owner: Option<Owner>,
    pub nv: NvStore,
    pub no_owner_nv_write: u32,
}

impl Permanent {
    /// A chip as it leaves the factory, before the EK exists.
    pub fn factory() -> Self {
        Permanent {
            flags: PermanentFlags::factory(),
            ek: Endorsement::Absent,
            owner: None,
            nv: NvStore::default(),
            no_owner_nv_write: 0,
        }
    }

    /// The versioned, checksummed blob. A deferred EK stays deferred: its
    /// DRBG state is stored, nothing is generated.
    pub fn to_blob(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(2048);
        self.flags.write(&mut b);
        b.put_u32(self.no_owner_nv_write);
        let mut version = STATE_VERSION;
        match &self.ek {
            Endorsement::Present(ek) => {
                b.put_u8(1);
                b.put_sized32(&ek.modulus());
                b.put_sized32(&zeroize::Zeroizing::new(ek.prime()));
            }
            Endorsement::Deferred(s) => {
                version = PERMANENT_VERSION_DEFERRED_EK;
                b.put_u8(2);
                b.put(&s.seed);
                b.put(&s.word_pos.to_be_bytes());
            }
            Endorsement::Absent => b.put_u8(0),
        }
        match &self.owner {
            Some(o) => {
                b.put_u8(1);
                b.put(&o.auth.0);
                b.put(&o.tpm_proof.0);
                o.srk.write_internal(&mut b);
            }
            None => b.put_u8(0),
        }
        self.nv.write(&mut b);
        let blob = seal_blob(PERMANENT_MAGIC, version, &b);
        zeroize::Zeroize::zeroize(&mut b);
        blob
    }

    /// Parses a blob made by [`Permanent::to_blob`].
    pub fn from_blob(blob: &[u8]) -> Result<Self, StateError> {
        Self::from_blob_reusing(blob, &[])
    }

    /// [`Permanent::from_blob`], taking RSA keys from `known` where the blob
    /// holds exactly their modulus and prime (see
    /// [`RsaKey::from_n_p_reusing`]).
    pub fn from_blob_reusing(blob: &[u8], known: &[&RsaKey]) -> Result<Self, StateError> {
        let versions = [STATE_VERSION, PERMANENT_VERSION_DEFERRED_EK];
        let (version, body) = open_blob(PERMANENT_MAGIC, &versions, blob)?;
        Self::parse_body(version, body, known).ok_or(StateError::Malformed)
    }

    /// The RSA keys this state holds (EK, SRK).
    pub fn rsa_keys(&self) -> Vec<&RsaKey> {
        self.ek.key().into_iter().chain(self.owner.as_ref().map(|o| &o.srk.rsa)).collect()
    }

    fn parse_body(version: u32, body: &[u8], known: &[&RsaKey]) -> Option<Self> {
        let mut r = Reader::new(body);
        let flags = PermanentFlags::read(&mut r).ok()?;
        let no_owner_nv_write = r.u32().ok()?;
        let ek = match (r.u8().ok()?, version) {
            (0, STATE_VERSION) => Endorsement::Absent,
            (1, STATE_VERSION) => {
                let n = r.sized32().ok()?;
                let p = r.sized32().ok()?;
                Endorsement::Present(RsaKey::from_n_p_reusing(n, p, known)?)
            }
            (2, PERMANENT_VERSION_DEFERRED_EK) => Endorsement::Deferred(DrbgSnapshot {
                seed: r.array().ok()?,
                word_pos: u128::from_be_bytes(r.array().ok()?),
            }),
            _ => return None,
        };
        let owner = match r.u8().ok()? {
            0 => None,
            1 => Some(Owner {
                auth: Secret(r.digest().ok()?),
                tpm_proof: Secret(r.digest().ok()?),
                srk: Key::read_internal_reusing(&mut r, known).ok()?,
            }),
            _ => return None,
        };
        let nv = NvStore::read(&mut r).ok()?;
        r.finish().ok()?;
        Some(Permanent { flags, ek, owner, nv, no_owner_nv_write })
    }

    /// A digest naming this chip and owner, bound into saved states. A
    /// deferred EK is named by a digest of its DRBG state, so that saving
    /// the state does not generate it. Generating it changes the identity,
    /// but only a command does that, and any command other than SaveState
    /// and Startup (which never generate it) ends a saved state anyway.
    pub fn identity(&self) -> [u8; 20] {
        let ek = match &self.ek {
            Endorsement::Present(k) => k.modulus(),
            Endorsement::Deferred(s) => {
                crypto::sha1_parts(&[b"CTVM deferred EK", &s.seed, &s.word_pos.to_be_bytes()]).to_vec()
            }
            Endorsement::Absent => Vec::new(),
        };
        let proof = self.owner.as_ref().map(|o| o.tpm_proof.0).unwrap_or([0; 20]);
        crypto::sha1_parts(&[&ek, &proof])
    }
}

/// The volatile state TPM_SaveState preserves.
pub struct Saved {
    pub identity: [u8; 20],
    pub flags: StclearFlags,
    pub pcrs: PcrBank,
    /// Loaded keys with their handles.
    pub keys: Vec<(u32, Key)>,
    /// Per-index (readSTClear, writeSTClear) locks.
    pub nv_locks: Vec<(u32, bool, bool)>,
    /// The dictionary-attack count, lockout start and reset lock.
    pub da: crate::da::DaState,
}

impl Saved {
    pub fn to_blob(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(1024);
        b.put(&self.identity);
        self.flags.write(&mut b);
        for v in &self.pcrs.values {
            b.put(v);
        }
        b.put_u32(self.keys.len() as u32);
        for (h, k) in &self.keys {
            b.put_u32(*h);
            k.write_internal(&mut b);
        }
        b.put_u32(self.nv_locks.len() as u32);
        for (i, r, w) in &self.nv_locks {
            b.put_u32(*i);
            b.put_u8(u8::from(*r));
            b.put_u8(u8::from(*w));
        }
        self.da.write(&mut b);
        let blob = seal_blob(SAVED_MAGIC, SAVED_VERSION_DA, &b);
        zeroize::Zeroize::zeroize(&mut b);
        blob
    }

    pub fn from_blob(blob: &[u8]) -> Result<Self, StateError> {
        let (version, body) = open_blob(SAVED_MAGIC, &[STATE_VERSION, SAVED_VERSION_DA], blob)?;
        Self::parse_body(version, body).ok_or(StateError::Malformed)
    }

    fn parse_body(version: u32, body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        let identity = r.digest().ok()?;
        let flags = StclearFlags::read(&mut r).ok()?;
        let mut pcrs = PcrBank::cleared();
        for v in pcrs.values.iter_mut().take(NUM_PCRS) {
            *v = r.digest().ok()?;
        }
        let nkeys = r.u32().ok()?;
        if nkeys as usize > crate::keys::MAX_KEYS {
            return None;
        }
        let mut keys = Vec::new();
        for _ in 0..nkeys {
            let h = r.u32().ok()?;
            keys.push((h, Key::read_internal(&mut r).ok()?));
        }
        let nlocks = r.u32().ok()?;
        if nlocks as usize > crate::nv::MAX_INDICES {
            return None;
        }
        let mut nv_locks = Vec::new();
        for _ in 0..nlocks {
            nv_locks.push((r.u32().ok()?, r.bool().ok()?, r.bool().ok()?));
        }
        let da = if version == SAVED_VERSION_DA { crate::da::DaState::read(&mut r).ok()? } else { Default::default() };
        r.finish().ok()?;
        Some(Saved { identity, flags, pcrs, keys, nv_locks, da })
    }
}
