//! `vtpm-core`: a `no_std` + `alloc` TPM 1.2 engine, one instance per guest.
//!
//! The engine answers TPM 1.2 command bytes the way libtpms (swtpm) does:
//! same wire formats, return codes and state transitions for the commands it
//! implements (Tier A and Tier B of `shared/platform/TPM12.md`); every other
//! ordinal answers `TPM_BAD_ORDINAL` (0x0A).
//!
//! # Interface
//! * [`Platform`] supplies entropy and time; there is no global state.
//! * [`Tpm::manufacture`] makes a fresh chip. Its EK is decided then (by
//!   the platform's entropy) but generated only when a command first needs
//!   it: ReadPubek, OwnerReadInternalPub, TakeOwnership, ActivateIdentity.
//!   [`Tpm::permanent_state`] / [`Tpm::from_permanent`] persist and restore
//!   it, a not yet generated EK included.
//!   The caller persists when [`Tpm::permanent_dirty`] says so.
//! * [`Tpm::power_on`] is TPM_Init; the guest must then send Startup.
//! * [`Tpm::execute`] runs one command from a locality and returns the
//!   response. It never panics, whatever the bytes.
//! * TPM_SaveState produces a blob ([`Tpm::saved_state`]) that
//!   Startup(ST_STATE) consumes once; [`Tpm::set_saved_state`] hands a
//!   persisted one back after the hypervisor restarts.
//! * [`Tpm::extend`] / [`Tpm::pcr`] serve the hypervisor's measured launch;
//!   [`Tpm::hash_start`] / [`Tpm::hash_data`] / [`Tpm::hash_end`] are the
//!   TPM_HASH_* LPC sequence of a dynamic launch (DRTM).
//!
//! # Limits
//! * Commands up to 4096 bytes (larger ones: `TPM_BAD_PARAM_SIZE`).
//! * 16 authorisation sessions, 20 loaded keys (as libtpms).
//! * NV: 64 indices, 0x6FFA bytes of data in total.
//! * RSA keys are 2048-bit with e = 65537.

#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::arithmetic_side_effects)]

extern crate alloc;

pub mod consts;
pub mod crypto;
pub mod da;
pub mod flags;
pub mod key;
pub mod keys;
pub mod marshal;
pub mod nv;
pub mod pcr;
pub mod secret;
pub mod session;
pub mod state;

mod commands;
#[cfg(test)]
mod tests;

use alloc::vec::Vec;
pub use state::StateError;

/// One SHA-1 for the whole workspace (RustCrypto `sha1`).
pub fn sha1(data: &[u8]) -> [u8; 20] {
    crypto::sha1(data)
}

/// What the TPM needs from the machine it runs on.
pub trait Platform {
    /// Fills `buf` with entropy (RDRAND/RDSEED in the hypervisor, a fixed
    /// seed in tests).
    fn fill_random(&mut self, buf: &mut [u8]);
    /// Monotonic microseconds, for GetTicks.
    fn ticks_us(&mut self) -> u64;
}

/// Where the chip is in its life cycle since TPM_Init.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// After TPM_Init, waiting for Startup.
    PostInit,
    /// Started.
    Operational,
    /// Failure mode (e.g. Startup(ST_STATE) without a saved state) until
    /// the next TPM_Init.
    Failed,
    /// Failure mode entered before any Startup (a TPM_HASH_* sequence
    /// error right after TPM_Init). libtpms still counts the chip as
    /// post-init: GetCapability and GetTestResult answer
    /// TPM_INVALID_POSTINIT, everything else TPM_FAILEDSELFTEST, and the
    /// next Startup (refused with TPM_FAILEDSELFTEST) ends the post-init
    /// state, leaving [`Mode::Failed`].
    PostInitFailed,
}

/// State lost at TPM_Init.
#[derive(Clone)]
struct Volatile {
    flags: flags::StclearFlags,
    pcrs: pcr::PcrBank,
    sessions: session::Sessions,
    keys: keys::KeyTable,
    tick_nonce: [u8; 20],
    tick_base_us: u64,
    /// TPM_STANY_FLAGS.TOSPresent: set by TPM_HASH_START, cleared by
    /// TPM_Init and by every successful Startup. Decides what PCR_Reset
    /// writes to PCRs 17–22.
    tos_present: bool,
    /// The SHA-1 of a TPM_HASH_START … TPM_HASH_END sequence in progress.
    drtm: Option<crypto::Sha1Stream>,
    /// Dictionary-attack mitigation (TPM_STCLEAR_DATA in libtpms).
    da: da::DaState,
}

/// A TPM 1.2. Cloning (when the platform clones) snapshots the whole
/// chip, volatile state included.
#[derive(Clone)]
pub struct Tpm<P: Platform> {
    platform: P,
    drbg: crypto::Drbg,
    perm: state::Permanent,
    dirty: bool,
    mode: Mode,
    vol: Volatile,
    /// Holds loaded keys' private parts: zeroised when dropped.
    saved: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// True once the full self-test ran in this power cycle.
    selftest_full_done: bool,
    /// Bit n: PCR n is the platform's ([`Tpm::reserve_pcrs_to_platform`]).
    /// Configuration, not state: no blob carries it.
    platform_pcrs: u32,
}

impl<P: Platform> Tpm<P> {
    fn with_permanent(mut platform: P, perm: state::Permanent) -> Self {
        let mut seed = [0u8; 32];
        platform.fill_random(&mut seed);
        let mut drbg = crypto::Drbg::new(seed);
        let tick_base_us = platform.ticks_us();
        let tick_nonce = drbg.nonce();
        Tpm {
            platform,
            drbg,
            perm,
            dirty: false,
            mode: Mode::PostInit,
            vol: Volatile {
                flags: flags::StclearFlags::default(),
                pcrs: pcr::PcrBank::cleared(),
                sessions: session::Sessions::default(),
                keys: keys::KeyTable::default(),
                tick_nonce,
                tick_base_us,
                tos_present: false,
                drtm: None,
                da: da::DaState::default(),
            },
            saved: None,
            selftest_full_done: false,
            platform_pcrs: 0,
        }
    }

    /// A fresh chip with its endorsement key, provisioned as
    /// `swtpm_setup --createek` leaves one: EK made, physical presence
    /// command enabled, no owner. It needs Startup.
    ///
    /// The EK is deferred ([`state::Endorsement::Deferred`]): this keeps the
    /// DRBG state that would have generated it here and generates it from
    /// that state when a command first needs it, which yields the same key
    /// as generating it now. Making a chip therefore costs no RSA key
    /// generation, and a chip made from deterministic entropy (the
    /// hypervisor's per-guest seed) still gets the same EK every time.
    pub fn manufacture(platform: P) -> Self {
        let mut t = Self::manufacture_without_ek(platform);
        t.perm.ek = state::Endorsement::Deferred(t.drbg.snapshot());
        // The snapshot predicts this DRBG's next output: move it on to a
        // state the EK's generation never sees.
        let mut fresh = [0u8; 32];
        t.platform.fill_random(&mut fresh);
        t.drbg.mix(&fresh);
        t.perm.flags.cekp_used = true;
        t.perm.flags.enable_revoke_ek = false;
        t.perm.flags.pp_cmd_enable = true;
        t.dirty = true;
        t
    }

    /// A fresh chip without an EK (as libtpms before provisioning), for
    /// testing TPM_CreateEndorsementKeyPair.
    pub fn manufacture_without_ek(platform: P) -> Self {
        let mut t = Self::with_permanent(platform, state::Permanent::factory());
        t.dirty = true;
        t
    }

    /// Restores a chip from [`Tpm::permanent_state`]. Refuses corrupt or
    /// truncated blobs without loading any part of them.
    pub fn from_permanent(blob: &[u8], platform: P) -> Result<Self, StateError> {
        let perm = state::Permanent::from_blob(blob)?;
        Ok(Self::with_permanent(platform, perm))
    }

    /// [`Tpm::from_permanent`], reusing `like`'s RSA keys (EK, SRK) where
    /// the blob holds exactly the same ones instead of rebuilding them: the
    /// result is the chip `from_permanent` would make, without the key
    /// precomputation. For round trips (the fuzzer's state check, tests).
    pub fn from_permanent_like(blob: &[u8], platform: P, like: &Tpm<P>) -> Result<Self, StateError> {
        let perm = state::Permanent::from_blob_reusing(blob, &like.perm.rsa_keys())?;
        Ok(Self::with_permanent(platform, perm))
    }

    /// True once the EK exists as a key: false while it is deferred (see
    /// [`Tpm::manufacture`]) or absent. Callers check with it that bringing
    /// a chip up did not pay for an RSA key generation.
    pub fn endorsement_key_generated(&self) -> bool {
        self.perm.ek.key().is_some()
    }

    /// The EK's public modulus (256 bytes), for its certificate. A deferred
    /// EK is generated now (seconds of RSA work; the permanent state then
    /// holds it and is dirty). TPM_NO_ENDORSEMENT without an EK.
    pub fn endorsement_modulus(&mut self) -> Result<Vec<u8>, u32> {
        self.endorsement_key().map(|k| k.modulus())
    }

    /// Ends manufacturing: sets TPM_PERMANENT_FLAGS.nvLocked, as
    /// NV_DefineSpace(TPM_NV_INDEX_LOCK) does. Until then NV attributes
    /// are not enforced (TPM 1.2's manufacturing mode, kept by
    /// [`Tpm::manufacture`] as swtpm_setup leaves a chip): anyone could
    /// rewrite the EK certificate without the owner. Call it after
    /// [`Tpm::provision_nv`].
    pub fn lock_nv(&mut self) {
        if !self.perm.flags.nv_locked {
            self.perm.flags.nv_locked = true;
            self.dirty = true;
        }
    }

    /// The versioned, checksummed permanent state.
    pub fn permanent_state(&self) -> Vec<u8> {
        self.perm.to_blob()
    }

    /// True when the permanent state changed since [`Tpm::clear_dirty`].
    pub fn permanent_dirty(&self) -> bool {
        self.dirty
    }

    /// Marks the permanent state as persisted.
    pub fn clear_dirty(&mut self) {
        self.dirty = false;
    }

    /// The state TPM_SaveState produced, while it is still valid (any
    /// command after SaveState other than Startup(ST_STATE) invalidates it).
    pub fn saved_state(&self) -> Option<Vec<u8>> {
        self.saved.as_ref().map(|s| s.to_vec())
    }

    /// Hands back a persisted saved state, for Startup(ST_STATE) after the
    /// hypervisor restarted.
    pub fn set_saved_state(&mut self, blob: &[u8]) -> Result<(), StateError> {
        let s = state::Saved::from_blob(blob)?;
        if s.identity != self.perm.identity() {
            return Err(StateError::WrongTpm);
        }
        self.saved = Some(zeroize::Zeroizing::new(blob.to_vec()));
        Ok(())
    }

    /// TPM_Init: a power cycle. Volatile state is lost; the chip waits for
    /// Startup. A saved state survives (that is its purpose).
    pub fn power_on(&mut self) {
        let mut fresh = [0u8; 32];
        self.platform.fill_random(&mut fresh);
        self.drbg.mix(&fresh);
        self.mode = Mode::PostInit;
        self.vol.flags = flags::StclearFlags::default();
        self.vol.pcrs = pcr::PcrBank::cleared();
        self.vol.sessions.clear();
        self.vol.keys.clear();
        self.vol.tick_nonce = self.drbg.nonce();
        self.vol.tick_base_us = self.platform.ticks_us();
        self.vol.tos_present = false;
        self.vol.drtm = None;
        self.vol.da = da::DaState::default();
        self.selftest_full_done = false;
    }

    /// TPM_HASH_START, the LPC command of a dynamic launch (DRTM), sent by
    /// the platform at locality 4 outside the command stream (swtpm's
    /// CMD_HASH_START). It sets TPM_PERMANENT_FLAGS.tpmEstablished (the
    /// permanent state becomes dirty) and TOSPresent, zeroes PCRs 17–22 and
    /// starts a SHA-1 that [`Tpm::hash_data`] feeds and [`Tpm::hash_end`]
    /// extends into PCR 17.
    ///
    /// As in libtpms, every error here puts the TPM into failure mode until
    /// the next TPM_Init: before Startup it answers TPM_INVALID_POSTINIT;
    /// while a sequence is already open, TPM_FAIL.
    pub fn hash_start(&mut self) -> Result<(), u32> {
        if matches!(self.mode, Mode::PostInit | Mode::PostInitFailed) {
            self.mode = Mode::PostInitFailed;
            return Err(consts::TPM_INVALID_POSTINIT);
        }
        if !self.perm.flags.tpm_established {
            self.perm.flags.tpm_established = true;
            self.dirty = true;
        }
        self.vol.tos_present = true;
        self.vol.pcrs.hash_start();
        if self.vol.drtm.is_some() {
            self.enter_failure_mode();
            return Err(consts::TPM_FAIL);
        }
        self.vol.drtm = Some(crypto::Sha1Stream::default());
        Ok(())
    }

    /// TPM_HASH_DATA: more of the measured launch code. Without a
    /// TPM_HASH_START it answers TPM_SHA_THREAD and the TPM enters failure
    /// mode (as libtpms).
    pub fn hash_data(&mut self, data: &[u8]) -> Result<(), u32> {
        match self.vol.drtm.as_mut() {
            Some(h) => {
                crypto::sha1_update(h, data);
                Ok(())
            }
            None => {
                self.enter_failure_mode();
                Err(consts::TPM_SHA_THREAD)
            }
        }
    }

    /// TPM_HASH_END: PCR 17 = SHA1(zero ‖ SHA1(data)), ending the sequence.
    /// Without a TPM_HASH_START: TPM_SHA_THREAD and failure mode.
    pub fn hash_end(&mut self) -> Result<(), u32> {
        match self.vol.drtm.take() {
            Some(h) => {
                self.vol.pcrs.hash_end(&crypto::sha1_finish(h));
                Ok(())
            }
            None => {
                self.enter_failure_mode();
                Err(consts::TPM_SHA_THREAD)
            }
        }
    }

    /// TPM_PERMANENT_FLAGS.tpmEstablished: a dynamic launch happened since
    /// the flag was last reset.
    pub fn tpm_established(&self) -> bool {
        self.perm.flags.tpm_established
    }

    /// Resets tpmEstablished, which only localities 3 and 4 may do
    /// (TPM_BAD_LOCALITY otherwise).
    pub fn reset_established(&mut self, locality: u8) -> Result<(), u32> {
        if locality != 3 && locality != 4 {
            return Err(consts::TPM_BAD_LOCALITY);
        }
        if self.perm.flags.tpm_established {
            self.perm.flags.tpm_established = false;
            self.dirty = true;
        }
        Ok(())
    }

    /// Puts the chip in failure mode, as a failed self-test does, until
    /// the next TPM_Init: every command but GetCapability (version and
    /// vendor properties), GetTestResult and Startup answers
    /// TPM_FAILEDSELFTEST. The hypervisor's answer to a vTPM state it
    /// refused to load: the guest sees a broken chip, never a new one.
    pub fn fail(&mut self) {
        self.enter_failure_mode();
    }

    /// Failure mode until the next TPM_Init, keeping the post-init state.
    fn enter_failure_mode(&mut self) {
        self.mode = match self.mode {
            Mode::PostInit | Mode::PostInitFailed => Mode::PostInitFailed,
            Mode::Operational | Mode::Failed => Mode::Failed,
        };
    }

    /// Runs one command sent from `locality` (0–4) and returns the response.
    pub fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        commands::execute(self, locality, command)
    }

    /// Extends a PCR for the hypervisor (measured launch), with the same
    /// locality rules as TPM_Extend (platform PCRs included). Returns the new value or a TPM error.
    ///
    /// Startup(ST_CLEAR) resets the PCRs, so measure after Startup: the
    /// hypervisor can send Startup(ST_CLEAR) itself through [`Tpm::execute`]
    /// before the guest runs; Linux then sees TPM_INVALID_POSTINIT for its
    /// own Startup only if it sends one, and it sends one only when its first
    /// GetCapability answers TPM_INVALID_POSTINIT.
    pub fn extend(&mut self, locality: u8, pcr: u32, digest: &[u8; 20]) -> Result<[u8; 20], u32> {
        if usize::try_from(pcr).is_ok_and(|i| self.reserved_from(locality, i)) {
            return Err(consts::TPM_BAD_LOCALITY);
        }
        self.vol.pcrs.extend(locality, pcr, digest)
    }

    /// Reserves the PCRs of `mask` (bit n = PCR n) to the platform: a
    /// command sent from a locality below 4 may read and quote them but not
    /// extend (TPM_BAD_LOCALITY) or reset (TPM_NOTLOCAL) them; locality 4
    /// (the hypervisor, which no TIS page gives a guest) still may. Off by
    /// default, so that the chip stays a specification TPM 1.2 (a PC Client
    /// TPM lets locality 0 extend PCRs 0–16). It is configuration, not
    /// state: neither the permanent nor the saved state carries it, and a
    /// chip restored from either has none until its owner sets it again.
    pub fn reserve_pcrs_to_platform(&mut self, mask: u32) {
        self.platform_pcrs = mask & ((1u32 << pcr::NUM_PCRS) - 1);
    }

    /// The platform's monotonic clock, in microseconds: for the one who
    /// runs the chip to time what waits on it.
    pub fn platform_ticks_us(&mut self) -> u64 {
        self.platform.ticks_us()
    }

    /// The PCRs [`Tpm::reserve_pcrs_to_platform`] reserved.
    pub fn platform_pcrs(&self) -> u32 {
        self.platform_pcrs
    }

    /// True when `locality` may not change PCR `index` because it is the
    /// platform's.
    fn reserved_from(&self, locality: u8, index: usize) -> bool {
        locality != 4
            && u32::try_from(index).ok().and_then(|i| 1u32.checked_shl(i)).is_some_and(|b| self.platform_pcrs & b != 0)
    }

    /// Current value of a PCR, or None for an index beyond 23.
    pub fn pcr(&self, pcr: u32) -> Option<[u8; 20]> {
        self.vol.pcrs.get(pcr).ok()
    }

    /// TPM_CreateEndorsementKeyPair's key, generated at once (the
    /// response carries it).
    fn create_ek(&mut self) -> bool {
        match crypto::RsaKey::generate(&mut self.drbg) {
            Some(k) => {
                self.perm.ek = state::Endorsement::Present(k);
                self.perm.flags.cekp_used = true;
                self.perm.flags.enable_revoke_ek = false;
                self.dirty = true;
                true
            }
            None => false,
        }
    }

    /// The EK, generated now if it was deferred (the permanent state then
    /// holds the key and is dirty). TPM_NO_ENDORSEMENT when there is none.
    fn endorsement_key(&mut self) -> Result<&crypto::RsaKey, u32> {
        if let state::Endorsement::Deferred(s) = &self.perm.ek {
            let mut drbg = crypto::Drbg::replay(s);
            let key = crypto::RsaKey::generate(&mut drbg).ok_or(consts::TPM_FAIL)?;
            self.perm.ek = state::Endorsement::Present(key);
            self.dirty = true;
        }
        self.perm.ek.key().ok_or(consts::TPM_NO_ENDORSEMENT)
    }

    /// The platform's clock in whole seconds, the dictionary-attack
    /// logic's unit (libtpms reads the time of day in seconds).
    fn now_s(&mut self) -> u32 {
        (self.platform.ticks_us() / 1_000_000) as u32
    }

    /// Authorisation failures counted by the dictionary-attack logic since
    /// its last reset (GetCapability(DA_LOGIC) reports the same).
    pub fn auth_fail_count(&self) -> u32 {
        self.vol.da.fail_count
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    fn reseed_if_due(&mut self) {
        if self.drbg.needs_reseed() {
            let mut e = [0u8; 32];
            self.platform.fill_random(&mut e);
            self.drbg.mix(&e);
        }
    }
}
