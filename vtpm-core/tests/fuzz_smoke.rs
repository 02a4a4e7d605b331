//! A fuzz smoke test that runs with `cargo test` on the stable toolchain.
//!
//! It drives the same harness as the cargo-fuzz targets in `fuzz/` (the
//! module is included from there, not copied): the `execute` and
//! `execute_keys` interpreters on their regression seeds (`fuzz/seeds/`)
//! and on inputs derived from them, raw commands in every power state, and
//! the state-blob loaders on mutated blobs and on the `state` seeds. Inputs come from a seeded
//! xorshift generator, so every run is the same and a failure names the
//! input that caused it; the harness asserts the properties (no panic,
//! well-formed response headers whose size field is the length, bare
//! 10-byte error responses, success tags matching the command tag, state
//! loaders that refuse rather than panic and restore what they serialise).
//!
//! This is a regression net, not a fuzzing campaign: a few thousand inputs
//! in well under a minute in a debug build. `FUZZ_SMOKE_SCALE=n` runs n
//! times as many; long runs belong to cargo-fuzz (see README.md).

#[allow(dead_code)] // the cargo-fuzz targets use the rest
#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

use common::{check_exchange, cmd, envelope, exec, fixture, run_execute, run_execute_keys, run_state, FuzzPlatform};
use std::time::Instant;
use vtpm_core::Tpm;

/// xorshift64* (Vigna): small, fast and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-enough in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

fn scale() -> usize {
    std::env::var("FUZZ_SMOKE_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

const INTERESTING_U32: [u32; 12] = [0, 1, 2, 10, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF];

/// Writes a big-endian length at `at` that lies about what follows it by a
/// little (-2..=+2 bytes) or a lot (an interesting value).
fn lie_about_length(rng: &mut Rng, v: &mut [u8], at: usize, width: usize) {
    if at + width > v.len() {
        return;
    }
    let follows = (v.len() - at - width) as i64;
    let value = if rng.below(2) == 0 {
        (follows + rng.below(5) as i64 - 2).max(0) as u64
    } else {
        u64::from(*rng.pick(&INTERESTING_U32))
    };
    let be = value.to_be_bytes();
    v[at..at + width].copy_from_slice(&be[8 - width..]);
}

/// One to four mutations of `input`: bit flips, byte values, truncation,
/// splicing with another corpus entry, insertions, deletions, interesting
/// integers and length fields that lie.
fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(10) {
            0 if len > 0 => {
                let at = rng.below(len);
                v[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                let any = rng.byte();
                v[at] = *rng.pick(&[0x00, 0x01, 0x7F, 0x80, 0xFF, any]);
            }
            2 if len > 0 => v.truncate(rng.below(len)),
            3 => {
                let other = rng.pick(corpus);
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let extra = rng.bytes(n);
                v.splice(at..at, extra);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(16));
                v.drain(at..at + n);
            }
            6 if len >= 4 => {
                let at = rng.below(len - 3);
                v[at..at + 4].copy_from_slice(&rng.pick(&INTERESTING_U32).to_be_bytes());
            }
            7 if len >= 2 => {
                let at = rng.below(len - 1);
                lie_about_length(rng, &mut v, at, 2);
            }
            _ if len >= 4 => {
                let at = rng.below(len - 3);
                lie_about_length(rng, &mut v, at, 4);
            }
            _ => v.push(rng.byte()),
        }
    }
    v.truncate(max_len);
    v
}

/// The ordinals vtpm-core implements, a few it refuses, and the TPM2 probe.
const ORDINALS: [u32; 47] = [
    0x99, 0x98, 0x50, 0x53, 0x54, 0x65, 0x15, 0x14, 0xC8, 0x46, 0x47, 0xF1, 0x0A, 0x0B, 0xBA, 0x96, 0x7C, 0x78, 0x81,
    0x7E, 0x0D, 0x5B, 0x5D, 0x6F, 0x70, 0x72, 0x71, 0x4000000A, 0x66, 0x1F, 0x20, 0x41, 0x21, 0x22, 0x3C, 0x1E, 0x17,
    0x18, 0x16, 0x3E, 0x79, 0x7A, 0xCC, 0xCD, 0xCF, 0xD0, 0x17A,
];

/// A command for a real ordinal with a random body (whose sized fields then
/// often lie), a random tag and sometimes a lying paramSize.
fn random_command(rng: &mut Rng) -> Vec<u8> {
    let any = rng.next() as u16;
    let tag = *rng.pick(&[0xC1, 0xC1, 0xC2, 0xC3, 0xC4, 0x8001, any]);
    let ord = if rng.below(8) == 0 { rng.next() as u32 } else { *rng.pick(&ORDINALS) };
    let n = *rng.pick(&[0, 2, 4, 8, 20, 45, 64, 90, 300]) + rng.below(8);
    let mut body = rng.bytes(n);
    // Small sized fields, so that parsers get past the first one.
    for _ in 0..rng.below(3) {
        if body.len() >= 4 {
            let at = rng.below(body.len() - 3);
            lie_about_length(rng, &mut body, at, 4);
        }
    }
    let mut c = cmd(tag, ord, &body);
    if rng.below(4) == 0 {
        // paramSize: a little off, or far off.
        let size = if rng.below(2) == 0 {
            (c.len() as u32).wrapping_add(rng.below(5) as u32).wrapping_sub(2)
        } else {
            *rng.pick(&INTERESTING_U32)
        };
        c[2..6].copy_from_slice(&size.to_be_bytes());
    }
    c
}

/// A fresh `execute` input in the record format of `run_execute`.
fn random_records(rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    // Half the inputs first load the prepared signing key (handle slot 1),
    // so that authorised records can use it.
    let key_loaded = rng.below(2) == 0;
    if key_loaded {
        v.extend_from_slice(&[0x83, 0, 0, 0]);
    }
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 | 1 => {
                let c = random_command(rng);
                v.push(0);
                v.push(rng.below(6) as u8);
                v.extend_from_slice(&(c.len() as u16).to_be_bytes());
                v.extend_from_slice(&c);
            }
            2 => {
                // An authorised command. With the key loaded, mostly one that
                // uses it with plausible parameters: GetPubKey (selector 3),
                // Sign of a digest (4), Quote of a nonce and a PCR selection
                // (8); else any ordinal with a random body.
                let (selector, params) = match (key_loaded, rng.below(5)) {
                    (true, 0) => (3, Vec::new()),
                    (true, 1) => {
                        let mut p = 20u32.to_be_bytes().to_vec();
                        p.extend_from_slice(&rng.bytes(20));
                        (4, p)
                    }
                    (true, 2) => {
                        let mut p = rng.bytes(20);
                        p.extend_from_slice(&[0, 3, rng.byte(), rng.byte(), rng.byte()]);
                        (8, p)
                    }
                    _ => {
                        let n = rng.below(120);
                        (rng.byte(), rng.bytes(n))
                    }
                };
                // Mostly the loaded key (slot 1) with its secret, else anything.
                let secret_and_key = if key_loaded && rng.below(4) > 0 {
                    2 | 1 << 2
                } else {
                    (rng.below(3) + (rng.below(3) << 2)) as u8
                };
                v.extend_from_slice(&[1, selector, secret_and_key]);
                v.extend_from_slice(&(params.len() as u16).to_be_bytes());
                v.extend_from_slice(&params);
            }
            3 => v.extend_from_slice(&[2, rng.byte()]),
            4 => {
                // The prepared key or sealed blob, intact half of the time.
                let n = if rng.below(2) == 0 { 0 } else { rng.below(24) };
                v.extend_from_slice(&[0x83, rng.byte(), rng.byte(), n as u8]);
                v.extend_from_slice(&rng.bytes(n));
            }
            _ => {
                v.extend_from_slice(&[3, rng.byte(), rng.below(26) as u8]);
                v.extend_from_slice(&rng.bytes(20));
            }
        }
    }
    v
}

/// A target's regression seeds (`fuzz/seeds/<target>/`: the hand-made ones
/// and the minimised corpora of the long campaigns), in name order.
fn seeds_of(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/fuzz/seeds/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<_> = std::fs::read_dir(&dir).expect(&dir).map(|e| e.unwrap().path()).collect();
    names.sort();
    let seeds: Vec<_> = names.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(seeds.len() >= 10, "the seeds in {dir} are missing");
    seeds
}

/// Runs one input, naming it if the harness panics.
fn run_named(what: &str, input: &[u8], f: fn(&[u8])) {
    let r = std::panic::catch_unwind(|| f(input));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what}: {msg}\ninput ({} bytes): {}", input.len(), hex(input));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn execute_harness_on_seeds_and_mutations() {
    execute_on_seeds_and_mutations("execute", run_execute, 0x5EED_0001, 1500);
}

/// The `execute_keys` interpreter on its own seeds (which reach private
/// keys) and `execute`'s: fewer inputs, as those that reach a private key
/// cost milliseconds each.
#[test]
fn execute_keys_harness_on_seeds_and_mutations() {
    execute_on_seeds_and_mutations("execute_keys", run_execute_keys, 0x5EED_0011, 400);
}

fn execute_on_seeds_and_mutations(target: &str, run: fn(&[u8]), seed: u64, inputs: usize) {
    let start = Instant::now();
    let mut seeds = seeds_of(target);
    if target != "execute" {
        seeds.extend(seeds_of("execute"));
    }
    for (i, s) in seeds.iter().enumerate() {
        run_named(&format!("{target} seed {i}"), s, run);
    }
    let mut rng = Rng::new(seed);
    let mut corpus = seeds.clone();
    let n = inputs * scale();
    for i in 0..n {
        let input = if i % 4 == 3 {
            random_records(&mut rng)
        } else {
            let base = rng.pick(&corpus).clone();
            mutate(&mut rng, &base, &corpus, 4096)
        };
        run_named(&format!("{target} input {i}"), &input, run);
        // Keep a bounded pool of what was tried, to mutate further.
        if corpus.len() < 200 {
            corpus.push(input);
        } else {
            let at = rng.below(corpus.len());
            corpus[at] = input;
        }
    }
    eprintln!("{target}: {} seeds and {n} inputs in {:.1?}", seeds.len(), start.elapsed());
}

#[test]
fn raw_commands_in_every_power_state() {
    let start = Instant::now();
    let mut rng = Rng::new(0x5EED_0002);
    // Chips without an EK (no key generation): after TPM_Init, started,
    // in failure mode (Startup(ST_STATE) without a saved state), and in
    // the post-init failure mode (HASH_START before Startup).
    let fresh = || Tpm::manufacture_without_ek(FuzzPlatform(7));
    let mut post_init = fresh();
    let mut started = fresh();
    exec(&mut started, 0, &cmd(0xC1, 0x99, &[0, 1]));
    let mut failed = fresh();
    exec(&mut failed, 0, &cmd(0xC1, 0x99, &[0, 2]));
    let mut post_init_failed = fresh();
    assert!(post_init_failed.hash_start().is_err());
    let mut owned = fixture().tpm;
    let n = 10_000 * scale();
    for i in 0..n {
        let c = random_command(&mut rng);
        let locality = rng.below(6) as u8;
        let chip = match i % 8 {
            0 => &mut post_init,
            1 => &mut failed,
            2 => &mut post_init_failed,
            3 => &mut owned,
            _ => &mut started,
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = chip.execute(locality, &c);
            check_exchange(&c, &r);
        }));
        if r.is_err() {
            panic!("raw command {i} from locality {locality}: {}", hex(&c));
        }
        // Every so often a power cycle, to leave states that commands set up.
        if i % 97 == 96 {
            started.power_on();
            exec(&mut started, 0, &cmd(0xC1, 0x99, &[0, 1]));
        }
    }
    eprintln!("raw commands: {n} in {:.1?}", start.elapsed());
}

#[test]
fn state_loaders_refuse_rather_than_panic() {
    let start = Instant::now();
    let mut rng = Rng::new(0x5EED_0003);
    // Real blobs: an owned chip's permanent state (EK, SRK, an NV index),
    // its SaveState blob with a key loaded, and a new chip's permanent
    // state (its EK deferred: version 2). Saved states are version 2 (they
    // carry the dictionary-attack state).
    let fx = fixture();
    let mut t = fx.tpm;
    // NV_DefineSpace without authorisation (nvLocked is clear): an
    // owner-read/write index of 8 bytes at 0x00011000.
    let mut nv = vec![0, 0x18];
    nv.extend_from_slice(&0x0001_1000u32.to_be_bytes());
    for _ in 0..2 {
        nv.extend_from_slice(&[0, 3, 0, 0, 0, 0x1F]);
        nv.extend_from_slice(&[0; 20]);
    }
    nv.extend_from_slice(&[0, 0x17, 0, 2, 0, 2, 0, 0, 0]);
    nv.extend_from_slice(&8u32.to_be_bytes());
    nv.extend_from_slice(&[0; 20]);
    let r = exec(&mut t, 0, &cmd(0xC1, 0xCC, &nv));
    assert_eq!(&r[6..10], &[0; 4], "NV_DefineSpace");
    let load = common::authorise(&mut t, 0x41, &0x4000_0000u32.to_be_bytes(), &fx.key_blob, &common::SRK_AUTH);
    exec(&mut t, 0, &load);
    exec(&mut t, 0, &cmd(0xC1, 0x98, &[]));
    let permanent = t.permanent_state();
    let saved = t.saved_state().expect("SaveState produced a blob");
    let fresh = Tpm::manufacture(FuzzPlatform(3)).permanent_state();
    let strip = |b: &[u8]| b[16..b.len() - 20].to_vec();
    let blobs = [(b"CTVMTPMP", 1, &permanent), (b"CTVMTPMS", 2, &saved), (b"CTVMTPMP", 2, &fresh)];
    let bodies: Vec<_> = blobs.iter().map(|(magic, version, b)| (*magic, *version, strip(b))).collect();
    let corpus: Vec<Vec<u8>> = bodies.iter().map(|(_, _, b)| b.clone()).collect();
    for ((_, version, body), (magic, _, blob)) in bodies.iter().zip(&blobs) {
        assert_eq!(&envelope(magic, *version, body), *blob, "the envelope rebuilds a real blob");
    }

    let n = 1500 * scale();
    for i in 0..n {
        let which = rng.below(bodies.len());
        let (magic, version, body) = &bodies[which];
        let mutated = mutate(&mut rng, body, &corpus, 1 << 16);
        let whole = match i % 3 {
            // A valid envelope around a mutated body: the body parsers run.
            0 | 1 => envelope(magic, *version, &mutated),
            // The whole blob mutated: the envelope checks must refuse it.
            _ => mutate(&mut rng, blobs[which].2, &corpus, 1 << 16),
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if *magic == b"CTVMTPMP" {
                if let Ok(back) = Tpm::from_permanent(&whole, FuzzPlatform(1)) {
                    let blob = back.permanent_state();
                    let again = Tpm::from_permanent(&blob, FuzzPlatform(1)).expect("own blob restores");
                    assert_eq!(again.permanent_state(), blob, "a loaded state re-serialises exactly");
                }
            } else {
                let mut chip = fixture().tpm;
                let accepted = chip.set_saved_state(&whole).is_ok();
                chip.power_on();
                let r = exec(&mut chip, 0, &cmd(0xC1, 0x99, &[0, 2]));
                if !accepted {
                    assert_eq!(&r[6..10], &[0, 0, 0, 0x1C], "Startup(ST_STATE) without a saved state");
                }
                exec(&mut chip, 0, &cmd(0xC1, 0x15, &[0, 0, 0, 10]));
            }
        }));
        if r.is_err() {
            panic!("state input {i}: {}", hex(&whole));
        }
        // The cargo-fuzz target's own interpreter, on the same bytes.
        let mut input = vec![rng.byte()];
        input.extend_from_slice(&mutated);
        run_named(&format!("state input {i}"), &input, run_state);
    }
    eprintln!("state loaders: {n} blobs in {:.1?}", start.elapsed());
}

/// The `state` target's regression seeds (its campaign's corpus), through
/// the cargo-fuzz interpreter.
#[test]
fn state_seeds() {
    let start = Instant::now();
    let seeds = seeds_of("state");
    for (i, s) in seeds.iter().enumerate() {
        run_named(&format!("state seed {i}"), s, run_state);
    }
    eprintln!("state: {} seeds in {:.1?}", seeds.len(), start.elapsed());
}
