//! TPM_TakeOwnership, TPM_OwnerClear, TPM_ForceClear, TPM_ChangeAuthOwner
//! and TPM_ResetLockValue.

use super::Cmd;
use crate::consts::*;
use crate::crypto::RsaKey;
use crate::key::{Key, KeyBlob};
use crate::marshal::TpmResult;
use crate::secret::Secret;
use crate::session::{Entity, Kind};
use crate::state::Owner;
use crate::{Platform, Tpm};
use alloc::vec::Vec;
use zeroize::Zeroizing;

impl<P: Platform> Tpm<P> {
    /// TPM_TakeOwnership (Part 3, 6.1): the owner and SRK secrets arrive
    /// OAEP-encrypted to the EK; the TPM makes the SRK and tpmProof. The
    /// session must be OIAP, keyed with the new owner secret.
    pub(crate) fn cmd_take_ownership(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let protocol = c.r.u16()?;
        let enc_owner = c.r.sized32()?;
        let enc_srk = c.r.sized32()?;
        let srk_blob = KeyBlob::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let auth = c.auth(0)?;
        if self.perm.owner.is_some() {
            return Err(TPM_OWNER_SET);
        }
        if !self.perm.flags.ownership {
            return Err(TPM_INSTALL_DISABLED);
        }
        if protocol != PID_OWNER {
            return Err(TPM_BAD_PARAMETER);
        }
        if self.vol.sessions.get(auth.handle).is_none() {
            return Err(TPM_INVALID_AUTHHANDLE);
        }
        let ek = self.endorsement_key()?.clone();
        let owner_auth = self.decrypt_secret(&ek, enc_owner)?;
        let srk_auth = self.decrypt_secret(&ek, enc_srk)?;
        if !matches!(self.vol.sessions.get(auth.handle).map(|s| &s.kind), Some(Kind::Oiap) | None) {
            return Err(TPM_AUTHFAIL);
        }
        let v = self.verify(c, 0, Entity::Owner, &owner_auth, 0)?;
        let mut public = srk_blob.public;
        if public.usage != KEY_STORAGE || public.is_migratable() {
            return Err(TPM_INVALID_KEYUSAGE);
        }
        public.check_template()?;
        public.pcr.stamp_creation(&self.vol.pcrs, c.locality)?;
        let rsa = RsaKey::generate(&mut self.drbg).ok_or(TPM_FAIL)?;
        let tpm_proof = Secret(self.drbg.nonce());
        public.modulus = rsa.modulus();
        let srk = Key { public, usage_auth: srk_auth, migration_auth: tpm_proof.clone(), rsa };
        let srk_pub = KeyBlob { public: srk.public.clone(), enc_data: Vec::new() };
        self.perm.owner = Some(Owner { auth: owner_auth, tpm_proof, srk });
        self.perm.flags.read_pubek = false;
        self.mark_dirty();
        let mut out = srk_pub.to_bytes();
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }

    /// OAEP-decrypts a 20-byte secret with the EK.
    fn decrypt_secret(&mut self, ek: &RsaKey, enc: &[u8]) -> TpmResult<Secret> {
        let plain = Zeroizing::new(ek.oaep_decrypt(&mut self.drbg, enc).ok_or(TPM_DECRYPT_ERROR)?);
        let s: [u8; 20] = plain.as_slice().try_into().map_err(|_| TPM_BAD_KEY_PROPERTY)?;
        Ok(Secret(s))
    }

    /// TPM_OwnerClear: the owner removes itself.
    pub(crate) fn cmd_owner_clear(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let secret = self.owner_auth()?;
        let v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
        if self.perm.flags.disable_owner_clear {
            return Err(TPM_CLEAR_DISABLED);
        }
        let mut out = Vec::new();
        self.respond(c, &[&v], &mut out, 0);
        self.clear_owner();
        Ok(out)
    }

    /// TPM_ForceClear: the same, by physical presence.
    pub(crate) fn cmd_force_clear(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if !self.physical_presence() {
            return Err(TPM_BAD_PRESENCE);
        }
        if self.vol.flags.disable_force_clear {
            return Err(TPM_CLEAR_DISABLED);
        }
        self.clear_owner();
        Ok(Vec::new())
    }

    /// What both clears do (libtpms `TPM_OwnerClearCommon`): forget the
    /// owner, SRK, tpmProof, keys, sessions and NV indices, and leave the
    /// chip disabled and (from the next boot) deactivated.
    fn clear_owner(&mut self) {
        self.perm.owner = None;
        self.perm.nv.indices.retain(|i| i.public.index & NV_D_BIT != 0);
        self.perm.no_owner_nv_write = 0;
        let f = &mut self.perm.flags;
        f.disable = true;
        f.deactivated = true;
        f.read_pubek = true;
        f.disable_owner_clear = false;
        f.allow_maintenance = false;
        f.nv_locked = false;
        f.read_srk_pub = false;
        self.vol.keys.clear();
        self.vol.sessions.clear();
        self.mark_dirty();
    }
}

impl<P: Platform> Tpm<P> {
    /// TPM_ChangeAuthOwner (Part 3, 17.2): the owner gives the owner or the
    /// SRK a new secret, sent ADIP-encrypted under an OSAP session for the
    /// owner. As libtpms: the session ends with the command whatever the
    /// caller asked (the response says continueAuthSession = FALSE and is
    /// authorised with the old shared secret), and every other owner OSAP
    /// session ends too, since their shared secrets derive from the old
    /// owner secret.
    pub(crate) fn cmd_change_auth_owner(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let protocol = c.r.u16()?;
        let new_auth = c.r.digest()?;
        let entity_type = c.r.u16()?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let handle = c.auth(0)?.handle;
        match self.vol.sessions.get(handle).map(|s| &s.kind) {
            None => return Err(TPM_INVALID_AUTHHANDLE),
            Some(Kind::Oiap) => return Err(TPM_BAD_MODE),
            Some(Kind::Osap { .. }) => {}
        }
        let even = self.nonce_even(handle)?;
        let secret = self.owner_auth()?;
        let mut v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
        if protocol != PID_ADCP {
            return Err(TPM_BAD_PARAMETER);
        }
        if entity_type != ET_OWNER && entity_type != ET_SRK {
            return Err(TPM_WRONG_ENTITYTYPE);
        }
        let new = self.adip_decrypt(handle, &new_auth, &even)?;
        let owner = self.perm.owner.as_mut().ok_or(TPM_NOSRK)?;
        if entity_type == ET_OWNER {
            owner.auth = new;
        } else {
            owner.srk.usage_auth = new;
        }
        self.mark_dirty();
        v.cont = false;
        let mut out = Vec::new();
        self.respond(c, &[&v], &mut out, 0);
        self.vol.sessions.terminate_entity(Entity::Owner);
        Ok(out)
    }

    /// TPM_ResetLockValue (Part 3, 5.?): the owner ends
    /// the dictionary-attack lockout and zeroes the failure count. It runs
    /// during a lockout (it is the way out), but a failed attempt disables
    /// it until the lockout period is over, as in libtpms.
    pub(crate) fn cmd_reset_lock_value(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        // libtpms re-enables the command first when no lockout runs, and
        // ignores the lockout itself.
        let now = self.now_s();
        let _ = self.vol.da.check(now);
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        if self.vol.da.disable_reset_lock {
            return Err(TPM_AUTHFAIL);
        }
        let secret = self.owner_auth()?;
        match self.verify(c, 0, Entity::Owner, &secret, 0) {
            Ok(v) => {
                self.vol.da.fail_count = 0;
                let mut out = Vec::new();
                self.respond(c, &[&v], &mut out, 0);
                Ok(out)
            }
            Err(rc) => {
                self.vol.da.disable_reset_lock = true;
                Err(rc)
            }
        }
    }
}
