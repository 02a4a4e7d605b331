//! `ctvm-verify`: decides whether a CTVM guest runs what its owner expects,
//! from evidence the guest hands over and a reference manifest.
//!
//! The checks, in order; the first that fails ends the verification and
//! names itself (later checks would rest on what just failed):
//!
//! 1. `ek_certificate`: the EK certificate verifies under the CTVM CA.
//! 2. `aik_activation`: the AIK is in the TPM that EK belongs to (the
//!    verifier's TPM_ActivateIdentity challenge came back,
//!    [`privacy_ca`]).
//! 3. `quote`: the quote's signature verifies under the AIK over the PCR
//!    values given and the verifier's fresh nonce (a replayed quote
//!    carries another nonce and fails), and covers PCRs 8, 9, 11 (and 10
//!    with an IMA list).
//! 4. `event_log`: the event log replays to every quoted PCR but 10; PCRs
//!    8, 9 and 11 hold exactly CTVM's events: in 11 its configuration
//!    event, then at most its lock event (nothing else: the guest's vTPM
//!    takes no extend of PCR 11, so whatever replays there is CTVM's).
//! 5. `ima_list`: IMA's list replays to PCR 10, each line's template hash
//!    matching its fields.
//! 6. `kernel`, `initrd`, `cmdline`: the measured digests are the
//!    manifest's.
//! 7. `config` (the `ctvm.config v1` event is well formed), `hypervisor`,
//!    `integrity` (must be `enforce`), `lock` (a guest with integrity
//!    enforce or audit has CTVM's `ctvm.lock v1` event, measured when its
//!    agent locked the kernel layout and module isolation began, naming
//!    the manifest's agent digest and the same mode; with integrity off it
//!    has none), `trust`, `policy`, `api`, `vtpm`: the security
//!    configuration is the manifest's.
//! 8. `ima_allow_list`: every IMA entry's file digest is allowed (when
//!    the manifest has a list; boot_aggregate is exempt).

pub mod logs;
pub mod privacy_ca;
pub mod tpm;

use logs::{Event, EV_IPL, PCR_CONFIG, PCR_IMA};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tpm::{hex, sha1, Digest20, QuoteKind, TpmPubKey};

/// The reference manifest (JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// SHA-1 of the kernel image (bzImage) CTVM launched.
    pub kernel_sha1: String,
    /// SHA-1 of the initrd, or null when the guest has none.
    #[serde(default)]
    pub initrd_sha1: Option<String>,
    /// The guest's command line, exactly as measured.
    pub cmdline: String,
    /// SHA-256 of the hypervisor image.
    pub hypervisor_sha256: String,
    /// The modules that may run trusted (`trust=`), as a set.
    #[serde(default)]
    pub trust: Vec<String>,
    /// SHA-256 of the `ctvm.policy` module, or null for none.
    #[serde(default)]
    pub policy_sha256: Option<String>,
    /// SHA-256 of the `ctvm.api` module (the kernel-API allow-list), or
    /// null for none.
    #[serde(default)]
    pub api_sha256: Option<String>,
    /// SHA-256 `ctvm.policy` pins `ctvm_agent` by (its `sha256=`), which
    /// the lock event names; null accepts any (the policy's own digest
    /// already decides which agent could lock).
    #[serde(default)]
    pub agent_sha256: Option<String>,
    /// "durable" to require a vTPM whose state survives reboots; null
    /// accepts either.
    #[serde(default)]
    pub vtpm: Option<String>,
    /// File digests IMA may report, hex (`sha256:` or `sha1:` prefix
    /// allowed, as IMA prints them); null: no allow-list.
    #[serde(default)]
    pub ima_allow: Option<Vec<String>>,
}

/// What the guest (and the verifier's own challenge) supplies.
#[derive(Clone, Debug)]
pub struct Evidence<'a> {
    /// The EK certificate, DER (from NV index 0x1000f000).
    pub ek_certificate: &'a [u8],
    /// The AIK: TPM_KEY blob or TPM_PUBKEY.
    pub aik: &'a [u8],
    /// The activation: the session key the challenge carried and what
    /// TPM_ActivateIdentity returned.
    pub activation: Option<(&'a [u8], &'a [u8])>,
    /// tpm_getquote's PCR file (`N=HEX` lines).
    pub pcrvals: &'a str,
    /// The quote's signature (tpm_getquote's quote file).
    pub quote_signature: &'a [u8],
    /// binary_bios_measurements.
    pub event_log: &'a [u8],
    /// ascii_runtime_measurements, if the guest runs IMA.
    pub ima: Option<&'a str>,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// The decision and its reasons.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    /// The first check that failed.
    pub failed: Option<&'static str>,
    pub reason: Option<String>,
    pub checks: Vec<Check>,
    pub guest: Option<String>,
    pub quote_kind: Option<QuoteKind>,
    pub config: Option<String>,
    /// The lock event's text, when PCR 11 has one.
    pub lock: Option<String>,
}

impl Verdict {
    /// One line for people.
    pub fn summary(&self) -> String {
        match (&self.failed, &self.reason) {
            (Some(c), Some(r)) => format!("REJECT [{c}] {r}"),
            _ => format!(
                "ACCEPT guest={} ({} checks passed{})",
                self.guest.as_deref().unwrap_or("?"),
                self.checks.len(),
                self.quote_kind.map(|k| format!(", {k:?}")).unwrap_or_default()
            ),
        }
    }
}

struct Run {
    checks: Vec<Check>,
}

impl Run {
    fn check(&mut self, name: &'static str, result: Result<String, String>) -> Result<(), (&'static str, String)> {
        match result {
            Ok(detail) => {
                self.checks.push(Check { name, passed: true, detail });
                Ok(())
            }
            Err(reason) => {
                self.checks.push(Check { name, passed: false, detail: reason.clone() });
                Err((name, reason))
            }
        }
    }
}

fn parse_hex20(what: &str, s: &str) -> Result<Digest20, String> {
    tpm::hex_decode(s).ok().and_then(|v| v.try_into().ok()).ok_or(format!("manifest: {what} is not 40 hex digits"))
}

/// The fields of a `ctvm.config v1` text, in their fixed order.
pub fn parse_config(text: &str) -> Result<Vec<(&str, &str)>, String> {
    let rest = text.strip_prefix("ctvm.config v1 ").ok_or("not a ctvm.config v1 text")?;
    let keys = ["hypervisor", "integrity", "trust", "policy", "api", "vtpm"];
    let fields: Vec<(&str, &str)> = rest.split(' ').filter_map(|f| f.split_once('=')).collect();
    if fields.len() != keys.len() || rest.split(' ').count() != keys.len() {
        return Err(format!("configuration text has other fields than {keys:?}: {text:?}"));
    }
    for ((k, _), want) in fields.iter().zip(keys) {
        if *k != want {
            return Err(format!("configuration field {k:?} where {want:?} belongs"));
        }
    }
    Ok(fields)
}

/// Verifies `evidence` against `manifest`, the CTVM CA's modulus and the
/// nonce this verifier issued for the quote.
pub fn verify(evidence: &Evidence<'_>, manifest: &Manifest, ca_modulus: &[u8], nonce: &Digest20) -> Verdict {
    let mut run = Run { checks: Vec::new() };
    let mut verdict = Verdict {
        accepted: false,
        failed: None,
        reason: None,
        checks: Vec::new(),
        guest: vtpm_trust::ekcert::guest_of(evidence.ek_certificate),
        quote_kind: None,
        config: None,
        lock: None,
    };
    let outcome = verify_steps(evidence, manifest, ca_modulus, nonce, &mut run, &mut verdict);
    verdict.checks = run.checks;
    match outcome {
        Ok(()) => verdict.accepted = true,
        Err((name, reason)) => {
            verdict.failed = Some(name);
            verdict.reason = Some(reason);
        }
    }
    verdict
}

fn verify_steps(
    ev: &Evidence<'_>,
    m: &Manifest,
    ca_modulus: &[u8],
    nonce: &Digest20,
    run: &mut Run,
    verdict: &mut Verdict,
) -> Result<(), (&'static str, String)> {
    // 1. The EK certificate.
    let mut ek = Vec::new();
    run.check(
        "ek_certificate",
        vtpm_trust::ekcert::verify_signed_by(ev.ek_certificate, ca_modulus)
            .map(|k| {
                ek = k;
                format!("signed by the CTVM CA for guest {}", verdict.guest.as_deref().unwrap_or("?"))
            })
            .map_err(|e| format!("the EK certificate does not verify under the CTVM CA ({e:?})")),
    )?;

    // 2. The AIK is in that TPM.
    let aik = TpmPubKey::parse(ev.aik).map_err(|e| ("aik_activation", format!("AIK unreadable: {e}")));
    let aik = match aik {
        Ok(a) => a,
        Err((n, r)) => return run.check(n, Err(r)),
    };
    run.check(
        "aik_activation",
        match ev.activation {
            Some((expected, returned)) => {
                privacy_ca::check_activation(expected, returned).map(|()| "TPM_ActivateIdentity answered".into())
            }
            None => Err("no TPM_ActivateIdentity answer: nothing ties the AIK to the EK".into()),
        },
    )?;

    // 3. The quote.
    let values = tpm::parse_pcrvals(ev.pcrvals).map_err(|e| ("quote", e));
    let values = match values {
        Ok(v) => v,
        Err((n, r)) => return run.check(n, Err(r)),
    };
    let quoted = |p: u32| values.iter().find(|(q, _)| *q == p).map(|(_, v)| *v);
    let mut needed = vec![8, 9, PCR_CONFIG];
    if ev.ima.is_some() {
        needed.push(PCR_IMA);
    }
    let kind = tpm::verify_quote(&aik, &values, nonce, ev.quote_signature);
    run.check(
        "quote",
        match (kind, needed.iter().find(|p| quoted(**p).is_none())) {
            (None, _) => {
                Err("the quote's signature does not verify under the AIK with this nonce and these PCR values \
                 (a replayed quote, another TPM's, or edited values)"
                    .into())
            }
            (Some(_), Some(p)) => Err(format!("the quote does not cover PCR {p}")),
            (Some(k), None) => {
                verdict.quote_kind = Some(k);
                Ok(format!("{k:?} over PCRs {:?}", values.iter().map(|(p, _)| *p).collect::<Vec<_>>()))
            }
        },
    )?;

    // 4. The event log.
    let events = logs::parse_event_log(ev.event_log).map_err(|e| ("event_log", e));
    let events = match events {
        Ok(e) => e,
        Err((n, r)) => return run.check(n, Err(r)),
    };
    let replayed = logs::replay_events(&events);
    let mismatch = values.iter().find(|(p, v)| *p != PCR_IMA && replayed[*p as usize] != *v);
    let in_pcr = |p: u32| events.iter().filter(|e| e.pcr == p && e.kind != logs::EV_NO_ACTION).collect::<Vec<_>>();
    let shape = || -> Result<(), String> {
        let ipl = |e: &&Event, d: &[u8]| e.kind == EV_IPL && e.data == d;
        let p8 = in_pcr(8);
        if p8.len() != 1 || !ipl(&p8[0], b"kernel_cmdline") {
            return Err(format!("PCR 8 holds {} events, not CTVM's one command line", p8.len()));
        }
        let p9 = in_pcr(9);
        let want = if m.initrd_sha1.is_some() { 2 } else { 1 };
        if p9.len() != want || !ipl(&p9[0], b"kernel") || (want == 2 && !ipl(&p9[1], b"initrd")) {
            return Err(format!("PCR 9 holds {} events, not CTVM's kernel{}", p9.len(), ["", " and initrd"][want - 1]));
        }
        let p11 = in_pcr(PCR_CONFIG);
        let ctvm = |e: &Event, prefix: &str| logs::config_text(e).is_some_and(|t| t.starts_with(prefix));
        let shaped = match p11.as_slice() {
            [config] => ctvm(config, CONFIG_PREFIX),
            [config, lock] => ctvm(config, CONFIG_PREFIX) && ctvm(lock, LOCK_PREFIX),
            _ => false,
        };
        if !shaped {
            return Err(format!(
                "PCR 11 holds {} events, not CTVM's configuration event and at most its lock event",
                p11.len()
            ));
        }
        Ok(())
    };
    run.check(
        "event_log",
        match mismatch {
            Some((p, v)) => Err(format!(
                "the event log replays PCR {p} to {}, the quote says {}",
                hex(&replayed[*p as usize]),
                hex(v)
            )),
            None => shape().map(|()| format!("{} events replay to the quoted PCRs", events.len())),
        },
    )?;

    // 5. IMA's list.
    let mut ima_entries = Vec::new();
    if let Some(text) = ev.ima {
        let r = logs::parse_ima(text).and_then(|entries| {
            if let Some(e) = entries.iter().find(|e| e.pcr != PCR_IMA) {
                return Err(format!("IMA entry {} names PCR {}", e.path, e.pcr));
            }
            for e in &entries {
                if e.template_hash != [0; 20] && e.computed_template_hash()? != e.template_hash {
                    return Err(format!("IMA entry {}: its template hash does not match its fields", e.path));
                }
            }
            let pcr10 = logs::replay(entries.iter().map(|e| (PCR_IMA, e.extended())))[PCR_IMA as usize];
            match quoted(PCR_IMA) {
                Some(q) if q == pcr10 => Ok(entries),
                Some(q) => Err(format!("IMA's list replays PCR 10 to {}, the quote says {}", hex(&pcr10), hex(&q))),
                None => Err("PCR 10 is not quoted".into()),
            }
        });
        match r {
            Ok(entries) => {
                let n = entries.len();
                ima_entries = entries;
                run.check("ima_list", Ok(format!("{n} entries replay to PCR 10")))?;
            }
            Err(e) => run.check("ima_list", Err(e))?,
        }
    }

    // 6. What was launched.
    let digest_of = |p: u32, data: &[u8]| events.iter().find(|e| e.pcr == p && e.data == data).map(|e| e.digest);
    let compare = |what: &str, got: Option<Digest20>, want: Result<Digest20, String>| -> Result<String, String> {
        let want = want?;
        match got {
            Some(g) if g == want => Ok(format!("{what} {}", hex(&g))),
            Some(g) => Err(format!("measured {what} {} is not the manifest's {}", hex(&g), hex(&want))),
            None => Err(format!("no {what} measurement")),
        }
    };
    run.check("kernel", compare("kernel", digest_of(9, b"kernel"), parse_hex20("kernel_sha1", &m.kernel_sha1)))?;
    if let Some(i) = &m.initrd_sha1 {
        run.check("initrd", compare("initrd", digest_of(9, b"initrd"), parse_hex20("initrd_sha1", i)))?;
    }
    run.check(
        "cmdline",
        compare("command line", digest_of(8, b"kernel_cmdline"), Ok(sha1(&[m.cmdline.as_bytes()])))
            .map_err(|e| format!("{e} (manifest: {:?})", m.cmdline)),
    )?;

    // 7. The security configuration.
    let p11 = in_pcr(PCR_CONFIG);
    let config_event = p11[0];
    let text = logs::config_text(config_event).unwrap_or_default();
    verdict.config = Some(text.to_string());
    let fields = match parse_config(text) {
        Ok(f) if sha1(&[text.as_bytes()]) == config_event.digest => f,
        Ok(_) => {
            return run.check("config", Err("the configuration event's digest is not the SHA-1 of its text".into()))
        }
        Err(e) => return run.check("config", Err(e)),
    };
    run.check("config", Ok(text.to_string()))?;
    let field = |k: &str| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| *v).unwrap_or_default();
    let want_hv = m.hypervisor_sha256.to_ascii_lowercase();
    run.check(
        "hypervisor",
        if field("hypervisor") == want_hv {
            Ok(format!("hypervisor {want_hv}"))
        } else {
            Err(format!("measured hypervisor {} is not the manifest's {want_hv}", field("hypervisor")))
        },
    )?;
    run.check(
        "integrity",
        match field("integrity") {
            "enforce" => Ok("integrity=enforce".into()),
            other => Err(format!("run-time integrity is {other:?}, it must be \"enforce\"")),
        },
    )?;
    let lock = p11.get(1).copied();
    verdict.lock = lock.and_then(logs::config_text).map(str::to_string);
    run.check("lock", check_lock(field("integrity"), lock, m))?;
    let mut want_trust: Vec<&str> = m.trust.iter().map(String::as_str).collect();
    want_trust.sort_unstable();
    want_trust.dedup();
    let want_trust = if want_trust.is_empty() { "-".to_string() } else { want_trust.join(",") };
    run.check(
        "trust",
        if field("trust") == want_trust {
            Ok(format!("trust={want_trust}"))
        } else {
            Err(format!("trusted modules {:?} are not the manifest's {want_trust:?}", field("trust")))
        },
    )?;
    for (name, want) in [("policy", &m.policy_sha256), ("api", &m.api_sha256)] {
        let want = want.as_deref().map(str::to_ascii_lowercase).unwrap_or_else(|| "none".into());
        run.check(
            name,
            if field(name) == want {
                Ok(format!("{name}={want}"))
            } else {
                Err(format!("measured {name} {} is not the manifest's {want}", field(name)))
            },
        )?;
    }
    run.check(
        "vtpm",
        match m.vtpm.as_deref() {
            Some(want) if field("vtpm") != want => {
                Err(format!("vTPM is {:?}, the manifest wants {want:?}", field("vtpm")))
            }
            _ => Ok(format!("vtpm={}", field("vtpm"))),
        },
    )?;

    // 8. The IMA allow-list.
    if let (Some(allow), Some(_)) = (&m.ima_allow, ev.ima) {
        // Entries are file digests in hex, optionally prefixed `algo:`.
        let allowed: Vec<String> =
            allow.iter().map(|a| a.rsplit(':').next().unwrap_or_default().to_ascii_lowercase()).collect();
        let outside =
            ima_entries.iter().find(|e| e.path != "boot_aggregate" && !allowed.contains(&hex(&e.file_digest)));
        run.check(
            "ima_allow_list",
            match outside {
                Some(e) => Err(format!("IMA entry {} ({}) is not in the allow-list", e.path, hex(&e.file_digest))),
                None => Ok(format!("{} entries allowed", ima_entries.len())),
            },
        )?;
    }
    Ok(())
}

/// The configuration text's first word and version.
const CONFIG_PREFIX: &str = "ctvm.config v1 ";
/// The lock text's.
const LOCK_PREFIX: &str = "ctvm.lock v1 ";

/// The `lock` check: a guest with run-time integrity must show CTVM's lock
/// event, `ctvm.lock v1 agent=<sha256> mode=<its integrity>`, digest the
/// SHA-1 of that text, agent the manifest's (when it names one); a guest
/// without must show none.
fn check_lock(integrity: &str, lock: Option<&Event>, m: &Manifest) -> Result<String, String> {
    let Some(event) = lock else {
        return match integrity {
            "off" => Ok("integrity=off: no lock event, as expected".into()),
            mode => Err(format!(
                "integrity={mode} but the agent never locked: PCR 11 holds no ctvm.lock event, so the guest ran \
                 without module isolation (its agent did not load, or failed) when it quoted"
            )),
        };
    };
    let text = logs::config_text(event).unwrap_or_default();
    if integrity == "off" {
        return Err(format!("integrity=off but PCR 11 holds a lock event: {text:?}"));
    }
    if sha1(&[text.as_bytes()]) != event.digest {
        return Err("the lock event's digest is not the SHA-1 of its text".into());
    }
    let fields: Vec<(&str, &str)> =
        text.strip_prefix(LOCK_PREFIX).unwrap_or_default().split(' ').filter_map(|f| f.split_once('=')).collect();
    let (agent, mode) = match fields.as_slice() {
        [("agent", a), ("mode", m)] if a.len() == 64 && a.bytes().all(|b| b.is_ascii_hexdigit()) => (*a, *m),
        _ => return Err(format!("the lock event is not `ctvm.lock v1 agent=<sha256> mode=<mode>`: {text:?}")),
    };
    if mode != integrity {
        return Err(format!("the lock event says mode={mode}, the configuration integrity={integrity}"));
    }
    if let Some(want) = m.agent_sha256.as_deref().map(str::to_ascii_lowercase) {
        if agent != want {
            return Err(format!("the agent that locked is {agent}, not the manifest's {want}"));
        }
    }
    Ok(text.to_string())
}

/// SHA-256 in hex, for manifests (hypervisor image, policy module).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The CTVM vTPM CA certificate (DER) CTVM printed on its console at a
/// vTPM's first boot: the PEM block after the `vTPM CA certificate` line,
/// each line's console prefix ignored. With a platform TPM the CA is
/// derived from a secret sealed to CTVM's measured launch, so this (and
/// not `vtpm.seed`) is where a verifier learns it. The certificate must be
/// a self-signed CA certificate whose key signed it.
pub fn printed_ca(console: &str) -> Result<Vec<u8>, String> {
    let mut lines = console.lines().skip_while(|l| !l.contains("vTPM CA certificate"));
    lines.next().ok_or("no \"vTPM CA certificate\" line")?;
    let mut lines = lines.map(|l| l.split_whitespace().last().unwrap_or(""));
    if lines.next() != Some("CERTIFICATE-----") {
        return Err("no PEM block after the \"vTPM CA certificate\" line".into());
    }
    let mut b64 = String::new();
    for l in lines.by_ref() {
        if l == "CERTIFICATE-----" {
            let der = base64_decode(&b64)?;
            let modulus =
                vtpm_trust::ekcert::ca_modulus_from_der(&der).map_err(|e| format!("not a certificate ({e:?})"))?;
            vtpm_trust::ekcert::verify_signed_by(&der, &modulus)
                .map_err(|e| format!("the printed CA certificate is not signed by its own key ({e:?})"))?;
            return Ok(der);
        }
        b64.push_str(l);
    }
    Err("the PEM block does not end".into())
}

fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = A.iter().position(|&a| a == c).ok_or("not base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
