//! Quick timing of the hot commands (the criterion comparison with libtpms
//! lives in the harness). Run: `cargo run -p vtpm-core --release --example microbench`.

use std::hint::black_box;
use std::time::Instant;
use vtpm_core::{Platform, Tpm};

struct Fixed(u64);

impl Platform for Fixed {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (self.0 >> 33) as u8;
        }
    }
    fn ticks_us(&mut self) -> u64 {
        0
    }
}

fn command(ordinal: u32, params: &[u8]) -> Vec<u8> {
    let mut v = vec![0x00, 0xC1];
    v.extend_from_slice(&(10 + params.len() as u32).to_be_bytes());
    v.extend_from_slice(&ordinal.to_be_bytes());
    v.extend_from_slice(params);
    v
}

fn main() {
    let mut tpm = Tpm::manufacture(Fixed(1));
    tpm.execute(0, &command(0x99, &[0, 1]));
    let extend = command(0x14, &[&10u32.to_be_bytes()[..], &[1; 20]].concat());
    let read = command(0x15, &10u32.to_be_bytes());
    let random = command(0x46, &128u32.to_be_bytes());
    for (name, cmd, n) in
        [("Extend", &extend, 1_000_000), ("PCRRead", &read, 1_000_000), ("GetRandom(128)", &random, 200_000)]
    {
        let start = Instant::now();
        for _ in 0..n {
            black_box(tpm.execute(0, black_box(cmd)));
        }
        println!("{name:16} {:>8.0} ns/command", start.elapsed().as_nanos() as f64 / f64::from(n));
    }
}
