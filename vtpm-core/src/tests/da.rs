//! TPM_ChangeAuthOwner and the dictionary-attack lockout (TPM_ResetLockValue,
//! DA_LOGIC, persistence in the saved state).

use super::*;

const NEW_OWNER: [u8; 20] = [0x0B; 20];
const NEW_SRK: [u8; 20] = [0x0C; 20];

fn change_auth_owner(t: &mut T, owner: [u8; 20], new: &[u8; 20], entity: u16, cont: bool) -> Result<Vec<u8>, u32> {
    let mut s = osap(t, ET_OWNER, KH_OWNER, &owner);
    let params = Cmd::new(0).u16(PID_ADCP).raw(&s.adip(new)).u16(entity).body;
    run_authed(t, 0, ORD_CHANGE_AUTH_OWNER, &[], &params, &mut [(&mut s, owner, cont)], 0)
}

fn cap_owner(t: &mut T, owner: [u8; 20]) -> Result<Vec<u8>, u32> {
    let mut s = oiap(t);
    run_authed(t, 0, ORD_GET_CAPABILITY_OWNER, &[], &[], &mut [(&mut s, owner, false)], 0)
}

/// Seal under the SRK with `srk` as its secret (any SRK-authorised command).
fn seal_with_srk(t: &mut T, srk: [u8; 20]) -> Result<Vec<u8>, u32> {
    let mut s = osap(t, ET_SRK, KH_SRK, &srk);
    let params = Cmd::new(0).raw(&s.adip(&[1; 20])).sized(&[]).sized(b"x").body;
    run_authed(t, 0, ORD_SEAL, &KH_SRK.to_be_bytes(), &params, &mut [(&mut s, srk, false)], 0)
}

fn da_info(t: &mut T) -> Vec<u8> {
    let r = ok(t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_DA_LOGIC).sized(&ET_OWNER.to_be_bytes()).bytes());
    r[4..].to_vec()
}

#[test]
fn change_auth_owner_changes_the_owner_secret_and_persists() {
    let mut t = owned();
    let other = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    // The TPM ends the session whatever the caller asked: its answer says
    // continueAuthSession = FALSE (run_authed checks the HMAC over it).
    let mut s = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    let params = Cmd::new(0).u16(PID_ADCP).raw(&s.adip(&NEW_OWNER)).u16(ET_OWNER).body;
    let cmd = authed(ORD_CHANGE_AUTH_OWNER, &[], &params, &mut [(&mut s, OWNER, true)]);
    let r = t.execute(0, &cmd);
    assert_eq!(rc(&r), 0);
    assert_eq!(r[r.len() - 21], 0, "continueAuthSession forced to FALSE");
    assert!(t.permanent_dirty());
    assert_eq!(cap_owner(&mut t, OWNER), Err(TPM_AUTHFAIL), "the old owner secret no longer works");
    assert!(cap_owner(&mut t, NEW_OWNER).is_ok(), "the new one does");
    // Every owner OSAP session died with the old secret.
    let mut o = other;
    let cmd = authed(ORD_GET_CAPABILITY_OWNER, &[], &[], &mut [(&mut o, OWNER, false)]);
    assert_eq!(rc(&t.execute(0, &cmd)), TPM_INVALID_AUTHHANDLE);
    // The change is in the permanent state.
    let mut back = Tpm::from_permanent(&t.permanent_state(), TestPlatform::new(9)).unwrap();
    back.power_on();
    ok(&mut back, 0, &startup(ST_CLEAR));
    assert!(cap_owner(&mut back, NEW_OWNER).is_ok());
}

#[test]
fn change_auth_owner_changes_the_srk_secret() {
    let mut t = owned();
    assert!(seal_with_srk(&mut t, SRK_AUTH).is_ok());
    change_auth_owner(&mut t, OWNER, &NEW_SRK, ET_SRK, false).unwrap();
    assert_eq!(seal_with_srk(&mut t, SRK_AUTH), Err(TPM_AUTHFAIL));
    assert!(seal_with_srk(&mut t, NEW_SRK).is_ok());
    assert!(cap_owner(&mut t, OWNER).is_ok(), "the owner secret did not change");
}

#[test]
fn change_auth_owner_refusals() {
    let mut t = owned();
    // OIAP is not allowed: the new secret needs an OSAP shared secret.
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u16(PID_ADCP).raw(&[0; 20]).u16(ET_OWNER).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_CHANGE_AUTH_OWNER, &[], &params, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_BAD_MODE)
    );
    let mut s = osap(&mut t, ET_OWNER, KH_OWNER, &OWNER);
    let params = Cmd::new(0).u16(PID_OWNER).raw(&s.adip(&NEW_OWNER)).u16(ET_OWNER).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_CHANGE_AUTH_OWNER, &[], &params, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_BAD_PARAMETER)
    );
    assert_eq!(change_auth_owner(&mut t, OWNER, &NEW_OWNER, ET_KEYHANDLE, false), Err(TPM_WRONG_ENTITYTYPE));
    assert_eq!(change_auth_owner(&mut t, [9; 20], &NEW_OWNER, ET_OWNER, false), Err(TPM_AUTHFAIL));
    assert!(cap_owner(&mut t, OWNER).is_ok(), "nothing changed");
}

#[test]
fn wrong_authorisations_lock_out_authorised_commands() {
    let mut t = owned();
    for i in 1..=crate::da::LOCKOUT_THRESHOLD + 1 {
        assert_eq!(cap_owner(&mut t, [9; 20]), Err(TPM_AUTHFAIL), "wrong guess {i}");
    }
    assert_eq!(t.auth_fail_count(), 6);
    // Locked: the right secret is refused too, before any HMAC is checked,
    // and so are other entities' commands; unauthorised ones still run.
    assert_eq!(cap_owner(&mut t, OWNER), Err(TPM_DEFEND_LOCK_RUNNING));
    assert_eq!(seal_with_srk(&mut t, SRK_AUTH), Err(TPM_DEFEND_LOCK_RUNNING));
    assert_eq!(t.auth_fail_count(), 6, "refused commands are not guesses");
    ok(&mut t, 0, &Cmd::new(ORD_PCR_READ).u32(0).bytes());
    let info = da_info(&mut t);
    assert_eq!((info[2], be32(&[0, 0, info[3], info[4]])), (1, 6), "DA_LOGIC: active, 6 failures");
    assert_eq!(be32(&info[13..17]), 1, "one second of lockout left");
    // A failed ResetLockValue during the lockout disables it for the lockout.
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_RESET_LOCK_VALUE, &[], &[], &mut [(&mut s, [9; 20], false)], 0),
        Err(TPM_AUTHFAIL)
    );
    let mut s = oiap(&mut t);
    assert_eq!(
        run_authed(&mut t, 0, ORD_RESET_LOCK_VALUE, &[], &[], &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_AUTHFAIL)
    );
}

#[test]
fn reset_lock_value_ends_a_lockout() {
    let mut t = owned();
    for _ in 0..=crate::da::LOCKOUT_THRESHOLD {
        let _ = cap_owner(&mut t, [9; 20]);
    }
    assert_eq!(cap_owner(&mut t, OWNER), Err(TPM_DEFEND_LOCK_RUNNING));
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_RESET_LOCK_VALUE, &[], &[], &mut [(&mut s, OWNER, false)], 0).unwrap();
    assert_eq!(t.auth_fail_count(), 0);
    assert!(cap_owner(&mut t, OWNER).is_ok());
    assert_eq!(da_info(&mut t)[2], 0, "DA_LOGIC: inactive");
}

#[test]
fn the_lockout_ends_with_time() {
    let mut t = owned();
    for _ in 0..=crate::da::LOCKOUT_THRESHOLD {
        let _ = cap_owner(&mut t, [9; 20]);
    }
    assert_eq!(cap_owner(&mut t, OWNER), Err(TPM_DEFEND_LOCK_RUNNING));
    // The test platform's clock moves 1 ms per reading (DA_LOGIC reads it).
    for _ in 0..2000 {
        da_info(&mut t);
    }
    assert!(cap_owner(&mut t, OWNER).is_ok(), "one second later the lockout is over");
    assert_eq!(t.auth_fail_count(), 6, "time ends the lockout, not the count");
}

#[test]
fn the_count_survives_save_state_and_clears_with_startup_clear() {
    let mut t = owned();
    for _ in 0..3 {
        let _ = cap_owner(&mut t, [9; 20]);
    }
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    let saved = t.saved_state().unwrap();
    let perm = t.permanent_state();
    let mut resumed = Tpm::from_permanent(&perm, TestPlatform::new(5)).unwrap();
    resumed.set_saved_state(&saved).unwrap();
    ok(&mut resumed, 0, &startup(ST_STATE));
    assert_eq!(resumed.auth_fail_count(), 3, "Startup(ST_STATE) restores the count");
    let mut rebooted = Tpm::from_permanent(&perm, TestPlatform::new(6)).unwrap();
    rebooted.set_saved_state(&saved).unwrap();
    ok(&mut rebooted, 0, &startup(ST_CLEAR));
    assert_eq!(rebooted.auth_fail_count(), 0, "Startup(ST_CLEAR) clears it, as in libtpms");
}
