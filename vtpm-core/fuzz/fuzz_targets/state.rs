//! Feeds arbitrary bytes to the state loaders (see `common::run_state`):
//! they must refuse or load, never panic.
//! `vtpm-core/tests/fuzz_smoke.rs` runs the same interpreter on stable.
#![no_main]

#[allow(dead_code)] // each target uses part of the harness
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::run_state(data));
