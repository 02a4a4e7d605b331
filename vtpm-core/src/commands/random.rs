//! TPM_GetRandom, TPM_StirRandom and TPM_GetTicks.

use super::{Cmd, MAX_COMMAND};
use crate::consts::*;
use crate::marshal::{Put, TpmResult};
use crate::{Platform, Tpm};
use alloc::vec::Vec;

/// Most random bytes one response can carry (header and size field aside).
const MAX_RANDOM: usize = MAX_COMMAND - 14;

impl<P: Platform> Tpm<P> {
    /// TPM_GetRandom: as many bytes as asked, up to what a response holds.
    pub(crate) fn cmd_get_random(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let n = c.r.u32()?;
        c.tag_in(&[TAG_RQU_COMMAND])?;
        c.done()?;
        let n = usize::try_from(n).unwrap_or(MAX_RANDOM).min(MAX_RANDOM);
        let mut out = alloc::vec![0u8; n.saturating_add(4)];
        let (size, bytes) = out.split_at_mut(4);
        size.copy_from_slice(&(n as u32).to_be_bytes());
        self.drbg.fill(bytes);
        Ok(out)
    }

    /// TPM_StirRandom: mixes caller data and fresh platform entropy in.
    pub(crate) fn cmd_stir_random(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let data = c.r.sized32()?;
        c.tag_in(&[TAG_RQU_COMMAND])?;
        c.done()?;
        let mut fresh = [0u8; 32];
        self.platform.fill_random(&mut fresh);
        self.drbg.mix(&fresh);
        self.drbg.mix(data);
        Ok(Vec::new())
    }

    /// TPM_GetTicks: TPM_CURRENT_TICKS with one tick per microsecond since
    /// TPM_Init, and the tick nonce of this power cycle.
    pub(crate) fn cmd_get_ticks(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        c.tag_in(&[TAG_RQU_COMMAND])?;
        c.done()?;
        let now = self.platform.ticks_us();
        let mut out = Vec::with_capacity(32);
        out.put_u16(TAG_CURRENT_TICKS);
        out.put_u64(now.saturating_sub(self.vol.tick_base_us));
        out.put_u16(1);
        out.put(&self.vol.tick_nonce);
        Ok(out)
    }
}
