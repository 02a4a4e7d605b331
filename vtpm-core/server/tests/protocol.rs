//! The swtpm socket protocol as clients see it: the control channel driven
//! by swtpm's own client `swtpm_ioctl` and compared byte for byte with
//! swtpm's answers, and the command channel's framing.
//!
//! Most of these tests serve a stand-in engine: the protocol's behaviour
//! (power, locality, state blobs, shutdown, framing) does not depend on what
//! the TPM computes, so they hold before vtpm-core has its commands. The last
//! test runs the real vtpm-server binary.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};

use support::backend::{control, require_tool, Program, ServerProcess, Start, Swtpm, TempDir};
use vtpm_server::device::Flags;
use vtpm_server::engine::Engine;
use vtpm_server::server::{Config, Server};

/// A stand-in TPM for exercising the transport: it answers every command
/// with success and the command's own bytes as output, so that the framing
/// can be checked, and keeps a permanent blob.
struct StandIn {
    permanent: Vec<u8>,
    dirty: bool,
}

impl Engine for StandIn {
    fn manufacture() -> Self {
        StandIn { permanent: b"stand-in permanent state".to_vec(), dirty: true }
    }
    fn from_permanent(blob: &[u8]) -> Result<Self, String> {
        blob.starts_with(b"stand-in")
            .then(|| StandIn { permanent: blob.to_vec(), dirty: false })
            .ok_or("not ours".into())
    }
    fn permanent_state(&self) -> Vec<u8> {
        self.permanent.clone()
    }
    fn permanent_dirty(&self) -> bool {
        self.dirty
    }
    fn clear_dirty(&mut self) {
        self.dirty = false;
    }
    fn saved_state(&self) -> Option<Vec<u8>> {
        None
    }
    fn set_saved_state(&mut self, _: &[u8]) -> Result<(), String> {
        Err("the stand-in keeps no saved state".into())
    }
    fn power_on(&mut self) {}
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        let mut r = vec![0x00, 0xc4];
        r.extend_from_slice(&(11 + command.len() as u32).to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, locality]);
        r.extend_from_slice(command);
        r
    }
    fn hash_start(&mut self) -> Result<(), u32> {
        Ok(())
    }
    fn hash_data(&mut self, _: &[u8]) -> Result<(), u32> {
        Ok(())
    }
    fn hash_end(&mut self) -> Result<(), u32> {
        Ok(())
    }
    fn tpm_established(&self) -> bool {
        false
    }
    fn reset_established(&mut self, locality: u8) -> Result<(), u32> {
        if locality == 3 || locality == 4 {
            Ok(())
        } else {
            Err(0x3d)
        }
    }
}

struct InProcess {
    command: SocketAddr,
    control: SocketAddr,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
    _dir: TempDir,
}

fn serve_stand_in(flags: Flags) -> InProcess {
    let dir = TempDir::new("control");
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        command_addr: ([127, 0, 0, 1], 0).into(),
        control_addr: ([127, 0, 0, 1], 0).into(),
        flags,
    };
    let server = Server::<StandIn>::bind(&config).expect("bind");
    let (command, control) = (server.command_addr(), server.control_addr());
    InProcess { command, control, thread: server.spawn().unwrap(), _dir: dir }
}

fn ioctl(ctrl: SocketAddr, args: &[&str]) -> Output {
    let exe = require_tool("swtpm_ioctl", "swtpm-tools");
    Command::new(exe)
        .arg("--tcp")
        .arg(ctrl.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run swtpm_ioctl")
}

fn ioctl_ok(ctrl: SocketAddr, args: &[&str]) -> String {
    let out = ioctl(ctrl, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "swtpm_ioctl {args:?} failed: {text}");
    text
}

fn ioctl_err(ctrl: SocketAddr, args: &[&str]) -> String {
    let out = ioctl(ctrl, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "swtpm_ioctl {args:?} succeeded but must fail: {text}");
    text
}

#[test]
fn swtpm_ioctl_drives_the_control_channel() {
    let s = serve_stand_in(Flags::default());
    let ctrl = s.control;

    let caps = ioctl_ok(ctrl, &["-c"]);
    assert!(caps.contains("ptm capability is 0x"), "{caps}");
    // Before CMD_INIT, TPM commands fail and the established bit is not there.
    let mut tpm = support::backend::TcpTpm::new("stand-in", s.command, ctrl);
    assert_eq!(tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0x65]), [0x00, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x09]);
    assert!(ioctl_err(ctrl, &["-e"]).contains("0xa"));

    ioctl_ok(ctrl, &["-i"]);
    // Now commands reach the engine.
    assert_eq!(tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0x65])[9], 0);
    assert!(ioctl_ok(ctrl, &["-e"]).contains("tpmEstablished is 0"));
    ioctl_ok(ctrl, &["-l", "3"]);
    assert_eq!(tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0x65])[10], 3, "locality reaches the engine");
    ioctl_ok(ctrl, &["-r", "3"]);
    assert!(ioctl_err(ctrl, &["-r", "1"]).contains("0x3d"));
    assert!(ioctl_ok(ctrl, &["-g"]).contains("ptm configuration flags: 0x0"));
    let spec = ioctl_ok(ctrl, &["--info", "1"]);
    assert!(spec.contains(r#""family":"1.2""#), "{spec}");
    let attrs = ioctl_ok(ctrl, &["--info", "2"]);
    assert!(attrs.contains(r#""model":"vtpm-core""#), "{attrs}");

    // State blobs: saved while running, loaded only while stopped.
    let dir = TempDir::new("blobs");
    let blob = dir.path().join("permanent");
    let blob_arg = blob.to_str().unwrap();
    ioctl_ok(ctrl, &["--save", "permanent", blob_arg]);
    assert_eq!(std::fs::read(&blob).unwrap(), b"stand-in permanent state");
    ioctl_ok(ctrl, &["--stop"]);
    assert_eq!(tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0x65])[9], 0x09, "commands after CMD_STOP");
    std::fs::write(&blob, b"stand-in permanent state, loaded").unwrap();
    ioctl_ok(ctrl, &["--load", "permanent", blob_arg]);
    ioctl_ok(ctrl, &["-i"]);
    ioctl_ok(ctrl, &["--save", "permanent", blob_arg]);
    assert_eq!(std::fs::read(&blob).unwrap(), b"stand-in permanent state, loaded");

    ioctl_ok(ctrl, &["-s"]);
    s.thread.join().unwrap().expect("server stopped cleanly after CMD_SHUTDOWN");
}

/// Raw control requests whose answers must equal swtpm's, byte for byte.
const SAME_AS_SWTPM: &[(&str, u32, &[u8], usize)] = &[
    ("unknown code 0x13", 0x13, &[], 4),
    ("unknown code 0xffffffff", 0xffff_ffff, &[], 4),
    ("CMD_INIT", 2, &[0, 0, 0, 0], 4),
    ("CMD_GET_TPMESTABLISHED", 4, &[], 8),
    ("CMD_SET_LOCALITY 4", 5, &[4], 4),
    ("CMD_SET_LOCALITY 5", 5, &[5], 4),
    ("CMD_SET_LOCALITY 0", 5, &[0], 4),
    ("CMD_RESET_TPMESTABLISHED 2", 0x0b, &[2], 4),
    ("CMD_RESET_TPMESTABLISHED 4", 0x0b, &[4], 4),
    ("CMD_RESET_TPMESTABLISHED 7", 0x0b, &[7], 4),
    ("CMD_CANCEL_TPM_CMD", 9, &[], 4),
    ("CMD_GET_CONFIG", 0x0f, &[], 8),
    ("CMD_GET_CONFIG with a body", 0x0f, &[1], 4),
    ("CMD_SET_BUFFERSIZE query", 0x11, &[0, 0, 0, 0], 16),
    ("CMD_SET_BUFFERSIZE while running", 0x11, &[0, 0, 0x10, 0], 4),
    ("CMD_SET_STATEBLOB while running", 0x0d, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], 4),
    ("CMD_GET_INFO spec", 0x12, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], 75),
    ("CMD_GET_INFO offset past the end", 0x12, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0xff, 0, 0, 0, 0], 4),
    ("CMD_STOP with a body", 0x0e, &[1], 4),
    ("CMD_STOP", 0x0e, &[], 4),
    ("CMD_GET_TPMESTABLISHED while stopped", 4, &[], 4),
    ("CMD_SHUTDOWN with a body", 3, &[0], 4),
];

#[test]
fn control_answers_match_swtpm() {
    let swtpm = Swtpm::start(Start::StartupClear);
    let ours = serve_stand_in(Flags { not_need_init: true, startup_clear: false });
    for &(label, code, body, len) in SAME_AS_SWTPM {
        let want = control(swtpm.control_addr(), code, body, len);
        let got = control(ours.control, code, body, len);
        assert_eq!(got, want, "{label}: vtpm-server answered differently from swtpm");
    }
    assert_eq!(control(ours.control, 3, &[], 4), [0; 4]);
    ours.thread.join().unwrap().unwrap();
}

#[test]
fn swtpm_ioctl_against_the_vtpm_server_binary() {
    let dir = TempDir::new("ioctl-bin");
    let server = ServerProcess::start_in_dir(Program::VtpmServer, dir.path(), Start::NeedsStartup);
    let ctrl = server.tpm.control_addr;
    ioctl_ok(ctrl, &["-i"]);
    let mut tpm = support::backend::TcpTpm::new("vtpm-server", server.tpm.command_addr, ctrl);
    // TPM_Startup(ST_CLEAR) after the init: a TPM that works answers 0.
    let r = tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1]);
    assert_eq!(r, [0x00, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0], "Startup after swtpm_ioctl -i");
    assert!(ioctl_ok(ctrl, &["--info", "2"]).contains("vtpm-core"));
    server.stop();
}

fn echo_of(resp: &[u8]) -> &[u8] {
    &resp[11..]
}

#[test]
fn commands_are_framed_by_their_size_field() {
    let s = serve_stand_in(Flags { not_need_init: true, startup_clear: false });
    let pcr_read = [0x00, 0xc1, 0, 0, 0, 0x0e, 0, 0, 0, 0x15, 0, 0, 0, 0x0a];

    // Several commands on one connection, then on another.
    let mut tpm = support::backend::TcpTpm::new("stand-in", s.command, s.control);
    for _ in 0..3 {
        assert_eq!(echo_of(&tpm.raw(&pcr_read)), pcr_read);
    }
    tpm.disconnect();
    assert_eq!(echo_of(&tpm.raw(&pcr_read)), pcr_read);
    tpm.disconnect();

    // A command split across TCP segments is put back together.
    let mut raw = TcpStream::connect(s.command).unwrap();
    raw.set_nodelay(true).unwrap();
    raw.write_all(&pcr_read[..4]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    raw.write_all(&pcr_read[4..12]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    raw.write_all(&pcr_read[12..]).unwrap();
    assert_eq!(echo_of(&read_response(&mut raw)), pcr_read);

    // A size field that promises more than comes: the engine gets what came
    // (and answers it as malformed), as swtpm passes on what it read.
    let liar = [0x00, 0xc1, 0, 0, 0, 0x20, 0, 0, 0, 0x99, 0, 1];
    raw.write_all(&liar).unwrap();
    assert_eq!(echo_of(&read_response(&mut raw)), liar);
    // A size field beyond any command is handed over at once.
    let huge = [0x00, 0xc1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0x15];
    raw.write_all(&huge).unwrap();
    assert_eq!(echo_of(&read_response(&mut raw)), huge);
    drop(raw);

    assert_eq!(control(s.control, 3, &[], 4), [0; 4]);
    s.thread.join().unwrap().unwrap();
}

#[test]
fn shutdown_ends_a_connected_command_client() {
    let s = serve_stand_in(Flags { not_need_init: true, startup_clear: false });
    // A client (tcsd, say) holding the command connection open must not
    // keep the server from shutting down.
    let mut idle = TcpStream::connect(s.command).unwrap();
    idle.write_all(&[0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0x65]).unwrap();
    read_response(&mut idle);
    assert_eq!(control(s.control, 3, &[], 4), [0; 4]);
    s.thread.join().unwrap().expect("server stopped with a client connected");
    let mut buf = [0u8; 1];
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "the command connection is closed");
}

fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    let size = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
    let mut r = head.to_vec();
    r.resize(size, 0);
    s.read_exact(&mut r[10..]).unwrap();
    r
}
