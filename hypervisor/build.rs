//! Links the bare-metal binary with the boot crate's linker script.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../boot/linker.ld");
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rerun-if-changed={}", script.display());
    }
}
