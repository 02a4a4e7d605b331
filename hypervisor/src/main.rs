//! The bare-metal entry: `boot/` jumps to [`ctvm_main`] in long mode.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the CTVM hypervisor runs on bare metal: build it with `cargo xtask build`");
    std::process::exit(2);
}

// The release image never carries the scenario hooks: they exist only in
// the `ctvm-test` binary.
#[cfg(feature = "test-hooks")]
compile_error!("the release image is built without `test-hooks`; build the `ctvm-test` binary instead");

#[cfg(target_os = "none")]
mod bare_metal;
