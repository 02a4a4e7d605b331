//! The `vtd` target: `harness::vtd::run` (input format and properties are
//! documented there). `hypervisor/tests/fuzz_smoke.rs` runs the same code on
//! stable with seeded inputs.
#![no_main]

#[allow(dead_code)] // each target uses part of the harness
mod harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::vtd::run(data));
