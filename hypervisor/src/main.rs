//! The bare-metal entry: `boot/` jumps to [`ctvm_main`] in long mode.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the CTVM hypervisor runs on bare metal: build it with `cargo xtask build`");
    std::process::exit(2);
}

#[cfg(target_os = "none")]
mod bare_metal;
