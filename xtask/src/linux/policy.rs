//! The trusted-module policy the hypervisor is given (`ctvm.policy`): for
//! each module a guest may trust, the SHA-256 of its code and read-only data
//! as Linux lays them out in memory, with the bytes Linux's loader rewrites
//! masked, and each relocated field pinned to what it resolves to. The
//! format and the check are in `hypervisor/src/integrity/policy.rs`.
//!
//! The layout follows Linux's `layout_sections` (6.1 and 6.4+ alike):
//! allocated sections by kind (text, rodata, ro_after_init, data) in file
//! order, each at its own alignment, `.init*` ones in the init regions, each
//! region rounded up to a page. The digest covers core text, init text,
//! core rodata and ro_after_init data; the masks are every site a patch
//! table names and the tables the loader sorts in place; the pins are every
//! other relocated field there.

use std::fmt::Write as _;
use std::path::Path;

use elf::abi::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHN_UNDEF, SHT_NOBITS, SHT_RELA};
use elf::endian::LittleEndian;
use elf::ElfBytes;
use sha2::{Digest, Sha256};

use crate::util::Fail;

const PAGE: u64 = 4096;

/// One module's entry: its name and the policy line.
pub struct Entry {
    pub name: String,
    pub line: String,
}

/// A module's regions, as the policy names them (`@text`, ...), in the
/// order Linux lays out sections into them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Text,
    Rodata,
    RoAfterInit,
    Data,
    Init,
    InitRodata,
    InitData,
}

impl Region {
    fn name(self) -> Option<&'static str> {
        match self {
            Region::Text => Some("@text"),
            Region::Rodata => Some("@rodata"),
            Region::RoAfterInit => Some("@roinit"),
            Region::Data => Some("@data"),
            Region::Init => Some("@init"),
            Region::InitData => Some("@initdata"),
            // 6.1 lays it out inside the init data the agent reports, 6.4+
            // on its own: no one base serves both.
            Region::InitRodata => None,
        }
    }
}

/// Sections the loader drops from the module's memory (`SHF_ALLOC` cleared).
const NOT_LOADED: [&str; 3] = [".modinfo", "__versions", ".data..percpu"];

/// Tables the loader sorts in place (ftrace, ORC, the exception table, jump
/// labels): hashed as zeros, like a patch site.
const SORTED: [&str; 5] = ["__mcount_loc", ".orc_unwind", ".orc_unwind_ip", "__ex_table", "__jump_table"];

/// Which region an allocated section lands in.
fn region_of(name: &str, flags: u64) -> Option<Region> {
    if flags & u64::from(SHF_ALLOC) == 0 || NOT_LOADED.contains(&name) {
        return None;
    }
    let init = name.starts_with(".init");
    let exec = flags & u64::from(SHF_EXECINSTR) != 0;
    let write = flags & u64::from(SHF_WRITE) != 0;
    // The loader marks these read-only after init.
    let ro_after_init = name == ".data..ro_after_init" || name == "__jump_table";
    Some(match (init, exec, write, ro_after_init) {
        (false, true, ..) => Region::Text,
        (true, true, ..) => Region::Init,
        (false, false, false, _) => Region::Rodata,
        (true, false, false, _) => Region::InitRodata,
        (false, false, true, true) => Region::RoAfterInit,
        (false, false, true, false) => Region::Data,
        (true, false, true, _) => Region::InitData,
    })
}

pub fn entry(ko: &Path) -> Result<Entry, Fail> {
    let bytes = std::fs::read(ko)?;
    let err = |what: String| Fail(format!("{}: {what}", ko.display()));
    let file = ElfBytes::<LittleEndian>::minimal_parse(&bytes).map_err(|e| err(format!("not ELF: {e}")))?;
    let (Some(shdrs), Some(names)) = file.section_headers_with_strtab().map_err(|e| err(e.to_string()))? else {
        return Err(err("no section headers".into()));
    };
    let sections: Vec<_> = shdrs.iter().collect();
    let name_of = |i: usize| names.get(sections[i].sh_name as usize).unwrap_or("");
    let data_of = |i: usize| file.section_data(&sections[i]).map(|(d, _)| d).unwrap_or(&[]);

    let modinfo = (0..sections.len()).find(|&i| name_of(i) == ".modinfo").ok_or_else(|| err("no .modinfo".into()))?;
    let module = data_of(modinfo)
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"name="))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .ok_or_else(|| err("no name= in .modinfo".into()))?;

    // Lay out every allocated section: (region, offset in it, size).
    const ORDER: [Region; 7] = [
        Region::Text,
        Region::Rodata,
        Region::RoAfterInit,
        Region::Data,
        Region::Init,
        Region::InitRodata,
        Region::InitData,
    ];
    let mut placed: Vec<Option<(Region, u64, u64)>> = vec![None; sections.len()];
    let mut region_len = [0u64; ORDER.len()];
    for (k, &region) in ORDER.iter().enumerate() {
        let len = &mut region_len[k];
        for (i, s) in sections.iter().enumerate().skip(1) {
            if region_of(name_of(i), s.sh_flags) != Some(region) {
                continue;
            }
            let at = len.next_multiple_of(s.sh_addralign.max(1));
            placed[i] = Some((region, at, s.sh_size));
            *len = at + s.sh_size;
        }
        *len = len.next_multiple_of(PAGE);
    }
    let len_of = |r: Region| region_len[ORDER.iter().position(|&o| o == r).unwrap_or(0)];
    let (text_len, init_len, rodata_len) = (len_of(Region::Text), len_of(Region::Init), len_of(Region::Rodata));
    let roinit_len = len_of(Region::RoAfterInit);
    // Where a region starts in text || init || rodata || roinit, the bytes hashed.
    let hashed = |r: Region| match r {
        Region::Text => Some(0),
        Region::Init => Some(text_len),
        Region::Rodata => Some(text_len + init_len),
        Region::RoAfterInit => Some(text_len + init_len + rodata_len),
        _ => None,
    };
    // A section's offset in the hashed bytes, and its size.
    let place = |i: usize| -> Option<(u64, u64)> {
        let (region, at, size) = placed.get(i).copied().flatten()?;
        Some((hashed(region)? + at, size))
    };
    let code_place = |i: usize| place(i).filter(|&(at, _)| at < text_len + init_len);
    let total = text_len + init_len + rodata_len + roinit_len;
    let mut code = vec![0u8; total as usize];
    for (i, s) in sections.iter().enumerate() {
        if let Some((at, size)) = place(i).filter(|_| s.sh_type != SHT_NOBITS) {
            code[at as usize..(at + size) as usize].copy_from_slice(data_of(i));
        }
    }

    let (symtab, strtab) =
        file.symbol_table().map_err(|e| err(e.to_string()))?.ok_or_else(|| err("no symbol table".into()))?;
    // A site named by a relocation: the symbol's section and value plus the addend.
    let site = |r: &elf::relocation::Rela| -> Option<u64> {
        let sym = symtab.get(r.r_sym as usize).ok()?;
        let (at, size) = code_place(sym.st_shndx as usize)?;
        let off = (sym.st_value as i64 + r.r_addend) as u64;
        (off < size).then_some(at + off)
    };
    let mut masks: Vec<(u64, u64)> = Vec::new();
    // ftrace and return-thunk sites, by offset: their calls stay pinned.
    let mut pinned_sites = std::collections::BTreeMap::new();
    for (i, _) in sections.iter().enumerate() {
        if let Some((at, size)) = place(i).filter(|_| SORTED.contains(&name_of(i))) {
            masks.push((at, size));
        }
    }
    // The relocated fields in the hashed bytes: (offset, type, symbol, addend).
    let mut fields = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        if s.sh_type != SHT_RELA {
            continue;
        }
        let relas: Vec<_> = file.section_data_as_relas(s).map_err(|e| err(format!("{}: {e}", name_of(i))))?.collect();
        let target = s.sh_info as usize;
        if let Some((at, _)) = place(target) {
            for r in &relas {
                if r.r_type != 0 {
                    field_len(r.r_type).ok_or_else(|| err(format!("relocation type {}", r.r_type)))?;
                    fields.push((at + r.r_offset, r.r_type, r.r_sym, r.r_addend));
                }
            }
        }
        // Patch tables: each relocation at the start of a record names a site.
        let table = name_of(target);
        let contents = data_of(target);
        let Some(mut record) = patch_record_size(table) else { continue };
        if table == ".altinstructions" {
            // 12 bytes a record in 6.1, 14 in 6.12 (wider flags): two
            // relocated fields each, so the third relocation starts record two.
            let mut offsets: Vec<u64> = relas.iter().map(|r| r.r_offset).collect();
            offsets.sort_unstable();
            record = offsets.get(2).copied().unwrap_or(contents.len() as u64).max(10);
        }
        for r in relas.iter().filter(|r| r.r_offset % record == 0) {
            let Some(at) = site(r) else { continue };
            let len = match table {
                // instrlen, then replacementlen, end the record.
                ".altinstructions" => u64::from(*contents.get((r.r_offset + record - 2) as usize).unwrap_or(&0)),
                ".parainstructions" => u64::from(*contents.get(r.r_offset as usize + 9).unwrap_or(&0)),
                ".smp_locks" => 1,
                ".ibt_endbr_seal" => 4,
                "__jump_table" => jump_len(&code[at as usize..]),
                _ => branch_len(&code[at as usize..]).ok_or_else(|| err(format!("{table} site at {at:#x}")))?,
            };
            masks.push((at, len));
            match (table, code.get(at as usize)) {
                ("__mcount_loc", Some(0xe8)) => pinned_sites.insert(at, "ftrace"),
                (".return_sites", Some(0xe9)) => pinned_sites.insert(at, "return"),
                _ => None,
            };
        }
    }
    masks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (off, len) in masks {
        let end = (off + len).min(total);
        match merged.last_mut() {
            Some((o, l)) if off <= *o + *l => *l = (*l).max(end - *o),
            _ if end > off => merged.push((off, end - off)),
            _ => {}
        }
    }
    // Each relocated field outside the masks is pinned to its target: an
    // import by name, or a place in one of the module's regions. One inside
    // a patch site is the loader's to rewrite, and stays masked, except the
    // call of an ftrace or return-thunk site: the hypervisor accepts the
    // loader's rewrite of that site or the call as relocated.
    let masked = |off: u64, len: u64| merged.iter().any(|&(o, l)| off < o + l && o < off + len);
    let mut pins = Vec::new();
    for (off, kind, sym_index, addend) in fields {
        let len = field_len(kind).unwrap_or(0);
        let site =
            off.checked_sub(1).and_then(|at| pinned_sites.get(&at)).filter(|_| len == 4 && (kind == 2 || kind == 4));
        if masked(off, len) && site.is_none() {
            continue;
        }
        let sym = symtab.get(sym_index as usize).map_err(|e| err(e.to_string()))?;
        let (target, addend) = if sym.st_shndx == SHN_UNDEF {
            let name = strtab.get(sym.st_name as usize).map_err(|e| err(e.to_string()))?;
            (name.to_string(), addend)
        } else {
            let shndx = sym.st_shndx as usize;
            let (region, at, _) = placed
                .get(shndx)
                .copied()
                .flatten()
                .ok_or_else(|| err(format!("a relocation at {off:#x} against unloaded section {shndx}")))?;
            let name = region
                .name()
                .ok_or_else(|| err(format!("a relocation at {off:#x} against init rodata ({region:?})")))?;
            // 6.1 reports init data after its init rodata; no base serves both.
            if region == Region::InitData && len_of(Region::InitRodata) != 0 {
                return Err(err(format!("a relocation at {off:#x} against init data, with init rodata")));
            }
            (name.to_string(), at as i64 + sym.st_value as i64 + addend)
        };
        if target.len() > 63 || target.contains([':', ',']) {
            return Err(err(format!("symbol {target:?} cannot be pinned")));
        }
        code[off as usize..(off + len) as usize].fill(0);
        pins.push(match site {
            Some(site) => format!("{off}:{kind}:{target}:{addend}:{site}"),
            None => format!("{off}:{kind}:{target}:{addend}"),
        });
    }
    for &(off, len) in &merged {
        code[off as usize..(off + len) as usize].fill(0);
    }
    let digest = Sha256::digest(&code);
    let mut line =
        format!("module {module} text={text_len} init={init_len} rodata={rodata_len} roinit={roinit_len} sha256=");
    digest.iter().for_each(|b| {
        let _ = write!(line, "{b:02x}");
    });
    line.push_str(" mask=");
    let list: Vec<String> = merged.iter().map(|(o, l)| format!("{o}+{l}")).collect();
    line.push_str(&list.join(","));
    line.push_str(" rel=");
    line.push_str(&pins.join(","));
    Ok(Entry { name: module, line })
}

/// The bytes an x86-64 relocation writes.
fn field_len(kind: u32) -> Option<u64> {
    match kind {
        0 => Some(0),                             // NONE
        1 | 24 => Some(8),                        // 64, PC64
        2 | 4 | 9 | 10 | 11 | 41 | 42 => Some(4), // PC32, PLT32, GOTPCREL, 32, 32S, GOTPCRELX, REX_GOTPCRELX
        _ => None,
    }
}

/// The patch tables of x86-64 Linux that name code sites, with their record
/// size; each record starts with its site's field.
fn patch_record_size(name: &str) -> Option<u64> {
    match name {
        // Linux 6.1's size; measured from the relocations for newer kernels.
        ".altinstructions" => Some(12),
        ".parainstructions" | "__jump_table" => Some(16),
        ".static_call_sites" | "__mcount_loc" => Some(8),
        ".retpoline_sites" | ".return_sites" | ".smp_locks" | ".ibt_endbr_seal" => Some(4),
        _ => None,
    }
}

/// A jump label is a 2-byte or a 5-byte jump or NOP.
fn jump_len(at: &[u8]) -> u64 {
    match at {
        [0xeb, ..] | [0x66, 0x90, ..] => 2,
        _ => 5,
    }
}

/// The length of the call, jump or conditional jump at a retpoline, return
/// thunk, static call or ftrace site.
fn branch_len(at: &[u8]) -> Option<u64> {
    match at {
        [0x2e, 0xe8 | 0xe9, ..] => Some(6),
        [0xe8 | 0xe9, ..] => Some(5),
        [0x0f, 0x80..=0x8f, ..] => Some(6),
        // Already a NOP or a RET in the file: the loader writes 5 bytes.
        [0x0f, 0x1f, 0x44, 0, 0, ..] => Some(5),
        _ => None,
    }
}

/// A look-alike of a module: the same file with one call in its text
/// relocated to another function it imports. Its text bytes are the
/// original's; only where the loader points that call differs.
pub fn retarget_call(ko: &Path, from: &str, to: &str) -> Result<Vec<u8>, Fail> {
    let mut bytes = std::fs::read(ko)?;
    let err = |what: String| Fail(format!("{}: {what}", ko.display()));
    let (at, info) = {
        let file = ElfBytes::<LittleEndian>::minimal_parse(&bytes).map_err(|e| err(format!("not ELF: {e}")))?;
        let (symtab, strtab) =
            file.symbol_table().map_err(|e| err(e.to_string()))?.ok_or_else(|| err("no symbol table".into()))?;
        let index_of = |name: &str| {
            symtab.iter().position(|s| s.st_shndx == 0 && strtab.get(s.st_name as usize).is_ok_and(|n| n == name))
        };
        let (Some(from_sym), Some(to_sym)) = (index_of(from), index_of(to)) else {
            return Err(err(format!("{from} or {to} is not imported")));
        };
        let rela = file
            .section_header_by_name(".rela.text")
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("no .rela.text".into()))?;
        let relas = file.section_data_as_relas(&rela).map_err(|e| err(e.to_string()))?;
        let Some(i) = relas.into_iter().position(|r| r.r_sym as usize == from_sym && r.r_type == 4) else {
            return Err(err(format!("no call to {from} in .rela.text")));
        };
        // Elf64_Rela: r_offset, then r_info (symbol << 32 | type).
        (rela.sh_offset as usize + i * 24 + 8, ((to_sym as u64) << 32) | 4)
    };
    bytes[at..at + 8].copy_from_slice(&info.to_le_bytes());
    // Without the distribution's signature, which no longer matches (the
    // kernel refuses a bad signature even where it loads unsigned modules).
    if let Some(at) = signature_start(&bytes) {
        bytes.truncate(at);
    }
    Ok(bytes)
}

/// Where a module's appended signature (`struct module_signature`, then
/// the marker) begins, if it has one.
fn signature_start(bytes: &[u8]) -> Option<usize> {
    const MARKER: &[u8] = b"~Module signature appended~\n";
    let body = bytes.strip_suffix(MARKER)?;
    // The structure's last field is the signature's length, big-endian.
    let info_at = body.len().checked_sub(12)?;
    let sig_len = u32::from_be_bytes(body[body.len() - 4..].try_into().ok()?) as usize;
    info_at.checked_sub(sig_len)
}

/// The policy file for a set of modules.
pub fn file(kos: &[&Path]) -> Result<String, Fail> {
    let mut out = String::from("# CTVM trusted-module policy, written by cargo xtask\n");
    for ko in kos {
        let e = entry(ko)?;
        println!("xtask: policy: {} trusted by code digest", e.name);
        out.push_str(&e.line);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_and_jump_lengths() {
        assert_eq!(branch_len(&[0xe8, 0, 0, 0, 0]), Some(5));
        assert_eq!(branch_len(&[0x0f, 0x85, 0, 0, 0, 0]), Some(6));
        assert_eq!(branch_len(&[0xc3]), None);
        assert_eq!(jump_len(&[0xeb, 0x10]), 2);
        assert_eq!(jump_len(&[0x0f, 0x1f, 0x44, 0, 0]), 5);
        assert_eq!(field_len(4), Some(4));
        assert_eq!(field_len(37), None);
    }

    #[test]
    fn sections_land_in_the_regions_linux_gives_them() {
        let (a, x, w) = (u64::from(SHF_ALLOC), u64::from(SHF_EXECINSTR), u64::from(SHF_WRITE));
        assert_eq!(region_of(".text", a | x), Some(Region::Text));
        assert_eq!(region_of(".init.text", a | x), Some(Region::Init));
        assert_eq!(region_of(".rodata.str1.1", a), Some(Region::Rodata));
        assert_eq!(region_of("__param", a), Some(Region::Rodata));
        assert_eq!(region_of(".init.rodata", a), Some(Region::InitRodata));
        assert_eq!(region_of("__jump_table", a | w), Some(Region::RoAfterInit));
        assert_eq!(region_of(".data..ro_after_init", a | w), Some(Region::RoAfterInit));
        assert_eq!(region_of(".bss", a | w), Some(Region::Data));
        assert_eq!(region_of(".init.data", a | w), Some(Region::InitData));
        // Dropped by the loader, or not loaded at all.
        assert_eq!(region_of(".modinfo", a), None);
        assert_eq!(region_of("__versions", a), None);
        assert_eq!(region_of(".comment", 0), None);
    }

    #[test]
    fn an_appended_signature_is_found_by_its_length() {
        let mut ko = b"\x7fELF body".to_vec();
        let body = ko.len();
        ko.extend([0xaa; 5]); // the signature
        ko.extend([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]); // struct module_signature
        ko.extend(b"~Module signature appended~\n");
        assert_eq!(signature_start(&ko), Some(body));
        assert_eq!(signature_start(&ko[..body]), None);
        // A length past the start of the file is no signature.
        let mut bad = ko.clone();
        let at = body + 5 + 11;
        bad[at] = 200;
        assert_eq!(signature_start(&bad), None);
    }
}
