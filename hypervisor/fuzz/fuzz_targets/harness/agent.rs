//! The `agent` target: what the guest agent hands the hypervisor. The first
//! byte picks the surface:
//! * the hypercall ABI: `decode` of any registers;
//! * the agent's structures: `kernel_layout` and `module_info` (header made
//!   valid for most inputs, so the bodies are reached), the exception-table
//!   fixups and the kernel's symbol table as the hypervisor reads them, and
//!   the export names it classifies;
//! * guest copies through the guest-access service (how hypercalls reach
//!   guest memory), as the kernel or user space, through page tables the
//!   input writes.
//!
//! Properties: a decoded request's pointer and sizes are within the ABI's
//! limits (kernel half, no wrap, bounded counts); a parsed structure's
//! ranges are ordered and non-empty, its name printable, its counts within
//! the ABI's maxima; fixups lie inside the module's code; symbol entries are
//! one per 12 bytes; a thunk name is exactly the register's; a guest copy
//! touches only guest RAM, and a refused write writes nothing.

use arbitrary::{Arbitrary, Unstructured};
use guest_agent::integrity as abi;
use guest_agent::{Call, Registers};
use hypervisor::exits::hypercall::{self, Request, MAX_LOG_READ, MAX_RECORDS_PER_READ};
use hypervisor::guest::access::{GuestAccess, Paging, Principal};
use hypervisor::integrity::layout::Range;
use hypervisor::integrity::wire::{self, ExportKind};
use hypervisor::integrity::View;

use super::fakes::GuestRam;
use super::mmio::Entry;

const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 6 {
        0 => hypercall_decode(rest),
        1 => kernel_layout(rest),
        2 => module_info(rest),
        3 => fixups_and_symbols(rest),
        4 => export_kind(rest),
        _ => guest_copy(rest),
    }
}

fn hypercall_decode(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((call, rbx, rcx, rdx, rsi)) = <(u8, u64, u64, u64, u64)>::arbitrary(&mut u) else { return };
    // The call number: one of the ABI's, or anything.
    let rax = match call % 13 {
        0 => 0,
        1 => 1,
        n @ 2..=6 => 0x10 + u64::from(n - 2),
        7 => 0x15,
        8 => 0x20,
        9 => 0x30,
        10 => 0x31,
        11 => 0x16,
        _ => rbx.rotate_left(17),
    };
    let regs = Registers { rax, rbx, rcx, rdx, rsi };
    let Ok(request) = hypercall::decode(&regs) else { return };
    assert!(Call::from_raw(rax).is_some(), "call {rax:#x} decoded");
    let kernel = |addr: u64, size: u64| addr >= KERNEL_HALF && addr.checked_add(size).is_some();
    match request {
        Request::KernelRegister { layout } => {
            assert!(kernel(layout, rcx) && rcx == core::mem::size_of::<abi::KernelLayout>() as u64)
        }
        Request::ModuleRegister { info: module } | Request::KernelLock { agent: module } => {
            assert!(kernel(module, rcx) && rcx == core::mem::size_of::<abi::ModuleInfo>() as u64)
        }
        Request::ViolationsRead { buffer, count } => {
            assert!((1..=MAX_RECORDS_PER_READ).contains(&count));
            assert!(kernel(buffer, u64::from(count) * abi::VIOLATION_RECORD_SIZE as u64));
        }
        Request::EventLogRead { buffer, size, offset } => {
            assert!(u64::from(size) <= MAX_LOG_READ && buffer.checked_add(u64::from(size)).is_some());
            assert_eq!((u64::from(size), u64::from(offset)), (rcx, rdx));
        }
        Request::VtpmStoreFetch { buffer, size } => {
            assert!(size as usize <= guest_agent::vtpm_store::MAX_BLOB && kernel(buffer, u64::from(size)));
            assert_eq!(u64::from(size), rcx);
        }
        Request::VtpmStoreDone { version } => assert_eq!(version, rbx),
        Request::StackNew { base } => assert!(base == rbx && base & 0x3fff == 0 && kernel(base, 0x4000)),
        Request::Shutdown { code } => assert_eq!(u64::from(code), rbx),
        Request::ModuleLive { id } | Request::ModuleUnregister { id } => assert_eq!(u64::from(id), rbx),
        Request::Version => {}
    }
}

/// `bytes` with a valid header (version, size) unless the first byte says
/// otherwise, padded or cut to `size` unless the second says otherwise.
fn with_header(data: &[u8], size: usize) -> Vec<u8> {
    let (flags, body) = data.split_first().unwrap_or((&0, &[]));
    let mut b = body.to_vec();
    if flags & 1 == 0 {
        b.resize(size, 0);
    }
    if flags & 2 == 0 && b.len() >= 8 {
        b[0..4].copy_from_slice(&abi::STRUCT_VERSION.to_le_bytes());
        b[4..8].copy_from_slice(&(size as u32).to_le_bytes());
    }
    // Most ranges empty or ordered, so that later fields are reached.
    if flags & 4 == 0 {
        for r in b.get_mut(8..).unwrap_or_default().chunks_exact_mut(16) {
            let (s, e) = r.split_at_mut(8);
            if u64::from_le_bytes(s.try_into().unwrap()) > u64::from_le_bytes(e.try_into().unwrap()) {
                e.copy_from_slice(s);
            }
        }
    }
    b
}

fn ordered(r: &Range) -> bool {
    r.start <= r.end
}

fn kernel_layout(data: &[u8]) {
    let size = core::mem::size_of::<abi::KernelLayout>();
    let b = with_header(data, size);
    let Ok(m) = wire::kernel_layout(&b) else { return };
    assert_eq!(b.len(), size);
    let l = &m.layout;
    for r in [&l.text, &l.rodata, &l.ro_after_init, &l.syscall_table, &l.idt, &m.ksymtab, &m.ksymtab_gpl] {
        assert!(ordered(r), "{r:?}");
    }
    for r in l.poke_routines.iter().chain(&l.sensitive) {
        assert!(r.start < r.end, "empty or reversed range kept: {r:?}");
    }
    assert!(l.poke_routines.len() <= abi::POKE_ROUTINES && l.sensitive.len() <= abi::SENSITIVE_RANGES);
    assert!(l.return_thunks.windows(2).all(|w| w[0] < w[1]), "return thunks not sorted and unique");
    assert!(l.return_thunks.iter().all(|&t| t != 0) && l.return_thunks.len() <= abi::RETURN_THUNKS);
    // The symbol tables, as the hypervisor reads them: a whole number of
    // 12-byte entries, each entry's fields relative to its own address.
    for table in [m.ksymtab, m.ksymtab_gpl] {
        let len = table.end - table.start;
        if len % wire::KERNEL_SYMBOL_SIZE != 0 || len > 4096 * wire::KERNEL_SYMBOL_SIZE {
            continue;
        }
        let raw: Vec<u8> = b.iter().copied().cycle().take(len as usize).collect();
        let symbols = wire::ksymtab(table, &raw);
        assert_eq!(symbols.len() as u64, len / wire::KERNEL_SYMBOL_SIZE);
    }
}

fn module_info(data: &[u8]) {
    let size = core::mem::size_of::<abi::ModuleInfo>();
    let b = with_header(data, size);
    let Ok(m) = wire::module_info(&b) else { return };
    assert_eq!(b.len(), size);
    let i = &m.info;
    assert!(i.name.len() <= abi::MODULE_NAME_MAX && i.name.chars().all(|c| c.is_ascii_graphic()), "{:?}", i.name);
    for r in i.code.iter().chain(&i.data).chain(&i.init) {
        assert!(r.start < r.end, "empty or reversed range kept: {r:?}");
    }
    assert!(i.code.len() <= abi::MODULE_CODE_RANGES && i.data.len() <= abi::MODULE_DATA_RANGES);
    assert!(i.init.len() <= abi::MODULE_INIT_RANGES);
    assert!(m.entry_count <= abi::MODULE_ENTRIES_MAX && m.fixup_count <= abi::MODULE_FIXUPS_MAX);
}

fn fixups_and_symbols(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(code) = <Vec<(u64, u16)>>::arbitrary(&mut u) else { return };
    let code: Vec<Range> = code.iter().take(4).map(|&(s, n)| Range::new(s, s.saturating_add(u64::from(n)))).collect();
    let bytes = u.take_rest();
    for (insn, fixup) in wire::fixups(bytes, &code) {
        assert!(code.iter().any(|r| r.contains(insn)) && code.iter().any(|r| r.contains(fixup)));
    }
    assert!(wire::fixups(bytes, &[]).is_empty(), "a fixup outside any code range");
}

fn export_kind(name: &[u8]) {
    match wire::export_kind(name) {
        ExportKind::IndirectThunk(reg) => {
            const REGS: [&str; 16] = [
                "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
                "r15",
            ];
            assert_eq!(name, format!("__x86_indirect_thunk_{}", REGS[reg]).as_bytes());
        }
        ExportKind::ReturnThunk => assert_eq!(name, b"__x86_return_thunk"),
        ExportKind::Function => {}
    }
}

#[derive(Arbitrary, Debug)]
struct Copy {
    entries: Vec<(u8, u16, Entry)>,
    cr3: Entry,
    gva: u64,
    len: u16,
    read: bool,
}

fn guest_copy(data: &[u8]) {
    let Ok(c) = Copy::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let g = GuestRam::new(16 * 0x1000);
    for (page, index, entry) in c.entries.iter().take(64) {
        let at = u64::from(page % 16) * 0x1000 + u64::from(index & 0x1ff) * 8;
        g.write(at, &entry.value().to_le_bytes());
    }
    let paging = Paging::four_level(c.cr3.value() & 0x000f_ffff_ffff_f000);
    let who = Principal { cpl: if c.len & 0x8000 != 0 { 3 } else { 0 }, view: View::Kernel };
    let access = GuestAccess::new(&g.memory, &g.phys, paging, who, None);
    let len = usize::from(c.len % 0x3000);
    let before = g.phys.bytes.borrow().clone();
    if c.read {
        let _ = access.read_vec(c.gva, len);
        assert!(*g.phys.bytes.borrow() == before, "a read changed guest memory");
    } else {
        let data = vec![0xA5u8; len];
        if access.write(c.gva, &data).is_err() {
            assert!(*g.phys.bytes.borrow() == before, "a refused write changed guest memory");
        }
    }
}
