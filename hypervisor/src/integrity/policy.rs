//! The trusted-module policy: which modules may run in the kernel's own view,
//! pinned by the SHA-256 of their code rather than by a name any module can
//! claim.
//!
//! The digest covers the module's core text then its init text, laid out as
//! the kernel lays them out, with the bytes its loader rewrites zeroed:
//! relocated fields and the sites of alternatives, paravirt, retpolines,
//! return thunks, jump labels, static calls, ftrace and SMP lock prefixes.
//! Those masks come from the `.ko` file, with the digest, in the policy the
//! hypervisor is given at boot (`cargo xtask` writes it); the guest only
//! supplies the bytes being judged. What a mask hides is where the loader
//! points a relocation or which patch it applies, not the code around it.
//!
//! Format, one module per line (`#` starts a comment):
//! `module NAME text=BYTES init=BYTES sha256=HEX mask=OFF+LEN,OFF+LEN,...`
//! with offsets into text followed by init.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sha2::{Digest, Sha256};

use crate::boot_info::hex32;

/// Bounds on what a policy may describe; a module's text is far smaller.
const MAX_TEXT: u64 = 64 << 20;
const MAX_MASKS: usize = 1 << 20;

/// One trusted module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub text_len: u64,
    pub init_len: u64,
    pub sha256: [u8; 32],
    /// Byte ranges (offset, length) into text || init that are zeroed.
    pub masks: Vec<(u64, u64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub line: usize,
    pub what: &'static str,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy line {}: {}", self.line, self.what)
    }
}

/// Why a module's code does not match its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The module's text or init text has another size than the policy's.
    Size { text_len: u64, init_len: u64 },
    /// Same sizes, other code.
    Digest([u8; 32]),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Size { text_len, init_len } => write!(f, "text {text_len} + init {init_len} bytes"),
            Mismatch::Digest(d) => {
                f.write_str("sha256 ")?;
                d.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl Policy {
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |what| PolicyError { line: i + 1, what };
            let entry = parse_entry(line).map_err(err)?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(err("a module named twice"));
            }
            entries.push(entry);
        }
        Ok(Policy { entries })
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

fn parse_entry(line: &str) -> Result<Entry, &'static str> {
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some("module") {
        return Err("expected `module NAME ...`");
    }
    let name = words.next().ok_or("no module name")?;
    if name.len() > 55 || name.contains('=') {
        return Err("bad module name");
    }
    let (mut text_len, mut init_len, mut sha256, mut masks) = (None, None, None, None);
    for w in words {
        match w.split_once('=') {
            Some(("text", v)) => text_len = Some(v.parse::<u64>().map_err(|_| "bad text=")?),
            Some(("init", v)) => init_len = Some(v.parse::<u64>().map_err(|_| "bad init=")?),
            Some(("sha256", v)) => sha256 = Some(hex32(v.as_bytes()).ok_or("sha256= needs 64 hex digits")?),
            Some(("mask", v)) => masks = Some(parse_masks(v)?),
            _ => return Err("unknown field"),
        }
    }
    let (text_len, init_len) = (text_len.ok_or("no text=")?, init_len.ok_or("no init=")?);
    if text_len.saturating_add(init_len) > MAX_TEXT {
        return Err("text too large");
    }
    let masks = masks.ok_or("no mask=")?;
    if masks.iter().any(|&(off, len)| off.saturating_add(len) > text_len + init_len) {
        return Err("a mask reaches past the text");
    }
    Ok(Entry { name: name.into(), text_len, init_len, sha256: sha256.ok_or("no sha256=")?, masks })
}

fn parse_masks(v: &str) -> Result<Vec<(u64, u64)>, &'static str> {
    let mut out = Vec::new();
    for m in v.split(',').filter(|m| !m.is_empty()) {
        let (off, len) = m.split_once('+').ok_or("a mask is OFF+LEN")?;
        out.push((off.parse().map_err(|_| "bad mask offset")?, len.parse().map_err(|_| "bad mask length")?));
        if out.len() > MAX_MASKS {
            return Err("too many masks");
        }
    }
    Ok(out)
}

impl Entry {
    /// The lengths of the module's code ranges, as the agent reports them:
    /// text, then init text unless the module has none.
    pub fn range_lengths(&self) -> Vec<u64> {
        [self.text_len, self.init_len].into_iter().filter(|&l| l != 0).collect()
    }

    /// Checks a module's code, as read from the guest, against this entry:
    /// `lengths` are its code ranges' and `code` their bytes end to end,
    /// whose masked bytes this zeroes.
    pub fn check(&self, lengths: &[u64], code: &mut [u8]) -> Result<(), Mismatch> {
        if lengths != self.range_lengths().as_slice() || code.len() as u64 != self.text_len + self.init_len {
            let text_len = lengths.first().copied().unwrap_or(0);
            let init_len = lengths.iter().skip(1).sum();
            return Err(Mismatch::Size { text_len, init_len });
        }
        for &(off, len) in &self.masks {
            code[off as usize..(off + len) as usize].fill(0);
        }
        let digest: [u8; 32] = Sha256::digest(&*code).into();
        if digest == self.sha256 {
            Ok(())
        } else {
            Err(Mismatch::Digest(digest))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(text: &[u8], init: &[u8], masks: &str) -> String {
        let mut code = [text, init].concat();
        for (off, len) in parse_masks(masks).unwrap() {
            code[off as usize..(off + len) as usize].fill(0);
        }
        let d: [u8; 32] = Sha256::digest(&code).into();
        let hex: String = d.iter().map(|b| alloc::format!("{b:02x}")).collect();
        alloc::format!("module m text={} init={} sha256={hex} mask={masks}\n", text.len(), init.len())
    }

    #[test]
    fn matching_code_passes_and_rewritten_sites_do_not_count() {
        let text = [0x90u8; 64];
        let init = [0xccu8; 16];
        let policy = Policy::parse(&entry_for(&text, &init, "3+4,62+4")).unwrap();
        let e = policy.get("m").unwrap();
        // The loader relocated the masked bytes, including two in init.
        let mut code = [&text[..], &init[..]].concat();
        code[3..7].copy_from_slice(&[1, 2, 3, 4]);
        code[62] = 7;
        code[65] = 9;
        assert_eq!(e.check(&[64, 16], &mut code.clone()), Ok(()));
        // The same bytes split otherwise between text and init are refused.
        assert_eq!(e.check(&[60, 20], &mut code), Err(Mismatch::Size { text_len: 60, init_len: 20 }));
    }

    #[test]
    fn one_changed_byte_outside_the_masks_fails() {
        let text = [0x90u8; 64];
        let policy = Policy::parse(&entry_for(&text, &[], "3+4")).unwrap();
        let e = policy.get("m").unwrap();
        assert_eq!(e.check(&[64], &mut text.to_vec()), Ok(()));
        let mut t = text.to_vec();
        t[7] = 0xc3;
        assert!(matches!(e.check(&[64], &mut t), Err(Mismatch::Digest(_))));
        let mut longer = [0x90u8; 65];
        assert_eq!(e.check(&[65], &mut longer), Err(Mismatch::Size { text_len: 65, init_len: 0 }));
    }

    #[test]
    fn malformed_policies_are_refused_with_their_line() {
        let good = entry_for(&[0; 8], &[], "");
        for (text, what) in [
            ("modul m text=1 init=0 sha256=00 mask=", "expected `module NAME ...`"),
            ("module m text=8 init=0 mask=", "no sha256="),
            ("module m text=8 init=0 sha256=zz mask=", "sha256= needs 64 hex digits"),
            ("module m text=x init=0", "bad text="),
            ("module m text=99999999999 init=0 mask=", "text too large"),
            ("module m text=18446744073709551615 init=9 mask=", "text too large"),
        ] {
            assert_eq!(Policy::parse(&alloc::format!("# c\n{text}")), Err(PolicyError { line: 2, what }), "{text}");
        }
        let past = good.replace("mask=", "mask=6+3");
        assert_eq!(Policy::parse(&past).unwrap_err().what, "a mask reaches past the text");
        let twice = alloc::format!("{good}{good}");
        assert_eq!(Policy::parse(&twice).unwrap_err().what, "a module named twice");
        assert_eq!(Policy::parse(&good).unwrap().entries.len(), 1);
    }
}
