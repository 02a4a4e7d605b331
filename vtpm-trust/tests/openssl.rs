//! OpenSSL, an independent X.509 implementation, reads the EK certificate
//! and verifies it against the CA certificate. A missing `openssl` fails
//! the test (Debian package `openssl`).

use std::path::PathBuf;
use std::process::Command;
use vtpm_trust::ekcert::CaKey;

fn pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run openssl (Debian package `openssl`): {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn openssl_reads_and_verifies_the_ek_certificate() {
    let dir = std::env::temp_dir().join(format!("vtpm-trust-openssl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |n: &str| -> PathBuf { dir.join(n) };
    let ca = CaKey::derive(&[7; 32]);
    let ek = CaKey::derive(&[8; 32]).modulus().to_vec();
    let not_before = 1_767_225_600; // 2026-01-01
    std::fs::write(path("ek.der"), ca.issue_ek_certificate(&ek, "alpha", not_before).unwrap()).unwrap();
    std::fs::write(path("ek.pem"), pem(&ca.issue_ek_certificate(&ek, "alpha", not_before).unwrap())).unwrap();
    std::fs::write(path("ca.pem"), pem(&ca.certificate(not_before).unwrap())).unwrap();
    let (ok, text) = openssl(&["x509", "-inform", "der", "-in", path("ek.der").to_str().unwrap(), "-text", "-noout"]);
    assert!(ok, "openssl x509 refused the EK certificate:\n{text}");
    for want in [
        "Version: 3",
        "Issuer: O = CTVM, CN = CTVM vTPM CA",
        "Public-Key: (2048 bit)",
        "X509v3 Key Usage: critical",
        "Key Encipherment",
        "CA:FALSE",
        "X509v3 Subject Alternative Name: critical",
        "2.23.133.2.1",
        "id:4354564D",
        "vtpm-core",
        "2.23.133.8.1",
        "Not After : Dec 31 23:59:59 9999 GMT",
    ] {
        assert!(text.contains(want), "`{want}` missing from openssl's reading:\n{text}");
    }
    let (ok, text) =
        openssl(&["verify", "-CAfile", path("ca.pem").to_str().unwrap(), path("ek.pem").to_str().unwrap()]);
    assert!(ok && text.contains("OK"), "openssl verify:\n{text}");
    // Under another host's CA it does not verify.
    std::fs::write(path("other.pem"), pem(&CaKey::derive(&[9; 32]).certificate(not_before).unwrap())).unwrap();
    let (ok, text) =
        openssl(&["verify", "-CAfile", path("other.pem").to_str().unwrap(), path("ek.pem").to_str().unwrap()]);
    assert!(!ok, "verified under a foreign CA:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
