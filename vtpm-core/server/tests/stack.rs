//! The real TPM 1.2 software stack end to end: TrouSerS' `tcsd` talking to
//! the TPM over TCP (`TCSD_USE_TCP_DEVICE=1`), driven by the unmodified
//! `tpm-tools` and `tpm-quote-tools`. The same flow runs against swtpm
//! (proving the harness) and against the vtpm-server binary, each started
//! with the same swtpm-style command line.
//!
//! Needs root (tcsd insists on a root:tss configuration file) and the
//! Debian packages `trousers`, `tpm-tools`, `tpm-quote-tools`, `swtpm` and
//! `swtpm-tools`; a missing one fails the test with the package's name.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use support::backend::{free_port, require_tool, wait_listening, Program, ServerProcess, Start, TcpTpm, TempDir};
use support::tpm12::*;

const NV_INDEX: &str = "0x00011101";
const NV_DATA: &str = "vtpm nv payload";

fn require_root() {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    let euid = uid.split_whitespace().nth(2).expect("effective uid");
    assert_eq!(euid, "0", "the TrouSerS stack test must run as root: tcsd requires a root:tss tcsd.conf");
}

/// The TrouSerS daemon, bound to one TPM's command port.
struct Tcsd {
    child: Child,
    port: u16,
}

impl Tcsd {
    fn start(work: &Path, tpm_port: u16) -> Tcsd {
        let exe = require_tool("tcsd", "trousers");
        let ps_dir = work.join("tcsd-ps");
        fs::create_dir_all(&ps_dir).unwrap();
        let conf = work.join("tcsd.conf");
        for _attempt in 0..5 {
            let port = free_port();
            fs::write(
                &conf,
                format!(
                    "port = {port}\nsystem_ps_file = {}\nfirmware_log_file = /dev/null\nkernel_log_file = /dev/null\n",
                    ps_dir.join("system.data").display()
                ),
            )
            .unwrap();
            // tcsd refuses a configuration that is not root:tss, mode 0640.
            let chown = Command::new("chown").arg("root:tss").arg(&conf).status().expect("run chown");
            assert!(chown.success(), "chown root:tss tcsd.conf failed: is the `tss` group there (package trousers)?");
            fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
            let mut child = Command::new(&exe)
                .args(["-f", "-e", "-c"])
                .arg(&conf)
                .env("TCSD_USE_TCP_DEVICE", "1")
                .env("TCSD_TCP_DEVICE_HOSTNAME", "127.0.0.1")
                .env("TCSD_TCP_DEVICE_PORT", tpm_port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn tcsd");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            if wait_listening(&mut child, &[addr]) {
                return Tcsd { child, port };
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            eprintln!("tcsd did not come up: {}", String::from_utf8_lossy(&out.stderr));
        }
        panic!("tcsd did not start after 5 attempts");
    }

    /// Stops tcsd with SIGTERM so that it closes its TPM connection cleanly.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Tcsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the tools in a work directory against one tcsd.
struct Tools {
    work: PathBuf,
    home: PathBuf,
    tcsd_port: u16,
    label: &'static str,
}

impl Tools {
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.run_with_input(program, args, "")
    }

    /// Runs a tool with `input` on its standard input. The tools read
    /// passwords with getpass(3), which prefers /dev/tty: `setsid` gives
    /// them no controlling terminal, so they read the input instead.
    fn run_with_input(&self, program: &str, args: &[&str], input: &str) -> Output {
        let package = match program {
            "tpm_mkaik" | "tpm_loadkey" | "tpm_getquote" | "tpm_mkuuid" => "tpm-quote-tools",
            _ => "tpm-tools",
        };
        let exe = require_tool(program, package);
        let mut child = Command::new("setsid")
            .arg(exe)
            .args(args)
            .current_dir(&self.work)
            .env("TSS_TCSD_HOSTNAME", "127.0.0.1")
            .env("TSS_TCSD_PORT", self.tcsd_port.to_string())
            .env("HOME", &self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Runs a tool that must succeed, answering its password prompts.
    fn ok_with_input(&self, program: &str, args: &[&str], input: &str) -> String {
        let out = self.run_with_input(program, args, input);
        assert!(
            out.status.success(),
            "[{}] {program} {args:?} failed ({}):\n{}{}",
            self.label,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a tool that must succeed; returns its standard output.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "[{}] {program} {args:?} failed ({}):\n{}{}",
            self.label,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a tool that must fail; returns everything it printed.
    fn fails(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "[{}] {program} {args:?} succeeded but must fail:\n{text}", self.label);
        text
    }

    fn file(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

/// The "Public Key:" block tpm_getpubek prints: the EK's modulus in hex.
fn pubek_block(stdout: &str) -> String {
    let at = stdout.find("Public Key:").unwrap_or_else(|| panic!("no public key in tpm_getpubek output:\n{stdout}"));
    let block: String = stdout[at..].chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert!(block.len() >= 512, "EK modulus shorter than 2048 bits:\n{stdout}");
    block
}

/// Verifies tpm_getquote's signature: TrouSerS asks for Quote2 (and falls
/// back to Quote), so the signed structure is TPM_QUOTE_INFO2 or
/// TPM_QUOTE_INFO, rebuilt here from the nonce and the PCR values; the key
/// is the AIK's public half from the blob tpm_mkaik wrote.
fn verify_quote(t: &Tools, pcrs: &[u32]) -> &'static str {
    let aik = parse_key(&mut Reader::new(&fs::read(t.file("aik.blob")).unwrap()));
    assert_eq!(aik.usage, TPM_KEY_IDENTITY, "[{}] tpm_mkaik made a key that is not an identity key", t.label);
    let key = rsa_key(&aik.modulus, &aik.exponent);
    let nonce: Digest20 = fs::read(t.file("nonce")).unwrap().try_into().unwrap();
    let sig = fs::read(t.file("quote")).unwrap();
    let mut values = Vec::new();
    for line in fs::read_to_string(t.file("pcrvals")).unwrap().lines() {
        let (_, v) = line.split_once('=').expect("N=HEX line");
        values.push(<Digest20>::try_from(unhex(v)).expect("20-byte PCR value"));
    }
    assert_eq!(values.len(), pcrs.len(), "[{}] pcrvals lists other PCRs", t.label);
    let composite = pcr_composite(pcrs, &values);

    // TPM_QUOTE_INFO2: tag ‖ "QUT2" ‖ nonce ‖ TPM_PCR_INFO_SHORT(selection,
    // localityAtRelease = locality 0, SHA1(composite)).
    let info2 = sha1(&[&[0x00, 0x36], b"QUT2", &nonce, &pcr_selection(pcrs), &[0x01], &sha1(&[&composite])]);
    if verify_sha1(&key, &info2, &sig).is_ok() {
        return "Quote2";
    }
    verify_sha1(&key, &quote_info_digest(&composite, &nonce), &sig)
        .unwrap_or_else(|e| panic!("[{}] the quote's signature verifies neither as Quote2 nor as Quote: {e}", t.label));
    "Quote"
}

/// Extends PCR 10 directly on the TPM's command port (tcsd must be stopped:
/// it holds the port's only connection).
fn extend_pcr10(tpm: &TcpTpm) {
    let mut direct = TcpTpm::new("direct", tpm.command_addr, tpm.control_addr);
    let cmd = Cmd::new(tag::RQU_COMMAND, ord::EXTEND).u32(10).bytes(&sha1(&[b"an unexpected program ran"]));
    let r = direct.raw(&cmd.finish());
    assert_eq!(header(&r).rc, rc::SUCCESS, "Extend of PCR 10 on the command port");
}

/// TSC_PhysicalPresence(CMD_ENABLE) then (PRESENT), on the command port.
fn assert_physical_presence(tpm: &TcpTpm) {
    let mut direct = TcpTpm::new("direct", tpm.command_addr, tpm.control_addr);
    for pp in [0x0020u16, 0x0008] {
        let cmd = Cmd::new(tag::RQU_COMMAND, ord::TSC_PHYSICAL_PRESENCE).u16(pp).finish();
        let r = direct.raw(&cmd);
        assert_eq!(header(&r).rc, rc::SUCCESS, "TSC_PhysicalPresence({pp:#06x})");
    }
}

fn stack_flow(program: Program) {
    require_root();
    let label = program.name();
    let work = TempDir::new(&format!("stack-{label}"));
    let state = work.path().join("state");
    let home = work.path().join("home");
    fs::create_dir_all(&home).unwrap();

    let server = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    let mut t = Tools { work: work.path().to_path_buf(), home: home.clone(), tcsd_port: tcsd.port, label };

    // Identify, self-test, read the EK, take ownership.
    let version = t.ok("tpm_version", &[]);
    assert!(version.contains("TPM 1.2 Version Info"), "[{label}] tpm_version:\n{version}");
    t.ok("tpm_selftest", &[]);
    let ek = pubek_block(&t.ok("tpm_getpubek", &[]));
    t.ok("tpm_takeownership", &["-y", "-z"]);

    // tpm_changeownerauth (TPM_ChangeAuthOwner): owner and SRK secrets
    // away from the well-known one, each checked, then back.
    t.ok_with_input("tpm_changeownerauth", &["-z", "-o"], "ctvm owner\nctvm owner\n");
    t.fails("tpm_getpubek", &["-z"]);
    assert_eq!(pubek_block(&t.ok_with_input("tpm_getpubek", &[], "ctvm owner\n")), ek, "[{label}] EK by new owner");
    t.ok_with_input("tpm_changeownerauth", &["-s"], "ctvm owner\nctvm srk\nctvm srk\n");
    fs::write(t.file("srk-plain"), b"srk check\n").unwrap();
    t.fails("tpm_sealdata", &["-z", "-i", "srk-plain", "-o", "srk-sealed"]);
    t.ok_with_input("tpm_changeownerauth", &["-s", "-r"], "ctvm owner\n");
    t.ok("tpm_sealdata", &["-z", "-i", "srk-plain", "-o", "srk-sealed"]);
    t.ok_with_input("tpm_changeownerauth", &["-o", "-r"], "ctvm owner\n");
    assert_eq!(pubek_block(&t.ok("tpm_getpubek", &["-z"])), ek, "[{label}] EK by the well-known owner again");

    // NV: define, write, read back, describe.
    t.ok("tpm_nvdefine", &["-y", "-z", "-i", NV_INDEX, "-s", "32", "-p", "OWNERWRITE|OWNERREAD"]);
    t.ok("tpm_nvwrite", &["-z", "-i", NV_INDEX, "-d", NV_DATA]);
    t.ok("tpm_nvread", &["-z", "-i", NV_INDEX, "-s", &NV_DATA.len().to_string(), "-f", "nv.out"]);
    assert_eq!(fs::read(t.file("nv.out")).unwrap(), NV_DATA.as_bytes(), "[{label}] NV read back");
    let info = t.ok("tpm_nvinfo", &["-i", NV_INDEX]);
    assert!(info.contains("0x00011101") && info.contains("OWNERREAD|OWNERWRITE"), "[{label}] tpm_nvinfo:\n{info}");

    // Seal to PCR 10 and unseal.
    fs::write(t.file("plain"), b"the disk key\n").unwrap();
    t.ok("tpm_sealdata", &["-z", "-p", "10", "-i", "plain", "-o", "sealed"]);
    t.ok("tpm_unsealdata", &["-z", "-i", "sealed", "-o", "unsealed"]);
    assert_eq!(fs::read(t.file("unsealed")).unwrap(), b"the disk key\n", "[{label}] unsealed data");

    // An AIK, registered, and a quote verified here.
    t.ok("tpm_mkaik", &["-z", "aik.blob", "aik.pub"]);
    t.ok("tpm_mkuuid", &["aik.uuid"]);
    t.ok("tpm_loadkey", &["aik.blob", "aik.uuid"]);
    fs::write(t.file("nonce"), sha1(&[b"verifier's fresh nonce", label.as_bytes()])).unwrap();
    let pcrs = [0, 1, 2, 3, 10];
    let pcr_args: Vec<String> = pcrs.iter().map(|p| p.to_string()).collect();
    let mut args = vec!["-p", "pcrvals", "aik.uuid", "nonce", "quote"];
    args.extend(pcr_args.iter().map(String::as_str));
    t.ok("tpm_getquote", &args);
    let kind = verify_quote(&t, &pcrs);
    eprintln!("[{label}] quote verified as {kind}");

    // PCR 10 moves: the sealed data must stay sealed.
    tcsd.stop();
    extend_pcr10(&server.tpm);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    t.tcsd_port = tcsd.port;
    // tpm_unsealdata reports any failure as "Unable to write output file";
    // the exit status is what counts. PCR 10 is the only thing that changed
    // between the unseal above and this one, and after the restart below
    // (PCR 10 back to its sealed value) the same blob unseals again.
    t.fails("tpm_unsealdata", &["-z", "-i", "sealed", "-o", "unsealed-after-extend"]);
    let leaked = fs::read(t.file("unsealed-after-extend")).unwrap_or_default();
    assert!(leaked.is_empty(), "[{label}] unsealing after the extend released data");

    // Restart the TPM on the same state directory.
    tcsd.stop();
    server.stop();
    let server = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    t.tcsd_port = tcsd.port;

    // The EK survived, and so did the owner: reading the EK now takes the
    // owner's authorisation, which the TPM accepts.
    let ek_after = pubek_block(&t.ok("tpm_getpubek", &["-z"]));
    assert_eq!(ek_after, ek, "[{label}] the EK changed across a restart");
    t.fails("tpm_takeownership", &["-y", "-z"]);
    // NV data survived.
    t.ok("tpm_nvread", &["-z", "-i", NV_INDEX, "-s", &NV_DATA.len().to_string(), "-f", "nv.after"]);
    assert_eq!(fs::read(t.file("nv.after")).unwrap(), NV_DATA.as_bytes(), "[{label}] NV data after restart");
    // Startup(ST_CLEAR) reset PCR 10 to the sealed state: unsealing works again.
    t.ok("tpm_unsealdata", &["-z", "-i", "sealed", "-o", "unsealed-after-restart"]);
    assert_eq!(fs::read(t.file("unsealed-after-restart")).unwrap(), b"the disk key\n");

    // Release the NV index, then clear the owner.
    t.ok("tpm_nvrelease", &["-y", "-i", NV_INDEX]);
    t.fails("tpm_nvread", &["-z", "-i", NV_INDEX, "-s", "1", "-f", "nv.released"]);
    t.ok("tpm_clear", &["-z"]);
    // Cleared: the old owner secret no longer opens the EK.
    t.fails("tpm_getpubek", &["-z"]);

    // Physical presence brings it back: asserted by the platform on the
    // command port, as firmware would (tcsd does not relay it: "Not
    // implemented"), then used by the tools. After a restart the TPM can be
    // owned anew, and its EK is still the one it was made with.
    tcsd.stop();
    assert_physical_presence(&server.tpm);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    t.tcsd_port = tcsd.port;
    t.ok("tpm_setenable", &["-e", "-f"]);
    t.ok("tpm_setactive", &["-a"]);
    tcsd.stop();
    server.stop();
    let server = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    t.tcsd_port = tcsd.port;
    t.ok("tpm_takeownership", &["-y", "-z"]);
    let ek_reowned = pubek_block(&t.ok("tpm_getpubek", &["-z"]));
    assert_eq!(ek_reowned, ek, "[{label}] the EK changed across tpm_clear");

    tcsd.stop();
    server.stop();
}

#[test]
fn trousers_stack_against_swtpm() {
    stack_flow(Program::Swtpm);
}

#[test]
fn trousers_stack_against_vtpm_server() {
    stack_flow(Program::VtpmServer);
}

/// The EK certificate a CTVM host writes at a vTPM's first boot, read by
/// the real stack: `tpm_nvinfo` lists TPM_NV_INDEX_EKCert with the
/// manufacturer's attributes, `tpm_nvread` reads it without any
/// authorisation, and what it read is a TCG_PCCLIENT_STORED_CERT whose
/// certificate verifies under the host's CA and certifies the very EK
/// `tpm_getpubek` reports. vtpm-server only: swtpm provisions its own
/// certificates (swtpm_setup --create-ek-cert) with a CA of its own.
#[test]
fn ek_certificate_through_the_trousers_stack() {
    use vtpm_trust::ekcert::{self, CaKey};
    require_root();
    let work = TempDir::new("stack-ekcert");
    let state = work.path().join("state");
    let home = work.path().join("home");
    fs::create_dir_all(&home).unwrap();
    fs::create_dir_all(&state).unwrap();

    // First boot, as the hypervisor does it: make the chip, certify its
    // EK with the host's CA, provision the NV index, persist.
    let ca = CaKey::derive(&[0x5e; 32]);
    let mut chip = vtpm_core::Tpm::manufacture(vtpm_server::platform::OsPlatform::new());
    let ek = chip.endorsement_modulus().expect("EK");
    let der = ca.issue_ek_certificate(&ek, "stack", 1_767_225_600).expect("issue");
    let nv = ekcert::nv_stored_cert(&der).unwrap();
    chip.provision_nv(ekcert::EK_CERT_NV_INDEX, ekcert::EK_CERT_NV_ATTRIBUTES, &nv).expect("provision");
    chip.lock_nv();
    fs::write(state.join(vtpm_server::state::PERMANENT_FILE), chip.permanent_state()).unwrap();

    let server = ServerProcess::start_in_dir(Program::VtpmServer, &state, Start::StartupClear);
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    let t = Tools { work: work.path().to_path_buf(), home, tcsd_port: tcsd.port, label: "vtpm-server" };
    t.ok("tpm_takeownership", &["-y", "-z"]);
    let info = t.ok("tpm_nvinfo", &["-i", "0x1000f000"]);
    assert!(info.contains("0x1000f000") && info.contains("(WRITEALL|OWNERWRITE)"), "tpm_nvinfo:\n{info}");
    assert!(info.contains(&nv.len().to_string()), "tpm_nvinfo size:\n{info}");
    t.ok("tpm_nvread", &["-i", "0x1000f000", "-s", &nv.len().to_string(), "-f", "ekcert.nv"]);
    let read = fs::read(t.file("ekcert.nv")).unwrap();
    let cert = ekcert::parse_nv_stored_cert(&read).expect("TCG_PCCLIENT_STORED_CERT");
    assert_eq!(cert, der.as_slice());
    let certified = ekcert::verify_signed_by(cert, ca.modulus()).expect("the certificate verifies under the CA");
    let pubek = pubek_block(&t.ok("tpm_getpubek", &["-z"]));
    let certified_hex: String = certified.iter().map(|b| format!("{b:02x}")).collect();
    assert!(pubek.to_lowercase().contains(&certified_hex), "the certificate certifies another key than the EK");
    // Not writable without the owner, even in full; writable by the owner.
    fs::write(t.file("forged"), vec![0x5a; nv.len()]).unwrap();
    t.fails("tpm_nvwrite", &["-i", "0x1000f000", "-f", "forged"]);
    t.ok("tpm_nvread", &["-i", "0x1000f000", "-s", &nv.len().to_string(), "-f", "ekcert.again"]);
    assert_eq!(fs::read(t.file("ekcert.again")).unwrap(), nv, "the certificate was overwritten without the owner");
    t.ok("tpm_nvwrite", &["-z", "-i", "0x1000f000", "-f", "ekcert.nv"]);
    tcsd.stop();
    server.stop();
}

/// The remote verifier on what the real stack produces: the host plays
/// the hypervisor (EK certificate in NV, launch and configuration events
/// extended on the command port and logged), the guest side is TrouSerS
/// (`tpm_takeownership`, `tpm_mkaik`, `tpm_getquote` over PCRs 8–11), the
/// AIK is activated against the certified EK (as `tpm_nvread` reads its
/// certificate from NV 0x1000f000) through TPM_ActivateIdentity, and
/// ctvm-verify accepts, then rejects the same evidence for another kernel
/// and for a replayed nonce.
#[test]
fn verifier_accepts_a_trousers_quote_against_vtpm_server() {
    use ctvm_verify::{privacy_ca, tpm::TpmPubKey, verify, Evidence, Manifest};
    use hypervisor::tpm::config_event::{config_event, lock_event, IntegrityMode, SecurityConfig};
    use hypervisor::tpm::event_log::EventLog;
    use hypervisor::tpm::launch_measurements;
    use support::client::{Client, Kind};
    use vtpm_trust::ekcert::{self, CaKey};
    require_root();
    let work = TempDir::new("stack-verify");
    let state = work.path().join("state");
    let home = work.path().join("home");
    fs::create_dir_all(&home).unwrap();
    fs::create_dir_all(&state).unwrap();
    let ca = CaKey::derive(&[0x6d; 32]);
    let mut chip = vtpm_core::Tpm::manufacture(vtpm_server::platform::OsPlatform::new());
    let cert = ca.issue_ek_certificate(&chip.endorsement_modulus().unwrap(), "stack", 1_767_225_600).unwrap();
    chip.provision_nv(ekcert::EK_CERT_NV_INDEX, ekcert::EK_CERT_NV_ATTRIBUTES, &ekcert::nv_stored_cert(&cert).unwrap())
        .unwrap();
    chip.lock_nv();
    fs::write(state.join(vtpm_server::state::PERMANENT_FILE), chip.permanent_state()).unwrap();
    let server = ServerProcess::start_in_dir(Program::VtpmServer, &state, Start::StartupClear);

    // The hypervisor's launch measurements, extended and logged.
    let (kernel, initrd, cmdline) =
        (b"stack kernel".as_slice(), b"stack initrd".as_slice(), b"console=ttyS0".as_slice());
    let mut log = EventLog::new(1 << 14);
    let mut events: Vec<_> = launch_measurements(vtpm_core::sha1, kernel, cmdline, Some(initrd))
        .iter()
        .map(|m| hypervisor::tpm::event_log::Event {
            pcr: m.pcr,
            kind: 0x0d,
            digest: m.digest,
            data: m.description.to_vec(),
        })
        .collect();
    let cfg = SecurityConfig {
        hypervisor: [0x42; 32],
        integrity: IntegrityMode::Enforce,
        trust: &[],
        policy: None,
        api: None,
        vtpm_durable: true,
    };
    events.push(config_event(vtpm_core::sha1, &cfg));
    // The agent locked: CTVM's second PCR 11 event.
    events.push(lock_event(vtpm_core::sha1, &[0xa9; 32], IntegrityMode::Enforce));
    {
        let mut direct = TcpTpm::new("direct", server.tpm.command_addr, server.tpm.control_addr);
        for e in &events {
            let r = direct.raw(&Cmd::new(tag::RQU_COMMAND, ord::EXTEND).u32(e.pcr).bytes(&e.digest).finish());
            assert_eq!(header(&r).rc, rc::SUCCESS);
            log.push(e).unwrap();
        }
    }

    // The guest: ownership, an AIK, a quote over the verifier's nonce.
    let tcsd = Tcsd::start(work.path(), server.tpm.command_addr.port());
    let t = Tools { work: work.path().to_path_buf(), home, tcsd_port: tcsd.port, label: "vtpm-server" };
    t.ok("tpm_takeownership", &["-y", "-z"]);
    // The EK certificate as a TrouSerS client reads it: the verifier checks
    // these bytes, not the ones the test issued.
    let nv_len = ekcert::nv_stored_cert(&cert).unwrap().len().to_string();
    t.ok("tpm_nvread", &["-i", "0x1000f000", "-s", &nv_len, "-f", "ekcert.nv"]);
    let read = fs::read(t.file("ekcert.nv")).unwrap();
    let read_cert = ekcert::parse_nv_stored_cert(&read).expect("TCG_PCCLIENT_STORED_CERT").to_vec();
    t.ok("tpm_mkaik", &["-z", "aik.blob", "aik.pub"]);
    t.ok("tpm_mkuuid", &["aik.uuid"]);
    t.ok("tpm_loadkey", &["aik.blob", "aik.uuid"]);
    let nonce: Digest20 = privacy_ca::random();
    fs::write(t.file("nonce"), nonce).unwrap();
    t.ok("tpm_getquote", &["-p", "pcrvals", "aik.uuid", "nonce", "quote", "8", "9", "11"]);
    tcsd.stop();

    // The privacy CA's challenge, answered by TPM_ActivateIdentity.
    let aik_blob = fs::read(t.file("aik.blob")).unwrap();
    let challenge =
        privacy_ca::challenge(&read_cert, ca.modulus(), &TpmPubKey::parse(&aik_blob).unwrap(), privacy_ca::random())
            .expect("challenge");
    let mut direct = TcpTpm::new("direct", server.tpm.command_addr, server.tpm.control_addr);
    let mut c = Client::new(&mut direct);
    let aik = parse_key(&mut Reader::new(&aik_blob));
    let handle = c.load_key2(TPM_KH_SRK, &WELL_KNOWN, &aik).expect("LoadKey2(AIK)");
    // tpm_mkaik -z gives the AIK the well-known secret too.
    let mut sk = c.oiap(&WELL_KNOWN);
    let mut so = c.oiap(&WELL_KNOWN);
    let cmd = Cmd::new(tag::RQU_AUTH2, ord::ACTIVATE_IDENTITY).handle(handle).sized(&challenge.blob);
    let returned =
        c.authorised("ActivateIdentity", Kind::Shape, cmd, &mut [&mut sk, &mut so], false).expect("ActivateIdentity");

    let pcrvals = fs::read_to_string(t.file("pcrvals")).unwrap();
    let sig = fs::read(t.file("quote")).unwrap();
    let evidence = Evidence {
        ek_certificate: &read_cert,
        aik: &aik_blob,
        activation: Some((&challenge.expected, &returned)),
        pcrvals: &pcrvals,
        quote_signature: &sig,
        event_log: log.as_bytes(),
        ima: None,
    };
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let manifest = Manifest {
        kernel_sha1: hex(&sha1(&[kernel])),
        initrd_sha1: Some(hex(&sha1(&[initrd]))),
        cmdline: "console=ttyS0".into(),
        hypervisor_sha256: hex(&[0x42; 32]),
        vtpm: Some("durable".into()),
        ..Manifest::default()
    };
    let v = verify(&evidence, &manifest, ca.modulus(), &nonce);
    assert!(v.accepted, "{}", v.summary());
    eprintln!("{} ({:?})", v.summary(), v.quote_kind);
    let other = Manifest { kernel_sha1: hex(&sha1(&[b"another kernel"])), ..manifest.clone() };
    assert_eq!(verify(&evidence, &other, ca.modulus(), &nonce).failed, Some("kernel"));
    assert_eq!(verify(&evidence, &manifest, ca.modulus(), &privacy_ca::random()).failed, Some("quote"));
    server.stop();
}
