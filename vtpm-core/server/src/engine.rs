//! The seam between the server and the TPM it serves.
//!
//! The server only needs a handful of lifecycle calls, so it is written
//! against this trait rather than `vtpm_core::Tpm` directly: the control
//! protocol can then be tested with a scripted engine, and the adapter to the
//! real engine stays a few lines long.

/// What the server asks of a TPM 1.2 engine.
pub trait Engine: Send + Sized + 'static {
    /// Manufactures a fresh TPM: the engine creates its EK here.
    fn manufacture() -> Self;
    /// Restores a TPM from its permanent-state blob.
    fn from_permanent(blob: &[u8]) -> Result<Self, String>;
    /// The permanent-state blob, to be persisted.
    fn permanent_state(&self) -> Vec<u8>;
    /// Whether the permanent state changed since the last `clear_dirty`.
    fn permanent_dirty(&self) -> bool;
    fn clear_dirty(&mut self);
    /// The TPM_SaveState blob, if one is held.
    fn saved_state(&self) -> Option<Vec<u8>>;
    fn set_saved_state(&mut self, blob: &[u8]) -> Result<(), String>;
    /// TPM_Init: the power-on signal.
    fn power_on(&mut self);
    /// Runs one TPM command at `locality` and returns its response.
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8>;
    /// TPM_HASH_START / TPM_HASH_DATA / TPM_HASH_END (the DRTM sequence):
    /// `Err` carries the TPM result code.
    fn hash_start(&mut self) -> Result<(), u32>;
    fn hash_data(&mut self, data: &[u8]) -> Result<(), u32>;
    fn hash_end(&mut self) -> Result<(), u32>;
    /// TPM_PERMANENT_FLAGS.tpmEstablished.
    fn tpm_established(&self) -> bool;
    /// Resets tpmEstablished as `locality` asks.
    fn reset_established(&mut self, locality: u8) -> Result<(), u32>;
}

mod vtpm {
    use super::Engine;
    use crate::platform::OsPlatform;
    use vtpm_core::Tpm;

    impl Engine for Tpm<OsPlatform> {
        fn manufacture() -> Self {
            Tpm::manufacture(OsPlatform::new())
        }
        fn from_permanent(blob: &[u8]) -> Result<Self, String> {
            Tpm::from_permanent(blob, OsPlatform::new()).map_err(|e| format!("{e:?}"))
        }
        fn permanent_state(&self) -> Vec<u8> {
            Tpm::permanent_state(self)
        }
        fn permanent_dirty(&self) -> bool {
            Tpm::permanent_dirty(self)
        }
        fn clear_dirty(&mut self) {
            Tpm::clear_dirty(self)
        }
        fn saved_state(&self) -> Option<Vec<u8>> {
            Tpm::saved_state(self)
        }
        fn set_saved_state(&mut self, blob: &[u8]) -> Result<(), String> {
            Tpm::set_saved_state(self, blob).map_err(|e| format!("{e:?}"))
        }
        fn power_on(&mut self) {
            Tpm::power_on(self)
        }
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            Tpm::execute(self, locality, command)
        }
        fn hash_start(&mut self) -> Result<(), u32> {
            Tpm::hash_start(self)
        }
        fn hash_data(&mut self, data: &[u8]) -> Result<(), u32> {
            Tpm::hash_data(self, data)
        }
        fn hash_end(&mut self) -> Result<(), u32> {
            Tpm::hash_end(self)
        }
        fn tpm_established(&self) -> bool {
            Tpm::tpm_established(self)
        }
        fn reset_established(&mut self, locality: u8) -> Result<(), u32> {
            Tpm::reset_established(self, locality)
        }
    }
}

/// The engine the binary serves.
pub type VtpmEngine = vtpm_core::Tpm<crate::platform::OsPlatform>;
