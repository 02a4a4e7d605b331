//! The sealed state blob: a vTPM's saved state as the guest stores it.
//!
//! The guest's disk is the only persistent storage a vTPM has, and the
//! guest is not trusted with it: the blob is encrypted and authenticated
//! (AES-256-GCM) under a key derived from the platform secret, which the
//! guest never sees. The blob names the guest it belongs to and carries a
//! version number; the hypervisor keeps the newest version it committed in
//! a counter of its own (see [`crate::durability`]) and refuses older ones,
//! so a guest cannot roll its TPM back.
//!
//! ```text
//! offset  size  field (all integers big-endian)
//!      0     8  magic "CTVMVTPM"
//!      8     2  format version (1)
//!     10     2  algorithm (1 = AES-256-GCM, key from HKDF-SHA256)
//!     12    16  key id: HKDF(platform secret, "key id"), names the key
//!     28     8  state version (monotonic, compared with the counter)
//!     36     2  guest name length n (1..=255)
//!     38     n  guest name (UTF-8)
//!   38+n    12  nonce (random, from the caller)
//!   50+n     4  ciphertext length m (tag included)
//!   54+n     m  ciphertext ‖ 16-byte tag
//! ```
//!
//! Everything before the ciphertext is the associated data, so any change
//! to it fails authentication. The fields before the ciphertext are also
//! checked on their own first, in order, only to give a precise reason
//! (not a gain in security): framing ([`BlobError::Truncated`],
//! [`BlobError::BadMagic`], [`BlobError::UnsupportedFormat`]), then the key
//! id ([`BlobError::ForeignKey`]: sealed on another host or under another
//! secret), the guest ([`BlobError::WrongGuest`]), then the tag
//! ([`BlobError::Forged`]), and last the version ([`BlobError::Stale`]),
//! which is only trusted once authenticated.
//!
//! The plaintext is a [`StatePayload`]: the permanent state and, after a
//! TPM_SaveState, the saved state, as vtpm-core produces them.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use alloc::string::String;
use alloc::vec::Vec;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The blob's magic.
pub const MAGIC: &[u8; 8] = b"CTVMVTPM";
/// The only format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// AES-256-GCM under an HKDF-SHA256 key.
pub const ALG_AES256GCM_HKDF_SHA256: u16 = 1;
/// Bytes of the random nonce.
pub const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_ID_LEN: usize = 16;
/// Longest guest name (the hypervisor's names are short ASCII words).
pub const MAX_NAME: usize = 255;
/// HKDF salt: names this use of the platform secret.
const SALT: &[u8] = b"CTVM vTPM state blob v1";

/// Why a blob was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobError {
    /// Shorter than its fields say, or longer (trailing bytes).
    Truncated,
    /// Not a CTVM vTPM state blob.
    BadMagic,
    /// A format version or algorithm this code does not know.
    UnsupportedFormat(u16),
    /// Sealed under another key (another host, another platform secret).
    ForeignKey,
    /// Sealed for another guest.
    WrongGuest,
    /// The authentication tag does not match: the blob was modified.
    Forged,
    /// Authentic but older than the newest version the hypervisor committed:
    /// a rollback.
    Stale { version: u64, minimum: u64 },
    /// Authentic but its plaintext is not a state payload (a bug, never an
    /// attack: the attacker cannot produce authentic blobs).
    Malformed,
    /// A guest name that is empty or longer than [`MAX_NAME`] bytes.
    BadName,
}

impl core::fmt::Display for BlobError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlobError::Truncated => f.write_str("state blob truncated"),
            BlobError::BadMagic => f.write_str("not a vTPM state blob"),
            BlobError::UnsupportedFormat(v) => write!(f, "unsupported state blob format {v}"),
            BlobError::ForeignKey => f.write_str("state blob sealed under another platform key"),
            BlobError::WrongGuest => f.write_str("state blob belongs to another guest"),
            BlobError::Forged => f.write_str("state blob failed authentication"),
            BlobError::Stale { version, minimum } => {
                write!(f, "state blob version {version} is older than the committed {minimum}")
            }
            BlobError::Malformed => f.write_str("state blob content malformed"),
            BlobError::BadName => f.write_str("guest name empty or too long"),
        }
    }
}

/// The key that seals every vTPM state blob of one host, derived from the
/// 32-byte platform secret (today the `vtpm.seed` module; later a key
/// unsealed from the platform TPM). Zeroised when dropped.
pub struct StateKey {
    key: Zeroizing<[u8; 32]>,
    /// Keys the synthetic nonces of [`seal_synthetic`].
    nonce_key: Zeroizing<[u8; 32]>,
    id: [u8; KEY_ID_LEN],
}

impl StateKey {
    /// HKDF-SHA256(salt = "CTVM vTPM state blob v1", ikm = secret): the
    /// AES key with info "aead key", the key id with info "key id". The
    /// key id reveals nothing of the key (a separate HKDF output).
    pub fn derive(platform_secret: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(SALT), platform_secret);
        let mut key = Zeroizing::new([0u8; 32]);
        let mut nonce_key = Zeroizing::new([0u8; 32]);
        let mut id = [0u8; KEY_ID_LEN];
        // All lengths are far below HKDF-SHA256's 8160-byte limit.
        let _ = hk.expand(b"aead key", key.as_mut());
        let _ = hk.expand(b"nonce key", nonce_key.as_mut());
        let _ = hk.expand(b"key id", &mut id);
        StateKey { key, nonce_key, id }
    }

    /// The key id written into blobs.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(*self.key))
    }
}

/// A blob that opened: its version and plaintext.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub version: u64,
    pub plaintext: Zeroizing<Vec<u8>>,
}

/// The associated data: every header field.
fn header(key_id: &[u8; KEY_ID_LEN], version: u64, guest: &[u8], nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut h = Vec::with_capacity(50 + guest.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&ALG_AES256GCM_HKDF_SHA256.to_be_bytes());
    h.extend_from_slice(key_id);
    h.extend_from_slice(&version.to_be_bytes());
    h.extend_from_slice(&(guest.len() as u16).to_be_bytes());
    h.extend_from_slice(guest);
    h.extend_from_slice(nonce);
    h
}

/// Seals `plaintext` as version `version` of `guest`'s state. `nonce` must
/// be fresh random bytes (RDRAND in the hypervisor): AES-GCM breaks if a
/// nonce repeats under one key, and 96 random bits make that negligible
/// for any number of blobs a host will ever write.
pub fn seal(
    key: &StateKey,
    guest: &str,
    version: u64,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, BlobError> {
    let name = guest.as_bytes();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(BlobError::BadName);
    }
    let mut out = header(&key.id, version, name, &nonce);
    let ct = key
        .cipher()
        .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad: &out })
        .map_err(|_| BlobError::Malformed)?;
    out.extend_from_slice(&(ct.len() as u32).to_be_bytes());
    out.extend_from_slice(&ct);
    Ok(out)
}

/// [`seal`] with a synthetic nonce: HMAC-SHA256 under a key of its own
/// over `random`, the version, the guest and the plaintext, truncated to
/// 12 bytes. Two blobs can then share a nonce only if they share all of
/// these, that is, if they are the same blob: weak or repeating entropy (a
/// processor without RDRAND, a deterministic emulator) cannot make AES-GCM
/// reuse a nonce for two different plaintexts, which would give away both
/// and the authentication key. Fresh `random` bytes still keep two seals of
/// the same state apart.
pub fn seal_synthetic(
    key: &StateKey,
    guest: &str,
    version: u64,
    plaintext: &[u8],
    random: [u8; NONCE_LEN],
) -> Result<Vec<u8>, BlobError> {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key.nonce_key.as_ref()).map_err(|_| BlobError::Malformed)?;
    mac.update(&random);
    mac.update(&version.to_be_bytes());
    mac.update(&(guest.len() as u64).to_be_bytes());
    mac.update(guest.as_bytes());
    mac.update(plaintext);
    let tag = mac.finalize().into_bytes();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(tag.get(..NONCE_LEN).ok_or(BlobError::Malformed)?);
    seal(key, guest, version, plaintext, nonce)
}

/// A cursor over the blob's bytes; every read past the end is `Truncated`.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BlobError> {
        let end = self.at.checked_add(n).ok_or(BlobError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(BlobError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], BlobError> {
        self.take(N)?.try_into().map_err(|_| BlobError::Truncated)
    }
}

/// Opens `guest`'s blob, refusing any version below `minimum` (the
/// hypervisor's committed counter).
pub fn open(key: &StateKey, guest: &str, minimum: u64, blob: &[u8]) -> Result<Opened, BlobError> {
    let mut c = Cursor { bytes: blob, at: 0 };
    if c.take(MAGIC.len())? != MAGIC {
        return Err(BlobError::BadMagic);
    }
    let format = u16::from_be_bytes(c.array()?);
    if format != FORMAT_VERSION {
        return Err(BlobError::UnsupportedFormat(format));
    }
    let alg = u16::from_be_bytes(c.array()?);
    if alg != ALG_AES256GCM_HKDF_SHA256 {
        return Err(BlobError::UnsupportedFormat(alg));
    }
    let key_id: [u8; KEY_ID_LEN] = c.array()?;
    let version = u64::from_be_bytes(c.array()?);
    let name_len = usize::from(u16::from_be_bytes(c.array()?));
    let name = c.take(name_len)?;
    let nonce: [u8; NONCE_LEN] = c.array()?;
    let aad_end = c.at;
    let ct_len = u32::from_be_bytes(c.array()?) as usize;
    let ct = c.take(ct_len)?;
    if c.at != blob.len() {
        return Err(BlobError::Truncated);
    }
    if ct_len < TAG_LEN {
        return Err(BlobError::Truncated);
    }
    // Diagnostics before the tag; the tag below covers these fields too.
    if !same_id(&key_id, &key.id) {
        return Err(BlobError::ForeignKey);
    }
    if name != guest.as_bytes() {
        return Err(BlobError::WrongGuest);
    }
    let aad = blob.get(..aad_end).ok_or(BlobError::Truncated)?;
    let plaintext =
        key.cipher().decrypt(&Nonce::from(nonce), Payload { msg: ct, aad }).map_err(|_| BlobError::Forged)?;
    let plaintext = Zeroizing::new(plaintext);
    if version < minimum {
        return Err(BlobError::Stale { version, minimum });
    }
    Ok(Opened { version, plaintext })
}

/// Compares key ids without an early exit (they are public, but cheap to
/// treat as secret).
fn same_id(a: &[u8; KEY_ID_LEN], b: &[u8; KEY_ID_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a blob holds: vtpm-core's permanent state (`Tpm::permanent_state`)
/// and, when the guest suspended with TPM_SaveState, its saved state
/// (`Tpm::saved_state`). Encoded as two u32-length-prefixed fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePayload {
    pub permanent: Vec<u8>,
    pub saved: Option<Vec<u8>>,
}

impl StatePayload {
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let saved = self.saved.as_deref().unwrap_or(&[]);
        let mut v = Vec::with_capacity(9 + self.permanent.len() + saved.len());
        v.extend_from_slice(&(self.permanent.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.permanent);
        v.push(u8::from(self.saved.is_some()));
        v.extend_from_slice(&(saved.len() as u32).to_be_bytes());
        v.extend_from_slice(saved);
        Zeroizing::new(v)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, BlobError> {
        let mut c = Cursor { bytes, at: 0 };
        let malformed = |_| BlobError::Malformed;
        let n = u32::from_be_bytes(c.array().map_err(malformed)?) as usize;
        let permanent = c.take(n).map_err(malformed)?.to_vec();
        let has_saved = c.take(1).map_err(malformed)?;
        let m = u32::from_be_bytes(c.array().map_err(malformed)?) as usize;
        let saved = c.take(m).map_err(malformed)?.to_vec();
        if c.at != bytes.len() {
            return Err(BlobError::Malformed);
        }
        let saved = match has_saved {
            [0] if saved.is_empty() => None,
            [1] => Some(saved),
            _ => return Err(BlobError::Malformed),
        };
        Ok(StatePayload { permanent, saved })
    }
}

/// A guest name as a blob would carry it, for diagnostics.
pub fn guest_of(blob: &[u8]) -> Option<String> {
    let len = usize::from(u16::from_be_bytes(blob.get(36..38)?.try_into().ok()?));
    let name = blob.get(38..38usize.checked_add(len)?)?;
    String::from_utf8(name.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const SECRET: [u8; 32] = [0x42; 32];
    const NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];

    fn sample() -> Vec<u8> {
        StatePayload { permanent: vec![1, 2, 3, 4, 5], saved: Some(vec![9; 40]) }.encode().to_vec()
    }

    #[test]
    fn round_trip_is_the_identity() {
        let key = StateKey::derive(&SECRET);
        for payload in [
            StatePayload { permanent: vec![0xAB; 3000], saved: None },
            StatePayload { permanent: vec![1], saved: Some(vec![]) },
            StatePayload { permanent: vec![], saved: Some(vec![5; 700]) },
        ] {
            let blob = seal(&key, "alpha", 7, &payload.encode(), NONCE).unwrap();
            let opened = open(&key, "alpha", 7, &blob).unwrap();
            assert_eq!(opened.version, 7);
            assert_eq!(StatePayload::decode(&opened.plaintext).unwrap(), payload);
        }
        assert_eq!(guest_of(&seal(&key, "beta", 1, b"x", NONCE).unwrap()).as_deref(), Some("beta"));
    }

    #[test]
    fn the_plaintext_does_not_appear_in_the_blob() {
        let key = StateKey::derive(&SECRET);
        let secret = b"owner auth: 0123456789abcdef0123";
        let blob = seal(&key, "alpha", 1, secret, NONCE).unwrap();
        assert!(!blob.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
    }

    /// The error a flipped bit must give, by the field it lands in.
    fn expected_for_flip(byte: usize, name_len: usize, len: usize) -> &'static [BlobError] {
        use BlobError::*;
        let name_at = 38;
        let ct_len_at = name_at + name_len + NONCE_LEN;
        match byte {
            0..=7 => &[BadMagic],
            8..=11 => &[UnsupportedFormat(0)], // any value: checked by kind below
            12..=27 => &[ForeignKey],
            28..=35 => &[Forged],
            36..=37 => &[Truncated, WrongGuest, Forged],
            b if b < name_at + name_len => &[WrongGuest],
            b if b < ct_len_at => &[Forged],
            b if b < ct_len_at + 4 => &[Truncated],
            b if b < len => &[Forged],
            _ => &[],
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused_for_what_it_broke() {
        let key = StateKey::derive(&SECRET);
        let blob = seal(&key, "alpha", 5, &sample(), NONCE).unwrap();
        for byte in 0..blob.len() {
            for bit in 0..8 {
                let mut b = blob.clone();
                b[byte] ^= 1 << bit;
                let err = open(&key, "alpha", 0, &b).expect_err("a flipped bit was accepted");
                let want = expected_for_flip(byte, 5, blob.len());
                let ok = match err {
                    BlobError::UnsupportedFormat(_) => {
                        want.iter().any(|w| matches!(w, BlobError::UnsupportedFormat(_)))
                    }
                    e => want.contains(&e),
                };
                assert!(ok, "bit {bit} of byte {byte}: {err:?}, expected one of {want:?}");
            }
        }
    }

    #[test]
    fn every_truncation_is_refused_as_truncated() {
        let key = StateKey::derive(&SECRET);
        let blob = seal(&key, "alpha", 5, &sample(), NONCE).unwrap();
        for len in 0..blob.len() {
            let err = open(&key, "alpha", 0, &blob[..len]).expect_err("a truncated blob was accepted");
            assert_eq!(err, BlobError::Truncated, "cut to {len} bytes");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(open(&key, "alpha", 0, &longer), Err(BlobError::Truncated), "a trailing byte");
    }

    #[test]
    fn a_foreign_key_is_refused() {
        let blob = seal(&StateKey::derive(&SECRET), "alpha", 5, &sample(), NONCE).unwrap();
        let mut other = SECRET;
        other[31] ^= 1;
        assert_eq!(open(&StateKey::derive(&other), "alpha", 0, &blob), Err(BlobError::ForeignKey));
    }

    #[test]
    fn a_foreign_key_with_a_copied_key_id_is_forged() {
        // An attacker who copies the key id still cannot make the tag.
        let key = StateKey::derive(&SECRET);
        let mut attacker = StateKey::derive(&[1; 32]);
        attacker.id = key.id();
        let blob = seal(&attacker, "alpha", 99, &sample(), NONCE).unwrap();
        assert_eq!(open(&key, "alpha", 0, &blob), Err(BlobError::Forged));
    }

    #[test]
    fn a_wrong_guest_name_is_refused() {
        let key = StateKey::derive(&SECRET);
        let blob = seal(&key, "alpha", 5, &sample(), NONCE).unwrap();
        assert_eq!(open(&key, "beta", 0, &blob), Err(BlobError::WrongGuest));
        assert_eq!(open(&key, "alph", 0, &blob), Err(BlobError::WrongGuest));
        // Renaming the blob's guest in place breaks its tag instead.
        let mut renamed = blob.clone();
        renamed[38] = b'b';
        assert_eq!(open(&key, "blpha", 0, &renamed), Err(BlobError::Forged));
    }

    #[test]
    fn an_old_version_is_refused() {
        let key = StateKey::derive(&SECRET);
        let blob = seal(&key, "alpha", 5, &sample(), NONCE).unwrap();
        assert_eq!(open(&key, "alpha", 6, &blob), Err(BlobError::Stale { version: 5, minimum: 6 }));
        assert!(open(&key, "alpha", 5, &blob).is_ok());
        // Raising the version field in place breaks the tag.
        let mut raised = blob.clone();
        raised[35] = 6;
        assert_eq!(open(&key, "alpha", 6, &raised), Err(BlobError::Forged));
    }

    #[test]
    fn another_format_or_algorithm_is_refused() {
        // A blob of an older (or newer) format, or sealed with another
        // algorithm, is refused before any decryption is tried.
        let key = StateKey::derive(&SECRET);
        let blob = seal(&key, "alpha", 5, &sample(), NONCE).unwrap();
        for (at, value, want) in [(9, 0u8, 0u16), (9, 2, 2), (11, 0, 0), (11, 2, 2)] {
            let mut b = blob.clone();
            b[at] = value;
            assert_eq!(open(&key, "alpha", 0, &b), Err(BlobError::UnsupportedFormat(want)), "byte {at} = {value}");
        }
    }

    #[test]
    fn synthetic_nonces_differ_with_the_plaintext_even_without_entropy() {
        let key = StateKey::derive(&SECRET);
        let nonce_of = |b: &[u8]| b[43..55].to_vec(); // "alpha": 38 + 5
        let a = seal_synthetic(&key, "alpha", 5, b"state one", [0; NONCE_LEN]).unwrap();
        let b = seal_synthetic(&key, "alpha", 5, b"state two", [0; NONCE_LEN]).unwrap();
        let c = seal_synthetic(&key, "alpha", 6, b"state one", [0; NONCE_LEN]).unwrap();
        let d = seal_synthetic(&key, "alpha", 5, b"state one", [1; NONCE_LEN]).unwrap();
        let nonces = [nonce_of(&a), nonce_of(&b), nonce_of(&c), nonce_of(&d)];
        for i in 0..4 {
            for j in 0..i {
                assert_ne!(nonces[i], nonces[j], "blobs {i} and {j} share a nonce");
            }
        }
        // The same inputs give the same blob (nothing two plaintexts could leak).
        assert_eq!(a, seal_synthetic(&key, "alpha", 5, b"state one", [0; NONCE_LEN]).unwrap());
        assert_eq!(open(&key, "alpha", 5, &a).unwrap().plaintext.as_slice(), b"state one");
        // Another host's key gives other nonces for the same inputs.
        let other = seal_synthetic(&StateKey::derive(&[1; 32]), "alpha", 5, b"state one", [0; NONCE_LEN]).unwrap();
        assert_ne!(nonce_of(&other), nonces[0]);
    }

    #[test]
    fn names_are_bounded() {
        let key = StateKey::derive(&SECRET);
        assert_eq!(seal(&key, "", 1, b"x", NONCE), Err(BlobError::BadName));
        let long = "x".repeat(MAX_NAME + 1);
        assert_eq!(seal(&key, &long, 1, b"x", NONCE), Err(BlobError::BadName));
    }

    #[test]
    fn payload_decoding_refuses_bad_framing() {
        let good = sample();
        assert!(StatePayload::decode(&good).is_ok());
        for len in 0..good.len() {
            assert_eq!(StatePayload::decode(&good[..len]), Err(BlobError::Malformed), "cut to {len}");
        }
    }
}
