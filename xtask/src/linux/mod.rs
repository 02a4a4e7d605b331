//! The Linux guest's files: Debian's cloud kernel and busybox, fetched with
//! `apt-get download` and cached under `target/ctvm/debian/`, and an
//! initramfs built around `init.sh`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{output, output_bytes, run, work_dir, Fail};

pub mod api;
mod cpio;
pub mod modules;
pub mod policy;

/// The kernel and initramfs a Linux scenario boots.
pub struct LinuxAssets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub version: String,
    /// The trusted-module digests for the hypervisor (`ctvm.policy`).
    pub policy: PathBuf,
    /// The kernel-API allow-list for isolated modules (`ctvm.api`).
    pub api: PathBuf,
}

const META_PACKAGE: &str = "linux-image-cloud-amd64";
const INIT: &str = include_str!("init.sh");

fn cache() -> PathBuf {
    work_dir().join("debian")
}

/// Which Debian cloud kernel a Linux guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// What `linux-image-cloud-amd64` points at: 6.1 on bookworm.
    Default,
    /// The newest 6.4+ cloud kernel apt offers (bookworm's 6.12 backports):
    /// modules laid out in `mod->mem[]`.
    Newer,
}

/// The versioned image package of a kernel choice.
pub fn kernel_package(kernel: Kernel) -> Result<String, Fail> {
    crate::packages::ensure_apt_lists(META_PACKAGE)?;
    match kernel {
        Kernel::Default => {
            let deps = output(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
                .map(str::to_string)
                .ok_or_else(|| Fail(format!("apt-cache knows no {META_PACKAGE}; run `apt-get update` first")))
        }
        Kernel::Newer => newest_cloud_image(),
    }
}

/// The newest `linux-image-6.X...-cloud-amd64` of 6.4 or later apt knows.
fn newest_cloud_image() -> Result<String, Fail> {
    let list = output(Command::new("apt-cache").args(["search", "--names-only", "^linux-image-6.*-cloud-amd64$"]))?;
    let version = |p: &str| -> Option<Vec<u32>> {
        let v = p.strip_prefix("linux-image-")?.split(['+', '-']).next()?;
        v.split('.').map(|n| n.parse().ok()).collect()
    };
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| Some((version(p)?, p.to_string())))
        .filter(|(v, _)| v.as_slice() >= [6, 4].as_slice())
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| Fail::new("apt knows no cloud kernel of 6.4 or later (bookworm's backports have 6.12)"))
}

/// Downloads (once) and unpacks a Debian package; returns the unpack directory.
fn unpack(package: &str) -> Result<PathBuf, Fail> {
    let root = cache().join(format!("{package}.root"));
    unpack_into(package, &root)?;
    Ok(root)
}

/// Downloads (once) and unpacks a package into `root` (several may share one).
pub fn unpack_into(package: &str, root: &Path) -> Result<(), Fail> {
    let dir = cache();
    fs::create_dir_all(&dir)?;
    let marker = root.join(format!(".complete-{package}"));
    if marker.exists() {
        return Ok(());
    }
    let deb = match find_deb(&dir, package)? {
        Some(deb) => deb,
        None => {
            println!("xtask: downloading {package} (apt-get download)");
            run(Command::new("apt-get").current_dir(&dir).args(["download", "-q", package]))?;
            find_deb(&dir, package)?.ok_or_else(|| Fail(format!("apt-get download left no {package} .deb")))?
        }
    };
    fs::create_dir_all(root)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    fs::write(marker, "")?;
    Ok(())
}

/// An in-tree module as a plain `.ko`: newer kernels ship them xz-compressed,
/// and busybox's insmod hands the kernel the file's bytes as they are.
fn in_tree_module(dir: &Path, name: &str, out: &Path) -> Result<PathBuf, Fail> {
    let plain = dir.join(format!("{name}.ko"));
    if plain.exists() {
        return Ok(plain);
    }
    let packed = dir.join(format!("{name}.ko.xz"));
    let unpacked = out.join(format!("{name}.ko"));
    let data = output_bytes(Command::new("xz").arg("-dc").arg(&packed))?;
    fs::write(&unpacked, data)?;
    Ok(unpacked)
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>, Fail> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Fetches the kernel and busybox and builds the initramfs.
pub fn assets(choice: Kernel) -> Result<LinuxAssets, Fail> {
    let package = kernel_package(choice)?;
    let version = package.trim_start_matches("linux-image-").to_string();
    let kernel_root = unpack(&package)?;
    let kernel = kernel_root.join("boot").join(format!("vmlinuz-{version}"));
    if !kernel.exists() {
        return Err(Fail(format!("{} is missing from {package}", kernel.display())));
    }
    let busybox = unpack("busybox-static")?.join("bin").join("busybox");
    let kos = modules::build(&package)?;
    let out = work_dir().join("linux").join(&version);
    fs::create_dir_all(&out)?;
    let tree = kernel_root.join("lib").join("modules").join(&version).join("kernel");
    let in_tree: Vec<PathBuf> = ["dummy", "veth", "ifb"]
        .iter()
        .map(|m| in_tree_module(&tree.join("drivers/net"), m, &out))
        .collect::<Result<_, _>>()?;
    let initrd = out.join("initramfs.cpio");
    let mut archive = cpio::Archive::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib/ctvm"] {
        archive.directory(dir);
    }
    archive.directory("lib/ctvm/twin");
    archive.directory("lib/ctvm/lookalike");
    // A look-alike of the trusted ifb: its text, with a call that the
    // loader points at another function (packets freed, not received).
    let lookalike = policy::retarget_call(&in_tree[2], "netif_receive_skb", "kfree")?;
    archive.file("lib/ctvm/lookalike/ifb.ko", 0o644, &lookalike);
    for ko in kos.iter().chain(&in_tree) {
        let name = ko.file_name().and_then(|n| n.to_str()).ok_or_else(|| Fail::new("module name"))?;
        // The twin of a trusted module shares its file name.
        let twin =
            ko.parent().and_then(Path::file_name).and_then(|d| d.to_str()).is_some_and(|d| d.starts_with("twin-"));
        let dir = if twin { "lib/ctvm/twin" } else { "lib/ctvm" };
        archive.file(&format!("{dir}/{name}"), 0o644, &fs::read(ko)?);
    }
    // The modules the guests trust, pinned by their code.
    let agent = kos
        .iter()
        .find(|k| k.file_name().is_some_and(|n| n == "ctvm_agent.ko"))
        .ok_or_else(|| Fail::new("no agent"))?;
    let policy = out.join("ctvm.policy");
    fs::write(&policy, policy::file(&[agent, &in_tree[2]])?)?;
    // What isolated modules may call, from this kernel's own exports.
    let api = out.join("ctvm.api");
    api::write(&version, &modules::headers(&package)?, &api)?;
    archive.char_device("dev/console", 5, 1);
    archive.file("bin/busybox", 0o755, &fs::read(&busybox)?);
    for (name, bin) in modules::user_programs()? {
        archive.file(&format!("bin/{name}"), 0o755, &fs::read(&bin)?);
    }
    archive.file("init", 0o755, init_script().as_bytes());
    fs::write(&initrd, archive.finish())?;
    Ok(LinuxAssets { kernel, initrd, version, policy, api })
}

/// `init.sh` with the kernel variables that hold the protected slab caches
/// filled in from the agent's own table, in its slot order (`-` for the one
/// the agent finds itself): the slots have one source.
fn init_script() -> String {
    let caches: Vec<&str> = guest_agent::integrity::PROTECTED_CACHES_NAMES
        .iter()
        .map(|&(variable, _)| if variable.contains('.') { "-" } else { variable })
        .collect();
    INIT.replace("@PROTECTED_CACHES@", &caches.join(" "))
}

/// The disk driver stack Debian's cloud kernel builds as modules, in load
/// order: what the guest needs to reach `/dev/sda` (Bochs' ATA disk).
pub const DISK_MODULES: [&str; 5] = ["scsi/scsi_common", "scsi/scsi_mod", "ata/libata", "ata/ata_piix", "scsi/sd_mod"];

/// The initramfs of the durable-vTPM scenario: the standard one with a
/// second archive appended (the kernel unpacks both) holding the disk
/// driver modules (`/lib/ctvm/disk/`) and the TPM client `ctvm-tpm`.
pub fn durable_initrd(choice: Kernel, assets: &LinuxAssets) -> Result<PathBuf, Fail> {
    let package = kernel_package(choice)?;
    let tree = unpack(&package)?.join("lib").join("modules").join(&assets.version).join("kernel").join("drivers");
    let out = work_dir().join("linux").join(&assets.version);
    let mut archive = cpio::Archive::default();
    archive.directory("lib/ctvm/disk");
    for m in DISK_MODULES {
        let (dir, name) = m.split_once('/').ok_or_else(|| Fail::new("module path"))?;
        let ko = in_tree_module(&tree.join(dir), name, &out)?;
        archive.file(&format!("lib/ctvm/disk/{name}.ko"), 0o644, &fs::read(ko)?);
    }
    archive.file("bin/ctvm-tpm", 0o755, &fs::read(modules::tpm_client()?)?);
    let mut bytes = fs::read(&assets.initrd)?;
    bytes.extend_from_slice(&archive.finish());
    let initrd = out.join("initramfs-durable.cpio");
    fs::write(&initrd, bytes)?;
    Ok(initrd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_init_script_names_the_agents_cache_slots() {
        let init = super::init_script();
        assert!(!init.contains("@PROTECTED_CACHES@"));
        assert!(init.contains("CACHES=\"cred_jar task_struct_cachep - signal_cachep"));
        assert!(init.contains("kernfs_node_cache mnt_cache\""));
    }
}
