//! Client-side TPM 1.2: command marshalling, response parsing, OIAP/OSAP
//! authorisation (HMAC-SHA1 with rolling nonces, verified on the way back)
//! and the RSA the client itself must do (OAEP "TCPA" for TakeOwnership,
//! PKCS#1 v1.5 SHA-1 verification of signatures and quotes).
//!
//! Written from the TPM 1.2 specification, part 3 (commands) and part 2
//! (structures), independently of any engine, so that it can judge both.

#![allow(dead_code)]

use hmac::{Hmac, KeyInit, Mac};
use rsa::{BoxedUint, Oaep, Pkcs1v15Sign, PublicKey};
use sha1::{Digest, Sha1};

pub type Digest20 = [u8; 20];

pub mod tag {
    pub const RQU_COMMAND: u16 = 0x00c1;
    pub const RQU_AUTH1: u16 = 0x00c2;
    pub const RQU_AUTH2: u16 = 0x00c3;
    pub const RSP_COMMAND: u16 = 0x00c4;
    pub const RSP_AUTH1: u16 = 0x00c5;
    pub const RSP_AUTH2: u16 = 0x00c6;
}

pub mod ord {
    pub const OIAP: u32 = 0x0a;
    pub const OSAP: u32 = 0x0b;
    pub const TAKE_OWNERSHIP: u32 = 0x0d;
    pub const CHANGE_AUTH_OWNER: u32 = 0x10;
    pub const RESET_LOCK_VALUE: u32 = 0x40;
    pub const EXTEND: u32 = 0x14;
    pub const PCR_READ: u32 = 0x15;
    pub const QUOTE: u32 = 0x16;
    pub const SEAL: u32 = 0x17;
    pub const UNSEAL: u32 = 0x18;
    pub const CREATE_WRAP_KEY: u32 = 0x1f;
    pub const GET_PUB_KEY: u32 = 0x21;
    pub const SIGN: u32 = 0x3c;
    pub const LOAD_KEY2: u32 = 0x41;
    pub const GET_RANDOM: u32 = 0x46;
    pub const SELF_TEST_FULL: u32 = 0x50;
    pub const CONTINUE_SELF_TEST: u32 = 0x53;
    pub const GET_TEST_RESULT: u32 = 0x54;
    pub const OWNER_CLEAR: u32 = 0x5b;
    pub const GET_CAPABILITY: u32 = 0x65;
    pub const MAKE_IDENTITY: u32 = 0x79;
    pub const READ_PUBEK: u32 = 0x7c;
    pub const SAVE_STATE: u32 = 0x98;
    pub const STARTUP: u32 = 0x99;
    pub const FLUSH_SPECIFIC: u32 = 0xba;
    pub const PCR_RESET: u32 = 0xc8;
    pub const NV_DEFINE_SPACE: u32 = 0xcc;
    pub const NV_WRITE_VALUE: u32 = 0xcd;
    pub const NV_READ_VALUE: u32 = 0xcf;
    pub const GET_TICKS: u32 = 0xf1;
    pub const PHYSICAL_ENABLE: u32 = 0x6f;
    pub const UNBIND: u32 = 0x1e;
    pub const EVICT_KEY: u32 = 0x22;
    pub const QUOTE2: u32 = 0x3e;
    pub const STIR_RANDOM: u32 = 0x47;
    pub const GET_CAPABILITY_OWNER: u32 = 0x66;
    pub const ACTIVATE_IDENTITY: u32 = 0x7a;
    pub const OWNER_READ_INTERNAL_PUB: u32 = 0x81;
    pub const NV_WRITE_VALUE_AUTH: u32 = 0xce;
    pub const NV_READ_VALUE_AUTH: u32 = 0xd0;
    pub const PHYSICAL_SET_DEACTIVATED: u32 = 0x72;
    pub const TSC_PHYSICAL_PRESENCE: u32 = 0x4000_000a;
}

pub mod rc {
    pub const SUCCESS: u32 = 0;
    pub const AUTHFAIL: u32 = 0x01;
    pub const AUTH2FAIL: u32 = 0x1d;
    pub const DISABLED: u32 = 0x07;
    pub const INVALID_AUTHHANDLE: u32 = 0x22;
    pub const INVALID_KEYUSAGE: u32 = 0x24;
    pub const BAD_PARAMETER: u32 = 0x03;
    pub const BADINDEX: u32 = 0x02;
    pub const BAD_ORDINAL: u32 = 0x0a;
    pub const INVALID_KEYHANDLE: u32 = 0x0c;
    pub const WRONGPCRVAL: u32 = 0x18;
    pub const BAD_PARAM_SIZE: u32 = 0x19;
    pub const DECRYPT_ERROR: u32 = 0x21;
    pub const BAD_LOCALITY: u32 = 0x3d;
    pub const BADTAG: u32 = 0x1e;
    pub const INVALID_POSTINIT: u32 = 0x26;
    pub const NOT_RESETABLE: u32 = 0x32;
    pub const AREA_LOCKED: u32 = 0x3c;
    pub const BAD_MODE: u32 = 0x2c;
    pub const WRONG_ENTITYTYPE: u32 = 0x25;
    pub const DEFEND_LOCK_RUNNING: u32 = 0x803;
}

/// Capability areas and sub-capabilities the Linux driver and TrouSerS use.
pub mod cap {
    pub const ORD: u32 = 0x01;
    pub const FLAG: u32 = 0x04;
    pub const PROPERTY: u32 = 0x05;
    pub const VERSION: u32 = 0x06;
    pub const KEY_HANDLE: u32 = 0x07;
    pub const NV_LIST: u32 = 0x0d;
    pub const NV_INDEX: u32 = 0x11;
    pub const VERSION_VAL: u32 = 0x1a;
    pub const DA_LOGIC: u32 = 0x19;
    pub const FLAG_PERMANENT: u32 = 0x108;
    pub const FLAG_VOLATILE: u32 = 0x109;
    pub const PROP_PCR: u32 = 0x101;
    pub const PROP_MANUFACTURER: u32 = 0x103;
    pub const PROP_KEYS: u32 = 0x104;
    pub const PROP_OWNER: u32 = 0x111;
    pub const PROP_TIS_TIMEOUT: u32 = 0x115;
    pub const PROP_DURATION: u32 = 0x120;
    pub const PROP_INPUT_BUFFER: u32 = 0x124;
}

pub const TPM_KH_SRK: u32 = 0x4000_0000;
pub const TPM_KH_OWNER: u32 = 0x4000_0001;
pub const TPM_KH_EK: u32 = 0x4000_0006;
pub const TPM_KEY_BIND: u16 = 0x0014;
pub const TPM_NV_PER_AUTHWRITE: u32 = 0x0000_0004;
pub const TPM_NV_PER_AUTHREAD: u32 = 0x0004_0000;
pub const TPM_ET_KEYHANDLE: u16 = 0x0001;
pub const TPM_ET_OWNER: u16 = 0x0002;
pub const TPM_ET_SRK: u16 = 0x0004;
pub const TPM_PID_ADCP: u16 = 0x0004;
pub const TPM_ET_NV: u16 = 0x000b;
pub const TPM_PID_OWNER: u16 = 0x0005;
pub const TPM_KEY_SIGNING: u16 = 0x0010;
pub const TPM_KEY_STORAGE: u16 = 0x0011;
pub const TPM_KEY_IDENTITY: u16 = 0x0012;
pub const TPM_ES_NONE: u16 = 0x0001;
pub const TPM_ES_RSAESOAEP_SHA1_MGF1: u16 = 0x0003;
pub const TPM_SS_NONE: u16 = 0x0001;
pub const TPM_SS_RSASSAPKCS1V15_SHA1: u16 = 0x0002;
pub const TPM_NV_PER_OWNERWRITE: u32 = 0x0000_0002;
pub const TPM_NV_PER_OWNERREAD: u32 = 0x0002_0000;
/// The TPM's well-known secret, the `-z`/`-y` of tpm-tools: twenty zeros.
pub const WELL_KNOWN: Digest20 = [0; 20];

pub fn sha1(parts: &[&[u8]]) -> Digest20 {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> Digest20 {
    let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// A command under construction: header first, size patched at the end.
#[derive(Clone)]
pub struct Cmd {
    buf: Vec<u8>,
    /// Where the parameters that enter the auth digest begin (after handles).
    params_from: usize,
}

impl Cmd {
    pub fn new(tag: u16, ordinal: u32) -> Cmd {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&tag.to_be_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&ordinal.to_be_bytes());
        Cmd { buf, params_from: 10 }
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// A u32 length followed by the bytes.
    pub fn sized(self, v: &[u8]) -> Self {
        self.u32(v.len() as u32).bytes(v)
    }
    /// A handle: it is not part of the authorisation digest.
    pub fn handle(mut self, h: u32) -> Self {
        self.buf.extend_from_slice(&h.to_be_bytes());
        self.params_from = self.buf.len();
        self
    }
    pub fn ordinal(&self) -> u32 {
        u32::from_be_bytes(self.buf[6..10].try_into().unwrap())
    }
    /// SHA1(ordinal ‖ parameters), the inParamDigest of part 1 §13.
    pub fn param_digest(&self) -> Digest20 {
        sha1(&[&self.buf[6..10], &self.buf[self.params_from..]])
    }
    pub fn finish(mut self) -> Vec<u8> {
        let n = self.buf.len() as u32;
        self.buf[2..6].copy_from_slice(&n.to_be_bytes());
        self.buf
    }
}

/// Reads a response. Panics on truncation: a well-formed TPM answer has
/// every field its tag and rc promise, and a test must say so loudly.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        assert!(
            self.pos + n <= self.data.len(),
            "response truncated: need {n} bytes at {} of {}",
            self.pos,
            self.data.len()
        );
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    pub fn digest(&mut self) -> Digest20 {
        self.bytes(20).try_into().unwrap()
    }
    pub fn sized(&mut self) -> &'a [u8] {
        let n = self.u32() as usize;
        self.bytes(n)
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.pos..];
        self.pos = self.data.len();
        s
    }
}

/// Header fields of a response, checked for consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u16,
    pub size: u32,
    pub rc: u32,
}

pub fn header(resp: &[u8]) -> Header {
    assert!(resp.len() >= 10, "response shorter than a header: {}", hex(resp));
    let h = Header {
        tag: u16::from_be_bytes([resp[0], resp[1]]),
        size: u32::from_be_bytes(resp[2..6].try_into().unwrap()),
        rc: u32::from_be_bytes(resp[6..10].try_into().unwrap()),
    };
    assert_eq!(h.size as usize, resp.len(), "paramSize disagrees with the response length: {}", hex(resp));
    h
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// An authorisation session held by the client.
#[derive(Debug, Clone)]
pub struct Session {
    pub handle: u32,
    pub nonce_even: Digest20,
    /// The HMAC key: the entity's usage secret (OIAP) or the shared secret (OSAP).
    pub key: Digest20,
    /// OSAP only: the shared secret, also used to encrypt new secrets.
    pub shared: Option<Digest20>,
}

/// The deterministic client-side nonce source: both TPMs under comparison
/// then receive byte-identical commands.
pub struct Nonces(u64);

impl Nonces {
    pub fn new(seed: u64) -> Self {
        Nonces(seed)
    }
    pub fn next(&mut self) -> Digest20 {
        let n = self.peek();
        self.0 += 1;
        n
    }
    /// The nonce `next` will return.
    pub fn peek(&self) -> Digest20 {
        sha1(&[b"client nonce", &(self.0 + 1).to_be_bytes()])
    }
}

/// The fields of a command's authorisation trailer, kept to verify the answer.
pub struct Sent {
    pub nonce_odd: Digest20,
    pub cont: bool,
}

/// Appends one authorisation trailer (handle ‖ nonceOdd ‖ continue ‖ HMAC).
pub fn authorize(digest: &Digest20, s: &Session, nonce_odd: Digest20, cont: bool, into: &mut Vec<u8>) -> Sent {
    let c = [cont as u8];
    let mac = hmac_sha1(&s.key, &[digest, &s.nonce_even, &nonce_odd, &c]);
    into.extend_from_slice(&s.handle.to_be_bytes());
    into.extend_from_slice(&nonce_odd);
    into.push(cont as u8);
    into.extend_from_slice(&mac);
    Sent { nonce_odd, cont }
}

/// Splits a successful authorised response into its output parameters and
/// checks each session's resAuth; the sessions take the new nonceEven.
/// Returns the output parameters (after the 10-byte header).
pub fn verify_response<'a>(ordinal: u32, resp: &'a [u8], sessions: &mut [&mut Session], sent: &[Sent]) -> &'a [u8] {
    let h = header(resp);
    assert_eq!(h.rc, rc::SUCCESS, "verify_response on a failed command");
    let trailer = 41 * sessions.len();
    assert!(resp.len() >= 10 + trailer, "authorised response too short: {}", hex(resp));
    let out = &resp[10..resp.len() - trailer];
    // Returned handles are not authorised (LoadKey2's inkeyHandle).
    let handles = if ordinal == ord::LOAD_KEY2 { 4 } else { 0 };
    let digest = sha1(&[&h.rc.to_be_bytes(), &ordinal.to_be_bytes(), &out[handles..]]);
    for (i, (s, sent)) in sessions.iter_mut().zip(sent).enumerate() {
        let t = &resp[resp.len() - trailer + 41 * i..][..41];
        let nonce_even: Digest20 = t[..20].try_into().unwrap();
        let cont = t[20];
        let mac = hmac_sha1(&s.key, &[&digest, &nonce_even, &sent.nonce_odd, &[cont]]);
        assert_eq!(&t[21..41], &mac, "resAuth of session {i} does not verify (ordinal {ordinal:#x})");
        assert_eq!(cont != 0, sent.cont, "continueAuthSession echoed wrongly");
        s.nonce_even = nonce_even;
    }
    out
}

/// The XOR encryption of a new secret (part 1 §13.8, "ADIP"):
/// secret ⊕ SHA1(sharedSecret ‖ nonce).
pub fn xor_encrypt(secret: &Digest20, shared: &Digest20, nonce: &Digest20) -> Digest20 {
    let pad = sha1(&[shared, nonce]);
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = secret[i] ^ pad[i];
    }
    out
}

/// TPM_PCR_SELECTION with a 3-byte map for the given PCRs.
pub fn pcr_selection(pcrs: &[u32]) -> Vec<u8> {
    let mut map = [0u8; 3];
    for &p in pcrs {
        map[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut v = 3u16.to_be_bytes().to_vec();
    v.extend_from_slice(&map);
    v
}

/// TPM_PCR_COMPOSITE for a selection and the values of its PCRs, in order.
pub fn pcr_composite(pcrs: &[u32], values: &[Digest20]) -> Vec<u8> {
    let mut v = pcr_selection(pcrs);
    v.extend_from_slice(&((values.len() * 20) as u32).to_be_bytes());
    for d in values {
        v.extend_from_slice(d);
    }
    v
}

/// TPM_PCR_INFO binding to `pcrs` at `values` (digestAtCreation left 0;
/// the TPM fills it).
pub fn pcr_info(pcrs: &[u32], values: &[Digest20]) -> Vec<u8> {
    let mut v = pcr_selection(pcrs);
    v.extend_from_slice(&sha1(&[&pcr_composite(pcrs, values)]));
    v.extend_from_slice(&[0; 20]);
    v
}

/// TPM_KEY_PARMS for RSA with the given schemes, 2048 bits, two primes,
/// default exponent.
pub fn rsa_key_parms(es: u16, ss: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&1u32.to_be_bytes()); // TPM_ALG_RSA
    v.extend_from_slice(&es.to_be_bytes());
    v.extend_from_slice(&ss.to_be_bytes());
    v.extend_from_slice(&12u32.to_be_bytes());
    v.extend_from_slice(&2048u32.to_be_bytes());
    v.extend_from_slice(&2u32.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

/// A TPM_KEY (version 1.1) template: no PCR binding, no key yet.
pub fn key_template(usage: u16, es: u16, ss: u16) -> Vec<u8> {
    let mut v = vec![1, 1, 0, 0];
    v.extend_from_slice(&usage.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes()); // keyFlags
    v.push(1); // TPM_AUTH_ALWAYS
    v.extend_from_slice(&rsa_key_parms(es, ss));
    v.extend_from_slice(&0u32.to_be_bytes()); // PCRInfoSize
    v.extend_from_slice(&0u32.to_be_bytes()); // pubKey.keyLength
    v.extend_from_slice(&0u32.to_be_bytes()); // encDataSize
    v
}

/// The parts of a TPM_KEY (or TPM_KEY12, whose tag+fill stand where the
/// version does) that a client looks at.
#[derive(Debug, Clone)]
pub struct KeyBlob {
    pub raw: Vec<u8>,
    pub usage: u16,
    pub enc_scheme: u16,
    pub sig_scheme: u16,
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
    pub enc_data_len: usize,
}

fn rsa_parms(r: &mut Reader<'_>) -> (u16, u16, Vec<u8>) {
    let alg = r.u32();
    assert_eq!(alg, 1, "key algorithm is not RSA");
    let es = r.u16();
    let ss = r.u16();
    let parms = r.sized();
    let mut p = Reader::new(parms);
    let bits = p.u32();
    assert_eq!(bits, 2048, "key is not 2048-bit");
    let _primes = p.u32();
    let exponent = p.sized().to_vec();
    (es, ss, exponent)
}

/// Parses a TPM_KEY from the front of `r`.
pub fn parse_key(r: &mut Reader<'_>) -> KeyBlob {
    let start = r.pos();
    let _ver = r.u32();
    let usage = r.u16();
    let _flags = r.u32();
    let _auth = r.u8();
    let (enc_scheme, sig_scheme, exponent) = rsa_parms(r);
    let _pcr_info = r.sized();
    let modulus = r.sized().to_vec();
    let enc_data_len = r.sized().len();
    let raw = r.data[start..r.pos()].to_vec();
    KeyBlob { raw, usage, enc_scheme, sig_scheme, modulus, exponent, enc_data_len }
}

/// A TPM_PUBKEY (TPM_KEY_PARMS ‖ TPM_STORE_PUBKEY).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubKey {
    pub raw: Vec<u8>,
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
}

pub fn parse_pubkey(r: &mut Reader<'_>) -> PubKey {
    let start = r.pos();
    let (_, _, exponent) = rsa_parms(r);
    let modulus = r.sized().to_vec();
    PubKey { raw: r.data[start..r.pos()].to_vec(), modulus, exponent }
}

/// The RSA public key, with the TPM's default exponent when none is given.
pub fn rsa_key(modulus: &[u8], exponent: &[u8]) -> PublicKey {
    let e = if exponent.is_empty() { &[1, 0, 1][..] } else { exponent };
    let n = BoxedUint::from_be_slice_vartime(modulus);
    PublicKey::new(n, BoxedUint::from_be_slice_vartime(e)).expect("TPM key is a valid RSA public key")
}

/// Verifies an RSA PKCS#1 v1.5 SHA-1 signature over `digest`.
pub fn verify_sha1(key: &PublicKey, digest: &Digest20, sig: &[u8]) -> Result<(), String> {
    key.verify(Pkcs1v15Sign::new::<Sha1>(), digest, sig).map_err(|e| e.to_string())
}

/// OAEP-SHA1 with the label "TCPA", as TakeOwnership expects.
pub fn oaep_tcpa(key: &PublicKey, msg: &[u8]) -> Vec<u8> {
    key.encrypt(&mut OsRng, Oaep::<Sha1>::new_with_label(&b"TCPA"[..]), msg).expect("OAEP encryption")
}

/// TPM_QUOTE_INFO digest: SHA1(1.1.0.0 ‖ "QUOT" ‖ SHA1(composite) ‖ externalData).
pub fn quote_info_digest(composite: &[u8], external: &Digest20) -> Digest20 {
    sha1(&[&[1, 1, 0, 0], b"QUOT", &sha1(&[composite]), external])
}

/// Entropy from the OS for the client's RSA padding.
pub struct OsRng;

impl rsa::rand_core::TryRng for OsRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        getrandom::fill(dst).expect("getrandom");
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for OsRng {}
