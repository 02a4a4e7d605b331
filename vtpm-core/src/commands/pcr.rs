//! TPM_PCRRead, TPM_Extend and TPM_PCR_Reset.

use super::Cmd;
use crate::consts::*;
use crate::marshal::{Put, TpmResult};
use crate::pcr::{self, PcrSelection};
use crate::{Platform, Tpm};
use alloc::vec::Vec;

impl<P: Platform> Tpm<P> {
    pub(crate) fn cmd_pcr_read(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let index = c.r.u32()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        let v = self.vol.pcrs.get(index)?;
        let mut out = Vec::with_capacity(20);
        out.put(&v);
        Ok(out)
    }

    /// TPM_Extend. When deactivated the PCR is still extended but the
    /// answer is 20 zero bytes (Part 3, 16.1).
    pub(crate) fn cmd_extend(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let index = c.r.u32()?;
        let digest = c.r.digest()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if usize::try_from(index).is_ok_and(|i| self.reserved_from(c.locality, i)) {
            return Err(TPM_BAD_LOCALITY);
        }
        let v = self.vol.pcrs.extend(c.locality, index, &digest)?;
        let mut out = Vec::with_capacity(20);
        if self.vol.flags.deactivated {
            out.put(&[0; 20]);
        } else {
            out.put(&v);
        }
        Ok(out)
    }

    pub(crate) fn cmd_pcr_reset(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let sel = PcrSelection::read(&mut c.r)?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        // A platform PCR that is resettable at all is reset by locality 4
        // alone (one that is not stays TPM_NOTRESETABLE, as the bank says).
        if sel.indices().any(|i| pcr::is_resettable(i) && self.reserved_from(c.locality, i)) {
            return Err(TPM_NOTLOCAL);
        }
        self.vol.pcrs.reset(c.locality, &sel, self.vol.tos_present)?;
        Ok(Vec::new())
    }
}
