//! TPM_KEY / TPM_KEY12, their public parts, PCR_INFO variants, and the
//! wrapping of private parts (TPM_STORE_ASYMKEY under a parent's OAEP key).

use crate::consts::*;
use crate::crypto::{self, Drbg, RsaKey, RSA_BITS, RSA_BYTES};
use crate::marshal::{Put, Reader, TpmResult};
use crate::pcr::{locality_bit, PcrBank, PcrSelection};
use crate::secret::Secret;
use alloc::vec::Vec;

/// TPM_KEY_PARMS for an RSA key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyParms {
    pub alg: u32,
    pub enc_scheme: u16,
    pub sig_scheme: u16,
    pub key_bits: u32,
    pub num_primes: u32,
    /// Public exponent as sent; empty means the default 65537.
    pub exponent: Vec<u8>,
}

impl KeyParms {
    /// The parameters of a 2048-bit key with default exponent.
    pub fn rsa2048(enc_scheme: u16, sig_scheme: u16) -> Self {
        KeyParms {
            alg: ALG_RSA,
            enc_scheme,
            sig_scheme,
            key_bits: RSA_BITS as u32,
            num_primes: 2,
            exponent: Vec::new(),
        }
    }

    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        let alg = r.u32()?;
        let enc_scheme = r.u16()?;
        let sig_scheme = r.u16()?;
        // libtpms rejects the algorithm before reading its parameters.
        if alg != ALG_RSA {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        let parms = r.sized32()?;
        let mut p = Reader::new(parms);
        let key_bits = p.u32()?;
        let num_primes = p.u32()?;
        let exponent = p.sized32()?.to_vec();
        p.finish()?;
        Ok(KeyParms { alg, enc_scheme, sig_scheme, key_bits, num_primes, exponent })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u32(self.alg);
        out.put_u16(self.enc_scheme);
        out.put_u16(self.sig_scheme);
        out.put_u32((self.exponent.len() as u32).saturating_add(12));
        out.put_u32(self.key_bits);
        out.put_u32(self.num_primes);
        out.put_sized32(&self.exponent);
    }

    /// This engine makes and uses only 2048-bit two-prime keys with e=65537.
    pub fn check_supported(&self) -> TpmResult<()> {
        let default_exp = self.exponent.is_empty() || self.exponent == [1, 0, 1];
        if self.key_bits != RSA_BITS as u32 || self.num_primes != 2 || !default_exp {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        Ok(())
    }
}

/// TPM_PCR_INFO (v1.1 structures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrInfo {
    pub selection: PcrSelection,
    pub at_release: [u8; 20],
    pub at_creation: [u8; 20],
}

/// TPM_PCR_INFO_LONG (v1.2 structures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrInfoLong {
    pub locality_at_creation: u8,
    pub locality_at_release: u8,
    pub creation_selection: PcrSelection,
    pub release_selection: PcrSelection,
    pub at_creation: [u8; 20],
    pub at_release: [u8; 20],
}

/// TPM_PCR_INFO_SHORT.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PcrInfoShort {
    pub selection: PcrSelection,
    pub locality_at_release: u8,
    pub at_release: [u8; 20],
}

/// PCR binding of a key or sealed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PcrBinding {
    None,
    V11(PcrInfo),
    Long(PcrInfoLong),
}

impl PcrInfo {
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        Ok(PcrInfo { selection: PcrSelection::read(r)?, at_release: r.digest()?, at_creation: r.digest()? })
    }
    pub fn write(&self, out: &mut Vec<u8>) {
        self.selection.write(out);
        out.put(&self.at_release);
        out.put(&self.at_creation);
    }
}

impl PcrInfoLong {
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        if r.u16()? != TAG_PCR_INFO_LONG {
            return Err(TPM_INVALID_PCR_INFO);
        }
        Ok(PcrInfoLong {
            locality_at_creation: r.u8()?,
            locality_at_release: r.u8()?,
            creation_selection: PcrSelection::read(r)?,
            release_selection: PcrSelection::read(r)?,
            at_creation: r.digest()?,
            at_release: r.digest()?,
        })
    }
    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u16(TAG_PCR_INFO_LONG);
        out.put_u8(self.locality_at_creation);
        out.put_u8(self.locality_at_release);
        self.creation_selection.write(out);
        self.release_selection.write(out);
        out.put(&self.at_creation);
        out.put(&self.at_release);
    }
}

impl PcrInfoShort {
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        Ok(PcrInfoShort { selection: PcrSelection::read(r)?, locality_at_release: r.u8()?, at_release: r.digest()? })
    }
    pub fn write(&self, out: &mut Vec<u8>) {
        self.selection.write(out);
        out.put_u8(self.locality_at_release);
        out.put(&self.at_release);
    }

    /// Checks the PCRs and locality against this release condition.
    /// libtpms: an empty selection skips the digest check; a
    /// localityAtRelease of 0 is invalid.
    pub fn check(&self, pcrs: &PcrBank, locality: u8) -> TpmResult<()> {
        if self.locality_at_release & 0x1F == 0 || self.locality_at_release & 0xE0 != 0 {
            return Err(TPM_INVALID_PCR_INFO);
        }
        if self.locality_at_release & locality_bit(locality)? == 0 {
            return Err(TPM_BAD_LOCALITY);
        }
        if !self.selection.is_empty() && pcrs.composite_hash(&self.selection) != self.at_release {
            return Err(TPM_WRONGPCRVAL);
        }
        Ok(())
    }
}

impl PcrBinding {
    /// Parses the PCR info of a v1.1 (`long == false`) or v1.2 structure
    /// from its sized field.
    pub fn read_sized(r: &mut Reader<'_>, long: bool) -> TpmResult<Self> {
        let raw = r.sized32()?;
        Self::parse(raw, long)
    }

    pub fn parse(raw: &[u8], long: bool) -> TpmResult<Self> {
        if raw.is_empty() {
            return Ok(PcrBinding::None);
        }
        let mut p = Reader::new(raw);
        let b =
            if long { PcrBinding::Long(PcrInfoLong::read(&mut p)?) } else { PcrBinding::V11(PcrInfo::read(&mut p)?) };
        p.finish()?;
        Ok(b)
    }

    /// Writes the u32 size and the structure.
    pub fn write_sized(&self, out: &mut Vec<u8>) {
        let mut v = Vec::new();
        match self {
            PcrBinding::None => {}
            PcrBinding::V11(i) => i.write(&mut v),
            PcrBinding::Long(i) => i.write(&mut v),
        }
        out.put_sized32(&v);
    }

    /// Fills in the creation fields from the current PCRs and locality, as
    /// the TPM does when it makes a key or seals.
    pub fn stamp_creation(&mut self, pcrs: &PcrBank, locality: u8) -> TpmResult<()> {
        match self {
            PcrBinding::None => {}
            PcrBinding::V11(i) => i.at_creation = pcrs.composite_hash(&i.selection),
            PcrBinding::Long(i) => {
                if i.locality_at_release & 0x1F == 0 || i.locality_at_release & 0xE0 != 0 {
                    return Err(TPM_INVALID_PCR_INFO);
                }
                i.locality_at_creation = locality_bit(locality)?;
                i.at_creation = pcrs.composite_hash(&i.creation_selection);
            }
        }
        Ok(())
    }

    /// Checks the release condition.
    pub fn check_release(&self, pcrs: &PcrBank, locality: u8) -> TpmResult<()> {
        match self {
            PcrBinding::None => Ok(()),
            PcrBinding::V11(i) => {
                if !i.selection.is_empty() && pcrs.composite_hash(&i.selection) != i.at_release {
                    return Err(TPM_WRONGPCRVAL);
                }
                Ok(())
            }
            PcrBinding::Long(i) => {
                if i.locality_at_release & locality_bit(locality)? == 0 {
                    return Err(TPM_BAD_LOCALITY);
                }
                if !i.release_selection.is_empty() && pcrs.composite_hash(&i.release_selection) != i.at_release {
                    return Err(TPM_WRONGPCRVAL);
                }
                Ok(())
            }
        }
    }
}

/// Which key structure a key arrived in, so it leaves in the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// TPM_KEY, with its TPM_STRUCT_VER bytes.
    V11([u8; 4]),
    /// TPM_KEY12 (tag 0x0028).
    V12,
}

/// The public part of a TPM_KEY.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPublic {
    pub format: KeyFormat,
    pub usage: u16,
    pub flags: u32,
    pub auth_usage: u8,
    pub parms: KeyParms,
    pub pcr: PcrBinding,
    /// The modulus (empty in templates).
    pub modulus: Vec<u8>,
}

/// A whole TPM_KEY: public part and encrypted private part.
#[derive(Clone, Debug)]
pub struct KeyBlob {
    pub public: KeyPublic,
    pub enc_data: Vec<u8>,
}

impl KeyBlob {
    /// Parses a TPM_KEY or TPM_KEY12.
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        let public = KeyPublic::read(r)?;
        let enc_data = r.sized32()?.to_vec();
        Ok(KeyBlob { public, enc_data })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        self.public.write(out);
        out.put_sized32(&self.enc_data);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(600);
        self.write(&mut v);
        v
    }
}

impl KeyPublic {
    /// Parses a TPM_KEY or TPM_KEY12 up to and including pubKey.
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        // As libtpms' TPM_Key_LoadPubData: a non-zero first byte is a
        // TPM_KEY whose version must be 1.1 (TPM_BAD_VERSION; the revision
        // bytes are free), a zero one a TPM_KEY12 with tag 0x0028 and fill
        // 0 (TPM_BAD_KEY_PROPERTY).
        let head = r.array::<4>()?;
        let format = if head[0] != 0 {
            if head[..2] != [1, 1] {
                return Err(TPM_BAD_VERSION);
            }
            KeyFormat::V11(head)
        } else {
            if head[..2] != TAG_KEY12.to_be_bytes() || head[2..] != [0, 0] {
                return Err(TPM_BAD_KEY_PROPERTY);
            }
            KeyFormat::V12
        };
        let usage = r.u16()?;
        let flags = r.u32()?;
        // libtpms refuses undefined flag bits while parsing (TPM_KeyFlags_Load).
        if flags & !KEY_FLAGS_MASK != 0 {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        let auth_usage = r.u8()?;
        let parms = KeyParms::read(r)?;
        let pcr = PcrBinding::read_sized(r, format == KeyFormat::V12)?;
        let modulus = r.sized32()?.to_vec();
        Ok(KeyPublic { format, usage, flags, auth_usage, parms, pcr, modulus })
    }

    /// Everything of TPM_KEY up to and including pubKey.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self.format {
            KeyFormat::V11(v) => out.put(&v),
            KeyFormat::V12 => {
                out.put_u16(TAG_KEY12);
                out.put_u16(0);
            }
        }
        out.put_u16(self.usage);
        out.put_u32(self.flags);
        out.put_u8(self.auth_usage);
        self.parms.write(out);
        self.pcr.write_sized(out);
        out.put_sized32(&self.modulus);
    }

    /// pubDataDigest: SHA-1 of the public part.
    pub fn digest(&self) -> [u8; 20] {
        let mut v = Vec::with_capacity(400);
        self.write(&mut v);
        crypto::sha1(&v)
    }

    /// TPM_PUBKEY: parameters and modulus.
    pub fn write_pubkey(&self, out: &mut Vec<u8>) {
        self.parms.write(out);
        out.put_sized32(&self.modulus);
    }

    pub fn pubkey_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(300);
        self.write_pubkey(&mut v);
        v
    }

    pub fn is_migratable(&self) -> bool {
        self.flags & KEYFLAG_MIGRATABLE != 0
    }

    /// Checks a key's usage and schemes against what this TPM makes and
    /// uses, as libtpms' TPM_Key_CheckProperties: every refusal is
    /// TPM_BAD_KEY_PROPERTY (an unknown usage included). Callers then apply
    /// their own usage rules (TPM_INVALID_KEYUSAGE), e.g. refusing
    /// TPM_KEY_IDENTITY in CreateWrapKey.
    pub fn check_template(&self) -> TpmResult<()> {
        self.parms.check_supported()?;
        // Redirected output is not implemented (libtpms accepts the flag).
        if self.flags & KEYFLAG_REDIRECTION != 0 {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        if !matches!(self.auth_usage, AUTH_NEVER | AUTH_ALWAYS | AUTH_PRIV_USE_ONLY) {
            return Err(TPM_INVALID_STRUCTURE);
        }
        let (enc, sig) = (self.parms.enc_scheme, self.parms.sig_scheme);
        let ok = match self.usage {
            KEY_STORAGE | KEY_MIGRATE | KEY_AUTHCHANGE => enc == ES_RSAESOAEP_SHA1_MGF1 && sig == SS_NONE,
            KEY_SIGNING => {
                enc == ES_NONE && matches!(sig, SS_RSASSAPKCS1V15_SHA1 | SS_RSASSAPKCS1V15_DER | SS_RSASSAPKCS1V15_INFO)
            }
            KEY_IDENTITY => enc == ES_NONE && sig == SS_RSASSAPKCS1V15_SHA1,
            KEY_BIND => matches!(enc, ES_RSAESOAEP_SHA1_MGF1 | ES_RSAESPKCSV15) && sig == SS_NONE,
            KEY_LEGACY => {
                matches!(enc, ES_RSAESOAEP_SHA1_MGF1 | ES_RSAESPKCSV15)
                    && matches!(sig, SS_RSASSAPKCS1V15_SHA1 | SS_RSASSAPKCS1V15_DER)
            }
            _ => false,
        };
        if !ok {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        Ok(())
    }
}

/// A key the TPM holds: public part, secrets and the RSA key itself.
#[derive(Clone, Debug)]
pub struct Key {
    pub public: KeyPublic,
    pub usage_auth: Secret,
    pub migration_auth: Secret,
    pub rsa: RsaKey,
}

/// Size of TPM_STORE_ASYMKEY for a 2048-bit key.
const STORE_ASYMKEY_LEN: usize = 1 + 20 + 20 + 20 + 4 + RSA_BYTES / 2;

impl Key {
    /// TPM_STORE_ASYMKEY, the plaintext of a key's encData.
    fn store_asymkey(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(STORE_ASYMKEY_LEN);
        v.put_u8(PT_ASYM);
        v.put(&self.usage_auth.0);
        v.put(&self.migration_auth.0);
        v.put(&self.public.digest());
        v.put_sized32(&self.rsa.prime());
        v
    }

    /// Wraps this key under `parent` (a storage key): the TPM_KEY blob.
    pub fn wrap(&self, parent: &Key, drbg: &mut Drbg) -> TpmResult<KeyBlob> {
        let mut plain = self.store_asymkey();
        let enc = parent.rsa.oaep_encrypt(drbg, &plain).ok_or(TPM_FAIL);
        zeroize::Zeroize::zeroize(&mut plain);
        Ok(KeyBlob { public: self.public.clone(), enc_data: enc? })
    }

    /// Unwraps a TPM_KEY blob with `parent` (the steps of libtpms'
    /// TPM_Key_DecryptEncData and TPM_Key_CheckPubDataDigest, with their
    /// error codes): decryption (TPM_DECRYPT_ERROR), the TPM_STORE_ASYMKEY
    /// structure (TPM_INVALID_STRUCTURE for a wrong payload type,
    /// TPM_BAD_PARAM_SIZE when short; trailing bytes are ignored), the
    /// prime against the public modulus (TPM_BAD_PARAMETER when it does
    /// not divide it), then pubDataDigest against the public part
    /// (TPM_AUTHFAIL). The public part must have passed
    /// [`KeyPublic::check_template`].
    pub fn unwrap(blob: KeyBlob, parent: &Key, drbg: &mut Drbg) -> TpmResult<Key> {
        let plain = zeroize::Zeroizing::new(parent.rsa.oaep_decrypt(drbg, &blob.enc_data).ok_or(TPM_DECRYPT_ERROR)?);
        let mut r = Reader::new(&plain);
        let payload = r.u8()?;
        if payload != PT_ASYM {
            return Err(TPM_INVALID_STRUCTURE);
        }
        let usage_auth = Secret(r.digest()?);
        let migration_auth = Secret(r.digest()?);
        let digest = r.digest()?;
        let prime = r.sized32()?;
        let rsa = RsaKey::from_n_p(&blob.public.modulus, prime).ok_or(TPM_BAD_PARAMETER)?;
        if !crypto::ct_eq(&digest, &blob.public.digest()) {
            return Err(TPM_AUTHFAIL);
        }
        Ok(Key { public: blob.public, usage_auth, migration_auth, rsa })
    }

    /// Serialises for the TPM's own persisted state (SRK, saved keys).
    pub fn write_internal(&self, out: &mut Vec<u8>) {
        let mut pubv = Vec::new();
        self.public.write(&mut pubv);
        out.put_sized32(&pubv);
        out.put(&self.usage_auth.0);
        out.put(&self.migration_auth.0);
        out.put_sized32(&self.rsa.prime());
    }

    /// Parses [`Key::write_internal`] output.
    pub fn read_internal(r: &mut Reader<'_>) -> TpmResult<Key> {
        Self::read_internal_reusing(r, &[])
    }

    /// [`Key::read_internal`], taking the RSA key from `known` when one
    /// matches (see [`RsaKey::from_n_p_reusing`]).
    pub fn read_internal_reusing(r: &mut Reader<'_>, known: &[&RsaKey]) -> TpmResult<Key> {
        let mut pr = Reader::new(r.sized32()?);
        let public = KeyPublic::read(&mut pr)?;
        pr.finish()?;
        let usage_auth = Secret(r.digest()?);
        let migration_auth = Secret(r.digest()?);
        let prime = r.sized32()?;
        let rsa = RsaKey::from_n_p_reusing(&public.modulus, prime, known).ok_or(TPM_FAIL)?;
        Ok(Key { public, usage_auth, migration_auth, rsa })
    }

    /// Checks that the key's PCR binding is satisfied now.
    pub fn check_pcrs(&self, pcrs: &PcrBank, locality: u8) -> TpmResult<()> {
        self.public.pcr.check_release(pcrs, locality)
    }
}
