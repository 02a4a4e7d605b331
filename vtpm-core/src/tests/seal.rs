//! Seal/Unseal, Quote/Quote2, MakeIdentity/ActivateIdentity.

use super::*;
use crate::crypto::{oaep_encrypt, verify_sha1};

const DATA_AUTH: [u8; 20] = [0xDA; 20];

/// TPM_PCR_INFO binding to PCR 10's current value.
fn pcr10_info(t: &T) -> Vec<u8> {
    let sel = [0u8, 3, 0, 4, 0];
    let composite = [&sel[..], &20u32.to_be_bytes(), &t.pcr(10).unwrap()].concat();
    [&sel[..], &digest_of(&composite), &[0u8; 20]].concat()
}

fn seal(t: &mut T, pcr_info: &[u8], data: &[u8]) -> Result<Vec<u8>, u32> {
    let mut s = osap(t, ET_SRK, KH_SRK, &SRK_AUTH);
    let params = Cmd::new(0).raw(&s.adip(&DATA_AUTH)).sized(pcr_info).sized(data).body;
    run_authed(t, 0, ORD_SEAL, &KH_SRK.to_be_bytes(), &params, &mut [(&mut s, SRK_AUTH, false)], 0)
}

fn unseal(t: &mut T, blob: &[u8], key_auth: [u8; 20], data_auth: [u8; 20]) -> Result<Vec<u8>, u32> {
    let mut k = oiap(t);
    let mut d = oiap(t);
    run_authed(
        t,
        0,
        ORD_UNSEAL,
        &KH_SRK.to_be_bytes(),
        blob,
        &mut [(&mut k, key_auth, false), (&mut d, data_auth, false)],
        0,
    )
}

#[test]
fn seal_unseal_round_trip_bound_to_pcr10() {
    let mut t = owned();
    let info = pcr10_info(&t);
    let blob = seal(&mut t, &info, b"disk key").unwrap();
    assert_eq!(&blob[..4], &[1, 1, 0, 0], "TPM_STORED_DATA v1.1");
    assert_eq!(unseal(&mut t, &blob, SRK_AUTH, DATA_AUTH).unwrap(), [&8u32.to_be_bytes()[..], b"disk key"].concat());
    // Wrong data secret: the second session fails.
    assert_eq!(unseal(&mut t, &blob, SRK_AUTH, [1; 20]), Err(TPM_AUTH2FAIL));
    // Wrong key secret: the first session fails.
    assert_eq!(unseal(&mut t, &blob, [1; 20], DATA_AUTH), Err(TPM_AUTHFAIL));
    // Tampered sealInfo: the stored digest no longer matches.
    let mut bad = blob.clone();
    bad[30] ^= 1;
    assert_eq!(unseal(&mut t, &bad, SRK_AUTH, DATA_AUTH), Err(TPM_NOTSEALED_BLOB));
    // After PCR 10 changes, unsealing fails.
    ok(&mut t, 0, &Cmd::new(ORD_EXTEND).u32(10).raw(&[9; 20]).bytes());
    assert_eq!(unseal(&mut t, &blob, SRK_AUTH, DATA_AUTH), Err(TPM_WRONGPCRVAL));
}

#[test]
fn seal_with_pcr_info_long_yields_stored_data12_and_checks_locality() {
    let mut t = owned();
    let sel = [0u8, 3, 0, 4, 0];
    let composite = [&sel[..], &20u32.to_be_bytes(), &t.pcr(10).unwrap()].concat();
    // localityAtRelease: locality 0 only.
    let info = [&[0u8, 6, 0, 1][..], &sel, &sel, &[0; 20], &digest_of(&composite)].concat();
    let blob = seal(&mut t, &info, b"x").unwrap();
    assert_eq!(&blob[..4], &[0, 0x16, 0, 0], "TPM_STORED_DATA12");
    assert_eq!(unseal(&mut t, &blob, SRK_AUTH, DATA_AUTH).unwrap(), [0, 0, 0, 1, b'x']);
    let mut k = oiap(&mut t);
    let mut d = oiap(&mut t);
    let r = run_authed(
        &mut t,
        1,
        ORD_UNSEAL,
        &KH_SRK.to_be_bytes(),
        &blob,
        &mut [(&mut k, SRK_AUTH, false), (&mut d, DATA_AUTH, false)],
        0,
    );
    assert_eq!(r, Err(TPM_BAD_LOCALITY));
}

#[test]
fn seal_error_paths() {
    let mut t = owned();
    assert_eq!(seal(&mut t, &[], &[0; 200]), Err(TPM_BAD_DATASIZE));
    assert_eq!(seal(&mut t, &[0, 9], b"x"), Err(TPM_INVALID_PCR_INFO));
    // OIAP cannot carry the ADIP-encrypted secret.
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).raw(&[0; 20]).sized(&[]).sized(b"x").body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_SEAL, &KH_SRK.to_be_bytes(), &params, &mut [(&mut s, SRK_AUTH, false)], 0),
        Err(TPM_BAD_MODE)
    );
    // Unseal with a single session when the SRK needs auth.
    let blob = seal(&mut t, &[], b"x").unwrap();
    let mut d = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_UNSEAL, &KH_SRK.to_be_bytes(), &blob, &mut [(&mut d, DATA_AUTH, false)], 0),
        Err(TPM_AUTHFAIL)
    );
    // A sealed blob from the data session only works with OIAP for the data.
    let mut k = oiap(&mut t);
    let mut o = osap(&mut t, ET_SRK, KH_SRK, &SRK_AUTH);
    let r = run_authed(
        &mut t,
        0,
        ORD_UNSEAL,
        &KH_SRK.to_be_bytes(),
        &blob,
        &mut [(&mut k, SRK_AUTH, false), (&mut o, DATA_AUTH, false)],
        0,
    );
    assert_eq!(r, Err(TPM_AUTH2FAIL));
    // Garbage blob.
    let junk = [&[1u8, 1, 0, 0, 0, 0, 0, 0][..], &256u32.to_be_bytes(), &[7; 256]].concat();
    // Whatever fails while decrypting and checking the blob is
    // TPM_NOTSEALED_BLOB (libtpms, Unseal action 6.h).
    assert_eq!(unseal(&mut t, &junk, SRK_AUTH, DATA_AUTH), Err(TPM_NOTSEALED_BLOB));
}

fn quote_info(composite: &[u8], nonce: &[u8; 20]) -> [u8; 20] {
    sha1_parts(&[&[1, 1, 0, 0], b"QUOT", &digest_of(composite), nonce])
}

#[test]
fn quote_signs_the_pcr_composite() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let n = key_modulus(&blob);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    ok(&mut t, 0, &Cmd::new(ORD_EXTEND).u32(10).raw(&[1; 20]).bytes());
    let nonce = [0x4E; 20];
    let params = Cmd::new(0).raw(&nonce).u16(3).raw(&[0x01, 0x04, 0]).body;
    let mut s = oiap(&mut t);
    let out = run_authed(&mut t, 0, ORD_QUOTE, &h.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0).unwrap();
    let composite_len = 2 + 3 + 4 + 40;
    let composite = &out[..composite_len];
    assert_eq!(&composite[..9], &[0, 3, 1, 4, 0, 0, 0, 0, 40]);
    assert_eq!(&composite[29..49], &t.pcr(10).unwrap());
    assert_eq!(be32(&out[composite_len..]), 256);
    assert!(verify_sha1(&n, &quote_info(composite, &nonce), &out[composite_len + 4..]));
    assert!(!verify_sha1(&n, &quote_info(composite, &[0; 20]), &out[composite_len + 4..]));
    // A bind key cannot quote.
    let bh = load_key2(&mut t, KH_SRK, &SRK_AUTH, &cached_key(KEY_BIND)).unwrap();
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_QUOTE, &bh.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0),
        Err(TPM_INVALID_KEYUSAGE)
    );
    // Selection larger than the PCR bank.
    let bad = Cmd::new(0).raw(&nonce).u16(4).raw(&[1, 0, 0, 0]).body;
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_QUOTE, &h.to_be_bytes(), &bad, &mut [(&mut s, KEY_AUTH, false)], 0),
        Err(TPM_INVALID_PCR_INFO)
    );
}

#[test]
fn quote2_signs_quote_info2_with_locality_and_version() {
    let mut t = owned();
    let blob = cached_key(KEY_SIGNING);
    let n = key_modulus(&blob);
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &blob).unwrap();
    let nonce = [0x51; 20];
    let params = Cmd::new(0).raw(&nonce).u16(3).raw(&[0, 0x04, 0]).u8(1).body;
    let mut s = oiap(&mut t);
    let out =
        run_authed(&mut t, 2, ORD_QUOTE2, &h.to_be_bytes(), &params, &mut [(&mut s, KEY_AUTH, false)], 0).unwrap();
    let short = &out[..26];
    assert_eq!(&short[..6], &[0, 3, 0, 4, 0, 0x04], "selection and locality 2");
    let composite = [&[0u8, 3, 0, 4, 0][..], &20u32.to_be_bytes(), &t.pcr(10).unwrap()].concat();
    assert_eq!(&short[6..], &digest_of(&composite));
    assert_eq!(be32(&out[26..]), 15);
    let version = &out[30..45];
    assert_eq!(&version[..2], &[0, 0x30]);
    let info = [&[0u8, 0x36][..], b"QUT2", &nonce, short, version].concat();
    assert!(verify_sha1(&n, &digest_of(&info), &out[49..]));
}

#[test]
fn make_and_activate_identity() {
    let mut t = owned();
    let id_auth = [0x1D; 20];
    let label = [0x1A; 20];
    let tmpl = template(KEY_IDENTITY, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    let mut srk = oiap(&mut t);
    let mut own = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    let params = [&own.adip(&id_auth)[..], &label, &tmpl].concat();
    let out = run_authed(
        &mut t,
        0,
        ORD_MAKE_IDENTITY,
        &[],
        &params,
        &mut [(&mut srk, SRK_AUTH, false), (&mut own, OWNER, false)],
        0,
    )
    .unwrap();
    let mut r = crate::marshal::Reader::new(&out);
    let idkey = crate::key::KeyBlob::read(&mut r).unwrap();
    let binding = r.sized32().unwrap();
    let idkey_len = out.len() - 4 - binding.len();
    let pubkey = idkey.public.pubkey_bytes();
    let contents = [&[1u8, 1, 0, 0][..], &ORD_MAKE_IDENTITY.to_be_bytes(), &label, &pubkey].concat();
    assert!(verify_sha1(&idkey.public.modulus, &digest_of(&contents), binding));
    // Load it and activate: the privacy CA encrypts a session key to the EK.
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &out[..idkey_len]).unwrap();
    let mut s = oiap(&mut t);
    let q = run_authed(
        &mut t,
        0,
        ORD_QUOTE,
        &h.to_be_bytes(),
        &Cmd::new(0).raw(&[0; 20]).u16(3).raw(&[1, 0, 0]).body,
        &mut [(&mut s, id_auth, false)],
        0,
    );
    assert!(q.is_ok(), "identity keys quote");
    let sym = Cmd::new(0).u32(6).u16(0xFF).u16(16).raw(&[0xAB; 16]).body;
    let ek = {
        let mut o = oiap(&mut t);
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &KH_EK.to_be_bytes(), &mut [(&mut o, OWNER, false)], 0)
            .unwrap()[28..]
            .to_vec()
    };
    let ca = [&sym[..], &digest_of(&pubkey)].concat();
    let blob = oaep_encrypt(&mut t.drbg, &ek, &ca).unwrap();
    let mut k = oiap(&mut t);
    let mut o = oiap(&mut t);
    let params = Cmd::new(0).sized(&blob).body;
    let got = run_authed(
        &mut t,
        0,
        ORD_ACTIVATE_IDENTITY,
        &h.to_be_bytes(),
        &params,
        &mut [(&mut k, id_auth, false), (&mut o, OWNER, false)],
        0,
    )
    .unwrap();
    assert_eq!(got, sym);
    // A blob naming another key is refused.
    let other = [&sym[..], &[0u8; 20]].concat();
    let blob = oaep_encrypt(&mut t.drbg, &ek, &other).unwrap();
    let mut k = oiap(&mut t);
    let mut o = oiap(&mut t);
    let params = Cmd::new(0).sized(&blob).body;
    let r = run_authed(
        &mut t,
        0,
        ORD_ACTIVATE_IDENTITY,
        &h.to_be_bytes(),
        &params,
        &mut [(&mut k, id_auth, false), (&mut o, OWNER, false)],
        0,
    );
    assert_eq!(r, Err(TPM_BAD_PARAMETER));
    // Wrong owner secret on MakeIdentity: the second session fails.
    let mut srk = oiap(&mut t);
    let mut own = osap(&mut t, ET_OWNER, KH_OWNER, &[0; 20]);
    let params = [&own.adip(&id_auth)[..], &label, &tmpl].concat();
    let r = run_authed(
        &mut t,
        0,
        ORD_MAKE_IDENTITY,
        &[],
        &params,
        &mut [(&mut srk, SRK_AUTH, false), (&mut own, [0; 20], false)],
        0,
    );
    assert_eq!(r, Err(TPM_AUTH2FAIL));
}

#[test]
fn activate_identity_with_ek_blob_activate_checks_pcrs() {
    let mut t = owned();
    let id_auth = [0x1D; 20];
    let tmpl = template(KEY_IDENTITY, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    let mut srk = oiap(&mut t);
    let mut own = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    let params = [&own.adip(&id_auth)[..], &[0; 20], &tmpl].concat();
    let out = run_authed(
        &mut t,
        0,
        ORD_MAKE_IDENTITY,
        &[],
        &params,
        &mut [(&mut srk, SRK_AUTH, false), (&mut own, OWNER, false)],
        0,
    )
    .unwrap();
    let mut r = crate::marshal::Reader::new(&out);
    let idkey = crate::key::KeyBlob::read(&mut r).unwrap();
    let blob_len = out.len() - 4 - r.sized32().unwrap().len();
    let h = load_key2(&mut t, KH_SRK, &SRK_AUTH, &out[..blob_len]).unwrap();
    let mut o = oiap(&mut t);
    let ek =
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &KH_EK.to_be_bytes(), &mut [(&mut o, OWNER, false)], 0)
            .unwrap()[28..]
            .to_vec();
    let sym = Cmd::new(0).u32(6).u16(0xFF).u16(16).raw(&[0xCD; 16]).body;
    let id_digest = digest_of(&idkey.public.pubkey_bytes());
    // TPM_EK_BLOB { TPM_EK_BLOB_ACTIVATE { sessionKey, idDigest, PCR_INFO_SHORT(PCR 10, locality 0) } }
    let activate = |pcr_digest: [u8; 20]| {
        let short = [&[0u8, 3, 0, 4, 0, 1][..], &pcr_digest].concat();
        let inner = [&[0u8, 0x2B][..], &sym, &id_digest, &short].concat();
        Cmd::new(0).u16(0x000C).u16(1).sized(&inner).body
    };
    let composite = [&[0u8, 3, 0, 4, 0][..], &20u32.to_be_bytes(), &t.pcr(10).unwrap()].concat();
    let run = |t: &mut T, plain: &[u8]| {
        let blob = crate::crypto::oaep_encrypt(&mut t.drbg, &ek, plain).unwrap();
        let mut k = oiap(t);
        let mut o = oiap(t);
        let params = Cmd::new(0).sized(&blob).body;
        run_authed(
            t,
            0,
            ORD_ACTIVATE_IDENTITY,
            &h.to_be_bytes(),
            &params,
            &mut [(&mut k, id_auth, false), (&mut o, OWNER, false)],
            0,
        )
    };
    assert_eq!(run(&mut t, &activate(digest_of(&composite))).unwrap(), sym);
    assert_eq!(run(&mut t, &activate([0; 20])), Err(TPM_WRONGPCRVAL));
    // Wrong identity key secret: the first session fails.
    let blob = crate::crypto::oaep_encrypt(&mut t.drbg, &ek, &activate([0; 20])).unwrap();
    let mut k = oiap(&mut t);
    let mut o = oiap(&mut t);
    let params = Cmd::new(0).sized(&blob).body;
    let r = run_authed(
        &mut t,
        0,
        ORD_ACTIVATE_IDENTITY,
        &h.to_be_bytes(),
        &params,
        &mut [(&mut k, [0; 20], false), (&mut o, OWNER, false)],
        0,
    );
    assert_eq!(r, Err(TPM_AUTHFAIL));
    // A signing key is no identity.
    let sh = load_key2(&mut t, KH_SRK, &SRK_AUTH, &cached_key(KEY_SIGNING)).unwrap();
    let mut k = oiap(&mut t);
    let mut o = oiap(&mut t);
    let r = run_authed(
        &mut t,
        0,
        ORD_ACTIVATE_IDENTITY,
        &sh.to_be_bytes(),
        &params,
        &mut [(&mut k, KEY_AUTH, false), (&mut o, OWNER, false)],
        0,
    );
    assert_eq!(r, Err(TPM_BAD_PARAMETER));
}
