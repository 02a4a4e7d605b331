//! The EK certificate: what lets a remote party trust that an AIK lives in
//! a CTVM vTPM.
//!
//! Each host has a "CTVM vTPM CA": an RSA-2048 key derived
//! deterministically from the platform secret ([`CaKey::derive`]), so the
//! same host always has the same CA without storing it. It issues each
//! vTPM an X.509 v3 certificate for its EK ([`CaKey::issue_ek_certificate`])
//! after the TCG EK Credential Profile for TPM 1.2 where practical:
//!
//! * subject empty, identity in a critical subjectAltName directoryName
//!   holding tcg-at-tpmManufacturer (`id:4354564D`, "CTVM"),
//!   tcg-at-tpmModel (`vtpm-core`) and tcg-at-tpmVersion (`id:0102`, TPM
//!   1.2), plus an organizationalUnitName naming the guest;
//! * keyUsage keyEncipherment (critical), basicConstraints CA:false
//!   (critical), extendedKeyUsage tcg-kp-EKCertificate, the CA's
//!   authorityKeyIdentifier;
//! * the EK as rsaEncryption (the profile's id-RSAES-OAEP is not used:
//!   OpenSSL and most verifiers parse rsaEncryption only);
//! * sha256WithRSAEncryption; notBefore given by the caller, notAfter
//!   99991231235959Z (RFC 5280's "no well-defined expiration");
//! * the serial number: SHA-256 of the EK modulus, 16 bytes, positive.
//!
//! Issuance is deterministic: the same EK, guest and date give the same
//! bytes (PKCS#1 v1.5 signatures are deterministic).
//!
//! The certificate is stored in NV index [`EK_CERT_NV_INDEX`]
//! (TPM_NV_INDEX_EKCert) in the PC Client TCG_PCCLIENT_STORED_CERT
//! format ([`nv_stored_cert`]), where TrouSerS-based tools and
//! `tpm_nvread` find it, readable by anyone (no read attribute) and
//! writable only by the owner, in full ([`EK_CERT_NV_ATTRIBUTES`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::str::FromStr;
use core::time::Duration;
use der::asn1::{Any, BitString, ObjectIdentifier, OctetString, UintRef, UtcTime};
use der::{Decode, Encode, Sequence};
use hkdf::Hkdf;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rsa::traits::PublicKeyParts;
use rsa::{BoxedUint, Pkcs1v15Sign, PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

/// TPM_NV_INDEX_EKCert.
pub const EK_CERT_NV_INDEX: u32 = 0x1000_f000;
/// TPM_NV_PER_OWNERWRITE | TPM_NV_PER_WRITEALL: the owner may replace the
/// whole certificate; reading needs no authorisation (as the PC Client
/// specification asks for the EK certificate).
pub const EK_CERT_NV_ATTRIBUTES: u32 = 0x0000_0002 | 0x0000_1000;
/// TCG_TAG_PCCLIENT_STORED_CERT.
pub const TAG_STORED_CERT: u16 = 0x1001;
/// TCG_TAG_PCCLIENT_FULL_CERT.
pub const TAG_FULL_CERT: u16 = 0x1002;
/// TCG_FULL_CERT.
pub const FULL_CERT: u8 = 0;

/// The CA's distinguished name.
pub const CA_NAME: &str = "CN=CTVM vTPM CA,O=CTVM";
/// TPM manufacturer id in the certificate: "CTVM" in hex.
pub const TPM_MANUFACTURER: &str = "id:4354564D";
pub const TPM_MODEL: &str = "vtpm-core";
pub const TPM_VERSION: &str = "id:0102";

const RSA_BITS: usize = 2048;
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_TPM_MANUFACTURER: &str = "2.23.133.2.1";
const OID_TPM_MODEL: &str = "2.23.133.2.2";
const OID_TPM_VERSION: &str = "2.23.133.2.3";
const OID_EK_CERTIFICATE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.8.1");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_SAN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const OID_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_AKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
const OID_SKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");

/// Why a certificate could not be made or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertError {
    /// The EK is not a 2048-bit RSA modulus.
    BadKey,
    /// The guest name does not fit a directory string.
    BadName,
    /// An encoding step failed (a bug).
    Encoding,
    /// The CA's signature failed (a bug).
    Signing,
    /// NV data that is not a TCG_PCCLIENT_STORED_CERT full certificate.
    BadStoredCert,
}

/// TBSCertificate (RFC 5280 4.1), with the fields CTVM fills.
#[derive(Clone, Debug, Sequence)]
struct Tbs {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: u8,
    serial_number: SerialNumber,
    signature: AlgorithmIdentifierOwned,
    issuer: Name,
    validity: Validity,
    subject: Name,
    subject_public_key_info: SubjectPublicKeyInfoOwned,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

/// Certificate (RFC 5280 4.1).
#[derive(Clone, Debug, Sequence)]
struct Cert {
    tbs: Tbs,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

/// RSAPublicKey (PKCS #1).
#[derive(Sequence)]
struct RsaPub<'a> {
    n: UintRef<'a>,
    e: UintRef<'a>,
}

fn null_params(oid: ObjectIdentifier) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned { oid, parameters: Some(Any::null()) }
}

/// SubjectPublicKeyInfo of an RSA key (rsaEncryption, e = 65537).
fn rsa_spki(modulus: &[u8]) -> Result<SubjectPublicKeyInfoOwned, CertError> {
    let e = [0x01, 0x00, 0x01];
    let key = RsaPub {
        n: UintRef::new(modulus).map_err(|_| CertError::BadKey)?,
        e: UintRef::new(&e).map_err(|_| CertError::Encoding)?,
    };
    let der = key.to_der().map_err(|_| CertError::Encoding)?;
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: null_params(OID_RSA_ENCRYPTION),
        subject_public_key: BitString::from_bytes(&der).map_err(|_| CertError::Encoding)?,
    })
}

fn extension(oid: ObjectIdentifier, critical: bool, value: &impl Encode) -> Result<Extension, CertError> {
    let der = value.to_der().map_err(|_| CertError::Encoding)?;
    Ok(Extension { extn_id: oid, critical, extn_value: OctetString::new(der).map_err(|_| CertError::Encoding)? })
}

fn not_before(unix_seconds: u64) -> Result<Time, CertError> {
    let t = UtcTime::from_unix_duration(Duration::from_secs(unix_seconds)).map_err(|_| CertError::Encoding)?;
    Ok(Time::UtcTime(t))
}

/// A positive 16-byte serial number from a digest.
fn serial_from(digest: &[u8]) -> Result<SerialNumber, CertError> {
    let mut s = [0u8; 16];
    s.copy_from_slice(digest.get(..16).ok_or(CertError::Encoding)?);
    s[0] = (s[0] & 0x7f) | 0x40;
    SerialNumber::new(&s).map_err(|_| CertError::Encoding)
}

/// The per-host CA key.
pub struct CaKey {
    key: PrivateKey,
    modulus: Vec<u8>,
}

impl CaKey {
    /// The CA of the host whose platform secret this is: an RSA-2048 key
    /// generated from a ChaCha20 stream seeded with HKDF-SHA256(salt =
    /// "CTVM vTPM CA v1", ikm = secret, info = "rsa-2048"). The same
    /// secret and the same `rsa` crate version give the same key (the
    /// prime search is the crate's: a change of version may change it;
    /// Cargo.lock pins it).
    pub fn derive(platform_secret: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"CTVM vTPM CA v1"), platform_secret);
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        let _ = hk.expand(b"rsa-2048", seed.as_mut());
        let mut rng = ChaCha20Rng::from_seed(*seed);
        // Generation fails only for unsupported sizes; 2048 is supported.
        let key = loop {
            if let Ok(k) = PrivateKey::new(&mut rng, RSA_BITS) {
                break k;
            }
        };
        let modulus = key.n_bytes().to_vec();
        CaKey { key, modulus }
    }

    /// The CA's modulus (256 bytes, big-endian; the exponent is 65537).
    pub fn modulus(&self) -> &[u8] {
        &self.modulus
    }

    /// The CA's SubjectPublicKeyInfo, DER: what a verifier is given.
    pub fn public_key_der(&self) -> Vec<u8> {
        rsa_spki(&self.modulus).and_then(|s| s.to_der().map_err(|_| CertError::Encoding)).unwrap_or_default()
    }

    /// The key identifier: SHA-1 of the RSAPublicKey (RFC 5280 4.2.1.2 (1)).
    fn key_id(&self) -> Result<OctetString, CertError> {
        let spki = rsa_spki(&self.modulus)?;
        let digest = sha1_bytes(spki.subject_public_key.raw_bytes());
        OctetString::new(digest.to_vec()).map_err(|_| CertError::Encoding)
    }

    fn name() -> Result<Name, CertError> {
        Name::from_str(CA_NAME).map_err(|_| CertError::Encoding)
    }

    fn sign(&self, tbs: Tbs) -> Result<Vec<u8>, CertError> {
        let tbs_der = tbs.to_der().map_err(|_| CertError::Encoding)?;
        let digest = Sha256::digest(&tbs_der);
        // A deterministic stream for blinding: it changes nothing in the
        // PKCS#1 v1.5 signature, only hides timing.
        let mut rng = ChaCha20Rng::from_seed(Sha256::digest([&digest[..], b"blinding"].concat()).into());
        let sig =
            self.key.sign_with_rng(&mut rng, Pkcs1v15Sign::new::<Sha256>(), &digest).map_err(|_| CertError::Signing)?;
        let cert = Cert {
            tbs,
            algorithm: null_params(OID_SHA256_WITH_RSA),
            signature: BitString::from_bytes(&sig).map_err(|_| CertError::Encoding)?,
        };
        cert.to_der().map_err(|_| CertError::Encoding)
    }

    /// The CA's self-signed certificate (CA:true, keyCertSign), for
    /// verifiers and `openssl verify`.
    pub fn certificate(&self, not_before_unix: u64) -> Result<Vec<u8>, CertError> {
        let serial = serial_from(&Sha256::digest(&self.modulus))?;
        let ski = SubjectKeyIdentifier(self.key_id()?);
        let tbs = Tbs {
            version: 2,
            serial_number: serial,
            signature: null_params(OID_SHA256_WITH_RSA),
            issuer: Self::name()?,
            validity: Validity::new(not_before(not_before_unix)?, Time::INFINITY),
            subject: Self::name()?,
            subject_public_key_info: rsa_spki(&self.modulus)?,
            extensions: alloc::vec![
                extension(OID_BASIC_CONSTRAINTS, true, &BasicConstraints { ca: true, path_len_constraint: Some(0) })?,
                extension(OID_KEY_USAGE, true, &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))?,
                extension(OID_SKI, false, &ski)?,
            ],
        };
        self.sign(tbs)
    }

    /// Issues the EK certificate of `guest`'s vTPM, whose EK modulus is
    /// `ek_modulus` (256 bytes, as TPM_PUBKEY carries it).
    pub fn issue_ek_certificate(
        &self,
        ek_modulus: &[u8],
        guest: &str,
        not_before_unix: u64,
    ) -> Result<Vec<u8>, CertError> {
        if ek_modulus.len() != RSA_BITS / 8 || ek_modulus.first().is_none_or(|b| b & 0x80 == 0) {
            return Err(CertError::BadKey);
        }
        if guest.is_empty() || guest.len() > 64 || guest.contains([',', '+', '=', '\\', '"', '<', '>', ';', '#']) {
            return Err(CertError::BadName);
        }
        let tpm = alloc::format!(
            "{OID_TPM_VERSION}={TPM_VERSION},{OID_TPM_MODEL}={TPM_MODEL},{OID_TPM_MANUFACTURER}={TPM_MANUFACTURER},OU={guest}"
        );
        let tpm = Name::from_str(&tpm).map_err(|_| CertError::BadName)?;
        let san = SubjectAltName(alloc::vec![GeneralName::DirectoryName(tpm)]);
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(self.key_id()?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        let tbs = Tbs {
            version: 2,
            serial_number: serial_from(&Sha256::digest(ek_modulus))?,
            signature: null_params(OID_SHA256_WITH_RSA),
            issuer: Self::name()?,
            validity: Validity::new(not_before(not_before_unix)?, Time::INFINITY),
            subject: Name::default(),
            subject_public_key_info: rsa_spki(ek_modulus)?,
            extensions: alloc::vec![
                extension(OID_BASIC_CONSTRAINTS, true, &BasicConstraints { ca: false, path_len_constraint: None })?,
                extension(OID_KEY_USAGE, true, &KeyUsage(KeyUsages::KeyEncipherment.into()))?,
                extension(OID_SAN, true, &san)?,
                extension(OID_EKU, false, &ExtendedKeyUsage(alloc::vec![OID_EK_CERTIFICATE]))?,
                extension(OID_AKI, false, &aki)?,
            ],
        };
        self.sign(tbs)
    }
}

fn sha1_bytes(data: &[u8]) -> [u8; 20] {
    use sha1::Sha1;
    Sha1::digest(data).into()
}

/// The certificate in TCG_PCCLIENT_STORED_CERT form (PC Client
/// Implementation Specification 1.21, 7.4.5): tag 0x1001, certType
/// TCG_FULL_CERT (0), certSize (u16, covering what follows), then
/// TCG_FULL_CERT: tag 0x1002 and the DER.
pub fn nv_stored_cert(der: &[u8]) -> Result<Vec<u8>, CertError> {
    let size = u16::try_from(der.len().checked_add(2).ok_or(CertError::Encoding)?).map_err(|_| CertError::Encoding)?;
    let mut v = Vec::with_capacity(7 + der.len());
    v.extend_from_slice(&TAG_STORED_CERT.to_be_bytes());
    v.push(FULL_CERT);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&TAG_FULL_CERT.to_be_bytes());
    v.extend_from_slice(der);
    Ok(v)
}

/// The DER certificate inside NV data written by [`nv_stored_cert`]
/// (trailing bytes, as a larger NV area leaves them, are ignored).
pub fn parse_nv_stored_cert(nv: &[u8]) -> Result<&[u8], CertError> {
    let bad = CertError::BadStoredCert;
    let head = nv.get(..7).ok_or(bad)?;
    if head[..2] != TAG_STORED_CERT.to_be_bytes() || head[2] != FULL_CERT || head[5..7] != TAG_FULL_CERT.to_be_bytes() {
        return Err(bad);
    }
    let size = usize::from(u16::from_be_bytes([head[3], head[4]]));
    let end = 5usize.checked_add(size).ok_or(bad)?;
    nv.get(7..end).ok_or(bad)
}

/// Checks that `cert_der` is signed by the RSA key `ca_modulus` (e =
/// 65537) with sha256WithRSAEncryption, and returns the certified public
/// key's modulus. For the verifier and the tests; it does not check dates
/// or extensions.
pub fn verify_signed_by(cert_der: &[u8], ca_modulus: &[u8]) -> Result<Vec<u8>, CertError> {
    let cert = x509_cert::Certificate::from_der(cert_der).map_err(|_| CertError::Encoding)?;
    if cert.signature_algorithm().oid != OID_SHA256_WITH_RSA {
        return Err(CertError::Signing);
    }
    let tbs = cert.tbs_certificate().to_der().map_err(|_| CertError::Encoding)?;
    let n = BoxedUint::from_be_slice_vartime(ca_modulus);
    let ca = PublicKey::new(n, BoxedUint::from(65537u32)).map_err(|_| CertError::BadKey)?;
    let sig = cert.signature().as_bytes().ok_or(CertError::Encoding)?;
    ca.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(&tbs), sig).map_err(|_| CertError::Signing)?;
    let spki = cert.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != OID_RSA_ENCRYPTION {
        return Err(CertError::BadKey);
    }
    let key = rsa_modulus(spki.subject_public_key.raw_bytes())?;
    Ok(key)
}

/// The modulus of a DER RSAPublicKey, without leading zeros.
pub fn rsa_modulus(rsa_public_key_der: &[u8]) -> Result<Vec<u8>, CertError> {
    let key = RsaPubOwned::from_der(rsa_public_key_der).map_err(|_| CertError::BadKey)?;
    Ok(key.n.as_bytes().to_vec())
}

#[derive(Sequence)]
struct RsaPubOwned {
    n: der::asn1::Uint,
    e: der::asn1::Uint,
}

/// The CA's modulus from its SubjectPublicKeyInfo DER or its certificate
/// DER (what a verifier is handed).
pub fn ca_modulus_from_der(der_bytes: &[u8]) -> Result<Vec<u8>, CertError> {
    if let Ok(spki) = SubjectPublicKeyInfoOwned::from_der(der_bytes) {
        return rsa_modulus(spki.subject_public_key.raw_bytes());
    }
    let cert = x509_cert::Certificate::from_der(der_bytes).map_err(|_| CertError::Encoding)?;
    rsa_modulus(cert.tbs_certificate().subject_public_key_info().subject_public_key.raw_bytes())
}

/// The guest name an EK certificate carries (its SAN's OU), for reports.
pub fn guest_of(cert_der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let ext = cert.tbs_certificate().extensions()?.iter().find(|e| e.extn_id == OID_SAN)?;
    let san = SubjectAltName::from_der(ext.extn_value.as_bytes()).ok()?;
    san.0.iter().find_map(|g| match g {
        GeneralName::DirectoryName(n) => n.organization_unit().ok().flatten().map(String::from),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_cert::Certificate;

    extern crate std;
    use alloc::format;

    /// The CA of a fixed secret, and an "EK" modulus (another derived key's).
    fn fixtures() -> &'static (CaKey, Vec<u8>) {
        static F: std::sync::OnceLock<(CaKey, Vec<u8>)> = std::sync::OnceLock::new();
        F.get_or_init(|| (CaKey::derive(&[1; 32]), CaKey::derive(&[2; 32]).modulus().to_vec()))
    }

    #[test]
    fn the_ca_follows_the_platform_secret() {
        let (ca, _) = fixtures();
        assert_eq!(CaKey::derive(&[1; 32]).modulus(), ca.modulus(), "same host, same CA");
        assert_ne!(CaKey::derive(&[3; 32]).modulus(), ca.modulus(), "another secret, another CA");
        assert_eq!(ca.modulus().len(), 256);
    }

    #[test]
    fn the_ek_certificate_parses_and_verifies_under_the_ca() {
        let (ca, ek) = fixtures();
        let der = ca.issue_ek_certificate(ek, "alpha", 1_767_225_600).unwrap();
        let cert = Certificate::from_der(&der).unwrap();
        let tbs = cert.tbs_certificate();
        assert_eq!(tbs.version(), x509_cert::certificate::Version::V3);
        assert!(tbs.subject().is_empty(), "TCG profile: empty subject");
        assert_eq!(format!("{}", tbs.issuer()), CA_NAME);
        let exts = tbs.extensions().unwrap();
        let find = |oid| exts.iter().find(|e| e.extn_id == oid).unwrap();
        let bc = BasicConstraints::from_der(find(OID_BASIC_CONSTRAINTS).extn_value.as_bytes()).unwrap();
        assert!(!bc.ca && find(OID_BASIC_CONSTRAINTS).critical);
        let ku = KeyUsage::from_der(find(OID_KEY_USAGE).extn_value.as_bytes()).unwrap();
        assert!(ku.key_encipherment() && !ku.digital_signature() && find(OID_KEY_USAGE).critical);
        assert!(find(OID_SAN).critical, "SAN critical with an empty subject");
        let eku = ExtendedKeyUsage::from_der(find(OID_EKU).extn_value.as_bytes()).unwrap();
        assert_eq!(eku.0, [OID_EK_CERTIFICATE]);
        assert_eq!(guest_of(&der).as_deref(), Some("alpha"));
        // The signature verifies under the CA, and the certified key is the EK.
        assert_eq!(verify_signed_by(&der, ca.modulus()).unwrap(), *ek);
        assert_eq!(verify_signed_by(&der, ek), Err(CertError::Signing), "not under another key");
        let mut tampered = der.clone();
        let at = der.windows(5).position(|w| w == b"alpha").unwrap();
        tampered[at] = b'A';
        assert_eq!(verify_signed_by(&tampered, ca.modulus()), Err(CertError::Signing));
        // Deterministic: the same inputs give the same bytes.
        assert_eq!(ca.issue_ek_certificate(ek, "alpha", 1_767_225_600).unwrap(), der);
    }

    #[test]
    fn the_ca_certificate_is_self_signed_and_a_ca() {
        let (ca, _) = fixtures();
        let der = ca.certificate(1_767_225_600).unwrap();
        assert_eq!(verify_signed_by(&der, ca.modulus()).unwrap(), ca.modulus());
        assert_eq!(ca_modulus_from_der(&der).unwrap(), ca.modulus());
        assert_eq!(ca_modulus_from_der(&ca.public_key_der()).unwrap(), ca.modulus());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (ca, ek) = fixtures();
        assert_eq!(ca.issue_ek_certificate(&ek[1..], "alpha", 0), Err(CertError::BadKey));
        assert_eq!(ca.issue_ek_certificate(ek, "a,b", 0), Err(CertError::BadName));
        assert_eq!(ca.issue_ek_certificate(ek, "", 0), Err(CertError::BadName));
    }

    #[test]
    fn nv_format_is_tcg_pcclient_stored_cert() {
        let der = [0x30, 0x03, 0x02, 0x01, 0x05];
        let nv = nv_stored_cert(&der).unwrap();
        assert_eq!(nv, [0x10, 0x01, 0x00, 0x00, 0x07, 0x10, 0x02, 0x30, 0x03, 0x02, 0x01, 0x05]);
        assert_eq!(parse_nv_stored_cert(&nv).unwrap(), der);
        let mut padded = nv.clone();
        padded.extend_from_slice(&[0xff; 9]);
        assert_eq!(parse_nv_stored_cert(&padded).unwrap(), der, "an NV area larger than the cert");
        assert_eq!(parse_nv_stored_cert(&nv[..nv.len() - 1]), Err(CertError::BadStoredCert));
        let mut partial = nv.clone();
        partial[2] = 1;
        assert_eq!(parse_nv_stored_cert(&partial), Err(CertError::BadStoredCert), "TCG_PARTIAL_SMALL_CERT");
    }
}
