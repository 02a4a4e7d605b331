//! The TCG crypto-agile event log (TCG PC Client Platform Firmware Profile,
//! 10.2): one SHA-1-format header event (`Spec ID Event03`, listing the
//! algorithms), then `TCG_PCR_EVENT2` records with one digest per bank.
//! Integers are little-endian, as in every TCG log.

use alloc::vec::Vec;

use super::super::Reader;
use super::tpm2::digest_size;
use crate::tpm::event_log::{event_type, LogFull};

const SPEC_ID: &[u8; 16] = b"Spec ID Event03\0";

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub kind: u32,
    /// (algorithm, digest), in the header's algorithm order.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

/// An append-only crypto-agile log with a fixed capacity.
pub struct AgileLog {
    bytes: Vec<u8>,
    algs: Vec<u16>,
    capacity: usize,
}

impl AgileLog {
    /// A log for the banks `algs` (each must have a known digest size).
    pub fn new(algs: &[u16], capacity: usize) -> Self {
        let mut spec = Vec::new();
        spec.extend_from_slice(SPEC_ID);
        spec.extend_from_slice(&0u32.to_le_bytes()); // platform class: client
        spec.extend_from_slice(&[0, 2, 0, 2]); // version 2.0, errata 0, UINTN of 8 bytes
        spec.extend_from_slice(&(algs.len() as u32).to_le_bytes());
        for &a in algs {
            spec.extend_from_slice(&a.to_le_bytes());
            spec.extend_from_slice(&(digest_size(a).unwrap_or(0) as u16).to_le_bytes());
        }
        spec.push(0); // no vendor information
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&event_type::NO_ACTION.to_le_bytes());
        bytes.extend_from_slice(&[0; 20]);
        bytes.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&spec);
        AgileLog { bytes, algs: algs.to_vec(), capacity }
    }

    /// Appends a record; `digests` must hold one digest per bank, in order.
    pub fn push(&mut self, e: &Event) -> Result<(), LogFull> {
        let in_order = e.digests.iter().map(|(a, _)| *a).eq(self.algs.iter().copied());
        let sizes_ok = e.digests.iter().all(|(a, d)| digest_size(*a) == Some(d.len()));
        if !in_order || !sizes_ok {
            return Err(LogFull);
        }
        let size = 12 + e.digests.iter().map(|(_, d)| 2 + d.len()).sum::<usize>() + 4 + e.data.len();
        if self.bytes.len() + size > self.capacity {
            return Err(LogFull);
        }
        self.bytes.extend_from_slice(&e.pcr.to_le_bytes());
        self.bytes.extend_from_slice(&e.kind.to_le_bytes());
        self.bytes.extend_from_slice(&(e.digests.len() as u32).to_le_bytes());
        for (a, d) in &e.digests {
            self.bytes.extend_from_slice(&a.to_le_bytes());
            self.bytes.extend_from_slice(d);
        }
        self.bytes.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&e.data);
        Ok(())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A parsed log: the header's algorithms (id, digest size), the records.
pub type Parsed = (Vec<(u16, u16)>, Vec<Event>);

/// Parses a log. `Err(offset)` at the first record that does not parse.
pub fn parse(b: &[u8]) -> Result<Parsed, usize> {
    let spec_size = Reader(b).u32(28).ok_or(0usize)? as usize;
    let spec = b.get(32..32 + spec_size).ok_or(0usize)?;
    if spec.get(..16) != Some(SPEC_ID) {
        return Err(0);
    }
    let n = Reader(spec).u32(24).ok_or(0usize)? as usize;
    let mut algs = Vec::new();
    for i in 0..n.min(8) {
        algs.push((Reader(spec).u16(28 + 4 * i).ok_or(0usize)?, Reader(spec).u16(30 + 4 * i).ok_or(0usize)?));
    }
    let mut events = Vec::new();
    let mut at = 32 + spec_size;
    while at < b.len() {
        let start = at;
        let pcr = Reader(b).u32(at).ok_or(start)?;
        let kind = Reader(b).u32(at + 4).ok_or(start)?;
        let count = Reader(b).u32(at + 8).ok_or(start)? as usize;
        at += 12;
        let mut digests = Vec::new();
        for _ in 0..count.min(8) {
            let a = Reader(b).u16(at).ok_or(start)?;
            let size = usize::from(algs.iter().find(|(x, _)| *x == a).ok_or(start)?.1);
            digests.push((a, b.get(at + 2..at + 2 + size).ok_or(start)?.to_vec()));
            at += 2 + size;
        }
        let size = Reader(b).u32(at).ok_or(start)? as usize;
        let data = b.get(at + 4..at + 4 + size).ok_or(start)?.to_vec();
        at += 4 + size;
        events.push(Event { pcr, kind, digests, data });
    }
    Ok((algs, events))
}

#[cfg(test)]
mod tests {
    use super::super::tpm2::{alg, digest};
    use super::*;

    fn event(pcr: u32, text: &[u8]) -> Event {
        Event {
            pcr,
            kind: event_type::IPL,
            digests: alloc::vec![
                (alg::SHA1, digest(alg::SHA1, text).unwrap()),
                (alg::SHA256, digest(alg::SHA256, text).unwrap())
            ],
            data: text.to_vec(),
        }
    }

    #[test]
    fn header_and_records_follow_the_profile() {
        let mut log = AgileLog::new(&[alg::SHA1, alg::SHA256], 4096);
        let b = log.as_bytes().to_vec();
        // TCG_PCR_EVENT: PCR 0, EV_NO_ACTION, zero digest; then the Spec ID event.
        assert_eq!(&b[..8], &[0, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&b[8..28], &[0; 20]);
        assert_eq!(&b[32..48], b"Spec ID Event03\0");
        assert_eq!(&b[52..56], &[0, 2, 0, 2]);
        assert_eq!(&b[56..60], &2u32.to_le_bytes());
        assert_eq!(&b[60..68], &[4, 0, 20, 0, 0x0b, 0, 32, 0]);
        log.push(&event(12, b"ctvm.cmdline x")).unwrap();
        let (algs, events) = parse(log.as_bytes()).unwrap();
        assert_eq!(algs, [(alg::SHA1, 20), (alg::SHA256, 32)]);
        assert_eq!(events, [event(12, b"ctvm.cmdline x")]);
    }

    #[test]
    fn records_must_carry_every_bank_in_order() {
        let mut log = AgileLog::new(&[alg::SHA1, alg::SHA256], 4096);
        let mut e = event(12, b"x");
        e.digests.reverse();
        assert_eq!(log.push(&e), Err(LogFull));
        e.digests.truncate(1);
        assert_eq!(log.push(&e), Err(LogFull));
        let mut e = event(12, b"x");
        e.digests[1].1.pop();
        assert_eq!(log.push(&e), Err(LogFull));
        let mut small = AgileLog::new(&[alg::SHA1, alg::SHA256], 120);
        assert_eq!(small.push(&event(12, b"too much for the area")), Err(LogFull));
    }

    #[test]
    fn truncated_logs_do_not_parse() {
        let mut log = AgileLog::new(&[alg::SHA256], 4096);
        let e =
            Event { digests: alloc::vec![(alg::SHA256, digest(alg::SHA256, b"abc").unwrap())], ..event(12, b"abc") };
        log.push(&e).unwrap();
        let b = log.as_bytes();
        for cut in 1..b.len() {
            if let Ok((_, events)) = parse(&b[..cut]) {
                assert!(events.is_empty(), "a cut record must not parse ({cut})");
            }
        }
    }
}
