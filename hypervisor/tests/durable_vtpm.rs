//! A durable vTPM on the host, through the path a guest's takes: the boot
//! decision (`tpm::setup`), the measured launch, the virtual TIS a driver
//! polls, the durable backend, and the store channel the hypercalls use,
//! with vtpm-core behind them and a disk, a counter and a store service
//! modelled around them.
//!
//! * Every boot outcome: volatile, opened, new on `vtpm.reset`, and failure
//!   mode for a missing, corrupted, foreign, another guest's or stale blob.
//! * A change's response is held until its blob is stored and committed;
//!   the TIS shows it executing; a lying store service changes nothing.
//! * Power is cut at every step of a run of NV writes (the driver's
//!   command, the store service's write and report, the driver's read),
//!   and the machine rebooted on every blob the guest could hand back: no
//!   acknowledged write is ever missing from a blob the vTPM accepts.
//! * With a platform TPM (libtpms, 2.0 and 1.2, through swtpm): the state
//!   key sealed to CTVM's measured configuration and the versions anchored
//!   in its monotonic counter, across power cycles: fresh, restored, stale,
//!   corrupt, foreign, and refused to unseal after a changed measurement.

#[path = "../../vtpm-core/server/tests/support/client.rs"]
mod client;
#[path = "support/swtpm.rs"]
mod swtpm;
#[path = "../../vtpm-core/server/tests/support/tpm12.rs"]
mod tpm12;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;

use client::{Client, Transport};
use hypervisor::devices::tis::{sts, State, Tis, TpmBackend};
use hypervisor::platform::tpm::launch::{self, PlatformTpm};
use hypervisor::platform::tpm::{seal, Family};
use hypervisor::tpm::anchor::{
    AnchorError, KeyError, NoCounter, PlatformRoot, PlatformSeal, RollbackAnchor, SealingRoot, SeedRoot,
    PLATFORM_SEALED,
};
use hypervisor::tpm::config_event::{config_event, IntegrityMode, SecurityConfig};
use hypervisor::tpm::durable::{Entropy, StoreError, Unstored, LATE_US, TPM_RETRY};
use hypervisor::tpm::host::{Host, HOST_RECORD};
use hypervisor::tpm::persist::RestoreError;
use hypervisor::tpm::setup::{prepare, Failure, Level, Outcome, Request, VtpmMode};
use hypervisor::tpm::{event_log, launch_measurements, GuestTpm};
use tpm12::*;
use vtpm_core::Platform;
use vtpm_trust::blob::BlobError;
use vtpm_trust::ekcert;

const SEED: [u8; 32] = [0x5e; 32];
const GUEST: &str = "linux";
const OWNER: Digest20 = WELL_KNOWN;
const NV: u32 = 0x0001_1000;
const NV_SIZE: u32 = 64;
const TPM_FAILEDSELFTEST: u32 = 0x1c;
const NV_PER_WRITE_STCLEAR: u32 = 0x4000;

/// Deterministic entropy, distinct per instance.
struct TestPlatform(u64);

impl Platform for TestPlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
    fn ticks_us(&mut self) -> u64 {
        CLOCK_US.with(|c| c.get())
    }
}

std::thread_local! {
    /// The test platforms' clock: each test runs on a thread of its own.
    static CLOCK_US: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

fn advance_clock(us: u64) {
    CLOCK_US.with(|c| c.set(c.get() + us));
}

fn platforms() -> impl FnMut() -> TestPlatform {
    let mut n = 0x1234_5678u64;
    move || {
        n += 0x9e37_79b9;
        TestPlatform(n)
    }
}

fn nonces() -> Entropy {
    let mut p = TestPlatform(0xabcd_ef01);
    Box::new(move |b| p.fill_random(b))
}

/// A monotonic counter that outlives the machines built on it, as a
/// platform TPM's would; `broken` makes every commit fail.
#[derive(Clone, Default)]
struct Counter {
    value: Rc<RefCell<u64>>,
    broken: Rc<RefCell<bool>>,
}

impl RollbackAnchor for Counter {
    fn detects_rollback(&self) -> bool {
        true
    }
    fn committed(&mut self, _guest: &str) -> Result<Option<u64>, AnchorError> {
        Ok(Some(*self.value.borrow()))
    }
    fn commit(&mut self, _guest: &str, version: u64) -> Result<(), AnchorError> {
        if *self.broken.borrow() {
            return Err(AnchorError("the platform TPM does not answer".into()));
        }
        let mut v = self.value.borrow_mut();
        *v = (*v).max(version);
        Ok(())
    }
}

/// A boot's outcome, console lines, CA certificate (first boots) and vTPM.
type Booted = (Outcome, Vec<(Level, String)>, Option<Vec<u8>>, GuestTpm);

/// Boots `guest`'s vTPM as the hypervisor does: decide, then measure the
/// launch and the configuration into it.
fn boot(mode: VtpmMode, seed: Option<[u8; 32]>, blob: Option<&[u8]>, anchor: Box<dyn RollbackAnchor>) -> Booted {
    boot_as(GUEST, mode, seed, blob, anchor)
}

fn boot_as(
    guest: &str,
    mode: VtpmMode,
    seed: Option<[u8; 32]>,
    blob: Option<&[u8]>,
    anchor: Box<dyn RollbackAnchor>,
) -> Booted {
    let root = seed.map(SeedRoot::new);
    boot_under(guest, mode, seed, root.as_ref().map(|r| r as &dyn SealingRoot), blob, anchor)
}

/// [`boot_as`] under any sealing root.
fn boot_under(
    guest: &str,
    mode: VtpmMode,
    seed: Option<[u8; 32]>,
    root: Option<&dyn SealingRoot>,
    blob: Option<&[u8]>,
    anchor: Box<dyn RollbackAnchor>,
) -> Booted {
    let request = Request { guest, mode, root, seed, blob };
    let setup = prepare(&request, anchor, platforms(), nonces());
    let report = setup.report(guest, root.map_or("nothing", |r| r.name()));
    let durable = setup.durable();
    let cfg = SecurityConfig {
        hypervisor: [7; 32],
        integrity: IntegrityMode::Enforce,
        trust: &["ctvm_agent"],
        policy: None,
        api: None,
        vtpm_durable: durable,
    };
    let event = config_event(vtpm_core::sha1, &cfg);
    let m = launch_measurements(vtpm_core::sha1, b"bzImage", b"console=ttyS0", Some(b"initrd"));
    let outcome = setup.outcome.clone();
    let ca = setup.ca_certificate.clone();
    let vtpm = GuestTpm::launch(setup.prepared, &m, &event).expect("the launch is measured");
    (outcome, report, ca, vtpm)
}

// ---- A driver on the TIS, as Linux's tpm_tis polls it ------------------

type GuestTis = Tis<Box<dyn TpmBackend>>;

/// Sends a command: locality 0, commandReady, the bytes, tpmGo.
fn send(tis: &mut GuestTis, command: &[u8]) {
    if tis.read(0, 1) & 0x20 == 0 {
        tis.write(0, 1, 0x02);
    }
    tis.write(0x18, 1, u64::from(sts::COMMAND_READY));
    for b in command {
        tis.write(0x24, 1, u64::from(*b));
    }
    tis.write(0x18, 1, u64::from(sts::GO));
}

/// The response, once stsValid and dataAvail say it is there.
fn response(tis: &mut GuestTis) -> Option<Vec<u8>> {
    let status = tis.read(0x18, 1) as u8;
    if status & (sts::VALID | sts::DATA_AVAIL) != sts::VALID | sts::DATA_AVAIL {
        return None;
    }
    let mut out = Vec::new();
    while tis.read(0x18, 1) as u8 & sts::DATA_AVAIL != 0 {
        out.push(tis.read(0x24, 1) as u8);
    }
    tis.write(0x18, 1, u64::from(sts::COMMAND_READY));
    Some(out)
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

/// The guest's disk: every blob ever synced, the newest last.
#[derive(Clone, Default)]
struct Disk {
    synced: Vec<Vec<u8>>,
}

impl Disk {
    fn latest(&self) -> Option<&Vec<u8>> {
        self.synced.last()
    }
}

/// An honest store service: one fetch, write and sync, report. Returns
/// the version stored, if there was work.
fn serve(tis: &mut GuestTis, disk: &mut Disk) -> Option<u64> {
    let channel = tis.backend_mut().store().expect("a durable vTPM");
    let (version, blob) = channel.fetch().expect("fetch")?;
    disk.synced.push(blob.to_vec());
    channel.stored(version).expect("the report is taken");
    Some(version)
}

/// A driver that runs the store service while it waits, as the guest's
/// kernel and its store service do side by side.
struct Driver<'a> {
    tis: &'a mut GuestTis,
    disk: &'a mut Disk,
}

impl Transport for Driver<'_> {
    fn name(&self) -> &str {
        "durable vTPM behind the TIS"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        send(self.tis, command);
        for _ in 0..10 {
            if let Some(r) = response(self.tis) {
                return r;
            }
            serve(self.tis, self.disk);
        }
        panic!("the response never came");
    }
    fn set_locality(&mut self, _: u8) {}
}

/// The first boot's work: a new vTPM (EK certificate), TakeOwnership and an
/// NV index anyone may write, each through the durable path. Made once:
/// RSA key generation is slow. Returns the disk and the counter after it.
fn owned_with_nv() -> &'static (Disk, u64) {
    static FIRST: OnceLock<(Disk, u64)> = OnceLock::new();
    FIRST.get_or_init(|| {
        let counter = Counter::default();
        let (outcome, _, ca, mut vtpm) =
            boot(VtpmMode::Durable { reset: true }, Some(SEED), None, Box::new(counter.clone()));
        assert_eq!(outcome, Outcome::New { refused: None });
        assert!(ca.is_some(), "the CA certificate is printed at a first boot");
        let mut disk = Disk::default();
        own_and_define_nv(&mut vtpm, &mut disk);
        let v = *counter.value.borrow();
        assert!(disk.synced.len() >= 3, "fence, ownership and the NV index each stored");
        (disk, v)
    })
}

/// TakeOwnership and an NV index anyone may write (until a zero-length
/// write locks it for one boot, which nothing here does), each through the
/// durable path.
/// A later boot on the first boot's disk, its counter at the version the
/// first committed: the owned vTPM, opened again. Returns the disk, that
/// version and the vTPM.
fn reopened() -> (&'static Disk, u64, GuestTpm) {
    let (disk, committed) = owned_with_nv();
    let counter = Counter { value: Rc::new(RefCell::new(*committed)), ..Default::default() };
    let (_, _, _, vtpm) =
        boot(VtpmMode::Durable { reset: false }, Some(SEED), disk.latest().map(Vec::as_slice), Box::new(counter));
    (disk, *committed, vtpm)
}

fn own_and_define_nv(vtpm: &mut GuestTpm, disk: &mut Disk) {
    let mut d = Driver { tis: &mut vtpm.tis, disk };
    let mut c = Client::new(&mut d);
    c.record = false;
    let ek = c.read_pubek().unwrap();
    c.take_ownership(&ek, &OWNER, &WELL_KNOWN).unwrap();
    assert_eq!(c.nv_define(&OWNER, NV, NV_PER_WRITE_STCLEAR, NV_SIZE), 0);
}

fn nv_write(offset: u32, data: &[u8]) -> Vec<u8> {
    Cmd::new(tag::RQU_COMMAND, ord::NV_WRITE_VALUE).u32(NV).u32(offset).sized(data).finish()
}

fn nv_read_command() -> Vec<u8> {
    Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(NV).u32(0).u32(NV_SIZE).finish()
}

#[test]
fn a_first_boot_certifies_the_ek_and_a_second_boot_has_the_owner_and_nv() {
    let (disk, committed) = owned_with_nv();
    let counter = Counter { value: Rc::new(RefCell::new(*committed)), ..Default::default() };
    let (outcome, report, _, mut vtpm) =
        boot(VtpmMode::Durable { reset: false }, Some(SEED), disk.latest().map(Vec::as_slice), Box::new(counter));
    assert!(matches!(outcome, Outcome::Opened { reset_ignored: false, .. }), "{outcome:?}");
    assert!(!report.iter().any(|(_, t)| t.contains("rollback")), "a counter guards it: {report:?}");
    // The seed as the root is said to be weaker than a platform TPM.
    let warnings: Vec<_> = report.iter().filter(|(l, _)| *l != Level::Info).collect();
    assert_eq!(warnings.len(), 1, "{report:?}");
    assert!(warnings[0].1.contains("not sealed to a platform TPM: whoever reads the seed module can open and forge"));
    let mut disk = disk.clone();
    let mut d = Driver { tis: &mut vtpm.tis, disk: &mut disk };
    let mut c = Client::new(&mut d);
    c.record = false;
    // The owner authorises (an owner-only read of the EK), NV is there.
    let pubek = c.read_pubek();
    assert!(pubek.is_err(), "ReadPubek is closed once owned");
    let mut s = c.oiap(&OWNER);
    let cmd = Cmd::new(tag::RQU_AUTH1, ord::OWNER_READ_INTERNAL_PUB).u32(TPM_KH_EK);
    assert!(c.authorised("OwnerReadInternalPub", client::Kind::Shape, cmd, &mut [&mut s], false).is_ok());
    let cmd = Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(NV).u32(0).u32(4);
    let nv = Reader::new(&c.plain("NV_ReadValue", client::Kind::Shape, cmd).unwrap()).sized().to_vec();
    assert_eq!(nv, [0xff; 4], "the NV index, as defined");
    // The EK certificate is in NV, readable without authorisation, and
    // names this vTPM's EK under this host's CA.
    let cmd = Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(ekcert::EK_CERT_NV_INDEX).u32(0).u32(5);
    let head = Reader::new(&c.plain("NV_ReadValue", client::Kind::Shape, cmd).unwrap()).sized().to_vec();
    let len = 5 + u32::from(u16::from_be_bytes([head[3], head[4]]));
    let cmd = Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(ekcert::EK_CERT_NV_INDEX).u32(0).u32(len);
    let nv = Reader::new(&c.plain("NV_ReadValue", client::Kind::Shape, cmd).unwrap()).sized().to_vec();
    let cert = ekcert::parse_nv_stored_cert(&nv).unwrap();
    let ca = SeedRoot::new(SEED).ca().unwrap();
    assert!(ekcert::verify_signed_by(cert, ca.modulus()).is_ok());
}

#[test]
fn a_held_change_waits_for_its_store_and_commit_and_blocks_the_next_command() {
    let (disk, committed) = owned_with_nv();
    let counter = Counter { value: Rc::new(RefCell::new(*committed)), ..Default::default() };
    let (_, _, _, mut vtpm) = boot(
        VtpmMode::Durable { reset: false },
        Some(SEED),
        disk.latest().map(Vec::as_slice),
        Box::new(counter.clone()),
    );
    let tis = &mut vtpm.tis;
    let mut disk = disk.clone();
    // A read runs before the store service ever comes (the kernel's probe).
    send(tis, &nv_read_command());
    assert_eq!(rc(&response(tis).expect("reads are answered at once")), 0);
    // A write is held: executing, stsValid without dataAvail, burstCount 0.
    send(tis, &nv_write(0, b"first"));
    assert_eq!(tis.state(), State::Execution);
    assert_eq!(tis.read(0x18, 4), u64::from(sts::VALID));
    assert_eq!(tis.read(0x24, 1), 0xff, "nothing to read while executing");
    // Another command meanwhile (the driver gave up and aborted) is told to retry.
    tis.write(0x18, 1, u64::from(sts::COMMAND_READY));
    send(tis, &nv_read_command());
    assert_eq!(rc(&response(tis).unwrap()), TPM_RETRY);
    // The store service: the fence, which releases nothing.
    let fence = serve(tis, &mut disk).unwrap();
    assert_eq!(fence, committed + 2);
    // A lying report, a report of the fence again: refused, nothing moves.
    let channel = tis.backend_mut().store().unwrap();
    let (v, blob) = channel.fetch().unwrap().unwrap();
    let blob = blob.to_vec();
    assert_eq!(v, fence + 1);
    assert_eq!(channel.fetch().unwrap().unwrap(), (v, blob.as_slice()), "asked again: the same blob");
    assert_eq!(channel.stored(v + 1), Err(StoreError::Unexpected));
    assert_eq!(channel.stored(fence), Err(StoreError::Unexpected));
    assert_eq!(*counter.value.borrow(), fence);
    // The counter fails: stored, not committed, still held; a repeated report retries.
    *counter.broken.borrow_mut() = true;
    assert!(matches!(channel.stored(v), Err(StoreError::Counter(_))));
    *counter.broken.borrow_mut() = false;
    channel.stored(v).unwrap();
    assert_eq!(*counter.value.borrow(), v);
    disk.synced.push(blob);
    // The aborted write's response is gone; the write itself is durable.
    send(tis, &nv_read_command());
    let r = response(tis).unwrap();
    assert_eq!(&r[14..19], b"first");
    // A held write, released only once its blob is committed.
    send(tis, &nv_write(5, b"second"));
    assert!(response(tis).is_none());
    let v2 = serve(tis, &mut disk).unwrap();
    assert_eq!(v2, v + 1);
    assert_eq!(rc(&response(tis).expect("released by the commit")), 0);
    assert_eq!(tis.backend_mut().store().unwrap().fetch(), Ok(None), "nothing more to store");
}

#[test]
fn without_a_store_service_a_change_stays_held() {
    let (_, _, mut vtpm) = reopened();
    send(&mut vtpm.tis, &nv_write(0, b"x"));
    for _ in 0..1000 {
        assert!(response(&mut vtpm.tis).is_none(), "released without a store");
    }
    assert_eq!(vtpm.tis.state(), State::Execution);
}

/// A change never stored is named at the guest's stop, with what its
/// store service did: nothing, not the last fetch, or no report.
#[test]
fn a_change_never_stored_is_named_with_what_the_store_service_did() {
    let (disk, _, mut vtpm) = reopened();
    let report = |vtpm: &GuestTpm| vtpm.durable_report().expect("a durable vTPM accounts");
    let tis = &mut vtpm.tis;
    send(tis, &nv_read_command());
    assert!(response(tis).is_some());
    assert_eq!(report(&vtpm).unstored(GUEST), None, "a read changes nothing");
    let tis = &mut vtpm.tis;
    send(tis, &nv_write(0, b"x"));
    let r = report(&vtpm);
    assert_eq!(r.unstored, Some(Unstored::NoService));
    let line = r.unstored(GUEST).unwrap();
    assert!(
        line.contains("guest linux:")
            && line.contains("is ctvm-vtpm-store running?")
            && line.ends_with("lost with the power"),
        "{line}"
    );
    // The fence stored: a store service ran, and has not come back for the change.
    let mut disk = disk.clone();
    serve(&mut vtpm.tis, &mut disk).unwrap();
    assert_eq!(report(&vtpm).unstored, Some(Unstored::NotFetched));
    // Fetched, never reported.
    let channel = vtpm.tis.backend_mut().store().unwrap();
    let (v, _) = channel.fetch().unwrap().unwrap();
    let line = report(&vtpm).unstored(GUEST).unwrap();
    assert!(line.contains("never reported it written") && line.ends_with("reached the disk"), "{line}");
    vtpm.tis.backend_mut().store().unwrap().stored(v).unwrap();
    let r = report(&vtpm);
    assert_eq!(r.unstored, None, "stored and committed: acknowledged");
    assert_eq!((r.stats.held, r.stats.sealed, r.stats.committed), (1, 2, 2));
    assert!(r
        .summary(GUEST)
        .starts_with("vtpm linux: 1 changes held for the store service (0 named for waiting 10 s), 2 blobs sealed, 2 versions committed"));
}

/// A change that waits ten seconds for the store service is named while
/// the guest's command waits, once, with what the service did; not only
/// at the guest's stop.
#[test]
fn a_change_waiting_ten_seconds_for_the_store_service_is_named_while_it_waits() {
    let (disk, _, mut vtpm) = reopened();
    let late = |vtpm: &GuestTpm| vtpm.durable_report().expect("a durable vTPM accounts").stats.late;
    send(&mut vtpm.tis, &nv_write(0, b"x"));
    advance_clock(LATE_US - 1);
    assert!(response(&mut vtpm.tis).is_none());
    assert_eq!(late(&vtpm), 0, "not yet");
    advance_clock(1);
    assert!(response(&mut vtpm.tis).is_none(), "still held");
    assert_eq!(late(&vtpm), 1, "named as it waits");
    let r = vtpm.durable_report().unwrap();
    let line = r.waiting(GUEST, LATE_US).unwrap();
    assert!(line.contains("waited 10 s") && line.contains("is ctvm-vtpm-store running?"), "{line}");
    advance_clock(60 * LATE_US);
    assert!(response(&mut vtpm.tis).is_none());
    assert_eq!(late(&vtpm), 1, "once");
    // Stored at last: released, and the next change is timed afresh.
    // (The fence before it first: this boot's first store.)
    let mut disk = disk.clone();
    let released = (0..2).find_map(|_| {
        serve(&mut vtpm.tis, &mut disk).unwrap();
        response(&mut vtpm.tis)
    });
    assert_eq!(rc(&released.expect("released by the store")), 0);
    send(&mut vtpm.tis, &nv_write(0, b"y"));
    advance_clock(LATE_US / 2);
    assert!(response(&mut vtpm.tis).is_none());
    assert_eq!(late(&vtpm), 1, "the next change has waited half as long");
}

#[test]
fn a_volatile_vtpm_has_no_store_channel_and_answers_at_once() {
    let (outcome, report, _, mut vtpm) = boot(VtpmMode::Volatile, Some(SEED), None, Box::new(NoCounter));
    assert_eq!(outcome, Outcome::Volatile);
    assert!(report[0].1.contains("vTPM volatile"));
    assert!(vtpm.tis.backend_mut().store().is_none());
    assert!(vtpm.durable_report().is_none(), "nothing to account for");
    let events = event_log::parse(vtpm.log.as_bytes()).unwrap();
    let text = hypervisor::tpm::config_event::parse_config_event(events.last().unwrap()).unwrap().to_string();
    assert!(text.ends_with("vtpm=volatile"), "{text}");
}

/// The outcome of booting on `blob` with `anchor`.
fn outcome_of(blob: Option<&[u8]>, reset: bool, anchor: Box<dyn RollbackAnchor>) -> (Outcome, GuestTpm) {
    let (o, _, _, vtpm) = boot(VtpmMode::Durable { reset }, Some(SEED), blob, anchor);
    (o, vtpm)
}

/// A vTPM in failure mode: as a chip whose self-test failed.
fn assert_failed(vtpm: &mut GuestTpm) {
    let pcr_read = Cmd::new(tag::RQU_COMMAND, ord::PCR_READ).u32(0).finish();
    send(&mut vtpm.tis, &pcr_read);
    assert_eq!(rc(&response(&mut vtpm.tis).unwrap()), TPM_FAILEDSELFTEST);
    let get_test_result = Cmd::new(tag::RQU_COMMAND, 0x54).finish();
    send(&mut vtpm.tis, &get_test_result);
    assert_eq!(rc(&response(&mut vtpm.tis).unwrap()), 0);
    assert!(vtpm.tis.backend_mut().store().is_none(), "no state to store");
    // The launch is in the event log all the same.
    assert_eq!(event_log::parse(vtpm.log.as_bytes()).unwrap().len(), 4);
}

#[test]
fn a_refused_blob_leaves_the_vtpm_in_failure_mode_never_fresh() {
    let (disk, committed) = owned_with_nv();
    let good = disk.latest().unwrap().clone();
    let counter = || Box::new(Counter { value: Rc::new(RefCell::new(*committed)), ..Default::default() });
    // Missing.
    let (o, mut vtpm) = outcome_of(None, false, counter());
    assert_eq!(o, Outcome::Failed(Failure::Missing));
    assert_failed(&mut vtpm);
    // Corrupted: a flipped bit in the ciphertext.
    let mut bad = good.clone();
    let at = bad.len() - 20;
    bad[at] ^= 0x10;
    let (o, mut vtpm) = outcome_of(Some(&bad), false, counter());
    assert_eq!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Forged))));
    assert_failed(&mut vtpm);
    // Truncated.
    let (o, _) = outcome_of(Some(&good[..good.len() - 1]), false, counter());
    assert_eq!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Truncated))));
    // Foreign: another host's seed.
    let (o, _, _, _) = boot(VtpmMode::Durable { reset: false }, Some([1; 32]), Some(&good), counter());
    assert_eq!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::ForeignKey))));
    // Another guest's.
    let (o, _, _, _) = boot_as("other", VtpmMode::Durable { reset: false }, Some(SEED), Some(&good), counter());
    assert_eq!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::WrongGuest))));
    // Stale: an older blob, once the counter moved past it.
    let old = &disk.synced[0];
    let (o, mut vtpm) = outcome_of(Some(old), false, counter());
    assert!(matches!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Stale { .. })))), "{o:?}");
    assert_failed(&mut vtpm);
    // No platform secret at all.
    let (o, _, _, _) = boot(VtpmMode::Durable { reset: false }, None, Some(&good), counter());
    assert_eq!(o, Outcome::Failed(Failure::NoSecret));
    // Without a counter the old blob opens, and the boot says rollback goes unseen.
    let (o, report, _, _) = boot(VtpmMode::Durable { reset: false }, Some(SEED), Some(old), Box::new(NoCounter));
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    assert!(report
        .iter()
        .any(|(l, t)| *l == Level::Warn && t.contains("rollback of the vTPM state cannot be detected")));
}

#[test]
fn vtpm_reset_makes_a_new_vtpm_only_without_an_acceptable_blob() {
    let (disk, committed) = owned_with_nv();
    let counter = || Box::new(Counter { value: Rc::new(RefCell::new(*committed)), ..Default::default() });
    let good = disk.latest().unwrap();
    let (o, report, _, _) = boot(VtpmMode::Durable { reset: true }, Some(SEED), Some(good), counter());
    assert!(matches!(o, Outcome::Opened { reset_ignored: true, .. }), "{o:?}");
    assert!(report.iter().any(|(_, t)| t.contains("vtpm.reset ignored")));
    let mut bad = good.clone();
    bad[3] ^= 1;
    let (o, report, ca, _) = boot(VtpmMode::Durable { reset: true }, Some(SEED), Some(&bad), counter());
    assert_eq!(o, Outcome::New { refused: Some(RestoreError::Blob(BlobError::BadMagic)) });
    assert!(ca.is_some() && report[0].1.contains("new vTPM (vtpm.reset, the state blob was refused"), "{report:?}");
}

/// A guest command in the power-cut model; `Some` for a write (durable).
#[derive(Clone, Copy)]
enum Op {
    Write(u32, &'static [u8]),
    Read,
}

/// What survives a power cut, and what the guest saw acknowledged.
#[derive(Clone)]
struct World {
    disk: Disk,
    counter: u64,
    /// (offset, bytes) of every write whose response the guest received.
    acknowledged: Vec<(u32, &'static [u8])>,
}

/// Boots on `blob`; None if the vTPM refused it (failure mode).
fn reboot(w: &World, blob: &[u8], counter: &Counter) -> Option<GuestTpm> {
    *counter.value.borrow_mut() = w.counter;
    let (o, vtpm) = outcome_of(Some(blob), false, Box::new(counter.clone()));
    match o {
        Outcome::Opened { .. } => Some(vtpm),
        Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Stale { .. }))) => None,
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// The NV index as a booted vTPM holds it.
fn nv_contents(vtpm: &mut GuestTpm) -> Vec<u8> {
    send(&mut vtpm.tis, &nv_read_command());
    let r = response(&mut vtpm.tis).expect("a read is answered at once");
    assert_eq!(rc(&r), 0);
    r[14..].to_vec()
}

/// Runs `ops` from a boot on `blob`, cutting power after `cut` steps.
/// Steps: the driver sends a command; the store service writes and syncs
/// a blob; it reports it (the counter moves, a response may be released);
/// the driver reads a response. Returns the world the cut left, and
/// whether it was cut.
fn run(w: &World, blob: &[u8], ops: &[Op], cut: usize) -> (World, bool) {
    let counter = Counter::default();
    let mut vtpm = reboot(w, blob, &counter).expect("an acceptable blob boots");
    let mut w = w.clone();
    let mut steps = 0;
    let mut step = || {
        steps += 1;
        steps > cut
    };
    for op in ops {
        if step() {
            return (w, true);
        }
        let (command, written) = match *op {
            Op::Write(offset, data) => (nv_write(offset, data), Some((offset, data))),
            Op::Read => (nv_read_command(), None),
        };
        send(&mut vtpm.tis, &command);
        loop {
            if let Some(r) = response(&mut vtpm.tis) {
                if step() {
                    return (w, true);
                }
                assert_eq!(rc(&r), 0);
                w.acknowledged.extend(written);
                break;
            }
            let channel = vtpm.tis.backend_mut().store().unwrap();
            let (version, b) = channel.fetch().unwrap().expect("a held change has a blob to store");
            let b = b.to_vec();
            if step() {
                return (w, true);
            }
            w.disk.synced.push(b);
            if step() {
                return (w, true);
            }
            let channel = vtpm.tis.backend_mut().store().unwrap();
            channel.stored(version).unwrap();
            w.counter = *counter.value.borrow();
        }
    }
    (w, false)
}

/// Every blob the guest could hand back is refused, or holds every
/// acknowledged write; the newest always boots.
fn check(w: &World) {
    let counter = Counter::default();
    for (i, blob) in w.disk.synced.iter().enumerate() {
        let Some(mut vtpm) = reboot(w, blob, &counter) else { continue };
        let nv = nv_contents(&mut vtpm);
        for (offset, data) in &w.acknowledged {
            let at = *offset as usize;
            assert_eq!(&nv[at..at + data.len()], *data, "blob {i} accepted without an acknowledged write");
        }
    }
    let newest = w.disk.latest().unwrap();
    assert!(reboot(w, newest, &counter).is_some(), "the newest blob must boot");
}

#[test]
fn no_acknowledged_write_is_lost_to_a_power_cut_at_any_step() {
    let (disk, committed) = owned_with_nv();
    let start = World { disk: disk.clone(), counter: *committed, acknowledged: Vec::new() };
    let ops = [Op::Read, Op::Write(0, b"one"), Op::Write(8, b"two"), Op::Read, Op::Write(16, b"three")];
    let mut cuts = 0;
    for cut in 0.. {
        let (w, was_cut) = run(&start, start.disk.latest().unwrap(), &ops, cut);
        check(&w);
        // And a second boot, on each blob the vTPM accepts, cut at each step too.
        let counter = Counter::default();
        let accepted: Vec<Vec<u8>> =
            w.disk.synced.iter().filter(|b| reboot(&w, b, &counter).is_some()).cloned().collect();
        for b in &accepted {
            for cut2 in 0.. {
                let (w2, again) = run(&w, b, &[Op::Write(24, b"four"), Op::Read], cut2);
                check(&w2);
                if !again {
                    break;
                }
            }
        }
        cuts += 1;
        if !was_cut {
            assert_eq!(w.acknowledged.len(), 3);
            break;
        }
    }
    assert!(cuts > 10, "{cuts} cut points");
}

#[test]
fn the_store_channel_refuses_what_a_guest_makes_up() {
    let (_, committed, mut vtpm) = reopened();
    let channel = vtpm.tis.backend_mut().store().unwrap();
    for v in [0, 1, committed, u64::MAX] {
        assert_eq!(channel.stored(v), Err(StoreError::Unexpected), "report of {v} with nothing handed over");
    }
    let (fence, _) = channel.fetch().unwrap().unwrap();
    for v in [0, fence - 1, fence + 1, u64::MAX] {
        assert_eq!(channel.stored(v), Err(StoreError::Unexpected));
    }
    assert_eq!(channel.stored(fence), Ok(()));
    assert_eq!(channel.stored(fence), Err(StoreError::Unexpected), "a second report of the same version");
    // Through it all the TIS answered nothing it should not have.
    assert_eq!(vtpm.tis.state(), State::Idle);
}

#[test]
fn a_vtpm_with_all_its_nv_in_use_still_fits_the_store_channel() {
    let (disk, _, mut vtpm) = reopened();
    let mut disk = disk.clone();
    let mut d = Driver { tis: &mut vtpm.tis, disk: &mut disk };
    let mut c = Client::new(&mut d);
    c.record = false;
    // Every byte of NV the chip still offers (TPM_CAP_PROP_MAX_NV_AVAILABLE),
    // in one index (its bookkeeping costs 53 bytes).
    let free = u32::from_be_bytes(c.property(client::Kind::Shape, 0x123).unwrap()[..4].try_into().unwrap());
    assert_eq!(c.nv_define(&OWNER, NV + 1, NV_PER_WRITE_STCLEAR, free - 53), 0);
    assert_eq!(c.property(client::Kind::Shape, 0x123).unwrap(), [0; 4], "NV is full");
    let largest = disk.synced.iter().map(Vec::len).max().unwrap();
    assert!(largest > 28_000, "the blob holds the NV data ({largest} bytes)");
    assert!(largest <= guest_agent::vtpm_store::MAX_BLOB, "a {largest}-byte blob does not fit the store channel");
}

// ---- With a platform TPM: libtpms through swtpm ------------------------

/// The platform TPM as CTVM's bare-metal `Sealer` drives it
/// (`arch::x86_64::platform`): the same `platform::tpm::seal` calls, the
/// key sealed to PCR 12, over swtpm instead of the TIS.
#[derive(Clone)]
struct Libtpms(Rc<RefCell<PlatformTpm<swtpm::Tcp>>>);

impl PlatformSeal for Libtpms {
    fn seal(&self, key: &[u8; 32]) -> Result<Vec<u8>, String> {
        seal::seal_key(&mut self.0.borrow_mut(), key, &[launch::PCR_CONFIG], &mut swtpm::nonces())
            .map_err(|e| e.to_string())
    }

    fn unseal(&self, sealed: &[u8]) -> Result<[u8; 32], String> {
        seal::unseal_key(&mut self.0.borrow_mut(), sealed, &mut swtpm::nonces()).map_err(|e| e.to_string())
    }

    fn counter(&self, advance: bool) -> Result<u64, String> {
        seal::vtpm_counter(&mut self.0.borrow_mut(), advance, &mut swtpm::nonces()).map_err(|e| e.to_string())
    }
}

/// One machine with a platform TPM whose state outlives its power cycles.
struct Machine {
    state: swtpm::TempDir,
    tpm2: bool,
}

impl Machine {
    fn new(tag: &str, tpm2: bool) -> Machine {
        let state = swtpm::TempDir::new(tag);
        if !tpm2 {
            swtpm::owned_tpm12_state(&state.0);
        }
        Machine { state, tpm2 }
    }

    /// Power on and CTVM's measured launch with `cmdline`; the chip dies
    /// with the returned swtpm (a power cut).
    fn power_on(&self, cmdline: &str) -> (swtpm::Swtpm, Libtpms) {
        let sw = swtpm::Swtpm::start(&self.state.0, self.tpm2);
        let mut tpm = if self.tpm2 { PlatformTpm::new(Family::V2, sw.transport()) } else { swtpm::tpm12(&sw) };
        swtpm::launch_ctvm(&mut tpm, cmdline);
        (sw, Libtpms(Rc::new(RefCell::new(tpm))))
    }
}

/// The host's roots on `chip`, opened from the blobs handed over.
/// Each opening draws other random bytes (a new host secret differs).
fn host_on(chip: &Libtpms, files: &[&[u8]]) -> Host<Libtpms> {
    static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x0bad_cafe);
    let mut p = TestPlatform(OPENED.fetch_add(0x9e37_79b9, std::sync::atomic::Ordering::Relaxed));
    Host::open(chip.clone(), SEED, files, &mut |b| p.fill_random(b))
}

/// A durable boot of `guest` rooted in `host`: key, CA and version table.
fn boot_guest(host: &Host<Libtpms>, chip: &Libtpms, guest: &str, blob: Option<&[u8]>, reset: bool) -> Booted {
    let root = PlatformRoot::new(chip.clone(), SEED, host.clone());
    let anchor = Box::new(host.anchor(guest));
    boot_under(guest, VtpmMode::Durable { reset }, Some(SEED), Some(&root), blob, anchor)
}

/// A durable boot of the one guest rooted in `chip`, its blob the only one.
fn boot_on(chip: &Libtpms, blob: Option<&[u8]>, reset: bool) -> Booted {
    let host = host_on(chip, blob.as_slice());
    boot_guest(&host, chip, GUEST, blob, reset)
}

/// Refused as rolled back: below its guest's entry, or (when the blob
/// carried the newest version table) the table below the counter.
fn rolled_back(o: &Outcome) -> bool {
    match o {
        Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Stale { .. }))) => true,
        Outcome::Failed(Failure::Anchor(e)) => e.0.contains("older than the platform counter"),
        _ => false,
    }
}

/// The host secret would not unseal: the guest's vTPM fails, said plainly.
fn host_unsealed_not(o: &Outcome) -> bool {
    matches!(o, Outcome::Failed(Failure::Anchor(e)) if e.0.contains("would not unseal"))
}

fn refused_key(o: &Outcome) -> Option<&KeyError> {
    match o {
        Outcome::Failed(Failure::Refused(RestoreError::Key(k))) => Some(k),
        _ => None,
    }
}

fn platform_rooted_vtpm_lifecycle(tpm2: bool) {
    const CONFIG: &str = "log=info";
    let machine = Machine::new(if tpm2 { "vtpm-tpm2" } else { "vtpm-tpm12" }, tpm2);
    let mut disk = Disk::default();
    // Boot 1, fresh: a new key sealed in the chip, ownership, NV and two
    // writes, each committed in the chip's counter.
    let before_second;
    {
        let (_power, chip) = machine.power_on(CONFIG);
        let start = chip.counter(false).unwrap();
        let (o, report, ca, mut vtpm) = boot_on(&chip, None, true);
        assert_eq!(o, Outcome::New { refused: None });
        assert!(ca.is_some());
        assert!(report.iter().all(|(_, t)| !t.contains("rollback") && !t.contains("forge")), "{report:?}");
        own_and_define_nv(&mut vtpm, &mut disk);
        let mut d = Driver { tis: &mut vtpm.tis, disk: &mut disk };
        assert_eq!(rc(&d.transmit(&nv_write(0, b"first"))), 0);
        before_second = disk.latest().unwrap().clone();
        let mut d = Driver { tis: &mut vtpm.tis, disk: &mut disk };
        assert_eq!(rc(&d.transmit(&nv_write(0, b"second"))), 0);
        assert!(disk.synced.iter().all(|b| b.starts_with(PLATFORM_SEALED)), "every blob carries its sealed key");
        assert!(
            disk.synced.iter().all(|b| b.windows(HOST_RECORD.len()).any(|w| w == HOST_RECORD)),
            "and the host record"
        );
        let last = chip.counter(false).unwrap();
        assert!(last >= start + 5, "fence, ownership, NV index, two writes: {start} -> {last}");
    }
    let newest = disk.latest().unwrap().clone();
    // Boot 2, restored after a power cycle under the same configuration.
    {
        let (_power, chip) = machine.power_on(CONFIG);
        let (o, report, _, mut vtpm) = boot_on(&chip, Some(&newest), false);
        assert!(matches!(o, Outcome::Opened { reset_ignored: false, .. }), "{o:?}");
        assert!(report.iter().all(|(l, _)| *l == Level::Info), "nothing weaker to report: {report:?}");
        assert!(report[0].1.contains("sealed under the platform TPM"), "{report:?}");
        assert_eq!(&nv_contents(&mut vtpm)[..6], b"second");
        // Stale: the blob from before the second write, rolled back.
        let (o, _, _, mut vtpm) = boot_on(&chip, Some(&before_second), false);
        assert!(rolled_back(&o), "{o:?}");
        assert_failed(&mut vtpm);
        // Corrupt: a bit of the state blob, a bit of the sealed key, the
        // length of the sealed key.
        let mut bad = newest.clone();
        let at = bad.len() - 20;
        bad[at] ^= 0x10;
        let (o, _, _, mut vtpm) = boot_on(&chip, Some(&bad), false);
        assert_eq!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Forged))));
        assert_failed(&mut vtpm);
        let mut bad = newest.clone();
        bad[PLATFORM_SEALED.len() + 2 + 40] ^= 1;
        let (o, _, _, _) = boot_on(&chip, Some(&bad), false);
        assert!(matches!(refused_key(&o), Some(KeyError::Unseal(_) | KeyError::Malformed)), "{o:?}");
        let mut bad = newest.clone();
        bad[PLATFORM_SEALED.len()] = 0xff;
        let (o, _, _, _) = boot_on(&chip, Some(&bad), false);
        assert_eq!(refused_key(&o), Some(&KeyError::Malformed));
        // Foreign: a blob sealed under the seed alone (which anyone who reads
        // the seed module can make) is refused where a platform TPM roots the keys.
        let (seed_disk, _) = owned_with_nv();
        let (o, _, _, _) = boot_on(&chip, seed_disk.latest().map(Vec::as_slice), false);
        assert_eq!(refused_key(&o), Some(&KeyError::SeedOnly));
        // And a platform-sealed blob on a boot without a platform TPM.
        let (o, _, _, _) = boot(VtpmMode::Durable { reset: false }, Some(SEED), Some(&newest), Box::new(NoCounter));
        assert_eq!(refused_key(&o), Some(&KeyError::NeedsPlatformTpm));
    }
    // Boot 3, CTVM's configuration changed (another command line, PCR 12):
    // the chip refuses to unseal the key; failure mode, said plainly; a
    // reset makes a new vTPM and says which blob it gave up.
    {
        let (_power, chip) = machine.power_on("log=debug");
        let (o, report, _, mut vtpm) = boot_on(&chip, Some(&newest), false);
        assert!(host_unsealed_not(&o), "{o:?}");
        assert_failed(&mut vtpm);
        assert!(
            report.iter().any(|(l, t)| *l == Level::Error
                && t.contains("vTPM in failure mode: the rollback counter cannot be read: the host secret sealed to the platform TPM would not unseal")),
            "{report:?}"
        );
    }
    // Boot 4, the original configuration again: the key unseals, the
    // newest blob opens, the older one stays stale.
    let (_power, chip) = machine.power_on(CONFIG);
    let (o, _, _, _) = boot_on(&chip, Some(&newest), false);
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    let (o, _, _, _) = boot_on(&chip, Some(&before_second), false);
    assert!(rolled_back(&o), "{o:?}");
    if tpm2 {
        // Another machine's platform TPM cannot unseal this one's secrets.
        let other = Machine::new("vtpm-tpm2-other", true);
        let (_power, chip) = other.power_on(CONFIG);
        let (o, _, _, _) = boot_on(&chip, Some(&newest), false);
        assert!(host_unsealed_not(&o), "{o:?}");
    }
}

#[test]
fn a_vtpm_sealed_to_a_tpm2_lives_across_power_cycles_and_refuses_every_bad_blob() {
    platform_rooted_vtpm_lifecycle(true);
}

#[test]
fn a_vtpm_sealed_to_a_tpm12_lives_across_power_cycles_and_refuses_every_bad_blob() {
    platform_rooted_vtpm_lifecycle(false);
}

/// The version table's counter moves one step at a time up to the table's
/// sequence (a fence two steps up first), never back, and only for the
/// table handed out; one table is out at a time.
#[test]
fn the_platform_counter_anchors_one_version_table_at_a_time() {
    let machine = Machine::new("vtpm-counter", true);
    let (_power, chip) = machine.power_on("log=info");
    let start = chip.counter(false).unwrap();
    let host = host_on(&chip, &[]);
    let (mut a, mut b) = (host.anchor("a"), host.anchor("b"));
    assert_eq!(a.committed("a").unwrap(), Some(0));
    assert!(a.commit("a", 2).is_err(), "no table was handed out");
    assert!(a.record("a", 2).unwrap().is_some());
    assert_eq!(b.record("b", 2).unwrap(), None, "a's table is out: b waits");
    a.commit("a", 2).unwrap();
    assert_eq!(chip.counter(false).unwrap(), start + 2, "the fence: two steps");
    assert!(a.commit("a", 2).is_err(), "committed once");
    assert!(b.record("b", 2).unwrap().is_some());
    b.commit("b", 2).unwrap();
    assert_eq!(chip.counter(false).unwrap(), start + 3);
    assert_eq!((a.committed("a").unwrap(), a.committed("b").unwrap()), (Some(2), Some(2)));
    // A table handed out to a guest that stops is skipped over.
    assert!(a.record("a", 3).unwrap().is_some());
    drop(a);
    assert!(b.record("b", 3).unwrap().is_some());
    b.commit("b", 3).unwrap();
    assert_eq!(chip.counter(false).unwrap(), start + 5);
}

// ---- Attacks on the CA and on a second guest ---------------------------

/// A CTVM configured differently (another PCR 12) must not issue
/// certificates under the CA of the first: it cannot unseal the CA secret,
/// issues nothing while the blobs are there, and a CA it makes afresh is
/// another key. Under the first configuration the CA stays the same
/// across power cycles, and it is not the one the seed alone gives.
#[test]
fn a_ctvm_configured_differently_cannot_issue_under_the_same_ca() {
    let machine = Machine::new("vtpm-ca-config", true);
    let ca_of = |host: &Host<Libtpms>, chip: &Libtpms| {
        PlatformRoot::new(chip.clone(), SEED, host.clone()).ca().map(|ca| ca.modulus().to_vec())
    };
    let (ca, blob) = {
        let (_power, chip) = machine.power_on("log=info");
        let host = host_on(&chip, &[]);
        let (o, report, cert, mut vtpm) = boot_guest(&host, &chip, GUEST, None, true);
        assert_eq!(o, Outcome::New { refused: None });
        assert!(report.iter().all(|(_, t)| !t.contains("not bound to a measured launch")), "{report:?}");
        let mut disk = Disk::default();
        own_and_define_nv(&mut vtpm, &mut disk);
        let ca = ca_of(&host, &chip).unwrap();
        let cert = cert.expect("the CA certificate is printed");
        assert_eq!(ekcert::ca_modulus_from_der(&cert).unwrap(), ca);
        (ca, disk.latest().unwrap().clone())
    };
    assert_ne!(ca, SeedRoot::new(SEED).ca().unwrap().modulus(), "the seed alone gives another CA");
    {
        let (_power, chip) = machine.power_on("log=debug");
        let host = host_on(&chip, &[&blob]);
        let refused = ca_of(&host, &chip);
        assert!(matches!(&refused, Err(KeyError::Ca(e)) if e.contains("would not unseal")), "{refused:?}");
        let (error, line) = host.report();
        assert!(error && line.contains("no EK certificate is issued"), "{line}");
        // Asked for a new vTPM anyway: refused, no certificate.
        let (o, _, cert, _) = boot_guest(&host, &chip, "other", None, true);
        assert!(cert.is_none() && matches!(o, Outcome::Failed(_)), "{o:?}");
        // Without the blobs it makes a CA of its own: another key.
        let fresh = host_on(&chip, &[]);
        assert_ne!(ca_of(&fresh, &chip).unwrap(), ca, "the other configuration issues under the same CA");
    }
    let (_power, chip) = machine.power_on("log=info");
    assert_eq!(ca_of(&host_on(&chip, &[&blob]), &chip).unwrap(), ca, "the same CA after a power cycle");
}

/// Without a platform TPM the CA comes from the seed, and a first boot
/// says it is not bound to a measured launch.
#[test]
fn a_seed_derived_ca_is_said_to_be_unbound() {
    let (o, report, cert, _) = boot(VtpmMode::Durable { reset: true }, Some(SEED), None, Box::new(NoCounter));
    assert_eq!(o, Outcome::New { refused: None });
    assert_eq!(ekcert::ca_modulus_from_der(&cert.unwrap()).unwrap(), SeedRoot::new(SEED).ca().unwrap().modulus());
    assert!(
        report.iter().any(|(l, t)| *l == Level::Warn
            && t.contains("the vTPM CA is derived from vtpm.seed, not bound to a measured launch")),
        "{report:?}"
    );
}

/// Two durable guests on one platform counter: a rolled-back blob of the
/// second is refused as the first's is, across a power cycle, on a TPM
/// 2.0 and a TPM 1.2.
fn two_guests_on_one_counter(tpm2: bool) {
    let machine = Machine::new(if tpm2 { "vtpm-two-tpm2" } else { "vtpm-two-tpm12" }, tpm2);
    let (mut first, mut second) = (Disk::default(), Disk::default());
    let second_old;
    {
        let (_power, chip) = machine.power_on("log=info");
        let host = host_on(&chip, &[]);
        let (o, _, _, mut a) = boot_guest(&host, &chip, "first", None, true);
        assert_eq!(o, Outcome::New { refused: None });
        let (o, _, _, mut b) = boot_guest(&host, &chip, "second", None, true);
        assert_eq!(o, Outcome::New { refused: None });
        own_and_define_nv(&mut a, &mut first);
        own_and_define_nv(&mut b, &mut second);
        second_old = second.latest().unwrap().clone();
        let mut d = Driver { tis: &mut b.tis, disk: &mut second };
        assert_eq!(rc(&d.transmit(&nv_write(0, b"newer"))), 0);
        // The first guest commits after: its table holds the second's version.
        let mut d = Driver { tis: &mut a.tis, disk: &mut first };
        assert_eq!(rc(&d.transmit(&nv_write(0, b"first"))), 0);
    }
    let (a_new, b_new) = (first.latest().unwrap().clone(), second.latest().unwrap().clone());
    let (_power, chip) = machine.power_on("log=info");
    // Every guest's newest blob: both open.
    let host = host_on(&chip, &[&a_new, &b_new]);
    let (o, _, _, _) = boot_guest(&host, &chip, "first", Some(&a_new), false);
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    let (o, _, _, mut b) = boot_guest(&host, &chip, "second", Some(&b_new), false);
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    assert_eq!(&nv_contents(&mut b)[..5], b"newer");
    drop(b);
    // The second guest's old blob: refused, the first still opens.
    let host = host_on(&chip, &[&a_new, &second_old]);
    let (o, _, _, mut b) = boot_guest(&host, &chip, "second", Some(&second_old), false);
    assert!(matches!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Stale { .. })))), "{o:?}");
    assert_failed(&mut b);
    let (o, _, _, _) = boot_guest(&host, &chip, "first", Some(&a_new), false);
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    // The second guest's old blob, the first's withheld: the newest table
    // is missing, nothing starts.
    let host = host_on(&chip, &[&second_old]);
    let (o, _, _, _) = boot_guest(&host, &chip, "second", Some(&second_old), false);
    assert!(rolled_back(&o), "{o:?}");
    // A blob made up of the second's sealed key and state behind the
    // first's newer table: the table's entry for the second still refuses it.
    let host = host_on(&chip, &[&a_new, &b_new]);
    let (o, _, _, _) = boot_guest(&host, &chip, "second", Some(&second_old), false);
    assert!(matches!(o, Outcome::Failed(Failure::Refused(RestoreError::Blob(BlobError::Stale { .. })))), "{o:?}");
}

#[test]
fn a_second_guests_rolled_back_blob_is_refused_on_a_tpm2() {
    two_guests_on_one_counter(true);
}

#[test]
fn a_second_guests_rolled_back_blob_is_refused_on_a_tpm12() {
    two_guests_on_one_counter(false);
}

/// Hostile host records: every truncation and a flipped bit in each
/// byte of a blob's front (sealed key, host record, table) is refused,
/// never a panic, and never opens.
#[test]
fn a_host_record_cut_or_flipped_anywhere_is_refused() {
    let machine = Machine::new("vtpm-host-flip", true);
    let (_power, chip) = machine.power_on("log=info");
    let host = host_on(&chip, &[]);
    let (_, _, _, mut vtpm) = boot_guest(&host, &chip, GUEST, None, true);
    let mut disk = Disk::default();
    own_and_define_nv(&mut vtpm, &mut disk);
    drop(vtpm);
    let good = disk.latest().unwrap().clone();
    let front = good.windows(8).position(|w| w == b"CTVMVTPM").unwrap();
    let host = host_on(&chip, &[&good]);
    let (o, _, _, _) = boot_guest(&host, &chip, GUEST, Some(&good), false);
    assert!(matches!(o, Outcome::Opened { .. }), "{o:?}");
    // Past the sealed key (whose bits the chip checks, slowly), every byte.
    let sealed_end = PLATFORM_SEALED.len() + 2 + usize::from(u16::from_be_bytes([good[8], good[9]]));
    for at in (sealed_end..front).chain([0, 8, 9]) {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let host = host_on(&chip, &[&bad]);
        let (o, _, _, _) = boot_guest(&host, &chip, GUEST, Some(&bad), false);
        assert!(matches!(o, Outcome::Failed(_)), "byte {at} flipped: {o:?}");
    }
    for cut in [1, 9, sealed_end, sealed_end + 5, front - 1, front] {
        let host = host_on(&chip, &[&good[..cut]]);
        let (o, _, _, _) = boot_guest(&host, &chip, GUEST, Some(&good[..cut]), false);
        assert!(matches!(o, Outcome::Failed(_)), "cut at {cut}: {o:?}");
    }
}

/// Through the store channels: while the first guest's blob (and its
/// version table) is with its store service, the second guest's change is
/// held and its store service told nothing waits; once the first reports,
/// the second's blob goes out, its table holding the first's version.
#[test]
fn one_version_table_is_out_at_a_time_through_the_store_channels() {
    let machine = Machine::new("vtpm-one-out", true);
    let (va, blob_a, vb, blob_b) = {
        let (_power, chip) = machine.power_on("log=info");
        let host = host_on(&chip, &[]);
        let (_, _, _, mut a) = boot_guest(&host, &chip, "first", None, true);
        let (_, _, _, mut b) = boot_guest(&host, &chip, "second", None, true);
        // Both have a fence to store; the first takes its out.
        let (va, blob_a) = {
            let (v, blob) = a.tis.backend_mut().store().unwrap().fetch().unwrap().unwrap();
            (v, blob.to_vec())
        };
        assert_eq!(b.tis.backend_mut().store().unwrap().fetch(), Ok(None), "the first's table is out");
        a.tis.backend_mut().store().unwrap().stored(va).unwrap();
        let (vb, blob_b) = {
            let (v, blob) = b.tis.backend_mut().store().unwrap().fetch().unwrap().unwrap();
            (v, blob.to_vec())
        };
        b.tis.backend_mut().store().unwrap().stored(vb).unwrap();
        (va, blob_a, vb, blob_b)
    };
    // After a power cycle both versions are known, and the second's blob
    // alone tells the first's.
    let (_power, chip) = machine.power_on("log=info");
    let mut anchor = host_on(&chip, &[&blob_a, &blob_b]).anchor("x");
    assert_eq!((anchor.committed("first").unwrap(), anchor.committed("second").unwrap()), (Some(va), Some(vb)));
    let mut anchor = host_on(&chip, &[&blob_b]).anchor("x");
    assert_eq!(anchor.committed("first").unwrap(), Some(va), "the second's table holds the first's version");
    // The first's blob alone is older than the counter: nothing starts.
    let mut anchor = host_on(&chip, &[&blob_a]).anchor("x");
    assert!(anchor.committed("first").is_err());
}

/// PCR 11 of a durable vTPM is the hypervisor's from its first command:
/// reserved at every launch (configuration, not in the blob), a guest's
/// Extend of it through the TIS is refused, and CTVM's lock event reaches
/// it even while a guest's change waits for the store service.
#[test]
fn pcr_11_takes_the_lock_event_and_no_guest_extend() {
    let (disk, _, mut vtpm) = reopened();
    let extend = |pcr: u32| Cmd::new(tag::RQU_COMMAND, ord::EXTEND).u32(pcr).bytes(&[0x66; 20]).finish();
    let read = Cmd::new(tag::RQU_COMMAND, ord::PCR_READ).u32(11).finish();
    send(&mut vtpm.tis, &read);
    let before = response(&mut vtpm.tis).unwrap()[10..30].to_vec();
    send(&mut vtpm.tis, &extend(11));
    assert_eq!(rc(&response(&mut vtpm.tis).unwrap()), 0x3d, "TPM_BAD_LOCALITY");
    send(&mut vtpm.tis, &extend(12));
    assert_eq!(rc(&response(&mut vtpm.tis).unwrap()), 0, "PCR 12 is the guest's");
    // A change held for the store service; then the agent locks.
    send(&mut vtpm.tis, &nv_write(0, b"held"));
    assert!(response(&mut vtpm.tis).is_none());
    let lock = hypervisor::tpm::config_event::lock_event(vtpm_core::sha1, &[0xa5; 32], IntegrityMode::Enforce);
    vtpm.measure_event(&lock).expect("measured while the change is held");
    let events = event_log::parse(vtpm.log.as_bytes()).unwrap();
    assert_eq!(events.last(), Some(&lock));
    let mut disk = disk.clone();
    serve(&mut vtpm.tis, &mut disk);
    serve(&mut vtpm.tis, &mut disk);
    assert_eq!(rc(&response(&mut vtpm.tis).expect("released")), 0);
    send(&mut vtpm.tis, &read);
    let after = response(&mut vtpm.tis).unwrap()[10..30].to_vec();
    assert_eq!(after, vtpm_core::sha1(&[&before[..], &lock.digest[..]].concat()), "PCR 11 = old ‖ lock");
}
