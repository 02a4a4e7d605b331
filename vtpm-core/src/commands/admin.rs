//! Physical presence and the commands it gates: TSC_PhysicalPresence,
//! TPM_PhysicalEnable/Disable, TPM_PhysicalSetDeactivated,
//! TPM_SetOwnerInstall.

use super::Cmd;
use crate::consts::*;
use crate::marshal::TpmResult;
use crate::{Platform, Tpm};
use alloc::vec::Vec;

/// Bits that change the permanent physical-presence configuration.
const PP_CONFIG_BITS: u16 = PP_HW_DISABLE | PP_CMD_DISABLE | PP_LIFETIME_LOCK | PP_HW_ENABLE | PP_CMD_ENABLE;
/// Bits that assert or lock presence for this boot.
const PP_STATE_BITS: u16 = PP_NOTPRESENT | PP_PRESENT | PP_LOCK;

impl<P: Platform> Tpm<P> {
    /// TSC_PhysicalPresence (TPM Main Part 3, 6.4).
    pub(crate) fn cmd_physical_presence(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let pp = c.r.u16()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        let config = pp & PP_CONFIG_BITS;
        let state = pp & PP_STATE_BITS;
        if pp & !(PP_CONFIG_BITS | PP_STATE_BITS) != 0 || (config != 0 && state != 0) || pp == 0 {
            return Err(TPM_BAD_PARAMETER);
        }
        if config != 0 {
            let f = &mut self.perm.flags;
            if f.pp_lifetime_lock
                || (pp & PP_HW_ENABLE != 0 && pp & PP_HW_DISABLE != 0)
                || (pp & PP_CMD_ENABLE != 0 && pp & PP_CMD_DISABLE != 0)
            {
                return Err(TPM_BAD_PARAMETER);
            }
            if pp & PP_HW_ENABLE != 0 {
                f.pp_hw_enable = true;
            }
            if pp & PP_HW_DISABLE != 0 {
                f.pp_hw_enable = false;
            }
            if pp & PP_CMD_ENABLE != 0 {
                f.pp_cmd_enable = true;
            }
            if pp & PP_CMD_DISABLE != 0 {
                f.pp_cmd_enable = false;
            }
            if pp & PP_LIFETIME_LOCK != 0 {
                f.pp_lifetime_lock = true;
            }
            self.mark_dirty();
            return Ok(Vec::new());
        }
        let v = &mut self.vol.flags;
        if !self.perm.flags.pp_cmd_enable
            || v.physical_presence_lock
            || (pp & PP_PRESENT != 0 && pp & PP_NOTPRESENT != 0)
            || (pp & PP_LOCK != 0 && pp & PP_PRESENT != 0)
        {
            return Err(TPM_BAD_PARAMETER);
        }
        if pp & PP_LOCK != 0 {
            v.physical_presence = false;
            v.physical_presence_lock = true;
        } else {
            v.physical_presence = pp & PP_PRESENT != 0;
        }
        Ok(Vec::new())
    }

    fn require_presence(&self) -> TpmResult<()> {
        if self.physical_presence() {
            Ok(())
        } else {
            Err(TPM_BAD_PRESENCE)
        }
    }

    /// TPM_PhysicalEnable and TPM_PhysicalDisable: take effect at once.
    pub(crate) fn cmd_physical_enable(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        self.require_presence()?;
        self.perm.flags.disable = c.ordinal == ORD_PHYSICAL_DISABLE;
        self.mark_dirty();
        Ok(Vec::new())
    }

    /// TPM_PhysicalSetDeactivated: the permanent flag, which takes effect
    /// at the next Startup(ST_CLEAR).
    pub(crate) fn cmd_physical_set_deactivated(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let state = c.r.bool()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        self.require_presence()?;
        self.perm.flags.deactivated = state;
        self.mark_dirty();
        Ok(Vec::new())
    }

    /// TPM_SetOwnerInstall: whether TakeOwnership is allowed.
    pub(crate) fn cmd_set_owner_install(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let state = c.r.bool()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if self.perm.owner.is_some() {
            return Err(TPM_OWNER_SET);
        }
        self.require_presence()?;
        self.perm.flags.ownership = state;
        self.mark_dirty();
        Ok(Vec::new())
    }
}
