//! swtpm (libtpms) as a platform TPM for host tests: started on a state
//! directory, reached over its TCP command channel, killed for a power cut.

// Each test file takes what it needs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::platform::tpm::launch::{self, PlatformTpm};
use hypervisor::platform::tpm::{Transport, TransportError};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("ctvm-platform-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// swtpm serving a state directory on TCP; killed on drop (a power cut:
/// PCRs are lost, NV and the seeds stay).
pub struct Swtpm {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Swtpm {
    pub fn start(state: &Path, tpm2: bool) -> Swtpm {
        for _ in 0..5 {
            let (port, ctrl) = (free_port(), free_port());
            let mut cmd = Command::new("swtpm");
            cmd.arg("socket");
            if tpm2 {
                cmd.arg("--tpm2");
            }
            let mut child = cmd
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port}"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl}"))
                .args(["--flags", "not-need-init"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (Debian package swtpm) is needed for this test");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Swtpm { child, port };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// A new connection to the command channel. swtpm serves one client
    /// at a time; a connect right after the last client left was refused
    /// once (a CI run of `tpm2_altered_answers_are_refused`, which
    /// reconnects six times): tried again for up to 5 s.
    pub fn transport(&self) -> Tcp {
        let deadline = Instant::now() + Duration::from_secs(5);
        let s = loop {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("swtpm's command channel: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Tcp(s)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// swtpm's TCP command channel: one command, one response.
pub struct Tcp(TcpStream);

impl Transport for Tcp {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.0.write_all(command).map_err(|_| TransportError::Protocol("write"))?;
        let mut header = [0u8; 10];
        self.0.read_exact(&mut header).map_err(|_| TransportError::Protocol("read"))?;
        let size = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; size.saturating_sub(10)];
        self.0.read_exact(&mut rest).map_err(|_| TransportError::Protocol("read"))?;
        let mut r = header.to_vec();
        r.extend(rest);
        Ok(r)
    }
}

/// Counter-based nonces (fresh for each use; randomness is not what the
/// test is about).
pub fn nonces() -> impl FnMut() -> [u8; 20] {
    let mut n = 0u8;
    move || {
        n = n.wrapping_add(1);
        [n; 20]
    }
}

pub const KEY: [u8; 32] = *b"the vTPM state key, 32 bytes lng";

/// One boot of CTVM with `cmdline`: start-up and the measured launch.
pub fn launch_ctvm<T: Transport>(tpm: &mut PlatformTpm<T>, cmdline: &str) {
    let modules: Vec<(&[u8], &str)> = vec![(b"KERNEL", "guest=alpha -- x")];
    let m = launch::measurements(cmdline, &modules);
    let mut t = 0u64;
    launch::measure(tpm, &m, &mut || {
        t += 1;
        t
    })
    .unwrap();
}

/// A TPM 1.2 as swtpm_setup owns it with its "well-known" secrets,
/// which are the SHA-1 of twenty zero bytes.
pub fn tpm12(swtpm: &Swtpm) -> PlatformTpm<Tcp> {
    tpm12_on(swtpm.transport())
}

/// The same, over any transport (a capture, an interposer).
pub fn tpm12_on<T: Transport>(transport: T) -> PlatformTpm<T> {
    let mut tpm = hypervisor::platform::tpm::tpm12::Tpm12::new(transport);
    let secret = hypervisor::platform::tpm::tpm2::digest(hypervisor::platform::tpm::tpm2::alg::SHA1, &[0; 20]).unwrap();
    tpm.owner_auth.copy_from_slice(&secret);
    tpm.srk_auth.copy_from_slice(&secret);
    PlatformTpm::V12(tpm)
}

/// Makes `state` a TPM 1.2 owned with the well-known secrets, as
/// `swtpm_setup` does.
pub fn owned_tpm12_state(state: &Path) {
    let setup = Command::new("swtpm_setup")
        .arg("--tpm-state")
        .arg(state)
        .args(["--createek", "--take-ownership", "--owner-well-known", "--srk-well-known", "--overwrite"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("swtpm_setup (Debian package swtpm-tools) is needed for this test");
    assert!(setup.success(), "swtpm_setup failed");
}

/// A transport that keeps a copy of every command and response, as an
/// interposer on the chip's bus would see them.
pub struct Wire<T> {
    pub inner: T,
    pub seen: std::rc::Rc<std::cell::RefCell<Vec<Vec<u8>>>>,
}

impl<T: Transport> Transport for Wire<T> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.seen.borrow_mut().push(command.to_vec());
        let r = self.inner.transmit(command)?;
        self.seen.borrow_mut().push(r.clone());
        Ok(r)
    }
}

/// Whether `needle` occurs in any of the messages.
pub fn appears(messages: &[Vec<u8>], needle: &[u8]) -> bool {
    messages.iter().any(|m| m.windows(needle.len()).any(|w| w == needle))
}

/// A transport through an active interposer: `alter` may change the
/// command before the chip sees it and the response before CTVM does.
pub struct Interposer<T, F> {
    pub inner: T,
    pub alter: F,
}

impl<T: Transport, F: FnMut(&mut Vec<u8>, Option<&mut Vec<u8>>)> Transport for Interposer<T, F> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut c = command.to_vec();
        (self.alter)(&mut c, None);
        let mut r = self.inner.transmit(&c)?;
        (self.alter)(&mut c, Some(&mut r));
        Ok(r)
    }
}

/// A command's code.
pub fn command_code(c: &[u8]) -> u32 {
    u32::from_be_bytes(c[6..10].try_into().unwrap())
}
