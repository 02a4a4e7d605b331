//! A fuzz smoke test that runs with `cargo test` on the stable toolchain.
//!
//! It drives the same harness as the cargo-fuzz targets in `fuzz/` (the
//! module is included from there, not copied): every target's `run` on its
//! regression seeds (`fuzz/seeds/<target>/`, the minimised corpora of the
//! long campaigns plus any input that once failed) and on inputs a seeded
//! xorshift generator derives from them or makes from scratch. A failure
//! names the target and prints the input in hex; saved to a file it
//! reproduces with `cargo +nightly fuzz run <target> <file>`.
//!
//! `CTVM_FUZZ_SCALE=n` runs n times as many generated inputs.

#[allow(dead_code)] // the cargo-fuzz targets use the rest
#[path = "../fuzz/fuzz_targets/harness/mod.rs"]
mod harness;

use std::time::Instant;

/// xorshift64*: small and good enough to pick bytes and mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn scale() -> usize {
    std::env::var("CTVM_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/fuzz/seeds/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A seed with a few bytes flipped, replaced, inserted, removed or cut.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if at < v.len() => v[at] ^= 1 << rng.below(8),
            1 if at < v.len() => v[at] = rng.next() as u8,
            2 => v.insert(at, rng.next() as u8),
            3 if at < v.len() => {
                v.remove(at);
            }
            4 => v.truncate(at.max(1)),
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `run` on the target's seeds, `n` mutations of them and `n` random
/// inputs of up to `max_len` bytes; a panic names the target and the input.
fn smoke(target: &str, run: fn(&[u8]), seed: u64, n: usize, max_len: usize) {
    let start = Instant::now();
    let seeds = seeds(target);
    let mut rng = Rng(seed | 1);
    let mut inputs: Vec<Vec<u8>> = seeds.clone();
    for i in 0..n * scale() {
        if !seeds.is_empty() && i % 2 == 0 {
            let s = &seeds[rng.below(seeds.len())];
            inputs.push(mutate(&mut rng, s));
        } else {
            let len = rng.below(max_len + 1);
            inputs.push((0..len).map(|_| rng.next() as u8).collect());
        }
    }
    for (i, input) in inputs.iter().enumerate() {
        if let Err(e) = std::panic::catch_unwind(|| run(input)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target} input {i}: {msg}\ninput ({} bytes): {}", input.len(), hex(input));
        }
    }
    eprintln!("{target}: {} seeds and {} inputs in {:.1?}", seeds.len(), inputs.len() - seeds.len(), start.elapsed());
}

#[test]
fn tis() {
    smoke("tis", harness::tis::run, 0x715, 600, 600);
}

#[test]
fn mmio() {
    smoke("mmio", harness::mmio::run, 0x3310, 3000, 700);
}

/// Every byte register (AH..BH too) and width through the mmio harness's
/// own reading of the encoding: each case must be emulated, and exactly.
#[test]
fn mmio_registers() {
    let cases = harness::mmio::register_cases();
    for (i, input) in cases.iter().enumerate() {
        let done = std::panic::catch_unwind(|| harness::mmio::check(input))
            .unwrap_or_else(|_| panic!("mmio register case {i}: {:?}", input.insn));
        assert!(done.is_some(), "mmio register case {i} was not emulated: {:?}", input.insn);
    }
}

#[test]
fn agent() {
    smoke("agent", harness::agent::run, 0xa6e7, 4000, 1200);
}

#[test]
fn boot() {
    smoke("boot", harness::boot::run, 0xb007, 4000, 1500);
}

#[test]
fn acpi() {
    smoke("acpi", harness::acpi::run, 0xac91, 1500, 800);
}

#[test]
fn access() {
    smoke("access", harness::access::run, 0xacce55, 3000, 900);
}

#[test]
fn hypercall() {
    smoke("hypercall", harness::hypercall::run, 0x4ca11, 1500, 600);
}

/// The hypercall harness reaches what its properties are about: the agent's
/// boot calls lock the layout with the agent pinned and register "evil"
/// (isolated, its init freed at LIVE); an agent pinned to other code is
/// refused and nothing is locked.
#[test]
fn hypercall_boot_reaches_the_locked_states() {
    let state = harness::hypercall::boot(false).expect("integrity on");
    assert!(state.locked, "{state:?}");
    assert_eq!(state.agent, Some(1), "{state:?}");
    let evil = state.modules.iter().find(|m| m.1.as_deref() == Some("evil")).expect("evil registered");
    assert!(!evil.2, "evil is not trusted");
    let state = harness::hypercall::boot(true).expect("integrity on");
    assert!(!state.locked && state.agent.is_none() && state.modules.is_empty(), "{state:?}");
}

#[test]
fn platform() {
    smoke("platform", harness::platform::run, 0x91a7, 1500, 700);
}

#[test]
fn blob() {
    smoke("blob", harness::blob::run, 0xb10b, 1500, 600);
}

#[test]
fn dmar() {
    smoke("dmar", harness::dmar::run, 0xd3a7, 1500, 700);
}

#[test]
fn txt() {
    smoke("txt", harness::txt::run, 0x7e47, 1500, 700);
}

#[test]
fn ptpm() {
    smoke("ptpm", harness::ptpm::run, 0x9793, 1500, 900);
}

#[test]
fn vtd() {
    smoke("vtd", harness::vtd::run, 0x7d7d, 1500, 900);
}
