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
