//! The hypervisor-wide version table: the newest committed state version
//! of every durable vTPM of a host, authenticated, so that one monotonic
//! counter (a platform TPM has one CTVM can move: a TPM 1.2 lets only one
//! counter move between two starts) guards every guest against rollback.
//!
//! The table is written in front of every state blob the hypervisor hands
//! a store service, with a sequence number; the counter holds the sequence
//! number of the newest committed table. At boot the hypervisor reads the
//! tables of every blob GRUB handed over, keeps the authentic ones whose
//! sequence is not below the counter, and refuses each guest's blob whose
//! version is below that guest's entry. The protocol around it (one table
//! out at a time, the fence) is the hypervisor's (`tpm::host`); this module
//! is the format: magic, sequence, entries, HMAC-SHA256 over all of it.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// What a table starts with.
pub const MAGIC: &[u8; 8] = b"CTVMTBL1";
/// The HMAC-SHA256 tag at its end.
pub const TAG_LEN: usize = 32;
/// At most this many guests (a host runs a handful).
pub const MAX_ENTRIES: usize = 64;
/// Guest names are 1 to 31 bytes (the hypervisor's `[a-z0-9_-]{1,31}`).
pub const MAX_NAME: usize = 31;

/// Why a table was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    Truncated,
    BadMagic,
    /// A count, a name or the order of the entries is not what
    /// [`VersionTable::seal`] writes.
    Malformed,
    /// The tag does not verify: another host secret, or edited.
    Forged,
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TableError::Truncated => "the version table is truncated",
            TableError::BadMagic => "no version table",
            TableError::Malformed => "the version table is malformed",
            TableError::Forged => "the version table does not authenticate under this host's secret",
        })
    }
}

/// The key the tables are authenticated under, from the host secret.
pub struct TableKey(Zeroizing<[u8; 32]>);

impl TableKey {
    /// HKDF-SHA256(salt = "CTVM version table v1", ikm = secret).
    pub fn derive(host_secret: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"CTVM version table v1"), host_secret);
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(b"hmac-sha256", key.as_mut());
        TableKey(key)
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_ref()) {
            Ok(m) => m,
            Err(_) => return [0; TAG_LEN],
        };
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The committed version of each durable guest, as of sequence `seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionTable {
    pub seq: u64,
    pub entries: BTreeMap<String, u64>,
}

impl VersionTable {
    /// The version committed for `guest`; 0 for a guest never committed.
    pub fn version(&self, guest: &str) -> u64 {
        self.entries.get(guest).copied().unwrap_or(0)
    }

    /// This table, then for each guest the higher of the two versions.
    pub fn merge(&mut self, other: &VersionTable) {
        for (guest, &v) in &other.entries {
            let e = self.entries.entry(guest.clone()).or_insert(0);
            *e = (*e).max(v);
        }
    }

    /// The table's bytes: magic, seq (u64), count (u16), then per guest in
    /// name order its name (u8 length) and version (u64), all big-endian,
    /// and the tag. None for a table [`VersionTable::open`] would refuse.
    pub fn seal(&self, key: &TableKey) -> Option<Vec<u8>> {
        if self.entries.len() > MAX_ENTRIES {
            return None;
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&(self.entries.len() as u16).to_be_bytes());
        for (guest, v) in &self.entries {
            if guest.is_empty() || guest.len() > MAX_NAME {
                return None;
            }
            out.push(guest.len() as u8);
            out.extend_from_slice(guest.as_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
        let tag = key.tag(&out);
        out.extend_from_slice(&tag);
        Some(out)
    }

    /// The table at the front of `bytes`, authenticated, and the bytes
    /// after it.
    pub fn open<'b>(key: &TableKey, bytes: &'b [u8]) -> Result<(VersionTable, &'b [u8]), TableError> {
        let (table, body, tag, rest) = Self::parse(bytes)?;
        let want = key.tag(body);
        // Constant time: the tag is a MAC.
        let diff = want.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(TableError::Forged);
        }
        Ok((table, rest))
    }

    /// How many bytes the table at the front of `bytes` takes, unauthenticated.
    pub fn len_at(bytes: &[u8]) -> Result<usize, TableError> {
        let (_, body, _, _) = Self::parse(bytes)?;
        Ok(body.len() + TAG_LEN)
    }

    #[allow(clippy::type_complexity)]
    fn parse(bytes: &[u8]) -> Result<(VersionTable, &[u8], &[u8], &[u8]), TableError> {
        let take =
            |at: usize, n: usize| at.checked_add(n).and_then(|end| bytes.get(at..end)).ok_or(TableError::Truncated);
        if take(0, MAGIC.len())? != MAGIC {
            return Err(TableError::BadMagic);
        }
        let mut at = MAGIC.len();
        let seq = u64::from_be_bytes(take(at, 8)?.try_into().map_err(|_| TableError::Truncated)?);
        at += 8;
        let count = usize::from(u16::from_be_bytes(take(at, 2)?.try_into().map_err(|_| TableError::Truncated)?));
        at += 2;
        if count > MAX_ENTRIES {
            return Err(TableError::Malformed);
        }
        let mut entries = BTreeMap::new();
        let mut last: Option<&str> = None;
        for _ in 0..count {
            let n = usize::from(take(at, 1)?[0]);
            at += 1;
            if n == 0 || n > MAX_NAME {
                return Err(TableError::Malformed);
            }
            let name = core::str::from_utf8(take(at, n)?).map_err(|_| TableError::Malformed)?;
            at += n;
            // Strictly increasing names: one encoding per table.
            if last.is_some_and(|l| l >= name) {
                return Err(TableError::Malformed);
            }
            last = Some(name);
            let v = u64::from_be_bytes(take(at, 8)?.try_into().map_err(|_| TableError::Truncated)?);
            at += 8;
            entries.insert(String::from(name), v);
        }
        let tag = take(at, TAG_LEN)?;
        Ok((VersionTable { seq, entries }, &bytes[..at], tag, &bytes[at + TAG_LEN..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> VersionTable {
        let mut t = VersionTable { seq: 41, entries: BTreeMap::new() };
        t.entries.insert("alpha".into(), 7);
        t.entries.insert("beta".into(), 12);
        t
    }

    #[test]
    fn a_table_round_trips_and_every_bit_flip_and_truncation_is_refused() {
        let key = TableKey::derive(&[1; 32]);
        let mut bytes = table().seal(&key).unwrap();
        bytes.extend_from_slice(b"state");
        let (back, rest) = VersionTable::open(&key, &bytes).unwrap();
        assert_eq!((back, rest), (table(), &b"state"[..]));
        let len = VersionTable::len_at(&bytes).unwrap();
        assert_eq!(len, bytes.len() - 5);
        for bit in 0..len * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(VersionTable::open(&key, &bad).is_err(), "bit {bit} flipped and accepted");
        }
        for cut in 0..len {
            assert!(VersionTable::open(&key, &bytes[..cut]).is_err(), "truncated to {cut} and accepted");
        }
        assert_eq!(VersionTable::open(&TableKey::derive(&[2; 32]), &bytes), Err(TableError::Forged));
    }

    #[test]
    fn merging_keeps_the_higher_version_of_each_guest() {
        let mut a = table();
        let mut b = VersionTable { seq: 42, entries: BTreeMap::new() };
        b.entries.insert("beta".into(), 9);
        b.entries.insert("gamma".into(), 1);
        a.merge(&b);
        assert_eq!((a.version("alpha"), a.version("beta"), a.version("gamma"), a.version("delta")), (7, 12, 1, 0));
    }
}
