//! NV storage commands: TPM_NV_DefineSpace, TPM_NV_WriteValue(Auth),
//! TPM_NV_ReadValue(Auth) (Part 3, 20).
//!
//! While TPM_PERMANENT_FLAGS.nvLocked is FALSE (a chip in manufacture)
//! authorisation is not checked, but attribute conflicts still are, as
//! libtpms does; writes without an owner are counted and limited.

use super::Cmd;
use crate::consts::*;
use crate::marshal::{Put, TpmResult};
use crate::nv::{NvIndex, NvPublic, MAX_INDICES, MAX_NV_WRITE_NOOWNER};
use crate::secret::Secret;
use crate::session::{Entity, Verified};
use crate::{Platform, Tpm};
use alloc::vec::Vec;

impl<P: Platform> Tpm<P> {
    pub(crate) fn cmd_nv_define_space(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let public = NvPublic::read(&mut c.r)?;
        let enc_auth = c.r.digest()?;
        self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let (v, auth) = if c.n_auths() == 1 {
            let handle = c.auth(0)?.handle;
            let even = self.nonce_even(handle)?;
            let secret = self.owner_auth()?;
            let v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
            (Some(v), self.adip_decrypt(handle, &enc_auth, &even)?)
        } else {
            if self.perm.flags.nv_locked && !self.physical_presence() {
                return Err(TPM_BAD_PRESENCE);
            }
            (None, Secret(enc_auth))
        };
        let index = public.index;
        if index == NV_INDEX_LOCK {
            if v.is_some() {
                return Err(TPM_BADINDEX);
            }
            self.perm.flags.nv_locked = true;
            self.mark_dirty();
            return Ok(Vec::new());
        }
        if index == NV_INDEX0 {
            return Err(TPM_BADINDEX);
        }
        // The checks run as if an existing index were already deleted
        // (libtpms deletes it first, Action 6), but a redefinition that
        // fails leaves it in place: libtpms then rolls its permanent state
        // back from NV (TPM_PermanentAll_NVStore).
        let old = self.perm.nv.get(index);
        if let Some(old) = old {
            if self.perm.flags.nv_locked
                && ((old.public.has(NV_PER_GLOBALLOCK) && self.vol.flags.global_lock)
                    || (old.public.has(NV_PER_WRITE_STCLEAR) && old.public.write_st_clear))
            {
                return Err(TPM_AREA_LOCKED);
            }
        }
        let reclaimed = old.map_or(0, |i| i.public.size.saturating_add(crate::nv::INDEX_OVERHEAD));
        let exists = old.is_some();
        if exists && public.size == 0 {
            self.perm.nv.remove(index);
            self.vol.sessions.terminate_entity(Entity::Nv(index));
            self.mark_dirty();
            return self.nv_respond(c, v);
        }
        check_attributes(&public)?;
        if public.size == 0 {
            return Err(TPM_BAD_PARAM_SIZE);
        }
        // libtpms allocates the area before it counts free space: a size it
        // cannot allocate is TPM_SIZE, one that does not fit TPM_NOSPACE.
        if public.size > crate::marshal::ALLOC_MAX {
            return Err(TPM_SIZE);
        }
        let cost = public.size.saturating_add(crate::nv::INDEX_OVERHEAD);
        if cost > self.perm.nv.free().saturating_add(reclaimed)
            || (!exists && self.perm.nv.indices.len() >= MAX_INDICES)
        {
            return Err(TPM_NOSPACE);
        }
        self.perm.nv.remove(index);
        self.vol.sessions.terminate_entity(Entity::Nv(index));
        let data = alloc::vec![0xFF; public.size as usize];
        let public = NvPublic { read_st_clear: false, write_st_clear: false, write_define: false, ..public };
        self.perm.nv.indices.push(NvIndex { public, auth, data });
        self.mark_dirty();
        self.nv_respond(c, v)
    }

    fn nv_respond(&mut self, c: &Cmd<'_>, v: Option<Verified>) -> TpmResult<Vec<u8>> {
        let mut out = Vec::new();
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }

    /// Authorises an NV access: `owner_attr`/`auth_attr` are the OWNER* and
    /// AUTH* attributes of the direction; `by_auth` tells WriteValueAuth or
    /// ReadValueAuth from WriteValue or ReadValue.
    fn nv_authorise(
        &mut self,
        c: &mut Cmd<'_>,
        index: u32,
        owner_attr: u32,
        auth_attr: u32,
        by_auth: bool,
    ) -> TpmResult<Option<Verified>> {
        let i = self.perm.nv.get(index).ok_or(TPM_BADINDEX)?;
        let attrs = i.public.attributes;
        let secret = i.auth.clone();
        if by_auth {
            if attrs & auth_attr == 0 {
                return Err(TPM_AUTH_CONFLICT);
            }
            c.tag_in(&[TAG_RQU_AUTH1_COMMAND])?;
            return self.verify(c, 0, Entity::Nv(index), &secret, 0).map(Some);
        }
        if attrs & auth_attr != 0 {
            return Err(TPM_AUTH_CONFLICT);
        }
        if c.n_auths() == 1 {
            let owner = self.owner_auth()?;
            let v = self.verify(c, 0, Entity::Owner, &owner, 0)?;
            if attrs & owner_attr == 0 && self.perm.flags.nv_locked {
                return Err(TPM_AUTH_CONFLICT);
            }
            return Ok(Some(v));
        }
        if attrs & owner_attr != 0 && self.perm.flags.nv_locked {
            return Err(TPM_AUTH_CONFLICT);
        }
        Ok(None)
    }

    /// TPM_NV_WriteValue and TPM_NV_WriteValueAuth.
    pub(crate) fn cmd_nv_write(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let index = c.r.u32()?;
        let offset = c.r.u32()?;
        let data = c.r.sized32()?;
        let by_auth = c.ordinal == ORD_NV_WRITE_VALUE_AUTH;
        if by_auth {
            self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        } else {
            self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        }
        c.done()?;
        if index == NV_INDEX0 && !by_auth {
            // A zero-length write to index 0 sets the global lock.
            if !data.is_empty() {
                return Err(TPM_BADINDEX);
            }
            self.vol.flags.global_lock = true;
            return Ok(Vec::new());
        }
        let locked = self.perm.flags.nv_locked;
        let v = self.nv_authorise(c, index, NV_PER_OWNERWRITE, NV_PER_AUTHWRITE, by_auth)?;
        if !locked && self.perm.owner.is_none() {
            if self.perm.no_owner_nv_write >= MAX_NV_WRITE_NOOWNER {
                return Err(TPM_MAXNVWRITES);
            }
            self.perm.no_owner_nv_write = self.perm.no_owner_nv_write.saturating_add(1);
        }
        let pp = self.physical_presence();
        let global_lock = self.vol.flags.global_lock;
        let i = self.perm.nv.get_mut(index).ok_or(TPM_BADINDEX)?;
        let p = &i.public;
        if locked {
            if p.has(NV_PER_PPWRITE) && !pp {
                return Err(TPM_BAD_PRESENCE);
            }
            if (p.has(NV_PER_WRITEDEFINE) && p.write_define)
                || (p.has(NV_PER_WRITE_STCLEAR) && p.write_st_clear)
                || (p.has(NV_PER_GLOBALLOCK) && global_lock)
            {
                return Err(TPM_AREA_LOCKED);
            }
        }
        p.pcr_write.check(&self.vol.pcrs, c.locality)?;
        let (write_define, write_st_clear, write_all) =
            (p.has(NV_PER_WRITEDEFINE), p.has(NV_PER_WRITE_STCLEAR), p.has(NV_PER_WRITEALL));
        if data.is_empty() {
            if write_define {
                i.public.write_define = true;
            }
            if write_st_clear {
                i.public.write_st_clear = true;
            }
        } else {
            let start = offset as usize;
            let end = start.checked_add(data.len()).ok_or(TPM_NOSPACE)?;
            if end > i.data.len() {
                return Err(TPM_NOSPACE);
            }
            if write_all && data.len() != i.data.len() {
                return Err(TPM_NOT_FULLWRITE);
            }
            i.data.get_mut(start..end).ok_or(TPM_NOSPACE)?.copy_from_slice(data);
        }
        self.mark_dirty();
        self.nv_respond(c, v)
    }

    /// TPM_NV_ReadValue and TPM_NV_ReadValueAuth.
    pub(crate) fn cmd_nv_read(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let index = c.r.u32()?;
        let offset = c.r.u32()?;
        let size = c.r.u32()?;
        let by_auth = c.ordinal == ORD_NV_READ_VALUE_AUTH;
        if by_auth {
            self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        } else {
            self.check(c, &[TAG_RQU_COMMAND, TAG_RQU_AUTH1_COMMAND])?;
        }
        c.done()?;
        let locked = self.perm.flags.nv_locked;
        let v = self.nv_authorise(c, index, NV_PER_OWNERREAD, NV_PER_AUTHREAD, by_auth)?;
        let pp = self.physical_presence();
        let i = self.perm.nv.get_mut(index).ok_or(TPM_BADINDEX)?;
        let p = &i.public;
        if locked {
            if p.has(NV_PER_PPREAD) && !pp {
                return Err(TPM_BAD_PRESENCE);
            }
            if p.has(NV_PER_READ_STCLEAR) && p.read_st_clear {
                return Err(TPM_DISABLED_CMD);
            }
        }
        p.pcr_read.check(&self.vol.pcrs, c.locality)?;
        let read_st_clear = p.has(NV_PER_READ_STCLEAR);
        let mut out = Vec::new();
        if size == 0 {
            if read_st_clear {
                i.public.read_st_clear = true;
            }
            out.put_u32(0);
        } else {
            let start = offset as usize;
            let end = start.checked_add(size as usize).ok_or(TPM_NOSPACE)?;
            let bytes = i.data.get(start..end).ok_or(TPM_NOSPACE)?;
            if bytes.len() > super::MAX_COMMAND.saturating_sub(14 + 41) {
                return Err(TPM_SIZE);
            }
            out.put_sized32(bytes);
        }
        self.respond_opt(c, v.as_ref(), &mut out, 0);
        Ok(out)
    }
}

/// Attribute rules of NV_DefineSpace (libtpms' error codes).
fn check_attributes(p: &NvPublic) -> TpmResult<()> {
    if (p.has(NV_PER_OWNERWRITE) && p.has(NV_PER_AUTHWRITE)) || (p.has(NV_PER_OWNERREAD) && p.has(NV_PER_AUTHREAD)) {
        return Err(TPM_AUTH_CONFLICT);
    }
    let write_bits = NV_PER_PPWRITE | NV_PER_OWNERWRITE | NV_PER_AUTHWRITE | NV_PER_WRITEDEFINE | NV_PER_WRITE_STCLEAR;
    if p.attributes & write_bits == 0 && p.pcr_write.selection.is_empty() {
        return Err(TPM_PER_NOWRITE);
    }
    for info in [&p.pcr_read, &p.pcr_write] {
        if info.locality_at_release & 0x1F == 0 || info.locality_at_release & 0xE0 != 0 {
            return Err(TPM_INVALID_STRUCTURE);
        }
    }
    Ok(())
}

impl<P: Platform> Tpm<P> {
    /// Defines NV index `index` with `attributes` and fills it with `data`,
    /// as a TPM manufacturer does before the chip ships (the EK
    /// certificate at TPM_NV_INDEX_EKCert): no authorisation, no PCR
    /// binding, any locality, an all-zero area secret. The attribute rules
    /// of TPM_NV_DefineSpace apply, and so does the NV budget. A defined
    /// index is replaced. Indices with the D bit (0x10000000) survive
    /// OwnerClear, as a manufacturer's must.
    pub fn provision_nv(&mut self, index: u32, attributes: u32, data: &[u8]) -> TpmResult<()> {
        if index == NV_INDEX_LOCK || index == NV_INDEX0 || index == crate::consts::NV_INDEX_DIR {
            return Err(TPM_BADINDEX);
        }
        let size = u32::try_from(data.len()).map_err(|_| TPM_SIZE)?;
        if size == 0 {
            return Err(TPM_BAD_PARAM_SIZE);
        }
        if size > crate::marshal::ALLOC_MAX {
            return Err(TPM_SIZE);
        }
        let open = crate::key::PcrInfoShort {
            selection: crate::pcr::PcrSelection { size: 3, ..Default::default() },
            locality_at_release: 0x1f,
            at_release: [0; 20],
        };
        let public = NvPublic {
            index,
            pcr_read: open.clone(),
            pcr_write: open,
            attributes,
            read_st_clear: false,
            write_st_clear: false,
            write_define: false,
            size,
        };
        check_attributes(&public)?;
        let reclaimed = self.perm.nv.get(index).map_or(0, |i| i.public.size.saturating_add(crate::nv::INDEX_OVERHEAD));
        let exists = self.perm.nv.get(index).is_some();
        if size.saturating_add(crate::nv::INDEX_OVERHEAD) > self.perm.nv.free().saturating_add(reclaimed)
            || (!exists && self.perm.nv.indices.len() >= MAX_INDICES)
        {
            return Err(TPM_NOSPACE);
        }
        self.perm.nv.remove(index);
        self.vol.sessions.terminate_entity(Entity::Nv(index));
        self.perm.nv.indices.push(NvIndex { public, auth: Secret([0; 20]), data: data.to_vec() });
        self.mark_dirty();
        Ok(())
    }
}
