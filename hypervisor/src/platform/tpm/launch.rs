//! CTVM's measured launch into the platform TPM.
//!
//! Two PCRs, each closed by an `EV_SEPARATOR`:
//!
//! | PCR | what |
//! | --- | --- |
//! | 12 | CTVM's configuration: its command line (`ctvm.cmdline <text>`), the `ctvm.policy` and `ctvm.api` modules, the `vtpm.seed` module (digest of the file, as GRUB measures files) |
//! | 13 | each guest, in module order: `ctvm.guest NAME kernel`, `... initrd`, `... cmdline <text>`, `... config <text>` (its options: kind, memory, integrity, trusted modules, vTPM) |
//!
//! Every event is `EV_IPL`; a text event's digest is the hash of the text
//! after its label, so a verifier recomputes it from the log itself; a file
//! event's digest is the hash of the file. A `vtpm.seed=` value on CTVM's
//! own command line is replaced by `sha256:<its digest>` before measuring:
//! the log is public, the seed is not. PCR 12 is what the vTPM state key
//! is sealed to: a different CTVM configuration cannot unseal it, a new
//! guest kernel can.
//!
//! TPM 2.0 logs in the crypto-agile format with every allocated bank CTVM
//! can hash (SHA-1, SHA-256, SHA-384, SHA-512); TPM 1.2 in the SHA-1 format.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::agile::{self, AgileLog};
use super::tpm12::{Tpm12, Tpm12Error};
use super::tpm2::{self, alg, Tpm2, Tpm2Error};
use super::{Family, Transport};
use crate::guest::config;
use crate::tpm::event_log::{self, event_type, EventLog};

/// CTVM's configuration.
pub const PCR_CONFIG: u32 = 12;
/// The guests.
pub const PCR_GUESTS: u32 = 13;
/// Room for the log (a few hundred bytes per guest).
pub const LOG_CAPACITY: usize = 64 * 1024;

/// One measurement: into `pcr`, logged with `description`, the digest of `content`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement<'a> {
    pub pcr: u32,
    pub kind: u32,
    pub description: Vec<u8>,
    pub content: Cow<'a, [u8]>,
}

fn text(pcr: u32, label: &str, value: &str) -> Measurement<'static> {
    Measurement {
        pcr,
        kind: event_type::IPL,
        description: format!("{label} {value}").into_bytes(),
        content: Cow::Owned(value.as_bytes().to_vec()),
    }
}

fn file<'a>(pcr: u32, label: String, bytes: &'a [u8]) -> Measurement<'a> {
    Measurement { pcr, kind: event_type::IPL, description: label.into_bytes(), content: Cow::Borrowed(bytes) }
}

fn separator(pcr: u32) -> Measurement<'static> {
    Measurement {
        pcr,
        kind: event_type::SEPARATOR,
        description: alloc::vec![0; 4],
        content: Cow::Owned(alloc::vec![0; 4]),
    }
}

/// CTVM's command line as measured: `vtpm.seed=` values replaced by their SHA-256.
pub fn redacted_cmdline(cmdline: &str) -> String {
    let words: Vec<String> = cmdline
        .split_ascii_whitespace()
        .map(|w| match w.strip_prefix("vtpm.seed=") {
            Some(secret) => {
                format!("vtpm.seed=sha256:{}", hex(&tpm2::digest(alg::SHA256, secret.as_bytes()).unwrap_or_default()))
            }
            None => w.into(),
        })
        .collect();
    words.join(" ")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What CTVM measures, in order, for its command line and its modules
/// (bytes, module command line). Modules that are no guest, initrd,
/// policy or seed are not measured: CTVM ignores them. A guest whose
/// options do not parse does not run and is not measured either.
pub fn measurements<'a>(cmdline: &str, modules: &[(&'a [u8], &'a str)]) -> Vec<Measurement<'a>> {
    let mut out = alloc::vec![text(PCR_CONFIG, "ctvm.cmdline", &redacted_cmdline(cmdline))];
    for &(bytes, line) in modules {
        match line.trim() {
            config::POLICY_MODULE => out.push(file(PCR_CONFIG, "ctvm.policy".into(), bytes)),
            config::API_MODULE => out.push(file(PCR_CONFIG, "ctvm.api".into(), bytes)),
            config::SEED_MODULE => out.push(file(PCR_CONFIG, "vtpm.seed".into(), bytes)),
            _ => {}
        }
    }
    out.push(separator(PCR_CONFIG));
    for &(bytes, line) in modules.iter().filter(|(_, l)| config::is_guest_module(l)) {
        let Ok(guest) = config::parse(line) else { continue };
        let name = &guest.name;
        out.push(file(PCR_GUESTS, format!("ctvm.guest {name} kernel"), bytes));
        if let Some(&(initrd, _)) = modules.iter().find(|(_, l)| config::initrd_owner(l) == Some(name.as_str())) {
            out.push(file(PCR_GUESTS, format!("ctvm.guest {name} initrd"), initrd));
        }
        out.push(text(PCR_GUESTS, &format!("ctvm.guest {name} cmdline"), &guest.args));
        out.push(text(PCR_GUESTS, &format!("ctvm.guest {name} config"), config::split_args(line).0.trim()));
    }
    out.push(separator(PCR_GUESTS));
    out
}

/// The chip, by family.
pub enum PlatformTpm<T: Transport> {
    V12(Tpm12<T>),
    V2(Tpm2<T>),
}

impl<T: Transport> PlatformTpm<T> {
    pub fn new(family: Family, transport: T) -> Self {
        match family {
            Family::V12 => PlatformTpm::V12(Tpm12::new(transport)),
            Family::V2 => PlatformTpm::V2(Tpm2::new(transport)),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            PlatformTpm::V12(_) => Family::V12,
            PlatformTpm::V2(_) => Family::V2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchError {
    V12(Tpm12Error),
    V2(Tpm2Error),
    /// No bank CTVM can compute digests for (2.0), or no SHA-256 bank.
    NoBank,
    LogFull,
}

impl core::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::V12(e) => write!(f, "{e}"),
            Self::V2(e) => write!(f, "{e}"),
            Self::NoBank => write!(f, "the TPM has no SHA-256 PCR bank"),
            Self::LogFull => write!(f, "the event log is full"),
        }
    }
}

/// What a measured launch left: the log, and the PCRs read back after it.
pub struct Launch {
    pub family: Family,
    /// The banks extended (SHA-1 only for 1.2).
    pub banks: Vec<u16>,
    pub log: Vec<u8>,
    /// (PCR, bank, value) for PCRs 12 and 13.
    pub pcrs: Vec<(u32, u16, Vec<u8>)>,
    /// Ticks of `clock` spent hashing, and in TPM commands.
    pub hash_ticks: u64,
    pub tpm_ticks: u64,
    pub started: bool,
}

/// Starts the chip (when firmware did not), extends every measurement into
/// every bank CTVM can hash, logs each, then reads PCRs 12 and 13 back.
/// `clock` separates hashing time from the chip's.
pub fn measure<T: Transport>(
    tpm: &mut PlatformTpm<T>,
    measurements: &[Measurement<'_>],
    clock: &mut dyn FnMut() -> u64,
) -> Result<Launch, LaunchError> {
    let (mut hash_ticks, mut tpm_ticks) = (0u64, 0u64);
    let timed = |ticks: &mut u64, clock: &mut dyn FnMut() -> u64, start: u64| *ticks += clock().wrapping_sub(start);
    match tpm {
        PlatformTpm::V2(t) => {
            let s = clock();
            let started = t.startup().map_err(LaunchError::V2)?;
            let allocated = t.pcr_banks().map_err(LaunchError::V2)?;
            timed(&mut tpm_ticks, clock, s);
            let banks: Vec<u16> = [alg::SHA1, alg::SHA256, alg::SHA384, alg::SHA512]
                .into_iter()
                .filter(|a| allocated.contains(a))
                .collect();
            if !banks.contains(&alg::SHA256) {
                return Err(LaunchError::NoBank);
            }
            let mut log = AgileLog::new(&banks, LOG_CAPACITY);
            for m in measurements {
                let s = clock();
                let digests: Vec<(u16, Vec<u8>)> =
                    banks.iter().map(|&a| (a, tpm2::digest(a, &m.content).unwrap_or_default())).collect();
                timed(&mut hash_ticks, clock, s);
                let s = clock();
                t.pcr_extend(m.pcr, &digests).map_err(LaunchError::V2)?;
                timed(&mut tpm_ticks, clock, s);
                let e = agile::Event { pcr: m.pcr, kind: m.kind, digests, data: m.description.clone() };
                log.push(&e).map_err(|_| LaunchError::LogFull)?;
            }
            let s = clock();
            let mut pcrs = Vec::new();
            for &b in &banks {
                let values = t.pcr_read(b, &[PCR_CONFIG, PCR_GUESTS]).map_err(LaunchError::V2)?;
                pcrs.extend([PCR_CONFIG, PCR_GUESTS].into_iter().zip(values).map(|(p, v)| (p, b, v)));
            }
            timed(&mut tpm_ticks, clock, s);
            Ok(Launch { family: Family::V2, banks, log: log.as_bytes().to_vec(), pcrs, hash_ticks, tpm_ticks, started })
        }
        PlatformTpm::V12(t) => {
            let s = clock();
            let started = t.startup().map_err(LaunchError::V12)?;
            timed(&mut tpm_ticks, clock, s);
            let mut log = EventLog::new(LOG_CAPACITY);
            for m in measurements {
                let s = clock();
                let digest = vtpm_core::sha1(&m.content);
                timed(&mut hash_ticks, clock, s);
                let s = clock();
                t.extend(m.pcr, &digest).map_err(LaunchError::V12)?;
                timed(&mut tpm_ticks, clock, s);
                let e = event_log::Event { pcr: m.pcr, kind: m.kind, digest, data: m.description.clone() };
                log.push(&e).map_err(|_| LaunchError::LogFull)?;
            }
            let s = clock();
            let mut pcrs = Vec::new();
            for p in [PCR_CONFIG, PCR_GUESTS] {
                pcrs.push((p, alg::SHA1, t.pcr_read(p).map_err(LaunchError::V12)?.to_vec()));
            }
            timed(&mut tpm_ticks, clock, s);
            Ok(Launch {
                family: Family::V12,
                banks: alloc::vec![alg::SHA1],
                log: log.as_bytes().to_vec(),
                pcrs,
                hash_ticks,
                tpm_ticks,
                started,
            })
        }
    }
}

/// What the PCRs hold after replaying a crypto-agile log from zero, in one bank.
pub fn replay_agile(log: &[u8], bank: u16) -> Option<[Vec<u8>; 24]> {
    let (_, events) = agile::parse(log).ok()?;
    let size = tpm2::digest_size(bank)?;
    let mut pcrs: [Vec<u8>; 24] = core::array::from_fn(|_| alloc::vec![0; size]);
    for e in events.iter().filter(|e| e.kind != event_type::NO_ACTION) {
        let (_, d) = e.digests.iter().find(|(a, _)| *a == bank)?;
        let p = pcrs.get_mut(e.pcr as usize)?;
        let mut both = p.clone();
        both.extend_from_slice(d);
        *p = tpm2::digest(bank, &both)?;
    }
    Some(pcrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::tpm::crb::{fake::Chip as CrbChip, Crb};
    use crate::platform::tpm::tis::{fake::Chip as TisChip, Tis};
    use crate::platform::tpm::tpm2::fake::FakeTpm2;
    use alloc::boxed::Box;

    const SEED: &str = "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e";

    fn modules() -> Vec<(&'static [u8], &'static str)> {
        alloc::vec![
            (&b"KERNEL"[..], "guest=linux kind=linux trust=ctvm_agent -- console=ttyS0 quiet"),
            (&b"INITRD"[..], "initrd=linux"),
            (&b"POLICY"[..], "ctvm.policy"),
            (&b"API"[..], "ctvm.api"),
            (&b"ELF"[..], "guest=alpha mem=16M vtpm=on -- test=basics"),
            (&b"junk"[..], "no guest here"),
            (&b"BAD"[..], "guest=Bad! -- x"),
        ]
    }

    #[test]
    fn what_is_measured_and_where() {
        let m = measurements(&format!("log=debug vtpm.seed={SEED}"), &modules());
        let d: Vec<(u32, String)> =
            m.iter().map(|m| (m.pcr, String::from_utf8_lossy(&m.description).into_owned())).collect();
        let seed_digest = hex(&tpm2::digest(alg::SHA256, SEED.as_bytes()).unwrap());
        let want = [
            (12, format!("ctvm.cmdline log=debug vtpm.seed=sha256:{seed_digest}")),
            (12, "ctvm.policy".into()),
            (12, "ctvm.api".into()),
            (12, "\0\0\0\0".into()),
            (13, "ctvm.guest linux kernel".into()),
            (13, "ctvm.guest linux initrd".into()),
            (13, "ctvm.guest linux cmdline console=ttyS0 quiet".into()),
            (13, "ctvm.guest linux config guest=linux kind=linux trust=ctvm_agent".into()),
            (13, "ctvm.guest alpha kernel".into()),
            (13, "ctvm.guest alpha cmdline test=basics".into()),
            (13, "ctvm.guest alpha config guest=alpha mem=16M vtpm=on".into()),
            (13, "\0\0\0\0".into()),
        ];
        assert_eq!(d, want);
        // The seed itself appears nowhere in the log.
        assert!(m.iter().all(|m| !String::from_utf8_lossy(&m.description).contains(SEED)));
        assert!(m.iter().all(|m| !String::from_utf8_lossy(&m.content).contains(SEED)));
        // A text event's digest is of the text after its label.
        assert_eq!(&*m[6].content, b"console=ttyS0 quiet");
        assert_eq!(&*m[4].content, b"KERNEL");
        // A module file's digest is of its bytes: the kernel-API policy too.
        assert_eq!(&*m[2].content, b"API");
    }

    fn clock() -> impl FnMut() -> u64 {
        let mut t = 0;
        move || {
            t += 1;
            t
        }
    }

    /// TPM 2.0 through TIS and through CRB: every bank extended, the log
    /// replays to what the chip holds.
    #[test]
    fn a_tpm2_launch_replays_to_the_chip_pcrs() {
        let m = measurements("exit=qemu", &modules());
        for crb in [false, true] {
            let fake = Box::new(FakeTpm2::default());
            let transport: Box<dyn Transport> = if crb {
                Box::new(Crb::open(CrbChip::new(fake), 0xfed4_0000).unwrap())
            } else {
                Box::new(Tis::open(TisChip::new(fake), 0).unwrap())
            };
            let mut tpm = PlatformTpm::new(Family::V2, transport);
            let launch = measure(&mut tpm, &m, &mut clock()).unwrap();
            assert_eq!(launch.banks, [alg::SHA1, alg::SHA256]);
            for &bank in &launch.banks {
                let replayed = replay_agile(&launch.log, bank).unwrap();
                for (pcr, b, value) in launch.pcrs.iter().filter(|(_, b, _)| *b == bank) {
                    assert_eq!(&replayed[*pcr as usize], value, "PCR {pcr} bank {b:#x}");
                }
            }
            assert_ne!(launch.pcrs[0].2, alloc::vec![0; 20]);
        }
    }

    #[test]
    fn a_tpm2_without_sha256_is_refused() {
        let fake = FakeTpm2 { banks: alloc::vec![alg::SHA1], ..FakeTpm2::default() };
        let mut tpm = PlatformTpm::new(Family::V2, Tis::open(TisChip::new(Box::new(fake)), 0).unwrap());
        assert_eq!(measure(&mut tpm, &measurements("", &[]), &mut clock()).err(), Some(LaunchError::NoBank));
    }

    /// TPM 1.2 through TIS: vtpm-core as the chip, the SHA-1 log replays.
    #[test]
    fn a_tpm12_launch_replays_to_the_chip_pcrs() {
        struct Entropy;
        impl vtpm_core::Platform for Entropy {
            fn fill_random(&mut self, out: &mut [u8]) {
                out.fill(7);
            }
            fn ticks_us(&mut self) -> u64 {
                0
            }
        }
        let backend = crate::tpm::engine::backend(crate::tpm::engine::guest_tpm("platform", None, || Entropy));
        let mut tpm = PlatformTpm::new(Family::V12, Tis::open(TisChip::new(backend), 0).unwrap());
        let m = measurements("exit=qemu", &modules());
        let launch = measure(&mut tpm, &m, &mut clock()).unwrap();
        let events = event_log::parse(&launch.log).unwrap();
        assert_eq!(events.len(), m.len());
        let replayed = event_log::replay(&events, vtpm_core::sha1);
        assert_eq!(launch.pcrs[0], (12, alg::SHA1, replayed[12].to_vec()));
        assert_eq!(launch.pcrs[1], (13, alg::SHA1, replayed[13].to_vec()));
    }
}
