//! The platform-TPM API against libtpms (swtpm over its TCP protocol), TPM
//! 2.0 and TPM 1.2: CTVM's measured launch, the vTPM state key sealed to
//! its PCRs (released after an identical launch, refused after another),
//! and the monotonic counter across a power cycle.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::platform::tpm::launch::{self, PlatformTpm};
use hypervisor::platform::tpm::seal::{self, Counter, SealError};
use hypervisor::platform::tpm::tpm12::Tpm12Error;
use hypervisor::platform::tpm::tpm2::Tpm2Error;
use hypervisor::platform::tpm::{Family, Transport, TransportError};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
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
struct Swtpm {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Swtpm {
    fn start(state: &Path, tpm2: bool) -> Swtpm {
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

    fn transport(&self) -> Tcp {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
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
struct Tcp(TcpStream);

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
fn nonces() -> impl FnMut() -> [u8; 20] {
    let mut n = 0u8;
    move || {
        n = n.wrapping_add(1);
        [n; 20]
    }
}

const KEY: [u8; 32] = *b"the vTPM state key, 32 bytes lng";

/// One boot of CTVM with `cmdline`: start-up and the measured launch.
fn boot(tpm: &mut PlatformTpm<Tcp>, cmdline: &str) {
    let modules: Vec<(&[u8], &str)> = vec![(b"KERNEL", "guest=alpha -- x")];
    let m = launch::measurements(cmdline, &modules);
    let mut t = 0u64;
    launch::measure(tpm, &m, &mut || {
        t += 1;
        t
    })
    .unwrap();
}

#[test]
fn tpm2_seal_unseal_and_counter_against_libtpms() {
    let state = TempDir::new("tpm2");
    let counter;
    let blob;
    {
        let swtpm = Swtpm::start(&state.0, true);
        let mut tpm = PlatformTpm::new(Family::V2, swtpm.transport());
        boot(&mut tpm, "log=info");
        blob = seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
        assert!(blob.starts_with(b"CTVMKEY1\x02\x01\x0c"));
        assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
        counter = seal::create_counter(&mut tpm, &mut nonces()).unwrap();
        assert_eq!(counter, Counter::Nv(seal::COUNTER_INDEX));
        let first = seal::read_counter(&mut tpm, counter).unwrap();
        assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), first + 1);
        assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter, "creating twice is harmless");
        assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), first + 1);
        // A blob changed in the chip's part does not load.
        let mut bad = blob.clone();
        let at = bad.len() - 40;
        bad[at] ^= 1;
        assert!(matches!(seal::unseal_key(&mut tpm, &bad, &mut nonces()), Err(SealError::V2(Tpm2Error::Rc { .. }))));
        assert_eq!(seal::unseal_key(&mut tpm, b"CTVMKEY1\x01\x01\x0c", &mut nonces()), Err(SealError::Blob));
        // The attack: CTVM's configuration changed (another command line):
        // PCR 12 differs, the key stays sealed.
        boot(&mut tpm, "log=debug");
        assert!(matches!(seal::unseal_key(&mut tpm, &blob, &mut nonces()), Err(SealError::V2(Tpm2Error::Rc { .. }))));
    }
    // Power cycle: PCRs start from zero, NV keeps the counter. The same
    // launch unseals the key again; the counter did not go back.
    let swtpm = Swtpm::start(&state.0, true);
    let mut tpm = PlatformTpm::new(Family::V2, swtpm.transport());
    boot(&mut tpm, "log=info");
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
    let after = seal::read_counter(&mut tpm, counter).unwrap();
    assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), after + 1);
    assert!(after >= 2);
}

/// A TPM 1.2 as swtpm_setup owns it with its "well-known" secrets,
/// which are the SHA-1 of twenty zero bytes.
fn tpm12(swtpm: &Swtpm) -> PlatformTpm<Tcp> {
    let mut tpm = hypervisor::platform::tpm::tpm12::Tpm12::new(swtpm.transport());
    let secret = hypervisor::platform::tpm::tpm2::digest(hypervisor::platform::tpm::tpm2::alg::SHA1, &[0; 20]).unwrap();
    tpm.owner_auth.copy_from_slice(&secret);
    tpm.srk_auth.copy_from_slice(&secret);
    PlatformTpm::V12(tpm)
}

#[test]
fn tpm12_seal_unseal_and_counter_against_libtpms() {
    let state = TempDir::new("tpm12");
    let setup = Command::new("swtpm_setup")
        .arg("--tpm-state")
        .arg(&state.0)
        .args(["--createek", "--take-ownership", "--owner-well-known", "--srk-well-known", "--overwrite"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("swtpm_setup (Debian package swtpm-tools) is needed for this test");
    assert!(setup.success(), "swtpm_setup failed");
    let blob;
    let counter;
    let value;
    {
        let swtpm = Swtpm::start(&state.0, false);
        let mut tpm = tpm12(&swtpm);
        boot(&mut tpm, "log=info");
        blob = seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
        assert!(blob.starts_with(b"CTVMKEY1\x01\x01\x0c"));
        assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
        counter = seal::create_counter(&mut tpm, &mut nonces()).unwrap();
        let first = seal::read_counter(&mut tpm, counter).unwrap();
        value = seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap();
        assert_eq!(value, first + 1);
        assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter, "found again by its label");
        assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), value);
        // Another configuration: TPM_WRONGPCRVAL.
        boot(&mut tpm, "log=debug");
        assert_eq!(
            seal::unseal_key(&mut tpm, &blob, &mut nonces()),
            Err(SealError::V12(Tpm12Error::Rc { ordinal: 0x18, rc: 0x18 }))
        );
    }
    let swtpm = Swtpm::start(&state.0, false);
    let mut tpm = tpm12(&swtpm);
    boot(&mut tpm, "log=info");
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
    assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter);
    assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), value, "the counter survives the power cycle");
    assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), value + 1);
}
