//! The trusted-module policy: which modules may run in the kernel's own view,
//! pinned by the SHA-256 of their code and read-only data rather than by a
//! name any module can claim, and by where each of their relocations points.
//!
//! The digest covers the module's core text, its init text, its read-only
//! data, then its read-only-after-init data as loaded (before its init can
//! write it), laid out as the kernel lays them out. Two kinds of bytes
//! are the loader's to write, and are zeroed before hashing:
//!
//! * Relocated fields. Each is pinned on its own: the policy says, from the
//!   `.ko`, what the relocation resolves to (an exported kernel symbol by
//!   name, or a place in one of the module's own regions, plus an addend),
//!   and the hypervisor recomputes the value from the kernel's export table
//!   and the module's reported region bases, and compares. A look-alike
//!   whose bytes match but whose calls or ops tables point elsewhere fails.
//!   A relocation type the hypervisor cannot compute fails too.
//! * Masks: the sites the loader patches (alternatives, paravirt,
//!   retpolines, return thunks, jump labels, static calls, ftrace, SMP lock
//!   prefixes) and the tables it sorts in place (`__mcount_loc`, ORC,
//!   `__ex_table`, `__jump_table`). What a mask hides is which patch the loader applies or
//!   how it ordered a table, not the code around it. A relocated field
//!   inside an ftrace or return-thunk site is pinned all the same, with the
//!   loader's own rewrites of that site as the only other outcomes (a
//!   5-byte NOP; a `ret` and `int3`s, or a jump to a return thunk): ftrace
//!   and the return patching leave a site they do not recognise as it was.
//!   Other patch sites' fields stay masked (see the README).
//!
//! Masks and pins come from the `.ko` file, with the digest, in the policy
//! the hypervisor is given at boot (`cargo xtask` writes it); the guest only
//! supplies the bytes being judged and where the kernel placed the regions.
//!
//! Format, one module per line (`#` starts a comment):
//! `module NAME text=BYTES init=BYTES rodata=BYTES roinit=BYTES sha256=HEX
//! mask=OFF+LEN,... rel=OFF:TYPE:TARGET:ADDEND[:SITE],...` with offsets into
//! text, init, rodata and roinit end to end; TYPE is the ELF x86-64 relocation number; TARGET a
//! symbol name or one of the module's regions (`@text`, `@init`, `@rodata`,
//! `@roinit`, `@data`, `@initdata`), with the place in it in the addend;
//! SITE `ftrace` or `return` for a field inside such a patch site.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sha2::{Digest, Sha256};

use super::layout::Range;
use crate::boot_info::hex32;

/// Bounds on what a policy may describe; a module is far smaller.
const MAX_TEXT: u64 = 64 << 20;
const MAX_MASKS: usize = 1 << 20;
/// Longest symbol name pinned (the hypervisor reads at most 63 bytes of an
/// exported name).
pub const MAX_SYMBOL: usize = 63;

/// One of a module's regions, as Linux 6.4+ names them (`mod->mem[]`);
/// 6.1 lays out the same regions inside two allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    Text,
    Init,
    Rodata,
    RoAfterInit,
    Data,
    InitData,
}

const REGIONS: [(Region, &str); 6] = [
    (Region::Text, "@text"),
    (Region::Init, "@init"),
    (Region::Rodata, "@rodata"),
    (Region::RoAfterInit, "@roinit"),
    (Region::Data, "@data"),
    (Region::InitData, "@initdata"),
];

/// Where a module's regions are, as its registration reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sections {
    pub text: Range,
    pub init: Range,
    pub rodata: Range,
    pub ro_after_init: Range,
    pub data: Range,
    pub init_data: Range,
}

impl Sections {
    fn region(&self, r: Region) -> Range {
        match r {
            Region::Text => self.text,
            Region::Init => self.init,
            Region::Rodata => self.rodata,
            Region::RoAfterInit => self.ro_after_init,
            Region::Data => self.data,
            Region::InitData => self.init_data,
        }
    }
}

/// What a relocation resolves against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An exported kernel symbol.
    Symbol(String),
    /// The start of one of the module's own regions.
    Region(Region),
}

/// A patch site a relocated field lies in: the loader may have rewritten
/// the whole instruction (opcode at the field's offset minus one, 5 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// `call __fentry__`, made a NOP by ftrace.
    Ftrace,
    /// `jmp __x86_return_thunk`, made a `ret` or a jump to the kernel's
    /// return thunk.
    Return,
}

/// One relocated field and what the loader must have written there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloc {
    /// Into text || init || rodata || roinit.
    pub offset: u64,
    /// ELF x86-64 relocation type.
    pub kind: u32,
    pub target: Target,
    pub addend: i64,
    pub site: Option<Site>,
}

/// What the kernel knows that a module's check needs: its exports by name
/// and its return thunks.
pub struct Kernel<'a> {
    pub symbol: &'a dyn Fn(&str) -> Option<u64>,
    pub is_return_thunk: &'a dyn Fn(u64) -> bool,
}

/// The x86-64 relocation types Linux's module loader applies
/// (`apply_relocate_add`), with the bytes each writes.
fn field_len(kind: u32) -> Option<u64> {
    match kind {
        R_64 | R_PC64 => Some(8),
        R_PC32 | R_PLT32 | R_32 | R_32S => Some(4),
        _ => None,
    }
}
const R_64: u32 = 1;
const R_PC32: u32 = 2;
const R_PLT32: u32 = 4;
const R_32: u32 = 10;
const R_32S: u32 = 11;
const R_PC64: u32 = 24;

/// One trusted module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub text_len: u64,
    pub init_len: u64,
    pub rodata_len: u64,
    pub roinit_len: u64,
    pub sha256: [u8; 32],
    /// Byte ranges (offset, length) into text || init || rodata || roinit
    /// that are zeroed.
    pub masks: Vec<(u64, u64)>,
    /// The relocated fields, each checked then zeroed.
    pub relocs: Vec<Reloc>,
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

/// Why a relocated field is not what the policy says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelocError {
    /// The symbol is not in the kernel's export table (or twice, at two
    /// addresses), or the region is not reported.
    Unresolved,
    /// A relocation type the hypervisor does not compute.
    Kind(u32),
    /// The field holds another value than the target gives.
    Points { found: u64, expected: u64 },
}

/// Why a module's code does not match its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// A region has another size than the policy's.
    Size { text_len: u64, init_len: u64, rodata_len: u64, roinit_len: u64 },
    /// A relocated field, at `offset` into text || init || rodata, against
    /// `target`.
    Relocation { offset: u64, target: String, why: RelocError },
    /// Same sizes and relocations, other bytes.
    Digest([u8; 32]),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Size { text_len, init_len, rodata_len, roinit_len } => {
                write!(f, "text {text_len} + init {init_len} + rodata {rodata_len} + roinit {roinit_len} bytes")
            }
            Mismatch::Relocation { offset, target, why } => {
                write!(f, "a relocation at {offset:#x} against {target} that ")?;
                match why {
                    RelocError::Unresolved => f.write_str("cannot be resolved"),
                    RelocError::Kind(k) => write!(f, "has unchecked type {k}"),
                    RelocError::Points { found, expected } => {
                        write!(f, "holds {found:#x}, not {expected:#x}")
                    }
                }
            }
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
    let (mut text_len, mut init_len, mut rodata_len, mut roinit_len) = (None, None, None, None);
    let (mut sha256, mut masks, mut relocs) = (None, None, None);
    for w in words {
        match w.split_once('=') {
            Some(("text", v)) => text_len = Some(v.parse::<u64>().map_err(|_| "bad text=")?),
            Some(("init", v)) => init_len = Some(v.parse::<u64>().map_err(|_| "bad init=")?),
            Some(("rodata", v)) => rodata_len = Some(v.parse::<u64>().map_err(|_| "bad rodata=")?),
            Some(("roinit", v)) => roinit_len = Some(v.parse::<u64>().map_err(|_| "bad roinit=")?),
            Some(("sha256", v)) => sha256 = Some(hex32(v.as_bytes()).ok_or("sha256= needs 64 hex digits")?),
            Some(("mask", v)) => masks = Some(parse_masks(v)?),
            Some(("rel", v)) => relocs = Some(parse_relocs(v)?),
            _ => return Err("unknown field"),
        }
    }
    let (text_len, init_len) = (text_len.ok_or("no text=")?, init_len.ok_or("no init=")?);
    let (rodata_len, roinit_len) = (rodata_len.ok_or("no rodata=")?, roinit_len.ok_or("no roinit=")?);
    let total = text_len.saturating_add(init_len).saturating_add(rodata_len).saturating_add(roinit_len);
    if total > MAX_TEXT {
        return Err("text too large");
    }
    let masks = masks.ok_or("no mask=")?;
    if masks.iter().any(|&(off, len)| off.saturating_add(len) > total) {
        return Err("a mask reaches past the text");
    }
    let relocs = relocs.ok_or("no rel=")?;
    // A type without a known width is kept: the module it names is then
    // not trusted (see `Entry::check`), the rest of the policy stands.
    if relocs.iter().any(|r| r.offset.saturating_add(field_len(r.kind).unwrap_or(0)) > total) {
        return Err("a relocation reaches past the text");
    }
    // A site's instruction is a 1-byte opcode and this 4-byte field.
    if relocs.iter().any(|r| r.site.is_some() && (r.offset == 0 || field_len(r.kind) != Some(4))) {
        return Err("a patch site's relocation is no rel32");
    }
    let sha256 = sha256.ok_or("no sha256=")?;
    Ok(Entry { name: name.into(), text_len, init_len, rodata_len, roinit_len, sha256, masks, relocs })
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

fn parse_relocs(v: &str) -> Result<Vec<Reloc>, &'static str> {
    let mut out = Vec::new();
    for r in v.split(',').filter(|r| !r.is_empty()) {
        let mut parts = r.split(':');
        let (Some(off), Some(kind), Some(target), Some(addend), site, None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("a relocation is OFF:TYPE:TARGET:ADDEND[:SITE]");
        };
        let site = match site {
            None => None,
            Some("ftrace") => Some(Site::Ftrace),
            Some("return") => Some(Site::Return),
            Some(_) => return Err("unknown patch site"),
        };
        let target = match REGIONS.iter().find(|(_, n)| *n == target) {
            Some(&(region, _)) => Target::Region(region),
            None if target.starts_with('@') => return Err("unknown region"),
            None if target.is_empty() || target.len() > MAX_SYMBOL => return Err("bad symbol name"),
            None => Target::Symbol(target.into()),
        };
        out.push(Reloc {
            offset: off.parse().map_err(|_| "bad relocation offset")?,
            kind: kind.parse().map_err(|_| "bad relocation type")?,
            target,
            addend: addend.parse().map_err(|_| "bad relocation addend")?,
            site,
        });
        if out.len() > MAX_MASKS {
            return Err("too many relocations");
        }
    }
    Ok(out)
}

impl Entry {
    /// Whether a module's regions have this entry's sizes: only then are
    /// its bytes worth reading.
    pub fn sizes_match(&self, s: &Sections) -> bool {
        let reported = [s.text.len(), s.init.len(), s.rodata.len(), s.ro_after_init.len()];
        reported == [self.text_len, self.init_len, self.rodata_len, self.roinit_len]
    }

    /// The exported symbols this entry's relocations name.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.relocs.iter().filter_map(|r| match &r.target {
            Target::Symbol(s) => Some(s.as_str()),
            Target::Region(_) => None,
        })
    }

    /// Checks a module against this entry: `sections` are its regions as
    /// reported, `code` the bytes of text, init, rodata and roinit end to end (read
    /// from the guest; relocated and masked bytes are zeroed here), and
    /// `kernel` what the relocations resolve against.
    pub fn check(&self, sections: &Sections, code: &mut [u8], kernel: &Kernel<'_>) -> Result<(), Mismatch> {
        let total =
            [self.init_len, self.rodata_len, self.roinit_len].iter().fold(self.text_len, |t, &l| t.saturating_add(l));
        // Parsed entries keep their masks and fields inside; others are
        // refused rather than trusted.
        let inside = |off: u64, len: u64| off.checked_add(len).is_some_and(|end| end <= total);
        let fields_inside = self.relocs.iter().all(|r| {
            let site = u64::from(r.site.is_some());
            r.offset >= site && inside(r.offset - site, field_len(r.kind).unwrap_or(0) + site)
        });
        let masks_inside = self.masks.iter().all(|&(off, len)| inside(off, len));
        if !self.sizes_match(sections) || code.len() as u64 != total || !fields_inside || !masks_inside {
            return Err(Mismatch::Size {
                text_len: sections.text.len(),
                init_len: sections.init.len(),
                rodata_len: sections.rodata.len(),
                roinit_len: sections.ro_after_init.len(),
            });
        }
        for r in &self.relocs {
            self.check_reloc(r, sections, code, kernel)?;
        }
        for r in &self.relocs {
            let len = field_len(r.kind).unwrap_or(0);
            code[r.offset as usize..(r.offset + len) as usize].fill(0);
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

    /// The guest-virtual address of `offset` into text || init || rodata
    /// || roinit (inside them: `check` verified the sizes).
    fn address_of(&self, s: &Sections, offset: u64) -> u64 {
        let mut at = offset;
        for (region, len) in [(s.text, self.text_len), (s.init, self.init_len), (s.rodata, self.rodata_len)] {
            if at < len {
                return region.start.wrapping_add(at);
            }
            at -= len;
        }
        s.ro_after_init.start.wrapping_add(at)
    }

    /// Recomputes one relocated field as `apply_relocate_add` does (S + A,
    /// minus P for PC-relative types) and compares it with what was loaded.
    fn check_reloc(&self, r: &Reloc, s: &Sections, code: &[u8], kernel: &Kernel<'_>) -> Result<(), Mismatch> {
        let fail = |why| {
            let target = match &r.target {
                Target::Symbol(name) => name.clone(),
                Target::Region(region) => {
                    String::from(REGIONS.iter().find(|(g, _)| g == region).map_or("?", |(_, n)| n))
                }
            };
            Mismatch::Relocation { offset: r.offset, target: alloc::format!("{target}{:+}", r.addend), why }
        };
        let Some(len) = field_len(r.kind) else { return Err(fail(RelocError::Kind(r.kind))) };
        let base = match &r.target {
            Target::Symbol(name) => (kernel.symbol)(name),
            Target::Region(region) => Some(s.region(*region)).filter(|g| !g.is_empty()).map(|g| g.start),
        }
        .ok_or_else(|| fail(RelocError::Unresolved))?;
        let value = base.wrapping_add_signed(r.addend);
        let at = r.offset as usize;
        let field = &code[at..at + len as usize];
        let pc = self.address_of(s, r.offset);
        let (found, expected) = match r.kind {
            R_64 => (u64::from_le_bytes(field.try_into().unwrap_or([0; 8])), value),
            R_PC64 => (u64::from_le_bytes(field.try_into().unwrap_or([0; 8])), value.wrapping_sub(pc)),
            _ => {
                let raw = u32::from_le_bytes(field.try_into().unwrap_or([0; 4]));
                match r.kind {
                    // Zero-extended: a value past 4 GiB matches no field.
                    R_32 => (u64::from(raw), value),
                    // Sign-extended: so is any field, so a value out of
                    // 32-bit range matches none.
                    R_32S => (i64::from(raw as i32) as u64, value),
                    _ => (i64::from(raw as i32) as u64, value.wrapping_sub(pc)),
                }
            }
        };
        if found == expected || r.site.is_some_and(|site| patched(site, code, at - 1, pc.wrapping_sub(1), kernel)) {
            return Ok(());
        }
        Err(fail(RelocError::Points { found, expected }))
    }
}

/// Whether the 5-byte instruction at `at` in `code` (at address `pc`) is
/// what the loader writes over a `site`.
fn patched(site: Site, code: &[u8], at: usize, pc: u64, kernel: &Kernel<'_>) -> bool {
    let Some(insn) = code.get(at..at + 5) else { return false };
    match (site, insn) {
        (Site::Ftrace, [0x0f, 0x1f, 0x44, 0x00, 0x00]) => true,
        (Site::Return, [0xc3, rest @ ..]) => rest.iter().all(|&b| b == 0xcc),
        (Site::Return, [0xe9, rel @ ..]) => {
            let rel = i32::from_le_bytes([rel[0], rel[1], rel[2], rel[3]]);
            (kernel.is_return_thunk)(pc.wrapping_add(5).wrapping_add_signed(i64::from(rel)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: u64 = 0xffff_ffff_c000_0000;
    const INIT: u64 = 0xffff_ffff_c010_0000;
    const RODATA: u64 = 0xffff_ffff_c000_1000;
    const DATA: u64 = 0xffff_ffff_c000_3000;
    const PRINTK: u64 = 0xffff_ffff_8123_4560;

    const ROINIT: u64 = 0xffff_ffff_c000_2000;

    fn sections(text: u64, init: u64, rodata: u64) -> Sections {
        Sections {
            text: Range::new(TEXT, TEXT + text),
            init: Range::new(INIT, INIT + init),
            rodata: Range::new(RODATA, RODATA + rodata),
            ro_after_init: Range::new(ROINIT, ROINIT),
            data: Range::new(DATA, DATA + 0x1000),
            init_data: Range::default(),
        }
    }

    const THUNK: u64 = 0xffff_ffff_81e0_1000;

    fn symbol(name: &str) -> Option<u64> {
        match name {
            "printk" => Some(PRINTK),
            "kfree" => Some(0xffff_ffff_8100_0000),
            "__fentry__" => Some(0xffff_ffff_81e0_0000),
            "__x86_return_thunk" => Some(0xffff_ffff_81e0_0800),
            _ => None,
        }
    }

    fn is_thunk(a: u64) -> bool {
        a == THUNK
    }

    const KERNEL: Kernel<'static> = Kernel { symbol: &symbol, is_return_thunk: &is_thunk };

    /// A policy line for `code` (text || init || rodata, as in the file:
    /// relocated fields as the compiler left them).
    fn entry_for(code: &[u8], lens: [usize; 3], masks: &str, rel: &str) -> String {
        let mut code = code.to_vec();
        for (off, len) in parse_masks(masks).unwrap() {
            code[off as usize..(off + len) as usize].fill(0);
        }
        for r in parse_relocs(rel).unwrap() {
            let len = field_len(r.kind).unwrap_or(0);
            code[r.offset as usize..(r.offset + len) as usize].fill(0);
        }
        let d: [u8; 32] = Sha256::digest(&code).into();
        let hex: String = d.iter().map(|b| alloc::format!("{b:02x}")).collect();
        let [t, i, r] = lens;
        alloc::format!("module m text={t} init={i} rodata={r} roinit=0 sha256={hex} mask={masks} rel={rel}\n")
    }

    /// Writes what the loader writes for `rel` into `code` laid out at `s`.
    fn relocate(e: &Entry, s: &Sections, code: &mut [u8], rel: &Reloc, target: u64) {
        let at = rel.offset as usize;
        let pc = e.address_of(s, rel.offset);
        let v = target.wrapping_add_signed(rel.addend);
        match rel.kind {
            R_64 => code[at..at + 8].copy_from_slice(&v.to_le_bytes()),
            R_32 | R_32S => code[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes()),
            _ => code[at..at + 4].copy_from_slice(&(v.wrapping_sub(pc) as u32).to_le_bytes()),
        }
    }

    /// A module: 64 bytes of text calling printk at 0x10 (PLT32) and taking
    /// the address of its rodata (32S at 0x20); 16 of init calling back
    /// into text (PC32 at 0x44); 32 of rodata holding an ops table with a
    /// pointer into text (64 at 0x58) and one to kfree (64 at 0x60).
    const REL: &str = "17:4:printk:-4,33:11:@rodata:8,68:2:@text:12,88:1:@text:48,96:1:kfree:0";

    fn module() -> (Entry, Sections, Vec<u8>) {
        let mut code = [[0x90u8; 64].as_slice(), &[0xcc; 16], &[0x5a; 32]].concat();
        code[0x10] = 0xe8; // call printk
        let policy = Policy::parse(&entry_for(&code, [64, 16, 32], "3+2", REL)).unwrap();
        let e = policy.get("m").unwrap().clone();
        let s = sections(64, 16, 32);
        for r in &e.relocs {
            let target = match &r.target {
                Target::Symbol(n) => symbol(n).unwrap(),
                Target::Region(g) => s.region(*g).start,
            };
            relocate(&e, &s, &mut code, r, target);
        }
        // The loader patched the masked site.
        code[3..5].copy_from_slice(&[0x66, 0x90]);
        (e, s, code)
    }

    #[test]
    fn relocations_that_resolve_as_the_ko_says_pass() {
        let (e, s, code) = module();
        assert_eq!(e.check(&s, &mut code.clone(), &KERNEL), Ok(()));
        assert_eq!(e.symbols().collect::<Vec<_>>(), ["printk", "kfree"]);
    }

    #[test]
    fn a_call_relocated_elsewhere_fails() {
        // The same text, its call pointed at another export.
        let (e, s, mut code) = module();
        let other = 0xffff_ffff_8155_0000u64;
        let pc = TEXT + 17;
        code[17..21].copy_from_slice(&((other - 4).wrapping_sub(pc) as u32).to_le_bytes());
        let got = e.check(&s, &mut code, &KERNEL);
        let Err(Mismatch::Relocation { offset: 17, target, why: RelocError::Points { expected, .. } }) = got else {
            panic!("{got:?}");
        };
        assert_eq!((target.as_str(), expected), ("printk-4", (PRINTK - 4).wrapping_sub(pc)));
    }

    #[test]
    fn an_ops_table_pointing_elsewhere_fails() {
        // A function pointer in rodata moved 16 bytes on in the module's text.
        let (e, s, mut code) = module();
        code[88..96].copy_from_slice(&(TEXT + 64).to_le_bytes());
        let got = e.check(&s, &mut code, &KERNEL);
        assert!(matches!(got, Err(Mismatch::Relocation { offset: 88, why: RelocError::Points { .. }, .. })), "{got:?}");
        // Or at kfree's neighbour.
        let (e, s, mut code) = module();
        code[96..104].copy_from_slice(&0xffff_ffff_8100_0010u64.to_le_bytes());
        assert!(e.check(&s, &mut code, &KERNEL).is_err());
    }

    #[test]
    fn rodata_bytes_are_pinned() {
        let (e, s, mut code) = module();
        code[80] ^= 1; // a string or a constant in rodata
        assert!(matches!(e.check(&s, &mut code, &KERNEL), Err(Mismatch::Digest(_))));
        // And its size.
        let (e, _, code) = module();
        let bigger = sections(64, 16, 0x1000);
        let got = e.check(&bigger, &mut code.clone(), &KERNEL);
        assert_eq!(got, Err(Mismatch::Size { text_len: 64, init_len: 16, rodata_len: 0x1000, roinit_len: 0 }));
    }

    #[test]
    fn values_follow_the_reported_section_bases() {
        // The loader placed rodata elsewhere, and relocated against it:
        // the pins follow the report.
        let (e, _, mut code) = module();
        let mut s = sections(64, 16, 32);
        s.rodata = Range::new(RODATA + 0x5000, RODATA + 0x5020);
        for r in &e.relocs {
            let target = match &r.target {
                Target::Symbol(n) => symbol(n).unwrap(),
                Target::Region(g) => s.region(*g).start,
            };
            relocate(&e, &s, &mut code, r, target);
        }
        assert_eq!(e.check(&s, &mut code.clone(), &KERNEL), Ok(()));
        // A report that moves the text without the code being relocated
        // for it does not pass: PC-relative fields move with the base.
        let mut moved = s;
        moved.text = Range::new(TEXT + 0x1000, TEXT + 0x1040);
        assert!(matches!(e.check(&moved, &mut code, &KERNEL), Err(Mismatch::Relocation { .. })));
    }

    #[test]
    fn unresolvable_and_unknown_relocations_fail_closed() {
        let (e, s, code) = module();
        // printk not exported (or exported twice: the caller says None).
        let no_printk = |n: &str| if n == "printk" { None } else { symbol(n) };
        let got = e.check(&s, &mut code.clone(), &Kernel { symbol: &no_printk, is_return_thunk: &is_thunk });
        assert!(matches!(got, Err(Mismatch::Relocation { offset: 17, why: RelocError::Unresolved, .. })), "{got:?}");
        // A region the registration did not report.
        let mut no_rodata = e.clone();
        no_rodata.relocs[1].target = Target::Region(Region::RoAfterInit);
        let got = no_rodata.check(&s, &mut code.clone(), &KERNEL);
        assert!(matches!(got, Err(Mismatch::Relocation { offset: 33, why: RelocError::Unresolved, .. })), "{got:?}");
        // A type the hypervisor does not compute (GOTPCREL): not trusted,
        // whatever the field holds; the rest of the policy still parses.
        let line = entry_for(&code, [64, 16, 32], "", "17:9:printk:-4");
        let policy = Policy::parse(&line).unwrap();
        let got = policy.entries[0].check(&s, &mut code.clone(), &KERNEL);
        assert!(matches!(got, Err(Mismatch::Relocation { why: RelocError::Kind(9), .. })), "{got:?}");
    }

    #[test]
    fn ftrace_and_return_sites_hold_their_call_or_the_loaders_rewrite() {
        // `call __fentry__` at 0, `jmp __x86_return_thunk` at 8.
        let rel = "1:4:__fentry__:-4:ftrace,9:2:__x86_return_thunk:-4:return";
        let line = entry_for(&[0; 16], [16, 0, 0], "0+5,8+5", rel);
        let e = Policy::parse(&line).unwrap().entries[0].clone();
        let s = sections(16, 0, 0);
        let with = |at: usize, insn: &[u8]| {
            let mut code = alloc::vec![0u8; 16];
            code[0..5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0, 0]);
            code[8..13].copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
            code[at..at + insn.len()].copy_from_slice(insn);
            e.check(&s, &mut code, &KERNEL)
        };
        let call = |opcode: u8, at: u64, to: u64| {
            let mut insn = alloc::vec![opcode];
            insn.extend((to.wrapping_sub(TEXT + at + 5) as u32).to_le_bytes());
            insn
        };
        // The loader's rewrites: a NOP, a ret; or the sites untouched.
        assert_eq!(with(0, &[]), Ok(()));
        assert_eq!(with(0, &call(0xe8, 0, 0xffff_ffff_81e0_0000)), Ok(()));
        assert_eq!(with(8, &call(0xe9, 8, 0xffff_ffff_81e0_0800)), Ok(()));
        // A jump to the return thunk the kernel patches in.
        assert_eq!(with(8, &call(0xe9, 8, THUNK)), Ok(()));
        // A call or jump the loader left because it went elsewhere.
        assert!(with(0, &call(0xe8, 0, PRINTK)).is_err());
        assert!(with(8, &call(0xe9, 8, PRINTK)).is_err());
        // Nor any other bytes.
        assert!(with(0, &[0x66, 0x0f, 0x1f, 0x44, 0]).is_err());
        assert!(with(8, &[0xc3, 0xcc, 0xcc, 0xcc, 0x90]).is_err());
        assert!(with(8, &call(0xe8, 8, THUNK)).is_err());
        // A site field is a rel32 after an opcode.
        let bad = entry_for(&[0; 16], [16, 0, 0], "", "0:4:__fentry__:-4:ftrace");
        assert_eq!(Policy::parse(&bad).unwrap_err().what, "a patch site's relocation is no rel32");
        let bad = entry_for(&[0; 16], [16, 0, 0], "", "1:1:__fentry__:-4:ftrace");
        assert_eq!(Policy::parse(&bad).unwrap_err().what, "a patch site's relocation is no rel32");
    }

    #[test]
    fn ro_after_init_data_is_pinned_as_loaded() {
        // 8 bytes of text, 16 of ro_after_init data: a pointer to the text
        // at 8 (64), then at 16 its own offset from itself (PC64).
        let line = entry_for(&[0x90; 24], [8, 0, 0], "", "8:1:@text:0,16:24:@roinit:8");
        let line = line.replace("text=8 init=0 rodata=0 roinit=0", "text=8 init=0 rodata=0 roinit=16");
        let e = Policy::parse(&line).unwrap().entries[0].clone();
        let mut s = sections(8, 0, 0);
        s.ro_after_init = Range::new(ROINIT, ROINIT + 16);
        let mut code = alloc::vec![0x90u8; 24];
        code[8..16].copy_from_slice(&TEXT.to_le_bytes());
        code[16..24].copy_from_slice(&0u64.to_le_bytes()); // S - P: its own address
        assert_eq!(e.check(&s, &mut code.clone(), &KERNEL), Ok(()));
        // Pointed elsewhere, or with another byte.
        let mut other = code.clone();
        other[8] = 0x10;
        assert!(matches!(e.check(&s, &mut other, &KERNEL), Err(Mismatch::Relocation { offset: 8, .. })));
        let mut other = code.clone();
        other[20] ^= 1;
        assert!(matches!(e.check(&s, &mut other, &KERNEL), Err(Mismatch::Relocation { offset: 16, .. })));
        // Not reported, or of another size.
        s.ro_after_init = Range::default();
        assert!(matches!(e.check(&s, &mut code, &KERNEL), Err(Mismatch::Size { roinit_len: 0, .. })));
    }

    #[test]
    fn out_of_range_values_match_no_field() {
        // R_X86_64_32 of a kernel address cannot have been applied (the
        // loader refuses it); no 4-byte field equals it.
        let line = entry_for(&[0; 8], [8, 0, 0], "", "0:10:printk:0");
        let e = Policy::parse(&line).unwrap().entries[0].clone();
        let s = sections(8, 0, 0);
        let mut code = (PRINTK as u32).to_le_bytes().to_vec();
        code.extend([0; 4]);
        assert!(matches!(e.check(&s, &mut code, &KERNEL), Err(Mismatch::Relocation { .. })));
        // Sign-extended 32S of the same address is fine.
        let line = entry_for(&[0; 8], [8, 0, 0], "", "0:11:printk:0");
        let e = Policy::parse(&line).unwrap().entries[0].clone();
        let mut code = (PRINTK as u32).to_le_bytes().to_vec();
        code.extend([0; 4]);
        assert_eq!(e.check(&s, &mut code, &KERNEL), Ok(()));
    }

    #[test]
    fn one_changed_byte_outside_the_masks_fails() {
        let text = [0x90u8; 64];
        let policy = Policy::parse(&entry_for(&text, [64, 0, 0], "3+4", "")).unwrap();
        let e = policy.get("m").unwrap();
        let s = sections(64, 0, 0);
        let mut code = text.to_vec();
        code[3..7].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(e.check(&s, &mut code.clone(), &KERNEL), Ok(()));
        code[7] = 0xc3;
        assert!(matches!(e.check(&s, &mut code, &KERNEL), Err(Mismatch::Digest(_))));
        // The same bytes split otherwise between text and init are refused.
        let split = sections(60, 4, 0);
        let got = e.check(&split, &mut text.to_vec(), &KERNEL);
        assert_eq!(got, Err(Mismatch::Size { text_len: 60, init_len: 4, rodata_len: 0, roinit_len: 0 }));
    }

    #[test]
    fn malformed_policies_are_refused_with_their_line() {
        let good = entry_for(&[0; 8], [8, 0, 0], "", "");
        for (text, what) in [
            ("modul m text=1 init=0 sha256=00 mask=", "expected `module NAME ...`"),
            ("module m text=8 init=0 rodata=0 roinit=0 mask= rel=", "no sha256="),
            ("module m text=8 init=0 rodata=0 roinit=0 sha256=zz mask=", "sha256= needs 64 hex digits"),
            ("module m text=x init=0", "bad text="),
            ("module m text=99999999999 init=0 rodata=0 roinit=0 mask=", "text too large"),
            ("module m text=1 init=0 rodata=0 roinit=18446744073709551615 mask=", "text too large"),
            ("module m text=8 init=0 mask=", "no rodata="),
            ("module m text=8 init=0 rodata=0 mask=", "no roinit="),
            ("module m text=8 init=0 rodata=0 roinit=0 mask= rel=1:2:@stack:0", "unknown region"),
            (
                "module m text=8 init=0 rodata=0 roinit=0 mask= rel=1:2:x",
                "a relocation is OFF:TYPE:TARGET:ADDEND[:SITE]",
            ),
            ("module m text=8 init=0 rodata=0 roinit=0 mask= rel=1:2:x:0:alt", "unknown patch site"),
            ("module m text=8 init=0 rodata=0 roinit=0 mask= rel=1:2::0", "bad symbol name"),
            ("module m text=8 init=0 rodata=0 roinit=0 mask= rel=1:2:x:y", "bad relocation addend"),
        ] {
            assert_eq!(Policy::parse(&alloc::format!("# c\n{text}")), Err(PolicyError { line: 2, what }), "{text}");
        }
        let past = good.replace("mask=", "mask=6+3");
        assert_eq!(Policy::parse(&past).unwrap_err().what, "a mask reaches past the text");
        let past = good.replace("rel=", "rel=5:4:printk:-4");
        assert_eq!(Policy::parse(&past).unwrap_err().what, "a relocation reaches past the text");
        let old = good.replace(" rel=", "");
        assert_eq!(Policy::parse(&old).unwrap_err().what, "no rel=");
        let twice = alloc::format!("{good}{good}");
        assert_eq!(Policy::parse(&twice).unwrap_err().what, "a module named twice");
        assert_eq!(Policy::parse(&good).unwrap().entries.len(), 1);
    }
}
