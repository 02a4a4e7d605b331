//! `ctvm-verify`: the command line of the CTVM remote verifier.
//!
//! ```text
//! ctvm-verify ca --secret SEED_FILE --out ca.der [--not-before UNIX]
//! ctvm-verify ca --console CONSOLE_LOG --out ca.der
//! ctvm-verify nonce --out nonce
//! ctvm-verify challenge --ca ca.der --ek-cert ek.der --aik aik.blob --blob-out blob --secret-out key
//! ctvm-verify activate --secret-in key --returned answer
//! ctvm-verify quote --ca ca.der --ek-cert ek.der --aik aik.blob --secret-in key --returned answer
//!                   --nonce nonce --pcrvals pcrvals --quote quote --event-log log [--ima ima.txt]
//!                   --manifest manifest.json [--json verdict.json]
//! ```
//!
//! `quote` prints one line (ACCEPT or REJECT [check] reason) and writes
//! the whole verdict as JSON with `--json` (`-` for standard output); it
//! exits 0 on ACCEPT, 1 on REJECT, 2 on a usage or input error.
//!
//! `ca --secret` derives the CA of a host without a platform TPM from its
//! `vtpm.seed`. With a platform TPM the CA comes from a secret sealed to
//! CTVM's measured launch, which no seed gives: `ca --console` takes the
//! CA certificate CTVM printed at a vTPM's first boot (checked to be
//! self-signed by its own key).

use std::collections::HashMap;
use std::process::ExitCode;

use ctvm_verify::{privacy_ca, tpm, verify, Evidence, Manifest};
use vtpm_trust::ekcert;

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let sub = it.next().unwrap_or_default();
    let mut map = HashMap::new();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        map.insert(k.trim_start_matches("--").to_string(), v);
    }
    (sub, map)
}

fn need<'a>(a: &'a HashMap<String, String>, k: &str) -> Result<&'a str, String> {
    a.get(k).map(String::as_str).ok_or(format!("--{k} is required"))
}

fn read(a: &HashMap<String, String>, k: &str) -> Result<Vec<u8>, String> {
    let p = need(a, k)?;
    std::fs::read(p).map_err(|e| format!("--{k} {p}: {e}"))
}

fn write(a: &HashMap<String, String>, k: &str, data: &[u8]) -> Result<(), String> {
    let p = need(a, k)?;
    std::fs::write(p, data).map_err(|e| format!("--{k} {p}: {e}"))
}

fn ca_modulus(a: &HashMap<String, String>) -> Result<Vec<u8>, String> {
    ekcert::ca_modulus_from_der(&read(a, "ca")?).map_err(|e| format!("--ca: not a certificate or public key ({e:?})"))
}

fn run() -> Result<bool, String> {
    let (sub, a) = args();
    match sub.as_str() {
        "ca" if a.contains_key("console") => {
            let console = String::from_utf8_lossy(&read(&a, "console")?).into_owned();
            write(&a, "out", &ctvm_verify::printed_ca(&console).map_err(|e| format!("--console: {e}"))?)?;
        }
        "ca" => {
            let text = String::from_utf8(read(&a, "secret")?).map_err(|_| "--secret: not text")?;
            let seed = tpm::hex_decode(text.trim()).map_err(|e| format!("--secret: {e}"))?;
            let seed: [u8; 32] = seed.try_into().map_err(|_| "--secret: not 64 hex digits")?;
            let not_before =
                a.get("not-before").map_or(Ok(1_767_225_600), |s| s.parse()).map_err(|_| "--not-before")?;
            let der = ekcert::CaKey::derive(&seed).certificate(not_before).map_err(|e| format!("{e:?}"))?;
            write(&a, "out", &der)?;
        }
        "nonce" => write(&a, "out", &privacy_ca::random::<20>())?,
        "challenge" => {
            let aik = tpm::TpmPubKey::parse(&read(&a, "aik")?)?;
            let c = privacy_ca::challenge(&read(&a, "ek-cert")?, &ca_modulus(&a)?, &aik, privacy_ca::random())?;
            write(&a, "blob-out", &c.blob)?;
            write(&a, "secret-out", &c.expected)?;
        }
        "activate" => {
            privacy_ca::check_activation(&read(&a, "secret-in")?, &read(&a, "returned")?)?;
            println!("AIK activated: it lives in the certified TPM");
        }
        "quote" => {
            let manifest: Manifest =
                serde_json::from_slice(&read(&a, "manifest")?).map_err(|e| format!("--manifest: {e}"))?;
            let nonce: tpm::Digest20 = read(&a, "nonce")?.try_into().map_err(|_| "--nonce: not 20 bytes")?;
            let (ek, aik, secret, returned) =
                (read(&a, "ek-cert")?, read(&a, "aik")?, read(&a, "secret-in")?, read(&a, "returned")?);
            let pcrvals = String::from_utf8(read(&a, "pcrvals")?).map_err(|_| "--pcrvals: not text")?;
            let (sig, log) = (read(&a, "quote")?, read(&a, "event-log")?);
            let ima = match a.get("ima") {
                Some(_) => Some(String::from_utf8(read(&a, "ima")?).map_err(|_| "--ima: not text")?),
                None => None,
            };
            let evidence = Evidence {
                ek_certificate: &ek,
                aik: &aik,
                activation: Some((&secret, &returned)),
                pcrvals: &pcrvals,
                quote_signature: &sig,
                event_log: &log,
                ima: ima.as_deref(),
            };
            let verdict = verify(&evidence, &manifest, &ca_modulus(&a)?, &nonce);
            println!("{}", verdict.summary());
            if let Some(out) = a.get("json") {
                let json = serde_json::to_string_pretty(&verdict).map_err(|e| e.to_string())?;
                if out == "-" {
                    println!("{json}");
                } else {
                    std::fs::write(out, json).map_err(|e| format!("--json {out}: {e}"))?;
                }
            }
            return Ok(verdict.accepted);
        }
        _ => {
            return Err(
                "usage: ctvm-verify ca|nonce|challenge|activate|quote --option value ... (see the crate doc)".into()
            )
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ctvm-verify: {e}");
            ExitCode::from(2)
        }
    }
}
