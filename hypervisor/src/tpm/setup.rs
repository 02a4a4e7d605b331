//! Which vTPM a guest gets at boot: from its `vtpm=` option, the platform
//! secret and the state blob GRUB handed over (`vtpm.state=NAME`). Pure,
//! so every case is tested on the host; the boot path prints
//! [`Setup::report`] and measures and attaches what [`prepare`] made.
//!
//! A durable vTPM never starts silently fresh. A missing, corrupted,
//! foreign or stale blob leaves the vTPM in failure mode (the guest sees a
//! chip whose self-test failed, as a real one in failure mode), unless the
//! guest's line says `vtpm.reset`. `vtpm.reset` makes a new vTPM only when
//! there is no acceptable blob: with a valid one it is ignored (and said
//! so), so an operator who forgets to remove it after a first boot loses
//! nothing.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use vtpm_core::{Platform, Tpm};

use super::anchor::{AnchorError, KeyError, RollbackAnchor, SealingRoot};
use super::durable::{DurableTpm, Entropy};
use super::engine::guest_tpm;
use super::persist::{open_state, provision_ek_certificate, ProvisionError, RestoreError};

/// The EK certificates' notBefore: 2026-01-01T00:00:00Z. CTVM has no
/// trusted clock, so every certificate carries this date (the verifier's
/// `ca` command uses the same one, so the CA certificate it writes is
/// byte for byte the one printed at boot).
pub const CERT_NOT_BEFORE: u64 = 1_767_225_600;

/// What the guest's line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtpmMode {
    /// State until power-off only (`vtpm=on`, the default).
    Volatile,
    /// State kept by the guest's store service (`vtpm=durable`);
    /// `reset`: make a new vTPM when there is no acceptable blob
    /// (`vtpm.reset`).
    Durable { reset: bool },
}

/// Why a durable vTPM stays in failure mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No platform secret to seal under (no `vtpm.seed`).
    NoSecret,
    /// No `vtpm.state=NAME` module.
    Missing,
    /// The blob was refused.
    Refused(RestoreError),
    /// The rollback counter could not be read.
    Anchor(AnchorError),
    /// A new vTPM could not be provisioned.
    Provision(ProvisionError),
    /// A new vTPM's state key could not be sealed.
    Key(KeyError),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::NoSecret => {
                f.write_str("vtpm=durable needs a vtpm.seed module (the key its state is sealed under)")
            }
            Failure::Missing => f.write_str("no state blob (a module with the command line vtpm.state=NAME)"),
            Failure::Refused(e) => write!(f, "state blob refused: {}", describe(e)),
            Failure::Anchor(e) => write!(f, "the rollback counter cannot be read: {}", e.0),
            Failure::Provision(e) => write!(f, "a new vTPM could not be provisioned: {e:?}"),
            Failure::Key(e) => write!(f, "a new vTPM could not be made: {e}"),
        }
    }
}

fn describe(e: &RestoreError) -> String {
    match e {
        RestoreError::Key(k) => format!("{k}"),
        RestoreError::Blob(b) => format!("{b}"),
        RestoreError::State(s) => format!("its state does not load ({s:?})"),
        RestoreError::Table(a) => a.0.clone(),
    }
}

/// What the boot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Volatile,
    /// The blob opened: this version.
    Opened {
        version: u64,
        reset_ignored: bool,
    },
    /// `vtpm.reset`: a new vTPM, its EK certified; the blob that was
    /// refused, if there was one.
    New {
        refused: Option<RestoreError>,
    },
    Failed(Failure),
}

/// The TPM a guest gets, before its launch is measured.
pub enum Prepared<P: Platform> {
    Volatile(Tpm<P>),
    Durable(Box<DurableTpm<P>>),
    /// A blank chip (no EK, no state) to put in failure mode once the
    /// launch is measured.
    Failed(Tpm<P>),
}

/// [`prepare`]'s result.
pub struct Setup<P: Platform> {
    pub prepared: Prepared<P>,
    pub outcome: Outcome,
    /// The CA certificate (DER), when a certificate was issued.
    pub ca_certificate: Option<Vec<u8>>,
    /// Whether a counter guards this vTPM against rollback.
    pub rollback_detected: bool,
    /// Why not, when it does not.
    pub why_undetected: &'static str,
    /// What the sealing root leaves open (`SealingRoot::weakness`).
    pub key_weakness: Option<&'static str>,
    /// What the CA that issued this boot's certificate leaves open
    /// (`SealingRoot::ca_weakness`).
    pub ca_weakness: Option<&'static str>,
}

/// A console line's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl<P: Platform> Setup<P> {
    /// True when the state is kept across reboots (measured `vtpm=durable`).
    pub fn durable(&self) -> bool {
        matches!(self.prepared, Prepared::Durable(_))
    }

    /// The console lines that say what the boot did with `guest`'s vTPM.
    pub fn report(&self, guest: &str, root: &str) -> Vec<(Level, String)> {
        let mut out = Vec::new();
        match &self.outcome {
            Outcome::Volatile => out.push((
                Level::Info,
                format!("guest {guest}: vTPM volatile: its owner, keys and NV last until power-off (vtpm=durable keeps them)"),
            )),
            Outcome::Opened { version, reset_ignored } => {
                out.push((Level::Info, format!("guest {guest}: vTPM state blob version {version} opened (sealed under {root})")));
                if *reset_ignored {
                    out.push((
                        Level::Warn,
                        format!("guest {guest}: vtpm.reset ignored: the state blob is valid (remove the blob to start over)"),
                    ));
                }
            }
            Outcome::New { refused } => {
                let why = match refused {
                    Some(e) => format!("the state blob was refused ({})", describe(e)),
                    None => String::from("there is no state blob"),
                };
                out.push((
                    Level::Warn,
                    format!("guest {guest}: new vTPM (vtpm.reset, {why}); EK certificate issued into NV 0x1000f000"),
                ));
            }
            Outcome::Failed(f) => out.push((
                Level::Error,
                format!("guest {guest}: vTPM in failure mode: {f}; no state was loaded or made (vtpm.reset makes a new vTPM)"),
            )),
        }
        if self.durable() {
            if let Some(weakness) = self.key_weakness {
                out.push((Level::Warn, format!("guest {guest}: {weakness}")));
            }
        }
        if let Some(weakness) = self.ca_weakness {
            out.push((Level::Warn, format!("guest {guest}: {weakness}")));
        }
        if self.durable() && !self.rollback_detected {
            out.push((
                Level::Warn,
                format!(
                    "guest {guest}: rollback of the vTPM state cannot be detected: {} (an older blob of this guest would be accepted)",
                    self.why_undetected
                ),
            ));
        }
        out
    }
}

/// What a guest's vTPM is made from.
pub struct Request<'a> {
    pub guest: &'a str,
    pub mode: VtpmMode,
    /// Seals and certifies; None without a platform secret.
    pub root: Option<&'a dyn SealingRoot>,
    /// The EK seed (`vtpm.seed`).
    pub seed: Option<[u8; 32]>,
    /// The `vtpm.state=NAME` module.
    pub blob: Option<&'a [u8]>,
}

/// Decides and builds a guest's vTPM. `platform` makes the TPM's run-time
/// entropy source; `entropy` fills the blobs' nonces.
pub fn prepare<P: Platform>(
    request: &Request<'_>,
    mut anchor: Box<dyn RollbackAnchor>,
    mut platform: impl FnMut() -> P,
    entropy: Entropy,
) -> Setup<P> {
    let Request { guest, mode, root, seed, blob } = *request;
    let rollback_detected = anchor.detects_rollback();
    let why_undetected = anchor.why_undetected();
    let key_weakness = root.and_then(|r| r.weakness());
    let failed = |platform: &mut dyn FnMut() -> P, f: Failure| {
        let mut tpm = Tpm::manufacture_without_ek(platform());
        tpm.power_on();
        Setup {
            prepared: Prepared::Failed(tpm),
            outcome: Outcome::Failed(f),
            ca_certificate: None,
            rollback_detected,
            why_undetected,
            key_weakness,
            ca_weakness: None,
        }
    };
    let reset = match mode {
        VtpmMode::Volatile => {
            return Setup {
                prepared: Prepared::Volatile(guest_tpm(guest, seed, platform)),
                outcome: Outcome::Volatile,
                ca_certificate: None,
                rollback_detected: false,
                why_undetected,
                key_weakness: None,
                ca_weakness: None,
            }
        }
        VtpmMode::Durable { reset } => reset,
    };
    let Some(root) = root else {
        return failed(&mut platform, Failure::NoSecret);
    };
    let committed = match anchor.committed(guest) {
        Ok(c) => c,
        Err(e) => return failed(&mut platform, Failure::Anchor(e)),
    };
    let opened = blob.map(|file| {
        let (key, prefix, rest) = root.open_key(file).map_err(RestoreError::Key)?;
        let sealed = anchor.strip(guest, rest).map_err(RestoreError::Table)?;
        let (tpm, version) = open_state(&key, guest, committed.unwrap_or(0), sealed, platform())?;
        Ok((tpm, version, key, prefix))
    });
    let refused = match opened {
        Some(Ok((tpm, version, key, prefix))) => {
            // Without a counter the opened version is the best knowledge.
            let counter = committed.unwrap_or(version);
            let durable = DurableTpm::new(tpm, guest, key, anchor, counter, entropy).with_prefix(prefix);
            return Setup {
                prepared: Prepared::Durable(Box::new(durable)),
                outcome: Outcome::Opened { version, reset_ignored: reset },
                ca_certificate: None,
                rollback_detected,
                why_undetected,
                key_weakness,
                ca_weakness: None,
            };
        }
        Some(Err(e)) => Some(e),
        None => None,
    };
    if !reset {
        let f = refused.map_or(Failure::Missing, Failure::Refused);
        return failed(&mut platform, f);
    }
    let mut entropy = entropy;
    let (key, prefix) = match root.new_key(&mut *entropy) {
        Ok(k) => k,
        Err(e) => return failed(&mut platform, Failure::Key(e)),
    };
    let ca = match root.ca() {
        Ok(ca) => ca,
        Err(e) => return failed(&mut platform, Failure::Key(e)),
    };
    let mut tpm = guest_tpm(guest, seed, &mut platform);
    if let Err(e) = provision_ek_certificate(&mut tpm, &ca, guest, CERT_NOT_BEFORE) {
        return failed(&mut platform, Failure::Provision(e));
    }
    let ca_certificate = ca.certificate(CERT_NOT_BEFORE).ok();
    let counter = committed.unwrap_or(0);
    Setup {
        prepared: Prepared::Durable(Box::new(
            DurableTpm::new(tpm, guest, key, anchor, counter, entropy).with_prefix(prefix),
        )),
        outcome: Outcome::New { refused },
        ca_certificate,
        rollback_detected,
        why_undetected,
        key_weakness,
        ca_weakness: root.ca_weakness(),
    }
}

/// A certificate as PEM lines, to print.
pub fn pem_lines(der: &[u8]) -> Vec<String> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for c in der.chunks(3) {
        let n = c.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= c.len() {
                b64.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = Vec::new();
    out.push(String::from("-----BEGIN CERTIFICATE-----"));
    let bytes = b64.as_bytes();
    for chunk in bytes.chunks(64) {
        out.push(String::from_utf8_lossy(chunk).into_owned());
    }
    out.push(String::from("-----END CERTIFICATE-----"));
    out
}
