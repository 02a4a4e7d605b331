//! The test image: the hypervisor's start-up with the scenario hooks of the
//! `test-hooks` feature (`test.*` options on its command line). The
//! scenarios that attack CTVM from inside boot it; it is never shipped.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the CTVM test image runs on bare metal: `cargo xtask test` builds and boots it");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
#[path = "../bare_metal.rs"]
mod bare_metal;
