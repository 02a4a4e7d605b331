//! The fuzz harness for the hypervisor's guest-facing parsers: one module
//! per target, each with a `run(data)` that interprets the bytes and
//! asserts the target's properties (a panic is a finding).
//!
//! Shared by the cargo-fuzz targets (`../*.rs`, nightly) and by the stable
//! smoke test `hypervisor/tests/fuzz_smoke.rs`, which includes this module
//! with `#[path]`: both run exactly the same code, so an input that fails
//! one reproduces in the other.
//!
//! Structured inputs come from [`arbitrary::Unstructured`] over the raw
//! bytes, so the fuzzer, `cargo fuzz cmin` and the smoke test all deal in
//! plain byte files.

pub mod access;
pub mod acpi;
pub mod agent;
pub mod blob;
pub mod boot;
pub mod dmar;
pub mod fakes;
pub mod hypercall;
pub mod mmio;
pub mod platform;
pub mod ptpm;
pub mod reference;
pub mod tis;
pub mod txt;
pub mod vtd;
