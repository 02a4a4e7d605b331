//! EK, ownership, clears, physical presence, GetCapabilityOwner and the
//! authorisation-session rules they exercise.

use super::*;

fn pp(t: &mut T, bits: u16) -> u32 {
    rc(&t.execute(0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(bits).bytes()))
}

fn perm_flags(t: &mut T) -> Vec<u8> {
    ok(t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_FLAG).sized(&0x108u32.to_be_bytes()).bytes())[6..].to_vec()
}

#[test]
fn read_pubek_returns_ek_and_checksum() {
    let mut t = started();
    let b = ok(&mut t, 0, &Cmd::new(ORD_READ_PUBEK).raw(&[7; 20]).bytes());
    // TPM_PUBKEY: RSA, OAEP, SS_NONE, parms 12 bytes, 2048 bits, 2 primes, default exponent.
    assert_eq!(&b[..24], &[0, 0, 0, 1, 0, 3, 0, 1, 0, 0, 0, 12, 0, 0, 8, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
    assert_eq!(be32(&b[24..]), 256);
    let pubkey = &b[..284];
    assert_eq!(&b[284..], &sha1_parts(&[pubkey, &[7; 20]]));
    err(&mut t, &Cmd::new(ORD_READ_PUBEK).raw(&[7; 19]).bytes(), TPM_BAD_PARAM_SIZE);
    let mut bare = Tpm::manufacture_without_ek(TestPlatform::new(5));
    ok(&mut bare, 0, &startup(ST_CLEAR));
    err(&mut bare, &Cmd::new(ORD_READ_PUBEK).raw(&[7; 20]).bytes(), TPM_NO_ENDORSEMENT);
}

#[test]
fn create_endorsement_key_pair_only_once() {
    let parms = rsa_key_parms(2048);
    let mut t = started();
    err(&mut t, &Cmd::new(ORD_CREATE_ENDORSEMENT_KEY_PAIR).raw(&[1; 20]).raw(&parms).bytes(), TPM_DISABLED_CMD);
    let mut bare = Tpm::manufacture_without_ek(TestPlatform::new(6));
    ok(&mut bare, 0, &startup(ST_CLEAR));
    let bad = rsa_key_parms(1024);
    err(&mut bare, &Cmd::new(ORD_CREATE_ENDORSEMENT_KEY_PAIR).raw(&[1; 20]).raw(&bad).bytes(), TPM_BAD_KEY_PROPERTY);
    let b = ok(&mut bare, 0, &Cmd::new(ORD_CREATE_ENDORSEMENT_KEY_PAIR).raw(&[1; 20]).raw(&parms).bytes());
    assert_eq!(&b[284..], &sha1_parts(&[&b[..284], &[1; 20]]));
    assert_eq!(read_pubek(&mut bare), b[28..284].to_vec());
    assert!(bare.permanent_dirty());
    err(&mut bare, &Cmd::new(ORD_CREATE_ENDORSEMENT_KEY_PAIR).raw(&[1; 20]).raw(&parms).bytes(), TPM_DISABLED_CMD);
}

#[test]
fn take_ownership_installs_owner_and_srk() {
    let mut t = started();
    t.clear_dirty();
    let ek = read_pubek(&mut t);
    let srk_pub = take_ownership(&mut t);
    assert!(t.permanent_dirty());
    // srkPub is the template with the modulus filled and no encData.
    let k = crate::key::KeyBlob::read(&mut crate::marshal::Reader::new(&srk_pub)).unwrap();
    assert_eq!(k.public.usage, KEY_STORAGE);
    assert_eq!(k.public.modulus.len(), 256);
    assert!(k.enc_data.is_empty());
    // Owner installed; ReadPubek now disabled; OWNER property TRUE.
    err(&mut t, &Cmd::new(ORD_READ_PUBEK).raw(&[7; 20]).bytes(), TPM_DISABLED_CMD);
    let own = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_PROPERTY).sized(&0x111u32.to_be_bytes()).bytes());
    assert_eq!(own, [0, 0, 0, 1, 1]);
    // A second TakeOwnership is refused.
    let params = take_ownership_params(&mut t, &ek, &OWNER, &SRK_AUTH, &srk_template());
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_OWNER_SET)
    );
    // The owner reads the SRK and EK public keys.
    let mut s = oiap(&mut t);
    let srk =
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &KH_SRK.to_be_bytes(), &mut [(&mut s, OWNER, true)], 0)
            .unwrap();
    assert_eq!(&srk[28..], &k.public.modulus[..]);
    let ekpub =
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &KH_EK.to_be_bytes(), &mut [(&mut s, OWNER, true)], 0)
            .unwrap();
    assert_eq!(&ekpub[28..], &ek[..]);
    let bad =
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &5u32.to_be_bytes(), &mut [(&mut s, OWNER, true)], 0);
    assert_eq!(bad, Err(TPM_BAD_PARAMETER));
}

#[test]
fn take_ownership_error_paths() {
    let mut t = started();
    let ek = read_pubek(&mut t);
    // Wrong HMAC (client keyed with another secret).
    let params = take_ownership_params(&mut t, &ek, &OWNER, &SRK_AUTH, &srk_template());
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, [1; 20], true)], 0),
        Err(TPM_AUTHFAIL)
    );
    // The failed command ended the session.
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, OWNER, true)], 0),
        Err(TPM_INVALID_AUTHHANDLE)
    );
    // Bad protocol id.
    let mut p2 = params.clone();
    p2[1] = 4;
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &p2, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_BAD_PARAMETER)
    );
    // Garbage instead of the encrypted owner secret.
    let mut p3 = params.clone();
    p3[10] ^= 0xFF;
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &p3, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_DECRYPT_ERROR)
    );
    // A signing-key template for the SRK.
    let sign = template(KEY_SIGNING, ES_NONE, SS_RSASSAPKCS1V15_SHA1, 0, AUTH_ALWAYS, &[]);
    let p4 = take_ownership_params(&mut t, &ek, &OWNER, &SRK_AUTH, &sign);
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &p4, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_INVALID_KEYUSAGE)
    );
    // Wrong tag.
    err(&mut t, &Cmd::new(ORD_TAKE_OWNERSHIP).raw(&params).bytes(), TPM_BADTAG);
    // Ownership disabled by SetOwnerInstall(FALSE) under physical presence.
    err(&mut t, &Cmd::new(ORD_SET_OWNER_INSTALL).u8(0).bytes(), TPM_BAD_PRESENCE);
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    ok(&mut t, 0, &Cmd::new(ORD_SET_OWNER_INSTALL).u8(0).bytes());
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_INSTALL_DISABLED)
    );
    // No owner yet: owner-authorised commands answer NOSRK.
    let mut s = oiap(&mut t);
    assert_eq!(run_authed(&mut t, 0, ORD_OWNER_CLEAR, &[], &[], &mut [(&mut s, OWNER, false)], 0), Err(TPM_NOSRK));
}

#[test]
fn session_nonces_roll_and_continue_flag_is_honoured() {
    let mut t = owned();
    let mut s = oiap(&mut t);
    let cap = || Cmd::new(0).body;
    // Continue: the session survives with a new nonceEven.
    let before = s.nonce_even;
    run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, true)], 0).unwrap();
    assert_ne!(s.nonce_even, before);
    // A replay of an old request fails: the TPM's nonce moved on.
    let mut stale = s.clone();
    stale.nonce_even = before;
    let replay = authed(ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut stale, OWNER, true)]);
    assert_eq!(rc(&t.execute(0, &replay)), TPM_AUTHFAIL);
    // The failure ended the session.
    assert_eq!(
        run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, true)], 0),
        Err(TPM_INVALID_AUTHHANDLE)
    );
    // continueAuthSession = FALSE ends it after success.
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, false)], 0).unwrap();
    assert_eq!(
        run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_INVALID_AUTHHANDLE)
    );
    // An OSAP session works for its entity only.
    let mut o = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut o, OWNER, true)], 0).unwrap();
    let mut k = osap(&mut t, ET_SRK, KH_SRK, &SRK_AUTH);
    assert_eq!(
        run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut k, SRK_AUTH, true)], 0),
        Err(TPM_AUTHFAIL)
    );
    // A truncated trailer is a size error.
    let mut s = oiap(&mut t);
    let mut cmd = authed(ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, true)]);
    cmd.truncate(cmd.len() - 1);
    let n = cmd.len() as u32;
    cmd[2..6].copy_from_slice(&n.to_be_bytes());
    assert_eq!(rc(&t.execute(0, &cmd)), TPM_BAD_PARAM_SIZE);
    // continueAuthSession must be 0 or 1.
    let mut s = oiap(&mut t);
    let mut cmd = authed(ORD_GET_CAPABILITY_OWNER, &[], &cap(), &mut [(&mut s, OWNER, true)]);
    let at = cmd.len() - 21;
    cmd[at] = 2;
    assert_eq!(rc(&t.execute(0, &cmd)), TPM_BAD_PARAMETER);
}

#[test]
fn get_capability_owner_reports_flag_bitmaps() {
    let mut t = owned();
    let mut s = oiap(&mut t);
    let out = run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &[], &mut [(&mut s, OWNER, false)], 0).unwrap();
    // The version GetCapability(VERSION_VAL) reports (1.2, rev 0x12.0x9e),
    // as libtpms: not the TPM 1.1 structure version.
    let cap = t.execute(0, &[0x00, 0xc1, 0, 0, 0, 18, 0, 0, 0, 0x65, 0, 0, 0, 0x1a, 0, 0, 0, 0]);
    assert_eq!(&out[..4], &cap[16..20]);
    assert_eq!(&out[..4], &[1, 2, 0x12, 0x9e]);
    // ownership (bit 1), allowMaintenance (5), ppCMDEnable (8), CEKPUsed (9).
    assert_eq!(be32(&out[4..]), (1 << 1) | (1 << 5) | (1 << 8) | (1 << 9));
    assert_eq!(be32(&out[8..]), 0);
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_GET_CAPABILITY_OWNER, &[], &[], &mut [(&mut s, [9; 20], false)], 0),
        Err(TPM_AUTHFAIL)
    );
}

#[test]
fn disable_pubek_read_needs_the_owner() {
    let mut t = owned();
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_DISABLE_PUBEK_READ, &[], &[], &mut [(&mut s, [3; 20], false)], 0),
        Err(TPM_AUTHFAIL)
    );
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_DISABLE_PUBEK_READ, &[], &[], &mut [(&mut s, OWNER, false)], 0).unwrap();
    assert_eq!(perm_flags(&mut t)[3], 0, "readPubek");
}

#[test]
fn owner_clear_resets_to_disabled_unowned_state() {
    let mut t = owned();
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_OWNER_CLEAR, &[], &[], &mut [(&mut s, OWNER, true)], 0).unwrap();
    // Flags as libtpms leaves them after a clear.
    assert_eq!(perm_flags(&mut t), [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Disabled at once: GetRandom answers TPM_DISABLED; OIAP still works.
    err(&mut t, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes(), TPM_DISABLED);
    oiap(&mut t);
    // PhysicalEnable needs presence.
    err(&mut t, &Cmd::new(ORD_PHYSICAL_ENABLE).bytes(), TPM_BAD_PRESENCE);
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    ok(&mut t, 0, &Cmd::new(ORD_PHYSICAL_ENABLE).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes());
    // Deactivated takes effect at the next Startup(ST_CLEAR).
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    err(&mut t, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes(), TPM_DEACTIVATED);
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    ok(&mut t, 0, &Cmd::new(ORD_PHYSICAL_SET_DEACTIVATED).u8(0).bytes());
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes());
    // The EK survived; a new owner can take over.
    take_ownership(&mut t);
}

#[test]
fn force_clear_needs_physical_presence() {
    let mut t = owned();
    err(&mut t, &Cmd::new(ORD_FORCE_CLEAR).bytes(), TPM_BAD_PRESENCE);
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    ok(&mut t, 0, &Cmd::new(ORD_FORCE_CLEAR).bytes());
    let own = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_PROPERTY).sized(&0x111u32.to_be_bytes()).bytes());
    assert_eq!(own, [0, 0, 0, 1, 0]);
}

#[test]
fn physical_presence_rules() {
    let mut t = started();
    // Conflicting and unknown bits.
    assert_eq!(pp(&mut t, PP_PRESENT | PP_NOTPRESENT), TPM_BAD_PARAMETER);
    assert_eq!(pp(&mut t, PP_LOCK | PP_PRESENT), TPM_BAD_PARAMETER);
    assert_eq!(pp(&mut t, PP_CMD_ENABLE | PP_PRESENT), TPM_BAD_PARAMETER);
    assert_eq!(pp(&mut t, PP_CMD_ENABLE | PP_CMD_DISABLE), TPM_BAD_PARAMETER);
    assert_eq!(pp(&mut t, PP_HW_ENABLE | PP_HW_DISABLE), TPM_BAD_PARAMETER);
    assert_eq!(pp(&mut t, 0x0001), TPM_BAD_PARAMETER);
    // Presence asserted, then locked for the boot.
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    let v = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_FLAG).sized(&0x109u32.to_be_bytes()).bytes());
    assert_eq!(&v[4..], &[0, 0x20, 0, 0, 1, 0, 0]);
    assert_eq!(pp(&mut t, PP_LOCK), 0);
    let v = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_FLAG).sized(&0x109u32.to_be_bytes()).bytes());
    assert_eq!(&v[4..], &[0, 0x20, 0, 0, 0, 1, 0]);
    assert_eq!(pp(&mut t, PP_PRESENT), TPM_BAD_PARAMETER);
    err(&mut t, &Cmd::new(ORD_PHYSICAL_DISABLE).bytes(), TPM_BAD_PRESENCE);
    // The command interface can be disabled, then presence cannot be asserted.
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert_eq!(pp(&mut t, PP_CMD_DISABLE), 0);
    assert_eq!(pp(&mut t, PP_PRESENT), TPM_BAD_PARAMETER);
    // The lifetime lock freezes the configuration.
    assert_eq!(pp(&mut t, PP_CMD_ENABLE | PP_LIFETIME_LOCK), 0);
    assert_eq!(pp(&mut t, PP_CMD_DISABLE), TPM_BAD_PARAMETER);
    let f = perm_flags(&mut t);
    assert_eq!((f[6], f[8]), (1, 1), "lifetime lock and CMD enable");
    // PhysicalDisable takes effect at once.
    assert_eq!(pp(&mut t, PP_PRESENT), 0);
    ok(&mut t, 0, &Cmd::new(ORD_PHYSICAL_DISABLE).bytes());
    err(&mut t, &Cmd::new(ORD_PCR_READ).u32(0).bytes(), TPM_DISABLED);
    err(&mut t, &Cmd::new(ORD_READ_PUBEK).raw(&[0; 20]).bytes(), TPM_DISABLED);
    err(&mut t, &Cmd::new(ORD_PHYSICAL_SET_DEACTIVATED).u8(2).bytes(), TPM_BAD_PARAMETER);
}
