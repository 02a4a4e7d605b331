//! The glue between a guest's vtpm-core TPM and `vtpm-trust`: what the
//! boot path (`tpm::setup`) calls at a vTPM's first boot (EK certificate)
//! and to open its sealed state, and what the durable backend
//! (`tpm::durable`) calls to seal it for the store service.

use alloc::vec::Vec;

use vtpm_core::{Platform, Tpm};
use vtpm_trust::blob::{self, BlobError, StateKey, StatePayload};
use vtpm_trust::ekcert::{self, CaKey, CertError};

/// Why a first-boot provisioning failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvisionError {
    /// The TPM refused (TPM_NO_ENDORSEMENT, an NV error): its return code.
    Tpm(u32),
    Cert(CertError),
}

/// At a vTPM's first boot: certifies its EK with the host's CA, writes the
/// certificate to NV index 0x1000f000 (TCG_PCCLIENT_STORED_CERT, readable
/// by anyone, writable by the owner), and ends manufacturing mode so that
/// NV attributes hold from then on. Generates a deferred EK (one RSA-2048
/// generation) and marks the permanent state dirty: persist it.
pub fn provision_ek_certificate<P: Platform>(
    tpm: &mut Tpm<P>,
    ca: &CaKey,
    guest: &str,
    not_before_unix: u64,
) -> Result<(), ProvisionError> {
    let ek = tpm.endorsement_modulus().map_err(ProvisionError::Tpm)?;
    let der = ca.issue_ek_certificate(&ek, guest, not_before_unix).map_err(ProvisionError::Cert)?;
    let nv = ekcert::nv_stored_cert(&der).map_err(ProvisionError::Cert)?;
    tpm.provision_nv(ekcert::EK_CERT_NV_INDEX, ekcert::EK_CERT_NV_ATTRIBUTES, &nv).map_err(ProvisionError::Tpm)?;
    tpm.lock_nv();
    Ok(())
}

/// The sealed blob of `tpm`'s state (permanent, and saved when the guest
/// suspended with TPM_SaveState) as version `version` of `guest`; `nonce`
/// is fresh random bytes, mixed into a synthetic nonce
/// (`blob::seal_synthetic`).
pub fn seal_state<P: Platform>(
    key: &StateKey,
    guest: &str,
    version: u64,
    tpm: &Tpm<P>,
    nonce: [u8; blob::NONCE_LEN],
) -> Result<Vec<u8>, BlobError> {
    let payload = StatePayload { permanent: tpm.permanent_state(), saved: tpm.saved_state() };
    blob::seal_synthetic(key, guest, version, &payload.encode(), nonce)
}

/// Why a sealed state did not restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreError {
    /// Its state key could not be had (see `anchor::SealingRoot`).
    Key(super::anchor::KeyError),
    Blob(BlobError),
    State(vtpm_core::StateError),
    /// The version table in front of it was refused (`tpm::host`).
    Table(super::anchor::AnchorError),
}

/// Restores `guest`'s TPM from its sealed blob, refusing versions below
/// `counter`; returns the TPM (powered on, waiting for Startup) and the
/// blob's version.
pub fn open_state<P: Platform>(
    key: &StateKey,
    guest: &str,
    counter: u64,
    sealed: &[u8],
    platform: P,
) -> Result<(Tpm<P>, u64), RestoreError> {
    let opened = blob::open(key, guest, counter, sealed).map_err(RestoreError::Blob)?;
    let payload = StatePayload::decode(&opened.plaintext).map_err(RestoreError::Blob)?;
    let mut tpm = Tpm::from_permanent(&payload.permanent, platform).map_err(RestoreError::State)?;
    if let Some(saved) = &payload.saved {
        tpm.set_saved_state(saved).map_err(RestoreError::State)?;
    }
    tpm.power_on();
    Ok((tpm, opened.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u8);

    impl Platform for Counter {
        fn fill_random(&mut self, buf: &mut [u8]) {
            for b in buf {
                self.0 = self.0.wrapping_add(29);
                *b = self.0;
            }
        }
        fn ticks_us(&mut self) -> u64 {
            0
        }
    }

    fn execute(tpm: &mut Tpm<Counter>, cmd: &[u8]) -> Vec<u8> {
        let r = tpm.execute(0, cmd);
        assert_eq!(&r[6..10], &[0; 4], "command {:02x?} failed: {:02x?}", &cmd[6..10], &r[6..10]);
        r
    }

    #[test]
    fn a_provisioned_and_sealed_vtpm_comes_back_with_its_certificate_and_pcrs() {
        let secret = [5u8; 32];
        let ca = CaKey::derive(&secret);
        let mut tpm = crate::tpm::engine::guest_tpm("alpha", Some(secret), || Counter(1));
        provision_ek_certificate(&mut tpm, &ca, "alpha", 1_767_225_600).unwrap();
        assert!(tpm.permanent_dirty());
        // Startup, a measurement, SaveState: the saved state rides along.
        execute(&mut tpm, &[0, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 1]);
        let extend = [&[0, 0xc1, 0, 0, 0, 34, 0, 0, 0, 0x14, 0, 0, 0, 10][..], &[0xab; 20]].concat();
        let pcr10 = execute(&mut tpm, &extend)[10..30].to_vec();
        execute(&mut tpm, &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x98]);
        let key = StateKey::derive(&secret);
        let sealed = seal_state(&key, "alpha", 3, &tpm, [9; 12]).unwrap();

        assert_eq!(
            open_state(&key, "alpha", 4, &sealed, Counter(2)).err(),
            Some(RestoreError::Blob(BlobError::Stale { version: 3, minimum: 4 }))
        );
        assert_eq!(
            open_state(&key, "beta", 0, &sealed, Counter(2)).err(),
            Some(RestoreError::Blob(BlobError::WrongGuest))
        );
        let (mut back, version) = open_state(&key, "alpha", 3, &sealed, Counter(2)).unwrap();
        assert_eq!(version, 3);
        execute(&mut back, &[0, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 2]);
        let read = execute(&mut back, &[0, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x15, 0, 0, 0, 10]);
        assert_eq!(&read[10..30], &pcr10[..], "PCR 10 restored from the saved state in the blob");
        // The certificate is in NV, readable without authorisation.
        let head = execute(&mut back, &[0, 0xc1, 0, 0, 0, 22, 0, 0, 0, 0xcf, 0x10, 0, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&head[14..17], &[0x10, 0x01, 0x00]);
        let size = u32::from(u16::from_be_bytes([head[17], head[18]])) + 5;
        let mut cmd = alloc::vec![0, 0xc1, 0, 0, 0, 22, 0, 0, 0, 0xcf, 0x10, 0, 0xf0, 0, 0, 0, 0, 0];
        cmd.extend_from_slice(&size.to_be_bytes());
        let nv = execute(&mut back, &cmd);
        let der = ekcert::parse_nv_stored_cert(&nv[14..]).unwrap();
        let certified = ekcert::verify_signed_by(der, ca.modulus()).unwrap();
        assert_eq!(certified, back.endorsement_modulus().unwrap(), "the certificate names this vTPM's EK");
    }
}
