//! The platform-TPM API against libtpms (swtpm over its TCP protocol), TPM
//! 2.0 and TPM 1.2: CTVM's measured launch, the vTPM state key sealed to
//! its PCRs (released after an identical launch, refused after another),
//! and the monotonic counter across a power cycle.

#[path = "support/swtpm.rs"]
mod swtpm;

use hypervisor::platform::tpm::launch::{self, PlatformTpm};
use hypervisor::platform::tpm::seal::{self, Counter, SealError};
use hypervisor::platform::tpm::tpm12::Tpm12Error;
use hypervisor::platform::tpm::tpm2::Tpm2Error;
use hypervisor::platform::tpm::Family;
use swtpm::*;

#[test]
fn tpm2_seal_unseal_and_counter_against_libtpms() {
    let state = TempDir::new("tpm2");
    let counter;
    let blob;
    {
        let swtpm = Swtpm::start(&state.0, true);
        let mut tpm = PlatformTpm::new(Family::V2, swtpm.transport());
        launch_ctvm(&mut tpm, "log=info");
        blob = seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
        assert!(blob.starts_with(b"CTVMKEY1\x02\x01\x0c"));
        assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
        counter = seal::create_counter(&mut tpm, &mut nonces()).unwrap();
        assert_eq!(counter, Counter::Nv(seal::COUNTER_INDEX));
        let first = seal::read_counter(&mut tpm, counter).unwrap();
        assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), first + 1);
        assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter, "creating twice is harmless");
        assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), first + 1);
        // A blob changed in the chip's part does not load.
        let mut bad = blob.clone();
        let at = bad.len() - 40;
        bad[at] ^= 1;
        assert!(matches!(seal::unseal_key(&mut tpm, &bad, &mut nonces()), Err(SealError::V2(Tpm2Error::Rc { .. }))));
        assert_eq!(seal::unseal_key(&mut tpm, b"CTVMKEY1\x01\x01\x0c", &mut nonces()), Err(SealError::Blob));
        // The attack: CTVM's configuration changed (another command line):
        // PCR 12 differs, the key stays sealed.
        launch_ctvm(&mut tpm, "log=debug");
        assert!(matches!(seal::unseal_key(&mut tpm, &blob, &mut nonces()), Err(SealError::V2(Tpm2Error::Rc { .. }))));
    }
    // Power cycle: PCRs start from zero, NV keeps the counter. The same
    // launch unseals the key again; the counter did not go back.
    let swtpm = Swtpm::start(&state.0, true);
    let mut tpm = PlatformTpm::new(Family::V2, swtpm.transport());
    launch_ctvm(&mut tpm, "log=info");
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
    let after = seal::read_counter(&mut tpm, counter).unwrap();
    assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), after + 1);
    assert!(after >= 2);
}

/// A bus interposer records every byte between CTVM and the chip while
/// the key is sealed and unsealed: the key (or any 8 of its bytes in a
/// row) is in none of them. A TPM 1.2 comes owned, as CTVM needs it.
fn key_never_crosses_the_bus(tpm2: bool) {
    let state = TempDir::new(if tpm2 { "tpm2-wire" } else { "tpm12-wire" });
    if !tpm2 {
        owned_tpm12_state(&state.0);
    }
    let swtpm = Swtpm::start(&state.0, tpm2);
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let wire = Wire { inner: swtpm.transport(), seen: seen.clone() };
    let mut tpm = if tpm2 { PlatformTpm::new(Family::V2, wire) } else { tpm12_on(wire) };
    launch_ctvm(&mut tpm, "log=info");
    let blob = seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
    let seen = seen.borrow();
    assert!(seen.len() > 10, "the capture saw the traffic");
    for piece in KEY.windows(8) {
        assert!(!appears(&seen, piece), "key bytes {piece:02x?} crossed the bus in the clear");
    }
}

/// On a TPM 2.0: salted sessions with parameter encryption.
#[test]
fn tpm2_key_never_crosses_the_bus_in_the_clear() {
    key_never_crosses_the_bus(true);
}

/// An active interposer alters TPM2_Unseal's or TPM2_Create's answer: a
/// bit of the encrypted key, of the response HMAC, or the whole session
/// area dropped. CTVM refuses each answer rather than use what it says;
/// the chip refuses a command whose HMAC was altered.
#[test]
fn tpm2_altered_answers_are_refused() {
    use hypervisor::platform::tpm::tpm2::cc;
    let state = TempDir::new("tpm2-mitm");
    let swtpm = Swtpm::start(&state.0, true);
    let mut plain = PlatformTpm::new(Family::V2, swtpm.transport());
    launch_ctvm(&mut plain, "log=info");
    let blob = seal::seal_key(&mut plain, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
    drop(plain);
    // (command, how the response is changed)
    type Change = fn(&mut Vec<u8>);
    let cases: [(u32, &str, Change); 6] = [
        (cc::UNSEAL, "a bit of the encrypted key", |r| r[16] ^= 1),
        (cc::UNSEAL, "a bit of the response HMAC", |r| *r.last_mut().unwrap() ^= 0x80),
        (cc::UNSEAL, "the nonceTPM", |r| r[16 + 32 + 2 + 3] ^= 1),
        (cc::UNSEAL, "the session area dropped", |r| {
            // ST_NO_SESSIONS, the parameters alone.
            let params = u32::from_be_bytes(r[10..14].try_into().unwrap()) as usize;
            let mut bare = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
            bare.extend_from_slice(&r[14..14 + params]);
            let n = bare.len() as u32;
            bare[2..6].copy_from_slice(&n.to_be_bytes());
            *r = bare;
        }),
        (cc::CREATE, "a bit of the sealed object", |r| r[20] ^= 1),
        (cc::CREATE, "a bit of the response HMAC", |r| *r.last_mut().unwrap() ^= 1),
    ];
    for (code, what, change) in cases {
        let alter = move |c: &mut Vec<u8>, r: Option<&mut Vec<u8>>| {
            if let Some(r) = r {
                if command_code(c) == code && r[6..10] == [0; 4] {
                    change(r);
                }
            }
        };
        let mut tpm = PlatformTpm::new(Family::V2, Interposer { inner: swtpm.transport(), alter });
        let got = if code == cc::UNSEAL {
            seal::unseal_key(&mut tpm, &blob, &mut nonces()).map(|_| ())
        } else {
            seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).map(|_| ())
        };
        let Err(SealError::V2(e)) = got else { panic!("{what}: accepted ({got:?})") };
        // Without a session area there is no HMAC to check: malformed.
        let expected = if what.contains("dropped") {
            Tpm2Error::Malformed { command: code }
        } else {
            Tpm2Error::ResponseHmac { command: code }
        };
        assert_eq!(e, expected, "{what}");
    }
    // The other way: a command whose session HMAC was altered is refused
    // by the chip (TPM_RC_BAD_AUTH for session 1): libtpms checks the
    // policy session's HMAC too, under the salted session key.
    for code in [cc::UNSEAL, cc::CREATE] {
        let alter = move |c: &mut Vec<u8>, r: Option<&mut Vec<u8>>| {
            if r.is_none() && command_code(c) == code {
                // The HMAC's last byte: header, one handle, authSize,
                // session handle, nonce (32), attributes, HMAC (32).
                c[10 + 4 + 4 + 4 + 2 + 32 + 1 + 2 + 31] ^= 1;
            }
        };
        let mut tpm = PlatformTpm::new(Family::V2, Interposer { inner: swtpm.transport(), alter });
        let got = if code == cc::UNSEAL {
            seal::unseal_key(&mut tpm, &blob, &mut nonces()).map(|_| ())
        } else {
            seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).map(|_| ())
        };
        assert_eq!(got, Err(SealError::V2(Tpm2Error::Rc { command: code, rc: 0x9a2 })));
    }
    // Untouched, the same chip still unseals the key.
    let mut tpm = PlatformTpm::new(Family::V2, swtpm.transport());
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
}

/// The same capture on a TPM 1.2 (a discrete 1.2 on LPC is the cheap
/// target): `TPM_Seal`'s data and `TPM_Unseal`'s answer cross inside an
/// encrypted transport session.
#[test]
fn tpm12_key_never_crosses_the_bus_in_the_clear() {
    key_never_crosses_the_bus(false);
}

/// An active interposer on a TPM 1.2's bus alters the answer to the
/// wrapped `TPM_Unseal` or `TPM_Seal`: a bit of the (encrypted) key or
/// sealed blob, the transport session's HMAC or its new nonce. CTVM refuses
/// each rather than use it. The chip refuses a wrapped command whose bytes
/// or session HMAC were altered (TPM_AUTH2FAIL: the transport's check).
#[test]
fn tpm12_altered_answers_are_refused() {
    use hypervisor::platform::tpm::tpm12::ord;
    let state = TempDir::new("tpm12-mitm");
    owned_tpm12_state(&state.0);
    let swtpm = Swtpm::start(&state.0, false);
    let mut plain = tpm12(&swtpm);
    launch_ctvm(&mut plain, "log=info");
    let blob = seal::seal_key(&mut plain, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
    drop(plain);
    // ExecuteTransport's answer: header (10), ticks (8), locality (4), the
    // wrapped answer's size (4), then the wrapped answer (its parameters
    // from 26 + 10), then nonceEven (20), continue (1), HMAC (20).
    type Change = fn(&mut Vec<u8>);
    let cases: [(u32, &str, Change); 5] = [
        (ord::UNSEAL, "a bit of the encrypted key", |r| r[36 + 4 + 7] ^= 1),
        (ord::UNSEAL, "a bit of the session HMAC", |r| *r.last_mut().unwrap() ^= 0x80),
        (ord::UNSEAL, "the new nonceEven", |r| {
            let at = r.len() - 41;
            r[at] ^= 1
        }),
        (ord::SEAL, "a bit of the sealed blob", |r| r[36 + 20] ^= 1),
        (ord::SEAL, "a bit of the session HMAC", |r| *r.last_mut().unwrap() ^= 1),
    ];
    // The wrapped command's ordinal, in the clear at 14 + 6.
    let wrapped = |c: &[u8]| command_code(c) == ord::EXECUTE_TRANSPORT && c.len() > 24;
    let inner = |c: &[u8]| u32::from_be_bytes(c[20..24].try_into().unwrap());
    fn run<T: hypervisor::platform::tpm::Transport>(
        tpm: &mut PlatformTpm<T>,
        code: u32,
        blob: &[u8],
    ) -> Result<(), SealError> {
        if code == ord::UNSEAL {
            seal::unseal_key(tpm, blob, &mut nonces()).map(|_| ())
        } else {
            seal::seal_key(tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).map(|_| ())
        }
    }
    for (code, what, change) in cases {
        let alter = move |c: &mut Vec<u8>, r: Option<&mut Vec<u8>>| {
            if let Some(r) = r {
                if wrapped(c) && inner(c) == code && r[6..10] == [0; 4] {
                    change(r);
                }
            }
        };
        let mut tpm = tpm12_on(Interposer { inner: swtpm.transport(), alter });
        let got = run(&mut tpm, code, &blob);
        assert_eq!(got, Err(SealError::V12(Tpm12Error::TransportHmac { ordinal: code })), "{what}");
    }
    // The other way: the encrypted parameters or the HMAC of the command.
    let changes: [(&str, Change); 2] = [
        ("a bit of the encrypted parameters", |c| c[14 + 14 + 3] ^= 1),
        ("a bit of the session HMAC", |c| *c.last_mut().unwrap() ^= 1),
    ];
    for code in [ord::UNSEAL, ord::SEAL] {
        for (what, change) in changes {
            let alter = move |c: &mut Vec<u8>, r: Option<&mut Vec<u8>>| {
                if r.is_none() && wrapped(c) && inner(c) == code {
                    change(c);
                }
            };
            let mut tpm = tpm12_on(Interposer { inner: swtpm.transport(), alter });
            let got = run(&mut tpm, code, &blob);
            let refused = Err(SealError::V12(Tpm12Error::Rc { ordinal: ord::EXECUTE_TRANSPORT, rc: 0x1d }));
            assert_eq!(got, refused, "{what} of {code:#x}");
        }
    }
    // A refused command leaves no session open in the chip: more refusals
    // than libtpms has authorization sessions (16), two sessions each.
    for _ in 0..12 {
        let alter = move |c: &mut Vec<u8>, r: Option<&mut Vec<u8>>| {
            if r.is_none() && wrapped(c) && inner(c) == ord::UNSEAL {
                *c.last_mut().unwrap() ^= 1;
            }
        };
        let mut tpm = tpm12_on(Interposer { inner: swtpm.transport(), alter });
        assert!(run(&mut tpm, ord::UNSEAL, &blob).is_err());
    }
    // Untouched, the same chip still unseals the key.
    let mut tpm = tpm12(&swtpm);
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
}

#[test]
fn tpm12_seal_unseal_and_counter_against_libtpms() {
    let state = TempDir::new("tpm12");
    owned_tpm12_state(&state.0);
    let blob;
    let counter;
    let value;
    {
        let swtpm = Swtpm::start(&state.0, false);
        let mut tpm = tpm12(&swtpm);
        launch_ctvm(&mut tpm, "log=info");
        blob = seal::seal_key(&mut tpm, &KEY, &[launch::PCR_CONFIG], &mut nonces()).unwrap();
        assert!(blob.starts_with(b"CTVMKEY1\x01\x01\x0c"));
        assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
        counter = seal::create_counter(&mut tpm, &mut nonces()).unwrap();
        let first = seal::read_counter(&mut tpm, counter).unwrap();
        value = seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap();
        assert_eq!(value, first + 1);
        assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter, "found again by its label");
        assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), value);
        // Another configuration: TPM_WRONGPCRVAL.
        launch_ctvm(&mut tpm, "log=debug");
        assert_eq!(
            seal::unseal_key(&mut tpm, &blob, &mut nonces()),
            Err(SealError::V12(Tpm12Error::Rc { ordinal: 0x18, rc: 0x18 }))
        );
    }
    let swtpm = Swtpm::start(&state.0, false);
    let mut tpm = tpm12(&swtpm);
    launch_ctvm(&mut tpm, "log=info");
    assert_eq!(seal::unseal_key(&mut tpm, &blob, &mut nonces()).unwrap(), KEY);
    assert_eq!(seal::create_counter(&mut tpm, &mut nonces()).unwrap(), counter);
    assert_eq!(seal::read_counter(&mut tpm, counter).unwrap(), value, "the counter survives the power cycle");
    assert_eq!(seal::increment_counter(&mut tpm, counter, &mut nonces()).unwrap(), value + 1);
}
