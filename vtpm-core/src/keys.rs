//! The table of loaded keys.

use crate::consts::*;
use crate::crypto::Drbg;
use crate::key::Key;
use crate::marshal::TpmResult;
use alloc::vec::Vec;

/// Keys loaded at once (libtpms: TPM_KEY_HANDLES).
pub const MAX_KEYS: usize = 20;

#[derive(Clone, Default)]
pub struct KeyTable {
    pub slots: Vec<(u32, Key)>,
}

impl KeyTable {
    pub fn free(&self) -> usize {
        MAX_KEYS.saturating_sub(self.slots.len())
    }

    pub fn get(&self, handle: u32) -> Option<&Key> {
        self.slots.iter().find(|(h, _)| *h == handle).map(|(_, k)| k)
    }

    /// Inserts with a fresh random handle.
    pub fn insert(&mut self, key: Key, drbg: &mut Drbg) -> TpmResult<u32> {
        if self.slots.len() >= MAX_KEYS {
            return Err(TPM_NOSPACE);
        }
        let handle = loop {
            let h = drbg.u32();
            if h != 0 && h >> 24 != 0x40 && self.get(h).is_none() {
                break h;
            }
        };
        self.slots.push((handle, key));
        Ok(handle)
    }

    pub fn remove(&mut self, handle: u32) -> bool {
        let before = self.slots.len();
        self.slots.retain(|(h, _)| *h != handle);
        before != self.slots.len()
    }

    pub fn clear(&mut self) {
        self.slots.clear();
    }
}
