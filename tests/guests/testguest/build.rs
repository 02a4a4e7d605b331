fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "none" {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("linker.ld");
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rerun-if-changed={}", script.display());
    }
}
