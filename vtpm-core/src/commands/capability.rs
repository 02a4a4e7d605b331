//! TPM_GetCapability and TPM_GetCapabilityOwner.
//!
//! Fixed values are those libtpms reports, so that deterministic answers
//! match swtpm byte for byte.

use super::Cmd;
use crate::consts::*;
use crate::key::KeyParms;
use crate::marshal::{Put, Reader, TpmResult};
use crate::session::Entity;
use crate::{keys, session, Platform, Tpm};
use alloc::vec::Vec;

/// TPM_CAP_VERSION_INFO as libtpms reports it (spec 1.2 rev 116, "IBM").
pub(crate) const VERSION_INFO: [u8; 15] =
    [0x00, 0x30, 0x01, 0x02, 0x12, 0x9e, 0x00, 0x02, 0x03, 0x49, 0x42, 0x4d, 0x00, 0x00, 0x00];
/// Transport sessions are not implemented but libtpms reports 16 free.
const TRANS_SESSIONS: u32 = 16;

impl<P: Platform> Tpm<P> {
    pub(crate) fn cmd_get_capability(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        let area = c.r.u32()?;
        let sub = c.r.sized32()?;
        self.check(c, &[TAG_RQU_COMMAND])?;
        c.done()?;
        // In failure mode only the version and vendor capabilities answer
        // (Part 3, 7.1 action 3, as libtpms: MANUFACTURER 0x103, TIS_TIMEOUT
        // 0x115 and DURATION 0x120 are the properties).
        if self.mode == crate::Mode::Failed {
            let property = <[u8; 4]>::try_from(sub).map(u32::from_be_bytes).ok();
            let allowed = matches!(area, CAP_VERSION | CAP_VERSION_VAL | CAP_MFR)
                || (area == CAP_PROPERTY && matches!(property, Some(0x103 | 0x115 | 0x120)));
            if !allowed {
                return Err(TPM_FAILEDSELFTEST);
            }
        }
        let resp = self.capability(area, sub)?;
        let mut out = Vec::with_capacity(resp.len().saturating_add(4));
        out.put_sized32(&resp);
        Ok(out)
    }

    fn capability(&mut self, area: u32, sub: &[u8]) -> TpmResult<Vec<u8>> {
        let sub32 = || -> TpmResult<u32> {
            let b: [u8; 4] = sub.try_into().map_err(|_| TPM_BAD_MODE)?;
            Ok(u32::from_be_bytes(b))
        };
        let mut out = Vec::new();
        match area {
            CAP_ORD => {
                let ord = sub32()?;
                out.put_u8(u8::from(super::availability(ord).is_some()));
            }
            CAP_ALG => {
                let alg = sub32()?;
                out.put_u8(u8::from(alg == ALG_RSA));
            }
            CAP_PID => {
                let b: [u8; 2] = sub.try_into().map_err(|_| TPM_BAD_MODE)?;
                let pid = u16::from_be_bytes(b);
                // OIAP, OSAP, ADIP and owner installation.
                out.put_u8(u8::from(matches!(pid, 1 | 2 | 3 | 5)));
            }
            CAP_FLAG => match sub32()? {
                CAP_FLAG_PERMANENT => self.perm.flags.write(&mut out),
                CAP_FLAG_VOLATILE => self.vol.flags.write(&mut out),
                _ => return Err(TPM_BAD_MODE),
            },
            CAP_PROPERTY => self.property(sub32()?, &mut out)?,
            CAP_VERSION => out.put(&[1, 1, 0, 0]),
            CAP_KEY_HANDLE => self.key_handle_list(&mut out),
            CAP_CHECK_LOADED => {
                let parms = KeyParms::read(&mut Reader::new(sub)).map_err(|e| {
                    if e == TPM_BAD_KEY_PROPERTY {
                        TPM_BAD_KEY_PROPERTY
                    } else {
                        TPM_BAD_PARAM_SIZE
                    }
                });
                let ok = match parms {
                    Ok(p) => p.check_supported().is_ok() && self.vol.keys.free() > 0,
                    Err(TPM_BAD_KEY_PROPERTY) => false,
                    Err(e) => return Err(e),
                };
                out.put_u8(u8::from(ok));
            }
            CAP_NV_LIST => {
                for i in &self.perm.nv.indices {
                    out.put_u32(i.public.index);
                }
            }
            CAP_NV_INDEX => {
                let index = sub32()?;
                let i = self.perm.nv.get(index).ok_or(TPM_BADINDEX)?;
                i.public.write(&mut out);
            }
            CAP_HANDLE => match sub32()? {
                RT_KEY => self.key_handle_list(&mut out),
                RT_AUTH => {
                    let hs: Vec<u32> = self.vol.sessions.handles().collect();
                    out.put_u16(hs.len() as u16);
                    for h in hs {
                        out.put_u32(h);
                    }
                }
                _ => return Err(TPM_BAD_MODE),
            },
            CAP_SELECT_SIZE => {
                let mut r = Reader::new(sub);
                let major = r.u8()?;
                let minor = r.u8()?;
                let size = r.u16()?;
                r.finish()?;
                let ok = major == 1 && (minor == 1 || minor == 2) && usize::from(size) <= crate::pcr::SELECT_BYTES;
                out.put_u8(u8::from(ok));
            }
            CAP_DA_LOGIC => self.da_info(&mut out)?,
            CAP_VERSION_VAL => out.put(&VERSION_INFO),
            _ => return Err(TPM_BAD_MODE),
        }
        Ok(out)
    }

    /// TPM_DA_INFO as libtpms fills it: state, failure count, threshold,
    /// the action (a timeout) and the seconds of lockout left.
    fn da_info(&mut self, out: &mut Vec<u8>) -> TpmResult<()> {
        let now = self.now_s();
        let left = self.vol.da.time_left(now);
        let count = u16::try_from(self.vol.da.fail_count).map_err(|_| TPM_FAIL)?;
        out.put_u16(0x0037); // TPM_TAG_DA_INFO
        out.put_u8(u8::from(left > 0)); // TPM_DA_STATE_ACTIVE / INACTIVE
        out.put_u16(count);
        out.put_u16(crate::da::LOCKOUT_THRESHOLD as u16);
        out.put_u16(0x0039); // TPM_TAG_DA_ACTION_TYPE
        out.put_u32(1); // TPM_DA_ACTION_TIMEOUT
        out.put_u32(left);
        out.put_u32(0); // no vendor data
        Ok(())
    }

    fn key_handle_list(&self, out: &mut Vec<u8>) {
        out.put_u16(self.vol.keys.slots.len() as u16);
        for (h, _) in &self.vol.keys.slots {
            out.put_u32(*h);
        }
    }

    fn property(&self, prop: u32, out: &mut Vec<u8>) -> TpmResult<()> {
        let auth_free = self.vol.sessions.free() as u32;
        let v: u32 = match prop {
            0x101 => crate::pcr::NUM_PCRS as u32,  // PCR
            0x102 => 1,                            // DIR
            0x103 => 0x4942_4d00,                  // MANUFACTURER "IBM\0"
            0x104 => self.vol.keys.free() as u32,  // KEYS
            0x107 => 0,                            // MIN_COUNTER
            0x10A => auth_free,                    // AUTHSESS
            0x10B => TRANS_SESSIONS,               // TRANSESS
            0x10C => 8,                            // COUNTERS
            0x10D => session::MAX_SESSIONS as u32, // MAX_AUTHSESS
            0x10E => TRANS_SESSIONS,               // MAX_TRANSESS
            0x10F => 8,                            // MAX_COUNTERS
            0x110 => keys::MAX_KEYS as u32,        // MAX_KEYS
            0x111 => {
                // OWNER: a TPM_BOOL.
                out.put_u8(u8::from(self.perm.owner.is_some()));
                return Ok(());
            }
            0x112 | 0x113 => 0x80, // CONTEXT, MAX_CONTEXT
            0x114 => 16,           // FAMILYROWS
            0x115 => {
                // TIS_TIMEOUT: A, B, C, D in microseconds.
                for _ in 0..4 {
                    out.put_u32(1_000_000);
                }
                return Ok(());
            }
            0x116 => 0x54,        // STARTUP_EFFECT
            0x117 => 4,           // DELEGATE_ROW
            0x119 | 0x11A => 2,   // MAX_DAASESS, DAASESS
            0x11B => 0xFFFF_FFFF, // CONTEXT_DIST
            0x11C => {
                out.put_u8(1); // DAA_INTERRUPT
                return Ok(());
            }
            0x11D => auth_free.saturating_add(TRANS_SESSIONS), // SESSIONS
            0x11E => (session::MAX_SESSIONS as u32).saturating_add(TRANS_SESSIONS),
            0x11F => 0, // CMK_RESTRICTION
            0x120 => {
                // DURATION: short, medium, long in microseconds.
                for d in [50_000_000u32, 100_000_000, 300_000_000] {
                    out.put_u32(d);
                }
                return Ok(());
            }
            0x122 => 0xFFFF_FFFF,               // ACTIVE_COUNTER
            0x123 => self.perm.nv.free(),       // MAX_NV_AVAILABLE
            0x124 => super::MAX_COMMAND as u32, // INPUT_BUFFER
            _ => return Err(TPM_BAD_MODE),
        };
        out.put_u32(v);
        Ok(())
    }

    /// TPM_GetCapabilityOwner (Part 3, 7.3): the flags as bitmaps.
    pub(crate) fn cmd_get_capability_owner(&mut self, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
        self.check(c, &[TAG_RQU_AUTH1_COMMAND])?;
        c.done()?;
        let secret = self.owner_auth()?;
        let v = self.verify(c, 0, Entity::Owner, &secret, 0)?;
        let mut pf = Vec::new();
        self.perm.flags.write(&mut pf);
        let mut sf = Vec::new();
        self.vol.flags.write(&mut sf);
        let bitmap = |bytes: &[u8]| -> u32 {
            bytes.iter().skip(2).enumerate().fold(
                0u32,
                |acc, (i, b)| {
                    if *b != 0 && i < 32 {
                        acc | (1u32 << i)
                    } else {
                        acc
                    }
                },
            )
        };
        let mut out = Vec::new();
        // The chip's version, as GetCapability(VERSION_VAL) reports it.
        out.put(VERSION_INFO.get(2..6).ok_or(TPM_FAIL)?);
        out.put_u32(bitmap(&pf));
        out.put_u32(bitmap(&sf));
        self.respond(c, &[&v], &mut out, 0);
        Ok(out)
    }
}
