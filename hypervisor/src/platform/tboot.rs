//! What tboot leaves for the kernel it launches.
//!
//! - After a measured launch (TXT), tboot appends `tboot=0xADDR` to the
//!   kernel's command line: the physical address of its shared page, which
//!   names tboot's own memory, its log and its shutdown entry point. The
//!   kernel must keep tboot's memory and call that entry to power off or
//!   reboot: tboot then caps the dynamic PCRs, scrubs secrets from memory
//!   and leaves the measured environment (GETSEC[SEXIT]).
//! - Whether it measured or not, tboot keeps its log at 0x60000 (with
//!   `logging=memory`) and reserves it in the memory map.
//!
//! Both come from memory the kernel did not write: every field is checked
//! before it is used, and an implausible page is refused as a whole.

use alloc::string::String;

use super::Reader;
use crate::mm::frames::Region;

/// `{663C8DFF-E8B3-4b82-AABF-19EA4D057A08}` as it lies in memory.
pub const SHARED_UUID: [u8; 16] =
    [0xff, 0x8d, 0x3c, 0x66, 0xb3, 0xe8, 0x82, 0x4b, 0xbf, 0xaa, 0x19, 0xea, 0x4d, 0x05, 0x7a, 0x08];
/// `{C0192526-6B30-4db4-844C-A3E953B88174}` as it lies in memory.
pub const LOG_UUID: [u8; 16] =
    [0x26, 0x25, 0x19, 0xc0, 0x30, 0x6b, 0xb4, 0x4d, 0x4c, 0x84, 0xa3, 0xe9, 0x53, 0xb8, 0x81, 0x74];

/// Where tboot keeps its memory log, and its size.
pub const LOG_ADDR: u64 = 0x60000;
pub const LOG_SIZE: u64 = 0x8000;

/// The oldest shared-page layout with every field CTVM uses (tboot 1.10.5 writes 6).
const MIN_VERSION: u32 = 5;
const PAGE: usize = 4096;

/// How tboot should end the measured environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Shutdown {
    Reboot = 0,
    S5 = 1,
    Halt = 4,
}

/// The shared page, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shared {
    pub address: u64,
    pub version: u32,
    pub log: u64,
    pub shutdown_entry: u64,
    /// tboot's own memory: code, data, the shutdown path.
    pub tboot: Region,
    /// Processors tboot holds in wait-for-SIPI.
    pub waiting_cpus: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TbootError {
    /// No `tboot=` on the command line, or not a number.
    NotLaunched,
    /// The address is not a page below 4 GiB.
    Address(u64),
    Uuid,
    Version(u32),
    /// tboot's memory is empty, wraps, or does not hold its shutdown entry.
    Layout,
}

impl core::fmt::Display for TbootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotLaunched => write!(f, "no tboot= on the command line"),
            Self::Address(a) => write!(f, "tboot={a:#x} is not a page below 4 GiB"),
            Self::Uuid => write!(f, "the shared page has no tboot UUID"),
            Self::Version(v) => write!(f, "shared page version {v} is too old"),
            Self::Layout => write!(f, "the shared page describes impossible memory"),
        }
    }
}

/// The shared page's address from CTVM's command line (`tboot=0x...`).
pub fn shared_page_address(cmdline: &str) -> Result<u64, TbootError> {
    let value = crate::boot_info::options(cmdline).find(|(k, _)| *k == "tboot").ok_or(TbootError::NotLaunched)?.1;
    let hex = value.strip_prefix("0x").ok_or(TbootError::NotLaunched)?;
    let address = u64::from_str_radix(hex, 16).map_err(|_| TbootError::NotLaunched)?;
    if address % PAGE as u64 != 0 || address == 0 || address >= 4 << 30 {
        return Err(TbootError::Address(address));
    }
    Ok(address)
}

/// Parses the 4 KiB shared page found at `address`.
pub fn parse_shared(address: u64, page: &[u8; PAGE]) -> Result<Shared, TbootError> {
    if page[..16] != SHARED_UUID {
        return Err(TbootError::Uuid);
    }
    let r = Reader(page);
    // Every offset is inside the 4 KiB page: the reads cannot fail.
    let le32 = |at| r.u32(at).unwrap_or(0);
    let version = le32(16);
    if version < MIN_VERSION {
        return Err(TbootError::Version(version));
    }
    let (base, size) = (u64::from(le32(104)), u64::from(le32(108)));
    let tboot = Region::new(base, base + size);
    let shutdown_entry = u64::from(le32(24));
    if size == 0 || tboot.end > 4 << 30 || !tboot.contains(shutdown_entry) || !tboot.contains(address) {
        return Err(TbootError::Layout);
    }
    Ok(Shared { address, version, log: u64::from(le32(20)), shutdown_entry, tboot, waiting_cpus: le32(564) })
}

/// tboot's memory log: how much of it is used and the version it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    pub used: usize,
    /// From the banner line (`TBOOT:    2022-03-04 12:00 +0100 1.10.5`).
    pub version: Option<String>,
}

/// Parses the log area (uuid, u16 max size, u16 position, the compression
/// bookkeeping of tboot 1.9 on, then text). `None` without tboot's UUID.
pub fn parse_log(area: &[u8]) -> Option<Log> {
    if area.get(..16)? != LOG_UUID {
        return None;
    }
    const TEXT: usize = 61;
    let max = usize::from(u16::from_le_bytes([*area.get(16)?, *area.get(17)?]));
    let used = usize::from(u16::from_le_bytes([*area.get(18)?, *area.get(19)?])).min(max);
    let text = area.get(TEXT..TEXT + used.min(area.len().saturating_sub(TEXT)))?;
    let text = core::str::from_utf8(text).unwrap_or("");
    let version = text
        .lines()
        .filter_map(|l| l.strip_prefix("TBOOT:"))
        .find(|l| l.contains(" +0") || l.contains(" -0"))
        .and_then(|l| l.split_whitespace().last())
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(String::from);
    Some(Log { used, version })
}

#[cfg(test)]
pub mod build {
    //! Shared pages for tests, laid out as tboot 1.10.5 writes them.
    use super::*;

    pub fn shared(address: u64, tboot: (u32, u32), entry: u32) -> [u8; PAGE] {
        let mut p = [0u8; PAGE];
        p[..16].copy_from_slice(&SHARED_UUID);
        p[16..20].copy_from_slice(&6u32.to_le_bytes());
        p[20..24].copy_from_slice(&(LOG_ADDR as u32).to_le_bytes());
        p[24..28].copy_from_slice(&entry.to_le_bytes());
        p[104..108].copy_from_slice(&tboot.0.to_le_bytes());
        p[108..112].copy_from_slice(&tboot.1.to_le_bytes());
        p[564..568].copy_from_slice(&3u32.to_le_bytes());
        let _ = address;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::build::shared;
    use super::*;

    #[test]
    fn the_address_comes_from_the_command_line() {
        assert_eq!(shared_page_address("log=debug tboot=0x829000"), Ok(0x82_9000));
        assert_eq!(shared_page_address("log=debug"), Err(TbootError::NotLaunched));
        assert_eq!(shared_page_address("tboot=829000"), Err(TbootError::NotLaunched));
        assert_eq!(shared_page_address("tboot=0xzz"), Err(TbootError::NotLaunched));
        assert_eq!(shared_page_address("tboot=0x829010"), Err(TbootError::Address(0x82_9010)));
        assert_eq!(shared_page_address("tboot=0x100000000"), Err(TbootError::Address(1 << 32)));
        assert_eq!(shared_page_address("tboot=0x0"), Err(TbootError::Address(0)));
    }

    #[test]
    fn the_shared_page_as_tboot_writes_it() {
        let page = shared(0x82_9000, (0x80_0000, 0x228_ad54), 0x80_4100);
        let s = parse_shared(0x82_9000, &page).unwrap();
        assert_eq!(s.tboot, Region::new(0x80_0000, 0x2a8_ad54));
        assert_eq!((s.version, s.log, s.shutdown_entry, s.waiting_cpus), (6, LOG_ADDR, 0x80_4100, 3));
    }

    /// A page that is not tboot's, or that would have CTVM jump outside
    /// tboot's memory at shutdown, is refused.
    #[test]
    fn hostile_shared_pages_are_refused() {
        let mut page = shared(0x82_9000, (0x80_0000, 0x228_ad54), 0x80_4100);
        page[0] ^= 1;
        assert_eq!(parse_shared(0x82_9000, &page), Err(TbootError::Uuid));
        let mut page = shared(0x82_9000, (0x80_0000, 0x228_ad54), 0x80_4100);
        page[16] = 4;
        assert_eq!(parse_shared(0x82_9000, &page), Err(TbootError::Version(4)));
        for (tboot, entry, at) in [
            ((0x80_0000, 0x1000), 0x90_0000, 0x80_0000),
            ((0x80_0000, 0), 0x80_0000, 0x80_0000),
            ((0xffff_f000, 0x2000), 0xffff_f000, 0xffff_f000),
            ((0x80_0000, 0x228_ad54), 0x80_4100, 0x4000_0000),
        ] {
            let page = shared(at, tboot, entry);
            assert_eq!(parse_shared(at, &page), Err(TbootError::Layout), "{tboot:x?} {entry:#x}");
        }
    }

    #[test]
    fn the_memory_log() {
        let text = "TBOOT: *********************** TBOOT ***********************\nTBOOT:    2022-03-04 12:00 +0100 1.10.5\nTBOOT: *****\n";
        let mut area = alloc::vec![0u8; LOG_SIZE as usize];
        area[..16].copy_from_slice(&LOG_UUID);
        area[16..18].copy_from_slice(&((LOG_SIZE - 61) as u16).to_le_bytes());
        area[18..20].copy_from_slice(&(text.len() as u16).to_le_bytes());
        area[61..61 + text.len()].copy_from_slice(text.as_bytes());
        assert_eq!(parse_log(&area), Some(Log { used: text.len(), version: Some("1.10.5".into()) }));
        // A position beyond the area does not read past it.
        area[18..20].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse_log(&area).is_some());
        area[0] = 0;
        assert_eq!(parse_log(&area), None);
        assert_eq!(parse_log(&[]), None);
    }
}
