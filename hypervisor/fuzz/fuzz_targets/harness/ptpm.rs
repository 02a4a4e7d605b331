//! The `ptpm` target: the platform TPM as CTVM drives it, with the chip's
//! answers (hardware, or firmware in between) as the input describes them.
//! The first byte picks:
//! * the operations the boot path runs over a scripted chip (TPM 2.0 or
//!   1.2): the measured launch, sealing the vTPM key and unsealing it, the
//!   monotonic counter, PCR reads; each reply honest in form (tag, size,
//!   handles, parameters shaped as the command's, or a well-formed answer
//!   to whatever was asked; retries, error codes) or raw bytes, or no
//!   reply at all;
//! * the TIS and CRB register drivers over an honest chip (the vTIS model,
//!   a CRB page model) answering the input's response, whose register
//!   reads the input overrides where it likes, for one command;
//! * the crypto-agile event log: a log CTVM's writer builds from the
//!   input's events, or raw bytes, through the parser and the replay;
//! * the ACPI TPM2/TCPA tables that say which chip there is.
//!
//! Properties:
//! * every command CTVM sends is well formed (its size field is its length);
//! * a measured launch's log holds exactly what was measured (each
//!   measurement's PCR, type, description and digest in every bank it
//!   reports, SHA-256 among them), and it read two PCRs per bank;
//! * a sealed key's blob carries the chip's private and public parts
//!   unchanged, and unsealing it loads exactly those; an unsealed key is
//!   the data the chip returned (TPM 1.2); a TPM 2.0 answer, whose session
//!   HMAC the input cannot compute, never seals or unseals; PCR reads
//!   return one value per PCR asked;
//! * the drivers touch only their locality's registers (TIS: its own
//!   4 KiB page; CRB: the page, buffers inside it) and return a response
//!   whose size field is its length, 10 to 4096 bytes;
//! * the log round-trips (what the writer wrote parses back to the same
//!   events) and replays to the hash chain computed here; raw logs neither
//!   panic nor replay into a PCR that does not exist.

use std::borrow::Cow;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::platform::tpm::agile::{self, AgileLog};
use hypervisor::platform::tpm::crb::Crb;
use hypervisor::platform::tpm::launch::{self, Measurement, PlatformTpm};
use hypervisor::platform::tpm::seal::{self, Counter};
use hypervisor::platform::tpm::tis::Tis;
use hypervisor::platform::tpm::tpm2::{self, alg, cc};
use hypervisor::platform::tpm::{self, Family, Transport, TransportError};
use hypervisor::platform::Mmio;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let u = Unstructured::new(rest);
    match which % 5 {
        0 | 1 => {
            if let Ok(s) = Script::arbitrary_take_rest(u) {
                operations(&s)
            }
        }
        2 => {
            if let Ok(d) = DriverInput::arbitrary_take_rest(u) {
                driver(&d)
            }
        }
        3 => {
            if let Ok(l) = LogInput::arbitrary_take_rest(u) {
                log(&l)
            }
        }
        _ => acpi(rest),
    }
}

/// A reply's parameters, shaped as one command's or raw.
#[derive(Arbitrary, Debug)]
enum Params {
    Raw(Vec<u8>),
    /// TPM2B: a u16 size and bytes.
    Sized(Vec<u8>),
    /// Two TPM2B (Create's private and public).
    TwoSized(Vec<u8>, Vec<u8>),
    /// TPMS_CAPABILITY_DATA for TPM_CAP_PCRS: (algorithm, selected bits).
    Banks(Vec<(u16, [u8; 3])>),
    /// PCR_Read: update counter, selection, digests.
    Digests(u32, Vec<Vec<u8>>),
}

impl Params {
    fn bytes(&self) -> Vec<u8> {
        let sized = |b: &[u8]| {
            let b = &b[..b.len().min(600)];
            let mut v = (b.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(b);
            v
        };
        match self {
            Params::Raw(b) => b[..b.len().min(1024)].to_vec(),
            Params::Sized(b) => sized(b),
            Params::TwoSized(a, b) => [sized(a), sized(b)].concat(),
            Params::Banks(banks) => {
                let mut v = vec![0];
                v.extend_from_slice(&5u32.to_be_bytes());
                v.extend_from_slice(&(banks.len() as u32).to_be_bytes());
                for (a, sel) in banks.iter().take(8) {
                    v.extend_from_slice(&a.to_be_bytes());
                    v.push(3);
                    v.extend_from_slice(sel);
                }
                v
            }
            Params::Digests(counter, digests) => {
                let mut v = counter.to_be_bytes().to_vec();
                v.extend_from_slice(&0u32.to_be_bytes());
                v.extend_from_slice(&(digests.len() as u32).to_be_bytes());
                for d in digests.iter().take(8) {
                    v.extend(sized(d));
                }
                v
            }
        }
    }
}

/// One answer of the chip.
#[derive(Arbitrary, Debug)]
enum Reply {
    /// A well-formed success for whatever the command was, its variable
    /// parts (digests, sealed parts, handles' nonces, counter values) from
    /// these bytes: the deep paths, reached at once.
    Auto(Vec<u8>),
    /// Success: handles, parameters (TPM 2.0: with a session area or not).
    Ok {
        handles: Vec<u32>,
        params: Params,
        sessions: bool,
    },
    /// A response code (retry, testing, initialize, or any).
    Rc(u32),
    /// A size field that lies.
    Lying {
        size: u32,
        params: Params,
    },
    Raw(Vec<u8>),
    /// No answer: the interface fails.
    Silent,
}

impl Reply {
    fn bytes(&self, family: Family, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let tag = |sessions: bool| match (family, sessions) {
            (Family::V2, false) => 0x8001u16,
            (Family::V2, true) => 0x8002,
            (Family::V12, _) => 0x00c4,
        };
        let frame = |tag: u16, rc: u32, body: &[u8], size: Option<u32>| {
            let mut v = tag.to_be_bytes().to_vec();
            v.extend_from_slice(&size.unwrap_or(10 + body.len() as u32).to_be_bytes());
            v.extend_from_slice(&rc.to_be_bytes());
            v.extend_from_slice(body);
            v
        };
        Ok(match self {
            Reply::Auto(seed) => auto(family, command, seed),
            Reply::Ok { handles, params, sessions } => {
                let mut body = Vec::new();
                for h in handles.iter().take(3) {
                    body.extend_from_slice(&h.to_be_bytes());
                }
                let p = params.bytes();
                if *sessions && family == Family::V2 {
                    body.extend_from_slice(&(p.len() as u32).to_be_bytes());
                    body.extend_from_slice(&p);
                    body.extend_from_slice(&[0, 0, 1, 0, 0]);
                } else {
                    body.extend_from_slice(&p);
                }
                frame(tag(*sessions), 0, &body, None)
            }
            Reply::Rc(rc) => {
                let rc = match rc % 8 {
                    0 => 0x922,
                    1 => 0x90a,
                    2 => 0x100,
                    3 => 0x26,
                    4 => 0x14a,
                    _ => *rc,
                };
                frame(tag(false), rc, &[], None)
            }
            Reply::Lying { size, params } => frame(tag(false), 0, &params.bytes(), Some(*size)),
            Reply::Raw(b) => b[..b.len().min(1024)].to_vec(),
            Reply::Silent => return Err(TransportError::Timeout("the fuzz chip")),
        })
    }
}

/// A command and the chip's answer to it.
type Exchange = (Vec<u8>, Result<Vec<u8>, TransportError>);

/// The chip: answers in the script's order, records what it was sent.
struct Chip<'a> {
    family: Family,
    replies: &'a [Reply],
    /// (command, response) for every command.
    log: Vec<Exchange>,
}

impl Transport for Chip<'_> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let size = command.get(2..6).map(|s| u32::from_be_bytes(s.try_into().unwrap()) as usize);
        assert_eq!(size, Some(command.len()), "a malformed command: {command:02x?}");
        let reply = match self.replies.get(self.log.len()) {
            Some(r) => r.bytes(self.family, command),
            None => Err(TransportError::Timeout("the script's end")),
        };
        self.log.push((command.to_vec(), reply.clone()));
        reply
    }
}

/// `n` bytes from `seed`, cycled (zeros when it is empty).
fn fill(seed: &[u8], n: usize) -> Vec<u8> {
    (0..n).map(|i| if seed.is_empty() { 0 } else { seed[i % seed.len()] }).collect()
}

/// A well-formed successful answer to `command`.
fn auto(family: Family, command: &[u8], seed: &[u8]) -> Vec<u8> {
    let sized = |b: &[u8]| [(b.len() as u16).to_be_bytes().to_vec(), b.to_vec()].concat();
    let (mut handles, mut params) = (Vec::new(), Vec::new());
    let c = code(command);
    let frame = |tag: u16, body: &[u8]| {
        let mut v = tag.to_be_bytes().to_vec();
        v.extend_from_slice(&(10 + body.len() as u32).to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    if family == Family::V12 {
        let auth = [fill(seed, 20), vec![1], fill(seed, 20)].concat();
        let counter = [vec![0, 0x0e], b"CTVM".to_vec(), fill(seed, 4)].concat();
        let body = match c {
            0x14 | 0x15 => fill(seed, 20),
            0x0a => [fill(seed, 4), fill(seed, 20)].concat(),
            0x0b => [fill(seed, 4), fill(seed, 40)].concat(),
            0x17 => [vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32], fill(seed, 32), auth].concat(),
            0x18 => [32u32.to_be_bytes().to_vec(), fill(seed, 32), auth.clone(), auth].concat(),
            0xdc => [fill(seed, 4), counter, auth].concat(),
            0xdd => [counter, auth].concat(),
            0xde => counter,
            0x65 => [6u32.to_be_bytes().to_vec(), vec![0, 1], fill(seed, 4)].concat(),
            // The SRK's TPM_PUBKEY: RSA, OAEP, 2048 bits, e = 65537, an
            // odd modulus with its top bit set.
            0x81 => {
                let mut n = fill(seed, 256);
                n[0] |= 0x80;
                n[255] |= 1;
                let parms = [2048u32, 2, 0].map(u32::to_be_bytes).concat();
                let head = [vec![0, 0, 0, 1, 0, 3, 0, 1], (parms.len() as u32).to_be_bytes().to_vec(), parms];
                [head.concat(), 256u32.to_be_bytes().to_vec(), n, auth].concat()
            }
            // A transport session: handle, locality, ticks, nonce.
            0xe6 => [fill(seed, 4), vec![0; 4], fill(seed, 32), fill(seed, 20), auth].concat(),
            // The wrapped command answered as if alone (still encrypted
            // under the session's stream, which the script cannot know).
            0xe7 => {
                let inner = command.get(14..).unwrap_or(&[]);
                let inner = command.get(10..14).map_or(Vec::new(), |_| auto(family, inner, seed));
                let sized = [(inner.len() as u32).to_be_bytes().to_vec(), inner].concat();
                [fill(seed, 12), sized, fill(seed, 20), vec![0], fill(seed, 20)].concat()
            }
            _ => Vec::new(),
        };
        return frame(0x00c4, &body);
    }
    match c {
        cc::GET_CAPABILITY => {
            params.extend_from_slice(&[0, 0, 0, 0, 5]);
            let banks = [alg::SHA1, alg::SHA256, alg::SHA384, alg::SHA512];
            let chosen: Vec<u16> = banks
                .iter()
                .enumerate()
                .filter(|(i, _)| fill(seed, 4)[*i] & 1 == 0 || *i == 1)
                .map(|(_, a)| *a)
                .collect();
            params.extend_from_slice(&(chosen.len() as u32).to_be_bytes());
            for a in chosen {
                params.extend_from_slice(&a.to_be_bytes());
                params.extend_from_slice(&[3, 0xff, 0xff, 0xff]);
            }
        }
        cc::PCR_READ => {
            let alg = command.get(14..16).map_or(0, |a| u16::from_be_bytes([a[0], a[1]]));
            let select = command.get(17..20).unwrap_or_default();
            let n: u32 = select.iter().map(|b| b.count_ones()).sum();
            params.extend_from_slice(&fill(seed, 4));
            params.extend_from_slice(&1u32.to_be_bytes());
            params.extend_from_slice(&alg.to_be_bytes());
            params.push(3);
            params.extend_from_slice(select);
            params.extend_from_slice(&n.to_be_bytes());
            for _ in 0..n {
                params.extend(sized(&fill(seed, tpm2::digest_size(alg).unwrap_or(32))));
            }
        }
        cc::LOAD => handles.push(0x8000_0000 | u32::from(fill(seed, 1)[0])),
        cc::CREATE_PRIMARY => {
            handles.push(0x8000_0000 | u32::from(fill(seed, 1)[0]));
            // An ECC storage key whose point is on the curve, so that the
            // salted sessions start (their answers still fail their HMACs).
            let mut public =
                vec![0, 0x23, 0, 0x0b, 0, 3, 0, 0x72, 0, 0, 0, 6, 0, 0x80, 0, 0x43, 0, 0x10, 0, 3, 0, 0x10];
            public.extend(sized(&P256_X));
            public.extend(sized(&P256_Y));
            params.extend(sized(&public));
            params.extend_from_slice(&[0, 0, 0, 0, 0x80, 0x21, 0x40, 0, 0, 1, 0, 0]);
            params.extend(sized(&fill(seed, 34)));
        }
        cc::START_AUTH_SESSION => {
            handles.push(0x0300_0000);
            params.extend(sized(&fill(seed, 16)));
        }
        cc::CREATE => {
            let n = usize::from(fill(seed, 1)[0]);
            params.extend(sized(&fill(seed, n)));
            params.extend(sized(&fill(&seed[seed.len().min(1)..], 2 * n + 3)));
        }
        cc::UNSEAL => params.extend(sized(&fill(seed, 32))),
        cc::NV_READ => params.extend(sized(&fill(seed, 8))),
        _ => {}
    }
    // A command with sessions is answered with a session area.
    let sessions = command.get(..2) == Some(&[0x80, 0x02]);
    let mut body: Vec<u8> = handles.iter().flat_map(|h| h.to_be_bytes()).collect();
    if sessions {
        body.extend_from_slice(&(params.len() as u32).to_be_bytes());
        body.extend_from_slice(&params);
        body.extend_from_slice(&[0, 0, 1, 0, 0]);
        frame(0x8002, &body)
    } else {
        body.extend_from_slice(&params);
        frame(0x8001, &body)
    }
}

fn code(command: &[u8]) -> u32 {
    command.get(6..10).map_or(0, |c| u32::from_be_bytes(c.try_into().unwrap()))
}

#[derive(Arbitrary, Debug)]
enum Op {
    Measure(Vec<(u8, u32, Vec<u8>, Vec<u8>)>),
    Seal { pcrs: Vec<u8>, unseal: bool },
    Unseal(Vec<u8>),
    CreateCounter,
    Increment { nv: bool, id: u32 },
    ReadCounter { nv: bool, id: u32 },
    PcrRead { alg: u16, pcrs: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Script {
    v12: bool,
    ops: Vec<Op>,
    replies: Vec<Reply>,
}

fn operations(s: &Script) {
    let family = if s.v12 { Family::V12 } else { Family::V2 };
    let replies = &s.replies[..s.replies.len().min(64)];
    let mut tpm = PlatformTpm::new(family, Chip { family, replies, log: Vec::new() });
    let mut counter = 0u8;
    let mut nonces = move || {
        counter = counter.wrapping_add(1);
        [counter; 20]
    };
    let chip = |t: &mut PlatformTpm<Chip<'_>>| -> (usize, Vec<Exchange>) {
        let log = match t {
            PlatformTpm::V2(t) => &t.transport.log,
            PlatformTpm::V12(t) => &t.transport.log,
        };
        (log.len(), log.clone())
    };
    for op in s.ops.iter().take(6) {
        let (sent_before, _) = chip(&mut tpm);
        match op {
            Op::Measure(ms) => {
                let ms: Vec<Measurement<'_>> = ms
                    .iter()
                    .take(6)
                    .map(|(pcr, kind, description, content)| Measurement {
                        pcr: u32::from(*pcr % 24),
                        kind: *kind,
                        description: description[..description.len().min(64)].to_vec(),
                        content: Cow::Borrowed(&content[..content.len().min(256)]),
                    })
                    .collect();
                if let Ok(l) = launch::measure(&mut tpm, &ms, &mut || 0) {
                    measured(&l, &ms);
                }
            }
            Op::Seal { pcrs, unseal } => {
                let pcrs: Vec<u32> = pcrs.iter().take(8).map(|&p| u32::from(p % 24)).collect();
                let key = [0x5a; 32];
                let Ok(blob) = seal::seal_key(&mut tpm, &key, &pcrs, &mut nonces) else { continue };
                let (_, log) = chip(&mut tpm);
                sealed_blob(family, &blob, &log[sent_before..], &pcrs);
                if *unseal {
                    let (before, _) = chip(&mut tpm);
                    let got = seal::unseal_key(&mut tpm, &blob, &mut nonces);
                    let (_, log) = chip(&mut tpm);
                    unsealed(family, &blob, got, &log[before..]);
                }
            }
            Op::Unseal(blob) => {
                let blob = &blob[..blob.len().min(1024)];
                let got = seal::unseal_key(&mut tpm, blob, &mut nonces);
                let (_, log) = chip(&mut tpm);
                unsealed(family, blob, got, &log[sent_before..]);
            }
            Op::CreateCounter => {
                let _ = seal::create_counter(&mut tpm, &mut nonces);
            }
            Op::Increment { nv, id } => {
                let c = if *nv { Counter::Nv(*id) } else { Counter::V12(*id) };
                let _ = seal::increment_counter(&mut tpm, c, &mut nonces);
            }
            Op::ReadCounter { nv, id } => {
                let c = if *nv { Counter::Nv(*id) } else { Counter::V12(*id) };
                let _ = seal::read_counter(&mut tpm, c);
            }
            Op::PcrRead { alg, pcrs } => {
                let pcrs: Vec<u32> = pcrs.iter().take(8).map(|&p| u32::from(p % 24)).collect();
                match &mut tpm {
                    PlatformTpm::V2(t) => {
                        if let Ok(values) = t.pcr_read(*alg, &pcrs) {
                            assert_eq!(values.len(), pcrs.len(), "one value per PCR asked");
                        }
                    }
                    PlatformTpm::V12(t) => {
                        if let Some(&p) = pcrs.first() {
                            let _ = t.pcr_read(p);
                        }
                    }
                }
            }
        }
    }
}

/// The measured launch's log holds exactly the measurements.
fn measured(l: &launch::Launch, ms: &[Measurement<'_>]) {
    assert_eq!(l.pcrs.len(), 2 * l.banks.len(), "two PCRs read per bank");
    if l.family != Family::V2 {
        return;
    }
    assert!(l.banks.contains(&alg::SHA256), "launched without a SHA-256 bank: {:?}", l.banks);
    let (algs, events) = agile::parse(&l.log).expect("CTVM's own log parses");
    assert_eq!(algs.iter().map(|a| a.0).collect::<Vec<_>>(), l.banks);
    assert_eq!(events.len(), ms.len());
    for (e, m) in events.iter().zip(ms) {
        assert_eq!((e.pcr, e.kind, &e.data), (m.pcr, m.kind, &m.description));
        for (a, d) in &e.digests {
            assert_eq!(Some(d), tpm2::digest(*a, &m.content).as_ref(), "bank {a:#x}");
        }
        assert_eq!(e.digests.iter().map(|d| d.0).collect::<Vec<_>>(), l.banks);
    }
}

/// A point of P-256 (a storage key libtpms made).
const P256_X: [u8; 32] = [
    0xa5, 0x70, 0x55, 0x2a, 0x4e, 0x5c, 0x1f, 0x30, 0x7b, 0x4c, 0x06, 0x85, 0xea, 0x5b, 0x3a, 0x73, 0x01, 0xae, 0x23,
    0x2a, 0xd2, 0xb7, 0xc9, 0x39, 0x74, 0x01, 0x83, 0x32, 0x86, 0xff, 0x44, 0xe4,
];
const P256_Y: [u8; 32] = [
    0x7c, 0xba, 0x3a, 0x9a, 0x85, 0xa5, 0x87, 0xb9, 0x89, 0xce, 0x07, 0xc5, 0xfe, 0x7c, 0x18, 0x3d, 0x95, 0x27, 0x9b,
    0x52, 0xda, 0x98, 0x92, 0x08, 0x7d, 0x9e, 0xeb, 0x4e, 0x91, 0x1b, 0xb6, 0x6c,
];

/// TPM 2.0's sealed blob carries Create's private and public parts as the
/// chip returned them (the last successful Create).
fn sealed_blob(family: Family, blob: &[u8], log: &[Exchange], pcrs: &[u32]) {
    assert!(blob.starts_with(b"CTVMKEY1"));
    let header_len = 8 + 2 + pcrs.len();
    assert_eq!(blob[9] as usize, pcrs.len());
    assert!(blob[10..header_len].iter().zip(pcrs).all(|(&b, &p)| u32::from(b) == p));
    if family != Family::V2 {
        return;
    }
    let create = log
        .iter()
        .rev()
        .find(|(c, r)| code(c) == cc::CREATE && r.as_ref().is_ok_and(|r| r.get(6..10) == Some(&[0; 4])))
        .expect("sealed without a Create");
    let response = create.1.as_ref().unwrap();
    let parts = tpm2::parse_response(cc::CREATE, response, 0).expect("a Create that sealed parses").params;
    let (private, public) = two_sized(&parts).expect("its parts parse");
    let mut expected = Vec::new();
    for p in [private, public] {
        expected.extend_from_slice(&(p.len() as u16).to_be_bytes());
        expected.extend_from_slice(p);
    }
    assert_eq!(&blob[header_len..], expected.as_slice(), "the blob does not carry the chip's parts");
}

fn two_sized(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let one =
        |b: &[u8]| -> Option<(usize, usize)> { Some((2, usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?])))) };
    let (h, n) = one(b)?;
    let private = b.get(h..h + n)?;
    let rest = &b[h + n..];
    let (h2, n2) = one(rest)?;
    Some((private, rest.get(h2..h2 + n2)?))
}

/// Nothing unseals without the chip's session; TPM 2.0 loads the blob's
/// parts exactly.
fn unsealed(family: Family, blob: &[u8], got: Result<[u8; 32], seal::SealError>, log: &[Exchange]) {
    if family == Family::V2 && blob.len() > 10 && blob.starts_with(b"CTVMKEY1") && blob[8] == 2 {
        let parts = &blob[10 + usize::from(blob[9]).min(blob.len() - 10)..];
        for (c, _) in log.iter().filter(|(c, _)| code(c) == cc::LOAD) {
            assert!(c.ends_with(parts), "Load does not carry the blob's parts");
        }
    }
    // The answer carries the key encrypted under a session the input
    // cannot know (a salted TPM 2.0 session, a TPM 1.2 transport session):
    // its HMAC never verifies, so nothing unseals.
    assert!(got.is_err(), "{family:?}: an answer without a valid session HMAC was taken");
}

#[derive(Arbitrary, Debug)]
struct DriverInput {
    crb: bool,
    locality: u8,
    command: Vec<u8>,
    /// The chip's response to the command (its size field as given).
    response: Vec<u8>,
    /// Register reads the chip answers otherwise than an honest one: (which
    /// read, value).
    faults: Vec<(u16, u32)>,
}

/// A backend that answers every command with the input's response.
struct Answer(Vec<u8>);

impl hypervisor::devices::tis::TpmBackend for Answer {
    fn execute(&mut self, _: u8, _: &[u8]) -> Vec<u8> {
        self.0.clone()
    }
}

/// A CRB locality page, honest: locality granted on request, idle until
/// asked ready, buffers inside the page, the command answered at START.
struct CrbModel {
    page: Vec<u8>,
    granted: bool,
    ready: bool,
    response: Vec<u8>,
}

const CRB_BUFFER: u64 = 0x80;
const CRB_BUFFER_SIZE: u32 = 0xf80;

impl CrbModel {
    fn read32(&mut self, o: u64) -> u32 {
        match o {
            0x00 => 1 << 7,
            0x0c => u32::from(self.granted),
            0x40 => 0,
            0x44 => u32::from(!self.ready) << 1,
            0x4c => 0,
            0x58 | 0x64 => CRB_BUFFER_SIZE,
            0x5c | 0x68 => (tpm::TPM_BASE + CRB_BUFFER) as u32,
            0x60 | 0x6c => ((tpm::TPM_BASE + CRB_BUFFER) >> 32) as u32,
            o => u32::from_le_bytes(self.page[o as usize..o as usize + 4].try_into().unwrap()),
        }
    }
    fn write32(&mut self, o: u64, v: u32) {
        match o {
            0x08 => self.granted = v & 1 != 0,
            0x40 => self.ready = v & 1 != 0,
            0x4c if v & 1 != 0 => {
                let n = self.response.len().min(CRB_BUFFER_SIZE as usize);
                let at = CRB_BUFFER as usize;
                self.page[at..at + n].copy_from_slice(&self.response[..n]);
            }
            _ => {}
        }
    }
}

/// The registers a driver sees: an honest chip (the vTIS model, or the CRB
/// model) whose answers the input overrides at chosen reads; every access
/// must stay in the locality's registers.
struct Regs {
    tis: Option<hypervisor::devices::tis::Tis<Answer>>,
    crb: CrbModel,
    faults: Vec<(usize, u32)>,
    reads: usize,
    window: core::ops::Range<u64>,
}

impl Regs {
    fn check(&self, offset: u64, len: u64) {
        let inside = self.window.contains(&offset) && self.window.contains(&(offset + len - 1));
        assert!(inside, "a register access at {offset:#x}+{len}, outside {:x?}", self.window);
    }

    fn read(&mut self, offset: u64, len: u8) -> u32 {
        self.check(offset, u64::from(len));
        self.reads += 1;
        let honest = match &mut self.tis {
            Some(t) => t.read(offset, len) as u32,
            None if len == 4 => self.crb.read32(offset),
            None => (self.crb.read32(offset & !3) >> ((offset & 3) * 8)) as u8 as u32,
        };
        match self.faults.iter().find(|f| f.0 == self.reads - 1) {
            Some(&(_, v)) => v,
            None => honest,
        }
    }

    fn write(&mut self, offset: u64, len: u8, value: u32) {
        self.check(offset, u64::from(len));
        match &mut self.tis {
            Some(t) => t.write(offset, len, u64::from(value)),
            None if len == 4 => self.crb.write32(offset, value),
            None => {
                let at = offset as usize;
                if let Some(b) = self.crb.page.get_mut(at) {
                    *b = value as u8;
                }
            }
        }
    }
}

impl Mmio for Regs {
    fn read32(&mut self, offset: u64) -> u32 {
        self.read(offset, 4)
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, 4, value)
    }
    fn read8(&mut self, offset: u64) -> u8 {
        self.read(offset, 1) as u8
    }
    fn write8(&mut self, offset: u64, value: u8) {
        self.write(offset, 1, u32::from(value))
    }
}

fn driver(d: &DriverInput) {
    let mut command = d.command[..d.command.len().min(4096)].to_vec();
    if command.len() >= 6 {
        let n = command.len() as u32;
        command[2..6].copy_from_slice(&n.to_be_bytes());
    }
    let response = d.response[..d.response.len().min(5000)].to_vec();
    let faults: Vec<(usize, u32)> = d.faults.iter().take(16).map(|&(i, v)| (usize::from(i), v)).collect();
    let crb = CrbModel { page: vec![0; 0x1000], granted: false, ready: false, response: response.clone() };
    let got = if d.crb {
        let regs = Regs { tis: None, crb, faults, reads: 0, window: 0..0x1000 };
        Crb::open(regs, tpm::TPM_BASE).and_then(|mut c| c.transmit(&command))
    } else {
        let loc = d.locality % 5;
        let window = u64::from(loc) << 12..u64::from(loc + 1) << 12;
        let model = hypervisor::devices::tis::Tis::new(Answer(response.clone()), 0);
        let regs = Regs { tis: Some(model), crb, faults, reads: 0, window };
        Tis::open(regs, loc).and_then(|mut t| t.transmit(&command))
    };
    if let Ok(r) = got {
        let size = u32::from_be_bytes(r[2..6].try_into().unwrap()) as usize;
        assert!(size == r.len() && (10..=4096).contains(&size), "a response of {} bytes says {size}", r.len());
    }
}

#[derive(Arbitrary, Debug)]
enum LogInput {
    Raw(Vec<u8>, u16),
    Written { banks: Vec<u8>, events: Vec<(u8, u32, Vec<u8>, Vec<u8>)> },
}

/// The four banks CTVM hashes.
const BANKS: [u16; 4] = [alg::SHA1, alg::SHA256, alg::SHA384, alg::SHA512];

fn log(l: &LogInput) {
    match l {
        LogInput::Raw(bytes, bank) => {
            let _ = agile::parse(bytes);
            if let Some(pcrs) = launch::replay_agile(bytes, *bank) {
                let size = tpm2::digest_size(*bank).expect("a bank replayed is one CTVM hashes");
                assert!(pcrs.iter().all(|p| p.len() == size));
            }
        }
        LogInput::Written { banks, events } => {
            let mut algs: Vec<u16> = banks.iter().take(4).map(|&b| BANKS[usize::from(b % 4)]).collect();
            algs.dedup();
            let mut log = AgileLog::new(&algs, 64 << 10);
            let mut written = Vec::new();
            for (pcr, kind, data, content) in events.iter().take(16) {
                let digests: Vec<(u16, Vec<u8>)> =
                    algs.iter().map(|&a| (a, tpm2::digest(a, content).unwrap())).collect();
                let e = agile::Event { pcr: u32::from(*pcr % 24), kind: *kind, digests, data: data.clone() };
                if log.push(&e).is_ok() {
                    written.push(e);
                }
            }
            let (header, parsed) = agile::parse(log.as_bytes()).expect("the writer's log parses");
            assert_eq!(header.iter().map(|h| h.0).collect::<Vec<_>>(), algs);
            assert_eq!(parsed, written, "the log does not round-trip");
            for &bank in &algs {
                let size = tpm2::digest_size(bank).unwrap();
                let mut pcrs = vec![vec![0u8; size]; 24];
                for e in written.iter().filter(|e| e.kind != hypervisor::tpm::event_log::event_type::NO_ACTION) {
                    let d = &e.digests.iter().find(|d| d.0 == bank).unwrap().1;
                    let p = &mut pcrs[e.pcr as usize];
                    *p = tpm2::digest(bank, &[p.as_slice(), d].concat()).unwrap();
                }
                let replayed = launch::replay_agile(log.as_bytes(), bank).expect("replays");
                assert_eq!(replayed.to_vec(), pcrs, "bank {bank:#x}");
            }
        }
    }
}

/// Which chip ACPI describes: a TPM2 table (start method, control area) or TCPA.
fn acpi(bytes: &[u8]) {
    let (tpm2, tcpa) = match bytes.split_first() {
        Some((&f, rest)) if f & 1 == 0 => (Some(rest), (f & 2 != 0).then_some(&b"TCPA"[..])),
        Some((_, rest)) => (None, Some(rest)),
        None => (None, None),
    };
    if let Ok((family, interface)) = tpm::from_acpi(tpm2, tcpa) {
        match interface {
            tpm::Interface::Crb { base } => assert!(family == Family::V2 && base == tpm::TPM_BASE),
            tpm::Interface::Tis => assert!(tpm2.is_some() || family == Family::V12),
        }
    }
}
