//! `vtpm-server`: a vtpm-core TPM 1.2 served over swtpm's TCP protocol, so
//! that stacks written for swtpm (TrouSerS' `tcsd` with
//! `TCSD_USE_TCP_DEVICE=1`, QEMU's tpm-emulator, `swtpm_ioctl`) use it
//! unchanged.
//!
//! - [`server`]: the command and control listeners;
//! - [`device`]: the TPM's power, locality and persistence;
//! - [`ctrl`]: the control-channel wire format;
//! - [`state`]: the crash-safe state directory;
//! - [`engine`]: the trait the server drives, implemented for `vtpm_core::Tpm`;
//! - [`platform`]: OS entropy and a monotonic clock for the engine.

pub mod cli;
pub mod ctrl;
pub mod device;
pub mod engine;
pub mod platform;
pub mod server;
pub mod state;
