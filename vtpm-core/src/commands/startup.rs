//! TPM_Startup, TPM_SaveState and the self-test commands.

use super::Cmd;
use crate::consts::*;
use crate::flags::StclearFlags;
use crate::marshal::{Put, TpmResult};
use crate::pcr::{self, PcrBank};
use crate::state::Saved;
use crate::{crypto, Mode, Platform, Tpm};
use alloc::vec::Vec;

/// What GetTestResult reports after a passed self-test.
const TEST_RESULT_OK: &[u8] = b"vTPM self-test passed\n";

impl<P: Platform> Tpm<P> {
    /// TPM_Startup (Part 3, 3.2). As in libtpms, a Startup sent after
    /// TPM_Init ends the post-init state whatever its outcome (a malformed
    /// one leaves the TPM running without the Startup actions), and every
    /// Startup invalidates a saved state that it does not consume.
    pub(crate) fn cmd_startup(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let saved = self.saved.take();
        let before = self.mode;
        let result = self.startup(c, saved);
        self.mode = match (before, self.mode) {
            (Mode::PostInit, Mode::PostInit) => Mode::Operational,
            (Mode::PostInitFailed, _) => Mode::Failed,
            (_, now) => now,
        };
        if result.is_ok() {
            // TPM_STANY_FLAGS are reset by every successful Startup.
            self.vol.tos_present = false;
        }
        result
    }

    fn startup(&mut self, c: &mut Cmd<'_>, saved: Option<zeroize::Zeroizing<Vec<u8>>>) -> TpmResult<Vec<u8>> {
        let st = c.r.u16()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        match self.mode {
            Mode::PostInit => {}
            Mode::PostInitFailed => return Err(TPM_FAILEDSELFTEST),
            Mode::Operational | Mode::Failed => return Err(TPM_INVALID_POSTINIT),
        }
        match st {
            ST_CLEAR => self.startup_clear(),
            ST_STATE => {
                let restored = saved.as_deref().map(|b| Saved::from_blob(b));
                match restored {
                    Some(Ok(s)) if s.identity == self.perm.identity() => self.startup_state(s),
                    // No (or an unusable) saved state: libtpms enters
                    // failure mode until the next TPM_Init.
                    _ => {
                        self.mode = Mode::Failed;
                        return Err(TPM_FAILEDSELFTEST);
                    }
                }
            }
            ST_DEACTIVATED => {
                self.startup_clear();
                self.vol.flags.deactivated = true;
            }
            _ => return Err(TPM_BAD_PARAMETER),
        }
        self.mode = Mode::Operational;
        Ok(Vec::new())
    }

    fn startup_clear(&mut self) {
        self.vol.flags = StclearFlags { deactivated: self.perm.flags.deactivated, ..Default::default() };
        self.vol.pcrs = PcrBank::cleared();
        self.vol.sessions.clear();
        self.vol.keys.clear();
        self.vol.da = crate::da::DaState::default();
        self.perm.nv.clear_stclear_locks();
    }

    fn startup_state(&mut self, s: Saved) {
        self.vol.flags = s.flags;
        // PCRs with the pcrReset attribute come back at their reset value.
        let mut pcrs = s.pcrs;
        for (i, v) in pcrs.values.iter_mut().enumerate() {
            if pcr::is_resettable(i) {
                *v = pcr::reset_value(i);
            }
        }
        self.vol.pcrs = pcrs;
        self.vol.sessions.clear();
        self.vol.keys.clear();
        self.vol.keys.slots = s.keys;
        let now = self.now_s();
        self.vol.da = s.da;
        self.vol.da.rebase(now);
        self.perm.nv.clear_stclear_locks();
        for (index, r, w) in s.nv_locks {
            if let Some(i) = self.perm.nv.get_mut(index) {
                i.public.read_st_clear = r;
                i.public.write_st_clear = w;
            }
        }
    }

    /// TPM_SaveState (Part 3, 3.3).
    pub(crate) fn cmd_save_state(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        let keys = self
            .vol
            .keys
            .slots
            .iter()
            .filter(|(_, k)| k.public.flags & KEYFLAG_VOLATILE == 0)
            .map(|(h, k)| (*h, k.clone()))
            .collect();
        let nv_locks = self
            .perm
            .nv
            .indices
            .iter()
            .map(|i| (i.public.index, i.public.read_st_clear, i.public.write_st_clear))
            .collect();
        let s = Saved {
            identity: self.perm.identity(),
            flags: self.vol.flags.clone(),
            pcrs: self.vol.pcrs.clone(),
            keys,
            nv_locks,
            da: self.vol.da.clone(),
        };
        self.saved = Some(zeroize::Zeroizing::new(s.to_blob()));
        Ok(Vec::new())
    }

    /// TPM_SelfTestFull and TPM_ContinueSelfTest: both run the full test
    /// at once (there is no background test to wait for).
    pub(crate) fn cmd_self_test(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        if !self.self_test() {
            self.mode = Mode::Failed;
            return Err(TPM_FAILEDSELFTEST);
        }
        self.selftest_full_done = true;
        Ok(Vec::new())
    }

    /// Known-answer tests of SHA-1 and HMAC, and a sign/verify with the EK
    /// when there is one and it is generated (a self-test runs at every
    /// boot: it must not be what generates a deferred EK).
    fn self_test(&mut self) -> bool {
        let sha_ok = crypto::sha1(b"abc")
            == [
                0xa9, 0x99, 0x3e, 0x36, 0x47, 0x06, 0x81, 0x6a, 0xba, 0x3e, 0x25, 0x71, 0x78, 0x50, 0xc2, 0x6c, 0x9c,
                0xd0, 0xd8, 0x9d,
            ];
        let hmac_ok = crypto::hmac_sha1(b"Jefe", &[b"what do ya want for nothing?"])
            == [
                0xef, 0xfc, 0xdf, 0x6a, 0xe5, 0xeb, 0x2f, 0xa2, 0xd2, 0x74, 0x16, 0xd5, 0xf1, 0x84, 0xdf, 0x9c, 0x25,
                0x9a, 0x7c, 0x79,
            ];
        let rsa_ok = match self.perm.ek.key() {
            Some(ek) => {
                let d = [0x5A; 20];
                ek.sign_sha1(&mut self.drbg, &d).is_some_and(|sig| crypto::verify_sha1(&ek.modulus(), &d, &sig))
            }
            None => true,
        };
        sha_ok && hmac_ok && rsa_ok
    }

    /// TPM_GetTestResult: a vendor-specific text.
    pub(crate) fn cmd_get_test_result(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        let mut out = Vec::new();
        if self.mode == Mode::Failed {
            out.put_sized32(b"vTPM in failure mode\n");
        } else {
            out.put_sized32(TEST_RESULT_OK);
        }
        Ok(out)
    }
}
