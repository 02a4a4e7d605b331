//! The cryptography the TPM needs, behind small functions that cannot panic.
//!
//! One SHA-1 (RustCrypto `sha1`) serves hashing, HMAC and RSA padding.
//! Randomness comes from a ChaCha20 DRBG seeded from the caller's entropy and
//! re-seeded on StirRandom, at power-on and every [`RESEED_INTERVAL`] bytes.

use alloc::vec::Vec;
use crypto_bigint::{BoxedUint, Integer, NonZero, Resize};
use hmac::{Hmac, KeyInit, Mac};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, Pkcs1v15Encrypt, Pkcs1v15Sign, PrivateKey, PublicKey};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Modulus size of every key this TPM makes or accepts, in bits.
pub const RSA_BITS: usize = 2048;
/// Modulus size in bytes.
pub const RSA_BYTES: usize = RSA_BITS / 8;
/// Bytes of DRBG output after which fresh platform entropy is mixed in.
pub const RESEED_INTERVAL: u64 = 1 << 20;

/// SHA-1 of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    Sha1::digest(data).into()
}

/// SHA-1 of the concatenation of `parts`, without building it.
pub fn sha1_parts(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A SHA-1 computed piece by piece (the TPM_HASH_* sequence).
pub type Sha1Stream = Sha1;

/// Feeds `data` to a running SHA-1.
pub fn sha1_update(h: &mut Sha1Stream, data: &[u8]) {
    h.update(data);
}

/// Ends a running SHA-1.
pub fn sha1_finish(h: Sha1Stream) -> [u8; 20] {
    h.finalize().into()
}

/// HMAC-SHA1 keyed with `key` over the concatenation of `parts`.
pub fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    // HMAC accepts keys of every length, so this cannot fail.
    let Ok(mut mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(key) else {
        return [0; 20];
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two secrets or MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// XORs `secret` with SHA1(`shared` ‖ `nonce`): the ADIP encryption of new
/// authorisation data (it is its own inverse).
pub fn adip_xor(secret: &[u8; 20], shared: &[u8; 20], nonce: &[u8; 20]) -> [u8; 20] {
    let pad = sha1_parts(&[shared, nonce]);
    let mut out = [0u8; 20];
    for ((o, s), p) in out.iter_mut().zip(secret).zip(pad.iter()) {
        *o = s ^ p;
    }
    out
}

/// The TPM's deterministic random bit generator.
#[derive(Clone)]
pub struct Drbg {
    rng: ChaCha20Rng,
    since_reseed: u64,
}

impl Drbg {
    /// Seeds a DRBG with 32 bytes of entropy.
    pub fn new(mut seed: [u8; 32]) -> Self {
        let rng = ChaCha20Rng::from_seed(seed);
        seed.zeroize();
        Drbg { rng, since_reseed: 0 }
    }

    /// Mixes `entropy` into the state: the new seed depends on the old state
    /// and the input, so weak input never weakens the generator.
    pub fn mix(&mut self, entropy: &[u8]) {
        let mut old = [0u8; 32];
        self.rng.fill_bytes(&mut old);
        let a = sha1_parts(&[&[0], &old, entropy]);
        let b = sha1_parts(&[&[1], &old, entropy]);
        let mut seed = [0u8; 32];
        seed[..20].copy_from_slice(&a);
        seed[20..].copy_from_slice(&b[..12]);
        self.rng = ChaCha20Rng::from_seed(seed);
        seed.zeroize();
        old.zeroize();
        self.since_reseed = 0;
    }

    /// True when enough output was drawn that fresh entropy is due.
    pub fn needs_reseed(&self) -> bool {
        self.since_reseed >= RESEED_INTERVAL
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
        self.since_reseed = self.since_reseed.saturating_add(buf.len() as u64);
    }

    /// A fresh 20-byte nonce.
    pub fn nonce(&mut self) -> [u8; 20] {
        let mut n = [0u8; 20];
        self.fill(&mut n);
        n
    }

    /// A random u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        u32::from_be_bytes(b)
    }

    /// The generator as a `rand_core` RNG, for the RSA crate.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        // RSA operations draw little; count a nominal amount.
        self.since_reseed = self.since_reseed.saturating_add(512);
        &mut self.rng
    }

    /// The current state, from which [`Drbg::replay`] produces the output
    /// this generator is about to produce. Whoever holds it can predict
    /// that output: the caller must move this generator elsewhere (e.g.
    /// [`Drbg::mix`]) before drawing from it again.
    pub fn snapshot(&self) -> DrbgSnapshot {
        DrbgSnapshot { seed: self.rng.get_seed(), word_pos: self.rng.get_word_pos() }
    }

    /// A generator that continues from `s`.
    pub fn replay(s: &DrbgSnapshot) -> Self {
        let mut rng = ChaCha20Rng::from_seed(s.seed);
        rng.set_word_pos(s.word_pos);
        Drbg { rng, since_reseed: 0 }
    }
}

/// A [`Drbg`] state (ChaCha20 key and position in its stream 0, the only
/// stream a `Drbg` uses): a secret as strong as everything generated from
/// it. Zeroised when dropped.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct DrbgSnapshot {
    pub seed: [u8; 32],
    pub word_pos: u128,
}

impl core::fmt::Debug for DrbgSnapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DrbgSnapshot(..)")
    }
}

/// An RSA-2048 private key, with the two values the TPM stores for it.
pub struct RsaKey {
    key: PrivateKey,
}

impl core::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RsaKey(..)")
    }
}

impl Clone for RsaKey {
    fn clone(&self) -> Self {
        RsaKey { key: self.key.clone() }
    }
}

/// Big-endian bytes of `v`, left-padded to `len`.
fn be_padded(v: &BoxedUint, len: usize) -> Vec<u8> {
    let raw = v.to_be_bytes();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let sig = raw.get(start..).unwrap_or(&[]);
    let mut out = alloc::vec![0u8; len.saturating_sub(sig.len())];
    out.extend_from_slice(sig);
    out
}

impl RsaKey {
    /// Generates a 2048-bit key with e = 65537.
    pub fn generate(drbg: &mut Drbg) -> Option<Self> {
        PrivateKey::new(drbg.rng(), RSA_BITS).ok().map(|key| RsaKey { key })
    }

    /// Rebuilds a key from its modulus and one prime, as TPM_STORE_ASYMKEY
    /// carries it. Refuses anything that is not a 2048-bit modulus with an
    /// exact 1024-bit factor; the blob may have been made by an attacker.
    pub fn from_n_p(n: &[u8], p: &[u8]) -> Option<Self> {
        if n.len() != RSA_BYTES || p.len() != RSA_BYTES / 2 {
            return None;
        }
        if n.first().is_none_or(|b| b & 0x80 == 0) || p.first().is_none_or(|b| b & 0x80 == 0) {
            return None;
        }
        let half = (RSA_BITS / 2) as u32;
        let nb = BoxedUint::from_be_slice(n, RSA_BITS as u32).ok()?;
        let p_half = BoxedUint::from_be_slice(p, half).ok()?;
        if !bool::from(p_half.is_odd()) || !bool::from(nb.is_odd()) {
            return None;
        }
        let p_wide = p_half.clone().try_resize(RSA_BITS as u32)?;
        let pnz = NonZero::new(p_wide).into_option()?;
        let (q_wide, r) = nb.div_rem(&pnz);
        if !bool::from(r.is_zero()) || !bool::from(q_wide.is_odd()) {
            return None;
        }
        if q_wide.bit_width() != half {
            return None;
        }
        let q = q_wide.try_resize(half)?;
        if q == p_half {
            return None;
        }
        let p = p_half;
        let key = PrivateKey::from_p_q(p, q, BoxedUint::from(65537u64)).ok()?;
        if key.n_bytes().as_ref() != n {
            return None;
        }
        Some(RsaKey { key })
    }

    /// The modulus, 256 bytes big-endian.
    pub fn modulus(&self) -> Vec<u8> {
        be_padded(self.key.n().as_ref(), RSA_BYTES)
    }

    /// The first prime, 128 bytes big-endian: what TPM_STORE_ASYMKEY stores.
    pub fn prime(&self) -> Vec<u8> {
        use rsa::traits::PrivateKeyParts;
        match self.key.primes().first() {
            Some(p) => be_padded(p.as_ref(), RSA_BYTES / 2),
            None => Vec::new(),
        }
    }

    /// OAEP-encrypts `msg` (SHA-1, MGF1, "TCPA") to this key's public half,
    /// reusing its precomputed Montgomery form of the modulus (rebuilding it
    /// from the modulus bytes costs more than the encryption itself).
    pub fn oaep_encrypt(&self, drbg: &mut Drbg, msg: &[u8]) -> Option<Vec<u8>> {
        let pad = Oaep::<Sha1>::new_with_label(&b"TCPA"[..]);
        self.key.as_public_key().encrypt(drbg.rng(), pad, msg).ok()
    }

    /// Decrypts OAEP (SHA-1, MGF1, label "TCPA").
    pub fn oaep_decrypt(&self, drbg: &mut Drbg, ct: &[u8]) -> Option<Vec<u8>> {
        if ct.len() != RSA_BYTES {
            return None;
        }
        let pad = Oaep::<Sha1>::new_with_label(&b"TCPA"[..]);
        self.key.decrypt_blinded(drbg.rng(), pad, ct).ok()
    }

    /// Decrypts PKCS#1 v1.5 (legacy binding).
    pub fn pkcs1_decrypt(&self, drbg: &mut Drbg, ct: &[u8]) -> Option<Vec<u8>> {
        if ct.len() != RSA_BYTES {
            return None;
        }
        self.key.decrypt_blinded(drbg.rng(), Pkcs1v15Encrypt, ct).ok()
    }

    /// PKCS#1 v1.5 signature over a SHA-1 digest (with its DigestInfo).
    pub fn sign_sha1(&self, drbg: &mut Drbg, digest: &[u8; 20]) -> Option<Vec<u8>> {
        self.key.sign_with_rng(drbg.rng(), Pkcs1v15Sign::new::<Sha1>(), digest).ok()
    }

    /// PKCS#1 v1.5 signature over raw bytes (the DER scheme: the caller
    /// supplies the DigestInfo).
    pub fn sign_raw(&self, drbg: &mut Drbg, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() > RSA_BYTES - 11 {
            return None;
        }
        self.key.sign_with_rng(drbg.rng(), Pkcs1v15Sign::new_unprefixed(), data).ok()
    }
}

/// OAEP-encrypts `msg` (SHA-1, MGF1, "TCPA") to the public modulus `n`
/// (for keys the TPM does not hold; see [`RsaKey::oaep_encrypt`]).
pub fn oaep_encrypt(drbg: &mut Drbg, n: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
    let key = public_key(n)?;
    let pad = Oaep::<Sha1>::new_with_label(&b"TCPA"[..]);
    key.encrypt(drbg.rng(), pad, msg).ok()
}

/// Verifies a PKCS#1 v1.5 SHA-1 signature (used by tests and self-test).
pub fn verify_sha1(n: &[u8], digest: &[u8; 20], sig: &[u8]) -> bool {
    match public_key(n) {
        Some(k) => k.verify(Pkcs1v15Sign::new::<Sha1>(), digest, sig).is_ok(),
        None => false,
    }
}

fn public_key(n: &[u8]) -> Option<PublicKey> {
    if n.len() != RSA_BYTES {
        return None;
    }
    let nb = BoxedUint::from_be_slice(n, RSA_BITS as u32).ok()?;
    PublicKey::new(nb, BoxedUint::from(65537u64)).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn sha1_matches_fips_180_vector() {
        assert_eq!(
            sha1(b"abc"),
            [
                0xa9, 0x99, 0x3e, 0x36, 0x47, 0x06, 0x81, 0x6a, 0xba, 0x3e, 0x25, 0x71, 0x78, 0x50, 0xc2, 0x6c, 0x9c,
                0xd0, 0xd8, 0x9d
            ]
        );
        assert_eq!(sha1_parts(&[b"a", b"bc"]), sha1(b"abc"));
    }

    #[test]
    fn hmac_matches_rfc2202_case_2() {
        let mac = hmac_sha1(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            mac,
            [
                0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74, 0x16, 0xd5, 0xf1, 0x84, 0xdf, 0x9c, 0x25,
                0x9a, 0x7c, 0x79
            ]
        );
    }

    #[test]
    fn adip_is_an_involution() {
        let s = [7u8; 20];
        let enc = adip_xor(&s, &[1; 20], &[2; 20]);
        assert_ne!(enc, s);
        assert_eq!(adip_xor(&enc, &[1; 20], &[2; 20]), s);
    }

    #[test]
    fn drbg_mix_changes_the_stream() {
        let mut a = Drbg::new([0; 32]);
        let mut b = Drbg::new([0; 32]);
        assert_eq!(a.nonce(), b.nonce());
        b.mix(b"entropy");
        assert_ne!(a.nonce(), b.nonce());
    }

    #[test]
    fn rsa_round_trips_and_rebuilds_from_n_and_p() {
        let mut d = Drbg::new([3; 32]);
        let k = RsaKey::generate(&mut d).unwrap();
        let n = k.modulus();
        assert_eq!(n.len(), 256);
        let ct = oaep_encrypt(&mut d, &n, b"secret").unwrap();
        assert_eq!(k.oaep_decrypt(&mut d, &ct).unwrap(), b"secret");
        let k2 = RsaKey::from_n_p(&n, &k.prime()).unwrap();
        let sig = k2.sign_sha1(&mut d, &[9; 20]).unwrap();
        assert!(verify_sha1(&n, &[9; 20], &sig));
        assert!(!verify_sha1(&n, &[8; 20], &sig));
        // A wrong factor is refused, not trusted.
        let mut bad = k.prime();
        bad[127] ^= 2;
        assert!(RsaKey::from_n_p(&n, &bad).is_none());
        assert!(RsaKey::from_n_p(&n[1..], &k.prime()).is_none());
    }
}
