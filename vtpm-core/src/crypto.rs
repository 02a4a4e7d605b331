//! The cryptography the TPM needs, behind small functions that cannot panic.
//!
//! One SHA-1 (RustCrypto `sha1`) serves hashing, HMAC and RSA padding.
//! Randomness comes from a ChaCha20 DRBG seeded from the caller's entropy and
//! re-seeded on StirRandom, at power-on and every [`RESEED_INTERVAL`] bytes.

use alloc::vec::Vec;
use crypto_bigint::modular::{BoxedMontyForm, BoxedMontyParams};
use crypto_bigint::{BoxedUint, ConcatenatingMul, Integer, Limb, NonZero, Resize, SquareAssign};
use hmac::{Hmac, KeyInit, Mac};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, Pkcs1v15Encrypt, Pkcs1v15Sign, PrivateKey, PublicKey};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

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
        let d = private_exponent(&p, &q)?;
        // from_components checks p·q = n and e·d ≡ 1 mod p-1 and mod q-1
        // (so a wrong d is refused, never used), then precomputes the CRT
        // values; from_p_q would also compute d, through a general modular
        // inverse that costs several times more than the rest together.
        let key = PrivateKey::from_components(nb, BoxedUint::from(PUBLIC_EXPONENT), d, alloc::vec![p, q]).ok()?;
        if key.n_bytes().as_ref() != n {
            return None;
        }
        Some(RsaKey { key })
    }

    /// [`RsaKey::from_n_p`], but a key in `known` with exactly this modulus
    /// and prime is cloned instead of rebuilt: the rebuild (division, private
    /// exponent, CRT values) is deterministic in `n` and `p`, so the result
    /// is the same key, without the ~40 us of precomputation.
    pub fn from_n_p_reusing(n: &[u8], p: &[u8], known: &[&RsaKey]) -> Option<Self> {
        match known.iter().find(|k| k.modulus() == n && *k.prime() == *p) {
            Some(k) => Some((*k).clone()),
            None => Self::from_n_p(n, p),
        }
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
        oaep_encrypt_with(self.key.n_params(), drbg, msg)
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
    oaep_encrypt_with(key.n_params(), drbg, msg)
}

/// The public exponent of every key: 65537 = 2^16 + 1.
const PUBLIC_EXPONENT: u64 = 65537;

/// d = 65537^-1 mod (p-1)(q-1), or None when 65537 divides p-1 or q-1 (no
/// inverse; `PrivateKey::from_p_q` refuses the same primes). With e small,
/// d = (k·φ + 1) / e for the k in [1, e) with k·φ ≡ -1 (mod e), and k
/// comes from φ mod e: no inverse modulo a 2048-bit number is needed. The
/// arithmetic is constant-time (limb division, u64 arithmetic modulo a
/// constant). This d is not the one modulo λ(n) that from_p_q picks, but
/// the CRT exponents d mod (p-1), d mod (q-1), all that private operations
/// use, are the same, and d itself is never stored or sent.
fn private_exponent(p: &BoxedUint, q: &BoxedUint) -> Option<BoxedUint> {
    const E: u64 = PUBLIC_EXPONENT;
    let one = BoxedUint::one_with_precision(p.bits_precision());
    let pm1 = Zeroizing::new(p.wrapping_sub(&one));
    let qm1 = Zeroizing::new(q.wrapping_sub(&one));
    let phi = Zeroizing::new(pm1.concatenating_mul(&*qm1));
    let e_limb = NonZero::new(Limb::from(E as u32)).into_option()?;
    let r = phi.rem_limb(e_limb).0;
    // r^(e-2) = r^-1 mod e (e is prime); e-2 = 0xFFFF, every bit set.
    let mut inv = 1u64;
    for _ in 0..16 {
        inv = inv.wrapping_mul(inv) % E;
        inv = inv.wrapping_mul(r) % E;
    }
    if inv == 0 {
        return None;
    }
    let k = E.wrapping_sub(inv);
    let mut kphi = Zeroizing::new(phi.concatenating_mul(&BoxedUint::from(k)));
    kphi.wrapping_add_assign(BoxedUint::one());
    let (d, rem) = kphi.div_rem_limb(e_limb);
    let d = Zeroizing::new(d);
    if rem.0 != 0 {
        return None;
    }
    (&*d).try_resize(RSA_BITS as u32)
}

/// MGF1 with SHA-1 (RFC 8017 B.2.1): XORs the mask of `seed` into `out`
/// (OAEP here; the platform TPM 1.2's encrypted transport sessions too).
pub fn mgf1_xor(out: &mut [u8], seed: &[u8]) {
    for (counter, chunk) in (0u32..).zip(out.chunks_mut(20)) {
        let mut mask = sha1_parts(&[seed, &counter.to_be_bytes()]);
        for (o, m) in chunk.iter_mut().zip(mask.iter()) {
            *o ^= m;
        }
        mask.zeroize();
    }
}

/// RSAES-OAEP encryption (RFC 8017 7.1.1: SHA-1, MGF1-SHA1, label "TCPA")
/// under the modulus of `n_params`. The same bytes as `rsa`'s `Oaep`
/// encryption from the same DRBG state (it draws the seed the same way),
/// but the public exponentiation is 16 squarings and one multiplication:
/// the generic windowed exponentiation spends as much again building a
/// table that e = 65537 hardly uses.
fn oaep_encrypt_with(n_params: &BoxedMontyParams, drbg: &mut Drbg, msg: &[u8]) -> Option<Vec<u8>> {
    const H: usize = 20;
    if msg.len() > RSA_BYTES - 2 * H - 2 || n_params.bits_precision() != RSA_BITS as u32 {
        return None;
    }
    let mut em = Zeroizing::new([0u8; RSA_BYTES]);
    let (seed, db) = em.get_mut(1..)?.split_at_mut(H);
    drbg.rng().fill_bytes(seed);
    let m_at = db.len().checked_sub(msg.len())?;
    db.get_mut(..H)?.copy_from_slice(&sha1(b"TCPA"));
    *db.get_mut(m_at.checked_sub(1)?)? = 1;
    db.get_mut(m_at..)?.copy_from_slice(msg);
    mgf1_xor(db, seed);
    mgf1_xor(seed, db);
    let m = BoxedUint::from_be_slice(&em[..], RSA_BITS as u32).ok()?;
    let x = Zeroizing::new(BoxedMontyForm::new(m, n_params));
    let mut acc = Zeroizing::new((*x).clone());
    for _ in 0..16 {
        acc.square_assign();
    }
    *acc = acc.mul(&x);
    Some(be_padded(&acc.retrieve(), RSA_BYTES))
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
    fn oaep_encryption_is_the_rsa_crates() {
        let mut d = Drbg::new([5; 32]);
        let k = RsaKey::generate(&mut d).unwrap();
        let n = k.modulus();
        for msg in [&b""[..], b"x", &[7u8; 214]] {
            let (mut a, mut b, mut c) = (d.clone(), d.clone(), d.clone());
            let ours = k.oaep_encrypt(&mut a, msg).unwrap();
            let pad = Oaep::<Sha1>::new_with_label(&b"TCPA"[..]);
            let theirs = k.key.as_public_key().encrypt(b.rng(), pad, msg).unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(oaep_encrypt(&mut c, &n, msg).unwrap(), theirs);
            assert_eq!(k.oaep_decrypt(&mut d, &ours).unwrap(), msg);
        }
        assert!(k.oaep_encrypt(&mut d, &[0; 215]).is_none());
    }

    #[test]
    fn rebuilt_key_has_from_p_q_crt_values() {
        use rsa::traits::PrivateKeyParts;
        let mut d = Drbg::new([4; 32]);
        let k = RsaKey::generate(&mut d).unwrap();
        let rebuilt = RsaKey::from_n_p(&k.modulus(), &k.prime()).unwrap();
        let primes = k.key.primes();
        let reference =
            PrivateKey::from_p_q(primes[0].as_ref().clone(), primes[1].as_ref().clone(), BoxedUint::from(65537u64))
                .unwrap();
        assert_eq!(rebuilt.key.dp(), reference.dp());
        assert_eq!(rebuilt.key.dq(), reference.dq());
        assert_eq!(rebuilt.key.crt_coefficient(), reference.crt_coefficient());
        assert_eq!(rebuilt.key.primes(), reference.primes());
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
