//! OIAP and OSAP authorisation sessions (TPM Main Part 1, 11.2; Part 3, 18).
//!
//! An authorised command carries, per session, `authHandle ‖ nonceOdd ‖
//! continueAuthSession ‖ HMAC(secret, SHA1(ordinal ‖ params) ‖ nonceEven ‖
//! nonceOdd ‖ continue)`. The TPM answers with a fresh nonceEven and its own
//! HMAC over the output parameters. A session ends when the caller clears
//! continueAuthSession, or when the command fails (as libtpms does).

use crate::consts::*;
use crate::crypto::{ct_eq, hmac_sha1, Drbg};
use crate::marshal::{Put, Reader, TpmResult};
use crate::secret::Secret;
use alloc::vec::Vec;

/// Sessions one TPM holds at once (libtpms: TPM_MIN_AUTH_SESSIONS).
pub const MAX_SESSIONS: usize = 16;

/// Bytes of one session's trailer in a request.
pub const AUTH_IN_LEN: usize = 4 + 20 + 1 + 20;

/// What an OSAP session was opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Owner,
    Srk,
    Key(u32),
    Nv(u32),
    /// Sealed data (OIAP only).
    Data,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Oiap,
    Osap { entity: Entity, shared: Secret },
}

#[derive(Clone, Debug)]
pub struct Session {
    pub handle: u32,
    pub kind: Kind,
    pub nonce_even: [u8; 20],
}

/// The session table.
#[derive(Clone, Default)]
pub struct Sessions {
    slots: Vec<Session>,
}

impl Sessions {
    pub fn free(&self) -> usize {
        MAX_SESSIONS.saturating_sub(self.slots.len())
    }

    pub fn handles(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().map(|s| s.handle)
    }

    /// Opens a session with a fresh random handle and nonceEven.
    pub fn open(&mut self, kind: Kind, drbg: &mut Drbg) -> TpmResult<&Session> {
        if self.slots.len() >= MAX_SESSIONS {
            return Err(TPM_RESOURCES);
        }
        let handle = loop {
            let h = drbg.u32();
            // Avoid 0 and the reserved TPM_KH_* range, and any live handle.
            if h != 0 && h >> 24 != 0x40 && !self.slots.iter().any(|s| s.handle == h) {
                break h;
            }
        };
        let nonce_even = drbg.nonce();
        self.slots.push(Session { handle, kind, nonce_even });
        self.slots.last().ok_or(TPM_FAIL)
    }

    pub fn get(&self, handle: u32) -> Option<&Session> {
        self.slots.iter().find(|s| s.handle == handle)
    }

    pub fn get_mut(&mut self, handle: u32) -> Option<&mut Session> {
        self.slots.iter_mut().find(|s| s.handle == handle)
    }

    /// Ends a session; false if there was none.
    pub fn terminate(&mut self, handle: u32) -> bool {
        let before = self.slots.len();
        self.slots.retain(|s| s.handle != handle);
        self.slots.len() != before
    }

    /// Ends every OSAP session bound to `entity` (its secret changed or it
    /// went away).
    pub fn terminate_entity(&mut self, entity: Entity) {
        self.slots.retain(|s| !matches!(&s.kind, Kind::Osap { entity: e, .. } if *e == entity));
    }

    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

/// One session's trailer as the caller sent it.
#[derive(Clone, Debug)]
pub struct AuthIn {
    pub handle: u32,
    pub nonce_odd: [u8; 20],
    pub cont: bool,
    pub hmac: [u8; 20],
}

impl AuthIn {
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        Ok(AuthIn { handle: r.u32()?, nonce_odd: r.digest()?, cont: r.bool()?, hmac: r.digest()? })
    }
}

/// Why a session did not authorise a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// Refused before any HMAC was compared (no such session, a session
    /// for another entity): the dictionary-attack logic does not count it.
    Refused(u32),
    /// The HMAC did not match: a guess, which the dictionary-attack logic
    /// counts.
    Mismatch(u32),
}

/// A verified session, kept until the response is authorised.
pub struct Verified {
    pub handle: u32,
    pub key: Secret,
    pub nonce_odd: [u8; 20],
    pub cont: bool,
}

/// The HMAC both sides compute.
pub fn auth_hmac(key: &[u8; 20], digest: &[u8; 20], even: &[u8; 20], odd: &[u8; 20], cont: bool) -> [u8; 20] {
    hmac_sha1(key, &[digest, even, odd, &[u8::from(cont)]])
}

impl Sessions {
    /// Verifies `auth` for `entity`, whose secret is `secret`, over
    /// `in_digest`. `fail` is TPM_AUTHFAIL or TPM_AUTH2FAIL.
    pub fn verify(
        &self,
        auth: &AuthIn,
        entity: Entity,
        secret: &Secret,
        in_digest: &[u8; 20],
        fail: u32,
    ) -> Result<Verified, VerifyError> {
        let s = self.get(auth.handle).ok_or(VerifyError::Refused(TPM_INVALID_AUTHHANDLE))?;
        let key = match &s.kind {
            Kind::Oiap => secret.clone(),
            Kind::Osap { entity: e, shared } => {
                if *e != entity {
                    return Err(VerifyError::Refused(fail));
                }
                shared.clone()
            }
        };
        let want = auth_hmac(&key.0, in_digest, &s.nonce_even, &auth.nonce_odd, auth.cont);
        if !ct_eq(&want, &auth.hmac) {
            return Err(VerifyError::Mismatch(fail));
        }
        Ok(Verified { handle: auth.handle, key, nonce_odd: auth.nonce_odd, cont: auth.cont })
    }

    /// Rolls the nonce of a verified session and appends its response
    /// trailer: nonceEven ‖ continue ‖ HMAC.
    pub fn respond(&mut self, v: &Verified, out_digest: &[u8; 20], drbg: &mut Drbg, out: &mut Vec<u8>) {
        let even = drbg.nonce();
        if let Some(s) = self.get_mut(v.handle) {
            s.nonce_even = even;
        }
        let mac = auth_hmac(&v.key.0, out_digest, &even, &v.nonce_odd, v.cont);
        out.put(&even);
        out.put_u8(u8::from(v.cont));
        out.put(&mac);
    }

    /// The OSAP shared secret of `session`, if it is one.
    pub fn osap_shared(&self, handle: u32) -> Option<&Secret> {
        match self.get(handle).map(|s| &s.kind) {
            Some(Kind::Osap { shared, .. }) => Some(shared),
            _ => None,
        }
    }
}
