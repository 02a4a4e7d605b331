//! Permanent state blobs: round trip, dirty tracking, corruption.

use super::*;
use crate::StateError;

#[test]
fn permanent_state_round_trips_exactly() {
    let mut t = owned();
    ok(
        &mut t,
        0,
        &Cmd::new(ORD_NV_DEFINE_SPACE)
            .raw(&[0, 0x18, 0, 0, 0x10, 0, 0, 3, 0, 0, 0, 0x1F])
            .raw(&[0; 20])
            .raw(&[0, 3, 0, 0, 0, 0x1F])
            .raw(&[0; 20])
            .raw(&[0, 0x17, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4])
            .raw(&[0; 20])
            .bytes(),
    );
    let blob = t.permanent_state();
    let r = Tpm::from_permanent(&blob, TestPlatform::new(4)).unwrap();
    assert_eq!(r.permanent_state(), blob);
    assert!(!r.permanent_dirty());
}

#[test]
fn restoring_like_a_chip_reuses_its_keys_and_equals_a_full_restore() {
    let t = owned();
    let blob = t.permanent_state();
    let like = Tpm::from_permanent_like(&blob, TestPlatform::new(4), &t).unwrap();
    assert_eq!(like.permanent_state(), blob);
    // A chip with other keys shares nothing: every key is rebuilt, same result.
    let other = Tpm::manufacture_without_ek(TestPlatform::new(5));
    let rebuilt = Tpm::from_permanent_like(&blob, TestPlatform::new(4), &other).unwrap();
    assert_eq!(rebuilt.permanent_state(), blob);
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(Tpm::from_permanent_like(&bad, TestPlatform::new(4), &t).err(), Some(StateError::ChecksumMismatch));
}

#[test]
fn dirty_tracks_permanent_changes_only() {
    let mut t = started();
    t.clear_dirty();
    ok(&mut t, 0, &Cmd::new(ORD_EXTEND).u32(1).raw(&[1; 20]).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(8).bytes());
    assert!(!t.permanent_dirty());
    ok(&mut t, 0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(PP_PRESENT).bytes());
    assert!(!t.permanent_dirty(), "presence is volatile");
    ok(&mut t, 0, &Cmd::new(ORD_PHYSICAL_DISABLE).bytes());
    assert!(t.permanent_dirty());
    t.clear_dirty();
    assert!(!t.permanent_dirty());
}

#[test]
fn manufacture_marks_state_dirty_and_restores() {
    let t = Tpm::manufacture_without_ek(TestPlatform::new(11));
    assert!(t.permanent_dirty());
    let blob = t.permanent_state();
    let r = Tpm::from_permanent(&blob, TestPlatform::new(12)).unwrap();
    assert_eq!(r.permanent_state(), blob);
}

#[test]
fn every_corruption_and_truncation_is_refused() {
    let blob = Tpm::manufacture_without_ek(TestPlatform::new(13)).permanent_state();
    for i in 0..blob.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = blob.clone();
            b[i] ^= bit;
            assert!(Tpm::from_permanent(&b, TestPlatform::new(1)).is_err(), "flip {bit:#x} at {i}");
        }
    }
    for n in 0..blob.len() {
        let e = Tpm::from_permanent(&blob[..n], TestPlatform::new(1)).err();
        assert!(matches!(e, Some(StateError::Truncated | StateError::BadMagic)), "truncated to {n}: {e:?}");
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(Tpm::from_permanent(&longer, TestPlatform::new(1)).is_err());
}

#[test]
fn corruption_of_a_full_blob_is_refused_with_clear_errors() {
    let blob = owned().permanent_state();
    let mut b = blob.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    assert_eq!(Tpm::from_permanent(&b, TestPlatform::new(1)).err(), Some(StateError::ChecksumMismatch));
    let mut b = blob.clone();
    b[0] ^= 1;
    assert_eq!(Tpm::from_permanent(&b, TestPlatform::new(1)).err(), Some(StateError::BadMagic));
    // A future version is named as such (checksum recomputed to match).
    let mut b = blob[..blob.len() - 20].to_vec();
    b[11] = 9;
    let sum = crate::crypto::sha1(&b);
    b.extend_from_slice(&sum);
    assert_eq!(Tpm::from_permanent(&b, TestPlatform::new(1)).err(), Some(StateError::UnsupportedVersion(9)));
    // A consistent checksum over a body that does not parse.
    let mut b = blob[..12].to_vec();
    b.extend_from_slice(&3u32.to_be_bytes());
    b.extend_from_slice(&[1, 2, 3]);
    let sum = crate::crypto::sha1(&b);
    b.extend_from_slice(&sum);
    assert_eq!(Tpm::from_permanent(&b, TestPlatform::new(1)).err(), Some(StateError::Malformed));
}

#[test]
fn manufacture_makes_a_distinct_ek_per_seed() {
    let mut a = started();
    let ea = read_pubek(&mut a);
    let mut b = Tpm::manufacture(TestPlatform::new(77));
    ok(&mut b, 0, &startup(ST_CLEAR));
    assert_ne!(read_pubek(&mut b), ea);
}
