//! Running an ISO under Bochs (VT-x emulated), QEMU with KVM (nested VT-x),
//! or QEMU TCG (no VT-x, but a real VT-d model, the `edu` DMA device and
//! swtpm's TPMs: the platform pieces run there, then CTVM stops).

use std::fs;
use std::io::{Read, Write};
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
    QemuTcg,
}

impl Emulator {
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::QemuKvm => "qemu",
            Emulator::QemuTcg => "qemu-tcg",
        }
    }

    /// The hypervisor's `exit=` option for this emulator.
    pub fn exit_method(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::QemuKvm | Emulator::QemuTcg => "qemu",
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

/// The platform QEMU TCG gives the machine besides its q35 chipset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    /// `-device intel-iommu` (VT-d, 39-bit walks, interrupt remapping).
    pub iommu: bool,
    /// `-device edu`: a PCI device that DMAs where it is told.
    pub edu: bool,
    pub tpm: Option<TpmDevice>,
}

/// A platform TPM from swtpm (libtpms), the way PLATFORM-S2 measured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpmDevice {
    Tpm2Tis,
    Tpm2Crb,
    Tpm12Tis,
}

/// Who wrote a console line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The hypervisor: lines starting with `ctvm:`, which no guest can write.
    Hypervisor,
    /// A guest: lines the hypervisor prefixed with `[name] `.
    Guest(String),
    /// The firmware and the boot loader, before the hypervisor runs.
    Other,
}

/// One line of the console, a guest's pieces joined again where the
/// hypervisor's own lines cut it (its continuation lines start `[name]+ `).
#[derive(Clone, Debug)]
pub struct Line {
    pub source: Source,
    pub text: String,
}

impl Line {
    /// The line as the console showed it (a guest's with its prefix).
    pub fn shown(&self) -> String {
        match &self.source {
            Source::Guest(name) => format!("[{name}] {}", self.text),
            _ => self.text.clone(),
        }
    }
}

/// Splits a console log into lines by who wrote them.
pub fn lines(serial: &str) -> Vec<Line> {
    let mut out: Vec<Line> = Vec::new();
    for raw in serial.lines() {
        let guest = raw.strip_prefix('[').and_then(|r| {
            let (name, rest) = r.split_once(']')?;
            let (continued, text) = match rest.strip_prefix("+ ") {
                Some(text) => (true, text),
                None => (false, rest.strip_prefix(' ').unwrap_or(rest)),
            };
            (!name.is_empty() && !name.contains(' ')).then(|| (name.to_string(), continued, text))
        });
        match guest {
            Some((name, true, text)) => {
                let source = Source::Guest(name.clone());
                match out.iter_mut().rev().find(|l| l.source == source) {
                    Some(previous) => previous.text.push_str(text),
                    None => out.push(Line { source, text: text.to_string() }),
                }
            }
            Some((name, false, text)) => out.push(Line { source: Source::Guest(name), text: text.to_string() }),
            None if raw.starts_with("ctvm:") => out.push(Line { source: Source::Hypervisor, text: raw.to_string() }),
            None => out.push(Line { source: Source::Other, text: raw.to_string() }),
        }
    }
    out
}

/// The result of one emulator run.
pub struct RunOutput {
    pub serial: String,
    pub emulator_log: String,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// When the marker line first appeared on the console, from the start.
    pub marker_at: Option<Duration>,
    pub dir: PathBuf,
    /// The emulator's exit status (QEMU's isa-debug-exit: (code << 1) | 1).
    pub exit_code: Option<i32>,
    /// swtpm's log of every TPM command and response (QEMU TCG with a TPM).
    pub tpm_log: String,
}

impl RunOutput {
    pub fn lines(&self) -> Vec<Line> {
        lines(&self.serial)
    }

    /// What a guest wrote on its console, one line per line it wrote.
    pub fn guest(&self, name: &str) -> String {
        let source = Source::Guest(name.to_string());
        let mut text = String::new();
        for l in self.lines().into_iter().filter(|l| l.source == source) {
            text.push_str(&l.text);
            text.push('\n');
        }
        text
    }

    /// The hypervisor's own lines.
    pub fn hypervisor(&self) -> String {
        let mut text = String::new();
        for l in self.lines().into_iter().filter(|l| l.source == Source::Hypervisor) {
            text.push_str(&l.text);
            text.push('\n');
        }
        text
    }
}

const BOCHS_DBG_RC: &str = "continue\nquit\n";

/// Where Bochs' COM1 goes: a file (tests), or a TCP socket xtask bridges to
/// the terminal (interactive runs).
enum Com1<'a> {
    File(&'a Path),
    Socket(u16),
}

/// Bytes per cylinder of the disk geometry Bochs picks for a flat image
/// (16 heads, 63 sectors of 512 bytes): a disk image's size must be a
/// multiple of it, or Bochs leaves its end out of reach.
pub const DISK_CYLINDER: u64 = 16 * 63 * 512;

fn bochsrc(iso: &Path, com1: Com1<'_>, log: &Path, (megs, cpus): (u32, u32), disk: Option<&Path>) -> String {
    let com1 = match com1 {
        Com1::File(path) => format!("mode=file, dev={}", path.display()),
        Com1::Socket(port) => format!("mode=socket-server, dev=localhost:{port}"),
    };
    // The hard disk beside the CD: the BIOS and GRUB see it as (hd0), Linux
    // as /dev/sda through ata_piix.
    let disk = disk.map_or(String::new(), |d| format!("ata0-slave: type=disk, path={}, mode=flat\n", d.display()));
    // Bochs runs several CPUs in turn, `quantum` instructions each, and a
    // halted CPU's turn still costs: fewer instructions to a guest second
    // and the longest quantum halve a two-CPU run's wall time (linux-integrity
    // from /init to atk_newpgd: 217 s, against 431 s at 200 M and 16). One
    // CPU skips its idle time whatever the rate.
    let (ips, quantum) = if cpus > 1 { (50_000_000, 32) } else { (200_000_000, 16) };
    format!(
        "megs: {megs}\n\
         cpu: model=corei7_skylake_x, count={cpus}, ips={ips}, quantum={quantum}, reset_on_triple_fault=0, ignore_bad_msrs=1\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
         ata0-master: type=cdrom, path={}, status=inserted\n\
         {disk}\
         boot: cdrom\n\
         display_library: rfb, options=\"timeout=0\"\n\
         com1: enabled=1, {com1}\n\
         log: {}\n\
         speaker: enabled=0\n\
         sound: driver=dummy\n\
         clock: sync=none, time0=local\n",
        iso.display(),
        log.display()
    )
}

/// Boots `iso`, waits for the machine to power off or the timeout, and
/// collects the serial output, noting when `marker` first appears.
pub fn boot(
    emulator: Emulator,
    iso: &Path,
    run_name: &str,
    machine: (u32, u32),
    timeout: Duration,
    marker: Option<&str>,
) -> Result<RunOutput, Fail> {
    boot_with(emulator, iso, run_name, machine, timeout, marker, Devices::default())
}

/// swtpm serving one run's TPM on a UNIX socket, logging every command
/// and response (level 20) for the harness to check.
struct Swtpm {
    pid_file: PathBuf,
    log: PathBuf,
    socket: PathBuf,
}

impl Swtpm {
    fn start(dir: &Path, version2: bool) -> Result<Swtpm, Fail> {
        let state = dir.join("tpm-state");
        fs::create_dir_all(&state)?;
        if !version2 {
            // A 1.2 comes owned, as `tpm_takeownership -z` leaves a real one.
            crate::tpm12_owner::own_with_zero_secrets(&state)?;
        }
        let swtpm =
            Swtpm { pid_file: dir.join("swtpm.pid"), log: dir.join("swtpm.log"), socket: dir.join("swtpm.sock") };
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket");
        if version2 {
            cmd.arg("--tpm2");
        }
        cmd.arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", swtpm.socket.display()))
            .arg("--log")
            .arg(format!("file={},level=20", swtpm.log.display()))
            .arg("--pid")
            .arg(format!("file={}", swtpm.pid_file.display()))
            .arg("--daemon");
        crate::util::run(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !swtpm.socket.exists() {
            if Instant::now() > deadline {
                return Err(Fail("swtpm did not open its socket".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(swtpm)
    }

    /// QEMU's TPM options for `device`.
    fn qemu_args(&self, device: TpmDevice) -> Vec<String> {
        let model = if device == TpmDevice::Tpm2Crb { "tpm-crb" } else { "tpm-tis" };
        vec![
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", self.socket.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            format!("{model},tpmdev=tpm0"),
        ]
    }
}

impl Drop for Swtpm {
    /// swtpm exits with QEMU; this only ends one that outlived a killed QEMU.
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.pid_file) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                let _ = Command::new("kill").arg(pid.to_string()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// [`boot`] with QEMU TCG's devices.
pub fn boot_with(
    emulator: Emulator,
    iso: &Path,
    run_name: &str,
    machine: (u32, u32),
    timeout: Duration,
    marker: Option<&str>,
    devices: Devices,
) -> Result<RunOutput, Fail> {
    run(emulator, iso, run_name, machine, timeout, marker, devices, None)
}

/// [`boot`] with a hard disk image (Bochs only), which keeps what the
/// guest writes for the next boot.
pub fn boot_with_disk(
    emulator: Emulator,
    iso: &Path,
    run_name: &str,
    machine: (u32, u32),
    timeout: Duration,
    marker: Option<&str>,
    disk: Option<&Path>,
) -> Result<RunOutput, Fail> {
    run(emulator, iso, run_name, machine, timeout, marker, Devices::default(), disk)
}

#[allow(clippy::too_many_arguments)]
fn run(
    emulator: Emulator,
    iso: &Path,
    run_name: &str,
    (megs, cpus): (u32, u32),
    timeout: Duration,
    marker: Option<&str>,
    devices: Devices,
    disk: Option<&Path>,
) -> Result<RunOutput, Fail> {
    let dir = work_dir().join("runs").join(run_name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let serial = dir.join("serial.txt");
    let emu_log = dir.join(format!("{}.log", emulator.name()));
    fs::write(&serial, "")?;
    let start = Instant::now();
    let mut swtpm = None;
    let mut child = match emulator {
        Emulator::Bochs => {
            let rc = dir.join("bochsrc");
            if let Some(d) = disk {
                // A run that was killed leaves Bochs' lock behind.
                let _ = fs::remove_file(format!("{}.lock", d.display()));
            }
            fs::write(&rc, bochsrc(iso, Com1::File(&serial), &emu_log, (megs, cpus), disk))?;
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
        Emulator::QemuKvm | Emulator::QemuTcg => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.current_dir(&dir);
            if emulator == Emulator::QemuKvm {
                cmd.args(["-enable-kvm", "-cpu", "host"]);
            } else {
                cmd.args(["-machine", "q35", "-accel", "tcg", "-nic", "none"]);
            }
            cmd.arg("-m").arg(megs.to_string()).arg("-smp").arg(cpus.to_string());
            // The IOMMU must come before the PCI devices it translates.
            if devices.iommu {
                cmd.args(["-device", "intel-iommu"]);
            }
            if devices.edu {
                cmd.args(["-device", "edu"]);
            }
            if let Some(tpm) = devices.tpm {
                let t = Swtpm::start(&dir, tpm != TpmDevice::Tpm12Tis)?;
                cmd.args(t.qemu_args(tpm));
                swtpm = Some(t);
            }
            cmd.arg("-cdrom")
                .arg(iso)
                .args(["-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4"])
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .stdin(Stdio::null())
                .stdout(fs::File::create(&emu_log)?)
                .stderr(Stdio::from(fs::File::create(dir.join("qemu.err"))?))
                .spawn()
                .map_err(|e| Fail(format!("cannot start qemu-system-x86_64: {e}")))?
        }
    };
    let (timed_out, marker_at) = wait_streaming(&mut child, &serial, timeout, marker)?;
    let exit_code = child.try_wait().ok().flatten().and_then(|s| s.code());
    drop(swtpm);
    let elapsed = start.elapsed();
    let serial_text = String::from_utf8_lossy(&fs::read(&serial)?).replace('\r', "");
    let mut emulator_log = String::new();
    for f in ["bochs.out", "bochs.err", "qemu.err"] {
        if let Ok(s) = fs::read_to_string(dir.join(f)) {
            emulator_log.push_str(&s);
        }
    }
    let tpm_log = fs::read_to_string(dir.join("swtpm.log")).unwrap_or_default();
    Ok(RunOutput { serial: serial_text, emulator_log, timed_out, elapsed, marker_at, dir, exit_code, tpm_log })
}

/// Polls the child until it exits or the deadline passes (then kills it).
/// Returns whether it timed out.
fn wait_streaming(
    child: &mut Child,
    serial: &Path,
    timeout: Duration,
    marker: Option<&str>,
) -> Result<(bool, Option<Duration>), Fail> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut marker_at = None;
    loop {
        let exited = child.try_wait()?.is_some();
        if let (Some(m), None) = (marker, marker_at) {
            if fs::read(serial).is_ok_and(|b| b.windows(m.len()).any(|w| w == m.as_bytes())) {
                marker_at = Some(start.elapsed());
            }
        }
        if exited {
            return Ok((false, marker_at));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((true, marker_at));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cargo xtask run`: boot a scenario with the serial console on this
/// terminal, input included, until the machine powers off.
pub fn run_interactive(scenario: &Scenario, choice: Choice) -> Result<(), Fail> {
    // The platform scenarios need QEMU TCG's devices; they end by themselves.
    if scenario.target.emulator == Emulator::QemuTcg {
        let iso = image::iso_for_emulator(scenario, Emulator::QemuTcg)?;
        let machine = (scenario.megs, scenario.cpus);
        let run = format!("run-{}", scenario.name);
        let out =
            boot_with(Emulator::QemuTcg, &iso, &run, machine, scenario.time_limit(), None, scenario.target.devices)?;
        print!("{}", out.serial);
        println!("xtask: QEMU exited ({:?}) after {:.1} s", out.exit_code, out.elapsed.as_secs_f64());
        return Ok(());
    }
    let emulator = choice.resolve();
    let iso = image::iso_for_emulator(scenario, emulator)?;
    let dir = work_dir().join("runs").join(format!("run-{}", scenario.name));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let start = Instant::now();
    if emulator == Emulator::QemuKvm {
        println!("xtask: /dev/kvm offers VT-x: booting under QEMU with KVM (Ctrl-A X quits)");
        let status = Command::new("qemu-system-x86_64")
            .current_dir(&dir)
            .args(["-enable-kvm", "-cpu", "host", "-m"])
            .arg(scenario.megs.to_string())
            .arg("-cdrom")
            .arg(&iso)
            .args(["-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4", "-serial", "mon:stdio"])
            .status()
            .map_err(|e| Fail(format!("cannot start qemu-system-x86_64: {e}")))?;
        println!("\nxtask: QEMU exited ({status}) after {:.1} s", start.elapsed().as_secs_f64());
        return Ok(());
    }
    println!("xtask: booting under Bochs (VT-x emulated; no usable KVM here). Ctrl-] quits.");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    fs::write(
        dir.join("bochsrc"),
        bochsrc(&iso, Com1::Socket(port), &dir.join("bochs.log"), (scenario.megs, scenario.cpus), None),
    )?;
    fs::write(dir.join("dbg.rc"), BOCHS_DBG_RC)?;
    let mut child = Command::new("bochs")
        .current_dir(&dir)
        .args(["-q", "-f", "bochsrc", "-rc", "dbg.rc"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("bochs.out"))?)
        .stderr(Stdio::from(fs::File::create(dir.join("bochs.err"))?))
        .spawn()
        .map_err(|e| Fail(format!("cannot start bochs: {e}")))?;
    let socket = connect_retrying(port, &mut child)?;
    let raw = terminal::RawMode::enter();
    let result = bridge(socket, &mut child, &dir.join("serial.txt"));
    drop(raw);
    result?;
    println!("\r\nxtask: machine stopped after {:.1} s; logs in {}", start.elapsed().as_secs_f64(), dir.display());
    Ok(())
}

fn connect_retrying(port: u16, child: &mut Child) -> Result<std::net::TcpStream, Fail> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            return Ok(s);
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            return Err(Fail("Bochs did not open its serial socket; see bochs.err".into()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies the serial console to the terminal (and a log file), and the
/// keyboard to the serial console, until the emulator exits or Ctrl-] is pressed.
fn bridge(socket: std::net::TcpStream, child: &mut Child, log: &Path) -> Result<(), Fail> {
    const QUIT: u8 = 0x1d; // Ctrl-]
    let mut from_guest = socket.try_clone()?;
    let mut log = fs::File::create(log)?;
    let output = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            let _ = log.write_all(&buf[..n]);
        }
    });
    let quit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quit_input = quit.clone();
    let mut to_guest = socket;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            if buf[..n].contains(&QUIT) {
                quit_input.store(true, std::sync::atomic::Ordering::SeqCst);
                break;
            }
            if to_guest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    while child.try_wait()?.is_none() {
        if quit.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = output.join();
    Ok(())
}

mod terminal {
    //! Raw terminal mode for the interactive console, through stty.
    use std::process::{Command, Stdio};

    pub struct RawMode(Option<String>);

    impl RawMode {
        /// Puts the terminal in raw mode when stdin is one; restored on drop.
        pub fn enter() -> RawMode {
            let saved = Command::new("stty")
                .arg("-g")
                .stdin(Stdio::inherit())
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            if saved.is_some() {
                let _ = Command::new("stty").args(["raw", "-echo"]).stdin(Stdio::inherit()).status();
            }
            RawMode(saved)
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            if let Some(saved) = &self.0 {
                let _ = Command::new("stty").arg(saved).stdin(Stdio::inherit()).status();
            }
        }
    }
}
