//! Tier A: start-up, self-test, capabilities, PCRs, randomness, ticks,
//! SaveState, framing errors and session bookkeeping.

use super::*;

fn getcap(area: u32, sub: &[u8]) -> Vec<u8> {
    Cmd::new(ORD_GET_CAPABILITY).u32(area).sized(sub).bytes()
}

fn pcr_read(i: u32) -> Vec<u8> {
    Cmd::new(ORD_PCR_READ).u32(i).bytes()
}

fn extend(i: u32, d: [u8; 20]) -> Vec<u8> {
    Cmd::new(ORD_EXTEND).u32(i).raw(&d).bytes()
}

fn reset(sel: &[u8]) -> Vec<u8> {
    Cmd::new(ORD_PCR_RESET).raw(sel).bytes()
}

fn hex(s: &str) -> Vec<u8> {
    let s: std::string::String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_command_before_startup_is_invalid_postinit() {
    let mut t = manufactured();
    err(&mut t, &pcr_read(0), TPM_INVALID_POSTINIT);
    err(&mut t, &getcap(CAP_PROPERTY, &0x115u32.to_be_bytes()), TPM_INVALID_POSTINIT);
    err(&mut t, &Cmd::new(ORD_GET_TEST_RESULT).bytes(), TPM_INVALID_POSTINIT);
    assert_eq!(t.execute(0, &startup(ST_CLEAR)), hex("00c4 0000000a 00000000"));
    // A second Startup is refused.
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
}

#[test]
fn startup_with_unknown_type_is_bad_parameter_and_ends_postinit() {
    // libtpms clears postInitialise whatever the Startup's outcome: a
    // second Startup is refused and the TPM runs on.
    let mut t = manufactured();
    err(&mut t, &startup(7), TPM_BAD_PARAMETER);
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
    ok(&mut t, 0, &pcr_read(0));
    let mut t = manufactured();
    err(&mut t, &hex("00c1 0000000a 00000099"), TPM_BAD_PARAM_SIZE);
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
}

#[test]
fn startup_state_without_saved_state_enters_failure_mode() {
    let mut t = manufactured();
    err(&mut t, &startup(ST_STATE), TPM_FAILEDSELFTEST);
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
    // GetCapability still answers in failure mode.
    ok(&mut t, 0, &getcap(CAP_VERSION, &[]));
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    ok(&mut t, 0, &pcr_read(0));
}

#[test]
fn a_chip_the_platform_fails_stays_failed_until_tpm_init() {
    let mut t = started();
    t.fail();
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
    err(&mut t, &hex("00c1 0000000a 00000053"), TPM_FAILEDSELFTEST); // ContinueSelfTest
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
    // What Linux's probe reads still answers: the version and the TIS timeouts.
    ok(&mut t, 0, &getcap(CAP_VERSION, &[]));
    ok(&mut t, 0, &getcap(CAP_PROPERTY, &0x115u32.to_be_bytes()));
    let result = ok(&mut t, 0, &hex("00c1 0000000a 00000054"));
    assert!(result.windows(12).any(|w| w == b"failure mode"), "GetTestResult says why");
    // Before Startup too: the chip never becomes usable without TPM_Init.
    let mut t = manufactured();
    t.fail();
    err(&mut t, &startup(ST_CLEAR), TPM_FAILEDSELFTEST);
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
}

#[test]
fn tpm2_probe_gets_bad_ordinal_like_libtpms() {
    let mut t = started();
    let probe = hex("8001 00000016 0000017a 00000006 00000100 00000001");
    assert_eq!(t.execute(0, &probe), hex("00c4 0000000a 0000000a"));
    // Also before Startup.
    let mut t = manufactured();
    assert_eq!(t.execute(0, &probe), hex("00c4 0000000a 0000000a"));
}

#[test]
fn framing_errors() {
    let mut t = started();
    // Lying paramSize.
    err(&mut t, &hex("00c1 00000012 00000065 00000005 00000004 00000115"), TPM_BAD_PARAM_SIZE);
    // Too short for a header.
    err(&mut t, &hex("00c1 0000"), TPM_BAD_PARAM_SIZE);
    err(&mut t, &[], TPM_BAD_PARAM_SIZE);
    // Missing parameter, extra parameter.
    err(&mut t, &Cmd::new(ORD_PCR_READ).bytes(), TPM_BAD_PARAM_SIZE);
    err(&mut t, &Cmd::new(ORD_PCR_READ).u32(1).u32(2).bytes(), TPM_BAD_PARAM_SIZE);
    err(&mut t, &Cmd::new(ORD_PCR_READ).u8(0).bytes(), TPM_BAD_PARAM_SIZE);
    // Wrong tags.
    err(&mut t, &Cmd::new(ORD_PCR_READ).u32(1).tag(0xC2).bytes(), TPM_BADTAG);
    err(&mut t, &Cmd::new(ORD_PCR_READ).u32(1).tag(0xC5).bytes(), TPM_BADTAG);
    // Over 4096 bytes.
    err(&mut t, &Cmd::new(ORD_PCR_READ).raw(&[0; 5000]).bytes(), TPM_BAD_PARAM_SIZE);
    // Unknown and Tier C ordinals.
    err(&mut t, &Cmd::new(0x12345).bytes(), TPM_BAD_ORDINAL);
    err(&mut t, &Cmd::new(0x31).bytes(), TPM_BAD_ORDINAL); // DAA_Join
    err(&mut t, &Cmd::new(0xE6).bytes(), TPM_BAD_ORDINAL); // CreateTransport... (Tier C)
}

#[test]
fn locality_above_four_is_refused() {
    let mut t = started();
    let r = t.execute(5, &pcr_read(0));
    assert_eq!(rc(&r), TPM_BAD_LOCALITY);
}

#[test]
fn linux_capabilities_match_libtpms_bytes() {
    let mut t = started();
    let cases: &[(u32, u32, &str)] = &[
        (CAP_PROPERTY, 0x115, "00c4 0000001e 00000000 00000010 000f4240 000f4240 000f4240 000f4240"),
        (CAP_PROPERTY, 0x120, "00c4 0000001a 00000000 0000000c 02faf080 05f5e100 11e1a300"),
        (CAP_PROPERTY, 0x111, "00c4 0000000f 00000000 00000001 00"),
        (CAP_PROPERTY, 0x103, "00c4 00000012 00000000 00000004 49424d00"),
        (CAP_PROPERTY, 0x101, "00c4 00000012 00000000 00000004 00000018"),
        (CAP_PROPERTY, 0x104, "00c4 00000012 00000000 00000004 00000014"),
        (CAP_PROPERTY, 0x10A, "00c4 00000012 00000000 00000004 00000010"),
        (CAP_PROPERTY, 0x11D, "00c4 00000012 00000000 00000004 00000020"),
        (CAP_PROPERTY, 0x123, "00c4 00000012 00000000 00000004 00006ffa"),
        (CAP_PROPERTY, 0x124, "00c4 00000012 00000000 00000004 00001000"),
        (CAP_PROPERTY, 0x105, "00c4 0000000a 0000002c"),
        (CAP_PROPERTY, 0x999, "00c4 0000000a 0000002c"),
        (CAP_FLAG, 0x109, "00c4 00000015 00000000 00000007 0020 0000000000"),
        (CAP_ORD, 0x14, "00c4 0000000f 00000000 00000001 01"),
        (CAP_ORD, 0x1234, "00c4 0000000f 00000000 00000001 00"),
        (CAP_ALG, 1, "00c4 0000000f 00000000 00000001 01"),
        (CAP_ALG, 6, "00c4 0000000f 00000000 00000001 00"),
    ];
    for (area, sub, want) in cases {
        assert_eq!(t.execute(0, &getcap(*area, &sub.to_be_bytes())), hex(want), "cap {area:#x}/{sub:#x}");
    }
    let fixed: &[(u32, &str)] = &[
        (CAP_VERSION, "00c4 00000012 00000000 00000004 01010000"),
        (CAP_VERSION_VAL, "00c4 0000001d 00000000 0000000f 0030 0102129e 0002 03 49424d00 0000"),
        (CAP_KEY_HANDLE, "00c4 00000010 00000000 00000002 0000"),
        (CAP_NV_LIST, "00c4 0000000e 00000000 00000000"),
        (CAP_SYM_MODE, "00c4 0000000a 0000002c"),
        (CAP_NV_INDEX, "00c4 0000000a 0000002c"),
    ];
    for (area, want) in fixed {
        assert_eq!(t.execute(0, &getcap(*area, &[])), hex(want), "cap {area:#x}");
    }
}

#[test]
fn permanent_flags_after_manufacture_match_swtpm_setup_createek() {
    let mut t = started();
    let r = t.execute(0, &getcap(CAP_FLAG, &0x108u32.to_be_bytes()));
    // disable=0 ownership=1 deactivated=0 readPubek=1 allowMaintenance=1
    // physicalPresenceCMDEnable=1 CEKPUsed=1 enableRevokeEK=0.
    assert_eq!(r, hex("00c4 00000024 00000000 00000016 001f 00010001 00010000 01010000 00000000 00000000"));
}

#[test]
fn sessions_property_counts_open_sessions() {
    let mut t = started();
    oiap(&mut t);
    let r = t.execute(0, &getcap(CAP_PROPERTY, &0x10Au32.to_be_bytes()));
    assert_eq!(be32(&r[14..]), 15);
}

#[test]
fn pcr_read_after_startup_clear_follows_pc_client_defaults() {
    let mut t = started();
    assert_eq!(ok(&mut t, 0, &pcr_read(0)), [0; 20]);
    assert_eq!(ok(&mut t, 0, &pcr_read(16)), [0; 20]);
    for i in 17..=22 {
        assert_eq!(ok(&mut t, 0, &pcr_read(i)), [0xFF; 20]);
    }
    assert_eq!(ok(&mut t, 0, &pcr_read(23)), [0; 20]);
    err(&mut t, &pcr_read(24), TPM_BADINDEX);
    err(&mut t, &pcr_read(u32::MAX), TPM_BADINDEX);
}

#[test]
fn extend_matches_libtpms_bytes_and_chains() {
    let mut t = started();
    let r = t.execute(0, &extend(10, [1; 20]));
    assert_eq!(r, hex("00c4 0000001e 00000000 c3ad7f64b8d976aaf2b3a9c98f7ee5631cde7125"));
    let second = ok(&mut t, 0, &extend(10, [2; 20]));
    let want = sha1_parts(&[&hex("c3ad7f64b8d976aaf2b3a9c98f7ee5631cde7125"), &[2; 20]]);
    assert_eq!(second, want);
    assert_eq!(ok(&mut t, 0, &pcr_read(10)), want);
    assert_eq!(t.pcr(10), Some(want));
}

#[test]
fn extend_enforces_index_and_locality() {
    let mut t = started();
    err(&mut t, &extend(24, [1; 20]), TPM_BADINDEX);
    err(&mut t, &extend(17, [1; 20]), TPM_BAD_LOCALITY);
    assert_eq!(rc(&t.execute(4, &extend(17, [1; 20]))), 0);
    assert_eq!(rc(&t.execute(1, &extend(21, [1; 20]))), TPM_BAD_LOCALITY);
    assert_eq!(rc(&t.execute(2, &extend(21, [1; 20]))), 0);
    // The hypervisor's own extend follows the same rules.
    assert_eq!(t.extend(0, 17, &[0; 20]), Err(TPM_BAD_LOCALITY));
    assert!(t.extend(0, 0, &[0; 20]).is_ok());
    assert_eq!(t.pcr(24), None);
}

#[test]
fn pcr_reset_follows_locality_rules() {
    let mut t = started();
    ok(&mut t, 0, &extend(16, [1; 20]));
    assert_eq!(t.execute(0, &reset(&hex("0003 000001"))), hex("00c4 0000000a 00000000"));
    assert_eq!(ok(&mut t, 0, &pcr_read(16)), [0; 20]);
    err(&mut t, &reset(&hex("0003 000400")), TPM_NOTRESETABLE);
    err(&mut t, &reset(&hex("0003 000002")), TPM_NOTLOCAL);
    err(&mut t, &reset(&hex("0003 000000")), TPM_INVALID_PCR_INFO);
    err(&mut t, &reset(&hex("0000")), TPM_INVALID_PCR_INFO);
    err(&mut t, &reset(&hex("0004 00000000")), TPM_INVALID_PCR_INFO);
    err(&mut t, &reset(&hex("0003 00")), TPM_BAD_PARAM_SIZE);
    // Locality 4 resets 17, locality 2 resets 21-22: without a dynamic
    // launch (TOSPresent clear) back to all-FF, as libtpms.
    ok(&mut t, 4, &extend(17, [1; 20]));
    assert_eq!(rc(&t.execute(4, &reset(&hex("0003 000002")))), 0);
    assert_eq!(ok(&mut t, 0, &pcr_read(17)), [0xFF; 20]);
    ok(&mut t, 2, &extend(22, [1; 20]));
    assert_eq!(rc(&t.execute(2, &reset(&hex("0003 000060")))), 0);
    assert_eq!(ok(&mut t, 0, &pcr_read(22)), [0xFF; 20]);
    assert_eq!(rc(&t.execute(3, &reset(&hex("0003 000020")))), TPM_NOTLOCAL);
    // After TPM_HASH_START (TOSPresent set) the same resets give zero.
    t.hash_start().unwrap();
    t.hash_end().unwrap();
    ok(&mut t, 2, &extend(22, [1; 20]));
    assert_eq!(rc(&t.execute(2, &reset(&hex("0003 000060")))), 0);
    assert_eq!(ok(&mut t, 0, &pcr_read(22)), [0; 20]);
    assert_ne!(ok(&mut t, 0, &pcr_read(17)), [0; 20]);
    assert_eq!(rc(&t.execute(4, &reset(&hex("0003 000002")))), 0);
    assert_eq!(ok(&mut t, 0, &pcr_read(17)), [0; 20]);
    // ... until the next TPM_Init and Startup.
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert_eq!(rc(&t.execute(2, &reset(&hex("0003 000060")))), 0);
    assert_eq!(ok(&mut t, 0, &pcr_read(22)), [0xFF; 20]);
}

#[test]
fn drtm_hash_sequence_as_libtpms() {
    // Before Startup: TPM_INVALID_POSTINIT and failure mode, still
    // post-init (GetCapability refused as post-init).
    let mut t = manufactured();
    assert_eq!(t.hash_start(), Err(TPM_INVALID_POSTINIT));
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
    err(&mut t, &getcap(CAP_VERSION, &[]), TPM_INVALID_POSTINIT);
    err(&mut t, &startup(ST_CLEAR), TPM_FAILEDSELFTEST);
    err(&mut t, &startup(ST_CLEAR), TPM_INVALID_POSTINIT);
    ok(&mut t, 0, &getcap(CAP_VERSION, &[]));
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));

    // The sequence: 17-22 zero, PCR 17 = SHA1(0 || SHA1(data)), the
    // establishment flag set and persisted.
    ok(&mut t, 0, &extend(10, [3; 20]));
    let pcr10 = ok(&mut t, 0, &pcr_read(10));
    t.clear_dirty();
    assert!(!t.tpm_established());
    t.hash_start().unwrap();
    assert!(t.tpm_established() && t.permanent_dirty());
    for i in 17..=22 {
        assert_eq!(ok(&mut t, 0, &pcr_read(i)), [0; 20]);
    }
    // While PCR 17 is zero only locality 4 extends it.
    assert_eq!(rc(&t.execute(3, &extend(17, [1; 20]))), TPM_BAD_LOCALITY);
    t.hash_data(b"ab").unwrap();
    t.hash_data(b"c").unwrap();
    t.hash_end().unwrap();
    let expect = crate::crypto::sha1_parts(&[&[0; 20], &crate::sha1(b"abc")]);
    assert_eq!(ok(&mut t, 0, &pcr_read(17)), expect);
    assert_eq!(ok(&mut t, 0, &pcr_read(10)), pcr10);
    ok(&mut t, 3, &extend(17, [1; 20]));
    // The flag survives a power cycle; localities 3 and 4 reset it.
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert_eq!(ok(&mut t, 0, &pcr_read(17)), [0xFF; 20]);
    assert!(t.tpm_established());
    assert_eq!(t.reset_established(0), Err(TPM_BAD_LOCALITY));
    t.reset_established(3).unwrap();
    assert!(!t.tpm_established());

    // HASH_END without HASH_START: TPM_SHA_THREAD, failure mode.
    assert_eq!(t.hash_end(), Err(TPM_SHA_THREAD));
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    // A second HASH_START inside a sequence: TPM_FAIL, failure mode.
    t.hash_start().unwrap();
    assert_eq!(t.hash_start(), Err(TPM_FAIL));
    err(&mut t, &pcr_read(0), TPM_FAILEDSELFTEST);
}

#[test]
fn get_random_returns_what_was_asked_up_to_buffer() {
    let mut t = started();
    let b = ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(128).bytes());
    assert_eq!(be32(&b), 128);
    assert_eq!(b.len(), 132);
    let b2 = ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(128).bytes());
    assert_ne!(b, b2);
    assert_eq!(ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(0).bytes()), [0, 0, 0, 0]);
    let big = t.execute(0, &Cmd::new(ORD_GET_RANDOM).u32(5000).bytes());
    assert_eq!(big.len(), 4096);
    assert_eq!(be32(&big[10..]), 4082);
}

#[test]
fn stir_random_changes_the_stream() {
    let mut a = started();
    let mut b = started();
    ok(&mut b, 0, &Cmd::new(ORD_STIR_RANDOM).sized(b"abc").bytes());
    let ra = ok(&mut a, 0, &Cmd::new(ORD_GET_RANDOM).u32(20).bytes());
    let rb = ok(&mut b, 0, &Cmd::new(ORD_GET_RANDOM).u32(20).bytes());
    assert_ne!(ra, rb);
    err(&mut b, &Cmd::new(ORD_STIR_RANDOM).u32(5).raw(b"ab").bytes(), TPM_BAD_PARAM_SIZE);
}

#[test]
fn get_ticks_counts_microseconds_with_a_stable_nonce() {
    let mut t = started();
    let a = ok(&mut t, 0, &Cmd::new(ORD_GET_TICKS).bytes());
    let b = ok(&mut t, 0, &Cmd::new(ORD_GET_TICKS).bytes());
    assert_eq!(a.len(), 32);
    assert_eq!(&a[..2], &[0, 0x14]);
    assert_eq!(&a[10..12], &[0, 1]);
    let ta = u64::from_be_bytes(a[2..10].try_into().unwrap());
    let tb = u64::from_be_bytes(b[2..10].try_into().unwrap());
    assert_eq!(tb - ta, 1000);
    assert_eq!(a[12..], b[12..]);
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    let c = ok(&mut t, 0, &Cmd::new(ORD_GET_TICKS).bytes());
    assert_ne!(a[12..], c[12..], "a new tick session after TPM_Init");
}

#[test]
fn self_tests_pass_and_report() {
    let mut t = started();
    assert_eq!(t.execute(0, &Cmd::new(ORD_CONTINUE_SELF_TEST).bytes()), hex("00c4 0000000a 00000000"));
    assert_eq!(t.execute(0, &Cmd::new(ORD_SELF_TEST_FULL).bytes()), hex("00c4 0000000a 00000000"));
    let r = ok(&mut t, 0, &Cmd::new(ORD_GET_TEST_RESULT).bytes());
    assert_eq!(be32(&r) as usize, r.len() - 4);
    assert!(r.ends_with(b"passed\n"));
    err(&mut t, &Cmd::new(ORD_SELF_TEST_FULL).u8(0).bytes(), TPM_BAD_PARAM_SIZE);
}

#[test]
fn save_state_then_startup_state_restores_pcrs_once() {
    let mut t = started();
    ok(&mut t, 0, &extend(10, [1; 20]));
    ok(&mut t, 0, &extend(16, [1; 20]));
    let pcr10 = t.pcr(10).unwrap();
    assert!(t.saved_state().is_none());
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    let blob = t.saved_state().expect("SaveState produced a blob");
    t.power_on();
    ok(&mut t, 0, &startup(ST_STATE));
    assert_eq!(t.pcr(10), Some(pcr10));
    assert_eq!(t.pcr(16), Some([0; 20]), "resettable PCRs come back reset");
    assert_eq!(t.pcr(17), Some([0xFF; 20]));
    assert!(t.saved_state().is_none(), "consumed");
    // A second ST_STATE has nothing to restore.
    t.power_on();
    err(&mut t, &startup(ST_STATE), TPM_FAILEDSELFTEST);
    // The blob handed back by the host works again.
    t.power_on();
    t.set_saved_state(&blob).unwrap();
    ok(&mut t, 0, &startup(ST_STATE));
    assert_eq!(t.pcr(10), Some(pcr10));
}

#[test]
fn a_command_after_save_state_invalidates_it() {
    let mut t = started();
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes());
    assert!(t.saved_state().is_none());
    t.power_on();
    err(&mut t, &startup(ST_STATE), TPM_FAILEDSELFTEST);
}

#[test]
fn startup_clear_discards_saved_state_and_zeroes_pcrs() {
    let mut t = started();
    ok(&mut t, 0, &extend(10, [1; 20]));
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert!(t.saved_state().is_none());
    assert_eq!(t.pcr(10), Some([0; 20]));
}

#[test]
fn saved_state_is_refused_when_corrupt_or_foreign() {
    let mut t = started();
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
    let blob = t.saved_state().unwrap();
    for i in 0..blob.len() {
        let mut b = blob.clone();
        b[i] ^= 0x01;
        assert!(t.set_saved_state(&b).is_err(), "flip at {i}");
    }
    for n in 0..blob.len() {
        assert!(t.set_saved_state(&blob[..n]).is_err(), "truncated to {n}");
    }
    let mut other = Tpm::manufacture_without_ek(TestPlatform::new(9));
    assert_eq!(other.set_saved_state(&blob), Err(crate::StateError::WrongTpm));
}

#[test]
fn startup_deactivated_limits_commands() {
    let mut t = manufactured();
    ok(&mut t, 0, &startup(ST_DEACTIVATED));
    err(&mut t, &pcr_read(1), TPM_DEACTIVATED);
    err(&mut t, &Cmd::new(ORD_GET_RANDOM).u32(1).bytes(), TPM_DEACTIVATED);
    err(&mut t, &Cmd::new(ORD_STIR_RANDOM).sized(b"a").bytes(), TPM_DEACTIVATED);
    err(&mut t, &Cmd::new(ORD_GET_TICKS).bytes(), TPM_DEACTIVATED);
    // Extend still extends but answers zeros (libtpms).
    assert_eq!(ok(&mut t, 0, &extend(10, [1; 20])), [0; 20]);
    assert_ne!(t.pcr(10), Some([0; 20]));
    ok(&mut t, 0, &Cmd::new(ORD_OIAP).bytes());
    ok(&mut t, 0, &Cmd::new(ORD_SELF_TEST_FULL).bytes());
    let r = t.execute(0, &getcap(CAP_FLAG, &0x109u32.to_be_bytes()));
    assert_eq!(r, hex("00c4 00000015 00000000 00000007 0020 0100000000"));
    ok(&mut t, 0, &reset(&hex("0003 000001")));
    ok(&mut t, 0, &Cmd::new(ORD_SAVE_STATE).bytes());
}

#[test]
fn oiap_sessions_are_bounded_and_flushable() {
    let mut t = started();
    let mut handles = Vec::new();
    for _ in 0..crate::session::MAX_SESSIONS {
        handles.push(oiap(&mut t).handle);
    }
    err(&mut t, &Cmd::new(ORD_OIAP).bytes(), TPM_RESOURCES);
    let flush = |h: u32| Cmd::new(ORD_FLUSH_SPECIFIC).u32(h).u32(RT_AUTH).bytes();
    ok(&mut t, 0, &flush(handles[0]));
    err(&mut t, &flush(handles[0]), TPM_INVALID_AUTHHANDLE);
    ok(&mut t, 0, &Cmd::new(ORD_TERMINATE_HANDLE).u32(handles[1]).bytes());
    err(&mut t, &Cmd::new(ORD_TERMINATE_HANDLE).u32(handles[1]).bytes(), TPM_INVALID_AUTHHANDLE);
    oiap(&mut t);
    oiap(&mut t);
    err(&mut t, &Cmd::new(ORD_OIAP).bytes(), TPM_RESOURCES);
    err(&mut t, &Cmd::new(ORD_FLUSH_SPECIFIC).u32(1).u32(RT_KEY).bytes(), TPM_BAD_PARAMETER);
    err(&mut t, &Cmd::new(ORD_FLUSH_SPECIFIC).u32(1).u32(99).bytes(), TPM_INVALID_RESOURCE);
    // Startup(ST_CLEAR) after TPM_Init drops all sessions.
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    err(&mut t, &flush(handles[2]), TPM_INVALID_AUTHHANDLE);
}

#[test]
fn osap_refuses_unknown_entities() {
    let mut t = started();
    let osap = |et: u16, ev: u32| Cmd::new(ORD_OSAP).u16(et).u32(ev).raw(&[0; 20]).bytes();
    err(&mut t, &osap(ET_KEYHANDLE, 0x0100_0000), TPM_NOSRK);
    err(&mut t, &osap(ET_NV, 5), TPM_BADINDEX);
    err(&mut t, &osap(0x0099, 5), TPM_WRONG_ENTITYTYPE);
    err(&mut t, &osap(0x0602, KH_OWNER), TPM_INAPPROPRIATE_ENC);
    err(&mut t, &osap(ET_OWNER, KH_OWNER), TPM_NOSRK);
    err(&mut t, &osap(ET_SRK, KH_SRK), TPM_NOSRK);
    err(&mut t, &osap(ET_KEYHANDLE, KH_SRK), TPM_NOSRK);
}

/// A cheap in-tree cousin of the fuzz target: mutated and random commands,
/// also with authorisation trailers, must always get a well-formed answer.
#[test]
fn mutated_commands_always_get_well_formed_answers() {
    let mut t = owned();
    let mut rng = TestPlatform::new(99);
    let mut byte = || {
        let mut b = [0u8; 1];
        rng.fill_random(&mut b);
        b[0]
    };
    let seeds: Vec<Vec<u8>> = [
        ORD_PCR_READ,
        ORD_EXTEND,
        ORD_GET_CAPABILITY,
        ORD_OSAP,
        ORD_SEAL,
        ORD_UNSEAL,
        ORD_LOAD_KEY2,
        ORD_CREATE_WRAP_KEY,
        ORD_NV_DEFINE_SPACE,
        ORD_NV_WRITE_VALUE,
        ORD_QUOTE2,
        ORD_MAKE_IDENTITY,
        ORD_ACTIVATE_IDENTITY,
        ORD_TAKE_OWNERSHIP,
        ORD_PCR_RESET,
        TSC_ORD_PHYSICAL_PRESENCE,
    ]
    .iter()
    .map(|o| Cmd::new(*o).u32(KH_SRK).raw(&[0; 120]).bytes())
    .collect();
    for i in 0..20_000 {
        let mut c = seeds[i % seeds.len()].clone();
        for _ in 0..(byte() % 8) {
            let at = usize::from(byte()) % c.len();
            c[at] = byte();
        }
        if byte() & 1 == 1 {
            c.truncate(10 + usize::from(byte()) % (c.len() - 10));
        }
        if byte() & 3 == 0 {
            let n = c.len() as u32;
            c[2..6].copy_from_slice(&n.to_be_bytes());
        }
        c[0..2].copy_from_slice(&[0, 0xC1 + byte() % 3]);
        let r = t.execute(byte() % 6, &c);
        let (tag, code, _) = parse(&r);
        assert!(matches!(tag, 0xC4..=0xC6));
        if code != 0 {
            assert_eq!((tag, r.len()), (0xC4, 10));
        }
    }
}

/// PCRs reserved to the platform: a guest (localities 0-3) reads and
/// quotes them but cannot extend or reset them, locality 4 can; off by
/// default (a specification TPM), and not part of any saved state.
#[test]
fn platform_pcrs_take_changes_from_locality_4_only() {
    let mut t = started();
    assert_eq!(t.platform_pcrs(), 0);
    assert_eq!(rc(&t.execute(0, &extend(11, [1; 20]))), 0, "off by default: locality 0 extends PCR 11");
    t.reserve_pcrs_to_platform(1 << 11 | 1 << 16 | 1 << 31);
    assert_eq!(t.platform_pcrs(), 1 << 11 | 1 << 16, "no PCR beyond 23");
    let before = t.pcr(11).unwrap();
    for locality in 0..4 {
        assert_eq!(rc(&t.execute(locality, &extend(11, [2; 20]))), TPM_BAD_LOCALITY);
        assert_eq!(t.extend(locality, 11, &[2; 20]), Err(TPM_BAD_LOCALITY));
        // A resettable platform PCR is not the guest's to reset either;
        // PCR 11 is not resettable at all.
        assert_eq!(rc(&t.execute(locality, &reset(&hex("0003 000001")))), TPM_NOTLOCAL);
        assert_eq!(rc(&t.execute(locality, &reset(&hex("0003 000800")))), TPM_NOTRESETABLE);
    }
    assert_eq!(ok(&mut t, 0, &pcr_read(11)), before, "readable, and unchanged");
    // The rest stays the guest's.
    assert_eq!(rc(&t.execute(0, &extend(12, [2; 20]))), 0);
    assert_eq!(rc(&t.execute(0, &reset(&hex("0003 000080")))), 0, "PCR 23");
    let want = sha1_parts(&[&before, &[3; 20]]);
    assert_eq!(ok(&mut t, 4, &extend(11, [3; 20])), want, "the platform extends it");
    assert_eq!(rc(&t.execute(4, &reset(&hex("0003 000001")))), 0);
    // A power cycle keeps it (it is the chip's configuration) ...
    t.power_on();
    assert_eq!(rc(&t.execute(0, &startup(ST_CLEAR))), 0);
    assert_eq!(rc(&t.execute(0, &extend(11, [2; 20]))), TPM_BAD_LOCALITY);
    // ... but it is not state: a chip restored from its blob has none.
    let restored = crate::Tpm::from_permanent(&t.permanent_state(), TestPlatform::new(5)).unwrap();
    assert_eq!(restored.platform_pcrs(), 0);
}
