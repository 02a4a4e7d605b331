//! Running an ISO under Bochs (VT-x emulated) or QEMU with KVM (nested VT-x).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::image;
use crate::scenarios::Scenario;
use crate::util::{work_dir, Fail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    Bochs,
    QemuKvm,
}

impl Emulator {
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::QemuKvm => "qemu",
        }
    }

    /// The hypervisor's `exit=` option for this emulator.
    pub fn exit_method(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::QemuKvm => "qemu",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Choice {
    Auto,
    Fixed(Emulator),
}

impl Choice {
    pub fn parse(s: &str) -> Result<Self, Fail> {
        match s {
            "auto" => Ok(Choice::Auto),
            "bochs" => Ok(Choice::Fixed(Emulator::Bochs)),
            "qemu" | "kvm" => Ok(Choice::Fixed(Emulator::QemuKvm)),
            other => Err(Fail(format!("unknown emulator {other:?} (auto, bochs, qemu)"))),
        }
    }

    pub fn resolve(self) -> Emulator {
        match self {
            Choice::Fixed(e) => e,
            Choice::Auto if kvm_offers_vmx() => Emulator::QemuKvm,
            Choice::Auto => Emulator::Bochs,
        }
    }
}

/// KVM can run CTVM only when the host CPU has VMX and nested VMX is on.
fn kvm_offers_vmx() -> bool {
    let kvm = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let vmx = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|w| w == "vmx"));
    let nested =
        fs::read_to_string("/sys/module/kvm_intel/parameters/nested").is_ok_and(|v| matches!(v.trim(), "Y" | "1"));
    kvm && vmx && nested
}

/// The result of one emulator run.
pub struct RunOutput {
    pub serial: String,
    pub emulator_log: String,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub dir: PathBuf,
}

const BOCHS_DBG_RC: &str = "continue\nquit\n";

fn bochsrc(iso: &Path, serial: &Path, log: &Path, megs: u32) -> String {
    format!(
        "megs: {megs}\n\
         cpu: model=corei7_skylake_x, count=1, ips=200000000, reset_on_triple_fault=0, ignore_bad_msrs=1\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
         ata0-master: type=cdrom, path={}, status=inserted\n\
         boot: cdrom\n\
         display_library: rfb, options=\"timeout=0\"\n\
         com1: enabled=1, mode=file, dev={}\n\
         log: {}\n\
         speaker: enabled=0\n\
         clock: sync=none, time0=local\n",
        iso.display(),
        serial.display(),
        log.display()
    )
}

/// Boots `iso`, waits for the machine to power off or the timeout, and
/// collects the serial output. `echo` streams the console as it comes.
pub fn boot(
    emulator: Emulator,
    iso: &Path,
    run_name: &str,
    megs: u32,
    timeout: Duration,
    echo: bool,
) -> Result<RunOutput, Fail> {
    let dir = work_dir().join("runs").join(run_name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let serial = dir.join("serial.txt");
    let emu_log = dir.join(format!("{}.log", emulator.name()));
    fs::write(&serial, "")?;
    let start = Instant::now();
    let mut child = match emulator {
        Emulator::Bochs => {
            let rc = dir.join("bochsrc");
            fs::write(&rc, bochsrc(iso, &serial, &emu_log, megs))?;
            fs::write(dir.join("dbg.rc"), BOCHS_DBG_RC)?;
            Command::new("bochs")
                .current_dir(&dir)
                .args(["-q", "-f", "bochsrc", "-rc", "dbg.rc"])
                .stdin(Stdio::null())
                .stdout(fs::File::create(dir.join("bochs.out"))?)
                .stderr(Stdio::from(fs::File::create(dir.join("bochs.err"))?))
                .spawn()
                .map_err(|e| Fail(format!("cannot start bochs: {e}")))?
        }
        Emulator::QemuKvm => Command::new("qemu-system-x86_64")
            .current_dir(&dir)
            .args(["-enable-kvm", "-cpu", "host", "-m"])
            .arg(megs.to_string())
            .arg("-cdrom")
            .arg(iso)
            .args(["-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&emu_log)?)
            .stderr(Stdio::from(fs::File::create(dir.join("qemu.err"))?))
            .spawn()
            .map_err(|e| Fail(format!("cannot start qemu-system-x86_64: {e}")))?,
    };
    let timed_out = wait_streaming(&mut child, &serial, timeout, echo)?;
    let elapsed = start.elapsed();
    let serial_text = String::from_utf8_lossy(&fs::read(&serial)?).replace('\r', "");
    let mut emulator_log = String::new();
    for f in ["bochs.out", "bochs.err", "qemu.err"] {
        if let Ok(s) = fs::read_to_string(dir.join(f)) {
            emulator_log.push_str(&s);
        }
    }
    Ok(RunOutput { serial: serial_text, emulator_log, timed_out, elapsed, dir })
}

/// Polls the child until it exits or the deadline passes (then kills it).
/// Returns whether it timed out.
fn wait_streaming(child: &mut Child, serial: &Path, timeout: Duration, echo: bool) -> Result<bool, Fail> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let exited = child.try_wait()?.is_some();
        if echo {
            if let Ok(mut f) = fs::File::open(serial) {
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                offset += buf.len() as u64;
                let text: Vec<u8> = buf.into_iter().filter(|&b| b != b'\r').collect();
                out.write_all(&text)?;
                out.flush()?;
            }
        }
        if exited {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cargo xtask run`: boot a scenario and show its console.
pub fn run_interactive(scenario: &Scenario, choice: Choice) -> Result<(), Fail> {
    let emulator = choice.resolve();
    if emulator == Emulator::QemuKvm {
        println!("xtask: /dev/kvm offers VT-x: booting under QEMU with KVM");
    } else {
        println!("xtask: booting under Bochs (VT-x emulated; no usable KVM here)");
    }
    let iso = image::iso_for_emulator(scenario, emulator)?;
    let result =
        boot(emulator, &iso, &format!("run-{}", scenario.name), scenario.megs, Duration::from_secs(3600), true)?;
    println!("\nxtask: machine stopped after {:.1} s; logs in {}", result.elapsed.as_secs_f64(), result.dir.display());
    Ok(())
}
