//! Shared set-up of the fuzz targets: a deterministic platform and an owned
//! chip made once per process.

use std::sync::OnceLock;
use vtpm_core::{Platform, Tpm};

#[derive(Clone)]
pub struct FuzzPlatform(pub u64);

impl Platform for FuzzPlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (self.0 >> 33) as u8;
        }
    }
    fn ticks_us(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
}

pub const OWNER: [u8; 20] = [0x0A; 20];
pub const SRK_AUTH: [u8; 20] = [0; 20];

/// Builds a command.
pub fn cmd(tag: u16, ord: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + body.len());
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    v.extend_from_slice(&ord.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A started chip with an owner (OWNER) and SRK (SRK_AUTH), made once.
pub fn owned() -> Tpm<FuzzPlatform> {
    static CHIP: OnceLock<Tpm<FuzzPlatform>> = OnceLock::new();
    CHIP.get_or_init(|| {
        let mut t = Tpm::manufacture(FuzzPlatform(1));
        t.execute(0, &cmd(0xC1, 0x99, &[0, 1]));
        // ReadPubek, then TakeOwnership with OAEP-encrypted secrets.
        let r = t.execute(0, &cmd(0xC1, 0x7C, &[0; 20]));
        let ek = r[10 + 28..10 + 284].to_vec();
        let mut d = vtpm_core::crypto::Drbg::new([5; 32]);
        let eo = vtpm_core::crypto::oaep_encrypt(&mut d, &ek, &OWNER).unwrap();
        let es = vtpm_core::crypto::oaep_encrypt(&mut d, &ek, &SRK_AUTH).unwrap();
        let mut p = vec![0, 5];
        p.extend_from_slice(&256u32.to_be_bytes());
        p.extend_from_slice(&eo);
        p.extend_from_slice(&256u32.to_be_bytes());
        p.extend_from_slice(&es);
        // SRK template: TPM_KEY v1.1 storage key, OAEP, 2048 bits.
        p.extend_from_slice(&[1, 1, 0, 0, 0, 0x11, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0, 0, 0, 1, 0, 3, 0, 1, 0, 0, 0, 12, 0, 0, 8, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
        p.extend_from_slice(&[0; 12]);
        let t2 = authorise(&mut t, 0x0D, &[], &p, &OWNER);
        let r = t.execute(0, &t2);
        assert_eq!(&r[6..10], &[0, 0, 0, 0], "fuzz set-up: TakeOwnership");
        t
    })
    .clone()
}

/// Opens an OIAP session and wraps `params` into an authorised command.
pub fn authorise(t: &mut Tpm<FuzzPlatform>, ord: u32, handles: &[u8], params: &[u8], secret: &[u8; 20]) -> Vec<u8> {
    let r = t.execute(0, &cmd(0xC1, 0x0A, &[]));
    let (handle, even) = if r.len() == 34 {
        (r[10..14].to_vec(), r[14..34].to_vec())
    } else {
        (vec![0; 4], vec![0; 20])
    };
    let odd = [0x0D; 20];
    let mut d = Vec::new();
    d.extend_from_slice(&ord.to_be_bytes());
    d.extend_from_slice(params);
    let digest = vtpm_core::sha1(&d);
    let mac = vtpm_core::crypto::hmac_sha1(secret, &[&digest, &even, &odd, &[1]]);
    let mut body = handles.to_vec();
    body.extend_from_slice(params);
    body.extend_from_slice(&handle);
    body.extend_from_slice(&odd);
    body.push(1);
    body.extend_from_slice(&mac);
    cmd(0xC2, ord, &body)
}

/// The header invariants every response must hold.
pub fn check_response(r: &[u8]) {
    assert!(r.len() >= 10 && r.len() <= 4096, "response length {}", r.len());
    let tag = u16::from_be_bytes([r[0], r[1]]);
    let size = u32::from_be_bytes([r[2], r[3], r[4], r[5]]) as usize;
    let rc = u32::from_be_bytes([r[6], r[7], r[8], r[9]]);
    assert_eq!(size, r.len(), "size field");
    assert!(matches!(tag, 0xC4 | 0xC5 | 0xC6), "tag {tag:#x}");
    if rc != 0 {
        assert_eq!((tag, r.len()), (0xC4, 10), "error responses are bare");
    }
}
