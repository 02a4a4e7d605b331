//! What the hypervisor hands a CTVM-native guest (the test guests) at entry:
//! a [`StartInfo`] at the guest-physical address in RDI.

/// "CTVMSTRT" in little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CTVMSTRT");
pub const VERSION: u32 = 1;
pub const NAME_MAX: usize = 32;
pub const CMDLINE_MAX: usize = 256;

/// The start-up record; the layout is fixed (`repr(C)`, no padding holes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    pub magic: u64,
    pub version: u32,
    pub name_len: u32,
    pub name: [u8; NAME_MAX],
    /// Bytes of guest-physical RAM, from address 0.
    pub mem_size: u64,
    pub cmdline_len: u32,
    pub reserved: u32,
    pub cmdline: [u8; CMDLINE_MAX],
}

pub const SIZE: usize = core::mem::size_of::<StartInfo>();

impl StartInfo {
    /// Builds the record; name and command line are truncated to fit.
    pub fn new(name: &str, mem_size: u64, cmdline: &str) -> Self {
        let mut info = StartInfo {
            magic: MAGIC,
            version: VERSION,
            name_len: 0,
            name: [0; NAME_MAX],
            mem_size,
            cmdline_len: 0,
            reserved: 0,
            cmdline: [0; CMDLINE_MAX],
        };
        info.name_len = copy_truncated(&mut info.name, name.as_bytes()) as u32;
        info.cmdline_len = copy_truncated(&mut info.cmdline, cmdline.as_bytes()) as u32;
        info
    }

    /// The bytes the hypervisor writes into guest memory.
    pub fn to_bytes(&self) -> [u8; SIZE] {
        let mut out = [0u8; SIZE];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&self.magic.to_le_bytes());
        put(&self.version.to_le_bytes());
        put(&self.name_len.to_le_bytes());
        put(&self.name);
        put(&self.mem_size.to_le_bytes());
        put(&self.cmdline_len.to_le_bytes());
        put(&self.reserved.to_le_bytes());
        put(&self.cmdline);
        out
    }

    pub fn name(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(NAME_MAX)]
    }

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..(self.cmdline_len as usize).min(CMDLINE_MAX)]
    }
}

fn copy_truncated(dst: &mut [u8], src: &[u8]) -> usize {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_match_the_repr_c_layout() {
        let info = StartInfo::new("alpha", 16 << 20, "test=hello exit=7");
        let bytes = info.to_bytes();
        // SAFETY: StartInfo is repr(C) plain data of exactly SIZE bytes.
        let back: StartInfo = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back.magic, MAGIC);
        assert_eq!(back.name(), b"alpha");
        assert_eq!(back.mem_size, 16 << 20);
        assert_eq!(back.cmdline(), b"test=hello exit=7");
    }

    #[test]
    fn long_strings_are_truncated() {
        let long = "x".repeat(1000);
        let info = StartInfo::new(&long, 0, &long);
        assert_eq!(info.name().len(), NAME_MAX);
        assert_eq!(info.cmdline().len(), CMDLINE_MAX);
    }
}
