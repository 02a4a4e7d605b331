//! Debian packages and the Rust target the build needs, installed on demand.

use std::process::Command;

use crate::util::{output, run, Fail};

/// (command that must exist, Debian package providing it)
const TOOLS: &[(&str, &str)] = &[
    ("bochs", "bochs"),
    ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
    ("/usr/share/bochs/VGABIOS-lgpl-latest", "vgabios"),
    ("/usr/lib/grub/i386-pc/multiboot2.mod", "grub-pc-bin"),
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
];

/// What the host tests call out to: ACPICA's disassembler checks the ACPI
/// tables CTVM builds.
const TEST_TOOLS: &[(&str, &str)] = &[("iasl", "acpica-tools")];

pub const BARE_TARGET: &str = "x86_64-unknown-none";

fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        std::path::Path::new(tool).exists()
    } else {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Installs missing emulator and ISO tools when running as root; otherwise
/// prints the exact command and fails.
pub fn ensure_image_tools() -> Result<(), Fail> {
    let missing: Vec<&str> = TOOLS.iter().filter(|(tool, _)| !have(tool)).map(|(_, pkg)| *pkg).collect();
    ensure_packages(&missing)
}

/// Installs (or names) the tools the host tests need.
pub fn ensure_test_tools() -> Result<(), Fail> {
    let missing: Vec<&str> = TEST_TOOLS.iter().filter(|(tool, _)| !have(tool)).map(|(_, pkg)| *pkg).collect();
    ensure_packages(&missing)
}

pub fn ensure_packages(missing: &[&str]) -> Result<(), Fail> {
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        return Err(Fail(format!("missing packages; install them with:\n    sudo apt-get install -y {list}")));
    }
    println!("xtask: installing {list}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing))
}

/// Adds the bare-metal target to the pinned toolchain if it is missing
/// (rustup does not, with RUSTUP_AUTO_INSTALL=0).
pub fn ensure_bare_target() -> Result<(), Fail> {
    let installed =
        output(Command::new("rustup").current_dir(crate::util::root()).args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == BARE_TARGET) {
        return Ok(());
    }
    println!("xtask: adding the {BARE_TARGET} target to the toolchain");
    run(Command::new("rustup").current_dir(crate::util::root()).args(["target", "add", BARE_TARGET]))
}
