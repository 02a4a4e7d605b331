//! The trusted-module policy the hypervisor is given (`ctvm.policy`): for
//! each module a guest may trust, the SHA-256 of its code as Linux lays it
//! out in memory, with the bytes Linux's loader rewrites masked. The format
//! and the check are in `hypervisor/src/integrity/policy.rs`.
//!
//! The layout follows Linux 6.1's `layout_sections`: executable sections in
//! file order, each at its own alignment, `.init*` ones in the init region,
//! each region's text rounded up to a page. The masks are every relocated
//! field in that text and every site a patch table names.

use std::fmt::Write as _;
use std::path::Path;

use elf::abi::{SHF_ALLOC, SHF_EXECINSTR, SHT_PROGBITS, SHT_RELA};
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

/// Where a section of the `.ko` lands: its offset in text || init.
#[derive(Clone, Copy)]
struct Placed {
    offset: u64,
    size: u64,
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

    // Lay out the executable sections: core text first, then init text.
    let mut placed = vec![None; sections.len()];
    let mut region_len = [0u64; 2];
    for (region, len) in region_len.iter_mut().enumerate() {
        for (i, s) in sections.iter().enumerate().skip(1) {
            let exec = s.sh_flags & u64::from(SHF_ALLOC | SHF_EXECINSTR) == u64::from(SHF_ALLOC | SHF_EXECINSTR);
            if !exec || (name_of(i).starts_with(".init") != (region == 1)) {
                continue;
            }
            let at = len.next_multiple_of(s.sh_addralign.max(1));
            placed[i] = Some((region, at, s.sh_size));
            *len = at + s.sh_size;
        }
        *len = len.next_multiple_of(PAGE);
    }
    let [text_len, init_len] = region_len;
    let place = |i: usize| -> Option<Placed> {
        let (region, at, size) = placed.get(i).copied().flatten()?;
        Some(Placed { offset: if region == 0 { at } else { text_len + at }, size })
    };
    let mut code = vec![0u8; (text_len + init_len) as usize];
    for (i, s) in sections.iter().enumerate() {
        if let (Some(p), SHT_PROGBITS) = (place(i), s.sh_type) {
            code[p.offset as usize..(p.offset + p.size) as usize].copy_from_slice(data_of(i));
        }
    }

    let (symtab, _) =
        file.symbol_table().map_err(|e| err(e.to_string()))?.ok_or_else(|| err("no symbol table".into()))?;
    // A site named by a relocation: the symbol's section and value plus the addend.
    let site = |r: &elf::relocation::Rela| -> Option<u64> {
        let sym = symtab.get(r.r_sym as usize).ok()?;
        let p = place(sym.st_shndx as usize)?;
        let at = (sym.st_value as i64 + r.r_addend) as u64;
        (at < p.size).then_some(p.offset + at)
    };
    let mut masks: Vec<(u64, u64)> = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        if s.sh_type != SHT_RELA {
            continue;
        }
        let relas: Vec<_> = file.section_data_as_relas(s).map_err(|e| err(format!("{}: {e}", name_of(i))))?.collect();
        let target = s.sh_info as usize;
        // Relocated fields in the code itself.
        if let Some(p) = place(target) {
            for r in &relas {
                let len = field_len(r.r_type).ok_or_else(|| err(format!("relocation type {}", r.r_type)))?;
                masks.push((p.offset + r.r_offset, len));
            }
            continue;
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
        }
    }
    masks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (off, len) in masks {
        let end = (off + len).min(text_len + init_len);
        match merged.last_mut() {
            Some((o, l)) if off <= *o + *l => *l = (*l).max(end - *o),
            _ if end > off => merged.push((off, end - off)),
            _ => {}
        }
    }
    for &(off, len) in &merged {
        code[off as usize..(off + len) as usize].fill(0);
    }
    let digest = Sha256::digest(&code);
    let mut line = format!("module {module} text={text_len} init={init_len} sha256=");
    digest.iter().for_each(|b| {
        let _ = write!(line, "{b:02x}");
    });
    line.push_str(" mask=");
    let list: Vec<String> = merged.iter().map(|(o, l)| format!("{o}+{l}")).collect();
    line.push_str(&list.join(","));
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
}
