//! Feeds arbitrary command sequences to `Tpm::execute`.
//!
//! Input: a series of records `op ‖ …`:
//! * op % 4 == 0: raw command: locality, u16 length, bytes.
//! * op % 4 == 1: authorised command: ordinal selector, secret selector,
//!   u16 length, parameters; the harness opens an OIAP session and computes
//!   the HMAC, so the fuzzer reaches code behind authorisation.
//! * op % 4 == 2: TPM_Init then Startup(ST_CLEAR or ST_STATE).
//! * op % 4 == 3: the hypervisor's own extend/pcr calls.
//!
//! Every response must have a well-formed header.
#![no_main]

mod common;
use common::*;
use libfuzzer_sys::fuzz_target;

const AUTH_ORDINALS: [u32; 20] = [
    0x1F, 0x41, 0x20, 0x21, 0x3C, 0x1E, 0x17, 0x18, 0x16, 0x3E, 0x79, 0x7A, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0x66, 0x81,
    0x5B,
];

fuzz_target!(|data: &[u8]| {
    let mut t = owned();
    t.clear_dirty();
    let mut loaded: Vec<[u8; 4]> = vec![0x4000_0000u32.to_be_bytes()];
    let mut i = 0usize;
    let next = |i: &mut usize, n: usize| -> Option<&[u8]> {
        let s = data.get(*i..i.checked_add(n)?)?;
        *i += n;
        Some(s)
    };
    for _ in 0..16 {
        let Some(op) = next(&mut i, 1) else { break };
        match op[0] % 4 {
            0 => {
                let Some(h) = next(&mut i, 3) else { break };
                let len = u16::from_be_bytes([h[1], h[2]]) as usize % 4200;
                let body = data.get(i..).map(|r| &r[..len.min(r.len())]).unwrap_or(&[]);
                i += body.len();
                let r = t.execute(h[0] % 6, body);
                check_response(&r);
            }
            1 => {
                let Some(h) = next(&mut i, 4) else { break };
                let ord = AUTH_ORDINALS[h[0] as usize % AUTH_ORDINALS.len()];
                let secret = match h[1] % 4 {
                    0 => OWNER,
                    1 => SRK_AUTH,
                    2 => [0x6B; 20],
                    _ => [h[1]; 20],
                };
                let len = u16::from_be_bytes([h[2], h[3]]) as usize % 1024;
                let params = data.get(i..).map(|r| &r[..len.min(r.len())]).unwrap_or(&[]);
                i += params.len();
                // Most key commands start with a key handle: pick a live one.
                let handle = loaded[params.first().copied().unwrap_or(0) as usize % loaded.len()];
                let c = authorise(&mut t, ord, &handle, params, &secret);
                let r = t.execute(0, &c);
                check_response(&r);
                if (ord == 0x41 || ord == 0x20) && r.len() >= 14 && r[6..10] == [0; 4] {
                    loaded.push([r[10], r[11], r[12], r[13]]);
                }
            }
            2 => {
                let Some(h) = next(&mut i, 1) else { break };
                if h[0] & 1 == 1 {
                    check_response(&t.execute(0, &cmd(0xC1, 0x98, &[])));
                }
                t.power_on();
                let st = if h[0] & 2 == 2 { 2 } else { 1 };
                check_response(&t.execute(0, &cmd(0xC1, 0x99, &[0, st])));
            }
            _ => {
                let Some(h) = next(&mut i, 22) else { break };
                let digest: [u8; 20] = h[2..22].try_into().unwrap();
                let _ = t.extend(h[0], u32::from(h[1]), &digest);
                let _ = t.pcr(u32::from(h[1]));
            }
        }
    }
    // A changed permanent state must serialise and restore exactly.
    if t.permanent_dirty() {
        let blob = t.permanent_state();
        let back = vtpm_core::Tpm::from_permanent(&blob, FuzzPlatform(3)).expect("own blob restores");
        assert_eq!(back.permanent_state(), blob);
    }
});
