//! Reading what the agent sends: its structures, field by field from bytes,
//! and the kernel's exported-symbol table, which the hypervisor decodes
//! itself rather than take a list from the guest.

use alloc::string::String;
use alloc::vec::Vec;

use guest_agent::integrity::{self as abi, WireRange};

use super::layout::{is_kernel_address, KernelLayout, ModuleInfo, Range};
use super::objects::ObjectMap;
use super::policy::Sections;
use super::tables::ProcessList;

/// A structure that does not check out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Version,
    Size,
    Range,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn range_at(b: &[u8], at: usize) -> Result<Range, WireError> {
    let r = Range::new(u64_at(b, at), u64_at(b, at + 8));
    if r.end < r.start {
        return Err(WireError::Range);
    }
    Ok(r)
}

fn header(b: &[u8], size: usize) -> Result<(), WireError> {
    if b.len() != size || u32_at(b, 4) as usize != size {
        return Err(WireError::Size);
    }
    if u32_at(b, 0) != abi::STRUCT_VERSION {
        return Err(WireError::Version);
    }
    Ok(())
}

/// The parts of a `KernelLayout` message; the exported-symbol tables are
/// returned for the caller to read from guest memory.
pub struct KernelMessage {
    pub layout: KernelLayout,
    pub ksymtab: Range,
    pub ksymtab_gpl: Range,
    /// Each CPU's interrupt and exception stacks, as the agent places them:
    /// the registration reads the tops and checks them against the stores.
    pub cpu_stacks: Vec<CpuStacks>,
}

/// Where one CPU keeps the tops of its interrupt and exception stacks, and
/// their backing stores (guest-virtual, in its per-CPU area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStacks {
    /// The word holding its interrupt stack's top less 8.
    pub irq_top: u64,
    /// Its TSS's interrupt stack table: [`IST_ENTRIES`] tops, zero unused.
    pub ist: u64,
    /// The interrupt stack's backing store, then the exception stacks'.
    pub stores: [Range; abi::PERCPU_STACKS],
}

/// Entries of a TSS's interrupt stack table.
pub const IST_ENTRIES: u64 = 7;

/// Each CPU's [`CpuStacks`], from the offsets in its per-CPU area: with an
/// area, both backing stores and both tops (non-zero) must be given, inside it (the
/// stores were checked by [`percpu_areas`]); none without one.
fn cpu_stacks(area: Range, stores: &[Range], tops: [u64; 2], bases: &[u64]) -> Result<Vec<CpuStacks>, WireError> {
    if area.is_empty() {
        return Ok(Vec::new());
    }
    // Zero is "not given" (no variable of these sits at the area's start).
    let inside =
        |at: u64, len: u64| at != 0 && at.checked_add(len).is_some_and(|end| area.start <= at && end <= area.end);
    let [irq_store, exception_store] = [stores[0], stores[1]];
    if irq_store.is_empty() || exception_store.is_empty() || !inside(tops[0], 8) || !inside(tops[1], 8 * IST_ENTRIES) {
        return Err(WireError::Range);
    }
    // The bases keep the area in the kernel's half (checked by percpu_areas).
    let at = |base: u64, r: Range| Range::new(base + r.start, base + r.end);
    Ok(bases
        .iter()
        .map(|&base| CpuStacks {
            irq_top: base + tops[0],
            ist: base + tops[1],
            stores: [at(base, irq_store), at(base, exception_store)],
        })
        .collect())
}

/// The largest static per-CPU area taken (a kernel's is some 200 KiB): a
/// bound on the pages one layout makes CTVM track, 256 CPUs' worth.
const PERCPU_AREA_MAX: u64 = 1 << 20;

/// Each CPU's copy of the kernel's static per-CPU area (offsets `area` from
/// each of `bases`): the parts modules may not write, less the stacks a
/// module's handler runs on; and the fields they may (`shared`, each CPU's
/// preempt count, and the tail of the area's last page, where the modules'
/// own static per-CPU variables begin).
fn percpu_areas(
    area: Range,
    stacks: &[Range],
    shared: Range,
    bases: &[u64],
) -> Result<(Vec<Range>, Vec<Range>), WireError> {
    let (mut data, mut fields) = (Vec::new(), Vec::new());
    if area.is_empty() {
        return Ok((data, fields));
    }
    let inside = |r: &Range| r.is_empty() || area.start <= r.start && r.end <= area.end;
    if area.len() > PERCPU_AREA_MAX
        || !stacks.iter().all(inside)
        || !inside(&shared)
        || shared.len() > abi::SHARED_FIELD_MAX
    {
        return Err(WireError::Range);
    }
    let mut holes: Vec<Range> = stacks.iter().copied().filter(|r| !r.is_empty()).collect();
    holes.sort_unstable_by_key(|r| r.start);
    for &base in bases {
        let at = |r: Range| -> Result<Range, WireError> {
            let moved = Range::new(
                base.checked_add(r.start).ok_or(WireError::Range)?,
                base.checked_add(r.end).ok_or(WireError::Range)?,
            );
            if !is_kernel_address(moved.start) || !is_kernel_address(moved.end - 1) {
                return Err(WireError::Range);
            }
            Ok(moved)
        };
        let whole = at(area)?;
        let mut from = whole.start;
        for hole in &holes {
            let hole = at(*hole)?;
            if from < hole.start {
                data.push(Range::new(from, hole.start));
            }
            from = from.max(hole.end);
        }
        if from < whole.end {
            data.push(Range::new(from, whole.end));
        }
        if !shared.is_empty() {
            let field = at(shared)?;
            if (field.end - 1) & !0xfff != field.start & !0xfff {
                return Err(WireError::Range);
            }
            fields.push(field);
        }
        // The modules' static per-CPU variables follow the kernel's.
        let tail = Range::new(whole.end, whole.end.checked_add(0xfff).ok_or(WireError::Range)? & !0xfff);
        if !tail.is_empty() {
            fields.push(tail);
        }
    }
    Ok((data, fields))
}

pub fn kernel_layout(b: &[u8]) -> Result<KernelMessage, WireError> {
    header(b, core::mem::size_of::<abi::KernelLayout>())?;
    let mut at = 8;
    let mut next = || {
        let r = range_at(b, at);
        at += core::mem::size_of::<WireRange>();
        r
    };
    let text = next()?;
    let rodata = next()?;
    let ro_after_init = next()?;
    let syscall_table = next()?;
    let idt = next()?;
    let entry_syscall = u64_at(b, at);
    at += 8;
    let mut next = || {
        let r = range_at(b, at);
        at += core::mem::size_of::<WireRange>();
        r
    };
    let ksymtab = next()?;
    let ksymtab_gpl = next()?;
    let mut poke_routines = Vec::new();
    for _ in 0..abi::POKE_ROUTINES {
        let r = next()?;
        if !r.is_empty() {
            poke_routines.push(r);
        }
    }
    let mut sensitive = Vec::new();
    for _ in 0..abi::SENSITIVE_RANGES {
        let r = next()?;
        if !r.is_empty() {
            sensitive.push(r);
        }
    }
    let page_table = u64_at(b, at);
    at += 8;
    let mut indirect_thunks = [0u64; abi::INDIRECT_THUNKS];
    for t in &mut indirect_thunks {
        *t = u64_at(b, at);
        at += 8;
    }
    let mut return_thunks: Vec<u64> =
        (0..abi::RETURN_THUNKS).map(|i| u64_at(b, at + 8 * i)).filter(|&t| t != 0).collect();
    return_thunks.sort_unstable();
    return_thunks.dedup();
    at += 8 * abi::RETURN_THUNKS;
    let vmemmap = u64_at(b, at);
    let (page_struct_size, slab_cache_offset) = (u32_at(b, at + 8), u32_at(b, at + 12));
    at += 16;
    let caches = core::array::from_fn(|i| u64_at(b, at + 8 * i));
    at += 8 * abi::PROTECTED_CACHES;
    let mut shared = Vec::new();
    for i in 0..abi::SHARED_FIELDS {
        let r = range_at(b, at + 16 * i)?;
        if r.is_empty() {
            continue;
        }
        let one_page = (r.end - 1) & !0xfff == r.start & !0xfff;
        if !is_kernel_address(r.start) || r.len() > abi::SHARED_FIELD_MAX || !one_page {
            return Err(WireError::Range);
        }
        shared.push(r);
    }
    at += 16 * abi::SHARED_FIELDS;
    let mut objects =
        ObjectMap::from_wire(vmemmap, page_struct_size, slab_cache_offset, &caches).map_err(|_| WireError::Range)?;
    let (pgd_list, link_offset, pgd_pages) = (u64_at(b, at), u32_at(b, at + 8), u32_at(b, at + 12));
    let (type_offset, table_mask, table_value) = (u32_at(b, at + 16), u32_at(b, at + 20), u32_at(b, at + 24));
    let owner_offset = u32_at(b, at + 28);
    // Then the strides and the object fields.
    at += 32;
    let strides: [u32; abi::PROTECTED_CACHES] = core::array::from_fn(|i| u32_at(b, at + 4 * i));
    at += 4 * abi::PROTECTED_CACHES;
    let fields: [abi::ObjectField; abi::OBJECT_FIELDS] = core::array::from_fn(|i| {
        let f = at + 16 * i;
        abi::ObjectField { cache: u32_at(b, f), offset: u32_at(b, f + 4), size: u32_at(b, f + 8), reserved: 0 }
    });
    if let Some(o) = objects.as_mut() {
        o.set_table_type(type_offset, table_mask, table_value).map_err(|_| WireError::Range)?;
        o.set_shared_fields(&strides, &fields).map_err(|_| WireError::Range)?;
    }
    let at = core::mem::offset_of!(abi::KernelLayout, percpu);
    let percpu = range_at(b, at)?;
    let percpu_stacks: Vec<Range> =
        (0..abi::PERCPU_STACKS).map(|i| range_at(b, at + 16 * (1 + i))).collect::<Result<_, _>>()?;
    let percpu_shared = range_at(b, core::mem::offset_of!(abi::KernelLayout, percpu_shared))?;
    let at = core::mem::offset_of!(abi::KernelLayout, percpu_bases);
    let bases: Vec<u64> = (0..abi::CPUS_MAX).map(|i| u64_at(b, at + 8 * i)).filter(|&base| base != 0).collect();
    let (data, fields) = percpu_areas(percpu, &percpu_stacks, percpu_shared, &bases)?;
    let at = core::mem::offset_of!(abi::KernelLayout, percpu_stack_tops);
    let cpu_stacks = cpu_stacks(percpu, &percpu_stacks, [u64_at(b, at), u64_at(b, at + 8)], &bases)?;
    let percpu_cpus = if percpu.is_empty() { 0 } else { bases.len() };
    let percpu_stacks = percpu_stacks.iter().filter(|r| !r.is_empty()).count();
    // Each pointer to a probe list must lie in the image's data, which only
    // the kernel view writes: else a module would re-point it.
    let at = core::mem::offset_of!(abi::KernelLayout, probe_lists);
    let probe_lists: Vec<u64> = (0..abi::PROBE_LISTS).map(|i| u64_at(b, at + 8 * i)).filter(|&p| p != 0).collect();
    let in_data = |p: u64| sensitive.iter().any(|r| r.contains(p) && r.contains(p.saturating_add(7)));
    if !probe_lists.iter().all(|&p| in_data(p)) {
        return Err(WireError::Range);
    }
    sensitive.extend(data);
    shared.extend(fields);
    let processes = ProcessList::from_wire(pgd_list, link_offset, pgd_pages, owner_offset, objects.as_ref())
        .map_err(|_| WireError::Range)?;
    let layout = KernelLayout {
        objects,
        processes,
        shared,
        page_table,
        indirect_thunks,
        return_thunks,
        sensitive,
        text,
        rodata,
        ro_after_init,
        syscall_table,
        idt,
        entry_syscall,
        poke_routines,
        percpu_cpus,
        percpu_stacks,
        probe_lists,
        ..Default::default()
    };
    Ok(KernelMessage { layout, ksymtab, ksymtab_gpl, cpu_stacks })
}

/// A `ModuleInfo` message; `entries` and `fixups` are read by the caller
/// from guest memory.
pub struct ModuleMessage {
    pub info: ModuleInfo,
    pub entries_address: u64,
    pub entry_count: u32,
    pub fixups_address: u64,
    pub fixup_count: u32,
    /// Its exported-symbol tables, inside its data (possibly empty).
    pub ksymtabs: [Range; 2],
}

pub fn module_info(b: &[u8]) -> Result<ModuleMessage, WireError> {
    header(b, core::mem::size_of::<abi::ModuleInfo>())?;
    let name_bytes = &b[8..8 + abi::MODULE_NAME_MAX];
    let len = name_bytes.iter().position(|&c| c == 0).unwrap_or(name_bytes.len());
    let name: String = name_bytes[..len].iter().map(|&c| if c.is_ascii_graphic() { c as char } else { '?' }).collect();
    let mut at = 8 + abi::MODULE_NAME_MAX;
    // Each slot is one region (see `abi::ModuleInfo`); empty ones are dropped.
    let mut take = |n: usize| -> Result<Vec<Range>, WireError> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(range_at(b, at)?);
            at += 16;
        }
        Ok(v)
    };
    let code_slots = take(abi::MODULE_CODE_RANGES)?;
    let data_slots = take(abi::MODULE_DATA_RANGES)?;
    let init_slots = take(abi::MODULE_INIT_RANGES)?;
    let sections = Sections {
        text: code_slots[0],
        init: code_slots[1],
        data: data_slots[0],
        rodata: data_slots[1],
        ro_after_init: data_slots[2],
        init_data: data_slots[3],
    };
    let present = |slots: Vec<Range>| -> Vec<Range> { slots.into_iter().filter(|r| !r.is_empty()).collect() };
    let (code, data, init) = (present(code_slots), present(data_slots), present(init_slots));
    let entries_address = u64_at(b, at);
    let entry_count = u32_at(b, at + 8);
    let fixups_address = u64_at(b, at + 16);
    let fixup_count = u32_at(b, at + 24);
    if entry_count > abi::MODULE_ENTRIES_MAX || fixup_count > abi::MODULE_FIXUPS_MAX {
        return Err(WireError::Size);
    }
    let module_size = u32_at(b, at + 28);
    if !(abi::MODULE_STRUCT_MIN..=abi::MODULE_STRUCT_MAX).contains(&module_size) {
        return Err(WireError::Size);
    }
    let module_at = u64_at(b, at + 32);
    let module_struct = Range::new(module_at, module_at.checked_add(u64::from(module_size)).ok_or(WireError::Range)?);
    let ksymtabs = [range_at(b, at + 40)?, range_at(b, at + 56)?];
    let in_data = |r: &Range| r.is_empty() || data.iter().any(|d| d.start <= r.start && r.end <= d.end);
    let exports_fit = ksymtabs.iter().all(|r| {
        in_data(r)
            && r.len() % KERNEL_SYMBOL_SIZE == 0
            && r.len() / KERNEL_SYMBOL_SIZE <= u64::from(abi::MODULE_EXPORTS_MAX)
    });
    if !exports_fit || !in_data(&module_struct) {
        return Err(WireError::Range);
    }
    let info = ModuleInfo {
        name,
        code,
        data,
        init,
        entries: Vec::new(),
        fixups: Vec::new(),
        exports: Vec::new(),
        module_struct,
        sections,
    };
    Ok(ModuleMessage { info, entries_address, entry_count, fixups_address, fixup_count, ksymtabs })
}

/// Decodes an array of [`abi::Fixup`]s, keeping those whose instruction
/// and fixup both lie in the module's code.
pub fn fixups(bytes: &[u8], code: &[Range]) -> Vec<(u64, u64)> {
    let in_code = |a: u64| code.iter().any(|r| r.contains(a));
    bytes
        .chunks_exact(core::mem::size_of::<abi::Fixup>())
        .map(|c| (u64_at(c, 0), u64_at(c, 8)))
        .filter(|&(insn, fixup)| in_code(insn) && in_code(fixup))
        .collect()
}

pub use abi::KERNEL_SYMBOL_SIZE;

/// Decodes an exported-symbol table at guest-virtual `table` from its raw
/// bytes into (address, name address) pairs. The table's start is the
/// guest's word: decoding stops at the first entry whose fields would lie
/// past the top of the address space.
pub fn ksymtab(table: Range, bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (i, entry) in bytes.chunks_exact(KERNEL_SYMBOL_SIZE as usize).enumerate() {
        let end = (i as u64 + 1).checked_mul(KERNEL_SYMBOL_SIZE).and_then(|n| table.start.checked_add(n - 1));
        if end.is_none() {
            break;
        }
        let base = table.start + i as u64 * KERNEL_SYMBOL_SIZE;
        let value = i32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let name = i32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        out.push((base.wrapping_add_signed(i64::from(value)), (base + 4).wrapping_add_signed(i64::from(name))));
    }
    out
}

/// What an exported kernel symbol's name says it is, for the crossings a
/// module may make: a branch thunk is judged by where it branches, so it is
/// never an entry point in its own right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    /// `__x86_indirect_thunk_<reg>`: `jmp *reg`, with the register's number.
    IndirectThunk(usize),
    /// `__x86_return_thunk`: `ret`.
    ReturnThunk,
    Function,
}

pub fn export_kind(name: &[u8]) -> ExportKind {
    const REGS: [&[u8]; 16] = [
        b"rax", b"rcx", b"rdx", b"rbx", b"rsp", b"rbp", b"rsi", b"rdi", b"r8", b"r9", b"r10", b"r11", b"r12", b"r13",
        b"r14", b"r15",
    ];
    if name == b"__x86_return_thunk" {
        return ExportKind::ReturnThunk;
    }
    match name.strip_prefix(b"__x86_indirect_thunk_").and_then(|r| REGS.iter().position(|&g| g == r)) {
        Some(reg) => ExportKind::IndirectThunk(reg),
        None => ExportKind::Function,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thunks_are_known_by_their_exported_names() {
        assert_eq!(export_kind(b"__x86_indirect_thunk_rax"), ExportKind::IndirectThunk(0));
        assert_eq!(export_kind(b"__x86_indirect_thunk_r15"), ExportKind::IndirectThunk(15));
        assert_eq!(export_kind(b"__x86_return_thunk"), ExportKind::ReturnThunk);
        assert_eq!(export_kind(b"__x86_indirect_thunk_r16"), ExportKind::Function);
        assert_eq!(export_kind(b"printk"), ExportKind::Function);
    }

    use super::*;
    use alloc::vec;

    fn layout_bytes() -> Vec<u8> {
        bytes_of(&layout())
    }

    fn layout() -> abi::KernelLayout {
        let mut l = abi::KernelLayout {
            version: abi::STRUCT_VERSION,
            size: core::mem::size_of::<abi::KernelLayout>() as u32,
            text: WireRange { start: 0xffff_ffff_8100_0000, end: 0xffff_ffff_8200_0000 },
            entry_syscall: 0xffff_ffff_8180_0000,
            ksymtab: WireRange { start: 0xffff_ffff_8300_0000, end: 0xffff_ffff_8300_0018 },
            ..Default::default()
        };
        l.poke_routines[1] = WireRange { start: 0xffff_ffff_8105_0000, end: 0xffff_ffff_8105_0200 };
        l.indirect_thunks[15] = 0xffff_ffff_81e0_01e0;
        l.return_thunks[3] = 0xffff_ffff_81e0_1000;
        l.return_thunks[1] = 0xffff_ffff_81e0_0800;
        l.page_structs = 0xffff_ea00_0000_0000;
        l.page_struct_size = 64;
        l.slab_cache_offset = 24;
        l.protected_caches[0] = 0xffff_8880_0100_0000;
        l.shared[1] = WireRange { start: 0xffff_ffff_8290_0094, end: 0xffff_ffff_8290_0098 };
        l
    }

    fn bytes_of(l: &abi::KernelLayout) -> Vec<u8> {
        // SAFETY: repr(C) plain data, viewed as bytes.
        unsafe { core::slice::from_raw_parts((l as *const abi::KernelLayout).cast::<u8>(), core::mem::size_of_val(l)) }
            .to_vec()
    }

    #[test]
    fn kernel_layout_parses_and_checks() {
        let m = kernel_layout(&layout_bytes()).unwrap();
        assert_eq!(m.layout.text.start, 0xffff_ffff_8100_0000);
        assert_eq!(m.layout.entry_syscall, 0xffff_ffff_8180_0000);
        assert_eq!(m.ksymtab.end - m.ksymtab.start, 0x18);
        assert_eq!(m.layout.poke_routines, vec![Range::new(0xffff_ffff_8105_0000, 0xffff_ffff_8105_0200)]);
        assert_eq!(m.layout.thunk_register(0xffff_ffff_81e0_01e0), Some(15));
        assert_eq!(m.layout.return_thunks, vec![0xffff_ffff_81e0_0800, 0xffff_ffff_81e0_1000]);
        let objects = m.layout.objects.unwrap();
        assert_eq!(
            (objects.vmemmap, objects.page_struct_size, objects.slab_cache_offset),
            (0xffff_ea00_0000_0000, 64, 24)
        );
        assert_eq!(objects.caches, vec![(0xffff_8880_0100_0000, "cred")]);
        assert_eq!(m.layout.shared, vec![Range::new(0xffff_ffff_8290_0094, 0xffff_ffff_8290_0098)]);
        // A shared field is small, in one page, in the kernel.
        let at = core::mem::offset_of!(abi::KernelLayout, shared) + 16;
        for (start, end) in [
            (0xffff_ffff_8290_0000, 0xffff_ffff_8290_0100),
            (0xffff_ffff_8290_0ffc, 0xffff_ffff_8290_1004),
            (0x1000, 0x1004),
        ] {
            let mut bad = layout_bytes();
            bad[at..at + 8].copy_from_slice(&u64::to_le_bytes(start));
            bad[at + 8..at + 16].copy_from_slice(&u64::to_le_bytes(end));
            assert_eq!(kernel_layout(&bad).err(), Some(WireError::Range), "{start:#x}..{end:#x}");
        }
        // A struct page the hypervisor could not read right is refused.
        let mut odd = layout_bytes();
        let at = core::mem::offset_of!(abi::KernelLayout, slab_cache_offset);
        odd[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
        assert_eq!(kernel_layout(&odd).err(), Some(WireError::Range));
        let mut bad = layout_bytes();
        bad[0] = abi::STRUCT_VERSION as u8 + 1;
        assert_eq!(kernel_layout(&bad).err(), Some(WireError::Version));
        assert_eq!(kernel_layout(&layout_bytes()[..100]).err(), Some(WireError::Size));
        let mut reversed = layout_bytes();
        reversed[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(kernel_layout(&reversed).err(), Some(WireError::Range));
    }

    #[test]
    fn each_cpus_per_cpu_area_is_data_but_its_stacks_and_preempt_count() {
        const CPU0: u64 = 0xffff_8880_7fc0_0000;
        const CPU1: u64 = 0xffff_8880_7fc4_0000;
        let mut l = abi::KernelLayout { version: abi::STRUCT_VERSION, ..Default::default() };
        l.size = core::mem::size_of::<abi::KernelLayout>() as u32;
        // 6.1's shape: 0x3_2a40 bytes, the IRQ stack at 0x4000, the
        // exception stacks at 0xc000, the preempt count at 0x2_0e4c.
        l.percpu = WireRange { start: 0, end: 0x3_2a40 };
        l.percpu_stacks[0] = WireRange { start: 0x4000, end: 0x8000 };
        l.percpu_stacks[1] = WireRange { start: 0xc000, end: 0x1_2000 };
        l.percpu_shared = WireRange { start: 0x2_0e4c, end: 0x2_0e50 };
        l.percpu_bases.0[..2].copy_from_slice(&[CPU0, CPU1]);
        l.percpu_stack_tops = [0x1_d6f0, 0x2_4024];
        let message = kernel_layout(&bytes_of(&l)).unwrap();
        // Where each CPU keeps its stacks' tops, and their stores.
        let stacks = |b: u64| CpuStacks {
            irq_top: b + 0x1_d6f0,
            ist: b + 0x2_4024,
            stores: [Range::new(b + 0x4000, b + 0x8000), Range::new(b + 0xc000, b + 0x1_2000)],
        };
        assert_eq!(message.cpu_stacks, [stacks(CPU0), stacks(CPU1)]);
        let m = message.layout;
        let data: Vec<Range> = [CPU0, CPU1]
            .iter()
            .flat_map(|&b| {
                [Range::new(b, b + 0x4000), Range::new(b + 0x8000, b + 0xc000), Range::new(b + 0x1_2000, b + 0x3_2a40)]
            })
            .collect();
        assert_eq!(m.sensitive, data);
        assert_eq!((m.percpu_cpus, m.percpu_stacks), (2, 2));
        // Each CPU's preempt count, and the page's tail past the kernel's
        // variables (the modules' own per-CPU variables).
        let fields: Vec<Range> = [CPU0, CPU1]
            .iter()
            .flat_map(|&b| [Range::new(b + 0x2_0e4c, b + 0x2_0e50), Range::new(b + 0x3_2a40, b + 0x3_3000)])
            .collect();
        assert_eq!(m.shared, fields);
        // Stacks or a field outside the area, a wide field, an area past
        // any kernel's, a base that takes the area out of the kernel's
        // half: refused.
        for bad in [
            abi::KernelLayout { percpu: WireRange { start: 0, end: 0x10_1000 }, ..l },
            abi::KernelLayout { percpu_stacks: [WireRange { start: 0x3_2000, end: 0x3_6000 }; 2], ..l },
            abi::KernelLayout { percpu_shared: WireRange { start: 0x2_0e4c, end: 0x2_0e6c }, ..l },
            abi::KernelLayout { percpu_shared: WireRange { start: 0x3_2a40, end: 0x3_2a44 }, ..l },
            // Stacks without their tops, tops outside the area, no stores.
            abi::KernelLayout { percpu_stack_tops: [0, 0x2_4024], ..l },
            abi::KernelLayout { percpu_stack_tops: [0x1_d6f0, 0x3_2a10], ..l },
            abi::KernelLayout { percpu_stack_tops: [u64::MAX - 4, 0x2_4024], ..l },
            abi::KernelLayout { percpu_stacks: [WireRange::default(); 2], ..l },
        ] {
            assert_eq!(kernel_layout(&bytes_of(&bad)).err(), Some(WireError::Range));
        }
        let mut low = l;
        low.percpu_bases.0[1] = 0x7fff_ffff_f000;
        assert_eq!(kernel_layout(&bytes_of(&low)).err(), Some(WireError::Range));
        // No area given: nothing added (the agent refuses to lock without one).
        let none = abi::KernelLayout { percpu: WireRange::default(), ..l };
        let m = kernel_layout(&bytes_of(&none)).unwrap();
        assert!(m.cpu_stacks.is_empty());
        let m = m.layout;
        assert!(m.sensitive.is_empty() && m.shared.is_empty() && m.percpu_cpus == 0);
    }

    #[test]
    fn module_info_parses_name_ranges_and_bounds_entries() {
        let mut m = abi::ModuleInfo::default();
        m.name[..5].copy_from_slice(b"dummy");
        m.code[0] = WireRange { start: 0xffff_ffff_c000_0000, end: 0xffff_ffff_c000_1000 };
        m.data[1] = WireRange { start: 0xffff_ffff_c000_2000, end: 0xffff_ffff_c000_3000 };
        m.entries = 0xffff_8880_0000_1000;
        m.entry_count = 12;
        m.module = 0xffff_ffff_c000_2100;
        m.module_size = 0x600;
        m.ksymtab = WireRange { start: 0xffff_ffff_c000_2200, end: 0xffff_ffff_c000_2200 + 3 * 12 };
        // SAFETY: as above.
        let bytes = unsafe {
            core::slice::from_raw_parts((&m as *const abi::ModuleInfo).cast::<u8>(), core::mem::size_of_val(&m))
        }
        .to_vec();
        let got = module_info(&bytes).unwrap();
        assert_eq!(got.info.module_struct, Range::new(0xffff_ffff_c000_2100, 0xffff_ffff_c000_2700));
        assert_eq!(got.ksymtabs[0], Range::new(0xffff_ffff_c000_2200, 0xffff_ffff_c000_2224));
        // Its struct module and export tables lie in its own data, whole.
        for (module, ksymtab) in [
            (0xffff_ffff_c000_4000, m.ksymtab),
            (0xffff_ffff_c000_2ffe, m.ksymtab),
            // Its start inside the data, its end past it.
            (0xffff_ffff_c000_2a01, m.ksymtab),
            (m.module, WireRange { start: 0xffff_ffff_c000_2ff0, end: 0xffff_ffff_c000_3008 }),
            (m.module, WireRange { start: 0xffff_ffff_c000_2200, end: 0xffff_ffff_c000_2201 }),
        ] {
            let mut bad = m;
            (bad.module, bad.ksymtab_gpl) = (module, ksymtab);
            // SAFETY: as above.
            let bytes = unsafe {
                core::slice::from_raw_parts((&bad as *const abi::ModuleInfo).cast::<u8>(), size_of_val(&bad))
            };
            assert_eq!(module_info(bytes).err(), Some(WireError::Range), "{module:#x} {ksymtab:x?}");
        }
        // A size no struct module has.
        for size in [0, abi::MODULE_STRUCT_MIN - 1, abi::MODULE_STRUCT_MAX + 1, u32::MAX] {
            let mut bad = m;
            bad.module_size = size;
            // SAFETY: as above.
            let bytes = unsafe {
                core::slice::from_raw_parts((&bad as *const abi::ModuleInfo).cast::<u8>(), size_of_val(&bad))
            };
            assert_eq!(module_info(bytes).err(), Some(WireError::Size), "{size:#x}");
        }
        assert_eq!(got.info.name, "dummy");
        assert_eq!(got.info.code.len(), 1);
        assert_eq!(got.info.data, vec![Range::new(0xffff_ffff_c000_2000, 0xffff_ffff_c000_3000)]);
        // Each slot keeps its region, empty or not: data slot 1 is rodata,
        // the base a trusted module's relocations into rodata resolve to.
        assert_eq!(got.info.sections.rodata, Range::new(0xffff_ffff_c000_2000, 0xffff_ffff_c000_3000));
        assert_eq!(got.info.sections.text, Range::new(0xffff_ffff_c000_0000, 0xffff_ffff_c000_1000));
        assert!(got.info.sections.data.is_empty() && got.info.sections.init.is_empty());
        assert_eq!((got.entries_address, got.entry_count), (0xffff_8880_0000_1000, 12));
        let mut many = m;
        many.entry_count = abi::MODULE_ENTRIES_MAX + 1;
        // SAFETY: as above.
        let bytes = unsafe {
            core::slice::from_raw_parts((&many as *const abi::ModuleInfo).cast::<u8>(), core::mem::size_of_val(&many))
        }
        .to_vec();
        assert_eq!(module_info(&bytes).err(), Some(WireError::Size));
        let mut fixups = m;
        fixups.fixups = 0xffff_8880_0000_2000;
        fixups.fixup_count = 3;
        // SAFETY: as above.
        let bytes = unsafe {
            core::slice::from_raw_parts((&fixups as *const abi::ModuleInfo).cast::<u8>(), size_of_val(&fixups))
        }
        .to_vec();
        let got = module_info(&bytes).unwrap();
        assert_eq!((got.fixups_address, got.fixup_count), (0xffff_8880_0000_2000, 3));
        fixups.fixup_count = abi::MODULE_FIXUPS_MAX + 1;
        // SAFETY: as above.
        let bytes = unsafe {
            core::slice::from_raw_parts((&fixups as *const abi::ModuleInfo).cast::<u8>(), size_of_val(&fixups))
        }
        .to_vec();
        assert_eq!(module_info(&bytes).err(), Some(WireError::Size));
    }

    /// A probe list's pointer is taken only from the image's data, which
    /// no module writes; anywhere else a module could re-point it.
    #[test]
    fn probe_lists_lie_in_the_images_data() {
        let mut l = layout();
        l.sensitive[2] = WireRange { start: 0xffff_ffff_8290_0000, end: 0xffff_ffff_8290_2000 };
        l.probe_lists[1] = 0xffff_ffff_8290_1ff0;
        assert_eq!(kernel_layout(&bytes_of(&l)).unwrap().layout.probe_lists, vec![0xffff_ffff_8290_1ff0]);
        for outside in [0xffff_ffff_8290_1ffc, 0xffff_8880_0100_0000, 0x1000] {
            l.probe_lists[1] = outside;
            assert_eq!(kernel_layout(&bytes_of(&l)).err(), Some(WireError::Range), "{outside:#x}");
        }
    }

    #[test]
    fn fixups_outside_the_module_code_are_dropped() {
        let code = [Range::new(0x1000, 0x2000)];
        let mut bytes = Vec::new();
        for (insn, fixup) in [(0x1010u64, 0x1020u64), (0x1010, 0x3000), (0x0, 0x1020), (0x1ff0, 0x1ff8)] {
            bytes.extend_from_slice(&insn.to_le_bytes());
            bytes.extend_from_slice(&fixup.to_le_bytes());
        }
        bytes.push(0xaa); // a torn trailing entry is ignored
        assert_eq!(fixups(&bytes, &code), vec![(0x1010, 0x1020), (0x1ff0, 0x1ff8)]);
    }

    #[test]
    fn ksymtab_entries_are_relative_to_themselves() {
        let table = Range::new(0xffff_ffff_8300_0000, 0xffff_ffff_8300_0018);
        let mut bytes = vec![0u8; 24];
        // Entry 0: value at -0x200_0000 (0xffffffff81000000), name at +0x100 from field 1.
        bytes[0..4].copy_from_slice(&(-0x200_0000i32).to_le_bytes());
        bytes[4..8].copy_from_slice(&0x100i32.to_le_bytes());
        // Entry 1: value +0x10.
        bytes[12..16].copy_from_slice(&0x10i32.to_le_bytes());
        let got = ksymtab(table, &bytes);
        assert_eq!(got[0], (0xffff_ffff_8100_0000, 0xffff_ffff_8300_0104));
        assert_eq!(got[1].0, 0xffff_ffff_8300_001c);
    }
}
