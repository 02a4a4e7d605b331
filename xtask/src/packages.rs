//! Debian packages and the Rust target the build needs, installed on demand.
//!
//! Each command states up front everything it will call, so a machine that
//! lacks several packages gets one `apt-get` line (or one installation, as
//! root), never a failure half-way through a test run.

use std::process::Command;

use crate::util::{output, run, Fail};

/// (command or file that must exist, Debian package providing it)
type Need = (&'static str, &'static str);

/// Building and booting an image: the emulator, GRUB and the ISO tools.
const IMAGE: &[Need] = &[
    ("bochs", "bochs"),
    ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
    ("/usr/share/bochs/VGABIOS-lgpl-latest", "vgabios"),
    ("/usr/lib/grub/i386-pc/multiboot2.mod", "grub-pc-bin"),
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
    // The durable-vTPM scenario's disk: made, read and written without
    // mounting it (no root needed).
    ("mke2fs", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    // QEMU TCG runs the platform scenarios (VT-d, the platform TPM, tboot):
    // no VT-x there, but a VT-d model, the edu DMA device and swtpm's TPMs.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("swtpm", "swtpm"),
    ("/boot/tboot.gz", "tboot"),
];

/// The Linux guest's files: Debian's packages fetched with `apt-get
/// download` and unpacked, its modules built against the kernel's headers
/// (newer kernels ship their in-tree modules xz-compressed).
const LINUX_GUEST: &[Need] = &[
    ("dpkg-deb", "dpkg"),
    ("gcc-12", "gcc-12"),
    ("make", "make"),
    ("strip", "binutils"),
    ("xz", "xz-utils"),
    // The headers' objtool, which every module build runs, links libelf.
    ("/usr/lib/x86_64-linux-gnu/libelf.so.1", "libelf1"),
    // The static user-space test programs link glibc's static libc.
    ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
];

/// What the host tests call out to: ACPICA's disassembler checks the ACPI
/// tables CTVM builds; libtpms (through swtpm) is the reference the vTPM is
/// compared with; TrouSerS and tpm-tools are the real client stack; OpenSSL
/// reads and verifies the EK certificates vtpm-trust issues.
const HOST_TESTS: &[Need] = &[
    ("iasl", "acpica-tools"),
    ("swtpm", "swtpm"),
    ("swtpm_setup", "swtpm-tools"),
    ("swtpm_ioctl", "swtpm-tools"),
    ("tcsd", "trousers"),
    ("tpm_version", "tpm-tools"),
    ("tpm_getquote", "tpm-quote-tools"),
    ("openssl", "openssl"),
    ("setsid", "util-linux"),
];

pub const BARE_TARGET: &str = "x86_64-unknown-none";

/// What a command needs.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// `cargo xtask test`: all of it.
    Test,
    /// Host tests only.
    HostTests,
    /// Images, scenarios, `run` and `bench`.
    Images,
}

fn needs(purpose: Purpose) -> Vec<Need> {
    let groups: &[&[Need]] = match purpose {
        Purpose::Test => &[IMAGE, LINUX_GUEST, HOST_TESTS],
        Purpose::HostTests => &[HOST_TESTS],
        Purpose::Images => &[IMAGE, LINUX_GUEST],
    };
    groups.iter().flat_map(|g| g.iter().copied()).collect()
}

fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return std::path::Path::new(tool).exists();
    }
    // Daemons such as tcsd live in sbin, which a non-root PATH may lack.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).any(|dir| dir.join(tool).is_file())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Installs every missing package `purpose` needs when running as root;
/// otherwise names them all in one `apt-get` line and fails.
pub fn ensure(purpose: Purpose) -> Result<(), Fail> {
    let mut missing: Vec<&str> = needs(purpose).into_iter().filter(|(tool, _)| !have(tool)).map(|(_, p)| p).collect();
    missing.dedup();
    ensure_packages(&missing)
}

fn ensure_packages(missing: &[&str]) -> Result<(), Fail> {
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

/// Makes sure apt knows Debian's package lists (a fresh root may have none):
/// the Linux guest's kernel and headers are found through them.
pub fn ensure_apt_lists(probe: &str) -> Result<(), Fail> {
    let known = || Command::new("apt-cache").args(["show", probe]).output().is_ok_and(|o| o.status.success());
    if known() {
        return Ok(());
    }
    if !is_root() {
        return Err(Fail(format!("apt knows no {probe}; update its package lists with:\n    sudo apt-get update")));
    }
    println!("xtask: apt knows no {probe}: updating its package lists");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    if known() {
        Ok(())
    } else {
        Err(Fail(format!(
            "apt knows no {probe} even after apt-get update: is a bookworm (or newer) mirror configured?"
        )))
    }
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
