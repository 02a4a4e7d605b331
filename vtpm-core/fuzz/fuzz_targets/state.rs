//! Feeds arbitrary bytes to the state loaders: they must refuse or load,
//! never panic. Two thirds of the inputs are wrapped in a valid envelope
//! (magic, version, length, SHA-1) so that the body parsers get exercised,
//! not just the checksum.
#![no_main]

mod common;
use common::*;
use libfuzzer_sys::fuzz_target;

fn envelope(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    let sum = vtpm_core::sha1(&v);
    v.extend_from_slice(&sum);
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(t) = vtpm_core::Tpm::from_permanent(&envelope(b"CTVMTPMP", body), FuzzPlatform(1)) {
                let blob = t.permanent_state();
                let again = vtpm_core::Tpm::from_permanent(&blob, FuzzPlatform(1)).expect("re-load");
                assert_eq!(again.permanent_state(), blob);
            }
        }
        1 => {
            let mut t = owned();
            let _ = t.set_saved_state(&envelope(b"CTVMTPMS", body));
            t.power_on();
            check_response(&t.execute(0, &cmd(0xC1, 0x99, &[0, 2])));
            check_response(&t.execute(0, &cmd(0xC1, 0x15, &[0, 0, 0, 10])));
        }
        _ => {
            let _ = vtpm_core::Tpm::from_permanent(body, FuzzPlatform(1));
            let mut t = owned();
            let _ = t.set_saved_state(body);
        }
    }
});
