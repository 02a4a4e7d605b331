//! The measured-launch event log in the TCG PC Client 1.2 ("TCPA") format:
//! a sequence of `TCG_PCR_EVENT` records, each
//!
//! ```text
//! u32 pcrIndex | u32 eventType | u8 digest[20] | u32 eventDataSize | u8 event[eventDataSize]
//! ```
//!
//! little-endian, as Linux reads it through the ACPI TCPA table into
//! `/sys/kernel/security/tpm0/binary_bios_measurements`. The log ends where
//! an all-zero record would start, so its area must be zero past the end.

use alloc::vec::Vec;

/// Event types used by CTVM (TCG PC Client spec, 1.21 table 11).
pub mod event_type {
    pub const NO_ACTION: u32 = 0x03;
    pub const SEPARATOR: u32 = 0x04;
    /// EV_EVENT_TAG: a TCG_PCClientTaggedEvent (taggedEventID, size, data).
    /// CTVM's security-configuration event is one (tag "CTVM").
    pub const EVENT_TAG: u32 = 0x06;
    /// Boot-loader measurements: GRUB uses it for command lines (PCR 8)
    /// and loaded files (PCR 9); so does CTVM.
    pub const IPL: u32 = 0x0d;
}

/// The PCRs CTVM measures a guest into, following GRUB's convention.
pub mod pcr {
    /// Command lines.
    pub const COMMAND_LINE: u32 = 8;
    /// Files: the kernel and the initrd.
    pub const FILES: u32 = 9;
    /// IMA's measurement list (Linux's default IMA PCR).
    pub const IMA: u32 = 10;
    /// CTVM's security configuration (`ctvm.config`), alone in its PCR.
    pub const CONFIG: u32 = 11;
}

pub const DIGEST_SIZE: usize = 20;
const HEADER: usize = 4 + 4 + DIGEST_SIZE + 4;

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub kind: u32,
    pub digest: [u8; DIGEST_SIZE],
    pub data: Vec<u8>,
}

/// The log would not fit its area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogFull;

/// An append-only log with a fixed capacity (the size of its area in guest memory).
#[derive(Clone, Debug)]
pub struct EventLog {
    bytes: Vec<u8>,
    capacity: usize,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog { bytes: Vec::new(), capacity }
    }

    pub fn push(&mut self, event: &Event) -> Result<(), LogFull> {
        let size = HEADER.checked_add(event.data.len()).ok_or(LogFull)?;
        // Keep room for the all-zero terminator record a reader looks for.
        if self.bytes.len() + size + HEADER > self.capacity {
            return Err(LogFull);
        }
        self.bytes.extend_from_slice(&event.pcr.to_le_bytes());
        self.bytes.extend_from_slice(&event.kind.to_le_bytes());
        self.bytes.extend_from_slice(&event.digest);
        self.bytes.extend_from_slice(&(event.data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&event.data);
        Ok(())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Parses a log (for tests and for guests' own checks). Stops at the first
/// all-zero record or the end; a truncated record is an error.
pub fn parse(bytes: &[u8]) -> Result<Vec<Event>, usize> {
    let mut events = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let word = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let (pcr, kind, size) = (word(at), word(at + 4), word(at + 28) as usize);
        if pcr == 0 && kind == 0 && size == 0 {
            break;
        }
        let data = bytes.get(at + HEADER..at + HEADER + size).ok_or(at)?;
        let mut digest = [0u8; DIGEST_SIZE];
        digest.copy_from_slice(&bytes[at + 8..at + 28]);
        events.push(Event { pcr, kind, digest, data: data.to_vec() });
        at += HEADER + size;
    }
    // Less than a header left: fine if it is the zero padding of the area.
    if at + HEADER > bytes.len() && bytes[at..].iter().any(|&b| b != 0) {
        return Err(at);
    }
    Ok(events)
}

/// What the PCRs hold after replaying `events` from all-zero PCRs, with
/// `extend(old, digest) = SHA1(old || digest)` supplied by the caller.
pub fn replay(events: &[Event], sha1: impl Fn(&[u8]) -> [u8; DIGEST_SIZE]) -> [[u8; DIGEST_SIZE]; 24] {
    let mut pcrs = [[0u8; DIGEST_SIZE]; 24];
    for e in events.iter().filter(|e| e.kind != event_type::NO_ACTION) {
        if let Some(p) = pcrs.get_mut(e.pcr as usize) {
            let mut both = [0u8; 2 * DIGEST_SIZE];
            both[..DIGEST_SIZE].copy_from_slice(p);
            both[DIGEST_SIZE..].copy_from_slice(&e.digest);
            *p = sha1(&both);
        }
    }
    pcrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn fake_sha1(data: &[u8]) -> [u8; 20] {
        // Not SHA-1: a stand-in that depends on every byte and on order.
        let mut out = [0u8; 20];
        for (i, b) in data.iter().enumerate() {
            out[i % 20] = out[i % 20].wrapping_mul(31).wrapping_add(*b ^ i as u8);
        }
        out
    }

    fn ev(pcr: u32, digest: u8, data: &[u8]) -> Event {
        Event { pcr, kind: event_type::IPL, digest: [digest; 20], data: data.to_vec() }
    }

    #[test]
    fn records_encode_as_tcg_pcr_event() {
        let mut log = EventLog::new(4096);
        log.push(&ev(9, 0xab, b"kernel")).unwrap();
        let b = log.as_bytes();
        assert_eq!(&b[0..4], &9u32.to_le_bytes());
        assert_eq!(&b[4..8], &0x0du32.to_le_bytes());
        assert_eq!(&b[8..28], &[0xab; 20]);
        assert_eq!(&b[28..32], &6u32.to_le_bytes());
        assert_eq!(&b[32..38], b"kernel");
        assert_eq!(b.len(), 38);
    }

    #[test]
    fn parse_round_trips_and_stops_at_zeros() {
        let mut log = EventLog::new(4096);
        let events = vec![ev(8, 1, b"kernel_cmdline: quiet"), ev(9, 2, b"alpha: kernel"), ev(9, 3, b"")];
        for e in &events {
            log.push(e).unwrap();
        }
        let mut area = log.as_bytes().to_vec();
        area.resize(4096, 0);
        assert_eq!(parse(&area).unwrap(), events);
        // A record cut short is reported, not misread.
        assert!(parse(&log.as_bytes()[..log.as_bytes().len() - 1]).is_err());
    }

    #[test]
    fn capacity_keeps_room_for_the_terminator() {
        let mut log = EventLog::new(2 * HEADER + 4);
        log.push(&ev(8, 1, b"abcd")).unwrap();
        assert_eq!(log.push(&ev(8, 1, b"")), Err(LogFull));
    }

    #[test]
    fn replay_extends_in_order_per_pcr() {
        let events = vec![ev(8, 1, b"a"), ev(9, 2, b"b"), ev(9, 3, b"c")];
        let pcrs = replay(&events, fake_sha1);
        let extend = |old: [u8; 20], d: u8| {
            let mut both = [0u8; 40];
            both[..20].copy_from_slice(&old);
            both[20..].copy_from_slice(&[d; 20]);
            fake_sha1(&both)
        };
        assert_eq!(pcrs[8], extend([0; 20], 1));
        assert_eq!(pcrs[9], extend(extend([0; 20], 2), 3));
        assert_eq!(pcrs[0], [0; 20]);
        // NO_ACTION events are not extended.
        let none = Event { kind: event_type::NO_ACTION, ..ev(8, 9, b"") };
        assert_eq!(replay(&[none], fake_sha1)[8], [0; 20]);
    }
}
