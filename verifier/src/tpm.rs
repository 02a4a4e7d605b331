//! The TPM 1.2 structures a verifier reads: identity keys (TPM_KEY or
//! TPM_PUBKEY), PCR composites, TPM_QUOTE_INFO and TPM_QUOTE_INFO2, and
//! the files tpm-quote-tools writes. Written from TPM Main Part 2.

use rsa::{BoxedUint, Pkcs1v15Sign, PublicKey};
use sha1::{Digest, Sha1};

pub type Digest20 = [u8; 20];

pub fn sha1(parts: &[&[u8]]) -> Digest20 {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A big-endian reader that reports running out as an error.
pub struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, at: 0 }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len()).ok_or("structure truncated")?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub fn sized(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
    pub fn pos(&self) -> usize {
        self.at
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.at
    }
}

/// An RSA public key as a TPM holds it, with its TPM_PUBKEY serialisation
/// (what TPM_ActivateIdentity's idDigest hashes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmPubKey {
    pub tpm_pubkey: Vec<u8>,
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
}

impl TpmPubKey {
    /// Reads a TPM_KEY or TPM_KEY12 blob (tpm_mkaik's `aik.blob`) or a
    /// TPM_PUBKEY (`aik.pub`; the first word of a TPM_PUBKEY is the
    /// algorithm, TPM_ALG_RSA = 1, which no TPM_KEY begins with).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        if bytes.get(..4) != Some(&[0, 0, 0, 1]) {
            r.bytes(4)?; // TPM_STRUCT_VER, or TPM_KEY12's tag and fill
            r.u16()?; // keyUsage
            r.u32()?; // keyFlags
            r.u8()?; // authDataUsage
        }
        let start = r.pos();
        let alg = r.u32()?;
        if alg != 1 {
            return Err(format!("key algorithm {alg} is not RSA"));
        }
        r.u16()?; // encScheme
        r.u16()?; // sigScheme
        let parms = r.sized()?;
        let mut p = Reader::new(parms);
        let bits = p.u32()?;
        p.u32()?; // numPrimes
        let exponent = p.sized()?.to_vec();
        if bits != 2048 {
            return Err(format!("an RSA key of {bits} bits, not 2048"));
        }
        let parms_end = r.pos();
        if bytes.get(..4) != Some(&[0, 0, 0, 1]) {
            r.sized()?; // PCRInfo of a TPM_KEY
        }
        let key_at = r.pos();
        let modulus = r.sized()?.to_vec();
        if modulus.len() != 256 {
            return Err("the modulus is not 256 bytes".into());
        }
        let mut tpm_pubkey = bytes[start..parms_end].to_vec();
        tpm_pubkey.extend_from_slice(&bytes[key_at..r.pos()]);
        Ok(TpmPubKey { tpm_pubkey, modulus, exponent })
    }

    /// The `rsa` public key (the TPM's default exponent 65537 when none).
    pub fn rsa(&self) -> Result<PublicKey, String> {
        let e = if self.exponent.is_empty() { &[1, 0, 1][..] } else { &self.exponent[..] };
        PublicKey::new(BoxedUint::from_be_slice_vartime(&self.modulus), BoxedUint::from_be_slice_vartime(e))
            .map_err(|e| format!("not an RSA public key: {e}"))
    }

    /// Verifies a PKCS#1 v1.5 signature over a SHA-1 digest.
    pub fn verify_sha1(&self, digest: &Digest20, sig: &[u8]) -> bool {
        self.rsa().map(|k| k.verify(Pkcs1v15Sign::new::<Sha1>(), digest, sig).is_ok()).unwrap_or(false)
    }
}

/// TPM_PCR_SELECTION with sizeOfSelect 3 (24 PCRs), as TrouSerS and CTVM
/// send it.
pub fn pcr_selection(pcrs: &[u32]) -> Vec<u8> {
    let mut bits = [0u8; 3];
    for &p in pcrs {
        bits[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut v = 3u16.to_be_bytes().to_vec();
    v.extend_from_slice(&bits);
    v
}

/// TPM_PCR_COMPOSITE of `values`, in ascending PCR order.
pub fn pcr_composite(values: &[(u32, Digest20)]) -> Vec<u8> {
    let pcrs: Vec<u32> = values.iter().map(|(p, _)| *p).collect();
    let mut v = pcr_selection(&pcrs);
    v.extend_from_slice(&((values.len() * 20) as u32).to_be_bytes());
    for (_, d) in values {
        v.extend_from_slice(d);
    }
    v
}

/// What a quote's signature covers, by the command that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum QuoteKind {
    /// TPM_Quote: TPM_QUOTE_INFO.
    Quote,
    /// TPM_Quote2 without version info: TPM_QUOTE_INFO2, locality 0.
    Quote2,
}

/// SHA-1 of TPM_QUOTE_INFO: 1.1.0.0 ‖ "QUOT" ‖ SHA1(composite) ‖ nonce.
pub fn quote_info(values: &[(u32, Digest20)], nonce: &Digest20) -> Digest20 {
    sha1(&[&[1, 1, 0, 0], b"QUOT", &sha1(&[&pcr_composite(values)]), nonce])
}

/// SHA-1 of TPM_QUOTE_INFO2: tag 0x0036 ‖ "QUT2" ‖ nonce ‖
/// TPM_PCR_INFO_SHORT(selection, localityAtRelease, SHA1(composite)).
pub fn quote_info2(values: &[(u32, Digest20)], nonce: &Digest20, locality_at_release: u8) -> Digest20 {
    let pcrs: Vec<u32> = values.iter().map(|(p, _)| *p).collect();
    sha1(&[
        &[0x00, 0x36],
        b"QUT2",
        nonce,
        &pcr_selection(&pcrs),
        &[locality_at_release],
        &sha1(&[&pcr_composite(values)]),
    ])
}

/// Which structure `sig` signs under `aik`, if any: Quote2 at locality 0
/// (TrouSerS and a guest's kernel send from locality 0), then Quote.
pub fn verify_quote(aik: &TpmPubKey, values: &[(u32, Digest20)], nonce: &Digest20, sig: &[u8]) -> Option<QuoteKind> {
    if aik.verify_sha1(&quote_info2(values, nonce, 0x01), sig) {
        return Some(QuoteKind::Quote2);
    }
    if aik.verify_sha1(&quote_info(values, nonce), sig) {
        return Some(QuoteKind::Quote);
    }
    None
}

/// tpm_getquote's PCR file: one `N=HEX` line per quoted PCR.
pub fn parse_pcrvals(text: &str) -> Result<Vec<(u32, Digest20)>, String> {
    let mut out: Vec<(u32, Digest20)> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (n, v) = line.trim().split_once('=').ok_or(format!("PCR file line {}: not N=HEX", i + 1))?;
        let n: u32 = n.trim().parse().map_err(|_| format!("PCR file line {}: bad PCR number", i + 1))?;
        let v = hex_decode(v.trim()).map_err(|e| format!("PCR file line {}: {e}", i + 1))?;
        let v: Digest20 = v.try_into().map_err(|_| format!("PCR file line {}: not 20 bytes", i + 1))?;
        if n > 23 || out.iter().any(|(p, _)| *p >= n) {
            return Err(format!("PCR file line {}: PCR {n} out of order or range", i + 1));
        }
        out.push((n, v));
    }
    Ok(out)
}

/// tpm_getquote's PCR file for `values`.
pub fn format_pcrvals(values: &[(u32, Digest20)]) -> String {
    values.iter().map(|(p, v)| format!("{p}={}\n", hex(v))).collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("not hex: {s:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_files_round_trip_and_refuse_disorder() {
        let v = vec![(0, [1; 20]), (10, [2; 20])];
        assert_eq!(parse_pcrvals(&format_pcrvals(&v)).unwrap(), v);
        assert!(parse_pcrvals("10=00\n").is_err());
        assert!(parse_pcrvals(&format!("10={}\n0={}\n", "00".repeat(20), "00".repeat(20))).is_err());
    }

    #[test]
    fn selection_and_composite_layout() {
        assert_eq!(pcr_selection(&[0, 10, 16]), [0, 3, 0x01, 0x04, 0x01]);
        let c = pcr_composite(&[(8, [7; 20])]);
        assert_eq!(&c[..9], &[0, 3, 0, 1, 0, 0, 0, 0, 20]);
    }
}
