//! The platform TPM's side of the vTPM state key: sealing a 32-byte key to
//! the PCRs of CTVM's launch, and a monotonic counter for freshness. The
//! vTPM trust code (`vtpm_trust`, `tpm::persist`) calls these; the sealed
//! blob is stored with the guest's vTPM state, the counter stays in the chip.
//!
//! - TPM 2.0: a sealed data object under an ECC storage primary of the
//!   owner hierarchy (re-derived at each boot, nothing stored), released
//!   only by a `TPM2_PolicyPCR` policy over the SHA-256 bank; the counter
//!   is an NV index of type counter.
//! - TPM 1.2: `TPM_Seal` under the SRK with a PCR-bound `TPM_PCR_INFO`;
//!   the counter is a `TPM_CreateCounter` counter. The chip must be owned
//!   with the well-known SRK and owner secrets (what `swtpm_setup
//!   --take-ownership --srk-well-known --owner-well-known` and `tpm_takeownership -z` do).
//!
//! The blob: `"CTVMKEY1"`, the family (1 = 1.2, 2 = 2.0), the PCR count and
//! the PCRs (one byte each), then the chip's sealed structure(s).
//!
//! On a TPM 2.0 the key never crosses the bus in the clear: `TPM2_Create`
//! and `TPM2_Unseal` run in sessions salted by ECDH to the storage key,
//! with AES-128-CFB parameter encryption and checked response HMACs
//! (`vtpm_trust::tpm2_session`). Known limit: on a TPM 1.2 `TPM_Seal`'s data and
//! `TPM_Unseal`'s answer still cross in the clear.

use alloc::vec::Vec;

use super::launch::PlatformTpm;
use super::tpm12::Tpm12Error;
use super::tpm2::{alg, Sealed, SessionSecrets, Tpm2Error, SE_HMAC, SE_POLICY};
use super::Transport;
use sha2::Digest;

const MAGIC: &[u8; 8] = b"CTVMKEY1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealError {
    V2(Tpm2Error),
    V12(Tpm12Error),
    /// Not a blob this code wrote, or written for the other family.
    Blob,
    /// The chip released something other than a 32-byte key.
    Length,
}

impl core::fmt::Display for SealError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::V2(e) => write!(f, "{e}"),
            Self::V12(e) => write!(f, "{e}"),
            Self::Blob => write!(f, "not a sealed key for this TPM"),
            Self::Length => write!(f, "the unsealed key has the wrong length"),
        }
    }
}

/// Where the monotonic counter lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A TPM 2.0 NV index (owner range).
    Nv(u32),
    /// A TPM 1.2 counter id (from [`create_counter`]).
    V12(u32),
}

/// The NV index CTVM's counter takes on a TPM 2.0 (owner range).
pub const COUNTER_INDEX: u32 = 0x0100_c7f0;
/// The label of CTVM's counter on a TPM 1.2 (found again by it).
pub const COUNTER_LABEL: [u8; 4] = *b"CTVM";

/// Fresh randomness for nonces (a TPM 1.2 authorization needs some).
pub type Nonces<'a> = &'a mut dyn FnMut() -> [u8; 20];

/// Seals `key` to the current values of `pcrs` (SHA-256 bank on a 2.0).
pub fn seal_key<T: Transport>(
    tpm: &mut PlatformTpm<T>,
    key: &[u8; 32],
    pcrs: &[u32],
    nonces: Nonces<'_>,
) -> Result<Vec<u8>, SealError> {
    let mut blob = MAGIC.to_vec();
    match tpm {
        PlatformTpm::V2(t) => {
            let values = t.pcr_read(alg::SHA256, pcrs).map_err(SealError::V2)?;
            let policy = super::tpm2::policy_pcr_digest(pcrs, &values);
            let parent = t.storage_key().map_err(SealError::V2)?;
            let secrets = session_secrets(nonces);
            let sealed = t.salted_session(&parent, SE_HMAC, &secrets).and_then(|mut session| {
                let r = t.create_sealed(&parent, &mut session, &secrets.nonce_command, key, &policy);
                if r.is_err() {
                    let _ = t.flush(session.handle);
                }
                r
            });
            let _ = t.flush(parent.handle);
            let sealed = sealed.map_err(SealError::V2)?;
            blob.push(2);
            header(&mut blob, pcrs);
            for part in [&sealed.private, &sealed.public] {
                blob.extend_from_slice(&(part.len() as u16).to_be_bytes());
                blob.extend_from_slice(part);
            }
        }
        PlatformTpm::V12(t) => {
            let values: Vec<[u8; 20]> =
                pcrs.iter().map(|&p| t.pcr_read(p)).collect::<Result<_, _>>().map_err(SealError::V12)?;
            let stored = t.seal(key, pcrs, &values, nonces).map_err(SealError::V12)?;
            blob.push(1);
            header(&mut blob, pcrs);
            blob.extend_from_slice(&stored);
        }
    }
    Ok(blob)
}

fn header(blob: &mut Vec<u8>, pcrs: &[u32]) {
    blob.push(pcrs.len() as u8);
    blob.extend(pcrs.iter().map(|&p| p as u8));
}

/// Unseals what [`seal_key`] returned: only while the PCRs hold what they
/// held when it was sealed.
pub fn unseal_key<T: Transport>(
    tpm: &mut PlatformTpm<T>,
    blob: &[u8],
    nonces: Nonces<'_>,
) -> Result<[u8; 32], SealError> {
    let rest = blob.strip_prefix(MAGIC).ok_or(SealError::Blob)?;
    let (&family, rest) = rest.split_first().ok_or(SealError::Blob)?;
    let (&n, rest) = rest.split_first().ok_or(SealError::Blob)?;
    let pcrs: Vec<u32> = rest.get(..usize::from(n)).ok_or(SealError::Blob)?.iter().map(|&p| u32::from(p)).collect();
    let rest = &rest[usize::from(n)..];
    let key = match (tpm, family) {
        (PlatformTpm::V2(t), 2) => {
            let part = |b: &[u8]| -> Option<(Vec<u8>, usize)> {
                let len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
                Some((b.get(2..2 + len)?.to_vec(), 2 + len))
            };
            let (private, used) = part(rest).ok_or(SealError::Blob)?;
            let (public, used2) = part(&rest[used..]).ok_or(SealError::Blob)?;
            if used + used2 != rest.len() {
                return Err(SealError::Blob);
            }
            let parent = t.storage_key().map_err(SealError::V2)?;
            let (item, name) = match t.load(parent.handle, &Sealed { private, public }) {
                Ok(loaded) => loaded,
                Err(e) => {
                    let _ = t.flush(parent.handle);
                    return Err(SealError::V2(e));
                }
            };
            // The session's salt goes to the storage key, flushed once it started.
            let secrets = session_secrets(nonces);
            let session = t.salted_session(&parent, SE_POLICY, &secrets);
            let _ = t.flush(parent.handle);
            let result = session.and_then(|mut session| {
                let r = t
                    .policy_pcr(session.handle, &pcrs)
                    .and_then(|()| t.unseal(item, &name, &mut session, &secrets.nonce_command));
                if r.is_err() {
                    let _ = t.flush(session.handle);
                }
                r
            });
            let _ = t.flush(item);
            result.map_err(SealError::V2)?
        }
        (PlatformTpm::V12(t), 1) => t.unseal(rest, nonces).map_err(SealError::V12)?,
        _ => return Err(SealError::Blob),
    };
    let out = key.as_slice().try_into().map_err(|_| SealError::Length);
    let mut key = key;
    zeroize::Zeroize::zeroize(&mut key);
    out
}

/// An ECDH ephemeral scalar and the caller's nonces for one session, each
/// the SHA-256 of two fresh 20-byte nonces.
fn session_secrets(nonces: Nonces<'_>) -> SessionSecrets {
    let mut fresh = || -> [u8; 32] {
        let (mut a, mut b) = (nonces(), nonces());
        let mut h = sha2::Sha256::new();
        h.update(a);
        h.update(b);
        zeroize::Zeroize::zeroize(&mut a);
        zeroize::Zeroize::zeroize(&mut b);
        h.finalize().into()
    };
    SessionSecrets { ephemeral: fresh(), nonce_start: fresh(), nonce_command: fresh() }
}

/// CTVM's monotonic counter: found again, or created the first time (a
/// TPM 2.0 counter starts at the highest value any counter of the chip
/// ever had, so deleting and re-creating it cannot roll it back; a TPM 1.2
/// counter's value survives its release the same way).
pub fn create_counter<T: Transport>(tpm: &mut PlatformTpm<T>, nonces: Nonces<'_>) -> Result<Counter, SealError> {
    match tpm {
        PlatformTpm::V2(t) => {
            match t.nv_define_counter(COUNTER_INDEX) {
                Ok(()) | Err(Tpm2Error::Rc { rc: super::tpm2::nv::RC_NV_DEFINED, .. }) => {}
                Err(e) => return Err(SealError::V2(e)),
            }
            // A counter reads only once written.
            if let Err(Tpm2Error::Rc { rc: super::tpm2::nv::RC_NV_UNINITIALIZED, .. }) =
                t.nv_read_counter(COUNTER_INDEX)
            {
                t.nv_increment(COUNTER_INDEX).map_err(SealError::V2)?;
            }
            Ok(Counter::Nv(COUNTER_INDEX))
        }
        PlatformTpm::V12(t) => {
            if let Some(id) = t.find_counter(COUNTER_LABEL).map_err(SealError::V12)? {
                return Ok(Counter::V12(id));
            }
            Ok(Counter::V12(t.create_counter(COUNTER_LABEL, [nonces(), nonces()]).map_err(SealError::V12)?))
        }
    }
}

/// Advances the counter by one; returns its new value.
pub fn increment_counter<T: Transport>(
    tpm: &mut PlatformTpm<T>,
    counter: Counter,
    nonces: Nonces<'_>,
) -> Result<u64, SealError> {
    match (tpm, counter) {
        (PlatformTpm::V2(t), Counter::Nv(index)) => {
            t.nv_increment(index).map_err(SealError::V2)?;
            t.nv_read_counter(index).map_err(SealError::V2)
        }
        (PlatformTpm::V12(t), Counter::V12(id)) => t.increment_counter(id, nonces()).map_err(SealError::V12),
        _ => Err(SealError::Blob),
    }
}

pub fn read_counter<T: Transport>(tpm: &mut PlatformTpm<T>, counter: Counter) -> Result<u64, SealError> {
    match (tpm, counter) {
        (PlatformTpm::V2(t), Counter::Nv(index)) => t.nv_read_counter(index).map_err(SealError::V2),
        (PlatformTpm::V12(t), Counter::V12(id)) => t.read_counter(id).map_err(SealError::V12),
        _ => Err(SealError::Blob),
    }
}

/// CTVM's counter, created on first use: its value, after one step forward
/// when `advance`.
pub fn vtpm_counter<T: Transport>(
    tpm: &mut PlatformTpm<T>,
    advance: bool,
    nonces: Nonces<'_>,
) -> Result<u64, SealError> {
    let counter = create_counter(tpm, nonces)?;
    if advance {
        increment_counter(tpm, counter, nonces)
    } else {
        read_counter(tpm, counter)
    }
}
