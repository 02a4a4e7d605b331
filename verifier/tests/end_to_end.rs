//! The verifier against evidence vtpm-core produces in this process, the
//! way a CTVM guest would: the hypervisor manufactures the vTPM from the
//! platform secret and the guest's name, certifies its EK into NV, measures
//! the launch (kernel, initrd, command line) and the security
//! configuration; the "guest" then takes ownership, extends IMA
//! measurements, makes an AIK, answers the verifier's ActivateIdentity
//! challenge and quotes PCRs 8–11 with the verifier's nonce.
//!
//! One accepted run, then each attack the verifier must refuse, each with
//! the check that must name it.

// The TPM 1.2 client of vtpm-server's tests (authorisation, HMACs checked
// on every answer); its TCP backends are not needed here.
#[path = "../../vtpm-core/server/tests/support/client.rs"]
mod client;
#[path = "../../vtpm-core/server/tests/support/tpm12.rs"]
mod tpm12;

use client::{Client, Kind, Transport};
use ctvm_verify::logs::ima_ng_line;
use ctvm_verify::tpm::{format_pcrvals, TpmPubKey};
use ctvm_verify::{privacy_ca, verify, Evidence, Manifest, Verdict};
use hypervisor::devices::tis::TpmBackend;
use hypervisor::tpm::config_event::{config_event, lock_event, IntegrityMode, SecurityConfig};
use hypervisor::tpm::{engine, launch_measurements, GuestTpm};
use tpm12::*;
use vtpm_trust::ekcert::{self, CaKey};

const SECRET: [u8; 32] = [0x31; 32];
const OWNER: Digest20 = WELL_KNOWN;
const SRK: Digest20 = WELL_KNOWN;
const KERNEL: &[u8] = b"a bzImage";
const INITRD: &[u8] = b"an initramfs";
/// The `ctvm.api` module's digest the guest ran with.
const API_POLICY: [u8; 32] = [0x5a; 32];
const CMDLINE: &[u8] = b"console=ttyS0 ima_policy=tcb";
const HYPERVISOR: [u8; 32] = [0xc7; 32];
/// The digest `ctvm.policy` pins the agent by.
const AGENT: [u8; 32] = [0xa9; 32];
const NOT_BEFORE: u64 = 1_767_225_600;

/// The guest's view of its vTPM: commands through the TIS backend.
struct InProcess<'a>(&'a mut GuestTpm, u8);

impl Transport for InProcess<'_> {
    fn name(&self) -> &str {
        "vtpm-core in process"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.0.tis.backend_mut().execute(self.1, command)
    }
    fn set_locality(&mut self, locality: u8) {
        self.1 = locality;
    }
}

/// Everything one attestation produced, owned.
#[derive(Clone)]
struct Run {
    ek_cert: Vec<u8>,
    aik: Vec<u8>,
    expected: Vec<u8>,
    returned: Vec<u8>,
    pcrvals: String,
    sig: Vec<u8>,
    log: Vec<u8>,
    ima: String,
    nonce: Digest20,
}

impl Run {
    fn evidence(&self) -> Evidence<'_> {
        Evidence {
            ek_certificate: &self.ek_cert,
            aik: &self.aik,
            activation: Some((&self.expected, &self.returned)),
            pcrvals: &self.pcrvals,
            quote_signature: &self.sig,
            event_log: &self.log,
            ima: Some(&self.ima),
        }
    }

    fn verify(&self, m: &Manifest) -> Verdict {
        let ca = CaKey::derive(&SECRET);
        let v = verify(&self.evidence(), m, ca.modulus(), &self.nonce);
        eprintln!("{}", v.summary());
        v
    }
}

fn sha1hex(d: &[u8]) -> String {
    ctvm_verify::tpm::hex(&sha1(&[d]))
}

fn ima_lines() -> String {
    [ima_ng_line(&sha1(&[b"/sbin/init"]), "/sbin/init"), ima_ng_line(&sha1(&[b"/bin/sh"]), "/bin/sh")].join("\n")
}

fn manifest() -> Manifest {
    Manifest {
        kernel_sha1: sha1hex(KERNEL),
        initrd_sha1: Some(sha1hex(INITRD)),
        cmdline: String::from_utf8(CMDLINE.to_vec()).unwrap(),
        hypervisor_sha256: ctvm_verify::tpm::hex(&HYPERVISOR),
        trust: vec!["ctvm_agent".into()],
        policy_sha256: None,
        api_sha256: Some(ctvm_verify::tpm::hex(&API_POLICY)),
        agent_sha256: Some(ctvm_verify::tpm::hex(&AGENT)),
        vtpm: None,
        ima_allow: Some(vec![sha1hex(b"/sbin/init"), format!("sha1:{}", sha1hex(b"/bin/sh"))]),
    }
}

/// A guest's whole life up to its quote, its agent locking when it has
/// run-time integrity (as the real agent does when it loads).
fn attest(name: &str, integrity: IntegrityMode, ima: &str) -> Run {
    let locks: &[([u8; 32], IntegrityMode)] = if integrity == IntegrityMode::Off { &[] } else { &[(AGENT, integrity)] };
    attest_with(name, integrity, ima, locks)
}

/// The vTPM as CTVM launches it: PCR 11 reserved, the launch and the
/// configuration measured.
fn launch(chip: vtpm_core::Tpm<vtpm_server::platform::OsPlatform>, integrity: IntegrityMode) -> GuestTpm {
    let cfg = SecurityConfig {
        hypervisor: HYPERVISOR,
        integrity,
        trust: &["ctvm_agent"],
        policy: None,
        api: Some(API_POLICY),
        vtpm_durable: false,
    };
    GuestTpm::launch(
        hypervisor::tpm::setup::Prepared::Volatile(chip),
        &launch_measurements(vtpm_core::sha1, KERNEL, CMDLINE, Some(INITRD)),
        &config_event(vtpm_core::sha1, &cfg),
    )
    .unwrap()
}

/// [`attest`], with the lock events CTVM measures: one per (agent digest,
/// mode) in `locks` (none: the agent never locked).
fn attest_with(name: &str, integrity: IntegrityMode, ima: &str, locks: &[([u8; 32], IntegrityMode)]) -> Run {
    // The hypervisor at the guest's first boot.
    let ca = CaKey::derive(&SECRET);
    let mut chip = engine::guest_tpm(name, Some(SECRET), vtpm_server::platform::OsPlatform::new);
    let ek = chip.endorsement_modulus().unwrap();
    let cert = ca.issue_ek_certificate(&ek, name, NOT_BEFORE).unwrap();
    chip.provision_nv(ekcert::EK_CERT_NV_INDEX, ekcert::EK_CERT_NV_ATTRIBUTES, &ekcert::nv_stored_cert(&cert).unwrap())
        .unwrap();
    chip.lock_nv();
    let mut guest = launch(chip, integrity);
    // The agent locks (CTVM measures it at locality 4).
    for (agent, mode) in locks {
        guest.measure_event(&lock_event(vtpm_core::sha1, agent, *mode)).unwrap();
    }
    let log = guest.log.as_bytes().to_vec();

    // The guest.
    let mut t = InProcess(&mut guest, 0);
    let mut c = Client::new(&mut t);
    c.record = false;
    // As TPM 1.2 clients read it: the 5-byte header, then what it announces.
    let mut nv_read = |offset: u32, len: u32| {
        let cmd = Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(0x1000_f000).u32(offset).u32(len);
        Reader::new(&c.plain("NV_ReadValue(EK cert)", Kind::Shape, cmd).expect_err_or_ok()).sized().to_vec()
    };
    let head = nv_read(0, 5);
    let nv = nv_read(0, 5 + u32::from(u16::from_be_bytes([head[3], head[4]])));
    let ek_cert = ekcert::parse_nv_stored_cert(&nv).unwrap().to_vec();
    assert_eq!(ek_cert, cert, "the guest reads the certificate the hypervisor wrote");
    let pubek = c.read_pubek().unwrap();
    c.take_ownership(&pubek, &OWNER, &SRK).unwrap();
    for line in ima.lines() {
        let th = ctvm_verify::logs::parse_ima(line).unwrap()[0].template_hash;
        c.extend(10, &th).unwrap();
    }
    let aik_auth = sha1(&[b"aik"]);
    let (aik, _) = c.make_identity(&OWNER, &SRK, &aik_auth, &sha1(&[b"verifier"])).unwrap();
    let handle = c.load_key2(TPM_KH_SRK, &SRK, &aik).unwrap();

    // The verifier's challenge, answered by the TPM.
    let challenge =
        privacy_ca::challenge(&ek_cert, ca.modulus(), &TpmPubKey::parse(&aik.raw).unwrap(), privacy_ca::random())
            .unwrap();
    let mut sk = c.oiap(&aik_auth);
    let mut so = c.oiap(&OWNER);
    let cmd = Cmd::new(tag::RQU_AUTH2, ord::ACTIVATE_IDENTITY).handle(handle).sized(&challenge.blob);
    let returned = c.authorised("ActivateIdentity", Kind::Shape, cmd, &mut [&mut sk, &mut so], false).unwrap();

    // The quote over the verifier's nonce.
    let nonce: Digest20 = privacy_ca::random();
    let pcrs = [8u32, 9, 10, 11];
    let mut s = c.oiap(&aik_auth);
    let cmd = Cmd::new(tag::RQU_AUTH1, ord::QUOTE2).handle(handle).bytes(&nonce).bytes(&pcr_selection(&pcrs)).u8(0);
    let out = c.authorised("Quote2", Kind::Shape, cmd, &mut [&mut s], false).unwrap();
    let mut r = Reader::new(&out);
    r.bytes(26);
    r.sized();
    let sig = r.sized().to_vec();
    let values: Vec<(u32, Digest20)> = pcrs.iter().map(|&p| (p, c.pcr_read(p).unwrap())).collect();
    Run {
        ek_cert,
        aik: aik.raw,
        expected: challenge.expected,
        returned,
        pcrvals: format_pcrvals(&values),
        sig,
        log,
        ima: ima.to_string(),
        nonce,
    }
}

trait OkOrErr {
    fn expect_err_or_ok(self) -> Vec<u8>;
}

impl OkOrErr for Result<Vec<u8>, u32> {
    fn expect_err_or_ok(self) -> Vec<u8> {
        self.unwrap_or_else(|rc| panic!("NV_ReadValue of the EK certificate: rc {rc:#x}"))
    }
}

fn accepted() -> &'static Run {
    static RUN: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    RUN.get_or_init(|| attest("alpha", IntegrityMode::Enforce, &ima_lines()))
}

#[test]
fn accepts_a_guest_that_runs_what_the_manifest_says() {
    let v = accepted().verify(&manifest());
    assert!(v.accepted, "{}", v.summary());
    assert_eq!(v.guest.as_deref(), Some("alpha"));
    let names: Vec<&str> = v.checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "ek_certificate",
            "aik_activation",
            "quote",
            "event_log",
            "ima_list",
            "kernel",
            "initrd",
            "cmdline",
            "config",
            "hypervisor",
            "integrity",
            "lock",
            "trust",
            "policy",
            "api",
            "vtpm",
            "ima_allow_list"
        ]
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["accepted"], true);
}

#[test]
fn rejects_integrity_off() {
    let run = attest("alpha", IntegrityMode::Off, &ima_lines());
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("integrity"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("\"off\""));
}

#[test]
fn rejects_another_kernel() {
    let mut m = manifest();
    m.kernel_sha1 = sha1hex(b"the kernel the owner expects");
    let v = accepted().verify(&m);
    assert_eq!(v.failed, Some("kernel"), "{}", v.summary());
}

#[test]
fn rejects_another_kernel_api_policy() {
    // The guest ran with isolated modules held to another allow-list (or
    // none): not what the owner approved.
    for other in [None, Some(ctvm_verify::tpm::hex(&[0x11; 32]))] {
        let mut m = manifest();
        m.api_sha256 = other;
        let v = accepted().verify(&m);
        assert_eq!(v.failed, Some("api"), "{}", v.summary());
        assert!(v.reason.unwrap().contains(&ctvm_verify::tpm::hex(&API_POLICY)));
    }
}

#[test]
fn rejects_an_edited_event_log() {
    // A guest launched with integrity=off rewrites its log to claim
    // enforce, recomputing the event's digest as a forger would.
    let mut run = attest("alpha", IntegrityMode::Off, &ima_lines());
    let mut events = hypervisor::tpm::event_log::parse(&run.log).unwrap();
    let e = events.iter_mut().find(|e| e.pcr == 11).unwrap();
    let text = String::from_utf8(e.data[8..].to_vec()).unwrap().replace("integrity=off", "integrity=enforce");
    e.data = [&e.data[..4], &(text.len() as u32).to_le_bytes()[..], text.as_bytes()].concat();
    e.digest = sha1(&[text.as_bytes()]);
    let mut log = hypervisor::tpm::event_log::EventLog::new(1 << 16);
    for e in &events {
        log.push(e).unwrap();
    }
    run.log = log.as_bytes().to_vec();
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("event_log"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("PCR 11"));
}

#[test]
fn rejects_a_replayed_nonce() {
    // The same quote presented for a new challenge.
    let mut run = accepted().clone();
    run.nonce = privacy_ca::random();
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("quote"), "{}", v.summary());
}

#[test]
fn rejects_a_quote_from_another_vtpm() {
    // Guest beta (same host, so its EK certificate is genuine too) quotes;
    // its quote is presented with alpha's EK certificate and AIK.
    let beta = attest("beta", IntegrityMode::Enforce, &ima_lines());
    let mut run = accepted().clone();
    run.pcrvals = beta.pcrvals.clone();
    run.sig = beta.sig.clone();
    run.nonce = beta.nonce;
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("quote"), "{}", v.summary());
    // And beta's AIK cannot pass for alpha's: the activation answer does
    // not match alpha's challenge.
    let mut run = beta.clone();
    run.expected = accepted().expected.clone();
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("aik_activation"), "{}", v.summary());
}

#[test]
fn rejects_an_ima_entry_outside_the_allow_list() {
    let extra = format!("{}\n{}", ima_lines(), ima_ng_line(&sha1(&[b"rootkit"]), "/tmp/rootkit"));
    let run = attest("alpha", IntegrityMode::Enforce, &extra);
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("ima_allow_list"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("/tmp/rootkit"));
    // Hiding the line from the list breaks PCR 10's replay instead.
    let mut hidden = run.clone();
    hidden.ima = ima_lines();
    assert_eq!(hidden.verify(&manifest()).failed, Some("ima_list"));
}

#[test]
fn rejects_an_ek_certificate_from_another_host() {
    let mut run = accepted().clone();
    run.ek_cert = CaKey::derive(&[0x99; 32]).issue_ek_certificate(&vec![0xc1; 256], "alpha", NOT_BEFORE).unwrap();
    assert_eq!(run.verify(&manifest()).failed, Some("ek_certificate"));
}

/// The command line on the accepted run's files: `ca` derives the CA
/// certificate from the platform secret, `activate` checks the answer,
/// `quote` accepts (exit 0) and writes the JSON verdict, and rejects
/// another kernel (exit 1) naming the check; `challenge` builds a blob.
#[test]
fn the_command_line_decides_like_the_library() {
    let run = accepted();
    let dir = std::env::temp_dir().join(format!("ctvm-verify-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let secret_hex = ctvm_verify::tpm::hex(&SECRET);
    let files: [(&str, &[u8]); 9] = [
        ("secret.hex", secret_hex.as_bytes()),
        ("ek.der", &run.ek_cert),
        ("aik.blob", &run.aik),
        ("expected", &run.expected),
        ("returned", &run.returned),
        ("nonce", &run.nonce),
        ("pcrvals", run.pcrvals.as_bytes()),
        ("quote", &run.sig),
        ("log", &run.log),
    ];
    for (n, d) in files {
        std::fs::write(p(n), d).unwrap();
    }
    std::fs::write(p("ima"), &run.ima).unwrap();
    std::fs::write(p("good.json"), serde_json::to_vec(&manifest()).unwrap()).unwrap();
    let mut bad = manifest();
    bad.kernel_sha1 = sha1hex(b"another kernel");
    std::fs::write(p("bad.json"), serde_json::to_vec(&bad).unwrap()).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ctvm-verify")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    assert_eq!(cli(&["ca", "--secret", &p("secret.hex"), "--out", &p("ca.der")]).0, Some(0));
    // The CA as CTVM prints it at boot (with a platform TPM the only way
    // to learn it) is the same certificate; an edited one is refused.
    let der = std::fs::read(p("ca.der")).unwrap();
    let mut console = String::from("ctvm: info: vTPM CA certificate (DER SHA-256 ab), for the verifier:\n");
    for l in hypervisor::tpm::setup::pem_lines(&der) {
        console += &format!("[  1.0] ctvm: info:   {l}\n");
    }
    std::fs::write(p("console.log"), &console).unwrap();
    assert_eq!(cli(&["ca", "--console", &p("console.log"), "--out", &p("printed.der")]).0, Some(0));
    assert_eq!(std::fs::read(p("printed.der")).unwrap(), der);
    let mut edited = der.clone();
    let at = edited.len() - 300;
    edited[at] ^= 1;
    let mut console = String::from("vTPM CA certificate\n");
    for l in hypervisor::tpm::setup::pem_lines(&edited) {
        console += &format!("ctvm: {l}\n");
    }
    std::fs::write(p("edited.log"), &console).unwrap();
    let (code, text) = cli(&["ca", "--console", &p("edited.log"), "--out", &p("edited.der")]);
    assert_eq!(code, Some(2), "{text}");
    let (code, text) = cli(&["activate", "--secret-in", &p("expected"), "--returned", &p("returned")]);
    assert_eq!(code, Some(0), "{text}");
    let quote = |manifest: &str| {
        let (ca, ek, aik, exp, ret, nonce, pcr, q, log, ima, m, json) = (
            p("ca.der"),
            p("ek.der"),
            p("aik.blob"),
            p("expected"),
            p("returned"),
            p("nonce"),
            p("pcrvals"),
            p("quote"),
            p("log"),
            p("ima"),
            p(manifest),
            p("verdict.json"),
        );
        cli(&[
            "quote",
            "--ca",
            &ca,
            "--ek-cert",
            &ek,
            "--aik",
            &aik,
            "--secret-in",
            &exp,
            "--returned",
            &ret,
            "--nonce",
            &nonce,
            "--pcrvals",
            &pcr,
            "--quote",
            &q,
            "--event-log",
            &log,
            "--ima",
            &ima,
            "--manifest",
            &m,
            "--json",
            &json,
        ])
    };
    let (code, text) = quote("good.json");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("ACCEPT guest=alpha"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(p("verdict.json")).unwrap()).unwrap();
    assert_eq!(json["accepted"], true);
    let (code, text) = quote("bad.json");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.starts_with("REJECT [kernel]"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(p("verdict.json")).unwrap()).unwrap();
    assert_eq!(json["failed"], "kernel");
    let (code, text) = cli(&[
        "challenge",
        "--ca",
        &p("ca.der"),
        "--ek-cert",
        &p("ek.der"),
        "--aik",
        &p("aik.blob"),
        "--blob-out",
        &p("blob"),
        "--secret-out",
        &p("key"),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(std::fs::read(p("blob")).unwrap().len(), 256, "one RSA-2048 block for ActivateIdentity");
    assert_eq!(cli(&["quote"]).0, Some(2), "missing arguments are a usage error");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The attack this test suite exists for: a guest launched with
/// integrity=enforce whose agent never locked (root kept it from loading)
/// must not quote like a protected one.
#[test]
fn rejects_a_guest_whose_agent_never_locked() {
    let run = attest_with("alpha", IntegrityMode::Enforce, &ima_lines(), &[]);
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("lock"), "{}", v.summary());
    assert!(v.reason.unwrap().starts_with("integrity=enforce but the agent never locked"));
    // Root adds the lock event it can compute to the log: PCR 11 does not
    // replay to it (the guest cannot extend PCR 11).
    let mut forged = run.clone();
    let mut log = hypervisor::tpm::event_log::EventLog::new(1 << 16);
    for e in hypervisor::tpm::event_log::parse(&run.log).unwrap() {
        log.push(&e).unwrap();
    }
    log.push(&lock_event(vtpm_core::sha1, &AGENT, IntegrityMode::Enforce)).unwrap();
    forged.log = log.as_bytes().to_vec();
    let v = forged.verify(&manifest());
    assert_eq!(v.failed, Some("event_log"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("replays PCR 11"));
}

#[test]
fn accepts_the_lock_event_and_reports_it() {
    let v = accepted().verify(&manifest());
    assert!(v.accepted, "{}", v.summary());
    let want = format!("ctvm.lock v1 agent={} mode=enforce", ctvm_verify::tpm::hex(&AGENT));
    assert_eq!(v.lock.as_deref(), Some(want.as_str()));
    // A manifest that names no agent accepts any the policy pinned.
    let mut m = manifest();
    m.agent_sha256 = None;
    assert!(accepted().verify(&m).accepted);
    // Integrity off: exactly the configuration event, no lock.
    let off = attest("alpha", IntegrityMode::Off, &ima_lines());
    assert_eq!(off.verify(&manifest()).failed, Some("integrity"));
}

#[test]
fn rejects_a_lock_event_that_is_not_the_manifests() {
    // Another agent locked (the manifest's policy names another digest).
    let run = attest_with("alpha", IntegrityMode::Enforce, &ima_lines(), &[([0x11; 32], IntegrityMode::Enforce)]);
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("lock"), "{}", v.summary());
    assert!(v.reason.unwrap().contains(&ctvm_verify::tpm::hex(&[0x11; 32])));
    // A lock in another mode than the configuration's.
    let run = attest_with("alpha", IntegrityMode::Enforce, &ima_lines(), &[(AGENT, IntegrityMode::Audit)]);
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("lock"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("mode=audit"));
}

#[test]
fn rejects_an_extra_event_in_pcr_11() {
    // Two lock events replay (as a second extend at locality 4 would):
    // PCR 11 is [configuration, lock] or [configuration], nothing else.
    let lock = (AGENT, IntegrityMode::Enforce);
    let run = attest_with("alpha", IntegrityMode::Enforce, &ima_lines(), &[lock, lock]);
    let v = run.verify(&manifest());
    assert_eq!(v.failed, Some("event_log"), "{}", v.summary());
    assert!(v.reason.unwrap().contains("PCR 11 holds 3 events"));
}

/// Root without the agent extends PCR 11 with the digest of the lock
/// event it can compute: its vTPM refuses, whatever the locality it asks.
#[test]
fn a_guest_cannot_extend_pcr_11() {
    let chip = engine::guest_tpm("alpha", Some(SECRET), vtpm_server::platform::OsPlatform::new);
    let mut guest = launch(chip, IntegrityMode::Enforce);
    for locality in 0..4 {
        let mut t = InProcess(&mut guest, locality);
        let mut c = Client::new(&mut t);
        c.record = false;
        let before = c.pcr_read(11).unwrap();
        assert_eq!(c.extend(11, &sha1(&[b"forged lock"])), Err(0x3d), "TPM_BAD_LOCALITY from locality {locality}");
        assert_eq!(c.pcr_read(11).unwrap(), before, "PCR 11 unchanged");
        assert!(c.extend(12, &[1; 20]).is_ok(), "PCRs 12-15 stay the guest's");
    }
}
