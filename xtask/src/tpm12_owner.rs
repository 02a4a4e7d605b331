//! A swtpm TPM 1.2 owned the way `tpm_takeownership -z` owns a real chip:
//! owner and SRK secrets of twenty zero bytes, TrouSerS's well-known
//! secret, which is what CTVM authorizes with. `swtpm_setup
//! --owner-well-known` cannot make that chip: it hashes every password,
//! the zeros included. So the harness lets swtpm_setup make the EK and
//! sends `TPM_TakeOwnership` itself.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::Fail;

const ZEROS: [u8; 20] = [0; 20];

/// Makes `state` a TPM 1.2 with an EK, owned with the zero secrets.
pub fn own_with_zero_secrets(state: &Path) -> Result<(), Fail> {
    let mut setup = Command::new("swtpm_setup");
    setup.arg("--tpm-state").arg(state).args(["--createek", "--overwrite"]).stdout(Stdio::null());
    crate::util::run(&mut setup)?;
    let socket = state.join("own.sock");
    // A child, not a daemon: ended through std, with no `kill` binary
    // needed (a minimal Debian root has none).
    let mut swtpm = Command::new("swtpm")
        .arg("socket")
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--server")
        .arg(format!("type=unixio,path={}", socket.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| Fail(format!("cannot start swtpm: {e}")))?;
    let owned = take_ownership(&socket);
    // swtpm wrote the owned state at the command; it can go now.
    let _ = swtpm.kill();
    let _ = swtpm.wait();
    let _ = std::fs::remove_file(&socket);
    owned
}

fn take_ownership(socket: &Path) -> Result<(), Fail> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chip = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Fail(format!("swtpm's command socket: {e}"))),
        }
    };
    chip.set_read_timeout(Some(Duration::from_secs(30)))?;
    use sha2::Digest;
    let seed = sha2::Sha256::digest(format!("{:?}{}", Instant::now(), std::process::id())).into();
    let mut drbg = vtpm_core::crypto::Drbg::new(seed);
    // TPM_ReadPubek (0x7c): the EK's TPM_PUBKEY, then a checksum.
    let ek = transmit(&mut chip, 0x00c1, 0x7c, &drbg.nonce())?;
    let modulus = ek_modulus(&ek).ok_or_else(|| Fail::new("TPM_ReadPubek: no 2048-bit RSA EK"))?;
    let enc = |drbg: &mut vtpm_core::crypto::Drbg| {
        vtpm_core::crypto::oaep_encrypt(drbg, modulus, &ZEROS).ok_or_else(|| Fail::new("OAEP to the EK failed"))
    };
    let (owner, srk) = (enc(&mut drbg)?, enc(&mut drbg)?);
    // TPM_OIAP (0x0a): handle, nonceEven.
    let oiap = transmit(&mut chip, 0x00c1, 0x0a, &[])?;
    let (handle, nonce_even) = oiap.split_at_checked(4).ok_or_else(|| Fail::new("TPM_OIAP: short answer"))?;
    // TPM_TakeOwnership (0x0d): TPM_PID_OWNER, the two secrets under the
    // EK, and the SRK's parameters (a TPM_KEY 1.1: storage, authorization
    // always, RSA 2048 with OAEP, no PCRs, no key yet).
    let mut params = 5u16.to_be_bytes().to_vec();
    for secret in [&owner, &srk] {
        params.extend_from_slice(&(secret.len() as u32).to_be_bytes());
        params.extend_from_slice(secret);
    }
    let rsa = [1u32.to_be_bytes().as_slice(), &3u16.to_be_bytes(), &1u16.to_be_bytes(), &12u32.to_be_bytes()].concat();
    let rsa_parms = [2048u32, 2, 0].map(u32::to_be_bytes).concat();
    let srk_params = [&[1, 1, 0, 0, 0, 0x11, 0, 0, 0, 0, 1][..], &rsa, &rsa_parms, &[0; 12]].concat();
    params.extend_from_slice(&srk_params);
    let digest = vtpm_core::crypto::sha1_parts(&[&0x0du32.to_be_bytes(), &params]);
    let nonce_odd = drbg.nonce();
    let mac = vtpm_core::crypto::hmac_sha1(&ZEROS, &[&digest, nonce_even, &nonce_odd, &[0]]);
    let body = [params.as_slice(), handle, &nonce_odd, &[0], &mac].concat();
    transmit(&mut chip, 0x00c2, 0x0d, &body).map(drop)
}

/// Sends one command; returns the answer's body after a zero return code.
fn transmit(chip: &mut UnixStream, tag: u16, ordinal: u32, body: &[u8]) -> Result<Vec<u8>, Fail> {
    let size = 10 + body.len() as u32;
    let command = [tag.to_be_bytes().as_slice(), &size.to_be_bytes(), &ordinal.to_be_bytes(), body].concat();
    chip.write_all(&command)?;
    let mut header = [0u8; 10];
    chip.read_exact(&mut header)?;
    let [_, _, s0, s1, s2, s3, r0, r1, r2, r3] = header;
    let mut rest = vec![0; (u32::from_be_bytes([s0, s1, s2, s3]) as usize).saturating_sub(10)];
    chip.read_exact(&mut rest)?;
    match u32::from_be_bytes([r0, r1, r2, r3]) {
        0 => Ok(rest),
        rc => Err(Fail(format!("swtpm answered TPM 1.2 ordinal {ordinal:#x} with {rc:#x}"))),
    }
}

/// The modulus of the EK's TPM_PUBKEY (RSA, 2048 bits).
fn ek_modulus(pubkey: &[u8]) -> Option<&[u8]> {
    let be32 = |at: usize| Some(u32::from_be_bytes(pubkey.get(at..at + 4)?.try_into().ok()?) as usize);
    // algorithmParms: algId, encScheme, sigScheme, then its sized parms.
    let key_at = 12 + be32(8)?;
    let n = pubkey.get(key_at + 4..key_at + 4 + be32(key_at)?)?;
    (be32(0)? == 1 && n.len() == 256).then_some(n)
}
