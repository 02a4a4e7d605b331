//! PCI configuration space, as far as the hypervisor reads it: the I/O port
//! ranges the machine's devices decode (their I/O BARs). A pass-through
//! guest reaches those ports directly; every other port exits.

use alloc::vec::Vec;

/// Configuration mechanism #1 (ports 0xCF8/0xCFC), or a fake in tests.
pub trait ConfigSpace {
    fn read32(&mut self, bus: u8, device: u8, function: u8, offset: u8) -> u32;
    fn write32(&mut self, bus: u8, device: u8, function: u8, offset: u8, value: u32);
}

/// The address dword of mechanism #1.
pub const fn address(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    0x8000_0000
        | (bus as u32) << 16
        | ((device & 0x1f) as u32) << 11
        | ((function & 7) as u32) << 8
        | (offset & 0xfc) as u32
}

const COMMAND: u8 = 0x04;
const COMMAND_IO_MEMORY: u32 = 0b11;
const HEADER_TYPE: u8 = 0x0c;
const BAR0: u8 = 0x10;
const BAR_IO: u32 = 1;
const BAR_MEMORY_64: u32 = 0b100;

/// Every I/O range a function decodes through its BARs, sized the standard
/// way (all-ones written, read back, restored) with decoding switched off
/// meanwhile. Run before any guest does.
fn function_io_ranges(cfg: &mut dyn ConfigSpace, b: u8, d: u8, f: u8, bars: u8, out: &mut Vec<(u16, u16)>) {
    let command = cfg.read32(b, d, f, COMMAND);
    cfg.write32(b, d, f, COMMAND, command & !COMMAND_IO_MEMORY);
    let mut bar = 0;
    while bar < bars {
        let offset = BAR0 + 4 * bar;
        let value = cfg.read32(b, d, f, offset);
        bar += 1;
        if value & BAR_IO == 0 {
            // A 64-bit memory BAR takes the next slot too.
            if value & 0b110 == BAR_MEMORY_64 {
                bar += 1;
            }
            continue;
        }
        cfg.write32(b, d, f, offset, u32::MAX);
        let mask = cfg.read32(b, d, f, offset);
        cfg.write32(b, d, f, offset, value);
        let base = value & 0xffff_fffc;
        let size = (!(mask & 0xffff_fffc)).wrapping_add(1) & 0xffff;
        // In 64 bits: a base near the top of the 32-bit space must not wrap.
        let last = (u64::from(base) + u64::from(size)).checked_sub(1);
        if let Some(last) = last.filter(|&l| base != 0 && size != 0 && l <= 0xffff) {
            out.push((base as u16, last as u16));
        }
    }
    cfg.write32(b, d, f, COMMAND, command);
}

/// The I/O ranges every PCI function on every bus decodes.
pub fn io_ranges(cfg: &mut dyn ConfigSpace) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for bus in 0..=255u8 {
        for device in 0..32u8 {
            let mut functions = 1;
            let mut function = 0;
            while function < functions {
                let id = cfg.read32(bus, device, function, 0);
                if id & 0xffff == 0xffff {
                    if function == 0 {
                        break;
                    }
                    function += 1;
                    continue;
                }
                let header = (cfg.read32(bus, device, function, HEADER_TYPE) >> 16) as u8;
                if function == 0 && header & 0x80 != 0 {
                    functions = 8;
                }
                let bars = match header & 0x7f {
                    0 => 6,
                    1 => 2,
                    _ => 0,
                };
                function_io_ranges(cfg, bus, device, function, bars, &mut out);
                function += 1;
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// Functions with registers, and BAR masks (the bits a BAR ignores).
    #[derive(Default)]
    struct Fake {
        regs: BTreeMap<(u8, u8, u8, u8), u32>,
        /// (function, BAR offset) -> size mask bits that read back as 0.
        sizes: BTreeMap<(u8, u8, u8, u8), u32>,
        writes: usize,
    }

    impl ConfigSpace for Fake {
        fn read32(&mut self, b: u8, d: u8, f: u8, o: u8) -> u32 {
            self.regs.get(&(b, d, f, o)).copied().unwrap_or(if o == 0 { u32::MAX } else { 0 })
        }
        fn write32(&mut self, b: u8, d: u8, f: u8, o: u8, v: u32) {
            self.writes += 1;
            let value = match self.sizes.get(&(b, d, f, o)) {
                Some(&size) if v == u32::MAX => !(size - 1) | (self.regs[&(b, d, f, o)] & 3),
                _ => v,
            };
            self.regs.insert((b, d, f, o), value);
        }
    }

    #[test]
    fn io_bars_of_every_function_are_found_and_restored() {
        let mut f = Fake::default();
        // Bochs' PIIX: a multi-function device 0:1 whose IDE function has
        // BMDMA at 0xc000 (16 ports), plus a 64-bit memory BAR before an
        // I/O BAR on 0:3.0, and a bridge on bus 1 with an I/O BAR.
        f.regs.insert((0, 1, 0, 0), 0x7000_8086);
        f.regs.insert((0, 1, 0, HEADER_TYPE), 0x0080_0000);
        f.regs.insert((0, 1, 1, 0), 0x7010_8086);
        f.regs.insert((0, 1, 1, 0x20), 0xc001);
        f.sizes.insert((0, 1, 1, 0x20), 16);
        f.regs.insert((0, 3, 0, 0), 0x1234_1af4);
        f.regs.insert((0, 3, 0, 0x10), 0xfe00_0004);
        f.regs.insert((0, 3, 0, 0x14), 0xc0c0_c0c1); // the upper half of the 64-bit BAR, not an I/O BAR
        f.regs.insert((0, 3, 0, 0x18), 0xc041);
        f.sizes.insert((0, 3, 0, 0x18), 32);
        f.regs.insert((1, 0, 0, 0), 0x1111_2222);
        f.regs.insert((1, 0, 0, HEADER_TYPE), 0x0001_0000);
        f.regs.insert((1, 0, 0, 0x10), 0xd001);
        f.sizes.insert((1, 0, 0, 0x10), 8);
        let before = f.regs.clone();
        assert_eq!(io_ranges(&mut f), [(0xc000, 0xc00f), (0xc040, 0xc05f), (0xd000, 0xd007)]);
        f.regs.retain(|k, v| *v != 0 || before.contains_key(k));
        assert_eq!(f.regs, before, "every BAR and command register restored");
        assert!(f.writes > 0);
    }

    /// An I/O BAR whose base is near the top of the 32-bit space (hardware
    /// is not obliged to be sane): its range is not port space, and base
    /// plus size must not overflow (a panic in debug builds, a range that
    /// wraps to port 0 in release). Found by the `platform` fuzz target.
    #[test]
    fn an_io_bar_at_the_top_of_the_address_space_is_not_a_port_range() {
        for base in [0xffff_fffcu32, 0xffff_fff0, 0xfffc] {
            let mut f = Fake::default();
            f.regs.insert((0, 2, 0, 0), 0x1234_1af4);
            f.regs.insert((0, 2, 0, 0x10), base | 1);
            f.sizes.insert((0, 2, 0, 0x10), 16);
            assert_eq!(io_ranges(&mut f), [], "an I/O BAR at {base:#x}");
        }
    }

    #[test]
    fn the_address_dword() {
        assert_eq!(address(0, 1, 1, 0x20), 0x8000_0920);
        assert_eq!(address(0xff, 0x1f, 7, 0xff), 0x80ff_fffc);
    }
}
