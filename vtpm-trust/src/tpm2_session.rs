//! The cryptography of a TPM 2.0 salted session (TPM 2.0 Library, part 1,
//! §11.4.10 and §19–21): the salt sent to the chip's ECC storage key by
//! ECDH (KDFe), the session key (KDFa), AES-128-CFB parameter encryption,
//! and the HMACs over the command and the response, all with SHA-256.
//!
//! Why: the vTPM state key CTVM seals and unseals in the platform TPM
//! (`hypervisor::platform::tpm::tpm2`, which marshals the commands) would
//! otherwise cross the TPM's bus in the clear. It lives here rather than in
//! the hypervisor crate because the elliptic-curve and AES code it
//! instantiates needs the optimisation this crate is built with (see the
//! workspace's Cargo.toml) to compile for the soft-float bare-metal target. With the salt known only to CTVM and the
//! chip, a passive listener on the LPC/SPI bus sees ciphertext, and a
//! forged answer fails its HMAC.

use alloc::vec::Vec;

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

type HmacSha256 = hmac::Hmac<Sha256>;

/// KDFa (part 1, §11.4.10.2) with SHA-256: `bits / 8` bytes of
/// HMAC(key, [i] ‖ label ‖ 0 ‖ context_u ‖ context_v ‖ [bits]).
pub fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut i = 1u32;
    while out.len() < bytes {
        // An HMAC takes keys of any length.
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else { return Vec::new() };
        mac.update(&i.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        i += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (part 1, §11.4.10.3) with SHA-256: `bits / 8` bytes of
/// H([i] ‖ Z ‖ label ‖ 0 ‖ party_u ‖ party_v).
pub fn kdfe(z: &[u8], label: &[u8], party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut i = 1u32;
    while out.len() < bytes {
        let mut h = Sha256::new();
        h.update(i.to_be_bytes());
        h.update(z);
        h.update(label);
        h.update([0]);
        h.update(party_u);
        h.update(party_v);
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(bytes);
    out
}

/// The salt for a session whose `tpmKey` is the P-256 key (`x`, `y`):
/// `ephemeral` is CTVM's one-time secret scalar (big-endian). Returns the
/// salt and the `encryptedSalt` parameter (the ephemeral public point, a
/// TPMS_ECC_POINT). `None` when the chip's point is not on the curve or the
/// scalar is not one.
pub fn ecdh_salt(x: &[u8], y: &[u8], ephemeral: &[u8; 32]) -> Option<([u8; 32], Vec<u8>)> {
    use p256::elliptic_curve::point::AffineCoordinates;
    if x.len() != 32 || y.len() != 32 {
        return None;
    }
    let mut sec1 = [0u8; 65];
    sec1[0] = 4;
    sec1[1..33].copy_from_slice(x);
    sec1[33..].copy_from_slice(y);
    let theirs = p256::PublicKey::from_sec1_bytes(&sec1).ok()?;
    let scalar = Option::<p256::NonZeroScalar>::from(p256::NonZeroScalar::from_repr((*ephemeral).into()))?;
    let ours = p256::PublicKey::from_secret_scalar(&scalar);
    let shared = p256::elliptic_curve::ecdh::diffie_hellman(scalar, theirs.as_affine());
    let (ex, ey) = (ours.as_affine().x(), ours.as_affine().y());
    let mut salt = [0u8; 32];
    let mut derived = kdfe(shared.raw_secret_bytes(), b"SECRET", &ex, x, 256);
    salt.copy_from_slice(&derived);
    derived.zeroize();
    let mut point = Vec::with_capacity(68);
    for c in [&ex[..], &ey[..]] {
        point.extend_from_slice(&(c.len() as u16).to_be_bytes());
        point.extend_from_slice(c);
    }
    Some((salt, point))
}

/// The session key (part 1, §19.6.8): KDFa(salt, "ATH", nonceTPM, nonceCaller),
/// for an unbound session (no bind authValue).
pub fn session_key(salt: &[u8], nonce_tpm: &[u8], nonce_caller: &[u8]) -> Vec<u8> {
    kdfa(salt, b"ATH", nonce_tpm, nonce_caller, 256)
}

/// AES-128-CFB over `data` in place, with key and IV from
/// KDFa(hmac key, "CFB", nonceNewer, nonceOlder) (part 1, §21.4): for a
/// command nonceNewer is nonceCaller, for a response the new nonceTPM.
pub fn cfb(hmac_key: &[u8], nonce_newer: &[u8], nonce_older: &[u8], data: &mut [u8], encrypt: bool) {
    use aes::cipher::KeyIvInit;
    let mut kiv = kdfa(hmac_key, b"CFB", nonce_newer, nonce_older, 256);
    let (Some(key), Some(iv)) = (kiv.get(..16), kiv.get(16..32)) else { return };
    let (Ok(key), Ok(iv)) = (<[u8; 16]>::try_from(key), <[u8; 16]>::try_from(iv)) else { return };
    if encrypt {
        cfb_mode::Encryptor::<aes::Aes128>::new(&key.into(), &iv.into()).encrypt(data);
    } else {
        cfb_mode::Decryptor::<aes::Aes128>::new(&key.into(), &iv.into()).decrypt(data);
    }
    kiv.zeroize();
}

/// cpHash: H(commandCode ‖ the handles' names ‖ the parameters as sent).
pub fn cp_hash(code: u32, names: &[&[u8]], params: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(code.to_be_bytes());
    for n in names {
        h.update(n);
    }
    h.update(params);
    h.finalize().into()
}

/// rpHash: H(responseCode (0) ‖ commandCode ‖ the parameters as received).
pub fn rp_hash(code: u32, params: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(0u32.to_be_bytes());
    h.update(code.to_be_bytes());
    h.update(params);
    h.finalize().into()
}

/// The session HMAC (part 1, §19.6.5): HMAC(key, pHash ‖ nonceNewer ‖
/// nonceOlder ‖ attributes), nonceCaller first for a command, nonceTPM
/// first for a response.
pub fn session_hmac(key: &[u8], p_hash: &[u8], nonce_newer: &[u8], nonce_older: &[u8], attributes: u8) -> [u8; 32] {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else { return [0; 32] };
    mac.update(p_hash);
    mac.update(nonce_newer);
    mac.update(nonce_older);
    mac.update(&[attributes]);
    mac.finalize().into_bytes().into()
}

/// Compares a received HMAC with the expected one in constant time.
pub fn hmac_matches(expected: &[u8; 32], received: &[u8]) -> bool {
    if received.len() != 32 {
        return false;
    }
    expected.iter().zip(received).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// Known answers from libtpms: one seal and one unseal by this code against
/// swtpm 2.0 (its TCP channel captured), with the test's fixed secrets.
/// libtpms produced the responses (their HMACs and ciphertext), so these
/// check KDFe, KDFa, the CFB key/IV and the HMAC input orders against its
/// implementation, not against ours.
#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const KEY: &[u8; 32] = b"the vTPM state key, 32 bytes lng";
    /// The storage primary's point and name (from TPM2_CreatePrimary).
    const X: &str = "a570552a4e5c1f307b4c0685ea5b3a7301ae232ad2b7c9397401833286ff44e4";
    const Y: &str = "7cba3a9a85a587b989ce07c5fe7c183d95279b52da9892087d9eeb4e911bb66c";
    const PARENT_NAME: &str = "000ba41569511415a281a0ffad2334c05744109439b9d3ef4f1ed0360ea0e68f84db";
    /// The ephemeral scalar, nonceCaller of TPM2_StartAuthSession and of the command.
    const EPHEMERAL: &str = "e3783929a196ec9479a1b1a4abb0a19873bb2e588d00bd3f9e0bdc905f2023db";
    const NONCE_START: &str = "394781688bd0561b41835f5a0340962a6a15874f26c11902b4cea1fe96960548";
    const NONCE_COMMAND: &str = "0aecc477da520395eaa38c7add94c185098a04ac7afb52351ef44ec2007cbb25";
    /// TPM2_StartAuthSession (the same for both sessions) and the chip's answers.
    const START: &str = "8001000000830000017680000000400000070020394781688bd0561b41835f5a0340962a6a15874f26c11902b4cea1fe9696054800440020ea21f3c4c0441bd05a08b1d4c15fd071ea015e1530bc8cabc79cb24e7390969d00202efc915d7301420879d6f7b95489fc3998872e5f0f0ffca9bbda8ab49181a44601000600800043000b";
    const STARTED_SEAL: &str =
        "80010000003000000000020000000020a976dffb81b1f47f5fa3fff7f88f5f1dd60c27e6ddd46b9882e4d2178668886a";
    const STARTED_UNSEAL: &str =
        "80010000003000000000030000000020d62ba342206ce416346e86b1f2c4ac8f2b0525a934d580c39491455f01c24005";
    const CREATE: &str = "8002000000b70000015380000000000000490200000000200aecc477da520395eaa38c7add94c185098a04ac7afb52351ef44ec2007cbb252000206645586fde2eca5efdb9dae2aeac03f9e56353b99fecd7883017f74a471a49720024755ae6ca8f15ddaf2ff4fac44add24acb3394d47dc9f9ec7a209bbb02d3830cb18822feb002e0008000b000004120020c42fb681634f402509b7407939a8bbd9ce262a9d4db3e0a111b089867dfc70b800100000000000000000";
    const CREATED: &str = "80020000022200000000000001cf009e0020527efe8d1cba487c74d8ab23b8bcfac0696b80259d51a8105ee36cbcef1fade4001084ff9f24ed5efc41700aa25680206c75a2c93ba4694b085c0e945dbbb707f7caa03c943c3b70dc156d55011a1b1fab5e8b5d1be5d152b3a4866ede1539a8da2b4252b4a52a88c0cfc3e47fa9defa47aca7b9e12b7d26a7f3dcf8d32c2983b74a2839f230ce4311fd6996b7ec2df8f94597da14a39346aa910595004e0008000b000004120020c42fb681634f402509b7407939a8bbd9ce262a9d4db3e0a111b089867dfc70b8001000209493db0b94d0c729ec9e1995bef6534e2046cb8a3b95413c1f4107e90a0c6d330073000000000020e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85501000b0022000ba41569511415a281a0ffad2334c05744109439b9d3ef4f1ed0360ea0e68f84db0022000b4192f0938ee8c76b41561357494d794115260abdee68afb8f4be416c438b1d31000000206b84e3d94fdbe8e401bcf775baa71cba5fbddd2fb84ddc72f0e6bf8401b905448021400000010040f38e1e6332f178e88ec608d696e0599f136b8f638d6b1506e78411b91d47aa4d0c8080ca40a19597193cf32df6ae2c1840409381d57ee649b7c5ce6e4179e46f0020c52c6a36f648a3ef792ff3ba7d4c6e5284bc72d2946006d78aebc2c6694b5c39200020a9c2753492fb60b7965c8db5d7ed50e71ae793f2e565632a24d3d5331a554f1e";
    /// TPM2_Load's answer (the sealed object's name), TPM2_Unseal and its answer.
    const LOADED: &str = "80020000003b0000000080000001000000240022000b9e8560c9e5a3cdba3fddaac216713b7e4faa5a23bcc11fb881e02c2e624036290000010000";
    const UNSEAL: &str = "80020000005b0000015e80000001000000490300000000200aecc477da520395eaa38c7add94c185098a04ac7afb52351ef44ec2007cbb25400020d8ff95d9107a49134f265729fe24ee4a498f68b8bfb32e0a37a187868e86e720";
    const UNSEALED: &str = "800200000075000000000000002200208c8a70b57ca43fb913163a475f73349545c4f386db7d987074b9bf333c7e5d9e00201b3b2b25bdbd96682466928cca9805e2f62d3732748fff521c1f6004f65f68b940002078c2ec8162d16da3a1b9767669e81aab4ec56d1736dbaf3a8acaf87ad8d230fa";

    /// The session key of a session whose StartAuthSession answer is `started`.
    fn key_of(started: &str) -> Vec<u8> {
        let (salt, point) = ecdh_salt(&h(X), &h(Y), &h(EPHEMERAL).try_into().unwrap()).unwrap();
        // encryptedSalt: after the header, two handles and nonceCaller.
        let start = h(START);
        assert_eq!(start[52..54], [0, 68]);
        assert_eq!(start[54..122], point[..], "the ephemeral point as sent");
        session_key(&salt, &h(started)[16..48], &h(NONCE_START))
    }

    /// The response authorization area after `params_end`: (nonceTPM, attributes, hmac).
    fn response_auth(r: &[u8], params_end: usize) -> (&[u8], u8, &[u8]) {
        let nonce = &r[params_end + 2..params_end + 34];
        (nonce, r[params_end + 34], &r[params_end + 37..])
    }

    #[test]
    fn libtpms_unseal_answer_verifies_and_decrypts() {
        let key = key_of(STARTED_UNSEAL);
        let nonce_tpm = &h(STARTED_UNSEAL)[16..48];
        let name = &h(LOADED)[20..54];
        // The command HMAC libtpms accepted (attributes: encrypt).
        let unseal = h(UNSEAL);
        assert_eq!(unseal[56], 0x40);
        let hmac = session_hmac(&key, &cp_hash(0x15e, &[name], &[]), &h(NONCE_COMMAND), nonce_tpm, 0x40);
        assert_eq!(unseal[59..91], hmac);
        // The answer: its HMAC (nonceTPM first), then outData decrypted
        // with the response's nonce order.
        let r = h(UNSEALED);
        let params = &r[14..48];
        let (nonce, attributes, their) = response_auth(&r, 48);
        let want = session_hmac(&key, &rp_hash(0x15e, params), nonce, &h(NONCE_COMMAND), attributes);
        assert!(hmac_matches(&want, their));
        assert!(!hmac_matches(
            &session_hmac(&key, &rp_hash(0x15e, params), &h(NONCE_COMMAND), nonce, attributes),
            their
        ));
        assert_eq!(params[..2], [0, 32]);
        let mut data = params[2..].to_vec();
        assert_ne!(&data[..], KEY, "encrypted on the wire");
        cfb(&key, nonce, &h(NONCE_COMMAND), &mut data, false);
        assert_eq!(&data[..], KEY);
    }

    #[test]
    fn libtpms_create_took_the_encrypted_key_and_answered_with_a_good_hmac() {
        let key = key_of(STARTED_SEAL);
        let nonce_tpm = &h(STARTED_SEAL)[16..48];
        let create = h(CREATE);
        // Parameters after the header, the parent and the 0x49-byte auth area.
        let params = &create[91..];
        assert_eq!(create[56], 0x20, "decrypt");
        let hmac = session_hmac(&key, &cp_hash(0x153, &[&h(PARENT_NAME)], params), &h(NONCE_COMMAND), nonce_tpm, 0x20);
        assert_eq!(create[59..91], hmac);
        // inSensitive: a TPM2B whose body (empty userAuth, the data) is encrypted.
        assert_eq!(params[..2], [0, 36]);
        let mut sensitive = params[2..38].to_vec();
        cfb(&key, &h(NONCE_COMMAND), nonce_tpm, &mut sensitive, false);
        assert_eq!(sensitive[..4], [0, 0, 0, 32]);
        assert_eq!(&sensitive[4..], KEY);
        let mut again = sensitive.clone();
        cfb(&key, &h(NONCE_COMMAND), nonce_tpm, &mut again, true);
        assert_eq!(again, params[2..38]);
        let r = h(CREATED);
        let end = 14 + 0x1cf;
        let (nonce, attributes, their) = response_auth(&r, end);
        assert!(hmac_matches(
            &session_hmac(&key, &rp_hash(0x153, &r[14..end]), nonce, &h(NONCE_COMMAND), attributes),
            their
        ));
    }

    #[test]
    fn kdfs_give_the_lengths_asked_and_refuse_bad_points() {
        assert_eq!(kdfa(b"k", b"CFB", b"u", b"v", 256).len(), 32);
        assert_eq!(kdfa(b"k", b"CFB", b"u", b"v", 520).len(), 65);
        assert_eq!(kdfe(b"z", b"SECRET", b"u", b"v", 8).len(), 1);
        // The bits are part of the input: a shorter output is not a prefix.
        assert_ne!(kdfa(b"k", b"L", b"u", b"v", 128)[..], kdfa(b"k", b"L", b"u", b"v", 256)[..16]);
        // A point off the curve, a short coordinate, a zero scalar.
        let (x, mut y) = (h(X), h(Y));
        y[31] ^= 1;
        assert!(ecdh_salt(&x, &y, &[1; 32]).is_none());
        assert!(ecdh_salt(&x[1..], &h(Y), &[1; 32]).is_none());
        assert!(ecdh_salt(&x, &h(Y), &[0; 32]).is_none());
        assert!(ecdh_salt(&x, &h(Y), &[1; 32]).is_some());
        assert!(!hmac_matches(&[0; 32], &[0; 31]));
    }
}
