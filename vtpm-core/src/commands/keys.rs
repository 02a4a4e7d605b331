//! Wrapped keys: TPM_CreateWrapKey, TPM_LoadKey(2), TPM_GetPubKey,
//! TPM_EvictKey, TPM_Sign, TPM_UnBind.

use super::Cmd;
use crate::consts::*;
use crate::crypto::RsaKey;
use crate::key::{Key, KeyBlob};
use crate::keys::KeyTable;
use crate::marshal::{Put, TpmResult};
use crate::secret::Secret;
use crate::session::{Entity, Verified};
use crate::state::Permanent;
use crate::{Platform, Tpm};
use alloc::vec::Vec;
use zeroize::Zeroizing;

/// The key a handle names: the SRK or a loaded key.
pub(crate) fn lookup<'a>(perm: &'a Permanent, keys: &'a KeyTable, handle: u32) -> TpmResult<&'a Key> {
    if handle == KH_SRK {
        return perm.owner.as_ref().map(|o| &o.srk).ok_or(TPM_INVALID_KEYHANDLE);
    }
    keys.get(handle).ok_or(TPM_INVALID_KEYHANDLE)
}

pub(crate) fn entity_of(handle: u32) -> Entity {
    if handle == KH_SRK {
        Entity::Srk
    } else {
        Entity::Key(handle)
    }
}

/// Bytes of a TPM_BOUND_DATA header (version 1.1.0.0 and payload type).
const BOUND_HEADER: [u8; 5] = [1, 1, 0, 0, PT_BIND];

impl<P: Platform> Tpm<P> {
    pub(crate) fn key(&self, handle: u32) -> TpmResult<&Key> {
        lookup(&self.perm, &self.vol.keys, handle)
    }

    /// Authorises use of key `handle` by session `i`, or without a session
    /// when the key's authDataUsage is NEVER. `handle_bytes` is what the
    /// HMAC skips.
    pub(crate) fn key_auth(
        &mut self,
        c: &mut Cmd<'_>,
        i: usize,
        handle: u32,
        handle_bytes: usize,
        always: bool,
    ) -> TpmResult<Option<Verified>> {
        let k = self.key(handle)?;
        let (secret, usage) = (k.usage_auth.clone(), k.public.auth_usage);
        if c.n_auths() <= i {
            if usage == AUTH_NEVER || !always {
                return Ok(None);
            }
            return Err(TPM_AUTHFAIL);
        }
        self.verify(c, i, entity_of(handle), &secret, handle_bytes).map(Some)
    }

    /// The tpmProof, which also guards non-migratable keys.
    pub(crate) fn tpm_proof(&self) -> TpmResult<Secret> {
        self.perm.owner.as_ref().map(|o| o.tpm_proof.clone()).ok_or(TPM_NOSRK)
    }

    /// Response trailers for an optional session.
    pub(crate) fn respond_opt(&mut self, c: &Cmd<'_>, v: Option<&Verified>, out: &mut Vec<u8>, handle_bytes: usize) {
        if let Some(v) = v {
            self.respond(c, &[v], out, handle_bytes);
        }
    }

    /// TPM_CreateWrapKey (Part 3, 10.4): a new key wrapped under a loaded
    /// storage key; its secrets arrive ADIP-encrypted under the OSAP session.
    /// Checks in libtpms' order: parent handle, authorisation, the
    /// template's properties (TPM_BAD_KEY_PROPERTY), then the usage rules
    /// (TPM_INVALID_KEYUSAGE): a storage parent, a non-migratable child
    /// only under a non-migratable parent, no identity or authchange key,
    /// no migrateAuthority flag.
    pub(crate) fn cmd_create_wrap_key(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let parent = c.r.u32()?;
        let enc_usage = c.r.digest()?;
        let enc_migration = c.r.digest()?;
        let template = KeyBlob::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let auth = c.auth(0)?;
        self.key(parent)?;
        let even = self.nonce_even(auth.handle)?;
        // ADIP needs an OSAP session (libtpms checks the session type
        // before the HMAC).
        self.vol.sessions.osap_shared(auth.handle).ok_or(TPM_BAD_MODE)?;
        let v = self.key_auth(c, 0, parent, 4, true)?.ok_or(TPM_AUTHFAIL)?;
        let usage_auth = self.adip_decrypt(auth.handle, &enc_usage, &even)?;
        let migration_auth = self.adip_decrypt(auth.handle, &enc_migration, &auth.nonce_odd)?;
        let mut public = template.public;
        public.check_template()?;
        let parent_key = self.key(parent)?;
        if parent_key.public.usage != KEY_STORAGE {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if parent_key.public.is_migratable() && !public.is_migratable() {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if public.usage == KEY_IDENTITY || public.usage == KEY_AUTHCHANGE {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if public.flags & KEYFLAG_MIGRATE_AUTHORITY != 0 {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        public.pcr.stamp_creation(&self.vol.pcrs, c.locality)?;
        let migration_auth = if public.is_migratable() { migration_auth } else { self.tpm_proof()? };
        let rsa = RsaKey::generate(&mut self.drbg).ok_or(TPM_FAIL)?;
        public.modulus = rsa.modulus();
        let key = Key { public, usage_auth, migration_auth, rsa };
        let parent_key = lookup(&self.perm, &self.vol.keys, parent)?;
        let blob = key.wrap(parent_key, &mut self.drbg)?;
        let mut out = blob.to_bytes();
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }

    /// TPM_LoadKey2 and TPM_LoadKey: unwrap under a loaded storage key, in
    /// libtpms' order (TPM_LoadKeyCommon): parent handle, authorisation,
    /// storage parent (TPM_INVALID_KEYUSAGE), the key's properties
    /// (TPM_BAD_KEY_PROPERTY), decryption and integrity ([`Key::unwrap`]),
    /// usage rules (TPM_INVALID_KEYUSAGE: a migratable identity key, an
    /// authchange key, a non-migratable key whose migrationAuth is not this
    /// TPM's tpmProof), and only then a free slot (TPM_NOSPACE).
    pub(crate) fn cmd_load_key(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let parent = c.r.u32()?;
        let blob = KeyBlob::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        self.key(parent)?;
        let v = self.key_auth(c, 0, parent, 4, true)?;
        if self.key(parent)?.public.usage != KEY_STORAGE {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        blob.public.check_template()?;
        // Certified-migration keys come only from TPM_CMK_CreateKey, which
        // this TPM does not implement.
        if blob.public.flags & KEYFLAG_MIGRATE_AUTHORITY != 0 {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        let parent_key = lookup(&self.perm, &self.vol.keys, parent)?;
        let key = Key::unwrap(blob, parent_key, &mut self.drbg)?;
        if key.public.usage == KEY_IDENTITY && key.public.is_migratable() {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if key.public.usage == KEY_AUTHCHANGE {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        if !key.public.is_migratable() && !key.migration_auth.ct_eq(&self.tpm_proof()?.0) {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        let handle = self.vol.keys.insert(key, &mut self.drbg)?;
        let mut out = Vec::with_capacity(45);
        out.put_u32(handle);
        self.respond_opt(c, v.as_ref(), &mut out, 4);
        Ok(out)
    }

    /// TPM_GetPubKey: TPM_PUBKEY of a loaded key (or of the SRK when
    /// readSRKPub allows).
    pub(crate) fn cmd_get_pub_key(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        if handle == KH_SRK && !self.perm.flags.read_srk_pub {
            return Err(TPM_INVALID_KEYHANDLE);
        }
        let always = self.key(handle)?.public.auth_usage == AUTH_ALWAYS;
        let v = self.key_auth(c, 0, handle, 4, always)?;
        let k = self.key(handle)?;
        if k.public.flags & KEYFLAG_PCR_IGNORED_ON_READ == 0 {
            k.check_pcrs(&self.vol.pcrs, c.locality)?;
        }
        let mut out = k.public.pubkey_bytes();
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }

    /// TPM_EvictKey (deprecated, still used by TrouSerS for 1.1 keys).
    pub(crate) fn cmd_evict_key(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        self.evict(handle)?;
        Ok(Vec::new())
    }

    /// TPM_Sign with a signing or legacy key.
    pub(crate) fn cmd_sign(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let area = c.r.sized32()?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let v = self.key_auth(c, 0, handle, 4, true)?;
        let k = lookup(&self.perm, &self.vol.keys, handle)?;
        if !matches!(k.public.usage, KEY_SIGNING | KEY_LEGACY) {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        k.check_pcrs(&self.vol.pcrs, c.locality)?;
        let sig = match k.public.parms.sig_scheme {
            SS_RSASSAPKCS1V15_SHA1 => {
                let d: [u8; 20] = area.try_into().map_err(|_| TPM_BAD_PARAMETER)?;
                k.rsa.sign_sha1(&mut self.drbg, &d)
            }
            SS_RSASSAPKCS1V15_DER => {
                if area.len() > crate::crypto::RSA_BYTES.saturating_sub(11) {
                    return Err(TPM_BAD_PARAMETER);
                }
                k.rsa.sign_raw(&mut self.drbg, area)
            }
            _ => return Err(TPM_INAPPROPRIATE_SIG),
        }
        .ok_or(TPM_FAIL)?;
        let mut out = Vec::with_capacity(300);
        out.put_sized32(&sig);
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }

    /// TPM_UnBind: decrypts data bound to a bind or legacy key.
    pub(crate) fn cmd_unbind(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let data = c.r.sized32()?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let v = self.key_auth(c, 0, handle, 4, true)?;
        let k = lookup(&self.perm, &self.vol.keys, handle)?;
        if !matches!(k.public.usage, KEY_BIND | KEY_LEGACY) {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        k.check_pcrs(&self.vol.pcrs, c.locality)?;
        let plain = Zeroizing::new(
            match k.public.parms.enc_scheme {
                ES_RSAESOAEP_SHA1_MGF1 => k.rsa.oaep_decrypt(&mut self.drbg, data),
                ES_RSAESPKCSV15 => k.rsa.pkcs1_decrypt(&mut self.drbg, data),
                _ => return Err(TPM_INAPPROPRIATE_ENC),
            }
            .ok_or(TPM_DECRYPT_ERROR)?,
        );
        let bound = plain.get(..5).is_some_and(|h| h.get(..2) == BOUND_HEADER.get(..2) && h.get(4) == Some(&PT_BIND));
        let payload: &[u8] = if k.public.parms.enc_scheme == ES_RSAESOAEP_SHA1_MGF1 || k.public.usage == KEY_BIND {
            if !bound {
                return Err(TPM_INVALID_STRUCTURE);
            }
            plain.get(5..).unwrap_or(&[])
        } else if bound {
            plain.get(5..).unwrap_or(&[])
        } else {
            &plain
        };
        let mut out = Vec::with_capacity(payload.len().saturating_add(45));
        out.put_sized32(payload);
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }
}
