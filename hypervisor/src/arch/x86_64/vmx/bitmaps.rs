//! The VMX I/O and MSR bitmaps: which port and MSR accesses exit.
//!
//! Pure layouts (SDM Vol. 3C 25.6.4 and 25.6.9), built here and copied into
//! frames by the VMX layer.

use alloc::boxed::Box;

/// `N` bytes of `value` on the heap: the bitmaps are too big for the
/// hypervisor's stack (several live at once while a guest is built).
fn filled<const N: usize>(value: u8) -> Box<[u8; N]> {
    alloc::vec![value; N].into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!("N bytes"))
}

/// Two 4 KiB pages: bitmap A for ports 0–0x7FFF, B for 0x8000–0xFFFF.
#[derive(Clone)]
pub struct IoBitmap(pub Box<[u8; 8192]>);

impl IoBitmap {
    /// Every port exits (guests with emulated devices only).
    pub fn trap_all() -> Self {
        IoBitmap(filled(0xff))
    }

    /// No port exits, until some are trapped (pass-through guests).
    pub fn pass_all() -> Self {
        IoBitmap(filled(0))
    }

    pub fn trap(&mut self, ports: impl IntoIterator<Item = u16>) {
        for p in ports {
            self.0[usize::from(p / 8)] |= 1 << (p % 8);
        }
    }

    pub fn traps(&self, port: u16) -> bool {
        self.0[usize::from(port / 8)] & (1 << (port % 8)) != 0
    }
}

/// One 4 KiB page: read bitmaps for low (0–0x1FFF) and high
/// (0xC0000000–0xC0001FFF) MSRs, then the write bitmaps. MSRs outside both
/// ranges always exit.
#[derive(Clone)]
pub struct MsrBitmap(pub Box<[u8; 4096]>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    Read,
    Write,
}

impl MsrBitmap {
    pub fn trap_all() -> Self {
        MsrBitmap(filled(0xff))
    }

    pub fn pass_all() -> Self {
        MsrBitmap(filled(0))
    }

    /// The bit for an MSR, or `None` when the MSR always exits.
    fn slot(msr: u32, access: MsrAccess) -> Option<(usize, u8)> {
        let (base, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
            _ => return None,
        };
        let base = base + if access == MsrAccess::Write { 2048 } else { 0 };
        Some((base + (index / 8) as usize, 1 << (index % 8)))
    }

    pub fn trap(&mut self, msr: u32, access: MsrAccess) {
        if let Some((byte, bit)) = Self::slot(msr, access) {
            self.0[byte] |= bit;
        }
    }

    pub fn traps(&self, msr: u32, access: MsrAccess) -> bool {
        Self::slot(msr, access).is_none_or(|(byte, bit)| self.0[byte] & bit != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bits_follow_the_sdm_layout() {
        let mut b = IoBitmap::pass_all();
        b.trap([0x3f8, 0x8900, 0xffff]);
        assert_eq!(b.0[0x3f8 / 8], 1);
        assert_eq!(b.0[4096 + (0x8900 - 0x8000) / 8], 1 << (0x8900 % 8));
        assert_eq!(b.0[8191], 0x80);
        assert!(b.traps(0x3f8) && !b.traps(0x3f9) && b.traps(0xffff));
        assert!(IoBitmap::trap_all().traps(0x1234));
    }

    #[test]
    fn msr_bits_follow_the_sdm_layout() {
        let mut b = MsrBitmap::pass_all();
        b.trap(0x3a, MsrAccess::Write);
        b.trap(0xc000_0080, MsrAccess::Read);
        assert_eq!(b.0[2048 + 7], 1 << 2);
        assert_eq!(b.0[1024 + 16], 1);
        assert!(b.traps(0x3a, MsrAccess::Write) && !b.traps(0x3a, MsrAccess::Read));
        assert!(b.traps(0xc000_0080, MsrAccess::Read) && !b.traps(0xc000_0080, MsrAccess::Write));
        // MSRs outside both ranges always exit, whatever the bitmap says.
        assert!(b.traps(0x4000_0000, MsrAccess::Read));
        assert!(b.traps(0xc001_0000, MsrAccess::Write));
    }
}
