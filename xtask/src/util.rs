//! Small helpers: errors, paths, running commands.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A failure with a message for the user.
#[derive(Debug)]
pub struct Fail(pub String);

impl Fail {
    pub fn new(message: impl Into<String>) -> Self {
        Fail(message.into())
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail(e.to_string())
    }
}

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where xtask keeps what it makes: ISOs, run directories, logs.
pub fn work_dir() -> PathBuf {
    root().join("target").join("ctvm")
}

/// Runs a command to completion, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<(), Fail> {
    let status = cmd.status().map_err(|e| Fail(format!("cannot start {:?}: {e}", cmd.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Fail(format!("{} failed ({status})", describe(cmd))))
    }
}

/// Runs a command and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String, Fail> {
    output_bytes(cmd).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// A command's standard output, or its failure with its standard error.
pub fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>, Fail> {
    let out = cmd.output().map_err(|e| Fail(format!("cannot start {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Fail(format!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Formatting and lints, host and bare-metal builds alike.
pub fn lint() -> Result<(), Fail> {
    println!("xtask: rustfmt and clippy");
    crate::packages::ensure_bare_target()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--quiet",
        "--workspace",
        "--exclude",
        "testguest",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "clippy",
        "--quiet",
        "-p",
        "hypervisor",
        "-p",
        "testguest",
        "-p",
        "ctvm-boot",
        "--target",
        crate::packages::BARE_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    // The test image's hooks (only `ctvm-test` may carry them).
    run(cargo().args([
        "clippy",
        "--quiet",
        "-p",
        "hypervisor",
        "--features",
        "test-hooks",
        "--lib",
        "--bin",
        "ctvm-test",
        "--target",
        crate::packages::BARE_TARGET,
        "--",
        "-D",
        "warnings",
    ]))
}

/// The host-side test suite: every crate that runs on Linux.
pub fn host_tests() -> Result<(), Fail> {
    println!("xtask: host tests");
    crate::packages::ensure(crate::packages::Purpose::HostTests)?;
    run(cargo().args(["test", "--workspace", "--exclude", "testguest"]))
}
