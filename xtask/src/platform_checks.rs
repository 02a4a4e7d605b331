//! Checks of the platform-TPM scenarios, written independently of the
//! hypervisor's code: the harness parses CTVM's event log itself,
//! recomputes every digest from the files and command lines on the ISO,
//! replays the log, and compares the result with the PCR values libtpms
//! itself returned (swtpm's log of every command and response), not only
//! with what CTVM printed.

use std::collections::BTreeMap;

use sha2::Digest;

use crate::emulator::RunOutput;
use crate::scenarios::{hex, unhex};

const SHA1: u16 = 0x0004;
const SHA256: u16 = 0x000b;
const SHA384: u16 = 0x000c;
const SHA512: u16 = 0x000d;
const EV_SEPARATOR: u32 = 4;
const EV_NO_ACTION: u32 = 3;

fn hash(alg: u16, data: &[u8]) -> Option<Vec<u8>> {
    Some(match alg {
        SHA1 => sha1_smol::Sha1::from(data).digest().bytes().to_vec(),
        SHA256 => sha2::Sha256::digest(data).to_vec(),
        SHA384 => sha2::Sha384::digest(data).to_vec(),
        SHA512 => sha2::Sha512::digest(data).to_vec(),
        _ => return None,
    })
}

struct Event {
    pcr: u32,
    kind: u32,
    digests: Vec<(u16, Vec<u8>)>,
    data: Vec<u8>,
}

fn le32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4).map(|x| u32::from_le_bytes(x.try_into().unwrap())).ok_or(format!("log cut at {at}"))
}

fn le16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2).map(|x| u16::from_le_bytes(x.try_into().unwrap())).ok_or(format!("log cut at {at}"))
}

/// A crypto-agile log (TPM 2.0): the Spec ID header's banks, then events.
fn parse_agile(b: &[u8]) -> Result<(Vec<u16>, Vec<Event>), String> {
    if le32(b, 4)? != EV_NO_ACTION || b.get(32..48) != Some(b"Spec ID Event03\0") {
        return Err("no Spec ID Event03 header".into());
    }
    let spec_size = le32(b, 28)? as usize;
    let n = le32(b, 32 + 24)? as usize;
    let mut banks = Vec::new();
    let mut sizes = BTreeMap::new();
    for i in 0..n {
        let alg = le16(b, 32 + 28 + 4 * i)?;
        sizes.insert(alg, le16(b, 32 + 30 + 4 * i)? as usize);
        banks.push(alg);
    }
    let mut at = 32 + spec_size;
    let mut events = Vec::new();
    while at < b.len() {
        let (pcr, kind, count) = (le32(b, at)?, le32(b, at + 4)?, le32(b, at + 8)?);
        at += 12;
        let mut digests = Vec::new();
        for _ in 0..count {
            let alg = le16(b, at)?;
            let size = *sizes.get(&alg).ok_or(format!("digest of an algorithm {alg:#x} not in the header"))?;
            digests.push((alg, b.get(at + 2..at + 2 + size).ok_or("log cut in a digest")?.to_vec()));
            at += 2 + size;
        }
        let size = le32(b, at)? as usize;
        let data = b.get(at + 4..at + 4 + size).ok_or("log cut in event data")?.to_vec();
        at += 4 + size;
        events.push(Event { pcr, kind, digests, data });
    }
    Ok((banks, events))
}

/// A TPM 1.2 (SHA-1) log.
fn parse_sha1(b: &[u8]) -> Result<Vec<Event>, String> {
    let mut at = 0;
    let mut events = Vec::new();
    while at + 32 <= b.len() {
        let (pcr, kind) = (le32(b, at)?, le32(b, at + 4)?);
        let digest = b[at + 8..at + 28].to_vec();
        let size = le32(b, at + 28)? as usize;
        let data = b.get(at + 32..at + 32 + size).ok_or("log cut in event data")?.to_vec();
        events.push(Event { pcr, kind, digests: vec![(SHA1, digest)], data });
        at += 32 + size;
    }
    if at != b.len() {
        return Err("trailing bytes after the last event".into());
    }
    Ok(events)
}

/// One event the log must hold: (PCR, description, the measured bytes).
type Expected = (u32, Vec<u8>, Vec<u8>);

/// What the log must say, computed from the ISO, in CTVM's documented order.
fn expected_events(out: &RunOutput) -> Result<Vec<Expected>, String> {
    let name = out.dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let iso = crate::util::work_dir().join("iso").join(format!("{name}-qemu-tcg")).join("boot");
    let cfg = std::fs::read_to_string(iso.join("grub/grub.cfg")).map_err(|e| e.to_string())?;
    let mut hv_args = None;
    let mut modules: Vec<(Vec<u8>, String)> = Vec::new();
    for l in cfg.lines().map(str::trim) {
        let Some(rest) =
            ["multiboot2 /boot/", "module2 /boot/", "module /boot/"].iter().find_map(|p| l.strip_prefix(p))
        else {
            continue;
        };
        let (file, args) = rest.split_once(' ').unwrap_or((rest, ""));
        if file == "ctvm.elf" || file == "ctvm32.elf" {
            hv_args = Some(args.trim().to_string());
            continue;
        }
        modules.push((std::fs::read(iso.join(file)).map_err(|e| format!("{file}: {e}"))?, args.to_string()));
    }
    let hv_args = hv_args.ok_or("no hypervisor line in grub.cfg")?;
    let mut want = vec![(12, format!("ctvm.cmdline {hv_args}").into_bytes(), hv_args.clone().into_bytes())];
    for (bytes, args) in &modules {
        match args.trim() {
            "ctvm.policy" => want.push((12, b"ctvm.policy".to_vec(), bytes.clone())),
            "ctvm.api" => want.push((12, b"ctvm.api".to_vec(), bytes.clone())),
            "vtpm.seed" => want.push((12, b"vtpm.seed".to_vec(), bytes.clone())),
            _ => {}
        }
    }
    want.push((12, vec![0; 4], vec![0; 4]));
    for (bytes, args) in modules.iter().filter(|(_, a)| a.split("--").next().unwrap_or("").contains("guest=")) {
        let (options, guest_args) = args.split_once(" -- ").map_or((args.as_str(), ""), |(o, a)| (o, a));
        let name = options.split_whitespace().find_map(|w| w.strip_prefix("guest=")).ok_or("no guest name")?;
        want.push((13, format!("ctvm.guest {name} kernel").into_bytes(), bytes.clone()));
        if let Some((initrd, _)) = modules.iter().find(|(_, a)| a.trim() == format!("initrd={name}")) {
            want.push((13, format!("ctvm.guest {name} initrd").into_bytes(), initrd.clone()));
        }
        let guest_args = guest_args.trim();
        want.push((13, format!("ctvm.guest {name} cmdline {guest_args}").into_bytes(), guest_args.as_bytes().to_vec()));
        let options = options.trim();
        want.push((13, format!("ctvm.guest {name} config {options}").into_bytes(), options.as_bytes().to_vec()));
    }
    want.push((13, vec![0; 4], vec![0; 4]));
    Ok(want)
}

/// Every (command, response) swtpm logged: each I/O line is followed by
/// hex lines holding its bytes.
fn exchanges(log: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut packets: Vec<(bool, Vec<u8>)> = Vec::new();
    for line in log.lines() {
        let t = line.trim();
        if t.starts_with("SWTPM_IO_Read:") {
            packets.push((true, Vec::new()));
        } else if t.starts_with("SWTPM_IO_Write:") {
            packets.push((false, Vec::new()));
        } else if let Some((_, bytes)) = packets.last_mut() {
            let parsed: Option<Vec<u8>> = t.split_whitespace().map(|h| u8::from_str_radix(h, 16).ok()).collect();
            match parsed {
                Some(p) if !t.is_empty() && t.split_whitespace().all(|h| h.len() == 2) => bytes.extend(p),
                _ => {}
            }
        }
    }
    packets
        .windows(2)
        .filter_map(|pair| match pair {
            [(true, cmd), (false, rsp)] => Some((cmd.clone(), rsp.clone())),
            _ => None,
        })
        .collect()
}

/// The PCR values libtpms returned to PCR_Read commands, from swtpm's
/// log: (PCR, bank) -> value, the last read of each.
fn pcrs_libtpms_returned(log: &str, tpm2: bool) -> BTreeMap<(u32, u16), Vec<u8>> {
    let mut out = BTreeMap::new();
    for (cmd, rsp) in exchanges(log) {
        if tpm2 && cmd.get(6..10) == Some(&[0, 0, 1, 0x7e]) && rsp.get(6..10) == Some(&[0, 0, 0, 0]) {
            // selection: count, alg, size, bitmap
            let Some(alg) = cmd.get(14..16).map(|a| u16::from_be_bytes([a[0], a[1]])) else { continue };
            let Some(bitmap) = cmd.get(17..20) else { continue };
            let pcrs: Vec<u32> = (0..24).filter(|p| bitmap[*p as usize / 8] & (1 << (p % 8)) != 0).collect();
            // updateCounter, selection out (count + entries of 6 bytes), digest count, digests.
            let mut at = 10 + 4;
            let count = rsp.get(at..at + 4).map_or(0, |c| u32::from_be_bytes(c.try_into().unwrap())) as usize;
            at += 4 + 6 * count + 4;
            for p in pcrs {
                let Some(size) = rsp.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize) else { break };
                if let Some(v) = rsp.get(at + 2..at + 2 + size) {
                    out.insert((p, alg), v.to_vec());
                }
                at += 2 + size;
            }
        } else if !tpm2 && cmd.get(6..10) == Some(&[0, 0, 0, 0x15]) && rsp.get(6..10) == Some(&[0, 0, 0, 0]) {
            let Some(p) = cmd.get(10..14).map(|b| u32::from_be_bytes(b.try_into().unwrap())) else { continue };
            if let Some(v) = rsp.get(10..30) {
                out.insert((p, SHA1), v.to_vec());
            }
        }
    }
    out
}

/// On a TPM 1.2 the state key crossed the bus only encrypted: the chip saw
/// no TPM_Seal or TPM_Unseal of its own, only inside transport sessions
/// established with encryption (TPM_TRANSPORT_ENCRYPT, MGF1), and at least
/// one such session carried a command through.
pub fn platform_tpm12_seals_wrapped(out: &RunOutput) -> Result<(), String> {
    if !out.hypervisor().contains("platform TPM 1.2") {
        return Ok(());
    }
    let ordinal = |c: &[u8]| c.get(6..10).map_or(0, |o| u32::from_be_bytes([o[0], o[1], o[2], o[3]]));
    let mut wrapped = 0;
    for (cmd, rsp) in exchanges(&out.tpm_log) {
        match ordinal(&cmd) {
            o @ (0x17 | 0x18) => return Err(format!("ordinal {o:#x} reached the chip outside a transport session")),
            // encHandle, then TPM_TRANSPORT_PUBLIC: tag, attributes, algId.
            0xe6 if cmd.get(16..20) != Some(&[0, 0, 0, 1]) || cmd.get(20..24) != Some(&[0, 0, 0, 7]) => {
                return Err("a transport session established without MGF1 encryption".into());
            }
            0xe7 if rsp.get(6..10) == Some(&[0; 4]) => wrapped += 1,
            _ => {}
        }
    }
    match wrapped {
        0 => Err("no command went through an encrypted transport session".into()),
        _ => Ok(()),
    }
}

/// CTVM's measurements landed in the platform PCRs: the log CTVM printed
/// holds exactly the events the ISO calls for, each digest (in every bank)
/// is the hash of the file or text it names, the log replays to what
/// libtpms returned for PCRs 12 and 13, and to what CTVM printed.
pub fn platform_tpm_replays(out: &RunOutput) -> Result<(), String> {
    let hv = out.hypervisor();
    let log: Vec<u8> = hv
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm: debug: platform-log "))
        .filter(|l| !l.starts_with("end"))
        .map(|l| unhex(l.trim()).ok_or("bad hex in the log"))
        .collect::<Result<Vec<Vec<u8>>, _>>()?
        .concat();
    let tpm2 = !hv.contains("platform TPM 1.2");
    let (banks, events) = if tpm2 { parse_agile(&log)? } else { (vec![SHA1], parse_sha1(&log)?) };
    if tpm2 && !banks.contains(&SHA256) {
        return Err(format!("the log's banks {banks:x?} lack SHA-256"));
    }
    let want = expected_events(out)?;
    if events.len() != want.len() {
        return Err(format!("{} events logged, the ISO calls for {}", events.len(), want.len()));
    }
    for (e, (pcr, description, content)) in events.iter().zip(&want) {
        let shown = String::from_utf8_lossy(&e.data);
        if e.pcr != *pcr || &e.data != description {
            return Err(format!(
                "event {shown:?} in PCR {}, expected {:?} in PCR {pcr}",
                e.pcr,
                String::from_utf8_lossy(description)
            ));
        }
        if (e.kind == EV_SEPARATOR) != (content == &vec![0; 4] && description == &vec![0; 4]) {
            return Err(format!("event {shown:?} has type {}", e.kind));
        }
        if e.digests.iter().map(|(a, _)| *a).collect::<Vec<_>>() != banks {
            return Err(format!("event {shown:?} does not carry one digest per bank"));
        }
        for (alg, d) in &e.digests {
            if hash(*alg, content).as_ref() != Some(d) {
                return Err(format!("event {shown:?}: the {alg:#x} digest is not that of the ISO's bytes"));
            }
        }
    }
    // Replay, per bank.
    let mut replayed: BTreeMap<(u32, u16), Vec<u8>> = BTreeMap::new();
    for e in &events {
        for (alg, d) in &e.digests {
            let old = replayed.entry((e.pcr, *alg)).or_insert_with(|| vec![0; d.len()]);
            let mut both = old.clone();
            both.extend_from_slice(d);
            *old = hash(*alg, &both).ok_or("unknown bank")?;
        }
    }
    let chip = pcrs_libtpms_returned(&out.tpm_log, tpm2);
    let printed: BTreeMap<(u32, u16), Vec<u8>> = hv
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm: debug: platform-pcr "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let pcr = w.next()?.parse().ok()?;
            let alg = match w.next()? {
                "sha1" => SHA1,
                "sha256" => SHA256,
                "sha384" => SHA384,
                "sha512" => SHA512,
                _ => return None,
            };
            Some(((pcr, alg), unhex(w.next()?)?))
        })
        .collect();
    for bank in &banks {
        for pcr in [12, 13] {
            let want = replayed.get(&(pcr, *bank)).ok_or(format!("nothing replayed into PCR {pcr}"))?;
            match chip.get(&(pcr, *bank)) {
                Some(v) if v == want => {}
                Some(v) => {
                    return Err(format!(
                        "libtpms holds PCR {pcr} bank {bank:#x} = {}, the log replays to {}",
                        hex(v),
                        hex(want)
                    ))
                }
                None => return Err(format!("swtpm's log shows no read of PCR {pcr} bank {bank:#x}")),
            }
            if printed.get(&(pcr, *bank)) != Some(want) {
                return Err(format!("CTVM printed another value for PCR {pcr} bank {bank:#x}"));
            }
        }
    }
    Ok(())
}
