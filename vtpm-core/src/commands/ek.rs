//! The endorsement key: TPM_ReadPubek, TPM_CreateEndorsementKeyPair,
//! TPM_OwnerReadInternalPub, TPM_DisablePubekRead.

use super::Cmd;
use crate::consts::*;
use crate::crypto::{sha1_parts, RsaKey};
use crate::key::KeyParms;
use crate::marshal::{Put, TpmResult};
use crate::session::Entity;
use crate::{Platform, Tpm};
use alloc::vec::Vec;

/// TPM_PUBKEY of an RSA-2048 OAEP key.
pub(crate) fn ek_pubkey(ek: &RsaKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(284);
    KeyParms::rsa2048(ES_RSAESOAEP_SHA1_MGF1, SS_NONE).write(&mut v);
    v.put_sized32(&ek.modulus());
    v
}

impl<P: Platform> Tpm<P> {
    /// TPM_ReadPubek: the EK's public part and SHA1(pubkey ‖ antiReplay).
    /// A deferred EK is generated only once the read is allowed.
    pub(crate) fn cmd_read_pubek(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let anti_replay = c.r.digest()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if !self.perm.ek.exists() {
            return Err(TPM_NO_ENDORSEMENT);
        }
        if !self.perm.flags.read_pubek {
            return Err(TPM_DISABLED_CMD);
        }
        let mut out = ek_pubkey(self.endorsement_key()?);
        let checksum = sha1_parts(&[&out, &anti_replay]);
        out.put(&checksum);
        Ok(out)
    }

    /// TPM_CreateEndorsementKeyPair: only while no EK exists (a deferred
    /// one exists: it is refused without being generated).
    pub(crate) fn cmd_create_ek(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let anti_replay = c.r.digest()?;
        let parms = KeyParms::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if self.perm.ek.exists() {
            return Err(TPM_DISABLED_CMD);
        }
        parms.check_supported()?;
        if parms.enc_scheme != ES_RSAESOAEP_SHA1_MGF1 || parms.sig_scheme != SS_NONE {
            return Err(TPM_BAD_KEY_PROPERTY);
        }
        if !self.create_ek() {
            return Err(TPM_FAIL);
        }
        let ek = self.perm.ek.key().ok_or(TPM_FAIL)?;
        let mut out = ek_pubkey(ek);
        let checksum = sha1_parts(&[&out, &anti_replay]);
        out.put(&checksum);
        Ok(out)
    }

    /// TPM_OwnerReadInternalPub: the EK's or SRK's public key, for the owner.
    pub(crate) fn cmd_owner_read_internal_pub(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let handle = c.r.u32()?;
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let secret = self.owner_auth()?;
        let v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
        let mut out = match handle {
            KH_EK => ek_pubkey(self.endorsement_key()?),
            KH_SRK => self.perm.owner.as_ref().ok_or(TPM_NOSRK)?.srk.public.pubkey_bytes(),
            _ => return Err(TPM_BAD_PARAMETER),
        };
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }

    /// TPM_DisablePubekRead: the owner hides the EK from ReadPubek.
    pub(crate) fn cmd_disable_pubek_read(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let secret = self.owner_auth()?;
        let v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
        self.perm.flags.read_pubek = false;
        self.mark_dirty();
        let mut out = Vec::new();
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }
}
