//! Test-side marshalling and a small TrouSerS-like client that performs
//! real OIAP/OSAP authorisation against the engine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![allow(clippy::arithmetic_side_effects, dead_code)]

mod da;
mod ek;
mod keys;
mod nv;
mod ownership;
mod seal;
mod state;
mod tier_a;

use crate::consts::*;
use crate::crypto::{hmac_sha1, sha1, sha1_parts};
use crate::{Platform, Tpm};
use alloc::vec::Vec;
use std::sync::OnceLock;

extern crate std;

/// Deterministic entropy and a clock that advances 1000 µs per read.
pub struct TestPlatform {
    state: u64,
    now: u64,
}

impl TestPlatform {
    pub fn new(seed: u64) -> Self {
        TestPlatform { state: seed | 1, now: 0 }
    }
}

impl Platform for TestPlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
    }
    fn ticks_us(&mut self) -> u64 {
        self.now += 1000;
        self.now
    }
}

pub type T = Tpm<TestPlatform>;

/// A manufactured chip (made once: RSA key generation is slow), restored
/// from its blob for each test.
pub fn manufactured() -> T {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    let blob = BLOB.get_or_init(|| Tpm::manufacture(TestPlatform::new(1)).permanent_state());
    Tpm::from_permanent(blob, TestPlatform::new(2)).unwrap()
}

/// A manufactured chip after Startup(ST_CLEAR).
pub fn started() -> T {
    let mut t = manufactured();
    assert_eq!(rc(&t.execute(0, &startup(ST_CLEAR))), 0);
    t
}

/// A command under construction.
#[derive(Clone)]
pub struct Cmd {
    pub tag: u16,
    pub ord: u32,
    pub body: Vec<u8>,
}

impl Cmd {
    pub fn new(ord: u32) -> Self {
        Cmd { tag: TAG_RQU_COMMAND, ord, body: Vec::new() }
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.body.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.body.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.body.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.body.extend_from_slice(b);
        self
    }
    pub fn sized(self, b: &[u8]) -> Self {
        self.u32(b.len() as u32).raw(b)
    }
    pub fn tag(mut self, t: u16) -> Self {
        self.tag = t;
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.tag.to_be_bytes());
        v.extend_from_slice(&((10 + self.body.len()) as u32).to_be_bytes());
        v.extend_from_slice(&self.ord.to_be_bytes());
        v.extend_from_slice(&self.body);
        v
    }
}

pub fn startup(st: u16) -> Vec<u8> {
    Cmd::new(ORD_STARTUP).u16(st).bytes()
}

pub fn rc(resp: &[u8]) -> u32 {
    u32::from_be_bytes(resp[6..10].try_into().unwrap())
}

/// Checks the header is well formed and returns (tag, rc, body).
pub fn parse(resp: &[u8]) -> (u16, u32, &[u8]) {
    assert!(resp.len() >= 10);
    let tag = u16::from_be_bytes([resp[0], resp[1]]);
    let size = u32::from_be_bytes(resp[2..6].try_into().unwrap()) as usize;
    assert_eq!(size, resp.len());
    (tag, rc(resp), &resp[10..])
}

/// Runs `cmd` and asserts success; returns the body.
pub fn ok(t: &mut T, locality: u8, cmd: &[u8]) -> Vec<u8> {
    let r = t.execute(locality, cmd);
    let (_, code, body) = parse(&r);
    assert_eq!(code, 0, "command {:02x?} failed", &cmd[6..10]);
    body.to_vec()
}

/// Asserts the exact error response.
pub fn err(t: &mut T, cmd: &[u8], want: u32) {
    let r = t.execute(0, cmd);
    assert_eq!(rc(&r), want, "response {:02x?}", r);
    assert_eq!(r.len(), 10);
    assert_eq!(&r[..2], &[0, 0xC4]);
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// A client-side session.
#[derive(Clone)]
pub struct Sess {
    pub handle: u32,
    pub nonce_even: [u8; 20],
    /// OSAP shared secret, if any.
    pub shared: Option<[u8; 20]>,
    pub nonce_odd: [u8; 20],
}

pub fn oiap(t: &mut T) -> Sess {
    let b = ok(t, 0, &Cmd::new(ORD_OIAP).bytes());
    Sess { handle: be32(&b), nonce_even: b[4..24].try_into().unwrap(), shared: None, nonce_odd: [0; 20] }
}

pub fn osap(t: &mut T, et: u16, ev: u32, secret: &[u8; 20]) -> Sess {
    let odd_osap = [0x33u8; 20];
    let b = ok(t, 0, &Cmd::new(ORD_OSAP).u16(et).u32(ev).raw(&odd_osap).bytes());
    let even_osap: [u8; 20] = b[24..44].try_into().unwrap();
    let shared = hmac_sha1(secret, &[&even_osap, &odd_osap]);
    Sess { handle: be32(&b), nonce_even: b[4..24].try_into().unwrap(), shared: Some(shared), nonce_odd: [0; 20] }
}

impl Sess {
    fn key<'a>(&'a self, secret: &'a [u8; 20]) -> &'a [u8; 20] {
        self.shared.as_ref().unwrap_or(secret)
    }

    /// The request trailer over `params` (after the handles).
    pub fn trailer(&mut self, ord: u32, params: &[u8], secret: &[u8; 20], cont: bool) -> Vec<u8> {
        self.nonce_odd = sha1_parts(&[&self.nonce_even, b"odd"]);
        let digest = sha1_parts(&[&ord.to_be_bytes(), params]);
        let mac = hmac_sha1(self.key(secret), &[&digest, &self.nonce_even, &self.nonce_odd, &[u8::from(cont)]]);
        let mut v = Vec::new();
        v.extend_from_slice(&self.handle.to_be_bytes());
        v.extend_from_slice(&self.nonce_odd);
        v.push(u8::from(cont));
        v.extend_from_slice(&mac);
        v
    }

    /// Checks a response trailer over `out` (after the handles) and rolls
    /// the nonce.
    pub fn check(&mut self, ord: u32, out: &[u8], trailer: &[u8], secret: &[u8; 20]) {
        assert_eq!(trailer.len(), 41);
        let even: [u8; 20] = trailer[..20].try_into().unwrap();
        let cont = trailer[20];
        let digest = sha1_parts(&[&0u32.to_be_bytes(), &ord.to_be_bytes(), out]);
        let mac = hmac_sha1(self.key(secret), &[&digest, &even, &self.nonce_odd, &[cont]]);
        assert_eq!(&mac[..], &trailer[21..], "response HMAC");
        self.nonce_even = even;
    }

    /// ADIP-encrypts a new secret with this OSAP session's nonceEven.
    pub fn adip(&self, secret: &[u8; 20]) -> [u8; 20] {
        crate::crypto::adip_xor(secret, &self.shared.unwrap(), &self.nonce_even)
    }
}

/// Builds an authorised command: `handles` are outside the HMAC.
pub fn authed(ord: u32, handles: &[u8], params: &[u8], sessions: &mut [(&mut Sess, [u8; 20], bool)]) -> Vec<u8> {
    let tag = match sessions.len() {
        1 => TAG_RQU_AUTH1_COMMAND,
        2 => TAG_RQU_AUTH2_COMMAND,
        _ => TAG_RQU_COMMAND,
    };
    let mut c = Cmd::new(ord).tag(tag).raw(handles).raw(params);
    for (s, secret, cont) in sessions.iter_mut() {
        let tr = s.trailer(ord, params, secret, *cont);
        c = c.raw(&tr);
    }
    c.bytes()
}

/// Runs an authorised command, checks every response HMAC and returns the
/// output parameters (trailers removed).
pub fn run_authed(
    t: &mut T,
    locality: u8,
    ord: u32,
    handles: &[u8],
    params: &[u8],
    sessions: &mut [(&mut Sess, [u8; 20], bool)],
    out_handles: usize,
) -> Result<Vec<u8>, u32> {
    let cmd = authed(ord, handles, params, sessions);
    let r = t.execute(locality, &cmd);
    let (tag, code, body) = parse(&r);
    if code != 0 {
        assert_eq!(r.len(), 10);
        return Err(code);
    }
    let n = sessions.len();
    assert_eq!(tag, 0xC4 + n as u16);
    let out_len = body.len() - 41 * n;
    let (out, trailers) = body.split_at(out_len);
    for (i, (s, secret, _)) in sessions.iter_mut().enumerate() {
        s.check(ord, &out[out_handles..], &trailers[i * 41..(i + 1) * 41], secret);
    }
    Ok(out.to_vec())
}

pub fn digest_of(s: &[u8]) -> [u8; 20] {
    sha1(s)
}

pub const OWNER: [u8; 20] = [0x0A; 20];
/// The TrouSerS "well-known secret".
pub const SRK_AUTH: [u8; 20] = [0; 20];

/// The EK modulus, via ReadPubek.
pub fn read_pubek(t: &mut T) -> Vec<u8> {
    let b = ok(t, 0, &Cmd::new(ORD_READ_PUBEK).raw(&[7; 20]).bytes());
    b[28..284].to_vec()
}

/// TPM_KEY_PARMS of an RSA OAEP key (an EK, a CAP_CHECK_LOADED query) of `bits`.
pub fn rsa_key_parms(bits: u32) -> Vec<u8> {
    let rsa = Cmd::new(0).u32(bits).u32(2).u32(0).body;
    Cmd::new(0).u32(ALG_RSA).u16(ES_RSAESOAEP_SHA1_MGF1).u16(SS_NONE).sized(&rsa).body
}

/// A TPM_KEY (v1.1) template.
pub fn template(usage: u16, enc: u16, sig: u16, flags: u32, auth_usage: u8, pcr: &[u8]) -> Vec<u8> {
    let mut c = Cmd::new(0).raw(&[1, 1, 0, 0]).u16(usage).u32(flags).u8(auth_usage);
    c = c.u32(ALG_RSA).u16(enc).u16(sig).u32(12).u32(2048).u32(2).u32(0);
    c = c.sized(pcr).u32(0).u32(0);
    c.body
}

pub fn srk_template() -> Vec<u8> {
    template(KEY_STORAGE, ES_RSAESOAEP_SHA1_MGF1, SS_NONE, 0, AUTH_ALWAYS, &[])
}

/// The TakeOwnership command parameters (after the protocol id) for
/// `owner`/`srk` secrets encrypted to `ek`.
pub fn take_ownership_params(t: &mut T, ek: &[u8], owner: &[u8; 20], srk: &[u8; 20], srk_params: &[u8]) -> Vec<u8> {
    let enc_owner = crate::crypto::oaep_encrypt(&mut t.drbg, ek, owner).unwrap();
    let enc_srk = crate::crypto::oaep_encrypt(&mut t.drbg, ek, srk).unwrap();
    Cmd::new(0).u16(PID_OWNER).sized(&enc_owner).sized(&enc_srk).raw(srk_params).body
}

pub fn take_ownership(t: &mut T) -> Vec<u8> {
    let ek = read_pubek(t);
    let params = take_ownership_params(t, &ek, &OWNER, &SRK_AUTH, &srk_template());
    let mut s = oiap(t);
    run_authed(t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, OWNER, false)], 0).unwrap()
}

/// A started chip with an owner (OWNER) and SRK (SRK_AUTH), made once.
pub fn owned() -> T {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    let blob = BLOB.get_or_init(|| {
        let mut t = started();
        take_ownership(&mut t);
        t.permanent_state()
    });
    let mut t = Tpm::from_permanent(blob, TestPlatform::new(3)).unwrap();
    ok(&mut t, 0, &startup(ST_CLEAR));
    t
}

/// CreateWrapKey under `parent` with OSAP; returns the TPM_KEY blob.
pub fn create_wrap_key(
    t: &mut T,
    parent: u32,
    parent_auth: &[u8; 20],
    usage_auth: &[u8; 20],
    tmpl: &[u8],
) -> Result<Vec<u8>, u32> {
    let et = if parent == KH_SRK { ET_SRK } else { ET_KEYHANDLE };
    let mut s = osap(t, et, parent, parent_auth);
    let mut params = s.adip(usage_auth).to_vec();
    // The migration secret is encrypted with nonceOdd, which the trailer
    // derives from nonceEven: compute it the same way.
    let odd = sha1_parts(&[&s.nonce_even, b"odd"]);
    params.extend_from_slice(&crate::crypto::adip_xor(&[0x4D; 20], &s.shared.unwrap(), &odd));
    params.extend_from_slice(tmpl);
    run_authed(t, 0, ORD_CREATE_WRAP_KEY, &parent.to_be_bytes(), &params, &mut [(&mut s, *parent_auth, false)], 0)
}

/// LoadKey2 with an OIAP session; returns the handle.
pub fn load_key2(t: &mut T, parent: u32, parent_auth: &[u8; 20], blob: &[u8]) -> Result<u32, u32> {
    let mut s = oiap(t);
    run_authed(t, 0, ORD_LOAD_KEY2, &parent.to_be_bytes(), blob, &mut [(&mut s, *parent_auth, false)], 4)
        .map(|o| be32(&o))
}

pub const KEY_AUTH: [u8; 20] = [0x6B; 20];

/// Key blobs made once under the cached owner's SRK.
pub fn cached_key(kind: u16) -> Vec<u8> {
    static KEYS: OnceLock<std::collections::BTreeMap<u16, Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut t = owned();
        let mut m = std::collections::BTreeMap::new();
        let sign = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
        m.insert(KEY_SIGNING, create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &sign).unwrap());
        let bind = template(KEY_BIND, ES_RSAESOAEP_SHA1_MGF1, SS_NONE, 0, AUTH_ALWAYS, &[]);
        m.insert(KEY_BIND, create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &bind).unwrap());
        let storage = template(KEY_STORAGE, ES_RSAESOAEP_SHA1_MGF1, SS_NONE, 0, AUTH_ALWAYS, &[]);
        m.insert(KEY_STORAGE, create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &storage).unwrap());
        m
    })
    .get(&kind)
    .unwrap()
    .clone()
}

/// The modulus inside a TPM_KEY blob made by this TPM (v1.1, no PCR info).
pub fn key_modulus(blob: &[u8]) -> Vec<u8> {
    let mut r = crate::marshal::Reader::new(blob);
    let k = crate::key::KeyBlob::read(&mut r).unwrap();
    k.public.modulus
}
