//! TPM_OIAP, TPM_OSAP, TPM_FlushSpecific and TPM_Terminate_Handle.

use super::Cmd;
use crate::consts::*;
use crate::crypto::hmac_sha1;
use crate::marshal::{Put, TpmResult};
use crate::secret::Secret;
use crate::session::{Entity, Kind};
use crate::{Platform, Tpm};
use alloc::vec::Vec;

impl<P: Platform> Tpm<P> {
    pub(crate) fn cmd_oiap(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        let s = self.vol.sessions.open(Kind::Oiap, &mut self.drbg)?;
        let mut out = Vec::with_capacity(24);
        out.put_u32(s.handle);
        out.put(&s.nonce_even);
        Ok(out)
    }

    /// TPM_OSAP: a session bound to one entity, keyed with
    /// HMAC(entityAuth, nonceEvenOSAP ‖ nonceOddOSAP).
    pub(crate) fn cmd_osap(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let entity_type = c.r.u16()?;
        let entity_value = c.r.u32()?;
        let nonce_odd_osap = c.r.digest()?;
        // libtpms resolves the entity before it looks at the tag.
        // The high byte selects the ADIP scheme; only XOR is implemented.
        if entity_type >> 8 != 0 {
            return Err(TPM_INAPPROPRIATE_ENC);
        }
        let (entity, secret) = self.entity_secret(entity_type, entity_value)?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if self.vol.sessions.free() == 0 {
            return Err(TPM_RESOURCES);
        }
        let nonce_even_osap = self.drbg.nonce();
        let shared = Secret(hmac_sha1(&secret.0, &[&nonce_even_osap, &nonce_odd_osap]));
        let s = self.vol.sessions.open(Kind::Osap { entity, shared }, &mut self.drbg)?;
        let mut out = Vec::with_capacity(44);
        out.put_u32(s.handle);
        out.put(&s.nonce_even);
        out.put(&nonce_even_osap);
        Ok(out)
    }

    /// The entity an OSAP names, and its authorisation secret.
    fn entity_secret(&self, entity_type: u16, value: u32) -> TpmResult<(Entity, Secret)> {
        match entity_type {
            ET_OWNER => Ok((Entity::Owner, self.owner_auth()?)),
            ET_SRK => self.key_entity(KH_SRK),
            ET_KEYHANDLE => self.key_entity(value),
            ET_NV => {
                let i = self.perm.nv.get(value).ok_or(TPM_BADINDEX)?;
                Ok((Entity::Nv(value), i.auth.clone()))
            }
            _ => Err(TPM_WRONG_ENTITYTYPE),
        }
    }

    fn key_entity(&self, handle: u32) -> TpmResult<(Entity, Secret)> {
        let o = self.perm.owner.as_ref().ok_or(TPM_NOSRK)?;
        if handle == KH_SRK {
            return Ok((Entity::Srk, o.srk.usage_auth.clone()));
        }
        let k = self.vol.keys.get(handle).ok_or(TPM_INVALID_KEYHANDLE)?;
        Ok((Entity::Key(handle), k.usage_auth.clone()))
    }

    /// TPM_FlushSpecific (Part 3, 22.3) for keys and auth sessions.
    pub(crate) fn cmd_flush_specific(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        let rt = c.r.u32()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        match rt {
            RT_KEY => self.evict(handle).map_err(|_| TPM_BAD_PARAMETER)?,
            RT_AUTH => {
                if !self.vol.sessions.terminate(handle) {
                    return Err(TPM_INVALID_AUTHHANDLE);
                }
            }
            // Transport, context, counter, DAA: none exist here.
            _ => return Err(TPM_INVALID_RESOURCE),
        }
        Ok(Vec::new())
    }

    /// TPM_Terminate_Handle (deprecated in 1.2, still sent by old stacks).
    pub(crate) fn cmd_terminate_handle(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if !self.vol.sessions.terminate(handle) {
            return Err(TPM_INVALID_AUTHHANDLE);
        }
        Ok(Vec::new())
    }

    /// Unloads a key and the OSAP sessions bound to it.
    pub(crate) fn evict(&mut self, handle: u32) -> TpmResult<()> {
        if !self.vol.keys.remove(handle) {
            return Err(TPM_INVALID_KEYHANDLE);
        }
        self.vol.sessions.terminate_entity(Entity::Key(handle));
        Ok(())
    }
}
