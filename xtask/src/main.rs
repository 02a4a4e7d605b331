//! `cargo xtask`: the one entry point for building, booting and testing CTVM.
//!
//! ```text
//! cargo xtask build            build the hypervisor and the test guests
//! cargo xtask iso [SCENARIO]   build a bootable ISO (default: the demo set-up)
//! cargo xtask run [--emulator bochs|qemu] [SCENARIO]
//!                              boot it, streaming the serial console
//! cargo xtask test [--host-only|--scenarios-only] [NAME...]
//!                              host tests, then every Bochs scenario
//! cargo xtask fuzz [TARGET] [--time S] [--jobs N]
//!                              the long fuzzing campaign, every core (or N)
//! ```

mod bench;
mod durable;
mod elf32;
mod emulator;
mod fuzz;
mod image;
mod linux;
mod packages;
mod platform_checks;
mod scenarios;
mod tpm12_owner;
mod util;

use std::process::ExitCode;

use util::Fail;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(message)) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What `cargo xtask run` boots without a name.
const DEFAULT_RUN: &str = "linux-shell";

const USAGE: &str = "usage: cargo xtask <build|iso|run|test|scenarios|modules|bench|fuzz> [options]
  build                          build the hypervisor and the test guests
  iso [SCENARIO]                 build the ISO of a scenario (default: linux-shell)
  run [--emulator E] [SCENARIO]  boot it with the serial console shown (E: auto, bochs, qemu)
  test [--host-only | --scenarios-only] [SCENARIO...]
                                 host tests and the emulator scenarios
  bench [linux-boot|integrity|ima|exits]
                                 Linux boot time under CTVM against bare; the cost of
                                 isolating a module (exits, view switches, guest time);
                                 the cost of IMA's measurements in the vTPM; the cost
                                 of an exit, a vTIS access and a TPM command
  scenarios                      list the scenarios
  modules [--newer-kernel]       build the agent and test modules for the guest kernel
                                 (or the newest 6.4+ cloud kernel apt offers)
  fuzz [TARGET] [--time S] [--jobs N]
                                 each cargo-fuzz target (or TARGET) for S seconds (600) on
                                 every core (or N): executions, exec/s, coverage, crashes";

fn run(args: &[String]) -> Result<(), Fail> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match command.as_str() {
        "build" => {
            image::build_all()?;
            Ok(())
        }
        "iso" => {
            let scenario = scenarios::find(rest.first().map_or(DEFAULT_RUN, String::as_str))?;
            let iso = image::iso_for(&scenario)?;
            println!("{}", iso.display());
            Ok(())
        }
        "run" => {
            let mut emulator = emulator::Choice::Auto;
            let mut name = DEFAULT_RUN.to_string();
            let mut it = rest.iter();
            while let Some(arg) = it.next() {
                match arg.as_str() {
                    "--emulator" => {
                        let value = it.next().ok_or_else(|| Fail::new("--emulator needs a value"))?;
                        emulator = emulator::Choice::parse(value)?;
                    }
                    other if other.starts_with('-') => return Err(Fail(format!("unknown option {other}\n{USAGE}"))),
                    other => name = other.to_string(),
                }
            }
            let scenario = scenarios::find(&name)?;
            emulator::run_interactive(&scenario, emulator)
        }
        "test" => {
            let mut host = true;
            let mut emulated = true;
            let mut names = Vec::new();
            for arg in rest {
                match arg.as_str() {
                    "--host-only" => emulated = false,
                    "--scenarios-only" => host = false,
                    other if other.starts_with('-') => return Err(Fail(format!("unknown option {other}\n{USAGE}"))),
                    other => names.push(other.to_string()),
                }
            }
            // Everything the run will call, installed (or named) before it starts.
            packages::ensure(match (host, emulated) {
                (true, true) => packages::Purpose::Test,
                (true, false) => packages::Purpose::HostTests,
                _ => packages::Purpose::Images,
            })?;
            if host {
                util::lint()?;
                util::host_tests()?;
            }
            if emulated {
                scenarios::run_all(&names)?;
            }
            Ok(())
        }
        "modules" => {
            let kernel = match rest.first().map(String::as_str) {
                Some("--newer-kernel") => linux::Kernel::Newer,
                _ => linux::Kernel::Default,
            };
            for ko in linux::modules::build(&linux::kernel_package(kernel)?)? {
                println!("{}", ko.display());
            }
            Ok(())
        }
        "bench" => match rest.first().map(String::as_str) {
            Some("linux-boot") | None => bench::linux_boot(),
            Some("integrity") => bench::integrity(),
            Some("ima") => bench::ima(),
            Some("exits") => bench::exits_cost(),
            Some(other) => Err(Fail(format!("no benchmark {other:?}; benchmarks: linux-boot, integrity, ima, exits"))),
        },
        "fuzz" => fuzz::fuzz(rest),
        "scenarios" => {
            for s in scenarios::all() {
                println!("{:<20} {}", s.name, s.about);
            }
            println!("{:<20} {}", durable::NAME, durable::ABOUT);
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Fail(format!("unknown command {other:?}\n{USAGE}"))),
    }
}
