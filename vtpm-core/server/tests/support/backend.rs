//! The TPMs under test, all reached the same way: swtpm's TCP protocol, a
//! command port and a control port. The reference is a real `swtpm`
//! process (libtpms); the subject is vtpm-server, run in this process on
//! ports the kernel picked, or as its binary.

#![allow(dead_code)]

pub use super::client::Transport;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a TPM may stay silent before the test gives up on it: a safety
/// net against a server that never answers (which would hang the test run),
/// far above the slowest command (RSA key generation).
const NO_ANSWER: Duration = Duration::from_secs(120);

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let p = std::env::temp_dir().join(format!("vtpm-test-{tag}-{:016x}", u64::from_le_bytes(b)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago: for programs that cannot be told to
/// pick their own. Callers retry on the rare collision.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One request on the control channel; returns the raw answer of `reply_len` bytes.
pub fn control(addr: SocketAddr, code: u32, body: &[u8], reply_len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("control port {addr}: {e}"));
    s.set_read_timeout(Some(NO_ANSWER)).unwrap();
    let mut msg = code.to_be_bytes().to_vec();
    msg.extend_from_slice(body);
    s.write_all(&msg).unwrap();
    let mut reply = vec![0u8; reply_len];
    s.read_exact(&mut reply).unwrap_or_else(|e| panic!("control code {code:#x} on {addr}: {e}"));
    reply
}

/// The swtpm TCP protocol, as a client.
pub struct TcpTpm {
    name: String,
    pub command_addr: SocketAddr,
    pub control_addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl TcpTpm {
    pub fn new(name: &str, command_addr: SocketAddr, control_addr: SocketAddr) -> Self {
        TcpTpm { name: name.into(), command_addr, control_addr, stream: None }
    }

    /// Sends bytes that need not be a well-formed command and reads one
    /// response: header first, then the rest it announces.
    pub fn raw(&mut self, bytes: &[u8]) -> Vec<u8> {
        let addr = self.command_addr;
        let s = self.stream.get_or_insert_with(|| {
            let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("command port {addr}: {e}"));
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(NO_ANSWER)).unwrap();
            s
        });
        s.write_all(bytes).unwrap();
        let mut head = [0u8; 10];
        s.read_exact(&mut head).unwrap_or_else(|e| {
            panic!("{}: no response header: {e} (did the server die? an engine panic is printed above)", self.name)
        });
        let size = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
        assert!((10..=4096).contains(&size), "{}: response size {size} out of range", self.name);
        let mut resp = head.to_vec();
        resp.resize(size, 0);
        s.read_exact(&mut resp[10..]).unwrap();
        resp
    }

    /// Closes the command connection (the next command opens a new one).
    pub fn disconnect(&mut self) {
        self.stream = None;
    }

    pub fn init(&mut self) -> u32 {
        let r = control(self.control_addr, 2, &0u32.to_be_bytes(), 4);
        u32::from_be_bytes(r.try_into().unwrap())
    }

    pub fn shutdown(&mut self) -> u32 {
        self.stream = None;
        let r = control(self.control_addr, 3, &[], 4);
        u32::from_be_bytes(r.try_into().unwrap())
    }
}

impl Transport for TcpTpm {
    fn name(&self) -> &str {
        &self.name
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.raw(command)
    }
    fn set_locality(&mut self, locality: u8) {
        let r = control(self.control_addr, 5, &[locality], 4);
        assert_eq!(r, [0, 0, 0, 0], "{}: CMD_SET_LOCALITY {locality} refused", self.name);
    }
}

/// How the TPM is brought up, as swtpm's `--flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Powered on, Startup(ST_CLEAR) already sent.
    StartupClear,
    /// Powered on, waiting for the client's TPM_Startup.
    NeedsStartup,
}

impl Start {
    fn flags(self) -> &'static str {
        match self {
            Start::StartupClear => "not-need-init,startup-clear",
            Start::NeedsStartup => "not-need-init",
        }
    }
}

/// Fails the test, naming the package to install, when a tool is missing.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]) {
        let p = dir.join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{program}` is not installed: this test needs the Debian package `{package}` (apt-get install {package})");
}

/// A program that serves swtpm's socket interface with swtpm's options:
/// swtpm itself, or the vtpm-server binary, which accepts the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    Swtpm,
    VtpmServer,
}

impl Program {
    pub fn name(self) -> &'static str {
        match self {
            Program::Swtpm => "swtpm",
            Program::VtpmServer => "vtpm-server",
        }
    }

    fn path(self) -> PathBuf {
        match self {
            Program::Swtpm => require_tool("swtpm", "swtpm"),
            Program::VtpmServer => PathBuf::from(env!("CARGO_BIN_EXE_vtpm-server")),
        }
    }
}

/// A TPM server running as a child process.
pub struct ServerProcess {
    pub program: Program,
    pub tpm: TcpTpm,
    child: Child,
    _state: Option<TempDir>,
    pub state_dir: PathBuf,
}

impl ServerProcess {
    /// Starts `program` on `state_dir` on free ports. A swtpm state
    /// directory without state is first given a manufactured one (an EK).
    pub fn start_in_dir(program: Program, state_dir: &Path, start: Start) -> ServerProcess {
        Self::start_in(program, state_dir.to_path_buf(), None, start)
    }

    fn start_in(program: Program, state_dir: PathBuf, owned: Option<TempDir>, start: Start) -> ServerProcess {
        let exe = program.path();
        if program == Program::Swtpm && !state_dir.join("tpm-00.permall").exists() {
            let template = manufactured_template();
            std::fs::create_dir_all(&state_dir).unwrap();
            std::fs::copy(template.join("tpm-00.permall"), state_dir.join("tpm-00.permall")).unwrap();
        }
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let (cmd_port, ctrl_port) = (free_port(), free_port());
            let mut child = Command::new(&exe)
                .arg("socket")
                .arg("--tpmstate")
                .arg(format!("dir={}", state_dir.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={cmd_port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl_port},bindaddr=127.0.0.1"))
                .arg("--flags")
                .arg(start.flags())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
            let ctrl: SocketAddr = ([127, 0, 0, 1], ctrl_port).into();
            let cmd: SocketAddr = ([127, 0, 0, 1], cmd_port).into();
            if wait_listening(&mut child, &[ctrl, cmd]) {
                let tpm = TcpTpm::new(program.name(), cmd, ctrl);
                return ServerProcess { program, tpm, child, _state: owned, state_dir };
            }
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for server");
            last_err = String::from_utf8_lossy(&out.stderr).into_owned();
            // Only a port taken in the meantime is worth another try.
            if !last_err.to_lowercase().contains("in use") {
                break;
            }
        }
        panic!("{} did not start; its error output:\n{last_err}", program.name());
    }

    /// Kills the server with SIGKILL: no chance to save anything more.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// Shuts the server down through its control port (state is saved).
    pub fn stop(mut self) {
        assert_eq!(self.tpm.shutdown(), 0, "{}: CMD_SHUTDOWN", self.program.name());
        let status = self.child.wait().expect("wait for server");
        assert!(status.success(), "{} exited with {status}", self.program.name());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `swtpm socket` (libtpms TPM 1.2), the reference.
pub struct Swtpm(pub ServerProcess);

impl Swtpm {
    /// A manufactured swtpm: its state has an EK, as vtpm-core's has from
    /// `manufacture`, so the two start from the same point.
    pub fn start(start: Start) -> Swtpm {
        let dir = TempDir::new("swtpm");
        let state_dir = dir.path().to_path_buf();
        Swtpm(ServerProcess::start_in(Program::Swtpm, state_dir, Some(dir), start))
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.0.tpm.control_addr
    }
}

impl Transport for Swtpm {
    fn name(&self) -> &str {
        "swtpm"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.0.tpm.transmit(command)
    }
    fn set_locality(&mut self, locality: u8) {
        self.0.tpm.set_locality(locality)
    }
}

/// One swtpm state provisioned by `swtpm_setup --createek` (EK created,
/// TPM enabled and activated, no owner), copied for each swtpm instance:
/// provisioning takes a second, copying does not.
fn manufactured_template() -> &'static Path {
    static TEMPLATE: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let setup = require_tool("swtpm_setup", "swtpm-tools");
            require_tool("swtpm", "swtpm");
            let dir = TempDir::new("swtpm-template");
            let out = Command::new(setup)
                .arg("--tpm-state")
                .arg(dir.path())
                .arg("--createek")
                .stdin(Stdio::null())
                .output()
                .expect("run swtpm_setup");
            assert!(
                out.status.success() && dir.path().join("tpm-00.permall").is_file(),
                "swtpm_setup --createek failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .path()
}

/// Waits for a freshly started server's ports; false if it died (a port
/// collision) or never listened.
pub fn wait_listening(child: &mut Child, addrs: &[SocketAddr]) -> bool {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if addrs.iter().all(|a| TcpStream::connect(a).is_ok()) {
            return true;
        }
        if Instant::now() > give_up {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// vtpm-server, served from this test process on kernel-chosen ports.
pub struct Vtpm {
    pub tpm: TcpTpm,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    _state: Option<TempDir>,
    pub state_dir: PathBuf,
}

impl Vtpm {
    pub fn start(start: Start) -> Vtpm {
        let dir = TempDir::new("vtpm");
        let state_dir = dir.path().to_path_buf();
        Self::start_in(state_dir, Some(dir), start)
    }

    pub fn start_in_dir(state_dir: &Path, start: Start) -> Vtpm {
        Self::start_in(state_dir.to_path_buf(), None, start)
    }

    fn start_in(state_dir: PathBuf, owned: Option<TempDir>, start: Start) -> Vtpm {
        use vtpm_server::device::Flags;
        use vtpm_server::engine::VtpmEngine;
        use vtpm_server::server::{Config, Server};
        let config = Config {
            state_dir: state_dir.clone(),
            command_addr: ([127, 0, 0, 1], 0).into(),
            control_addr: ([127, 0, 0, 1], 0).into(),
            flags: Flags { not_need_init: true, startup_clear: start == Start::StartupClear },
        };
        let server = Server::<VtpmEngine>::bind(&config).expect("vtpm-server binds");
        let tpm = TcpTpm::new("vtpm", server.command_addr(), server.control_addr());
        let thread = Some(server.spawn().expect("vtpm-server thread"));
        Vtpm { tpm, thread, _state: owned, state_dir }
    }

    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(t) = self.thread.take() {
            self.tpm.shutdown();
            t.join().expect("server thread").expect("server ran cleanly");
        }
    }
}

impl Drop for Vtpm {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_inner();
        }
    }
}

impl Transport for Vtpm {
    fn name(&self) -> &str {
        "vtpm"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.tpm.transmit(command)
    }
    fn set_locality(&mut self, locality: u8) {
        self.tpm.set_locality(locality)
    }
}
