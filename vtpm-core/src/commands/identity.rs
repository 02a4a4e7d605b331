//! Attestation identities: TPM_MakeIdentity and TPM_ActivateIdentity.

use super::keys::lookup;
use super::Cmd;
use crate::consts::*;
use crate::crypto::{sha1, sha1_parts, RsaKey};
use crate::key::{Key, KeyBlob, PcrInfoShort};
use crate::marshal::{Put, Reader, TpmResult};
use crate::session::{Entity, Verified};
use crate::{Platform, Tpm};
use alloc::vec::Vec;
use zeroize::Zeroizing;

/// TPM_EK_TYPE_ACTIVATE.
const EK_TYPE_ACTIVATE: u16 = 0x0001;

impl<P: Platform> Tpm<P> {
    /// TPM_MakeIdentity (Part 3, 15.1): an identity key wrapped under the
    /// SRK and its binding signature over TPM_IDENTITY_CONTENTS. Sessions:
    /// SRK first (omitted if the SRK needs no auth and the tag is 0xC2),
    /// owner second; identityAuth is ADIP-encrypted under the owner's OSAP.
    pub(crate) fn cmd_make_identity(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let enc_auth = c.r.digest()?;
        let label = c.r.digest()?;
        let template = KeyBlob::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND, TAG_RQU_AUTH2_COMMAND])?;
        c.done()?;
        let owner_i = c.n_auths().saturating_sub(1);
        let owner_handle = c.auth(owner_i)?.handle;
        let srk_v: Option<Verified> =
            if owner_i == 1 { self.key_auth(c, 0, KH_SRK, 0, true)? } else { self.key_auth(c, 1, KH_SRK, 0, true)? };
        let even = self.nonce_even(owner_handle)?;
        let owner_secret = self.owner_auth()?;
        let owner_v = self.verify(c, owner_i, Entity::Owner, &owner_secret, 0)?;
        let usage_auth = self.adip_decrypt(owner_handle, &enc_auth, &even)?;
        let mut public = template.public;
        if public.usage != KEY_IDENTITY || public.is_migratable() {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        public.check_template()?;
        public.pcr.stamp_creation(&self.vol.pcrs, c.locality)?;
        let rsa = RsaKey::generate(&mut self.drbg).ok_or(TPM_FAIL)?;
        public.modulus = rsa.modulus();
        let key = Key { public, usage_auth, migration_auth: self.tpm_proof()?, rsa };
        let contents =
            sha1_parts(&[&[1, 1, 0, 0], &ORD_MAKE_IDENTITY.to_be_bytes(), &label, &key.public.pubkey_bytes()]);
        let binding = key.rsa.sign_sha1(&mut self.drbg, &contents).ok_or(TPM_FAIL)?;
        let srk = lookup(&self.perm, &self.vol.keys, KH_SRK)?;
        let blob = key.wrap(srk, &mut self.drbg)?;
        let mut out = blob.to_bytes();
        out.put_sized32(&binding);
        match &srk_v {
            Some(s) => self.respond(c, &[s, &owner_v], &mut out, 0),
            None => self.respond(c, &[&owner_v], &mut out, 0),
        }
        Ok(out)
    }

    /// TPM_ActivateIdentity (Part 3, 15.2): the EK decrypts a blob from the
    /// privacy CA and releases its session key if the blob names this
    /// identity key (and, for TPM_EK_BLOB_ACTIVATE, the PCRs match).
    pub(crate) fn cmd_activate_identity(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let blob = c.r.sized32()?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND, TAG_RQU_AUTH2_COMMAND])?;
        c.done()?;
        if self.key(handle)?.public.usage != KEY_IDENTITY {
            return Err(TPM_BAD_PARAMETER);
        }
        let owner_i = c.n_auths().saturating_sub(1);
        let key_v =
            if owner_i == 1 { self.key_auth(c, 0, handle, 4, true)? } else { self.key_auth(c, 1, handle, 4, true)? };
        let owner_secret = self.owner_auth()?;
        let owner_v = self.verify(c, owner_i, Entity::Owner, &owner_secret, 4)?;
        let ek = self.endorsement_key()?.clone();
        let plain = Zeroizing::new(ek.oaep_decrypt(&mut self.drbg, blob).ok_or(TPM_DECRYPT_ERROR)?);
        let id_digest = sha1(&self.key(handle)?.public.pubkey_bytes());
        let mut r = Reader::new(&plain);
        let is_ek_blob = plain.get(..2) == Some(&TAG_EK_BLOB.to_be_bytes()[..]);
        let (session_key, digest, pcr) = if is_ek_blob {
            r.u16()?;
            if r.u16()? != EK_TYPE_ACTIVATE {
                return Err(TPM_BAD_TYPE);
            }
            let inner = r.sized32()?;
            r.finish()?;
            let mut ir = Reader::new(inner);
            if ir.u16()? != TAG_EK_BLOB_ACTIVATE {
                return Err(TPM_BAD_PARAMETER);
            }
            let sk = read_symmetric_key(&mut ir)?;
            let d = ir.digest()?;
            let pcr = PcrInfoShort::read(&mut ir)?;
            ir.finish()?;
            (sk, d, Some(pcr))
        } else {
            let sk = read_symmetric_key(&mut r)?;
            let d = r.digest()?;
            r.finish()?;
            (sk, d, None)
        };
        if !crate::crypto::ct_eq(&digest, &id_digest) {
            return Err(TPM_BAD_PARAMETER);
        }
        if let Some(p) = pcr {
            if !p.selection.is_empty() {
                p.check(&self.vol.pcrs, c.locality)?;
            }
        }
        let mut out = session_key;
        match &key_v {
            Some(k) => self.respond(c, &[k, &owner_v], &mut out, 0),
            None => self.respond(c, &[&owner_v], &mut out, 0),
        }
        Ok(out)
    }
}

/// Reads a TPM_SYMMETRIC_KEY and returns its serialisation.
fn read_symmetric_key(r: &mut Reader<'_>) -> TpmResult<Vec<u8>> {
    let alg = r.u32()?;
    let scheme = r.u16()?;
    let data = r.sized16()?;
    let mut v = Vec::with_capacity(data.len().saturating_add(8));
    v.put_u32(alg);
    v.put_u16(scheme);
    v.put_sized16(data);
    Ok(v)
}
