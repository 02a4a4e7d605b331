//! CreateWrapKey, LoadKey2, GetPubKey, EvictKey, FlushSpecific, Sign, UnBind.

use super::*;
use crate::crypto::{oaep_encrypt, verify_sha1};

fn sign(t: &mut T, h: u32, auth: [u8; 20], area: &[u8]) -> Result<Vec<u8>, u32> {
    let mut s = oiap(t);
    let params = Cmd::new(0).sized(area).body;
    run_authed(t, 0, ORD_SIGN, &h.to_be_bytes(), &params, &mut [(&mut s, auth, false)], 0)
}

#[test]
fn wrapped_signing_key_loads_and_signs() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let n = key_modulus(&blob);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    let d = [0x42; 20];
    let sig = sign(&mut t, h, KEY_AUTH, &d).unwrap();
    assert_eq!(be32(&sig), 256);
    assert!(verify_sha1(&n, &d, &sig[4..]));
    // Wrong key secret; SHA-1 scheme needs exactly 20 bytes; no session.
    assert_eq!(sign(&mut t, h, [1; 20], &d), Err(TPM_AUTHFAIL));
    assert_eq!(sign(&mut t, h, KEY_AUTH, &[1; 21]), Err(TPM_BAD_PARAMETER));
    err(&mut t, &Cmd::new(ORD_SIGN).u32(h).sized(&d).bytes(), TPM_AUTHFAIL);
    assert_eq!(sign(&mut t, 0x0700_0000, KEY_AUTH, &d), Err(TPM_INVALID_KEYHANDLE));
    // The key shows up in the handle list.
    let list = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_KEY_HANDLE).sized(&[]).bytes());
    assert_eq!(&list[4..], &[&[0u8, 1][..], &h.to_be_bytes()].concat()[..]);
    // GetPubKey returns the same modulus.
    let mut s = oiap(&mut t);
    let pk =
        run_authed(&mut t, 0, ORD_GET_PUB_KEY, &h.to_be_bytes(), &[], &mut [(&mut s, KEY_AUTH, false)], 0).unwrap();
    assert_eq!(&pk[28..], &n[..]);
    err(&mut t, &Cmd::new(ORD_GET_PUB_KEY).u32(h).bytes(), TPM_AUTHFAIL);
    // EvictKey unloads it.
    ok(&mut t, 0, &Cmd::new(ORD_EVICT_KEY).u32(h).bytes());
    err(&mut t, &Cmd::new(ORD_EVICT_KEY).u32(h).bytes(), TPM_INVALID_KEYHANDLE);
    assert_eq!(sign(&mut t, h, KEY_AUTH, &d), Err(TPM_INVALID_KEYHANDLE));
}

#[test]
fn bind_key_unbinds_oaep_bound_data_and_refuses_other_usages() {
    let mut t = owned();
    let blob = cached_key(KEY_BIND);
    let n = key_modulus(&blob);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    let ct = oaep_encrypt(&mut t.drbg, &n, &[1, 1, 0, 0, PT_BIND, b'h', b'i']).unwrap();
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).sized(&ct).body;
    let out = run_authed(&mut t, 0, ORD_UNBIND, &h.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, true)], 0).unwrap();
    assert_eq!(out, [0, 0, 0, 2, b'h', b'i']);
    // Data that is not TPM_BOUND_DATA is refused.
    let raw = oaep_encrypt(&mut t.drbg, &n, b"raw").unwrap();
    let params = Cmd::new(0).sized(&raw).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_UNBIND, &h.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0),
        Err(TPM_INVALID_STRUCTURE)
    );
    // A bind key cannot sign; a signing key cannot unbind.
    assert_eq!(sign(&mut t, h, KEY_AUTH, &[0; 20]), Err(TPM_INVALID_KEYUSAGE));
    let sh = load_key2(&mut t, KH_SRK, &SRK_AUTH, &cached_key(KEY_SIGNING)).unwrap();
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).sized(&ct).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_UNBIND, &sh.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0),
        Err(TPM_INVALID_KEYUSAGE)
    );
    // Garbage ciphertext.
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).sized(&[0x55; 256]).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_UNBIND, &h.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0),
        Err(TPM_DECRYPT_ERROR)
    );
}

#[test]
fn key_hierarchy_under_a_loaded_storage_key() {
    let mut t = owned();
    let parent = load_key2(&mut t, KH_SRK, &SRK_AUTH, &cached_key(KEY_STORAGE)).unwrap();
    let tmpl = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_DER, 0, AUTH_NEVER, &[]);
    let child = create_wrap_key(&mut t, parent, &KEY_AUTH, &[0; 20], &tmpl).unwrap();
    // Without the parent loaded the child cannot load.
    let bad = load_key2(&mut t, KH_SRK, &SRK_AUTH, &child);
    assert_eq!(bad, Err(TPM_DECRYPT_ERROR));
    let h = load_key2(&mut t, parent, &KEY_AUTH, &child).unwrap();
    // authDataUsage NEVER: Sign without a session, DER scheme.
    let r = t.execute(0, &Cmd::new(ORD_SIGN).u32(h).sized(b"digest-info").bytes());
    let (tag, code, body) = parse(&r);
    assert_eq!((tag, code, body.len()), (0xC4, 0, 260));
    // A signing key is no parent.
    assert_eq!(create_wrap_key(&mut t, h, &[0; 20], &[0; 20], &tmpl), Err(TPM_INVALID_KEYUSAGE));
}

#[test]
fn create_wrap_key_error_paths() {
    let mut t = owned();
    let tmpl = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    // Wrong parent secret.
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &[1; 20], &KEY_AUTH, &tmpl), Err(TPM_AUTHFAIL));
    // Identity keys come only from MakeIdentity; bad schemes are refused.
    let id = template(KEY_IDENTITY, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &id), Err(TPM_INVALID_KEYUSAGE));
    // Schemes that do not fit the usage, and unknown usages, fail
    // libtpms' TPM_Key_CheckProperties: TPM_BAD_KEY_PROPERTY.
    let bad = template(KEY_STORAGE, ES_RSAESPKCSV15, SS_NONE, 0, AUTH_ALWAYS, &[]);
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &bad), Err(TPM_BAD_KEY_PROPERTY));
    let unknown = template(0x9999, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &unknown), Err(TPM_BAD_KEY_PROPERTY));
    // An authchange key passes the property check and is then refused.
    let ac = template(KEY_AUTHCHANGE, ES_RSAESOAEP_SHA1_MGF1, SS_NONE, 0, AUTH_ALWAYS, &[]);
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &ac), Err(TPM_INVALID_KEYUSAGE));
    // Undefined key flags are refused while parsing, before authorisation.
    let flags = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0x20, AUTH_ALWAYS, &[]);
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &[1; 20], &KEY_AUTH, &flags), Err(TPM_BAD_KEY_PROPERTY));
    let mut small = tmpl.clone();
    small[23..27].copy_from_slice(&1024u32.to_be_bytes());
    assert_eq!(create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &small), Err(TPM_BAD_KEY_PROPERTY));
    // ADIP needs OSAP: an OIAP session is refused.
    let mut s = oiap(&mut t);
    let params = [&[0u8; 40][..], &tmpl].concat();
    assert_eq!(
        run_authed(&mut t, 0, ORD_CREATE_WRAP_KEY, &KH_SRK.to_be_bytes(), &params, &mut [(&mut s, SRK_AUTH, false)], 0),
        Err(TPM_BAD_MODE)
    );
    // Unknown parent: even the OSAP session cannot be opened.
    err(&mut t, &Cmd::new(ORD_OSAP).u16(ET_KEYHANDLE).u32(0x0100_0001).raw(&[0; 20]).bytes(), TPM_INVALID_KEYHANDLE);
    let mut s = osap(&mut t, ET_SRK, KH_SRK, &SRK_AUTH);
    let params = [&s.adip(&KEY_AUTH)[..], &[0; 20], &tmpl].concat();
    let r = run_authed(
        &mut t,
        0,
        ORD_CREATE_WRAP_KEY,
        &0x0100_0001u32.to_be_bytes(),
        &params,
        &mut [(&mut s, SRK_AUTH, false)],
        0,
    );
    assert_eq!(r, Err(TPM_INVALID_KEYHANDLE));
}

#[test]
fn tampered_or_truncated_key_blobs_are_refused() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    // Flip a byte of the public modulus: the stored prime no longer
    // divides it (libtpms: TPM_BAD_PARAMETER, found before the digest).
    let mut b = blob.clone();
    b[50] ^= 1;
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &b), Err(TPM_BAD_PARAMETER));
    // Change another public field (authDataUsage ALWAYS -> NEVER): the
    // pubDataDigest inside encData no longer matches (TPM_AUTHFAIL).
    let mut b = blob.clone();
    assert_eq!(b[10], AUTH_ALWAYS);
    b[10] = AUTH_NEVER;
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &b), Err(TPM_AUTHFAIL));
    // Flip a byte of encData.
    let mut b = blob.clone();
    let last = b.len() - 10;
    b[last] ^= 1;
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &b), Err(TPM_DECRYPT_ERROR));
    // Truncated: as in libtpms the key parser runs into the session trailer,
    // whose continueAuthSession byte is then no boolean; shorter still, the
    // command runs out.
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob[..blob.len() - 1]), Err(TPM_BAD_PARAMETER));
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob[..100]), Err(TPM_BAD_PARAM_SIZE));
    // Changed version bytes are refused while parsing, before the
    // authorisation (libtpms' TPM_Key_LoadPubData): a TPM_KEY must be
    // version 1.1, a TPM_KEY12 must have tag 0x0028 and fill 0.
    for (at, value, want) in [(0, 2, TPM_BAD_VERSION), (1, 2, TPM_BAD_VERSION)] {
        let mut b = blob.clone();
        b[at] = value;
        assert_eq!(load_key2(&mut t, KH_SRK, &[9; 20], &b), Err(want));
    }
    for head in [[0, 0x28, 0, 1], [0, 0x29, 0, 0]] {
        let mut b = blob.clone();
        b[..4].copy_from_slice(&head);
        assert_eq!(load_key2(&mut t, KH_SRK, &[9; 20], &b), Err(TPM_BAD_KEY_PROPERTY));
    }
    // Revision bytes are not checked, but they are part of the public
    // digest bound into encData.
    let mut b = blob.clone();
    b[3] ^= 1;
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &b), Err(TPM_AUTHFAIL));
}

#[test]
fn key_slots_are_bounded_and_pcr_bound_keys_check_pcrs() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let mut hs = Vec::new();
    for _ in 0..crate::keys::MAX_KEYS {
        hs.push(load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap());
    }
    assert_eq!(load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob), Err(TPM_NOSPACE));
    ok(&mut t, 0, &Cmd::new(ORD_FLUSH_SPECIFIC).u32(hs[0]).u32(RT_KEY).bytes());
    err(&mut t, &Cmd::new(ORD_FLUSH_SPECIFIC).u32(hs[0]).u32(RT_KEY).bytes(), TPM_BAD_PARAMETER);
    for h in &hs[1..] {
        ok(&mut t, 0, &Cmd::new(ORD_EVICT_KEY).u32(*h).bytes());
    }
    // A key bound to PCR 10's current value signs until PCR 10 changes.
    let sel = [0u8, 3, 0, 4, 0];
    let pcr10 = t.pcr(10).unwrap();
    let composite = [&sel[..], &20u32.to_be_bytes(), &pcr10].concat();
    let info = [&sel[..], &digest_of(&composite), &[0u8; 20]].concat();
    let tmpl = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &info);
    let kb = create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &KEY_AUTH, &tmpl).unwrap();
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &kb).unwrap();
    sign(&mut t, h, KEY_AUTH, &[0; 20]).unwrap();
    ok(&mut t, 0, &Cmd::new(ORD_EXTEND).u32(10).raw(&[1; 20]).bytes());
    assert_eq!(sign(&mut t, h, KEY_AUTH, &[0; 20]), Err(TPM_WRONGPCRVAL));
}

#[test]
fn loaded_keys_survive_save_state() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    t.power_on();
    ok(&mut t, 0, &startup(ST_STATE));
    sign(&mut t, h, KEY_AUTH, &[5; 20]).unwrap();
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert_eq!(sign(&mut t, h, KEY_AUTH, &[5; 20]), Err(TPM_INVALID_KEYHANDLE));
}

#[test]
fn load_key_v11_ordinal_and_srk_public_read_rules() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let mut s = oiap(&mut t);
    let out =
        run_authed(&mut t, 0, ORD_LOAD_KEY, &KH_SRK.to_be_bytes(), &blob, &mut [(&mut s, SRK_AUTH, false)], 4).unwrap();
    let h = be32(&out);
    assert!(t.vol.keys.get(h).is_some());
    // The SRK's public key is not readable by GetPubKey (readSRKPub FALSE).
    err(&mut t, &Cmd::new(ORD_GET_PUB_KEY).u32(KH_SRK).bytes(), TPM_INVALID_KEYHANDLE);
    let mut s = oiap(&mut t);
    let r = run_authed(&mut t, 0, ORD_GET_PUB_KEY, &KH_SRK.to_be_bytes(), &[], &mut [(&mut s, SRK_AUTH, false)], 0);
    assert_eq!(r, Err(TPM_INVALID_KEYHANDLE));
    // A key blob cannot be loaded with tag C1 when the parent needs auth.
    err(&mut t, &Cmd::new(ORD_LOAD_KEY2).u32(KH_SRK).raw(&blob).bytes(), TPM_AUTHFAIL);
}

#[test]
fn capabilities_about_keys_and_handles() {
    let mut t = owned();
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &cached_key(KEY_SIGNING)).unwrap();
    let s = oiap(&mut t);
    let getcap = |area: u32, sub: &[u8]| Cmd::new(ORD_GET_CAPABILITY).u32(area).sized(sub).bytes();
    let keys = ok(&mut t, 0, &getcap(CAP_HANDLE, &RT_KEY.to_be_bytes()));
    assert_eq!(keys, [&[0u8, 0, 0, 6, 0, 1][..], &h.to_be_bytes()].concat());
    let auths = ok(&mut t, 0, &getcap(CAP_HANDLE, &RT_AUTH.to_be_bytes()));
    assert_eq!(auths, [&[0u8, 0, 0, 6, 0, 1][..], &s.handle.to_be_bytes()].concat());
    err(&mut t, &getcap(CAP_HANDLE, &9u32.to_be_bytes()), TPM_BAD_MODE);
    let free = ok(&mut t, 0, &getcap(CAP_PROPERTY, &0x104u32.to_be_bytes()));
    assert_eq!(be32(&free[4..]), 19);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_CHECK_LOADED, &rsa_key_parms(2048))), [0, 0, 0, 1, 1]);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_CHECK_LOADED, &rsa_key_parms(4096))), [0, 0, 0, 1, 0]);
    err(&mut t, &getcap(CAP_CHECK_LOADED, &[]), TPM_BAD_PARAM_SIZE);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_SELECT_SIZE, &[1, 2, 0, 3])), [0, 0, 0, 1, 1]);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_SELECT_SIZE, &[1, 2, 0, 4])), [0, 0, 0, 1, 0]);
    err(&mut t, &getcap(CAP_SELECT_SIZE, &[]), TPM_BAD_PARAM_SIZE);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_PID, &[0, 5])), [0, 0, 0, 1, 1]);
    assert_eq!(ok(&mut t, 0, &getcap(CAP_PID, &[0, 6])), [0, 0, 0, 1, 0]);
    let da = ok(&mut t, 0, &getcap(CAP_DA_LOGIC, &[0, 2]));
    assert_eq!(&da[4..6], &[0, 0x37]);
    err(&mut t, &getcap(CAP_FLAG, &0x10Au32.to_be_bytes()), TPM_BAD_MODE);
    err(&mut t, &getcap(0x99, &[]), TPM_BAD_MODE);
    // Owner installed: SetOwnerInstall is refused.
    ok(&mut t, 0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(PP_PRESENT).bytes());
    err(&mut t, &Cmd::new(ORD_SET_OWNER_INSTALL).u8(1).bytes(), TPM_OWNER_SET);
}

#[test]
fn legacy_key_signs_and_unbinds_pkcs1() {
    let mut t = owned();
    let tmpl = template(KEY_LEGACY, ES_RSAESPKCSV15, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_NEVER, &[]);
    let blob = create_wrap_key(&mut t, KH_SRK, &SRK_AUTH, &[0; 20], &tmpl).unwrap();
    let n = key_modulus(&blob);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    let r = ok(&mut t, 0, &Cmd::new(ORD_SIGN).u32(h).sized(&[3; 20]).bytes());
    assert!(crate::crypto::verify_sha1(&n, &[3; 20], &r[4..]));
    // PKCS#1 v1.5 encryption of raw data (no TPM_BOUND_DATA) comes back raw.
    let nb = crypto_bigint::BoxedUint::from_be_slice(&n, 2048).unwrap();
    let pk = rsa::PublicKey::new(nb, crypto_bigint::BoxedUint::from(65537u64)).unwrap();
    let ct = pk.encrypt(t.drbg.rng(), rsa::Pkcs1v15Encrypt, b"legacy").unwrap();
    let out = ok(&mut t, 0, &Cmd::new(ORD_UNBIND).u32(h).sized(&ct).bytes());
    assert_eq!(out, [&[0u8, 0, 0, 6][..], b"legacy"].concat());
}
