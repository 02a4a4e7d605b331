//! Authorisation secrets: zeroised on drop, compared in constant time.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 20-byte TPM_SECRET (authorisation data, tpmProof, shared secrets).
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct Secret(pub [u8; 20]);

impl Secret {
    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &[u8; 20]) -> bool {
        crate::crypto::ct_eq(&self.0, other)
    }
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(&other.0)
    }
}
