//! The measurement logs a guest hands over: the TCG 1.2 event log
//! (`binary_bios_measurements`, as CTVM writes it) and IMA's ASCII list
//! (`ascii_runtime_measurements`). Both are parsed here independently of
//! the hypervisor's own code, and replayed into PCR values.

use crate::tpm::{hex, hex_decode, sha1, Digest20};

/// EV_NO_ACTION: logged, never extended.
pub const EV_NO_ACTION: u32 = 0x03;
/// EV_IPL: CTVM's (and GRUB's) kernel, initrd and command line events.
pub const EV_IPL: u32 = 0x0d;
/// EV_EVENT_TAG: CTVM's security-configuration event.
pub const EV_EVENT_TAG: u32 = 0x06;
/// taggedEventID of the configuration event ("CTVM").
pub const CONFIG_TAG: u32 = 0x4354_564D;
/// The PCR of the configuration event.
pub const PCR_CONFIG: u32 = 11;
/// IMA's PCR.
pub const PCR_IMA: u32 = 10;

/// One TCG_PCR_EVENT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub kind: u32,
    pub digest: Digest20,
    pub data: Vec<u8>,
}

/// Parses a binary log: little-endian TCG_PCR_EVENT records up to the end
/// or to an all-zero record (the zero padding of the log area).
pub fn parse_event_log(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 32 {
        let word = |o: usize| u32::from_le_bytes(bytes[at + o..at + o + 4].try_into().unwrap());
        let (pcr, kind, size) = (word(0), word(4), word(28) as usize);
        if pcr == 0 && kind == 0 && size == 0 && bytes[at + 8..at + 28].iter().all(|b| *b == 0) {
            break;
        }
        if pcr > 23 {
            return Err(format!("event {} names PCR {pcr}", events.len()));
        }
        let data = bytes
            .get(at + 32..at.checked_add(32 + size).ok_or("event size overflows")?)
            .ok_or(format!("event {} is cut short", events.len()))?;
        events.push(Event { pcr, kind, digest: bytes[at + 8..at + 28].try_into().unwrap(), data: data.to_vec() });
        at += 32 + size;
    }
    if bytes[at..].iter().any(|b| *b != 0) {
        return Err(format!("{} bytes after the last event are not padding", bytes.len() - at));
    }
    Ok(events)
}

/// PCR values after extending `digests` (per PCR, in order) from zero.
pub fn replay(digests: impl Iterator<Item = (u32, Digest20)>) -> [Digest20; 24] {
    let mut pcrs = [[0u8; 20]; 24];
    for (pcr, d) in digests {
        let p = &mut pcrs[pcr as usize];
        *p = sha1(&[&p[..], &d]);
    }
    pcrs
}

/// The event log's replay (NO_ACTION events are not extended).
pub fn replay_events(events: &[Event]) -> [Digest20; 24] {
    replay(events.iter().filter(|e| e.kind != EV_NO_ACTION).map(|e| (e.pcr, e.digest)))
}

/// The text of a CTVM configuration event, if `e` is one.
pub fn config_text(e: &Event) -> Option<&str> {
    if e.kind != EV_EVENT_TAG || e.data.len() < 8 {
        return None;
    }
    let tag = u32::from_le_bytes(e.data[..4].try_into().ok()?);
    let len = u32::from_le_bytes(e.data[4..8].try_into().ok()?) as usize;
    if tag != CONFIG_TAG || e.data.len() != 8 + len {
        return None;
    }
    std::str::from_utf8(&e.data[8..]).ok()
}

/// One line of IMA's ASCII list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImaEntry {
    pub pcr: u32,
    pub template_hash: Digest20,
    pub template: String,
    /// The file's digest as the line shows it (`sha1:…` for ima-ng).
    pub file_digest: Vec<u8>,
    pub file_algo: String,
    pub path: String,
    /// ima-sig's signature field (empty when the file is unsigned, and
    /// then not printed).
    pub signature: Vec<u8>,
}

impl ImaEntry {
    /// The template data's hash, recomputed from the fields shown: this
    /// binds the digest and path the allow-list looks at to what was
    /// extended into the PCR. `ima-ng`: SHA1 of the length-prefixed
    /// (little-endian u32) fields `algo ":" NUL digest` and `path NUL`;
    /// `ima-sig`: the same and the length-prefixed signature;
    /// `ima`: SHA1 of the 20-byte digest and the path padded to 256 bytes.
    pub fn computed_template_hash(&self) -> Result<Digest20, String> {
        match self.template.as_str() {
            "ima-ng" | "ima-sig" => {
                let mut d = format!("{}:", self.file_algo).into_bytes();
                d.push(0);
                d.extend_from_slice(&self.file_digest);
                let mut n = self.path.clone().into_bytes();
                n.push(0);
                let sig_len = (self.signature.len() as u32).to_le_bytes();
                let sig: [&[u8]; 2] = [&sig_len, &self.signature];
                let tail: &[&[u8]] = if self.template == "ima-sig" { &sig } else { &[] };
                let (dl, nl) = ((d.len() as u32).to_le_bytes(), (n.len() as u32).to_le_bytes());
                let mut parts: Vec<&[u8]> = vec![&dl, &d, &nl, &n];
                parts.extend_from_slice(tail);
                Ok(sha1(&parts))
            }
            "ima" => {
                let mut name = self.path.clone().into_bytes();
                if name.len() > 255 {
                    return Err(format!("IMA path longer than the ima template allows: {}", self.path));
                }
                name.resize(256, 0);
                Ok(sha1(&[&self.file_digest, &name]))
            }
            t => Err(format!("IMA template {t:?} is not supported (ima-ng and ima are)")),
        }
    }

    /// What is extended into the PCR: the template hash, or all-ones for
    /// a violation (an all-zero template hash), as Linux does for TPM 1.2.
    pub fn extended(&self) -> Digest20 {
        if self.template_hash == [0; 20] {
            [0xff; 20]
        } else {
            self.template_hash
        }
    }
}

/// Parses `ascii_runtime_measurements`: `PCR template-hash template
/// file-digest path` per line (ima-ng digests carry `algo:`).
pub fn parse_ima(text: &str) -> Result<Vec<ImaEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| format!("IMA line {}: {what}: {line:?}", i + 1);
        let mut f = line.splitn(5, ' ');
        let pcr: u32 = f.next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("no PCR"))?;
        let th: Digest20 = f
            .next()
            .and_then(|s| hex_decode(s).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("no template hash"))?;
        let template = f.next().ok_or_else(|| bad("no template"))?.to_string();
        let digest = f.next().ok_or_else(|| bad("no file digest"))?;
        let mut path = f.next().ok_or_else(|| bad("no path"))?.to_string();
        // ima-sig prints a signature after the path when the file has one.
        let mut signature = Vec::new();
        if template == "ima-sig" {
            if let Some((p, sig)) = path.rsplit_once(' ') {
                if let Ok(s) = hex_decode(sig) {
                    signature = s;
                    path = p.to_string();
                }
            }
        }
        let (algo, hexd) = match digest.split_once(':') {
            Some((a, d)) => (a.to_string(), d),
            None => ("sha1".to_string(), digest),
        };
        let file_digest = hex_decode(hexd).map_err(|_| bad("file digest is not hex"))?;
        if pcr > 23 {
            return Err(bad("PCR out of range"));
        }
        out.push(ImaEntry { pcr, template_hash: th, template, file_digest, file_algo: algo, path, signature });
    }
    Ok(out)
}

/// An ima-ng line for `path` with file digest `digest` (SHA-1), for tests
/// and for building allow-lists from a reference system.
pub fn ima_ng_line(digest: &Digest20, path: &str) -> String {
    let mut e = ImaEntry {
        pcr: PCR_IMA,
        template_hash: [0; 20],
        template: "ima-ng".into(),
        file_digest: digest.to_vec(),
        file_algo: "sha1".into(),
        path: path.into(),
        signature: Vec::new(),
    };
    e.template_hash = e.computed_template_hash().unwrap();
    format!("10 {} ima-ng sha1:{} {}", hex(&e.template_hash), hex(digest), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pcr: u32, kind: u32, digest: u8, data: &[u8]) -> Vec<u8> {
        let mut v = pcr.to_le_bytes().to_vec();
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&[digest; 20]);
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn event_logs_parse_to_the_padding_and_refuse_garbage() {
        let mut log = record(9, EV_IPL, 1, b"kernel");
        log.extend(record(8, EV_IPL, 2, b"kernel_cmdline"));
        let n = log.len();
        log.resize(n + 100, 0);
        let events = parse_event_log(&log).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].data, b"kernel_cmdline");
        log[n + 50] = 1;
        assert!(parse_event_log(&log).is_err(), "garbage after the log");
        assert!(parse_event_log(&log[..n - 1]).is_err(), "a record cut short");
    }

    #[test]
    fn template_hashes_match_linux() {
        // Lines of the Debian 6.1 cloud kernel's list under CTVM (scenario
        // linux-tpm, ima_policy=tcb: template ima-sig, SHA-256 files).
        let lines = "10 d4db23d50c0e51c7eeb879ca78d6a650acb11648 ima-sig sha1:9797edf8d0eed36b1cf92547816051c8af4e45ee boot_aggregate
10 b88f5f8d2685d61aa9c78d801cca1a569175e80e ima-sig sha256:f42e04c3444c46fca4cd711585ffa181b6b413bbcab2bed562272e3eb6bdb7c9 /lib/ctvm/atk_agent.ko";
        for e in parse_ima(lines).unwrap() {
            assert_eq!(e.computed_template_hash().unwrap(), e.template_hash, "{}", e.path);
        }
        let built = ima_ng_line(&[0x11; 20], "/usr/bin/true");
        let e = &parse_ima(&built).unwrap()[0];
        assert_eq!(e.computed_template_hash().unwrap(), e.template_hash);
    }
}
