//! Test support shared by the integration tests: the TPMs under test, a
//! TPM 1.2 client with authorisation, and transcript comparison.

pub mod backend;
pub mod client;
pub mod tpm12;
