//! `ctvm-tpm`: the Linux test guest's TPM 1.2 client, over `/dev/tpm0`.
//! The initramfs has no TrouSerS; this speaks the same commands with the
//! client vtpm-server's tests use against libtpms (authorisation sessions
//! and their HMACs checked on every answer), built static.
//!
//! ```text
//! ctvm-tpm provision DIR KEEP_FROM KEEP_TO   first boot of a durable vTPM
//! ctvm-tpm check DIR                         a later boot: is everything still there?
//! ctvm-tpm quote DIR                         only the attestation part of `check`
//! ctvm-tpm nv                                what the NV index holds, or why it cannot be read
//! ```
//!
//! `provision` reads the EK and its certificate (NV 0x1000f000), takes
//! ownership, defines an NV index and writes it, copies the state blob the
//! store service wrote at that point (KEEP_FROM to KEEP_TO: the blob from
//! before the last NV write, for the rollback boot), makes an AIK, seals
//! data to PCRs 8 and 9, and writes the NV index again. It leaves
//! `ekcert.der`, `aik.blob` and `sealed.blob` in DIR.
//!
//! `check` proves the owner's secret still authorises, reads the NV index
//! back, loads the AIK and unseals the data. With `DIR/challenge` and
//! `DIR/nonce` from the verifier, it answers TPM_ActivateIdentity
//! (`DIR/answer`) and quotes PCRs 8–11 (`DIR/quote`, `DIR/pcrvals`).
//!
//! Every result is a line `ctvm-tpm: ...`; a failure is `ctvm-tpm: FAIL:
//! ...` and exit status 1.

#[path = "../../../../vtpm-core/server/tests/support/client.rs"]
mod client;
#[path = "../../../../vtpm-core/server/tests/support/tpm12.rs"]
mod tpm12;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use client::{Client, Kind, Transport};
use tpm12::*;
use vtpm_trust::ekcert;

/// The owner's secret (as `tpm_takeownership` makes from a password).
fn owner() -> Digest20 {
    sha1(&[b"ctvm owner"])
}
const SRK: Digest20 = WELL_KNOWN;
fn aik_auth() -> Digest20 {
    sha1(&[b"ctvm aik"])
}
/// The scenario's NV index: owner-write, readable by anyone.
const NV_INDEX: u32 = 0x0001_1000;
const NV_SIZE: u32 = 32;
const FIRST: &[u8] = b"first write";
const SECOND: &[u8] = b"second write, the last";
const SECRET: &[u8] = b"sealed to PCRs 8 and 9 at boot 1";
const TPM_NV_PER_OWNERWRITE: u32 = 0x0000_0002;

/// `/dev/tpm0`: one write per command, one read per response.
struct DevTpm(File);

impl Transport for DevTpm {
    fn name(&self) -> &str {
        "/dev/tpm0"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.0.write_all(command).expect("write to /dev/tpm0");
        let mut buf = vec![0u8; 4096];
        let n = self.0.read(&mut buf).expect("read from /dev/tpm0");
        buf.truncate(n);
        buf
    }
    fn set_locality(&mut self, _: u8) {}
}

type Result<T> = std::result::Result<T, String>;

fn say(line: &str) {
    println!("ctvm-tpm: {line}");
}

fn rc_name(rc: u32) -> String {
    let name = match rc {
        0x01 => " TPM_AUTHFAIL",
        0x1c => " TPM_FAILEDSELFTEST",
        0x800 => " TPM_RETRY",
        _ => "",
    };
    format!("{rc:#x}{name}")
}

fn tpm_err(what: &str) -> impl Fn(u32) -> String + '_ {
    move |rc| format!("{what}: rc {}", rc_name(rc))
}

/// Writes `data` to `path` and syncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// NV_ReadValue without authorisation (TrouSerS' `tpm_nvread` without -z).
fn nv_read(c: &mut Client<'_>, index: u32, offset: u32, len: u32) -> std::result::Result<Vec<u8>, u32> {
    let cmd = Cmd::new(tag::RQU_COMMAND, ord::NV_READ_VALUE).u32(index).u32(offset).u32(len);
    Ok(Reader::new(&c.plain("NV_ReadValue", Kind::Shape, cmd)?).sized().to_vec())
}

/// The EK certificate in NV 0x1000f000: the TCG_PCCLIENT_STORED_CERT
/// header's size, then the whole; returns the certificate's DER.
fn ek_certificate(c: &mut Client<'_>) -> Result<Vec<u8>> {
    let head = nv_read(c, ekcert::EK_CERT_NV_INDEX, 0, 5).map_err(tpm_err("NV_ReadValue(0x1000f000)"))?;
    let len = 5 + u32::from(u16::from_be_bytes([head[3], head[4]]));
    let nv = nv_read(c, ekcert::EK_CERT_NV_INDEX, 0, len).map_err(tpm_err("NV_ReadValue(0x1000f000)"))?;
    let der = ekcert::parse_nv_stored_cert(&nv).map_err(|e| format!("the EK certificate's NV format: {e:?}"))?;
    Ok(der.to_vec())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The version field of a sealed state blob (vtpm-trust's format).
fn blob_version(blob: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(blob.get(28..36)?.try_into().ok()?))
}

fn provision(c: &mut Client<'_>, dir: &Path, keep_from: &Path, keep_to: &Path) -> Result<()> {
    let ek = c.read_pubek().map_err(tpm_err("ReadPubek"))?;
    say(&format!("ReadPubek: EK modulus SHA-1 {}", hex(&sha1(&[&ek.modulus]))));
    let cert = ek_certificate(c)?;
    let certified = ekcert::ca_modulus_from_der(&cert).map_err(|e| format!("the EK certificate: {e:?}"))?;
    if certified != ek.modulus {
        return Err("the EK certificate names another key than ReadPubek's".into());
    }
    say(&format!("EK certificate read from NV 0x1000f000 ({} bytes), for the EK ReadPubek returns", cert.len()));
    write_synced(&dir.join("ekcert.der"), &cert)?;
    c.take_ownership(&ek, &owner(), &SRK).map_err(tpm_err("TakeOwnership"))?;
    say("TakeOwnership done");
    let rc = c.nv_define(&owner(), NV_INDEX, TPM_NV_PER_OWNERWRITE, NV_SIZE);
    if rc != 0 {
        return Err(tpm_err("NV_DefineSpace")(rc));
    }
    let mut first = FIRST.to_vec();
    first.resize(NV_SIZE as usize, 0);
    let rc = c.nv_write(&owner(), NV_INDEX, 0, &first);
    if rc != 0 {
        return Err(tpm_err("NV_WriteValue")(rc));
    }
    say(&format!("NV {NV_INDEX:#x} defined and written: {}", String::from_utf8_lossy(FIRST)));
    // The write was acknowledged: its blob is on disk. Keep a copy, as an
    // attacker would, to hand back later.
    let blob = read(keep_from)?;
    write_synced(keep_to, &blob)?;
    say(&format!("kept the state blob of version {} as {}", blob_version(&blob).unwrap_or(0), keep_to.display()));
    let (aik, _) =
        c.make_identity(&owner(), &SRK, &aik_auth(), &sha1(&[b"ctvm verifier"])).map_err(tpm_err("MakeIdentity"))?;
    write_synced(&dir.join("aik.blob"), &aik.raw)?;
    say("AIK made (MakeIdentity)");
    let pcrs = [8u32, 9];
    let values = pcrs.iter().map(|&p| c.pcr_read(p)).collect::<std::result::Result<Vec<_>, _>>();
    let values = values.map_err(tpm_err("PCRRead"))?;
    let sealed = c.seal(TPM_KH_SRK, &SRK, &WELL_KNOWN, &pcr_info(&pcrs, &values), SECRET).map_err(tpm_err("Seal"))?;
    write_synced(&dir.join("sealed.blob"), &sealed)?;
    say("data sealed to PCRs 8 and 9");
    let mut second = SECOND.to_vec();
    second.resize(NV_SIZE as usize, 0);
    let rc = c.nv_write(&owner(), NV_INDEX, 0, &second);
    if rc != 0 {
        return Err(tpm_err("NV_WriteValue")(rc));
    }
    say(&format!("NV {NV_INDEX:#x} written again: {}", String::from_utf8_lossy(SECOND)));
    say("provision done");
    Ok(())
}

fn check(c: &mut Client<'_>, dir: &Path) -> Result<()> {
    // The owner's secret authorises (TPM_OwnerReadInternalPub of the EK).
    let mut s = c.oiap(&owner());
    let cmd = Cmd::new(tag::RQU_AUTH1, ord::OWNER_READ_INTERNAL_PUB).u32(TPM_KH_EK);
    let out = c.authorised("OwnerReadInternalPub", Kind::Shape, cmd, &mut [&mut s], false);
    let ek = parse_pubkey(&mut Reader::new(&out.map_err(tpm_err("OwnerReadInternalPub"))?));
    let cert = read(&dir.join("ekcert.der"))?;
    if ekcert::ca_modulus_from_der(&cert).ok().as_deref() != Some(ek.modulus.as_slice()) {
        return Err("the EK is not the one certified at the first boot".into());
    }
    say("the owner authorises (OwnerReadInternalPub): the EK certified at the first boot");
    let nv = nv_read(c, NV_INDEX, 0, NV_SIZE).map_err(tpm_err("NV_ReadValue"))?;
    let text = String::from_utf8_lossy(nv.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
    if text.as_bytes() != SECOND {
        return Err(format!("NV {NV_INDEX:#x} holds {text:?}"));
    }
    say(&format!("NV {NV_INDEX:#x} reads back: {text}"));
    let handle = load_aik(c, dir)?;
    let data = c.unseal(TPM_KH_SRK, &SRK, &WELL_KNOWN, &read(&dir.join("sealed.blob"))?).map_err(tpm_err("Unseal"))?;
    if data != SECRET {
        return Err("Unseal returned other data".into());
    }
    say(&format!("Unseal: {}", String::from_utf8_lossy(&data)));
    attest(c, dir, handle)?;
    say("check done");
    Ok(())
}

fn load_aik(c: &mut Client<'_>, dir: &Path) -> Result<u32> {
    let aik = parse_key(&mut Reader::new(&read(&dir.join("aik.blob"))?));
    let handle = c.load_key2(TPM_KH_SRK, &SRK, &aik).map_err(tpm_err("LoadKey2(AIK)"))?;
    say("the AIK loads (LoadKey2 under the SRK)");
    Ok(handle)
}

/// With the verifier's `DIR/challenge` and `DIR/nonce`: ActivateIdentity
/// and a quote of PCRs 8–11.
fn attest(c: &mut Client<'_>, dir: &Path, handle: u32) -> Result<()> {
    let challenge = dir.join("challenge");
    if challenge.exists() {
        let mut sk = c.oiap(&aik_auth());
        let mut so = c.oiap(&owner());
        let cmd = Cmd::new(tag::RQU_AUTH2, ord::ACTIVATE_IDENTITY).handle(handle).sized(&read(&challenge)?);
        let answer = c.authorised("ActivateIdentity", Kind::Shape, cmd, &mut [&mut sk, &mut so], false);
        write_synced(&dir.join("answer"), &answer.map_err(tpm_err("ActivateIdentity"))?)?;
        say("ActivateIdentity answered the verifier's challenge");
        let nonce: Digest20 = read(&dir.join("nonce"))?.try_into().map_err(|_| "the nonce is not 20 bytes")?;
        let pcrs = [8u32, 9, 10, 11];
        let mut s = c.oiap(&aik_auth());
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::QUOTE2).handle(handle).bytes(&nonce).bytes(&pcr_selection(&pcrs)).u8(0);
        let out = c.authorised("Quote2", Kind::Shape, cmd, &mut [&mut s], false).map_err(tpm_err("Quote2"))?;
        let mut r = Reader::new(&out);
        r.bytes(26); // TPM_PCR_INFO_SHORT
        r.sized(); // versionInfo (none asked for)
        write_synced(&dir.join("quote"), r.sized())?;
        let mut pcrvals = String::new();
        for p in pcrs {
            let v = c.pcr_read(p).map_err(tpm_err("PCRRead"))?;
            pcrvals.push_str(&format!("{p}={}\n", hex(&v)));
        }
        write_synced(&dir.join("pcrvals"), pcrvals.as_bytes())?;
        say("Quote2 over PCRs 8-11 with the verifier's nonce");
    }
    Ok(())
}

/// What the NV index holds, or why it cannot be read.
fn nv(c: &mut Client<'_>) -> Result<()> {
    match nv_read(c, NV_INDEX, 0, NV_SIZE) {
        Ok(nv) => {
            let text = String::from_utf8_lossy(nv.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
            say(&format!("NV {NV_INDEX:#x} holds: {text}"));
        }
        Err(rc) => say(&format!("NV_ReadValue answers rc {}", rc_name(rc))),
    }
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    let usage = "usage: ctvm-tpm provision DIR KEEP_FROM KEEP_TO | check DIR | quote DIR | nv";
    let Some(device) = File::options().read(true).write(true).open("/dev/tpm0").ok() else {
        if args.first().map(String::as_str) == Some("nv") {
            say("no /dev/tpm0");
            return Ok(());
        }
        return Err("no /dev/tpm0".into());
    };
    let mut tpm = DevTpm(device);
    let mut c = Client::new(&mut tpm);
    c.record = false;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["provision", dir, from, to] => provision(&mut c, Path::new(dir), Path::new(from), Path::new(to)),
        ["check", dir] => check(&mut c, Path::new(dir)),
        ["quote", dir] => {
            let handle = load_aik(&mut c, Path::new(dir))?;
            attest(&mut c, Path::new(dir), handle)
        }
        ["nv"] => nv(&mut c),
        _ => Err(usage.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("FAIL: {e}"));
            ExitCode::FAILURE
        }
    }
}
