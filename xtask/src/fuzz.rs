//! `cargo xtask fuzz [TARGET] [--time S]`: the long fuzzing campaign.
//!
//! Runs each cargo-fuzz target (or the one named) for `S` seconds on every
//! core (or `--jobs N` of them) (libFuzzer's fork mode, crashes counted rather than fatal), with its
//! corpus in `target/ctvm/fuzz/<target>/` seeded from the repository's
//! regression seeds, and prints executions, executions per second, coverage
//! and crashes per target. Crashing inputs land in
//! `target/ctvm/fuzz/<target>/artifacts/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::util::{self, Fail};

/// One cargo-fuzz target.
struct Target {
    name: &'static str,
    /// The crate whose `fuzz/` holds it.
    krate: &'static str,
    /// `address` where the code under test has `unsafe`; vtpm-core forbids
    /// it, so its targets run without ASan (3x faster).
    sanitizer: &'static str,
    max_len: u32,
    extra: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target { name: "execute", krate: "vtpm-core", sanitizer: "none", max_len: 4096, extra: &[] },
    // Its inputs that reach a private key cost milliseconds: spend the time
    // on the others unless they find something new.
    Target {
        name: "execute_keys",
        krate: "vtpm-core",
        sanitizer: "none",
        max_len: 4096,
        extra: &["-entropic_scale_per_exec_time=1"],
    },
    Target { name: "state", krate: "vtpm-core", sanitizer: "none", max_len: 4096, extra: &[] },
    Target { name: "tis", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "mmio", krate: "hypervisor", sanitizer: "address", max_len: 1024, extra: &[] },
    Target { name: "agent", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "boot", krate: "hypervisor", sanitizer: "address", max_len: 8192, extra: &[] },
    Target { name: "acpi", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "access", krate: "hypervisor", sanitizer: "address", max_len: 1024, extra: &[] },
    Target { name: "hypercall", krate: "hypervisor", sanitizer: "address", max_len: 2048, extra: &[] },
    Target { name: "platform", krate: "hypervisor", sanitizer: "address", max_len: 2048, extra: &[] },
    Target { name: "blob", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "dmar", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "txt", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "ptpm", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
    Target { name: "vtd", krate: "hypervisor", sanitizer: "address", max_len: 4096, extra: &[] },
];

/// What one campaign did, from libFuzzer's last status line.
#[derive(Default)]
struct Stats {
    executions: u64,
    per_second: u64,
    coverage: u64,
    crashes: u64,
}

pub fn fuzz(args: &[String]) -> Result<(), Fail> {
    let mut seconds = 600u64;
    let mut only = None;
    let mut cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--time" => {
                let s = it.next().ok_or(Fail::new("--time needs seconds"))?;
                seconds = s.parse().map_err(|_| Fail(format!("--time {s:?}: not a number of seconds")))?;
            }
            // Fewer cores than the machine has: on a machine shared with
            // other work (emulator runs).
            "--jobs" => {
                let s = it.next().ok_or(Fail::new("--jobs needs a number of cores"))?;
                cores = s
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| Fail(format!("--jobs {s:?}: not a number of cores")))?;
            }
            other if other.starts_with('-') => return Err(Fail(format!("unknown option {other}"))),
            other => only = Some(other.to_string()),
        }
    }
    let targets: Vec<&Target> = TARGETS.iter().filter(|t| only.as_deref().is_none_or(|n| n == t.name)).collect();
    if targets.is_empty() {
        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        return Err(Fail(format!("no fuzz target {:?}; targets: {}", only.unwrap_or_default(), names.join(", "))));
    }
    ensure_cargo_fuzz()?;
    let mut results = Vec::new();
    for t in targets {
        println!("xtask: fuzzing {} for {seconds} s on {cores} cores", t.name);
        results.push((t.name, campaign(t, seconds, cores)?));
    }
    println!("\n{:<14} {:>14} {:>10} {:>8} {:>8}", "target", "executions", "exec/s", "edges", "crashes");
    for (name, s) in &results {
        println!("{name:<14} {:>14} {:>10} {:>8} {:>8}", s.executions, s.per_second, s.coverage, s.crashes);
    }
    let total: u64 = results.iter().map(|(_, s)| s.executions).sum();
    println!("{:<14} {total:>14}", "total");
    if results.iter().any(|(_, s)| s.crashes > 0) {
        return Err(Fail::new(format!("crashes found: inputs in {}", util::work_dir().join("fuzz").display())));
    }
    Ok(())
}

/// cargo-fuzz and a nightly toolchain, which it needs.
fn ensure_cargo_fuzz() -> Result<(), Fail> {
    let have =
        |args: &[&str]| nightly(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !have(&["--version"]) {
        return Err(Fail::new("fuzzing needs a nightly toolchain: rustup toolchain install nightly"));
    }
    if !have(&["fuzz", "--version"]) {
        util::run(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// `cargo +nightly ARGS`, free of the pinned toolchain this xtask runs under.
fn nightly(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").args(args);
    for var in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    cmd
}

fn campaign(t: &Target, seconds: u64, cores: usize) -> Result<Stats, Fail> {
    let dir = util::work_dir().join("fuzz").join(t.name);
    let corpus = dir.join("corpus");
    let artifacts = dir.join("artifacts");
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let seeds: PathBuf = util::root().join(t.krate).join("fuzz").join("seeds").join(t.name);
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let mut args =
        vec!["fuzz".to_string(), "run".into(), "-s".into(), t.sanitizer.into(), t.name.into(), path(&corpus)];
    if seeds.is_dir() {
        args.push(path(&seeds));
    }
    args.push("--".into());
    args.extend([
        format!("-fork={cores}"),
        "-ignore_crashes=1".into(),
        format!("-max_total_time={seconds}"),
        format!("-max_len={}", t.max_len),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    args.extend(t.extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = nightly(&args);
    cmd.current_dir(util::root().join(t.krate)).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Fail(format!("cannot start cargo fuzz: {e}")))?;
    let mut stats = Stats::default();
    let stderr = child.stderr.take().expect("piped");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        // Status lines show progress; errors and crash reports are kept.
        if let Some(s) = parse_status(&line) {
            stats = s;
            eprintln!("{line}");
        } else if line.contains("ERROR") || line.contains("error:") || line.contains("panicked") {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    if !status.success() && stats.executions == 0 {
        return Err(Fail(format!("cargo fuzz run {} failed ({status})", t.name)));
    }
    Ok(stats)
}

/// A fork-mode status line: `#1318522: cov: 1535 ft: 5987 corp: 1387
/// exec/s: 43950 oom/timeout/crash: 0/0/1 time: 31s job: 3 dft_time: 0`.
fn parse_status(line: &str) -> Option<Stats> {
    let rest = line.strip_prefix('#')?;
    let (count, rest) = rest.split_once(':')?;
    let executions = count.parse().ok()?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    let coverage = after("cov:")?.parse().ok()?;
    // The whole run's rate (libFuzzer's own is the last job's): executions
    // over the time elapsed.
    let seconds: Option<u64> = after("time:").and_then(|t| t.trim_end_matches('s').parse().ok());
    let per_second = match seconds {
        Some(s) if s > 0 => executions / s,
        _ => after("exec/s:")?.parse().ok()?,
    };
    let crashes = after("oom/timeout/crash:")?.rsplit('/').next()?.parse().ok()?;
    Some(Stats { executions, per_second, coverage, crashes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fork_mode_status_lines() {
        let s = parse_status(
            "#1318522: cov: 1535 ft: 5987 corp: 1387 exec/s: 43950 oom/timeout/crash: 0/0/2 time: 31s job: 3 dft_time: 0",
        )
        .unwrap();
        assert_eq!((s.executions, s.coverage, s.per_second, s.crashes), (1318522, 1535, 42532, 2));
        let s = parse_status("#1000: cov: 10 ft: 20 corp: 3 exec/s: 7 oom/timeout/crash: 0/0/0").unwrap();
        assert_eq!(s.per_second, 7, "without a time, libFuzzer's rate");
        assert!(parse_status("#4096\tpulse  cov: 1502 ft: 5300").is_none());
    }
}
