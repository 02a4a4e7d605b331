//! `vtpm-trust`: what makes a CTVM vTPM worth relying on beyond one boot,
//! as pure `no_std` code the hypervisor calls and the host tests.
//!
//! * [`blob`]: the vTPM's state sealed for storage on the untrusted guest
//!   disk (AES-256-GCM under a key derived from the platform secret, bound
//!   to the guest's name and to a version number).
//! * [`durability`]: the protocol that keeps every state change the vTPM
//!   acknowledged to the guest through a power cut, as a state machine.
//! * [`ekcert`]: the per-host "CTVM vTPM CA" and the X.509 EK certificate
//!   it issues for each vTPM, in the NV format TPM 1.2 clients read.
//! * [`table`]: the hypervisor-wide table of every durable vTPM's committed
//!   version, authenticated, which one platform counter anchors.
//! * [`tpm2_session`]: the cryptography of the salted, parameter-encrypted
//!   TPM 2.0 sessions that carry that counter's sealed key to and from the
//!   platform TPM.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod blob;
pub mod durability;
pub mod ekcert;
pub mod table;
pub mod tpm2_session;
