//! What a host's durable vTPMs share when a platform TPM exists: a host
//! secret sealed to CTVM's measured configuration (PCR 12), from which the
//! "CTVM vTPM CA" is derived, and the version table of every durable guest
//! (`vtpm_trust::table`), anchored in the platform TPM's one monotonic
//! counter.
//!
//! # Where they live
//! CTVM has no disk. Every blob a store service gets carries, after the
//! platform-sealed state key (`anchor::PlatformRoot`), a host record:
//! [`HOST_RECORD`], the sealed host secret (u16 length), and the version
//! table authenticated under a key derived from that secret. GRUB hands the
//! blobs back; at boot [`Host::open`] reads the records of every blob.
//!
//! # The CA
//! The CA key is derived from the host secret and `vtpm.seed` together.
//! A first boot (no blob carries a record) makes a random secret and seals
//! it to PCR 12; a CTVM built or configured differently cannot unseal it,
//! so it cannot issue under that CA. When the records' secret does not
//! unseal, no certificate is issued and no durable vTPM starts: nothing
//! falls back to a new CA while old blobs are presented. Removing every
//! blob starts a new host (a new CA, printed when it first issues).
//!
//! # Freshness of every guest
//! The counter holds the sequence number of the newest committed table.
//! At boot the authentic tables whose sequence is not below the counter
//! are merged (the higher version per guest); none: a blob was rolled back
//! or withheld, and no durable vTPM starts. Each guest's blob must carry an
//! authentic record under this host's secret and a version not below its
//! entry.
//!
//! One table is out at a time: while a guest's store service holds a blob
//! whose table is not committed, another guest's store service is told
//! nothing waits (its change stays held). So every committed sequence
//! number names one table, and each committed table holds every earlier
//! commit. As in `vtpm_trust::durability`, the first table of a boot is a
//! fence two steps above the counter (a previous boot may have left one
//! uncommitted table one step above), and a table handed out and never
//! committed (its guest stopped) is skipped over in the same way. The
//! counter moves one step at a time up to the table's sequence, after the
//! store service reported the blob written: a cut leaves either the old
//! table or the new one committed, both on disk.
//!
//! Known limit: a guest whose store service takes a blob and never reports
//! it holds the other guests' durable changes (answered TPM_RETRY, never
//! lost) until it reports or stops.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use sha2::{Digest, Sha256};
use spin::Mutex;
use vtpm_trust::table::{TableKey, VersionTable};
use zeroize::Zeroizing;

use super::anchor::{AnchorError, PlatformSeal, RollbackAnchor, PLATFORM_SEALED};

/// What a host record starts with.
pub const HOST_RECORD: &[u8; 8] = b"CTVMHST1";

/// How far one commit may move the counter (the fence, plus tables handed
/// out and never committed).
const MAX_STEPS: u64 = 8;

/// Why the host's secret or table cannot be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError {
    /// The platform TPM would not unseal the secret the blobs carry.
    Unseal(String),
    /// The platform TPM could not seal a new secret.
    Seal(String),
    /// The platform counter could not be read.
    Counter(String),
    /// The newest authentic table is older than the counter.
    Stale { seq: u64, counter: u64 },
    /// The secret unsealed, and no table handed over authenticates under it.
    NoTable,
}

impl core::fmt::Display for HostError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HostError::Unseal(e) => write!(
                f,
                "the host secret sealed to the platform TPM would not unseal ({e}): CTVM's measured configuration changed, or the blobs are another machine's"
            ),
            HostError::Seal(e) => write!(f, "the platform TPM could not seal a new host secret ({e})"),
            HostError::Counter(e) => write!(f, "the platform counter cannot be read ({e})"),
            HostError::NoTable => f.write_str(
                "no version table handed over authenticates under the unsealed host secret: the blobs were edited",
            ),
            HostError::Stale { seq, counter } => write!(
                f,
                "the newest version table handed over (sequence {seq}) is older than the platform counter ({counter}): a state blob was rolled back or withheld"
            ),
        }
    }
}

/// The host secret and its sealed form.
struct Secret {
    secret: Zeroizing<[u8; 32]>,
    sealed: Vec<u8>,
    key: TableKey,
}

struct Inner<S: PlatformSeal> {
    chip: S,
    seed: Zeroizing<[u8; 32]>,
    secret: Result<Secret, HostError>,
    /// The committed table; its `seq` is the counter's value.
    table: Result<VersionTable, HostError>,
    /// The highest sequence handed out this boot (the next is above it,
    /// and at least two above the counter at boot).
    reserved: u64,
    /// The guest whose table is out, with its version and sequence.
    out: Option<(String, u64, u64)>,
    /// A new secret was made at this boot.
    fresh: bool,
}

/// The host's shared vTPM roots. Cloning shares them.
pub struct Host<S: PlatformSeal> {
    inner: Arc<Mutex<Inner<S>>>,
}

impl<S: PlatformSeal> Clone for Host<S> {
    fn clone(&self) -> Self {
        Host { inner: self.inner.clone() }
    }
}

/// The host record at the front of `bytes` (after the sealed state key):
/// the sealed secret and the table with what follows it.
fn split_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = bytes.strip_prefix(HOST_RECORD)?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let sealed = rest.get(2..2 + len)?;
    Some((sealed, &rest[2 + len..]))
}

/// What follows the platform-sealed state key of a blob file.
fn after_state_key(file: &[u8]) -> Option<&[u8]> {
    let rest = file.strip_prefix(PLATFORM_SEALED)?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    rest.get(2 + len..)
}

impl<S: PlatformSeal> Host<S> {
    /// Reads the host records of every blob GRUB handed over (`files`, any
    /// guest's, any format), unseals the secret and merges the tables; a
    /// first boot makes and seals a new secret. Never panics on bad blobs:
    /// a record that does not parse or authenticate is left out.
    pub fn open(chip: S, seed: [u8; 32], files: &[&[u8]], entropy: &mut dyn FnMut(&mut [u8])) -> Self {
        let counter = chip.counter(false).map_err(HostError::Counter);
        let records: Vec<(&[u8], &[u8])> =
            files.iter().filter_map(|f| after_state_key(f)).filter_map(split_record).collect();
        let mut fresh = false;
        let (secret, table) = if records.is_empty() {
            fresh = true;
            let mut secret = Zeroizing::new([0u8; 32]);
            entropy(secret.as_mut());
            let sealed = chip.seal(&secret).map_err(HostError::Seal);
            let secret = sealed.map(|sealed| Secret { key: TableKey::derive(&secret), secret, sealed });
            let table = counter.map(|seq| VersionTable { seq, entries: BTreeMap::new() });
            (secret, table)
        } else {
            Self::unseal_and_merge(&chip, counter, &records)
        };
        let reserved = table.as_ref().map_or(0, |t| t.seq.saturating_add(1));
        let inner = Inner { chip, seed: Zeroizing::new(seed), secret, table, reserved, out: None, fresh };
        Host { inner: Arc::new(Mutex::new(inner)) }
    }

    /// The secret whose tables reach the highest sequence, and the merge of
    /// its tables not below the counter.
    fn unseal_and_merge(
        chip: &S,
        counter: Result<u64, HostError>,
        records: &[(&[u8], &[u8])],
    ) -> (Result<Secret, HostError>, Result<VersionTable, HostError>) {
        let mut error = None;
        let mut best: Option<(Secret, Vec<VersionTable>)> = None;
        let mut tried: Vec<&[u8]> = Vec::new();
        for (sealed, _) in records {
            if tried.contains(sealed) {
                continue;
            }
            tried.push(sealed);
            let secret = match chip.unseal(sealed) {
                Ok(s) => Zeroizing::new(s),
                Err(e) => {
                    error = Some(HostError::Unseal(e));
                    continue;
                }
            };
            let key = TableKey::derive(&secret);
            let tables: Vec<VersionTable> = records
                .iter()
                .filter(|(s, _)| s == sealed)
                .filter_map(|(_, t)| VersionTable::open(&key, t).ok().map(|(t, _)| t))
                .collect();
            let top = tables.iter().map(|t| t.seq).max();
            if top.is_none() && error.is_none() {
                error = Some(HostError::NoTable);
            }
            if top.is_some() && top > best.as_ref().and_then(|(_, b)| b.iter().map(|t| t.seq).max()) {
                best = Some((Secret { secret, sealed: sealed.to_vec(), key }, tables));
            }
        }
        let Some((secret, tables)) = best else {
            let e = error.unwrap_or(HostError::NoTable);
            return (Err(e.clone()), Err(e));
        };
        let table = counter.and_then(|counter| {
            let top = tables.iter().map(|t| t.seq).max().unwrap_or(0);
            if top < counter {
                return Err(HostError::Stale { seq: top, counter });
            }
            let mut merged = VersionTable { seq: counter, entries: BTreeMap::new() };
            tables.iter().filter(|t| t.seq >= counter).for_each(|t| merged.merge(t));
            Ok(merged)
        });
        (Ok(secret), table)
    }

    /// The secret the CA key is derived from: the host secret and the seed
    /// hashed together (a weak entropy source alone gives nothing away).
    pub fn ca_secret(&self) -> Result<Zeroizing<[u8; 32]>, HostError> {
        let inner = self.inner.lock();
        let secret = inner.secret.as_ref().map_err(Clone::clone)?;
        let mut h = Sha256::new_with_prefix(b"CTVM vTPM CA secret, platform-sealed\0");
        h.update(*inner.seed);
        h.update(*secret.secret);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&h.finalize());
        Ok(out)
    }

    /// A guest's anchor in the shared table.
    pub fn anchor(&self, guest: &str) -> TableAnchor<S> {
        TableAnchor { host: self.clone(), guest: guest.into() }
    }

    /// The console line that says what the boot found (once per boot),
    /// and whether it is an error.
    pub fn report(&self) -> (bool, String) {
        let inner = self.inner.lock();
        match (&inner.secret, &inner.table) {
            (Err(e), _) | (_, Err(e)) => (
                true,
                format!("vTPM host roots: {e}; no EK certificate is issued and no durable vTPM starts (removing every state blob starts a new CA)"),
            ),
            (Ok(_), Ok(t)) if inner.fresh => (
                false,
                format!("vTPM host roots: a new CA secret sealed to the platform TPM's measurement of CTVM; version table at counter {}", t.seq),
            ),
            (Ok(_), Ok(t)) => (
                false,
                format!(
                    "vTPM host roots: the CA secret unsealed by the platform TPM; version table of {} guest(s) at counter {}",
                    t.entries.len(),
                    t.seq
                ),
            ),
        }
    }
}

/// One guest's view of the host's version table.
pub struct TableAnchor<S: PlatformSeal> {
    host: Host<S>,
    guest: String,
}

fn anchor_error(e: &HostError) -> AnchorError {
    AnchorError(format!("{e}"))
}

impl<S: PlatformSeal> RollbackAnchor for TableAnchor<S> {
    fn detects_rollback(&self) -> bool {
        true
    }

    fn committed(&mut self, guest: &str) -> Result<Option<u64>, AnchorError> {
        let inner = self.host.inner.lock();
        inner.secret.as_ref().map_err(anchor_error)?;
        Ok(Some(inner.table.as_ref().map_err(anchor_error)?.version(guest)))
    }

    fn strip<'b>(&mut self, _guest: &str, file: &'b [u8]) -> Result<&'b [u8], AnchorError> {
        let inner = self.host.inner.lock();
        let secret = inner.secret.as_ref().map_err(anchor_error)?;
        let (sealed, rest) = split_record(file).ok_or_else(|| AnchorError("it carries no version table".into()))?;
        if sealed != secret.sealed.as_slice() {
            return Err(AnchorError("its version table is under another host secret (an earlier host)".into()));
        }
        let (_, state) = VersionTable::open(&secret.key, rest).map_err(|e| AnchorError(format!("{e}")))?;
        Ok(state)
    }

    fn record(&mut self, guest: &str, version: u64) -> Result<Option<Vec<u8>>, AnchorError> {
        let mut inner = self.host.inner.lock();
        match &inner.out {
            Some((g, v, _)) if g != guest || *v != version => {
                return if g == guest {
                    Err(AnchorError(format!("version {v} of {guest} is out, not {version}")))
                } else {
                    Ok(None)
                };
            }
            _ => {}
        }
        let secret = inner.secret.as_ref().map_err(anchor_error)?;
        let mut table = inner.table.as_ref().map_err(anchor_error)?.clone();
        let seq = match &inner.out {
            Some((_, _, seq)) => *seq,
            None => inner.reserved.saturating_add(1),
        };
        table.seq = seq;
        table.entries.insert(guest.into(), version);
        let sealed_table = table.seal(&secret.key).ok_or_else(|| AnchorError("the version table is full".into()))?;
        let len =
            u16::try_from(secret.sealed.len()).map_err(|_| AnchorError("the sealed secret is too long".into()))?;
        let mut record = HOST_RECORD.to_vec();
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&secret.sealed);
        record.extend_from_slice(&sealed_table);
        inner.reserved = seq;
        inner.out = Some((guest.into(), version, seq));
        Ok(Some(record))
    }

    fn commit(&mut self, guest: &str, version: u64) -> Result<(), AnchorError> {
        let mut inner = self.host.inner.lock();
        let seq = match &inner.out {
            Some((g, v, seq)) if g == guest && *v == version => *seq,
            _ => return Err(AnchorError(format!("no version table out for {guest} version {version}"))),
        };
        let mut value = inner.chip.counter(false).map_err(AnchorError)?;
        if value > seq {
            return Err(AnchorError(format!("the platform counter is at {value}, past sequence {seq}")));
        }
        if seq - value > MAX_STEPS {
            return Err(AnchorError(format!("sequence {seq} is too far above the platform counter ({value})")));
        }
        while value < seq {
            let next = inner.chip.counter(true).map_err(AnchorError)?;
            if next != value + 1 {
                return Err(AnchorError(format!("the platform counter went from {value} to {next}")));
            }
            value = next;
        }
        if let Ok(table) = inner.table.as_mut() {
            table.seq = seq;
            table.entries.insert(guest.into(), version);
        }
        inner.out = None;
        Ok(())
    }
}

impl<S: PlatformSeal> Drop for TableAnchor<S> {
    /// A guest that stops with its table out frees the others; the next
    /// table skips its sequence (it may be on disk, never committed).
    fn drop(&mut self) {
        let mut inner = self.host.inner.lock();
        if inner.out.as_ref().is_some_and(|(g, _, _)| *g == self.guest) {
            inner.out = None;
        }
    }
}
