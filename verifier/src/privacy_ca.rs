//! The verifier as privacy CA: proof that an AIK lives in the TPM whose EK
//! the certificate names.
//!
//! Step 1 ([`challenge`]): check the EK certificate under the CTVM CA,
//! then encrypt to the certified EK a TPM_EK_BLOB (type
//! TPM_EK_TYPE_ACTIVATE) holding a fresh AES-128 session key and the
//! SHA-1 of the AIK's TPM_PUBKEY. Step 2: the guest's TPM_ActivateIdentity
//! decrypts it with the EK and releases the session key only if that AIK
//! is loaded in the same TPM; [`check_activation`] compares what came
//! back. Only the TPM holding both keys can answer.

use crate::tpm::{sha1, TpmPubKey};
use rsa::{BoxedUint, Oaep, PublicKey};
use sha1::Sha1;

/// TPM_TAG_EK_BLOB, TPM_EK_TYPE_ACTIVATE, TPM_TAG_EK_BLOB_ACTIVATE.
const TAG_EK_BLOB: u16 = 0x000c;
const EK_TYPE_ACTIVATE: u16 = 0x0001;
const TAG_EK_BLOB_ACTIVATE: u16 = 0x002b;
/// TPM_ALG_AES128, TPM_ES_SYM_CTR.
const ALG_AES128: u32 = 0x0000_0006;
const ES_SYM_CTR: u16 = 0x0004;

/// A challenge for TPM_ActivateIdentity.
#[derive(Clone, Debug)]
pub struct Challenge {
    /// The OAEP-encrypted TPM_EK_BLOB: ActivateIdentity's blob parameter.
    pub blob: Vec<u8>,
    /// The TPM_SYMMETRIC_KEY the TPM must give back; keep it secret.
    pub expected: Vec<u8>,
    /// The EK's modulus the certificate certifies.
    pub ek_modulus: Vec<u8>,
}

/// Step 1. `ca_modulus` is the CTVM CA's; `session_key` 16 fresh random
/// bytes; the OAEP padding draws from the OS.
pub fn challenge(
    ek_cert_der: &[u8],
    ca_modulus: &[u8],
    aik: &TpmPubKey,
    session_key: [u8; 16],
) -> Result<Challenge, String> {
    let ek_modulus = vtpm_trust::ekcert::verify_signed_by(ek_cert_der, ca_modulus)
        .map_err(|e| format!("the EK certificate does not verify under the CTVM CA ({e:?})"))?;
    let mut sym = ALG_AES128.to_be_bytes().to_vec();
    sym.extend_from_slice(&ES_SYM_CTR.to_be_bytes());
    sym.extend_from_slice(&16u16.to_be_bytes());
    sym.extend_from_slice(&session_key);
    let mut activate = TAG_EK_BLOB_ACTIVATE.to_be_bytes().to_vec();
    activate.extend_from_slice(&sym);
    activate.extend_from_slice(&sha1(&[&aik.tpm_pubkey]));
    // TPM_PCR_INFO_SHORT binding no PCRs, any locality.
    activate.extend_from_slice(&[0, 3, 0, 0, 0, 0x1f]);
    activate.extend_from_slice(&[0; 20]);
    let mut blob = TAG_EK_BLOB.to_be_bytes().to_vec();
    blob.extend_from_slice(&EK_TYPE_ACTIVATE.to_be_bytes());
    blob.extend_from_slice(&(activate.len() as u32).to_be_bytes());
    blob.extend_from_slice(&activate);
    let ek = PublicKey::new(BoxedUint::from_be_slice_vartime(&ek_modulus), BoxedUint::from(65537u32))
        .map_err(|e| format!("the certified EK is no RSA key: {e}"))?;
    let enc = ek
        .encrypt(&mut OsRng, Oaep::<Sha1>::new_with_label(&b"TCPA"[..]), &blob)
        .map_err(|e| format!("OAEP to the EK: {e}"))?;
    Ok(Challenge { blob: enc, expected: sym, ek_modulus })
}

/// Step 2: the TPM's answer (ActivateIdentity's output, a
/// TPM_SYMMETRIC_KEY) must be the session key sent.
pub fn check_activation(expected: &[u8], returned: &[u8]) -> Result<(), String> {
    if expected.len() == returned.len() && expected.iter().zip(returned).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 {
        Ok(())
    } else {
        Err("TPM_ActivateIdentity did not return the session key: the AIK is not in the certified TPM".into())
    }
}

/// Entropy from the OS (getrandom).
pub struct OsRng;

impl rsa::rand_core::TryRng for OsRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        getrandom::fill(dst).expect("getrandom(2)");
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for OsRng {}

/// 16 or 20 random bytes for a session key or a nonce.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("getrandom(2)");
    b
}
