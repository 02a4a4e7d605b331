//! Kernel modules for the Linux guest: the CTVM agent and the test modules
//! (attacks and benign ones), built against Debian's headers for the guest
//! kernel, fetched with `apt-get download` and unpacked under `target/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::unpack_into;
use crate::util::{cargo, output, root, run, work_dir, Fail};

/// The unpacked headers tree of a kernel image package, to pass to `make -C`.
pub fn headers(image: &str) -> Result<PathBuf, Fail> {
    headers_of(&format!("linux-headers-{}", image.trim_start_matches("linux-image-")))
}

/// The unpacked tree of one flavour's headers package and those it needs.
fn headers_of(flavour_pkg: &str) -> Result<PathBuf, Fail> {
    let flavour_pkg = flavour_pkg.to_string();
    let deps = output(Command::new("apt-cache").args(["depends", &flavour_pkg]))?;
    let mut packages = vec![flavour_pkg.clone()];
    for dep in deps.lines().filter_map(|l| l.trim().strip_prefix("Depends: ")) {
        if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
            packages.push(dep.to_string());
        }
    }
    let tree =
        work_dir().join("debian").join(format!("headers-root-{}", flavour_pkg.trim_start_matches("linux-headers-")));
    for p in &packages {
        unpack_into(p, &tree)?;
    }
    let build = tree.join("usr/src").join(&flavour_pkg);
    // The flavour's Makefile includes the common tree by absolute path.
    let makefile = build.join("Makefile");
    let text = fs::read_to_string(&makefile)?;
    let fixed = text.replace("include /usr/src/", &format!("include {}/usr/src/", tree.display()));
    if fixed != text {
        fs::write(&makefile, fixed)?;
    }
    Ok(build)
}

/// Builds one directory of module sources into `build/NAME`; returns the .ko files.
fn build_dir(headers: &Path, sources: &Path, name: &str, extra: &[(&str, String)]) -> Result<Vec<PathBuf>, Fail> {
    let dir = work_dir().join("linux").join("build").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    for entry in fs::read_dir(sources)? {
        let path = entry?.path();
        if path.is_file() {
            fs::copy(&path, dir.join(path.file_name().expect("a file name")))?;
        }
    }
    for (file, text) in extra {
        fs::write(dir.join(file), text)?;
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", dir.display()))
        .arg("modules")
        // No BTF for these modules: it needs pahole, and nothing reads it.
        .arg("CONFIG_DEBUG_INFO_BTF_MODULES=")
        .output()
        .map_err(|e| Fail(format!("cannot run make: {e}")))?;
    if !out.status.success() {
        return Err(Fail(format!(
            "building the {name} modules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut kos: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ko"))
        .collect();
    kos.sort();
    Ok(kos)
}

/// The agent and the test modules, built for a kernel image package, in
/// `build/{agent,tests,twin}-VERSION`.
pub fn build(image: &str) -> Result<Vec<PathBuf>, Fail> {
    crate::packages::ensure(crate::packages::Purpose::Images)?;
    let headers = headers(image)?;
    let version = image.trim_start_matches("linux-image-");
    let header = guest_agent::integrity::c_header();
    let agent = root().join("guest-agent/linux");
    let extra = [("ctvm_abi.h", header), ("ctvm_vtpm_abi.h", guest_agent::vtpm_store::c_header())];
    let mut kos = build_dir(&headers, &agent, &format!("agent-{version}"), &extra)?;
    let tests = root().join("tests/guests/linux-modules");
    kos.extend(build_dir(&headers, &tests, &format!("tests-{version}"), &[])?);
    // The twin reuses an attack's source under another module's name.
    let shared = |f: &'static str| fs::read_to_string(tests.join(f)).map(|text| (f, text));
    let extra = [shared("alias.h")?, shared("atk_syscall.c")?];
    kos.extend(build_dir(&headers, &tests.join("twin"), &format!("twin-{version}"), &extra)?);
    run(Command::new("strip").arg("--strip-debug").args(&kos))?;
    Ok(kos)
}

/// The static user-space programs for the guest's initramfs: the attack
/// program (`tests/guests/linux-user/`) and the agent's vTPM store service
/// (`guest-agent/service/`).
pub fn user_programs() -> Result<Vec<(String, PathBuf)>, Fail> {
    crate::packages::ensure(crate::packages::Purpose::Images)?;
    let dir = work_dir().join("linux").join("build").join("user");
    fs::create_dir_all(&dir)?;
    let mut sources = Vec::new();
    for d in ["tests/guests/linux-user", "guest-agent/service"] {
        for entry in fs::read_dir(root().join(d))? {
            sources.push(entry?.path());
        }
    }
    let mut out = Vec::new();
    for src in sources {
        if src.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let name = src.file_stem().and_then(|n| n.to_str()).ok_or_else(|| Fail::new("program name"))?.to_string();
        let bin = dir.join(&name);
        run(Command::new("gcc").args(["-static", "-O2", "-Wall", "-Werror", "-o"]).arg(&bin).arg(&src))?;
        out.push((name, bin));
    }
    out.sort();
    Ok(out)
}

/// `ctvm-tpm` (`tests/guests/linux-tpm/`), the guest's TPM 1.2 client for
/// the durable-vTPM scenario: Rust, linked static for the initramfs
/// (its own target directory, so the host build is not rebuilt).
pub fn tpm_client() -> Result<PathBuf, Fail> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    run(cargo()
        .args(["build", "-q", "--release", "--target", TARGET, "-p", "ctvm-tpm"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let bin = root().join("target").join(TARGET).join("release").join("ctvm-tpm");
    let stripped = work_dir().join("linux").join("build").join("user").join("ctvm-tpm");
    fs::create_dir_all(stripped.parent().expect("a directory"))?;
    run(Command::new("strip").arg("-o").arg(&stripped).arg(&bin))?;
    Ok(stripped)
}
