//! The deferred EK: [`Tpm::manufacture`] decides it, the first command that
//! needs it generates it, and the key is the one generating at once made.

use super::*;
use crate::crypto::Drbg;
use crate::state::{Endorsement, PERMANENT_VERSION_DEFERRED_EK, STATE_VERSION};

/// SHA-1 of the EK modulus of `Tpm::manufacture(TestPlatform::new(1))`,
/// taken from the engine before the EK was deferred (it generated the key
/// inside `manufacture`). Guests derive their EK from a seed at every boot:
/// deferring must not change it.
const EK_OF_SEED_1: [u8; 20] = [
    0xd7, 0x24, 0x1a, 0x72, 0xb6, 0x3a, 0xa5, 0x96, 0x83, 0x7b, 0x33, 0x15, 0xda, 0x7f, 0x62, 0x86, 0x05, 0xcd, 0x33,
    0x9a,
];

fn deferred(t: &T) -> bool {
    matches!(t.perm.ek, Endorsement::Deferred(_))
}

fn blob_version(blob: &[u8]) -> u32 {
    be32(&blob[8..12])
}

#[test]
fn making_saving_and_booting_a_chip_do_not_generate_its_ek() {
    let t = Tpm::manufacture(TestPlatform::new(1));
    assert!(deferred(&t) && !t.endorsement_key_generated());
    assert!(t.perm.flags.cekp_used && !t.perm.flags.enable_revoke_ek);
    let blob = t.permanent_state();
    assert!(deferred(&t), "saving the state does not generate the EK");
    assert_eq!(blob_version(&blob), PERMANENT_VERSION_DEFERRED_EK);
    // Restored, the EK is still deferred (the hypervisor's set-up).
    let mut t = Tpm::from_permanent(&blob, TestPlatform::new(2)).unwrap();
    assert!(deferred(&t));
    assert_eq!(t.permanent_state(), blob);
    // A Linux boot: Startup, the self-tests, capabilities, a suspend
    // (SaveState) and resume; CreateEndorsementKeyPair finds an EK.
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    ok(&mut t, 0, &Cmd::new(ORD_CONTINUE_SELF_TEST).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_SELF_TEST_FULL).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(4).sized(&0x108u32.to_be_bytes()).bytes());
    let parms = rsa_key_parms(2048);
    err(&mut t, &Cmd::new(ORD_CREATE_ENDORSEMENT_KEY_PAIR).raw(&[1; 20]).raw(&parms).bytes(), TPM_DISABLED_CMD);
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    let saved = t.saved_state().unwrap();
    let mut resumed = Tpm::from_permanent(&blob, TestPlatform::new(3)).unwrap();
    resumed.set_saved_state(&saved).unwrap();
    resumed.power_on();
    ok(&mut resumed, 0, &startup(ST_STATE));
    assert!(deferred(&t) && deferred(&resumed));
    assert!(!t.permanent_dirty() && !resumed.permanent_dirty());
}

#[test]
fn the_first_read_pubek_generates_the_ek_eager_manufacture_made() {
    let mut t = started();
    assert!(deferred(&t));
    let ek = read_pubek(&mut t);
    assert_eq!(sha1(&ek), EK_OF_SEED_1);
    assert!(t.endorsement_key_generated() && t.permanent_dirty());
    assert_eq!(read_pubek(&mut t), ek, "generated once");
    // Another chip from the same entropy: the same EK.
    let mut twin = Tpm::manufacture(TestPlatform::new(1));
    ok(&mut twin, 0, &startup(ST_CLEAR));
    assert_eq!(read_pubek(&mut twin), ek);
    // A state saved with the key keeps the key.
    let blob = t.permanent_state();
    assert_eq!(blob_version(&blob), STATE_VERSION);
    let mut r = Tpm::from_permanent(&blob, TestPlatform::new(9)).unwrap();
    assert!(matches!(r.perm.ek, Endorsement::Present(_)));
    ok(&mut r, 0, &startup(ST_CLEAR));
    assert_eq!(read_pubek(&mut r), ek);
}

#[test]
fn take_ownership_generates_a_deferred_ek() {
    // The secrets are encrypted to the EK a twin chip reads: this chip's EK
    // is still deferred when TakeOwnership needs it.
    let mut twin = started();
    let ek = read_pubek(&mut twin);
    let mut t = started();
    assert!(deferred(&t));
    let params = take_ownership_params(&mut t, &ek, &OWNER, &SRK_AUTH, &srk_template());
    let mut s = oiap(&mut t);
    let out = run_authed(&mut t, 0, ORD_TAKE_OWNERSHIP, &[], &params, &mut [(&mut s, OWNER, false)], 0);
    assert!(out.is_ok(), "{out:?}");
    assert!(t.endorsement_key_generated());
    // OwnerReadInternalPub(EK) answers the same key.
    let mut s = oiap(&mut t);
    let out =
        run_authed(&mut t, 0, ORD_OWNER_READ_INTERNAL_PUB, &[], &KH_EK.to_be_bytes(), &mut [(&mut s, OWNER, false)], 0)
            .unwrap();
    assert_eq!(&out[28..284], &ek[..]);
}

#[test]
fn the_running_drbg_does_not_replay_the_ek_s_stream() {
    // Whoever could predict the DRBG after manufacture would know the
    // randomness the EK is generated from.
    let mut t = Tpm::manufacture(TestPlatform::new(1));
    let Endorsement::Deferred(snapshot) = t.perm.ek.clone() else {
        panic!("EK not deferred");
    };
    ok(&mut t, 0, &startup(ST_CLEAR));
    let random = ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(32).bytes());
    let drawn = &random[4..];
    assert_eq!(drawn.len(), 32);
    let mut stream = alloc::vec![0u8; 1 << 16];
    Drbg::replay(&snapshot).fill(&mut stream);
    assert!(!stream.windows(32).any(|w| w == drawn));
    // The check can fail: a generator left at the snapshot does replay it.
    let mut left = Drbg::replay(&snapshot);
    let mut next = [0u8; 32];
    left.fill(&mut next);
    assert!(stream.windows(32).any(|w| w == next));
}

#[test]
fn deferred_and_generated_eks_need_their_own_blob_version() {
    let fresh = Tpm::manufacture(TestPlatform::new(1)).permanent_state();
    let mut generated = started();
    read_pubek(&mut generated);
    let generated = generated.permanent_state();
    // Each body under the other version, with a matching checksum.
    for (blob, other) in [(&fresh, STATE_VERSION), (&generated, PERMANENT_VERSION_DEFERRED_EK)] {
        let mut b = blob[..blob.len() - 20].to_vec();
        b[8..12].copy_from_slice(&other.to_be_bytes());
        let sum = sha1(&b);
        b.extend_from_slice(&sum);
        assert_eq!(Tpm::from_permanent(&b, TestPlatform::new(1)).err(), Some(crate::StateError::Malformed));
    }
}
