//! `cargo xtask bench`: measurements that need the emulator, side by side in
//! one run. Wall times on Bochs are the emulator's, not a real CPU's; what
//! matters is the ratio of runs made the same way.

use std::time::Duration;

use crate::emulator::{self, Emulator};
use crate::image::{self, ModuleSpec};
use crate::linux;
use crate::scenarios;
use crate::util::{work_dir, Fail};

const MARKER: &str = "ctvm-init: started";

/// Linux to /init bare under Bochs against Linux under CTVM under Bochs, on
/// 1, 2 and 4 CPUs (the guest gets them all): wall time, and the guest's own
/// uptime at /init, which counts emulated instructions whatever the host's
/// load.
pub fn linux_boot() -> Result<(), Fail> {
    let assets = linux::assets(linux::Kernel::Default)?;
    let args = scenarios::LINUX_ARGS;
    let bare = image::make_linux_iso("bench-bare-linux", &assets.kernel, &assets.initrd, args)?;
    let scenario = scenarios::find("linux-boot")?;
    let bins = image::build_all()?;
    let modules: Vec<ModuleSpec> = scenario.modules(&bins)?;
    let ctvm = image::make_iso("bench-ctvm-linux", &bins.hypervisor, "exit=bochs", &modules)?;
    let timeout = Duration::from_secs(1800);
    let mut rows = Vec::new();
    for cpus in [1, 2, 4] {
        for (name, iso) in [("bare", &bare), ("ctvm", &ctvm)] {
            println!("xtask: bench: booting Linux {name} on {cpus} CPUs");
            let run = format!("bench-{name}-{cpus}");
            let out = emulator::boot(Emulator::Bochs, iso, &run, (1024, cpus), timeout, Some(MARKER))?;
            let at = out
                .marker_at
                .ok_or_else(|| Fail(format!("{run}: no {MARKER:?} line; logs in {}", out.dir.display())))?;
            let uptime = uptime_at_init(&out.serial).unwrap_or(f64::NAN);
            let wakeups = scenarios::number_after(&out.serial, "cross-CPU wakeups: 50 round trips in ");
            rows.push((name, cpus, at, uptime, out.elapsed, exits(&out.serial), wakeups));
        }
    }
    println!(
        "\n{:<6} {:>5} {:>13} {:>15} {:>15} {:>10} {:>22}",
        "run", "CPUs", "to /init (s)", "guest time (s)", "power-off (s)", "VM exits", "50 wakeup trips (us)"
    );
    for (name, cpus, at, uptime, total, exits, wakeups) in &rows {
        println!(
            "{name:<6} {cpus:>5} {:>13.1} {uptime:>15.2} {:>15.1} {:>10} {:>22}",
            at.as_secs_f64(),
            total.as_secs_f64(),
            exits.unwrap_or(0),
            wakeups.map_or("-".into(), |w| w.to_string())
        );
    }
    for pair in rows.chunks(2) {
        let (bare, ctvm) = (&pair[0], &pair[1]);
        println!(
            "{} CPUs, ctvm / bare to /init: wall {:.2}, guest time {:.2}",
            bare.1,
            ctvm.2.as_secs_f64() / bare.2.as_secs_f64(),
            ctvm.3 / bare.3
        );
    }
    println!("(logs in {})", work_dir().join("runs").display());
    Ok(())
}

/// The guest's uptime on its `ctvm-init: started: Linux ..., uptime S s` line.
fn uptime_at_init(serial: &str) -> Option<f64> {
    let line = serial.lines().find(|l| l.contains(MARKER))?;
    line.split_once("uptime ")?.1.split_whitespace().next()?.parse().ok()
}

fn exits(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm:   total "))
        .filter_map(|r| r.split_whitespace().last()?.parse().ok())
        .reduce(|a: u64, b| a + b)
}

/// The cost of isolating a module: `calls.ko` (two exported kernel calls
/// per round, four crossings) under CTVM without the agent, then isolated
/// by it at two loop counts, so that boot and load costs cancel out of the
/// per-round exit and view-switch counts.
pub fn integrity() -> Result<(), Fail> {
    let bins = image::build_all()?;
    let timeout = Duration::from_secs(900);
    let runs = [("bare", 5000u32), ("agent", 1000), ("agent", 5000)];
    let mut rows = Vec::new();
    let mut workloads = Vec::new();
    for (mode, loops) in runs {
        let name = format!("bench-integrity-{mode}-{loops}");
        let args = format!("{} ctvm.bench={mode} ctvm.loops={loops}", scenarios::LINUX_ARGS);
        let spec = scenarios::linux_guest(Box::leak(args.into_boxed_str()));
        let modules = scenarios::modules_for(&[spec], &bins)?;
        let iso = image::make_iso(&name, &bins.hypervisor, "exit=bochs", &modules)?;
        println!("xtask: bench: {mode}, {loops} rounds");
        let out = emulator::boot(Emulator::Bochs, &iso, &name, (1024, 1), timeout, None)?;
        let prefix = format!("ctvm-init: bench {mode}: {loops} rounds of snprintf/kstrtoint/strlen, 0 wrong, ");
        let guest = out.guest("linux");
        let ns = guest
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.split(' ').next()?.parse::<u64>().ok())
            .ok_or_else(|| Fail(format!("{name}: no result line; logs in {}", out.dir.display())))?;
        let switches = out
            .serial
            .lines()
            .find_map(|l| l.split_once("integrity linux: ")?.1.split(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        rows.push((mode, loops, ns, exits(&out.serial).unwrap_or(0), switches));
        let marker = format!("ctvm-init: bench {mode} workload ");
        workloads.push(
            guest
                .lines()
                .filter_map(|l| {
                    let (name, us) = l.strip_prefix(marker.as_str())?.split_once(": ")?;
                    Some((name.to_string(), us.trim_end_matches(" us").parse::<u64>().ok()?))
                })
                .collect::<Vec<_>>(),
        );
    }
    println!("\n{:<6} {:>7} {:>12} {:>10} {:>14}", "run", "rounds", "ns/round", "VM exits", "view switches");
    for (mode, loops, ns, exits, switches) in &rows {
        println!("{mode:<6} {loops:>7} {ns:>12} {exits:>10} {switches:>14}");
    }
    let (bare, low, high) = (rows[0], rows[1], rows[2]);
    let rounds = f64::from(high.1 - low.1);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / rounds;
    println!(
        "per round with the agent: {:.2} VM exits, {:.2} view switches; guest time {:.2}x bare ({} vs {} ns, \
         about {} vs {} emulated instructions at Bochs' 200 M ips)",
        per(low.3, high.3),
        per(low.4, high.4),
        high.2 as f64 / bare.2 as f64,
        high.2,
        bare.2,
        high.2 / 5,
        bare.2 / 5
    );
    println!("\nwork touching no isolated module (guest µs): bare | agent | ratio");
    for (name, bare_us) in &workloads[0] {
        if let Some((_, agent_us)) = workloads[2].iter().find(|(n, _)| n == name) {
            println!("  {name:<22} {bare_us:>9} {agent_us:>9} {:>7.3}", *agent_us as f64 / (*bare_us).max(1) as f64);
        }
    }
    Ok(())
}

/// What IMA's measurements cost: the TPM test /init reads the same files
/// with and without a measure-everything IMA policy, in one run. Each
/// measurement is a SHA-1 of the file and an Extend through the vTIS.
pub fn ima() -> Result<(), Fail> {
    let bins = image::build_all()?;
    let mut rows = Vec::new();
    for (name, policy) in [("ima-off", ""), ("ima-on", " ima_policy=tcb ctvm.ima=files")] {
        let args = format!("{}{policy} ctvm.tpm", scenarios::LINUX_ARGS);
        let spec = scenarios::linux_guest(Box::leak(args.into_boxed_str()));
        let modules = scenarios::modules_for(&[spec], &bins)?;
        let run = format!("bench-{name}");
        let iso = image::make_iso(&run, &bins.hypervisor, "exit=bochs", &modules)?;
        println!("xtask: bench: {name}");
        let out = emulator::boot(Emulator::Bochs, &iso, &run, (1024, 1), Duration::from_secs(600), None)?;
        let guest = out.guest("linux");
        let line = guest
            .lines()
            .find_map(|l| l.strip_prefix("ctvm-init: tpm tests done: "))
            .ok_or_else(|| Fail(format!("{run}: no summary line; logs in {}", out.dir.display())))?;
        let numbers: Vec<f64> =
            line.split(|c: char| !c.is_ascii_digit() && c != '.').filter_map(|n| n.parse().ok()).collect();
        let [measurements, uptime] = numbers[..] else {
            return Err(Fail(format!("{run}: cannot read {line:?}")));
        };
        let read_us = guest
            .lines()
            .find_map(|l| {
                l.strip_prefix("ctvm-init: read ")?.split(" in ").nth(1)?.strip_suffix(" us")?.parse::<f64>().ok()
            })
            .ok_or_else(|| Fail(format!("{run}: no read line")))?;
        rows.push((name, measurements, uptime, exits(&out.serial).unwrap_or(0), read_us));
    }
    println!("\n{:<8} {:>13} {:>12} {:>10} {:>16}", "run", "measurements", "uptime (s)", "VM exits", "file reads (µs)");
    for (name, m, up, exits, read) in &rows {
        println!("{name:<8} {m:>13} {up:>12.2} {exits:>10} {read:>16}");
    }
    let extra = rows[1].1 - rows[0].1;
    if extra > 0.0 {
        println!(
            "per IMA measurement: {:.0} µs of guest time, {:.0} VM exits",
            (rows[1].4 - rows[0].4) / extra,
            (rows[1].3 as f64 - rows[0].3 as f64) / extra
        );
    }
    Ok(())
}

/// What exits cost: the test guest times a CPUID the hypervisor answers, a
/// vTIS register read and a TPM Extend through the vTIS (byte-wide and
/// 4-byte FIFO), in TSC ticks, which Bochs advances once per emulated
/// instruction, the hypervisor's included.
pub fn exits_cost() -> Result<(), Fail> {
    let bins = image::build_all()?;
    let spec = scenarios::GuestSpec {
        name: "alpha",
        kind: scenarios::GuestImage::Test,
        mem_mib: 16,
        vtpm: true,
        args: "test=cost",
        options: "",
    };
    let modules = scenarios::modules_for(&[spec], &bins)?;
    let iso = image::make_iso("bench-exits", &bins.hypervisor, "exit=bochs", &modules)?;
    let out = emulator::boot(Emulator::Bochs, &iso, "bench-exits", (256, 1), Duration::from_secs(300), None)?;
    let lines: Vec<&str> = out.serial.lines().filter_map(|l| l.strip_prefix("[alpha] cost ")).collect();
    if lines.len() < 5 || !out.serial.contains("[alpha] all checks passed") {
        return Err(Fail(format!("the cost test did not complete; logs in {}", out.dir.display())));
    }
    println!();
    for l in lines {
        println!("{l}");
    }
    for l in out.serial.lines().filter(|l| l.starts_with("ctvm:      ") || l.starts_with("ctvm:   total")) {
        println!("{}", l.trim_start_matches("ctvm: "));
    }
    Ok(())
}
