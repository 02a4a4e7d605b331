//! `execute` with RSA private-key operations: up to two commands per input
//! that load or use a private key (see `common::Private`). Slower (~2 ms for
//! each such operation), so it runs as its own target.
//! `vtpm-core/tests/fuzz_smoke.rs` runs the same interpreter on stable.
#![no_main]

#[allow(dead_code)] // each target uses part of the harness
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::run_execute_keys(data));
