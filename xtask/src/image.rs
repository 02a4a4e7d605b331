//! Building the bare-metal binaries and the bootable ISO.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::emulator::Emulator;
use crate::packages::{self, BARE_TARGET};
use crate::scenarios::Scenario;
use crate::util::{cargo, run, work_dir, Fail};

/// The bare-metal artefacts.
pub struct Binaries {
    pub hypervisor: PathBuf,
    pub testguest: PathBuf,
}

/// Builds the hypervisor and the test guests (release: Bochs runs debug
/// builds several times slower).
pub fn build_all() -> Result<Binaries, Fail> {
    packages::ensure_bare_target()?;
    run(cargo().args(["build", "--release", "--target", BARE_TARGET, "-p", "hypervisor", "-p", "testguest"]))?;
    let dir = crate::util::root().join("target").join(BARE_TARGET).join("release");
    let bins = Binaries { hypervisor: dir.join("hypervisor"), testguest: dir.join("testguest") };
    let size = fs::metadata(&bins.hypervisor)?.len();
    println!("xtask: hypervisor image {} ({} KiB)", bins.hypervisor.display(), size / 1024);
    Ok(bins)
}

/// A module line for grub.cfg: which file, and the arguments after it.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub file: PathBuf,
    pub args: String,
}

/// A module GRUB loads from the hard disk (ext2/3/4 on the whole disk,
/// `(hd0)`) when the file is there: how a durable vTPM's state blob comes
/// back at each boot.
#[derive(Clone, Debug)]
pub struct DiskModule {
    /// The path on the disk's filesystem.
    pub path: String,
    pub args: String,
}

/// Writes grub.cfg and runs grub-mkrescue; returns the ISO's path.
pub fn make_iso(name: &str, hypervisor: &Path, hv_args: &str, modules: &[ModuleSpec]) -> Result<PathBuf, Fail> {
    make_iso_with_disk(name, hypervisor, hv_args, modules, &[])
}

/// [`make_iso`] with modules GRUB reads from the hard disk, each only if
/// its file exists (a missing state blob is then CTVM's to refuse, not
/// GRUB's error).
pub fn make_iso_with_disk(
    name: &str,
    hypervisor: &Path,
    hv_args: &str,
    modules: &[ModuleSpec],
    disk_modules: &[DiskModule],
) -> Result<PathBuf, Fail> {
    packages::ensure(packages::Purpose::Images)?;
    let root = work_dir().join("iso").join(name);
    let _ = fs::remove_dir_all(&root);
    let boot = root.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    fs::copy(hypervisor, boot.join("ctvm.elf"))?;
    let mut cfg = String::from(
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\n\n\
         menuentry \"CTVM\" {\n",
    );
    cfg.push_str(&format!("    multiboot2 /boot/ctvm.elf {hv_args}\n"));
    for (i, m) in modules.iter().enumerate() {
        let file_name = format!("m{i}-{}", m.file.file_name().and_then(|n| n.to_str()).unwrap_or("module"));
        fs::copy(&m.file, boot.join(&file_name))?;
        cfg.push_str(&format!("    module2 /boot/{file_name} {}\n", m.args));
    }
    if !disk_modules.is_empty() {
        cfg.push_str("    insmod ext2\n");
    }
    for m in disk_modules {
        cfg.push_str(&format!(
            "    if [ -f (hd0){path} ]; then\n        module2 (hd0){path} {args}\n    fi\n",
            path = m.path,
            args = m.args
        ));
    }
    cfg.push_str("    boot\n}\n");
    fs::write(boot.join("grub").join("grub.cfg"), &cfg)?;
    let iso = work_dir().join(format!("{name}.iso"));
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&root)
        .output()
        .map_err(|e| Fail(format!("cannot run grub-mkrescue: {e}")))?;
    if !out.status.success() {
        return Err(Fail(format!("grub-mkrescue failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(iso)
}

/// Builds everything and the ISO of one scenario for one emulator.
pub fn iso_for_emulator(scenario: &Scenario, emulator: Emulator) -> Result<PathBuf, Fail> {
    let bins = build_all()?;
    let modules = scenario.modules(&bins)?;
    let hv_args = format!("exit={} {}", emulator.exit_method(), scenario.hypervisor_args);
    make_iso(&format!("{}-{}", scenario.name, emulator.name()), &bins.hypervisor, hv_args.trim(), &modules)
}

pub fn iso_for(scenario: &Scenario) -> Result<PathBuf, Fail> {
    iso_for_emulator(scenario, Emulator::Bochs)
}

/// An ISO that boots Linux straight from GRUB, without CTVM (for comparisons).
pub fn make_linux_iso(name: &str, kernel: &Path, initrd: &Path, args: &str) -> Result<PathBuf, Fail> {
    packages::ensure(packages::Purpose::Images)?;
    let root = work_dir().join("iso").join(name);
    let _ = fs::remove_dir_all(&root);
    let boot = root.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    fs::copy(kernel, boot.join("vmlinuz"))?;
    fs::copy(initrd, boot.join("initrd"))?;
    let cfg = format!(
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\n\n\
         menuentry \"Linux\" {{\n    linux /boot/vmlinuz {args}\n    initrd /boot/initrd\n    boot\n}}\n"
    );
    fs::write(boot.join("grub").join("grub.cfg"), cfg)?;
    let iso = work_dir().join(format!("{name}.iso"));
    run(Command::new("grub-mkrescue").arg("-o").arg(&iso).arg(&root).stderr(std::process::Stdio::null()))?;
    Ok(iso)
}
