//! Sealing and attestation: TPM_Seal, TPM_Unseal, TPM_Quote, TPM_Quote2.

use super::keys::lookup;
use super::Cmd;
use crate::consts::*;
use crate::crypto::{ct_eq, sha1, sha1_parts};
use crate::key::{PcrBinding, PcrInfoShort};
use crate::marshal::{Put, Reader, TpmResult};
use crate::pcr::{locality_bit, PcrSelection};
use crate::secret::Secret;
use crate::session::Entity;
use crate::{Platform, Tpm};
use alloc::vec::Vec;
use zeroize::Zeroizing;

/// Largest secret that fits, with its TPM_SEALED_DATA header, in one OAEP
/// block of a 2048-bit key (214 bytes).
pub const MAX_SEAL_DATA: usize = 214 - (1 + 20 + 20 + 20 + 4);

/// TPM_STORED_DATA or TPM_STORED_DATA12.
struct StoredData {
    /// None: TPM_STORED_DATA with these version bytes; Some: the `et` of
    /// TPM_STORED_DATA12.
    head: StoredHead,
    seal_info: PcrBinding,
    enc_data: Vec<u8>,
}

enum StoredHead {
    V11([u8; 4]),
    V12(u16),
}

impl StoredData {
    fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        let h = r.array::<4>()?;
        let head = if h[..2] == TAG_STORED_DATA12.to_be_bytes() {
            StoredHead::V12(u16::from_be_bytes([h[2], h[3]]))
        } else if h[0] == 1 && h[1] == 1 {
            StoredHead::V11(h)
        } else {
            return Err(TPM_BAD_VERSION);
        };
        let long = matches!(head, StoredHead::V12(_));
        let seal_info = PcrBinding::read_sized(r, long)?;
        let enc_data = r.sized32()?.to_vec();
        Ok(StoredData { head, seal_info, enc_data })
    }

    fn write(&self, out: &mut Vec<u8>, with_enc: bool) {
        match self.head {
            StoredHead::V11(v) => out.put(&v),
            StoredHead::V12(et) => {
                out.put_u16(TAG_STORED_DATA12);
                out.put_u16(et);
            }
        }
        self.seal_info.write_sized(out);
        if with_enc {
            out.put_sized32(&self.enc_data);
        } else {
            out.put_u32(0);
        }
    }

    /// storedDigest: the structure with an empty encData.
    fn digest(&self) -> [u8; 20] {
        let mut v = Vec::new();
        self.write(&mut v, false);
        sha1(&v)
    }
}

impl<P: Platform> Tpm<P> {
    /// TPM_Seal (Part 3, 10.1): data bound to a storage key, a secret and
    /// optionally PCR values (TPM_PCR_INFO, or TPM_PCR_INFO_LONG which
    /// yields TPM_STORED_DATA12).
    pub(crate) fn cmd_seal(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let enc_auth = c.r.digest()?;
        let pcr_info = c.r.sized32()?;
        let data = c.r.sized32()?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let auth = c.auth(0)?;
        if self.key(handle)?.public.usage != KEY_STORAGE {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        let even = self.nonce_even(auth.handle)?;
        let v = self.key_auth(c, 0, handle, 4, true)?.ok_or(TPM_AUTHFAIL)?;
        let data_auth = self.adip_decrypt(auth.handle, &enc_auth, &even)?;
        let long = pcr_info.get(..2) == Some(&TAG_PCR_INFO_LONG.to_be_bytes()[..]);
        let mut seal_info = PcrBinding::parse(pcr_info, long)?;
        if data.len() > MAX_SEAL_DATA {
            return Err(TPM_BAD_DATASIZE);
        }
        seal_info.stamp_creation(&self.vol.pcrs, c.locality)?;
        let head = if long { StoredHead::V12(0) } else { StoredHead::V11([1, 1, 0, 0]) };
        let mut stored = StoredData { head, seal_info, enc_data: Vec::new() };
        let mut sealed = Zeroizing::new(Vec::with_capacity(214));
        sealed.put_u8(PT_SEAL);
        sealed.put(&data_auth.0);
        sealed.put(&self.tpm_proof()?.0);
        sealed.put(&stored.digest());
        sealed.put_sized32(data);
        let key = lookup(&self.perm, &self.vol.keys, handle)?;
        stored.enc_data = key.rsa.oaep_encrypt(&mut self.drbg, &sealed).ok_or(TPM_FAIL)?;
        let mut out = Vec::new();
        stored.write(&mut out, true);
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }

    /// TPM_Unseal: the key session first (unless the key needs none and
    /// the tag is 0xC2), then the data session, which must be OIAP. Checks
    /// in libtpms' order: parent handle, parent authorisation, a
    /// non-migratable storage parent (TPM_INVALID_KEYUSAGE), then the blob:
    /// any failure to decrypt it or to find this TPM's sealed data in it is
    /// TPM_NOTSEALED_BLOB; then the PCRs and the data authorisation.
    pub(crate) fn cmd_unseal(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let stored = StoredData::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND, TAG_RQU_AUTH2_COMMAND])?;
        c.done()?;
        let k = self.key(handle)?;
        let (key_v, data_i) = if c.n_auths() == 2 {
            (self.key_auth(c, 0, handle, 4, true)?, 1)
        } else {
            if k.public.auth_usage != AUTH_NEVER {
                return Err(TPM_AUTHFAIL);
            }
            (None, 0)
        };
        let key = lookup(&self.perm, &self.vol.keys, handle)?;
        if key.public.usage != KEY_STORAGE || key.public.is_migratable() {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        let proof = self.tpm_proof()?;
        let plain = Zeroizing::new(key.rsa.oaep_decrypt(&mut self.drbg, &stored.enc_data).ok_or(TPM_NOTSEALED_BLOB)?);
        let sealed = (|| {
            let mut r = Reader::new(&plain);
            let payload = r.u8().ok()?;
            let data_auth = Secret(r.digest().ok()?);
            let blob_proof = r.digest().ok()?;
            let digest = r.digest().ok()?;
            let secret = r.sized32().ok()?;
            let valid = proof.ct_eq(&blob_proof) && ct_eq(&digest, &stored.digest()) && payload == PT_SEAL;
            valid.then_some((data_auth, secret))
        })();
        let (data_auth, secret) = sealed.ok_or(TPM_NOTSEALED_BLOB)?;
        stored.seal_info.check_release(&self.vol.pcrs, c.locality)?;
        let data_v = self.verify(c, data_i, Entity::Data, &data_auth, 4)?;
        let mut out = Vec::with_capacity(secret.len().saturating_add(90));
        out.put_sized32(secret);
        match &key_v {
            Some(kv) => self.respond(c, &[kv, &data_v], &mut out, 0),
            None => self.respond(c, &[&data_v], &mut out, 0),
        }
        Ok(out)
    }

    /// Checks a key may sign quotes and returns nothing; shared by both quotes.
    fn check_quote_key(&self, handle: u32, locality: u8) -> TpmResult<()> {
        let k = self.key(handle)?;
        if !matches!(k.public.usage, KEY_SIGNING | KEY_IDENTITY | KEY_LEGACY) {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if !matches!(k.public.parms.sig_scheme, SS_RSASSAPKCS1V15_SHA1 | SS_RSASSAPKCS1V15_INFO) {
            return Err(TPM_INAPPROPRIATE_SIG);
        }
        k.check_pcrs(&self.vol.pcrs, locality)
    }

    /// TPM_Quote: signs TPM_QUOTE_INFO over the selected PCRs.
    pub(crate) fn cmd_quote(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let external = c.r.digest()?;
        let sel = PcrSelection::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let v = self.key_auth(c, 0, handle, 4, true)?;
        self.check_quote_key(handle, c.locality)?;
        let composite = self.vol.pcrs.composite(&sel);
        let info = sha1_parts(&[&[1, 1, 0, 0], b"QUOT", &sha1(&composite), &external]);
        let key = lookup(&self.perm, &self.vol.keys, handle)?;
        let sig = key.rsa.sign_sha1(&mut self.drbg, &info).ok_or(TPM_FAIL)?;
        let mut out = composite;
        out.put_sized32(&sig);
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }

    /// TPM_Quote2: signs TPM_QUOTE_INFO2 (with TPM_PCR_INFO_SHORT and,
    /// optionally, TPM_CAP_VERSION_INFO appended).
    pub(crate) fn cmd_quote2(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let external = c.r.digest()?;
        let sel = PcrSelection::read(&mut c.r)?;
        let add_version = c.r.bool()?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let v = self.key_auth(c, 0, handle, 4, true)?;
        self.check_quote_key(handle, c.locality)?;
        let short = PcrInfoShort {
            at_release: self.vol.pcrs.composite_hash(&sel),
            selection: sel,
            locality_at_release: locality_bit(c.locality)?,
        };
        let mut short_bytes = Vec::new();
        short.write(&mut short_bytes);
        let version: &[u8] = if add_version { &super::capability::VERSION_INFO } else { &[] };
        let mut signed = Vec::with_capacity(128);
        signed.put_u16(TAG_QUOTE_INFO2);
        signed.put(b"QUT2");
        signed.put(&external);
        signed.put(&short_bytes);
        signed.put(version);
        let key = lookup(&self.perm, &self.vol.keys, handle)?;
        let sig = key.rsa.sign_sha1(&mut self.drbg, &sha1(&signed)).ok_or(TPM_FAIL)?;
        let mut out = short_bytes;
        out.put_sized32(version);
        out.put_sized32(&sig);
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }
}
