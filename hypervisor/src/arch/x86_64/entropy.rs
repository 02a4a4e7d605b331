//! The platform under each guest's vTPM: hardware entropy (RDSEED, else
//! RDRAND) mixed with the time-stamp counter, and the TSC as its clock.

use super::cpu;

/// Entropy and time for a vTPM.
pub struct HardwarePlatform {
    tsc_per_us: u64,
}

impl HardwarePlatform {
    pub fn new() -> Self {
        HardwarePlatform { tsc_per_us: tsc_mhz() }
    }
}

impl Default for HardwarePlatform {
    fn default() -> Self {
        Self::new()
    }
}

/// The TSC frequency in MHz from CPUID (leaf 0x16, else the 0x15 ratio
/// with its crystal); 1000 when the processor does not say.
fn tsc_mhz() -> u64 {
    let max = cpu::cpuid(0, 0).eax;
    if max >= 0x15 {
        let r = cpu::cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return (u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax) / 1_000_000).max(1);
        }
    }
    if max >= 0x16 {
        let base = cpu::cpuid(0x16, 0).eax & 0xffff;
        if base != 0 {
            return u64::from(base);
        }
    }
    1000
}

impl vtpm_core::Platform for HardwarePlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        // Each 20-byte block is SHA-1 over hardware words and TSC readings,
        // so a weak or missing RDRAND still never yields a constant.
        for chunk in buf.chunks_mut(20) {
            let mut input = [0u8; 64];
            for word in input.chunks_mut(16) {
                let hw = cpu::hardware_random().unwrap_or(0);
                word[..8].copy_from_slice(&hw.to_le_bytes());
                word[8..].copy_from_slice(&cpu::rdtsc().to_le_bytes());
            }
            let block = vtpm_core::sha1(&input);
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    fn ticks_us(&mut self) -> u64 {
        cpu::rdtsc() / self.tsc_per_us
    }
}
