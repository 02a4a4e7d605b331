//! The vTPM behind a guest's TIS: a `vtpm-core` TPM 1.2 per guest.
//!
//! Each guest's endorsement key is derived from a platform seed and the
//! guest's name, so the same guest gets the same EK at every boot (its
//! identity), while everything the TPM draws at run time (nonces, keys,
//! GetRandom) comes from the platform's entropy source. Without a seed the
//! EK is fresh at each boot.

use alloc::boxed::Box;
use alloc::vec::Vec;

use vtpm_core::{Platform, Tpm};

use crate::devices::tis::TpmBackend;

/// A deterministic byte stream: SHA-1(seed || name || counter) blocks. It
/// only feeds the manufacture of the EK.
struct Derived {
    seed: [u8; 32],
    name: Vec<u8>,
    counter: u64,
}

impl Platform for Derived {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(20) {
            let mut input = Vec::with_capacity(32 + self.name.len() + 8);
            input.extend_from_slice(&self.seed);
            input.extend_from_slice(&self.name);
            input.extend_from_slice(&self.counter.to_le_bytes());
            self.counter += 1;
            let block = vtpm_core::sha1(&input);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    fn ticks_us(&mut self) -> u64 {
        0
    }
}

/// Builds a guest's TPM: manufactured (EK included) from the seed and the
/// name when there is a seed, then run on `platform`'s entropy.
pub fn guest_tpm<P: Platform>(name: &str, seed: Option<[u8; 32]>, mut platform: impl FnMut() -> P) -> Tpm<P> {
    let mut tpm = match seed {
        Some(seed) => {
            let identity = Derived { seed, name: name.as_bytes().to_vec(), counter: 0 };
            let blob = Tpm::manufacture(identity).permanent_state();
            // A blob made here a moment ago always restores; if it did not,
            // a fresh chip is the safe answer.
            Tpm::from_permanent(&blob, platform()).unwrap_or_else(|_| Tpm::manufacture(platform()))
        }
        None => Tpm::manufacture(platform()),
    };
    tpm.power_on();
    tpm
}

/// The TIS device's view of a vtpm-core TPM.
pub struct Engine<P: Platform>(pub Tpm<P>);

impl<P: Platform> TpmBackend for Engine<P> {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        self.0.execute(locality, command)
    }
}

/// Boxes an engine as a TIS backend.
pub fn backend<P: Platform + 'static>(tpm: Tpm<P>) -> Box<dyn TpmBackend> {
    Box::new(Engine(tpm))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test platform: a counter as "entropy", distinct per instance.
    struct Counter(u8);

    impl Platform for Counter {
        fn fill_random(&mut self, buf: &mut [u8]) {
            for b in buf {
                self.0 = self.0.wrapping_add(17);
                *b = self.0;
            }
        }
        fn ticks_us(&mut self) -> u64 {
            1
        }
    }

    fn read_pubek(tpm: &mut Tpm<Counter>) -> Vec<u8> {
        let mut cmd = alloc::vec![0x00, 0xc1, 0, 0, 0, 30, 0, 0, 0, 0x7c];
        cmd.extend_from_slice(&[7u8; 20]);
        let startup = [0x00, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 1];
        tpm.execute(0, &startup);
        let r = tpm.execute(0, &cmd);
        assert_eq!(&r[6..10], &[0, 0, 0, 0], "ReadPubek succeeds");
        r[10..r.len() - 20].to_vec()
    }

    #[test]
    fn the_ek_follows_the_seed_and_the_name() {
        let seed = Some([9u8; 32]);
        let alpha1 = read_pubek(&mut guest_tpm("alpha", seed, || Counter(1)));
        let alpha2 = read_pubek(&mut guest_tpm("alpha", seed, || Counter(200)));
        let beta = read_pubek(&mut guest_tpm("beta", seed, || Counter(1)));
        let other_seed = read_pubek(&mut guest_tpm("alpha", Some([8u8; 32]), || Counter(1)));
        assert_eq!(alpha1, alpha2, "same guest, same seed: same EK whatever the run-time entropy");
        assert_ne!(alpha1, beta, "another guest: another EK");
        assert_ne!(alpha1, other_seed, "another platform seed: another EK");
    }

    #[test]
    fn without_a_seed_the_ek_comes_from_the_platform() {
        let a = read_pubek(&mut guest_tpm("alpha", None, || Counter(1)));
        let b = read_pubek(&mut guest_tpm("alpha", None, || Counter(99)));
        assert_ne!(a, b);
    }

    #[test]
    fn run_time_randomness_is_not_the_seed_s() {
        let seed = Some([9u8; 32]);
        let get_random = |tpm: &mut Tpm<Counter>| {
            let startup = [0x00, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 1];
            tpm.execute(0, &startup);
            tpm.execute(0, &[0x00, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x46, 0, 0, 0, 16])
        };
        let a = get_random(&mut guest_tpm("alpha", seed, || Counter(1)));
        let b = get_random(&mut guest_tpm("alpha", seed, || Counter(77)));
        assert_eq!(a.len(), 30);
        assert_ne!(a[14..], b[14..], "GetRandom follows the run-time entropy, not the identity seed");
    }
}
