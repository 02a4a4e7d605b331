//! What roots a vTPM's persistent state in the platform: the key that seals
//! its state blobs and the EK certificates' CA ([`SealingRoot`]), and the
//! monotonic counter that makes an old blob stale ([`RollbackAnchor`]).
//!
//! Today both come from the `vtpm.seed` module: [`SeedRoot`] derives the
//! keys from it, and [`NoCounter`] is honest about having no counter, so a
//! guest that hands back an older blob of its own is not caught (CTVM says
//! so at boot). A platform TPM provides both for real: a key sealed to its
//! measurement of CTVM, and an NV monotonic counter; the platform-TPM code
//! implements these two traits and the boot path does not change.

use alloc::string::String;

use vtpm_trust::blob::StateKey;
use vtpm_trust::ekcert::CaKey;

/// The secrets a host's vTPMs are sealed and certified under.
pub trait SealingRoot {
    /// Names the root on the console ("vtpm.seed", "platform TPM").
    fn name(&self) -> &'static str;
    /// The key that seals every state blob of this host.
    fn state_key(&self) -> StateKey;
    /// The host's "CTVM vTPM CA". Deriving it costs an RSA-2048 key
    /// generation: call it only to issue a certificate.
    fn ca(&self) -> CaKey;
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
    /// The committed version of `guest`'s state; None when this anchor
    /// keeps no counter.
    fn committed(&mut self, guest: &str) -> Result<Option<u64>, AnchorError>;
    /// Makes `version` the committed version, durably, before returning.
    /// Never moves the counter back.
    fn commit(&mut self, guest: &str, version: u64) -> Result<(), AnchorError>;
}

/// The sealing root derived from the `vtpm.seed` module: HKDF-SHA256 for
/// the state key, a deterministic RSA generation for the CA (both in
/// `vtpm-trust`, with separate labels).
pub struct SeedRoot {
    seed: zeroize::Zeroizing<[u8; 32]>,
}

impl SeedRoot {
    pub fn new(seed: [u8; 32]) -> Self {
        SeedRoot { seed: zeroize::Zeroizing::new(seed) }
    }
}

impl SealingRoot for SeedRoot {
    fn name(&self) -> &'static str {
        "vtpm.seed"
    }

    fn state_key(&self) -> StateKey {
        StateKey::derive(&self.seed)
    }

    fn ca(&self) -> CaKey {
        CaKey::derive(&self.seed)
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
