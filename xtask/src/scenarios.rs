//! The emulator scenarios: what each boots, and what its serial log must show.
//!
//! Pass or fail is read from the serial console. Every scenario must end
//! with the hypervisor's own clean power-off line, so a hang, a crash or a
//! missing line fails it; logs stay in `target/ctvm/runs/<scenario>/`.

use std::time::Duration;

use crate::emulator::{self, Emulator, RunOutput};
use crate::image::{self, Binaries, ModuleSpec};
use crate::linux;
use crate::util::Fail;

/// A guest booted from a module.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub name: &'static str,
    pub kind: GuestImage,
    pub mem_mib: u32,
    /// The guest's own command line (after `--`).
    pub args: &'static str,
}

/// What a guest boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// The test guest kernel (`tests/guests/testguest`).
    Test,
    /// Debian's cloud kernel with the test initramfs, on the pass-through platform.
    Linux,
}

pub type Check = fn(&RunOutput) -> Result<(), String>;

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub hypervisor_args: &'static str,
    pub guests: Vec<GuestSpec>,
    pub megs: u32,
    pub timeout: Duration,
    /// Lines (substrings) that must appear, in this order.
    pub expect: Vec<&'static str>,
    /// Substrings that must not appear anywhere.
    pub reject: Vec<&'static str>,
    /// Further checks on the whole output.
    pub checks: Vec<Check>,
    /// Whether the run must end with the hypervisor's clean power-off (all
    /// but the scenarios that crash the hypervisor on purpose).
    pub ends_cleanly: bool,
    /// For `cargo xtask run` only (it waits for a person at the console);
    /// `cargo xtask test` skips it unless it is named.
    pub interactive: bool,
}

impl Scenario {
    pub fn modules(&self, bins: &Binaries) -> Result<Vec<ModuleSpec>, Fail> {
        let mut out = Vec::new();
        for g in &self.guests {
            match g.kind {
                GuestImage::Test => out.push(ModuleSpec {
                    file: bins.testguest.clone(),
                    args: format!("guest={} mem={}M -- {}", g.name, g.mem_mib, g.args),
                }),
                GuestImage::Linux => {
                    let assets = linux::assets()?;
                    println!("xtask: Linux guest {}: Debian kernel {}", g.name, assets.version);
                    out.push(ModuleSpec {
                        file: assets.kernel,
                        args: format!("guest={} kind=linux -- {}", g.name, g.args),
                    });
                    out.push(ModuleSpec { file: assets.initrd, args: format!("initrd={}", g.name) });
                }
            }
        }
        Ok(out)
    }
}

/// What every run must end with, and must never show.
const CLEAN_END: &str = "ctvm: all guests stopped; powering off";
const ALWAYS_REJECT: &[&str] = &["hypervisor panic", "Kernel panic"];

fn guest(name: &'static str, args: &'static str) -> GuestSpec {
    GuestSpec { name, kind: GuestImage::Test, mem_mib: 16, args }
}

/// The kernel command line of the Linux scenarios.
const LINUX_ARGS: &str = "console=ttyS0,115200 nokaslr quiet panic=-1 tpm_tis.interrupts=0";

fn linux(args: &'static str) -> GuestSpec {
    GuestSpec { name: "linux", kind: GuestImage::Linux, mem_mib: 0, args }
}

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "linux-shell",
            about: "what `cargo xtask run` boots: Debian's cloud kernel under CTVM, leaving a busybox shell",
            hypervisor_args: "",
            guests: vec![linux(concat!("console=ttyS0,115200 nokaslr quiet tpm_tis.interrupts=0", " ctvm.shell"))],
            megs: 1024,
            timeout: Duration::from_secs(3600),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: true,
        },
        Scenario {
            name: "boot",
            about: "the hypervisor boots, reports the VT-x features it found, and powers off",
            hypervisor_args: "log=debug",
            guests: vec![],
            megs: 256,
            timeout: Duration::from_secs(60),
            expect: vec![
                "ctvm: CTVM 0.1.0 starting",
                "ctvm: VT-x: VMCS revision",
                "ctvm: VT-x: EPT",
                "ctvm: VMX on",
                "ctvm: no guests configured",
                CLEAN_END,
            ],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "guest-basics",
            about: "a test guest prints through the vUART, queries the version, and shuts down with exit code 42",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=basics exit=42")],
            megs: 256,
            timeout: Duration::from_secs(90),
            expect: vec![
                "ctvm: guest alpha: loaded",
                "[alpha] CTVM test guest alpha starting",
                "[alpha] ok: cpuid hides vmx",
                "[alpha] ok: hypervisor leaf signature CTVMCTVMCTVM",
                "[alpha] ok: hypercall version",
                "[alpha] ok: allowed msr read",
                "[alpha] ok: denied msr raises #GP",
                "[alpha] ok: unknown port reads 0xff",
                "[alpha] all checks passed",
                "ctvm: guest alpha stopped: shutdown hypercall, exit code 42",
                "ctvm: VM exits by reason",
                CLEAN_END,
            ],
            reject: vec!["[alpha] FAIL"],
            checks: vec![unknown_port_logged_once],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "containment",
            about: "a triple-faulting guest and one touching memory it does not own are stopped; the others carry on",
            hypervisor_args: "",
            guests: vec![
                guest("alpha", "test=basics exit=0"),
                guest("beta", "test=triple-fault"),
                guest("gamma", "test=wild-write"),
            ],
            megs: 256,
            timeout: Duration::from_secs(90),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![containment_reports],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "timeslice",
            about: "two guests share the CPU: the preemption timer interleaves their work",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=ticks count=4"), guest("beta", "test=ticks count=4")],
            megs: 256,
            timeout: Duration::from_secs(120),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![interleaved_ticks],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "entry-failure",
            about: "a guest whose state VM entry refuses is stopped with the failing field named",
            hypervisor_args: "debug.corrupt-guest=beta",
            guests: vec![guest("alpha", "test=basics exit=3"), guest("beta", "test=basics")],
            megs: 256,
            timeout: Duration::from_secs(90),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![entry_failure_named],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-boot",
            about: "Debian's cloud kernel boots to /init under CTVM on the pass-through platform and powers off",
            hypervisor_args: "",
            guests: vec![linux(LINUX_ARGS)],
            megs: 1024,
            timeout: Duration::from_secs(400),
            expect: vec![
                "ctvm: guest linux: Linux boot protocol 2.15",
                "ctvm-init: started: Linux",
                "ctvm-init: vmx visible: no",
                "ctvm-init: hypervisor flag: yes",
                "ctvm-init: done",
                "ctvm: guest linux stopped: ACPI sleep requested (SLP_TYP",
                CLEAN_END,
            ],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-containment",
            about: "Linux writing to the hypervisor's memory through /dev/mem is stopped with a report",
            hypervisor_args: "",
            guests: vec![linux(concat!(
                "console=ttyS0,115200 nokaslr quiet panic=-1 tpm_tis.interrupts=0",
                " ctvm.poke=0x200000"
            ))],
            megs: 1024,
            timeout: Duration::from_secs(400),
            expect: vec![
                "ctvm-init: done",
                "ctvm-init: poking 0x200000 through /dev/mem",
                "ctvm: guest linux stopped: EPT violation: write to guest-physical 0x200000 (not guest memory)",
                CLEAN_END,
            ],
            reject: vec!["ctvm-init: FAIL"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "hypervisor-fault",
            about: "a fault inside the hypervisor is reported with vector, RIP, CR2 and a backtrace, then the machine stops",
            hypervisor_args: "debug.fault",
            guests: vec![],
            megs: 256,
            timeout: Duration::from_secs(60),
            expect: vec![
                "ctvm: FATAL: exception 14 (#PF page fault) in the hypervisor, error code 0x0",
                "cr2 0x0000001000000000",
                "ctvm:   backtrace: 0x",
            ],
            reject: vec![CLEAN_END],
            checks: vec![],
            ends_cleanly: false,
            interactive: false,
        },
        Scenario {
            name: "test-guests",
            about: "two test guests sharing the CPU (`cargo xtask run test-guests`)",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=basics exit=0"), guest("beta", "test=ticks count=3")],
            megs: 256,
            timeout: Duration::from_secs(120),
            expect: vec!["ctvm: guest alpha stopped", CLEAN_END],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
    ]
}

fn unknown_port_logged_once(out: &RunOutput) -> Result<(), String> {
    let n = out.serial.matches("ctvm: guest alpha: unhandled port 0x2f8").count();
    if n == 1 {
        Ok(())
    } else {
        Err(format!("the unknown port 0x2f8 was logged {n} times, expected once"))
    }
}

fn interleaved_ticks(out: &RunOutput) -> Result<(), String> {
    let order: Vec<&str> = out
        .serial
        .lines()
        .filter(|l| l.contains("] tick "))
        .map(|l| if l.starts_with("[alpha]") { "alpha" } else { "beta" })
        .collect();
    if order.len() != 8 {
        return Err(format!("expected 8 tick lines, saw {}", order.len()));
    }
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    if switches < 2 {
        return Err(format!("the guests did not interleave: {order:?}"));
    }
    Ok(())
}

fn entry_failure_named(out: &RunOutput) -> Result<(), String> {
    let s = &out.serial;
    let line = s
        .lines()
        .find(|l| l.starts_with("ctvm: guest beta stopped: VM entry failed (reason 33"))
        .ok_or("no entry-failure report for beta")?;
    if !line.contains("GUEST_CR4") {
        return Err(format!("the report does not name GUEST_CR4: {line}"));
    }
    if !s.contains("ctvm: guest alpha stopped: shutdown hypercall, exit code 3") {
        return Err("alpha did not run to completion beside the broken guest".into());
    }
    Ok(())
}

fn containment_reports(out: &RunOutput) -> Result<(), String> {
    let s = &out.serial;
    let need = [
        "ctvm: guest beta stopped: triple fault",
        "ctvm: guest gamma stopped: EPT violation: write to guest-physical 0x40000000 (not guest memory) at rip",
        "ctvm: guest alpha stopped: shutdown hypercall, exit code 0",
        "[alpha] all checks passed",
    ];
    for n in need {
        if !s.contains(n) {
            return Err(format!("missing {n:?}"));
        }
    }
    Ok(())
}

pub fn find(name: &str) -> Result<Scenario, Fail> {
    all().into_iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = all().iter().map(|s| s.name).collect();
        Fail(format!("no scenario {name:?}; scenarios: {}", names.join(", ")))
    })
}

/// Checks a run's output against the scenario.
pub fn verdict(s: &Scenario, out: &RunOutput) -> Result<(), String> {
    if out.timed_out {
        return Err(format!("timed out after {} s", s.timeout.as_secs()));
    }
    let mut rest = out.serial.as_str();
    for e in &s.expect {
        match rest.find(e) {
            Some(at) => rest = &rest[at + e.len()..],
            None if out.serial.contains(e) => return Err(format!("{e:?} appeared out of order")),
            None => return Err(format!("missing {e:?}")),
        }
    }
    for r in s.reject.iter().chain(ALWAYS_REJECT) {
        if out.serial.contains(r) {
            return Err(format!("unexpected {r:?}"));
        }
    }
    if s.ends_cleanly && (out.serial.contains("FATAL") || !out.serial.contains(CLEAN_END)) {
        return Err("the hypervisor did not power off cleanly".into());
    }
    if !out.emulator_log.contains("shutdown requested") {
        return Err("Bochs did not see the power-off on its shutdown port".into());
    }
    for check in &s.checks {
        check(out)?;
    }
    Ok(())
}

/// Total VM exits the hypervisor reported, from its exit table.
fn total_exits(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm:   total"))
        .filter_map(|rest| rest.split_whitespace().last()?.parse::<u64>().ok())
        .reduce(|a, b| a + b)
}

pub fn run_all(names: &[String]) -> Result<(), Fail> {
    let selected: Vec<Scenario> = if names.is_empty() {
        all().into_iter().filter(|s| !s.interactive).collect()
    } else {
        names.iter().map(|n| find(n)).collect::<Result<_, _>>()?
    };
    let mut results = Vec::new();
    for s in &selected {
        let iso = image::iso_for_emulator(s, Emulator::Bochs)?;
        println!("xtask: scenario {}: {}", s.name, s.about);
        let out = emulator::boot(Emulator::Bochs, &iso, s.name, s.megs, s.timeout, None)?;
        let v = verdict(s, &out);
        match &v {
            Ok(()) => println!("xtask: scenario {} passed in {:.1} s", s.name, out.elapsed.as_secs_f64()),
            Err(why) => {
                println!("xtask: scenario {} FAILED: {why}", s.name);
                println!("xtask: last console lines:");
                let lines: Vec<&str> = out.serial.lines().collect();
                for l in &lines[lines.len().saturating_sub(25)..] {
                    println!("    {l}");
                }
                println!("xtask: logs kept in {}", out.dir.display());
            }
        }
        results.push((s.name, v.is_ok(), out.elapsed, total_exits(&out.serial)));
    }
    println!("\n{:<16} {:<7} {:>9} {:>10}", "scenario", "result", "wall (s)", "VM exits");
    for (name, ok, t, exits) in &results {
        let exits = exits.map_or("-".to_string(), |e| e.to_string());
        println!("{name:<16} {:<7} {:>9.1} {exits:>10}", if *ok { "pass" } else { "FAIL" }, t.as_secs_f64());
    }
    let failed = results.iter().filter(|r| !r.1).count();
    if failed > 0 {
        return Err(Fail(format!("{failed} of {} scenarios failed", results.len())));
    }
    Ok(())
}
