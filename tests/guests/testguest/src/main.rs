//! The CTVM test guest: a bare 64-bit kernel that runs one test, named on
//! its command line (`test=NAME exit=CODE`), and reports each check on its
//! console as `ok: ...` or `FAIL: ...`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the test guest runs under CTVM only: build it with `cargo xtask build`");
}

#[cfg(target_os = "none")]
mod guest;
