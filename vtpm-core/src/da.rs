//! Dictionary-attack mitigation, with libtpms' observable behaviour
//! (`TPM_Authdata_Fail` / `TPM_Authdata_CheckState`).
//!
//! Every authorisation HMAC that does not match counts, whatever the
//! entity (owner, SRK, key, NV area, sealed data); a good one never
//! uncounts, so that an attacker who knows any one secret cannot reset
//! the count. Past [`LOCKOUT_THRESHOLD`] failures each further failure
//! starts a lockout of 1, 2, 4, ... seconds during which every authorised
//! command (any request tag but `TPM_TAG_RQU_COMMAND`) except
//! TPM_ResetLockValue answers `TPM_DEFEND_LOCK_RUNNING` before anything
//! else is checked. The owner's TPM_ResetLockValue sets the count to zero;
//! a failed one disables TPM_ResetLockValue until the lockout ends.
//!
//! The state lives with TPM_STCLEAR_DATA, as in libtpms: TPM_Init and
//! Startup(ST_CLEAR) clear it, TPM_SaveState keeps it for
//! Startup(ST_STATE).

use crate::consts::TPM_DEFEND_LOCK_RUNNING;
use crate::marshal::{Put, Reader, TpmResult};
use alloc::vec::Vec;

/// Failures allowed before the first lockout (libtpms' TPM_LOCKOUT_THRESHOLD).
pub const LOCKOUT_THRESHOLD: u32 = 5;

/// TPM_STCLEAR_DATA's authFailCount, authFailTime and disableResetLock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaState {
    /// Authorisation failures since the last reset.
    pub fail_count: u32,
    /// When the lockout started, in seconds of the platform's clock.
    pub fail_time: u32,
    /// TPM_ResetLockValue refused (it failed during this lockout).
    pub disable_reset_lock: bool,
}

impl DaState {
    /// Seconds of lockout left at `now`; 0 when authorised commands run.
    /// The wait doubles with each failure past the threshold (libtpms
    /// shifts a 32-bit 1, so does this); time wraps as libtpms' does.
    pub fn time_left(&self, now: u32) -> u32 {
        if self.fail_count <= LOCKOUT_THRESHOLD {
            return 0;
        }
        let over = self.fail_count.wrapping_sub(LOCKOUT_THRESHOLD).wrapping_sub(1);
        let wait = 1u32.wrapping_shl(over);
        wait.saturating_sub(now.wrapping_sub(self.fail_time))
    }

    /// An authorisation HMAC did not match.
    pub fn fail(&mut self, now: u32) {
        self.fail_count = self.fail_count.saturating_add(1);
        if self.fail_count > LOCKOUT_THRESHOLD {
            self.fail_time = now;
        }
    }

    /// The check at the entry of an authorised command: refuses during a
    /// lockout, and re-enables TPM_ResetLockValue outside one.
    pub fn check(&mut self, now: u32) -> TpmResult<()> {
        if self.time_left(now) > 0 {
            return Err(TPM_DEFEND_LOCK_RUNNING);
        }
        self.disable_reset_lock = false;
        Ok(())
    }

    /// A saved state restored on a clock that restarted (the hypervisor
    /// rebooted, so the platform's seconds count from zero again): a
    /// lockout that started "in the future" restarts now, in full, rather
    /// than ending at once as libtpms' wrap-around would make it.
    pub fn rebase(&mut self, now: u32) {
        if self.fail_count > LOCKOUT_THRESHOLD && now < self.fail_time {
            self.fail_time = now;
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u32(self.fail_count);
        out.put_u32(self.fail_time);
        out.put_u8(u8::from(self.disable_reset_lock));
    }

    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        Ok(DaState { fail_count: r.u32()?, fail_time: r.u32()?, disable_reset_lock: r.bool()? })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn lockout_starts_past_the_threshold_and_doubles() {
        let mut da = DaState::default();
        for _ in 0..LOCKOUT_THRESHOLD {
            da.fail(100);
            assert_eq!(da.check(100), Ok(()), "failures up to the threshold are free");
        }
        da.fail(100);
        assert_eq!(da.time_left(100), 1);
        assert_eq!(da.check(100), Err(TPM_DEFEND_LOCK_RUNNING));
        assert_eq!(da.check(101), Ok(()));
        da.fail(101);
        assert_eq!(da.time_left(102), 1);
        assert_eq!(da.time_left(103), 0);
        da.fail(103);
        assert_eq!(da.time_left(103), 4);
    }

    #[test]
    fn check_reenables_reset_lock_only_outside_a_lockout() {
        let mut da = DaState { fail_count: 6, fail_time: 10, disable_reset_lock: true };
        assert!(da.check(10).is_err());
        assert!(da.disable_reset_lock);
        assert!(da.check(11).is_ok());
        assert!(!da.disable_reset_lock);
    }

    #[test]
    fn a_restarted_clock_restarts_the_lockout() {
        let mut da = DaState { fail_count: 9, fail_time: 5000, disable_reset_lock: false };
        da.rebase(3);
        assert_eq!(da.time_left(3), 8, "9 failures: 2^(9-5-1) s");
        let mut v = Vec::new();
        da.write(&mut v);
        assert_eq!(DaState::read(&mut Reader::new(&v)).unwrap(), da);
    }
}
