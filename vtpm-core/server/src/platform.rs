//! The host's side of `vtpm_core::Platform`: OS entropy and a monotonic clock.

use std::time::Instant;

/// Entropy from the kernel (getrandom(2)) and time from `Instant`, which is
/// monotonic, so GetTicks never runs backwards when the wall clock is set.
#[derive(Debug)]
pub struct OsPlatform {
    start: Instant,
}

impl OsPlatform {
    pub fn new() -> Self {
        OsPlatform { start: Instant::now() }
    }

    /// Fills `buf` from the OS. A TPM without entropy must not run, so a
    /// failing getrandom(2) is fatal rather than silently weak.
    pub fn fill(buf: &mut [u8]) {
        getrandom::fill(buf).expect("getrandom(2) failed: no entropy for the TPM");
    }

    /// Microseconds since this platform was created.
    pub fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

impl Default for OsPlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl vtpm_core::Platform for OsPlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        OsPlatform::fill(buf)
    }
    fn ticks_us(&mut self) -> u64 {
        self.micros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_not_constant() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        OsPlatform::fill(&mut a);
        OsPlatform::fill(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn clock_does_not_go_backwards() {
        let p = OsPlatform::new();
        let t0 = p.micros();
        let t1 = p.micros();
        assert!(t1 >= t0);
    }
}
