//! Host timings of the sealed state blob and the EK certificate:
//! `cargo run --release -p vtpm-trust --example cost`.

use std::time::Instant;
use vtpm_trust::blob::{open, seal, StateKey, StatePayload};
use vtpm_trust::ekcert::CaKey;

fn time<T>(label: &str, n: u32, mut f: impl FnMut() -> T) -> T {
    let start = Instant::now();
    let mut out = None;
    for _ in 0..n {
        out = Some(f());
    }
    println!("{label:<42} {:>10.1} us", start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    out.unwrap()
}

fn main() {
    let secret = [0x42; 32];
    let key = time("StateKey::derive (HKDF-SHA256)", 1000, || StateKey::derive(&secret));
    // An owned chip's permanent state is about 1.5 KiB (EK, SRK, flags);
    // 8 KiB stands for one with NV indices in use.
    for size in [1536usize, 8192] {
        let payload = StatePayload { permanent: vec![0xa5; size], saved: Some(vec![0x5a; 900]) }.encode();
        let blob =
            time(&format!("seal {} B", payload.len()), 1000, || seal(&key, "alpha", 7, &payload, [1; 12]).unwrap());
        time(&format!("open {} B", blob.len()), 1000, || open(&key, "alpha", 7, &blob).unwrap());
    }
    let ca = time("CaKey::derive (RSA-2048 generation)", 5, || CaKey::derive(&secret));
    let ek = CaKey::derive(&[7; 32]).modulus().to_vec();
    let cert = time("issue_ek_certificate", 50, || ca.issue_ek_certificate(&ek, "alpha", 1_767_225_600).unwrap());
    println!("EK certificate: {} bytes DER", cert.len());
    time("verify_signed_by", 200, || vtpm_trust::ekcert::verify_signed_by(&cert, ca.modulus()).unwrap());
}
