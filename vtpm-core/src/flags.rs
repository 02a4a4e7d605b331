//! TPM_PERMANENT_FLAGS and TPM_STCLEAR_FLAGS, in their GetCapability order.

use crate::consts::{TAG_PERMANENT_FLAGS, TAG_STCLEAR_FLAGS};
use crate::marshal::{Put, Reader, TpmResult};
use alloc::vec::Vec;

/// TPM_PERMANENT_FLAGS (Part 2, 7.1), persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermanentFlags {
    pub disable: bool,
    pub ownership: bool,
    pub deactivated: bool,
    pub read_pubek: bool,
    pub disable_owner_clear: bool,
    pub allow_maintenance: bool,
    pub pp_lifetime_lock: bool,
    pub pp_hw_enable: bool,
    pub pp_cmd_enable: bool,
    pub cekp_used: bool,
    pub tpm_post: bool,
    pub tpm_post_lock: bool,
    pub fips: bool,
    pub operator: bool,
    pub enable_revoke_ek: bool,
    pub nv_locked: bool,
    pub read_srk_pub: bool,
    pub tpm_established: bool,
    pub maintenance_done: bool,
    pub disable_full_da_logic_info: bool,
}

impl PermanentFlags {
    /// The flags of a chip fresh from the factory, as libtpms sets them.
    pub fn factory() -> Self {
        PermanentFlags {
            ownership: true,
            read_pubek: true,
            allow_maintenance: true,
            enable_revoke_ek: true,
            ..Default::default()
        }
    }

    fn as_array(&self) -> [bool; 20] {
        [
            self.disable,
            self.ownership,
            self.deactivated,
            self.read_pubek,
            self.disable_owner_clear,
            self.allow_maintenance,
            self.pp_lifetime_lock,
            self.pp_hw_enable,
            self.pp_cmd_enable,
            self.cekp_used,
            self.tpm_post,
            self.tpm_post_lock,
            self.fips,
            self.operator,
            self.enable_revoke_ek,
            self.nv_locked,
            self.read_srk_pub,
            self.tpm_established,
            self.maintenance_done,
            self.disable_full_da_logic_info,
        ]
    }

    /// The wire structure (tag then 20 booleans).
    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u16(TAG_PERMANENT_FLAGS);
        for b in self.as_array() {
            out.put_u8(u8::from(b));
        }
    }

    /// Parses the wire structure (used for the persisted state).
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        if r.u16()? != TAG_PERMANENT_FLAGS {
            return Err(crate::consts::TPM_BADTAG);
        }
        let mut b = [false; 20];
        for v in b.iter_mut() {
            *v = r.bool()?;
        }
        let [disable, ownership, deactivated, read_pubek, disable_owner_clear, allow_maintenance, pp_lifetime_lock, pp_hw_enable, pp_cmd_enable, cekp_used, tpm_post, tpm_post_lock, fips, operator, enable_revoke_ek, nv_locked, read_srk_pub, tpm_established, maintenance_done, disable_full_da_logic_info] =
            b;
        Ok(PermanentFlags {
            disable,
            ownership,
            deactivated,
            read_pubek,
            disable_owner_clear,
            allow_maintenance,
            pp_lifetime_lock,
            pp_hw_enable,
            pp_cmd_enable,
            cekp_used,
            tpm_post,
            tpm_post_lock,
            fips,
            operator,
            enable_revoke_ek,
            nv_locked,
            read_srk_pub,
            tpm_established,
            maintenance_done,
            disable_full_da_logic_info,
        })
    }
}

/// TPM_STCLEAR_FLAGS (Part 2, 7.2): volatile, reset by Startup(ST_CLEAR).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StclearFlags {
    pub deactivated: bool,
    pub disable_force_clear: bool,
    pub physical_presence: bool,
    pub physical_presence_lock: bool,
    pub global_lock: bool,
}

impl StclearFlags {
    /// The wire structure.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u16(TAG_STCLEAR_FLAGS);
        for b in [
            self.deactivated,
            self.disable_force_clear,
            self.physical_presence,
            self.physical_presence_lock,
            self.global_lock,
        ] {
            out.put_u8(u8::from(b));
        }
    }

    /// Parses the wire structure (used for the saved state).
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        if r.u16()? != TAG_STCLEAR_FLAGS {
            return Err(crate::consts::TPM_BADTAG);
        }
        Ok(StclearFlags {
            deactivated: r.bool()?,
            disable_force_clear: r.bool()?,
            physical_presence: r.bool()?,
            physical_presence_lock: r.bool()?,
            global_lock: r.bool()?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn factory_flags_serialise_like_libtpms() {
        let mut v = Vec::new();
        PermanentFlags::factory().write(&mut v);
        // swtpm, fresh state, GetCapability(FLAG, PERMANENT).
        let want = [0x00, 0x1f, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0];
        assert_eq!(v, want);
        let back = PermanentFlags::read(&mut Reader::new(&v)).unwrap();
        assert_eq!(back, PermanentFlags::factory());
    }

    #[test]
    fn stclear_round_trip() {
        let f = StclearFlags { deactivated: true, global_lock: true, ..Default::default() };
        let mut v = Vec::new();
        f.write(&mut v);
        assert_eq!(v, [0, 0x20, 1, 0, 0, 0, 1]);
        assert_eq!(StclearFlags::read(&mut Reader::new(&v)).unwrap(), f);
    }
}
