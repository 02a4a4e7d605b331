//! Command framing, dispatch and the checks common to all ordinals.
//!
//! The order of checks follows libtpms' `TPM_Process`: size, ordinal, then
//! per ordinal: parameters, state (failure mode, post-init, enabled,
//! activated, owner), tag, authorisation, trailing bytes.

mod admin;
mod capability;
mod ek;
mod identity;
mod keys;
mod nv;
mod ownership;
mod pcr;
mod random;
mod seal;
mod sessions;
mod startup;

use crate::consts::*;
use crate::crypto::sha1_parts;
use crate::marshal::{Put, Reader, TpmResult};
use crate::secret::Secret;
use crate::session::{AuthIn, Entity, Verified, VerifyError};
use crate::{Mode, Platform, Tpm};
use alloc::vec::Vec;

/// Largest command and response (TPM_CAP_PROP_INPUT_BUFFER).
pub const MAX_COMMAND: usize = 4096;
const HEADER: usize = 10;

/// One request being parsed. As in libtpms, parameters are read first from
/// the whole body, then the authorisation trailers from what follows them,
/// and nothing may be left over.
pub(crate) struct Cmd<'a> {
    pub tag: u16,
    pub ordinal: u32,
    pub locality: u8,
    body: &'a [u8],
    /// The parameters, once [`Cmd::done`] ran.
    pub params: &'a [u8],
    pub r: Reader<'a>,
    auths: [Option<AuthIn>; 2],
    /// Sessions named by this command, ended if it fails.
    pub used: [Option<u32>; 2],
}

impl<'a> Cmd<'a> {
    fn new(tag: u16, ordinal: u32, locality: u8, body: &'a [u8]) -> Self {
        Cmd { tag, ordinal, locality, body, params: &[], r: Reader::new(body), auths: [None, None], used: [None, None] }
    }

    /// Requires the tag to be one of `tags` (TPM_BADTAG otherwise).
    pub fn tag_in(&self, tags: &[u16]) -> TpmResult<()> {
        if tags.contains(&self.tag) {
            Ok(())
        } else {
            Err(TPM_BADTAG)
        }
    }

    /// Ends parameter parsing: reads the trailers the tag announces and
    /// requires that nothing is left.
    pub fn done(&mut self) -> TpmResult<()> {
        let consumed = self.body.len().saturating_sub(self.r.remaining());
        self.params = self.body.get(..consumed).unwrap_or(&[]);
        let n: usize = match self.tag {
            TAG_RQU_AUTH1_COMMAND => 1,
            TAG_RQU_AUTH2_COMMAND => 2,
            _ => 0,
        };
        for (slot, used) in self.auths.iter_mut().zip(self.used.iter_mut()).take(n) {
            let a = AuthIn::read(&mut self.r)?;
            *used = Some(a.handle);
            *slot = Some(a);
        }
        self.r.finish()
    }

    /// The `i`-th session trailer (0 or 1), after [`Cmd::done`].
    pub fn auth(&mut self, i: usize) -> TpmResult<AuthIn> {
        self.auths.get(i).and_then(|a| a.clone()).ok_or(TPM_BAD_PARAM_SIZE)
    }

    /// Number of sessions the command carries.
    pub fn n_auths(&self) -> usize {
        self.auths.iter().filter(|a| a.is_some()).count()
    }

    /// inParamDigest: SHA1(ordinal ‖ parameters after the first
    /// `handle_bytes` bytes of handles).
    pub fn in_digest(&self, handle_bytes: usize) -> [u8; 20] {
        let p = self.params.get(handle_bytes..).unwrap_or(&[]);
        sha1_parts(&[&self.ordinal.to_be_bytes(), p])
    }
}

/// Which states an ordinal runs in.
#[derive(Clone, Copy)]
struct Avail {
    disabled: bool,
    deactivated: bool,
    /// Needs an owner (TPM_NOSRK otherwise), as libtpms' TPM_CHECK_OWNER.
    owner: bool,
}

const ANY: Avail = Avail { disabled: true, deactivated: true, owner: false };
const ACTIVE: Avail = Avail { disabled: false, deactivated: false, owner: false };
const OWNED: Avail = Avail { disabled: false, deactivated: false, owner: true };
const ANY_OWNED: Avail = Avail { disabled: true, deactivated: true, owner: true };

/// The ordinals this TPM implements and when they are available (the
/// owner column follows what libtpms answers without an owner).
fn availability(ordinal: u32) -> Option<Avail> {
    Some(match ordinal {
        ORD_STARTUP
        | ORD_SAVE_STATE
        | ORD_SELF_TEST_FULL
        | ORD_CONTINUE_SELF_TEST
        | ORD_GET_TEST_RESULT
        | ORD_GET_CAPABILITY
        | ORD_EXTEND
        | ORD_PCR_RESET
        | ORD_OIAP
        | ORD_OSAP
        | ORD_FLUSH_SPECIFIC
        | ORD_TERMINATE_HANDLE
        | ORD_FORCE_CLEAR
        | ORD_PHYSICAL_ENABLE
        | ORD_PHYSICAL_DISABLE
        | ORD_PHYSICAL_SET_DEACTIVATED
        | ORD_SET_OWNER_INSTALL
        | TSC_ORD_PHYSICAL_PRESENCE
        | ORD_CREATE_ENDORSEMENT_KEY_PAIR => ANY,
        ORD_OWNER_CLEAR => ANY_OWNED,
        ORD_PCR_READ
        | ORD_GET_RANDOM
        | ORD_STIR_RANDOM
        | ORD_GET_TICKS
        | ORD_READ_PUBEK
        | ORD_TAKE_OWNERSHIP
        | ORD_NV_DEFINE_SPACE
        | ORD_NV_WRITE_VALUE
        | ORD_NV_READ_VALUE
        | ORD_DISABLE_PUBEK_READ
        | ORD_OWNER_READ_INTERNAL_PUB
        | ORD_GET_CAPABILITY_OWNER => ACTIVE,
        ORD_CREATE_WRAP_KEY
        | ORD_LOAD_KEY
        | ORD_LOAD_KEY2
        | ORD_GET_PUB_KEY
        | ORD_EVICT_KEY
        | ORD_SIGN
        | ORD_UNBIND
        | ORD_SEAL
        | ORD_UNSEAL
        | ORD_QUOTE
        | ORD_QUOTE2
        | ORD_MAKE_IDENTITY
        | ORD_ACTIVATE_IDENTITY
        | ORD_NV_WRITE_VALUE_AUTH
        | ORD_NV_READ_VALUE_AUTH
        | ORD_CHANGE_AUTH_OWNER
        | ORD_RESET_LOCK_VALUE => OWNED,
        _ => return None,
    })
}

/// An error response: tag 0xC4, size 10, the code.
pub(crate) fn error_response(rc: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER);
    v.put_u16(TAG_RSP_COMMAND);
    v.put_u32(HEADER as u32);
    v.put_u32(rc);
    v
}

pub(crate) fn execute<P: Platform>(tpm: &mut Tpm<P>, locality: u8, command: &[u8]) -> Vec<u8> {
    tpm.reseed_if_due();
    match process(tpm, locality, command) {
        Ok((tag, body)) => {
            let Some(len) = body.len().checked_add(HEADER).filter(|l| *l <= MAX_COMMAND) else {
                return error_response(TPM_SIZE);
            };
            let mut v = Vec::with_capacity(len);
            v.put_u16(tag.wrapping_add(3));
            v.put_u32(len as u32);
            v.put_u32(TPM_SUCCESS);
            v.put(&body);
            v
        }
        Err(rc) => error_response(rc),
    }
}

fn process<P: Platform>(tpm: &mut Tpm<P>, locality: u8, command: &[u8]) -> TpmResult<(u16, Vec<u8>)> {
    if command.len() > MAX_COMMAND {
        return Err(TPM_BAD_PARAM_SIZE);
    }
    let mut r = Reader::new(command);
    let tag = r.u16()?;
    let size = r.u32()?;
    let ordinal = r.u32()?;
    if size as usize != command.len() {
        return Err(TPM_BAD_PARAM_SIZE);
    }
    availability(ordinal).ok_or(TPM_BAD_ORDINAL)?;
    // Any command other than SaveState itself invalidates a saved state
    // (Startup takes it itself: Startup(ST_STATE) consumes it, any other
    // Startup drops it).
    if ordinal != ORD_SAVE_STATE && ordinal != ORD_STARTUP {
        tpm.saved = None;
    }
    if locality > 4 {
        return Err(TPM_BAD_LOCALITY);
    }
    let body = command.get(HEADER..).unwrap_or(&[]);
    let mut c = Cmd::new(tag, ordinal, locality, body);
    let result = dispatch(tpm, &mut c);
    if result.is_err() {
        for h in c.used.iter().flatten() {
            tpm.vol.sessions.terminate(*h);
        }
    }
    result.map(|b| (tag, b))
}

fn dispatch<P: Platform>(tpm: &mut Tpm<P>, c: &mut Cmd<'_>) -> TpmResult<Vec<u8>> {
    match c.ordinal {
        ORD_STARTUP => tpm.cmd_startup(c),
        ORD_SAVE_STATE => tpm.cmd_save_state(c),
        ORD_SELF_TEST_FULL | ORD_CONTINUE_SELF_TEST => tpm.cmd_self_test(c),
        ORD_GET_TEST_RESULT => tpm.cmd_get_test_result(c),
        ORD_GET_CAPABILITY => tpm.cmd_get_capability(c),
        ORD_PCR_READ => tpm.cmd_pcr_read(c),
        ORD_EXTEND => tpm.cmd_extend(c),
        ORD_PCR_RESET => tpm.cmd_pcr_reset(c),
        ORD_GET_RANDOM => tpm.cmd_get_random(c),
        ORD_STIR_RANDOM => tpm.cmd_stir_random(c),
        ORD_GET_TICKS => tpm.cmd_get_ticks(c),
        ORD_OIAP => tpm.cmd_oiap(c),
        ORD_OSAP => tpm.cmd_osap(c),
        ORD_FLUSH_SPECIFIC => tpm.cmd_flush_specific(c),
        ORD_TERMINATE_HANDLE => tpm.cmd_terminate_handle(c),
        ORD_READ_PUBEK => tpm.cmd_read_pubek(c),
        ORD_CREATE_ENDORSEMENT_KEY_PAIR => tpm.cmd_create_ek(c),
        ORD_OWNER_READ_INTERNAL_PUB => tpm.cmd_owner_read_internal_pub(c),
        ORD_DISABLE_PUBEK_READ => tpm.cmd_disable_pubek_read(c),
        ORD_TAKE_OWNERSHIP => tpm.cmd_take_ownership(c),
        ORD_OWNER_CLEAR => tpm.cmd_owner_clear(c),
        ORD_CHANGE_AUTH_OWNER => tpm.cmd_change_auth_owner(c),
        ORD_RESET_LOCK_VALUE => tpm.cmd_reset_lock_value(c),
        ORD_FORCE_CLEAR => tpm.cmd_force_clear(c),
        ORD_PHYSICAL_ENABLE | ORD_PHYSICAL_DISABLE => tpm.cmd_physical_enable(c),
        ORD_PHYSICAL_SET_DEACTIVATED => tpm.cmd_physical_set_deactivated(c),
        ORD_SET_OWNER_INSTALL => tpm.cmd_set_owner_install(c),
        TSC_ORD_PHYSICAL_PRESENCE => tpm.cmd_physical_presence(c),
        ORD_GET_CAPABILITY_OWNER => tpm.cmd_get_capability_owner(c),
        ORD_CREATE_WRAP_KEY => tpm.cmd_create_wrap_key(c),
        ORD_LOAD_KEY | ORD_LOAD_KEY2 => tpm.cmd_load_key(c),
        ORD_GET_PUB_KEY => tpm.cmd_get_pub_key(c),
        ORD_EVICT_KEY => tpm.cmd_evict_key(c),
        ORD_SIGN => tpm.cmd_sign(c),
        ORD_UNBIND => tpm.cmd_unbind(c),
        ORD_SEAL => tpm.cmd_seal(c),
        ORD_UNSEAL => tpm.cmd_unseal(c),
        ORD_QUOTE => tpm.cmd_quote(c),
        ORD_QUOTE2 => tpm.cmd_quote2(c),
        ORD_MAKE_IDENTITY => tpm.cmd_make_identity(c),
        ORD_ACTIVATE_IDENTITY => tpm.cmd_activate_identity(c),
        ORD_NV_DEFINE_SPACE => tpm.cmd_nv_define_space(c),
        ORD_NV_WRITE_VALUE | ORD_NV_WRITE_VALUE_AUTH => tpm.cmd_nv_write(c),
        ORD_NV_READ_VALUE | ORD_NV_READ_VALUE_AUTH => tpm.cmd_nv_read(c),
        _ => Err(TPM_BAD_ORDINAL),
    }
}

impl<P: Platform> Tpm<P> {
    /// The checks every ordinal makes once its parameters are read, in
    /// libtpms' order (TPM_CheckState, then the tag): failure mode
    /// (TPM_FAILEDSELFTEST, except for GetCapability, GetTestResult and
    /// Startup, which handle it themselves), waiting for Startup
    /// (TPM_INVALID_POSTINIT), enabled, activated, owner present.
    ///
    /// Before all of them, as libtpms' TPM_CheckState, the dictionary-attack
    /// lockout for authorised commands (Startup, which libtpms never checks,
    /// and TPM_ResetLockValue, the way out of a lockout, excepted).
    pub(crate) fn check(&mut self, c: &Cmd<'_>, tags: &[u16]) -> TpmResult<()> {
        if c.tag != TAG_RQU_COMMAND && !matches!(c.ordinal, ORD_STARTUP | ORD_RESET_LOCK_VALUE) {
            let now = self.now_s();
            self.vol.da.check(now)?;
        }
        let exempt = matches!(c.ordinal, ORD_GET_TEST_RESULT | ORD_GET_CAPABILITY | ORD_STARTUP);
        if matches!(self.mode, Mode::Failed | Mode::PostInitFailed) && !exempt {
            return Err(TPM_FAILEDSELFTEST);
        }
        if matches!(self.mode, Mode::PostInit | Mode::PostInitFailed) && c.ordinal != ORD_STARTUP {
            return Err(TPM_INVALID_POSTINIT);
        }
        if let (Mode::Operational, Some(avail)) = (self.mode, availability(c.ordinal)) {
            if self.perm.flags.disable && !avail.disabled {
                return Err(TPM_DISABLED);
            }
            if self.vol.flags.deactivated && !avail.deactivated {
                return Err(TPM_DEACTIVATED);
            }
            if avail.owner && self.perm.owner.is_none() {
                return Err(TPM_NOSRK);
            }
        }
        c.tag_in(tags)
    }

    /// Verifies session `i` of `c` for `entity` with `secret`, over the
    /// parameters after `handle_bytes`. The failure code follows the
    /// session's position (TPM_AUTHFAIL / TPM_AUTH2FAIL).
    pub(crate) fn verify(
        &mut self,
        c: &mut Cmd<'_>,
        i: usize,
        entity: Entity,
        secret: &Secret,
        handle_bytes: usize,
    ) -> TpmResult<Verified> {
        let a = c.auth(i)?;
        let fail = if i == 0 { TPM_AUTHFAIL } else { TPM_AUTH2FAIL };
        let digest = c.in_digest(handle_bytes);
        match self.vol.sessions.verify(&a, entity, secret, &digest, fail) {
            Ok(v) => Ok(v),
            Err(VerifyError::Refused(rc)) => Err(rc),
            Err(VerifyError::Mismatch(rc)) => {
                let now = self.now_s();
                self.vol.da.fail(now);
                Err(rc)
            }
        }
    }

    /// Appends the response trailers of the verified sessions to `out`
    /// (whose first `handle_bytes` are handles, outside the HMAC) and ends
    /// those the caller did not continue.
    pub(crate) fn respond(&mut self, c: &Cmd<'_>, verified: &[&Verified], out: &mut Vec<u8>, handle_bytes: usize) {
        let digest =
            sha1_parts(&[&TPM_SUCCESS.to_be_bytes(), &c.ordinal.to_be_bytes(), out.get(handle_bytes..).unwrap_or(&[])]);
        for v in verified {
            self.vol.sessions.respond(v, &digest, &mut self.drbg, out);
        }
        for v in verified {
            if !v.cont {
                self.vol.sessions.terminate(v.handle);
            }
        }
    }

    /// Decrypts a new secret sent with ADIP under the OSAP session `auth`
    /// (XOR with SHA1(sharedSecret ‖ nonce)).
    pub(crate) fn adip_decrypt(&self, handle: u32, enc: &[u8; 20], nonce: &[u8; 20]) -> TpmResult<Secret> {
        let shared = self.vol.sessions.osap_shared(handle).ok_or(TPM_BAD_MODE)?;
        Ok(Secret(crate::crypto::adip_xor(enc, &shared.0, nonce)))
    }

    /// The nonceEven a session holds now (the one the caller used).
    pub(crate) fn nonce_even(&self, handle: u32) -> TpmResult<[u8; 20]> {
        self.vol.sessions.get(handle).map(|s| s.nonce_even).ok_or(TPM_INVALID_AUTHHANDLE)
    }

    /// The owner secret; an unowned TPM answers TPM_NOSRK (as libtpms).
    pub(crate) fn owner_auth(&self) -> TpmResult<Secret> {
        self.perm.owner.as_ref().map(|o| o.auth.clone()).ok_or(TPM_NOSRK)
    }

    /// Physical presence is asserted (TSC_PhysicalPresence).
    pub(crate) fn physical_presence(&self) -> bool {
        self.vol.flags.physical_presence
    }
}
