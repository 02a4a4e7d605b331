//! Feeds arbitrary command sequences to `Tpm::execute`, without RSA
//! private-key operations (`execute_keys` has them; the input format
//! and the checked properties are documented on `common::run_execute`).
//! `vtpm-core/tests/fuzz_smoke.rs` runs the same interpreter on stable.
#![no_main]

#[allow(dead_code)] // each target uses part of the harness
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::run_execute(data));
