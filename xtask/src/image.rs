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
    /// The release image (ELF64, what GRUB loads).
    pub hypervisor: PathBuf,
    /// The test image: the same start-up with the scenario hooks.
    pub test_image: PathBuf,
    pub testguest: PathBuf,
}

/// Which hypervisor image a scenario boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    Release,
    /// `ctvm-test`, built with the `test-hooks` feature.
    Test,
}

/// How the image is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// GRUB's `multiboot2`.
    Grub,
    /// GRUB's `multiboot` loads Debian's tboot, which loads CTVM's 32-bit
    /// image (`module`) and hands the guests' modules on.
    Tboot,
}

/// Builds the hypervisor, its test image and the test guests (release:
/// Bochs runs debug builds several times slower).
pub fn build_all() -> Result<Binaries, Fail> {
    packages::ensure_bare_target()?;
    run(cargo().args(["build", "--release", "--target", BARE_TARGET, "-p", "hypervisor", "-p", "testguest"]))?;
    run(cargo().args([
        "build",
        "--release",
        "--target",
        BARE_TARGET,
        "-p",
        "hypervisor",
        "--features",
        "test-hooks",
        "--bin",
        "ctvm-test",
    ]))?;
    let dir = crate::util::root().join("target").join(BARE_TARGET).join("release");
    let bins = Binaries {
        hypervisor: dir.join("hypervisor"),
        test_image: dir.join("ctvm-test"),
        testguest: dir.join("testguest"),
    };
    let size = fs::metadata(&bins.hypervisor)?.len();
    println!("xtask: hypervisor image {} ({} KiB)", bins.hypervisor.display(), size / 1024);
    let wrapped = tboot_image(&bins.hypervisor)?;
    println!("xtask: tboot-loadable image {}", wrapped.display());
    Ok(bins)
}

/// The 32-bit wrapping of an image (see `elf32`), next to it as `NAME32.elf`.
pub fn tboot_image(elf64: &Path) -> Result<PathBuf, Fail> {
    let name = elf64.file_name().and_then(|n| n.to_str()).unwrap_or("image");
    let out = elf64.with_file_name(format!("{name}32.elf"));
    let wrapped = crate::elf32::wrap(&fs::read(elf64)?).map_err(|e| Fail(format!("{}: {e}", elf64.display())))?;
    fs::write(&out, wrapped)?;
    Ok(out)
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
    make_iso_with(name, hypervisor, hv_args, modules, Loader::Grub)
}

/// tboot's own options: its log on COM1 and in memory (at 0x60000).
pub const TBOOT_ARGS: &str = "logging=serial,memory serial=115200,8n1,0x3f8";

/// [`make_iso`] with a choice of loader.
pub fn make_iso_with(
    name: &str,
    hypervisor: &Path,
    hv_args: &str,
    modules: &[ModuleSpec],
    loader: Loader,
) -> Result<PathBuf, Fail> {
    write_iso(name, hypervisor, hv_args, modules, loader, &[])
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
    write_iso(name, hypervisor, hv_args, modules, Loader::Grub, disk_modules)
}

fn write_iso(
    name: &str,
    hypervisor: &Path,
    hv_args: &str,
    modules: &[ModuleSpec],
    loader: Loader,
    disk_modules: &[DiskModule],
) -> Result<PathBuf, Fail> {
    packages::ensure(packages::Purpose::Images)?;
    let root = work_dir().join("iso").join(name);
    let _ = fs::remove_dir_all(&root);
    let boot = root.join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    let mut cfg = String::from(
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\n\n\
         menuentry \"CTVM\" {\n",
    );
    let module_command = match loader {
        Loader::Grub => {
            fs::copy(hypervisor, boot.join("ctvm.elf"))?;
            cfg.push_str(&format!("    multiboot2 /boot/ctvm.elf {hv_args}\n"));
            "module2"
        }
        Loader::Tboot => {
            // Multiboot 1 with modules above tboot: see the README's tboot
            // section for why (tboot 1.10.5 loses GRUB's modules otherwise).
            fs::copy("/boot/tboot.gz", boot.join("tboot.gz"))?;
            fs::copy(tboot_image(hypervisor)?, boot.join("ctvm32.elf"))?;
            cfg.push_str(&format!("    multiboot --quirk-modules-after-kernel /boot/tboot.gz {TBOOT_ARGS}\n"));
            cfg.push_str(&format!("    module /boot/ctvm32.elf {hv_args}\n"));
            "module"
        }
    };
    for (i, m) in modules.iter().enumerate() {
        let file_name = format!("m{i}-{}", m.file.file_name().and_then(|n| n.to_str()).unwrap_or("module"));
        fs::copy(&m.file, boot.join(&file_name))?;
        cfg.push_str(&format!("    {module_command} /boot/{file_name} {}\n", m.args));
    }
    if !disk_modules.is_empty() {
        cfg.push_str("    insmod ext2\n");
    }
    for m in disk_modules {
        cfg.push_str(&format!(
            "    if [ -f (hd0){path} ]; then\n        {module_command} (hd0){path} {args}\n    fi\n",
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
    let image = match scenario.target.image {
        Image::Release => &bins.hypervisor,
        Image::Test => &bins.test_image,
    };
    let name = format!("{}-{}", scenario.name, emulator.name());
    make_iso_with(&name, image, hv_args.trim(), &modules, scenario.target.loader)
}

pub fn iso_for(scenario: &Scenario) -> Result<PathBuf, Fail> {
    iso_for_emulator(scenario, scenario.target.emulator)
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
