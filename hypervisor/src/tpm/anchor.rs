//! What roots a vTPM's persistent state in the platform: the key that seals
//! its state blobs and the EK certificates' CA ([`SealingRoot`]), and the
//! monotonic counter that makes an old blob stale ([`RollbackAnchor`]).
//!
//! With a platform TPM, [`PlatformRoot`] makes each durable vTPM a random
//! state key, seals it to CTVM's measured configuration in the chip, and
//! writes the sealed key in front of every blob of that vTPM; a boot under
//! another configuration (or on another machine) cannot unseal it. Its CA
//! and the version table of every durable guest, anchored in the chip's
//! monotonic counter, are the host's (`tpm::host`). Without a platform
//! TPM, [`SeedRoot`] derives the key and the CA from the `vtpm.seed`
//! module and [`NoCounter`] is honest about having no counter; CTVM says
//! at boot that all three are weaker (whoever reads the seed module can
//! open and forge the blobs and issue certificates under the CA; an older
//! blob of the guest is accepted).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use sha2::{Digest, Sha256};
use vtpm_trust::blob::StateKey;
use vtpm_trust::ekcert::CaKey;
use zeroize::Zeroizing;

use super::host::Host;

/// Why a blob's state key could not be had, or a new one made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The key is sealed to a platform TPM, and this boot has none.
    NeedsPlatformTpm,
    /// The blob is sealed under `vtpm.seed` alone while a platform TPM
    /// roots this host's keys: refused, since whoever holds the seed could
    /// have made it.
    SeedOnly,
    /// The sealed key in front of the blob does not parse.
    Malformed,
    /// The platform TPM would not unseal the key: CTVM's measured
    /// configuration is not the one it was sealed to, or it is another
    /// machine's key.
    Unseal(String),
    /// The platform TPM could not seal a new key.
    Seal(String),
    /// The CA is bound to the platform TPM and its secret is not to be had
    /// (`tpm::host::HostError`): no certificate is issued.
    Ca(String),
}

impl core::fmt::Display for KeyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KeyError::NeedsPlatformTpm => f.write_str("its key is sealed to a platform TPM, and this boot has none"),
            KeyError::SeedOnly => {
                f.write_str("it is sealed under vtpm.seed alone, and this host's keys are sealed to its platform TPM")
            }
            KeyError::Malformed => f.write_str("the platform-sealed key in front of it is malformed"),
            KeyError::Unseal(e) => write!(
                f,
                "the platform TPM refused to unseal its key ({e}): CTVM's measured configuration changed, or the blob is another machine's"
            ),
            KeyError::Seal(e) => write!(f, "the platform TPM could not seal a new state key ({e})"),
            KeyError::Ca(e) => write!(f, "the vTPM CA is sealed to the platform TPM and not available: {e}"),
        }
    }
}

/// The secrets a host's vTPMs are sealed and certified under.
pub trait SealingRoot {
    /// Names the root on the console ("vtpm.seed", "the platform TPM").
    fn name(&self) -> &'static str;
    /// What an attacker gains over this root, said at every durable boot;
    /// None for a platform TPM.
    fn weakness(&self) -> Option<&'static str>;
    /// A new vTPM's state key, and what goes in front of each of its blobs
    /// so that a later boot finds the key again (empty when derived).
    /// `entropy` gives fresh random bytes.
    fn new_key(&self, entropy: &mut dyn FnMut(&mut [u8])) -> Result<(StateKey, Vec<u8>), KeyError>;
    /// The key a stored file was sealed under, what goes in front of its
    /// next blobs, and the sealed blob itself.
    fn open_key<'b>(&self, file: &'b [u8]) -> Result<(StateKey, Vec<u8>, &'b [u8]), KeyError>;
    /// The host's "CTVM vTPM CA". Deriving it costs an RSA-2048 key
    /// generation: call it only to issue a certificate. An error when it
    /// is bound to a platform TPM that would not give its secret: never a
    /// fallback to another CA.
    fn ca(&self) -> Result<CaKey, KeyError>;
    /// What an attacker gains over the CA, said when it issues; None when
    /// it is bound to the measured launch.
    fn ca_weakness(&self) -> Option<&'static str>;
}

/// Why the counter could not be read or moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorError(pub String);

/// A monotonic counter per guest that survives power cuts and that no
/// guest can touch: the newest committed version of its vTPM state.
pub trait RollbackAnchor {
    /// Whether this anchor has a counter at all (else rollback across
    /// reboots cannot be detected).
    fn detects_rollback(&self) -> bool;
    /// Why rollback goes undetected, when it does.
    fn why_undetected(&self) -> &'static str {
        "no platform TPM counter"
    }
    /// The committed version of `guest`'s state; None when this anchor
    /// keeps no counter.
    fn committed(&mut self, guest: &str) -> Result<Option<u64>, AnchorError>;
    /// Makes `version` the committed version, durably, before returning.
    /// Never moves the counter back.
    fn commit(&mut self, guest: &str, version: u64) -> Result<(), AnchorError>;
    /// Checks and removes this anchor's record at the front of a stored
    /// blob (after the sealing root's prefix); what follows it.
    fn strip<'b>(&mut self, _guest: &str, file: &'b [u8]) -> Result<&'b [u8], AnchorError> {
        Ok(file)
    }
    /// The record to put in front of `guest`'s blob of `version` (after
    /// the sealing root's prefix), to be committed with it; None while the
    /// anchor cannot take it yet (another guest's is out: ask again).
    fn record(&mut self, _guest: &str, _version: u64) -> Result<Option<Vec<u8>>, AnchorError> {
        Ok(Some(Vec::new()))
    }
}

/// The sealing root derived from the `vtpm.seed` module: HKDF-SHA256 for
/// the state key, a deterministic RSA generation for the CA (both in
/// `vtpm-trust`, with separate labels).
pub struct SeedRoot {
    seed: Zeroizing<[u8; 32]>,
}

impl SeedRoot {
    pub fn new(seed: [u8; 32]) -> Self {
        SeedRoot { seed: Zeroizing::new(seed) }
    }

    /// The state key every blob of this host is sealed under.
    pub fn state_key(&self) -> StateKey {
        StateKey::derive(&self.seed)
    }
}

impl SealingRoot for SeedRoot {
    fn name(&self) -> &'static str {
        "vtpm.seed"
    }

    fn weakness(&self) -> Option<&'static str> {
        Some("the state key is derived from vtpm.seed, not sealed to a platform TPM: whoever reads the seed module can open and forge this guest's blobs")
    }

    fn new_key(&self, _entropy: &mut dyn FnMut(&mut [u8])) -> Result<(StateKey, Vec<u8>), KeyError> {
        Ok((self.state_key(), Vec::new()))
    }

    fn open_key<'b>(&self, file: &'b [u8]) -> Result<(StateKey, Vec<u8>, &'b [u8]), KeyError> {
        if file.starts_with(PLATFORM_SEALED) {
            return Err(KeyError::NeedsPlatformTpm);
        }
        Ok((self.state_key(), Vec::new(), file))
    }

    fn ca(&self) -> Result<CaKey, KeyError> {
        Ok(CaKey::derive(&self.seed))
    }

    fn ca_weakness(&self) -> Option<&'static str> {
        Some("the vTPM CA is derived from vtpm.seed, not bound to a measured launch: whoever reads the seed module can issue EK certificates under it")
    }
}

/// The platform TPM's sealing API, as the roots use it: on bare metal
/// `arch::x86_64::platform::{seal_vtpm_key, unseal_vtpm_key, vtpm_counter}`
/// (`platform::tpm::seal`); in host tests libtpms or a model.
pub trait PlatformSeal {
    /// Seals `key` to CTVM's measured configuration.
    fn seal(&self, key: &[u8; 32]) -> Result<Vec<u8>, String>;
    /// Releases what [`PlatformSeal::seal`] sealed, only under the same
    /// configuration.
    fn unseal(&self, sealed: &[u8]) -> Result<[u8; 32], String>;
    /// CTVM's monotonic counter: read, or advanced by one; its value.
    fn counter(&self, advance: bool) -> Result<u64, String>;
}

/// What a platform-rooted blob file starts with, before the sealed key
/// (u16 length, big-endian) and the state blob (`vtpm_trust::blob`).
pub const PLATFORM_SEALED: &[u8; 8] = b"CTVMPSK1";

/// The state key sealed to the platform TPM, one per vTPM; the CA derived
/// from the host secret sealed to the same measurement (`tpm::host`).
pub struct PlatformRoot<S: PlatformSeal> {
    chip: S,
    seed: SeedRoot,
    host: Host<S>,
}

impl<S: PlatformSeal> PlatformRoot<S> {
    pub fn new(chip: S, seed: [u8; 32], host: Host<S>) -> Self {
        PlatformRoot { chip, seed: SeedRoot::new(seed), host }
    }

    /// The state key of a sealed secret: the secret and the seed, hashed
    /// together, so that a weak entropy source alone cannot give it away.
    fn key_of(&self, secret: &[u8; 32]) -> StateKey {
        let mut h = Sha256::new_with_prefix(b"CTVM platform-sealed vTPM state key\0");
        h.update(*self.seed.seed);
        h.update(secret);
        let mut mixed = Zeroizing::new([0u8; 32]);
        mixed.copy_from_slice(&h.finalize());
        StateKey::derive(&mixed)
    }
}

impl<S: PlatformSeal> SealingRoot for PlatformRoot<S> {
    fn name(&self) -> &'static str {
        "the platform TPM"
    }

    fn weakness(&self) -> Option<&'static str> {
        None
    }

    fn new_key(&self, entropy: &mut dyn FnMut(&mut [u8])) -> Result<(StateKey, Vec<u8>), KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        entropy(secret.as_mut());
        let sealed = self.chip.seal(&secret).map_err(KeyError::Seal)?;
        let len = u16::try_from(sealed.len()).map_err(|_| KeyError::Seal(format!("{} bytes sealed", sealed.len())))?;
        let mut prefix = PLATFORM_SEALED.to_vec();
        prefix.extend_from_slice(&len.to_be_bytes());
        prefix.extend_from_slice(&sealed);
        Ok((self.key_of(&secret), prefix))
    }

    fn open_key<'b>(&self, file: &'b [u8]) -> Result<(StateKey, Vec<u8>, &'b [u8]), KeyError> {
        let rest = file.strip_prefix(PLATFORM_SEALED).ok_or(KeyError::SeedOnly)?;
        let len = usize::from(u16::from_be_bytes([
            *rest.first().ok_or(KeyError::Malformed)?,
            *rest.get(1).ok_or(KeyError::Malformed)?,
        ]));
        let sealed = rest.get(2..2 + len).ok_or(KeyError::Malformed)?;
        let secret = Zeroizing::new(self.chip.unseal(sealed).map_err(KeyError::Unseal)?);
        let prefix = file[..PLATFORM_SEALED.len() + 2 + len].to_vec();
        Ok((self.key_of(&secret), prefix, &rest[2 + len..]))
    }

    fn ca(&self) -> Result<CaKey, KeyError> {
        let secret = self.host.ca_secret().map_err(|e| KeyError::Ca(format!("{e}")))?;
        Ok(CaKey::derive(&secret))
    }

    fn ca_weakness(&self) -> Option<&'static str> {
        None
    }
}

/// No monotonic counter: the platform has no TPM (or its driver is not
/// there yet). Every authentic blob of the guest is accepted, the newest
/// and the oldest alike.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCounter;

impl RollbackAnchor for NoCounter {
    fn detects_rollback(&self) -> bool {
        false
    }

    fn committed(&mut self, _guest: &str) -> Result<Option<u64>, AnchorError> {
        Ok(None)
    }

    fn commit(&mut self, _guest: &str, _version: u64) -> Result<(), AnchorError> {
        Ok(())
    }
}

#[cfg(test)]
pub mod fake {
    //! A counter kept in memory, standing for a platform TPM's NV counter
    //! in host tests (it survives the "reboots" a test makes by building a
    //! new vTPM from the same anchor).
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    #[derive(Clone, Default)]
    pub struct MemoryCounter {
        pub values: Rc<RefCell<BTreeMap<String, u64>>>,
        /// When set, every commit fails (a platform TPM that stopped answering).
        pub broken: Rc<RefCell<bool>>,
    }

    impl RollbackAnchor for MemoryCounter {
        fn detects_rollback(&self) -> bool {
            true
        }

        fn committed(&mut self, guest: &str) -> Result<Option<u64>, AnchorError> {
            Ok(Some(self.values.borrow().get(guest).copied().unwrap_or(0)))
        }

        fn commit(&mut self, guest: &str, version: u64) -> Result<(), AnchorError> {
            if *self.broken.borrow() {
                return Err(AnchorError("counter unavailable".into()));
            }
            let mut values = self.values.borrow_mut();
            let v = values.entry(guest.into()).or_insert(0);
            *v = (*v).max(version);
            Ok(())
        }
    }
}
