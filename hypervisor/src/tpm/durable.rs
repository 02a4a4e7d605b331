//! A durable vTPM: a vtpm-core TPM whose state changes reach the guest's
//! disk, sealed, before the guest sees them acknowledged.
//!
//! [`DurableTpm`] sits between the TIS and the TPM and drives
//! `vtpm_trust::durability` (the protocol, its proof by a power-cut model
//! and the reasons for each order are there). A command whose execution
//! changed the durable state has its response held: the TIS shows it
//! executing. The guest's store service fetches the sealed blob through
//! [`StoreChannel::fetch`] (a hypercall the agent makes for it), writes and
//! `fsync`s it, and reports it with [`StoreChannel::stored`]; the
//! hypervisor then advances the [`RollbackAnchor`]'s counter and releases
//! the response. Until then every other command is answered TPM_RETRY.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use vtpm_core::{Platform, Tpm};
use vtpm_trust::blob::{BlobError, StateKey};
use vtpm_trust::durability::{Durability, Step, Store};

use super::anchor::{AnchorError, RollbackAnchor};
use crate::devices::tis::TpmBackend;

/// TPM_RETRY: "the TPM is too busy to respond to the command immediately,
/// but the command could be resubmitted at a later time".
pub const TPM_RETRY: u32 = 0x800;
const ORD_SAVE_STATE: u32 = 0x98;

/// Fresh random bytes (the blobs' AES-GCM nonces): RDRAND in the hypervisor.
pub type Entropy = Box<dyn FnMut(&mut [u8])>;

/// The store service's side of a durable vTPM, as the hypercalls see it.
pub trait StoreChannel {
    /// The blob to store next, with its version; None when nothing waits.
    /// Asked again before a report, it hands over the same blob.
    fn fetch(&mut self) -> Result<Option<(u64, &[u8])>, StoreError>;
    /// The store service wrote and synced this version.
    fn stored(&mut self, version: u64) -> Result<(), StoreError>;
}

/// Why the store channel refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A report of a version that is not the one handed over (a confused
    /// or lying store service): ignored.
    Unexpected,
    /// Sealing failed (cannot happen with a valid guest name).
    Seal(BlobError),
    /// The counter could not be advanced: the response stays held and a
    /// repeated report retries.
    Counter(AnchorError),
}

/// What happened, for the report at power-off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurableStats {
    /// Responses held for a store.
    pub held: u64,
    /// Blobs sealed for the store service.
    pub sealed: u64,
    /// Versions committed.
    pub committed: u64,
    /// Changes named on the console for waiting [`LATE_US`] for the store
    /// service, while they waited.
    pub late: u64,
    /// Commands answered TPM_RETRY while a response was held.
    pub retries: u64,
}

/// How long a change waits for the store service before it is named on the
/// console, while the guest's command waits with it: far beyond a store
/// service's round trip (a write and two syncs), well within Linux's
/// `tpm_tis` timeouts for the ordinals that change state.
pub const LATE_US: u64 = 10_000_000;

/// A durable vTPM's account, for the report when its guest stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableReport {
    pub stats: DurableStats,
    /// A change still waits (the guest was not answered), and why.
    pub unstored: Option<Unstored>,
}

/// Why a durable vTPM still holds a change: its store service never
/// reported the blob written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unstored {
    /// No store service fetched any blob this boot.
    NoService,
    /// The store service fetched earlier blobs, not this one.
    NotFetched,
    /// It fetched the blob and never reported it written and synced.
    NotReported,
}

impl DurableReport {
    /// The counts, for the report at power-off.
    pub fn summary(&self, guest: &str) -> String {
        let s = self.stats;
        alloc::format!(
            "vtpm {guest}: {} changes held for the store service ({} named for waiting {} s), {} blobs sealed, {} versions committed, {} commands answered TPM_RETRY",
            s.held,
            s.late,
            LATE_US / 1_000_000,
            s.sealed,
            s.committed,
            s.retries
        )
    }

    /// The line a guest's stop needs when a change of its vTPM was never
    /// stored: without it, a store service that is missing or stuck goes
    /// unnoticed until a later boot lacks the change.
    pub fn unstored(&self, guest: &str) -> Option<String> {
        let (why, fate) = self.why()?;
        Some(alloc::format!("guest {guest}: its durable vTPM's last change was never acknowledged: {why}; {fate}"))
    }

    /// The line for a change that has waited `waited_us` for the store
    /// service and waits on: the guest's command waits with it.
    pub fn waiting(&self, guest: &str, waited_us: u64) -> Option<String> {
        let (why, fate) = self.why()?;
        let s = waited_us / 1_000_000;
        Some(alloc::format!(
            "guest {guest}: a change of its durable vTPM has waited {s} s for the store service, and the guest's TPM command with it: {why}; if the power goes now, {fate}"
        ))
    }

    /// Why the change waiting was not stored, and what becomes of it.
    fn why(&self) -> Option<(&'static str, &'static str)> {
        const LOST: &str = "the change is lost with the power";
        Some(match self.unstored? {
            Unstored::NoService => ("no store service fetched a blob this boot (is ctvm-vtpm-store running?)", LOST),
            Unstored::NotFetched => ("its store service did not come back for the blob", LOST),
            Unstored::NotReported => (
                "its store service fetched the blob but never reported it written and synced",
                "a later boot has the change only if the blob reached the disk",
            ),
        })
    }
}

/// A vtpm-core TPM whose durable changes wait for the store service.
pub struct DurableTpm<P: Platform> {
    tpm: Tpm<P>,
    guest: String,
    key: StateKey,
    anchor: Box<dyn RollbackAnchor>,
    protocol: Durability,
    /// The response of the change being stored.
    held: Option<Vec<u8>>,
    /// When it was held (the platform's clock, µs), and whether it has been
    /// named for waiting long.
    held_at: u64,
    named_late: bool,
    /// A released response the TIS has not taken yet.
    released: Option<Vec<u8>>,
    /// What goes in front of every blob: the state key sealed to the
    /// platform TPM (`anchor::PlatformRoot`), or nothing. The anchor's
    /// record (the host's version table) follows it.
    prefix: Vec<u8>,
    /// The blob with the store service.
    outbox: Option<(u64, Vec<u8>)>,
    /// Fresh bytes for the blobs' AES-GCM nonces.
    entropy: Entropy,
    pub stats: DurableStats,
}

fn error_response(code: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(10);
    r.extend_from_slice(&0x00c4u16.to_be_bytes());
    r.extend_from_slice(&10u32.to_be_bytes());
    r.extend_from_slice(&code.to_be_bytes());
    r
}

fn ordinal(command: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(command.get(6..10)?.try_into().ok()?))
}

fn return_code(response: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(response.get(6..10)?.try_into().ok()?))
}

impl<P: Platform> DurableTpm<P> {
    /// `tpm` is the state just opened (or made) for `guest`; `counter` the
    /// committed version it is fenced above (see `Durability::boot`).
    pub fn new(
        mut tpm: Tpm<P>,
        guest: &str,
        key: StateKey,
        anchor: Box<dyn RollbackAnchor>,
        counter: u64,
        entropy: Entropy,
    ) -> Self {
        // Whatever the boot did (provisioning) goes out with the fence.
        tpm.clear_dirty();
        DurableTpm {
            tpm,
            guest: guest.into(),
            key,
            anchor,
            protocol: Durability::boot(counter),
            held: None,
            held_at: 0,
            named_late: false,
            released: None,
            prefix: Vec::new(),
            outbox: None,
            entropy,
            stats: DurableStats::default(),
        }
    }

    /// Puts `prefix` in front of every blob handed to the store service
    /// (the platform-sealed state key, which the next boot needs first).
    pub fn with_prefix(mut self, prefix: Vec<u8>) -> Self {
        self.prefix = prefix;
        self
    }

    /// Where the protocol is.
    pub fn protocol(&self) -> &Durability {
        &self.protocol
    }

    /// The TPM itself (for the hypervisor's own checks and tests).
    pub fn tpm(&self) -> &Tpm<P> {
        &self.tpm
    }

    /// Reserves PCRs to the platform (`Tpm::reserve_pcrs_to_platform`):
    /// configuration set at every launch, never sealed into a blob.
    pub fn reserve_pcrs_to_platform(&mut self, mask: u32) {
        self.tpm.reserve_pcrs_to_platform(mask);
    }
}

impl<P: Platform> TpmBackend for DurableTpm<P> {
    /// The hypervisor's own commands (Startup and the launch measurements)
    /// go through the same path as the guest's: none of them changes
    /// durable state, and nothing bypasses the protocol.
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        self.submit(locality, command).unwrap_or_else(|| error_response(TPM_RETRY))
    }

    fn submit(&mut self, locality: u8, command: &[u8]) -> Option<Vec<u8>> {
        // A response released after its command was aborted is dropped.
        self.released = None;
        if !self.protocol.may_execute() {
            self.stats.retries = self.stats.retries.saturating_add(1);
            return Some(error_response(TPM_RETRY));
        }
        let response = self.tpm.execute(locality, command);
        let saved = ordinal(command) == Some(ORD_SAVE_STATE) && return_code(&response) == Some(0);
        let changed = self.tpm.permanent_dirty() || saved;
        self.tpm.clear_dirty();
        match self.protocol.command_done(changed) {
            Ok(Step::Hold) => {
                self.stats.held = self.stats.held.saturating_add(1);
                self.held = Some(response);
                self.held_at = self.tpm.platform_ticks_us();
                self.named_late = false;
                None
            }
            // Release; the protocol's other answers cannot follow a command
            // that ran (may_execute was checked).
            _ => Some(response),
        }
    }

    /// The guest polls while its command waits: a change that has waited
    /// [`LATE_US`] is named on the console then (once), not only at the
    /// guest's stop.
    fn poll(&mut self) -> Option<Vec<u8>> {
        if self.held.is_some() && !self.named_late {
            let waited = self.tpm.platform_ticks_us().saturating_sub(self.held_at);
            if waited >= LATE_US {
                self.named_late = true;
                self.stats.late = self.stats.late.saturating_add(1);
                if let Some(line) = self.durable_report().and_then(|r| r.waiting(&self.guest, waited)) {
                    log::warn!("{line}");
                }
            }
        }
        self.released.take()
    }

    fn store(&mut self) -> Option<&mut dyn StoreChannel> {
        Some(self)
    }

    fn durable_report(&self) -> Option<DurableReport> {
        let unstored = self.held.as_ref().map(|_| match (&self.outbox, self.stats.sealed) {
            (Some(_), _) => Unstored::NotReported,
            (None, 0) => Unstored::NoService,
            (None, _) => Unstored::NotFetched,
        });
        Some(DurableReport { stats: self.stats, unstored })
    }

    /// Straight to the TPM, outside the protocol: the hypervisor's Startup
    /// and PCR extends change no durable state, and the lock event must
    /// reach PCR 11 even while a guest's change waits for its store
    /// service. Should a command dirty the permanent state all the same,
    /// the flag stays set and the guest's next command is held for it.
    fn execute_platform(&mut self, command: &[u8]) -> Vec<u8> {
        self.tpm.execute(crate::devices::tis::PLATFORM_LOCALITY, command)
    }
}

impl<P: Platform> StoreChannel for DurableTpm<P> {
    fn fetch(&mut self) -> Result<Option<(u64, &[u8])>, StoreError> {
        // The anchor's record first: while another guest's is out, nothing
        // is taken from the protocol and nothing waits for this one yet.
        let record = match self.protocol.peek_store() {
            Some(Store::Seal(version)) => match self.anchor.record(&self.guest, version) {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(None),
                Err(e) => return Err(StoreError::Counter(e)),
            },
            _ => Vec::new(),
        };
        let version = match self.protocol.next_store() {
            None => return Ok(None),
            Some(Store::Seal(version)) => {
                let mut nonce = [0u8; vtpm_trust::blob::NONCE_LEN];
                (self.entropy)(&mut nonce);
                let sealed = super::persist::seal_state(&self.key, &self.guest, version, &self.tpm, nonce)
                    .map_err(StoreError::Seal)?;
                let mut blob = Vec::with_capacity(self.prefix.len() + record.len() + sealed.len());
                blob.extend_from_slice(&self.prefix);
                blob.extend_from_slice(&record);
                blob.extend_from_slice(&sealed);
                self.stats.sealed = self.stats.sealed.saturating_add(1);
                self.outbox = Some((version, blob));
                version
            }
            Some(Store::Resend(version)) => version,
        };
        match &self.outbox {
            Some((v, blob)) if *v == version => Ok(Some((version, blob.as_slice()))),
            _ => Err(StoreError::Unexpected),
        }
    }

    fn stored(&mut self, version: u64) -> Result<(), StoreError> {
        let Ok(Step::AdvanceCounter { to }) = self.protocol.stored(version) else {
            return Err(StoreError::Unexpected);
        };
        self.anchor.commit(&self.guest, to).map_err(StoreError::Counter)?;
        if let Ok(step) = self.protocol.counter_advanced(to) {
            self.stats.committed = self.stats.committed.saturating_add(1);
            self.outbox = None;
            if step == Step::Release {
                self.released = self.held.take();
            }
        }
        Ok(())
    }
}
