//! The exits and hypercalls of run-time kernel integrity: the agent's
//! registrations, EPT violations decided by the engine, the single-steps
//! that let the kernel patch itself, and the registers that guard the
//! protection once the layout is locked.

use alloc::vec::Vec;

use guest_agent::integrity::{self as abi, VIOLATION_RECORD_SIZE};
use guest_agent::Error;

use super::{Action, ExitContext, StopReason};
use crate::arch::x86_64::vmx::ept::ViolationInfo;
use crate::console;
use crate::guest::access::Kind;
use crate::integrity::control::{ControlError, GuestControl};
use crate::integrity::engine::{Fault, Outcome, PageClass, RegisterError, Step};
use crate::integrity::layout::{ModuleInfo, Range};
use crate::integrity::objects::ObjectMap;
use crate::integrity::policy::{Kernel, Mismatch};
use crate::integrity::violation::{Line, Say, Violation, ViolationKind};
use crate::integrity::{api, tables, wire, Guard, Stepping, View};
use crate::mm::paging::Perms;
use crate::vcpu::{inject_exception, Field, BLOCKING_BY_STI_OR_MOV_SS, VECTOR_GP};

pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const GUARDED_MSRS: [u32; 5] = [0x174, 0x175, 0x176, MSR_LSTAR, 0xc000_0083];
pub const CR0_WP: u64 = 1 << 16;
const RFLAGS_TF: u64 = 1 << 8;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
const EPERM: u64 = 1;

/// Most exported symbols a kernel may have (Linux 6.x has about 30 000).
const MAX_SYMBOLS: u64 = 200_000;

/// Copies in a structure the agent passed, as the kernel that called may
/// read it.
fn read_guest(ctx: &ExitContext<'_>, gva: u64, len: usize) -> Result<Vec<u8>, Error> {
    ctx.access().read_vec(gva, len).map_err(|_| Error::BadAddress)
}

/// The guest-physical page behind a kernel address (guest RAM only).
fn gpa_of(ctx: &ExitContext<'_>, gva: u64) -> Result<u64, Error> {
    ctx.inspect().translate(gva).map_err(|_| Error::BadAddress)
}

/// The largest range registered in one piece (a kernel's text is some tens
/// of MiB): what one hypercall may cost in walks and memory is bounded, even
/// when the guest maps terabytes of addresses onto the same RAM.
const MAX_RANGE_PAGES: u64 = (64 << 20) / 0x1000;

/// The guest-physical pages behind a guest-virtual range, all in guest RAM:
/// the guest's page tables may point anywhere (at the hypervisor's memory,
/// at the vTPM's window), and what is registered here is mapped into views.
fn pages_of(ctx: &ExitContext<'_>, r: Range) -> Result<Vec<u64>, Error> {
    if !r.is_empty() && (r.end - 1) / 0x1000 - r.start / 0x1000 >= MAX_RANGE_PAGES {
        return Err(Error::InvalidArgument);
    }
    r.pages().map(|p| gpa_of(ctx, p).map(|gpa| gpa & !0xfff)).collect()
}

fn control<'c>(ctx: &'c mut ExitContext<'_>) -> Result<&'c mut dyn GuestControl, Error> {
    match ctx.control.as_mut() {
        Some(c) => Ok(&mut **c),
        None => Err(Error::NotPermitted),
    }
}

fn map_err(e: RegisterError) -> Error {
    match e {
        RegisterError::Locked => Error::Locked,
        RegisterError::NotLocked => Error::NotPermitted,
        RegisterError::Overlap => Error::InvalidArgument,
        RegisterError::TooMany => Error::NoSpace,
        RegisterError::UnknownModule => Error::NotFound,
        RegisterError::Pinned => Error::NotPermitted,
    }
}

/// A NUL-terminated name at a guest address (at most 64 bytes read).
fn name_at(ctx: &ExitContext<'_>, gva: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for chunk in 0..4u64 {
        let bytes = read_guest(ctx, gva + chunk * 16, 16).ok()?;
        for b in bytes {
            if b == 0 {
                return Some(out);
            }
            out.push(b);
        }
    }
    Some(out)
}

/// [`guest_agent::Call::KernelRegister`].
pub fn register_kernel(ctx: &mut ExitContext<'_>, address: u64) -> Result<u64, Error> {
    if ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?.engine.is_locked() {
        return Err(Error::Locked);
    }
    let bytes = read_guest(ctx, address, core::mem::size_of::<abi::KernelLayout>())?;
    let message = wire::kernel_layout(&bytes).map_err(|_| Error::InvalidArgument)?;
    let mut layout = message.layout;
    layout.interrupt_stacks = interrupt_stacks(ctx, &message.cpu_stacks).map_err(|e| {
        log::warn!("guest {}: kernel layout refused: {e}", ctx.guest.name());
        Error::InvalidArgument
    })?;
    // The anchor: what the hypervisor sees in the processor.
    let lstar = ctx.host.read_msr(MSR_LSTAR);
    if let Err(e) = layout.validate(lstar) {
        log::warn!("guest {}: kernel layout refused: {e:?}", ctx.guest.name());
        return Err(Error::InvalidArgument);
    }
    // IDTR points at a read-only alias of idt_table: both must be one page.
    let idtr = ctx.vcpu.read(Field::IdtrBase);
    if gpa_of(ctx, idtr)? & !0xfff != gpa_of(ctx, layout.idt.start)? & !0xfff {
        log::warn!("guest {}: IDTR {idtr:#x} does not map the reported idt_table", ctx.guest.name());
        return Err(Error::InvalidArgument);
    }
    let gates = read_guest(ctx, layout.idt.start, 256 * 16)?;
    layout.gates = gates
        .chunks_exact(16)
        .enumerate()
        .filter(|(_, g)| g[5] & 0x80 != 0)
        .map(|(vector, g)| {
            let handler = u64::from(u16::from_le_bytes([g[0], g[1]]))
                | (u64::from(u16::from_le_bytes([g[6], g[7]])) << 16)
                | (u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32);
            (vector as u8, handler)
        })
        .collect();
    // The exported symbols, read from the kernel's own tables, each judged
    // by the kernel-API policy: an isolated module calls only what it allows.
    let state = ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?;
    let api = alloc::sync::Arc::clone(&state.api);
    // The exports trusted modules' relocations resolve against, by name.
    let mut symbols: alloc::collections::BTreeMap<alloc::string::String, Option<u64>> =
        state.trusted.iter().flat_map(|e| e.symbols()).map(|n| (n.into(), None)).collect();
    let mut found = alloc::collections::BTreeSet::new();
    let mut denied_apis = alloc::collections::BTreeMap::new();
    for table in [message.ksymtab, message.ksymtab_gpl] {
        let len = table.end.saturating_sub(table.start);
        if len % wire::KERNEL_SYMBOL_SIZE != 0 || len / wire::KERNEL_SYMBOL_SIZE > MAX_SYMBOLS {
            return Err(Error::InvalidArgument);
        }
        if len == 0 {
            continue;
        }
        let raw = read_guest(ctx, table.start, len as usize)?;
        for (value, name) in wire::ksymtab(table, &raw) {
            let n = name_at(ctx, name).unwrap_or_default();
            if let Some(slot) = core::str::from_utf8(&n).ok().and_then(|n| symbols.get_mut(n)) {
                // A name exported twice resolves only if both agree.
                if found.insert(n.clone()) {
                    *slot = Some(value);
                } else if *slot != Some(value) {
                    *slot = None;
                }
            }
            if !layout.text.contains(value) {
                continue; // exported data, not an entry point
            }
            // Thunks come from the kernel's own table too, so that a kernel
            // the agent does not know (renamed configs) cannot turn them
            // into entries that jump anywhere.
            match wire::export_kind(&n) {
                wire::ExportKind::IndirectThunk(reg) => layout.indirect_thunks[reg] = value,
                wire::ExportKind::ReturnThunk => layout.return_thunks.push(value),
                wire::ExportKind::Function => {
                    layout.entries.push(value);
                    if let Some(spec) = crate::integrity::deputy::spec(&n) {
                        layout.deputies.push((value, spec));
                    }
                    // A function exported under two names, one of them
                    // denied, is denied.
                    let class = api.classify(&n);
                    if class != api::Class::Allowed {
                        layout.denied_entries.push(value);
                        if api::ApiPolicy::fails_with_null(&n) {
                            layout.null_on_failure.push(value);
                        }
                        let name = alloc::string::String::from_utf8_lossy(&n).into_owned();
                        denied_apis.insert(value, api::DeniedApi { name, group: api.class_name(class).into() });
                    }
                }
            }
        }
    }
    layout.text_pages = pages_of(ctx, layout.text)?;
    // A page shared by two classes keeps the first, the more specific: the
    // syscall table lies in rodata, the IDT in .bss.
    let mut pages = alloc::collections::BTreeMap::new();
    for (range, class) in [
        (layout.syscall_table, PageClass::SyscallTable),
        (layout.idt, PageClass::Idt),
        (layout.text, PageClass::KernelText),
        (layout.rodata, PageClass::KernelReadOnly),
        (layout.ro_after_init, PageClass::KernelReadOnly),
    ]
    .into_iter()
    .chain(layout.sensitive.iter().map(|&r| (r, PageClass::Sensitive)))
    {
        for gpa in pages_of(ctx, range)? {
            pages.entry(gpa).or_insert(class);
        }
    }
    // Shared fields are judged by the physical page, like everything else.
    for r in &mut layout.shared {
        let gpa = gpa_of(ctx, r.start)?;
        *r = Range::new(gpa, gpa + r.len());
    }
    match layout.objects.as_mut() {
        Some(objects) => {
            let backing = struct_page_array(ctx, objects)?;
            objects.set_backing(backing);
            for gpa in objects.backing_pages() {
                pages.entry(gpa).or_insert(PageClass::Sensitive);
            }
            let names: Vec<&str> = objects.caches.iter().map(|&(_, name)| name).collect();
            log::info!(
                "guest {}: kernel data kept from modules: {} pages, of which {} hold the struct page array, with the per-CPU areas of {} CPUs less {} stacks each ({} interrupt and exception stacks, known at their own addresses); objects of the {} caches protected; {} shared fields",
                ctx.guest.name(),
                pages.values().filter(|&&c| c == PageClass::Sensitive).count(),
                objects.backing_pages().count(),
                layout.percpu_cpus,
                layout.percpu_stacks,
                layout.interrupt_stacks.len(),
                names.join(", "),
                layout.shared.len()
            );
        }
        None => log::warn!(
            "guest {}: the agent gave no struct page array: credentials and tasks in the kernel's heap are not protected from modules",
            ctx.guest.name()
        ),
    }
    let unlisted = denied_apis.values().filter(|d| d.group == "unlisted").count();
    log::info!(
        "guest {}: kernel layout registered: text {:#x}..{:#x}, {} exported entry points, {} denied by the API policy for {} ({unlisted} not in it), {} interrupt handlers, {} branch thunks, {} return thunks",
        ctx.guest.name(),
        layout.text.start,
        layout.text.end,
        layout.entries.len(),
        layout.denied_entries.len(),
        api.kernel,
        layout.gates.len(),
        layout.indirect_thunks.iter().filter(|&&t| t != 0).count(),
        layout.return_thunks.len()
    );
    let state = ctx.guest.integrity.as_mut().ok_or(Error::NotPermitted)?;
    state.engine.register_kernel(layout, pages).map_err(map_err)?;
    state.denied_apis = denied_apis;
    state.symbols = symbols;
    Ok(0)
}

/// Every CPU's interrupt and exception stacks at their own addresses, from
/// the tops each CPU keeps (its interrupt stack's pointer, its TSS's
/// interrupt stack table), each checked to map that CPU's backing store:
/// the stacks a module's handler runs on below the kernel's frames, which
/// no walk of the tasks finds. An interrupt stack is its whole store below
/// its top; an exception stack the mapped pages below its top, down to its
/// guard page (an IST top with nothing mapped below is unused: the #VC
/// stacks without SEV-ES).
fn interrupt_stacks(ctx: &ExitContext<'_>, cpus: &[wire::CpuStacks]) -> Result<Vec<Range>, alloc::string::String> {
    use alloc::format;
    let mut stacks = Vec::new();
    for (cpu, c) in cpus.iter().enumerate() {
        let store =
            |r: Range| pages_of(ctx, r).map_err(|_| format!("CPU {cpu}'s stack store at {:#x} is not mapped", r.start));
        let (irq_store, exception_store) = (store(c.stores[0])?, store(c.stores[1])?);
        let read =
            |at: u64| ctx.inspect().read_u64(at).map_err(|_| format!("CPU {cpu}'s stack top at {at:#x} is unreadable"));
        // x86 gives a CPU its interrupt stack when it first starts, and
        // keeps it: one never started yet (`maxcpus=`) has none to know.
        let pointer = read(c.irq_top)?;
        if pointer == 0 {
            return Err(format!(
                "CPU {cpu} has no interrupt stack yet (never started): start every CPU before the agent"
            ));
        }
        let top = pointer.wrapping_add(8);
        let irq = Range::new(top.wrapping_sub(c.stores[0].len()), top);
        let pages = (top & 0xfff == 0 && irq.start < top).then(|| mapped_pages(ctx, irq.start, irq.end)).flatten();
        if pages.map(|p| p.into_iter().map(|(_, gpa)| gpa).collect::<Vec<u64>>()).as_ref() != Some(&irq_store) {
            return Err(format!("CPU {cpu}'s interrupt stack below {top:#x} does not map its backing store"));
        }
        stacks.push(irq);
        let most = c.stores[1].len() / 0x1000;
        for i in 0..wire::IST_ENTRIES {
            let top = read(c.ist + 8 * i)?;
            if top == 0 {
                continue;
            }
            let below: Vec<u64> =
                (1..=most + 1).map_while(|n| top.checked_sub(n * 0x1000)).map_while(|va| page_of(ctx, va)).collect();
            if below.is_empty() {
                continue;
            }
            if top & 0xfff != 0 || below.len() as u64 > most || !below.iter().all(|g| exception_store.contains(g)) {
                return Err(format!("CPU {cpu}'s exception stack {i} below {top:#x} does not map its backing store"));
            }
            stacks.push(Range::new(top - 0x1000 * below.len() as u64, top));
        }
    }
    Ok(stacks)
}

/// The guest-physical pages behind the kernel's `struct page` array for
/// all of guest RAM, zero where the kernel maps none (holes).
fn struct_page_array(ctx: &ExitContext<'_>, objects: &ObjectMap) -> Result<Vec<u64>, Error> {
    let ram_end = ctx.guest.memory.backings().iter().map(|b| b.gpa.end).max().unwrap_or(0);
    let array = objects.array(ram_end);
    if array.len() / 0x1000 >= MAX_RANGE_PAGES {
        return Err(Error::InvalidArgument);
    }
    Ok(array
        .pages()
        .map(|p| gpa_of(ctx, p).ok().map(|g| g & !0xfff).filter(|&g| ctx.guest.memory.contains(g)).unwrap_or(0))
        .collect())
}

/// Reads a guest-physical u64, `None` outside guest RAM.
fn read_phys_u64(ctx: &ExitContext<'_>, at: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    ctx.guest.memory.read(&ctx.phys, at, &mut b).ok().map(|()| u64::from_le_bytes(b))
}

/// Reads a guest-physical page table, `None` outside guest RAM.
fn read_table(ctx: &ExitContext<'_>, at: u64) -> Option<tables::Table> {
    let mut t = [0u8; 4096];
    ctx.guest.memory.read(&ctx.phys, at, &mut t).ok()?;
    Some(core::array::from_fn(|i| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))))
}

/// Pages per top-level table: two with page-table isolation (the user
/// copy follows), as the agent says; one without a list to say it.
fn pgd_pages(ctx: &ExitContext<'_>) -> u64 {
    let layout = ctx.guest.integrity.as_ref().and_then(|i| i.engine.layout());
    layout.and_then(|l| l.processes).map_or(1, |p| p.pgd_pages)
}

/// The kernel's own page-table pages at every level (its PML4 and, below
/// its kernel half, which every process shares, the PDPTs, PDs and PTs;
/// with page-table isolation also the user copy's kernel half, the entry
/// trampolines' tables), which no module may write.
fn kernel_page_tables(ctx: &ExitContext<'_>) -> Result<Vec<u64>, Error> {
    let layout = ctx.guest.integrity.as_ref().and_then(|i| i.engine.layout()).ok_or(Error::NotPermitted)?;
    let root = gpa_of(ctx, layout.page_table)?;
    let roots: Vec<tables::Root> =
        (0..pgd_pages(ctx)).map(|i| tables::Root { table: root + i * 0x1000, first: 256 }).collect();
    Ok(tables::walk(&roots, |at| read_table(ctx, at), |t| ctx.guest.memory.contains(t), |_| false).tables)
}

/// Every process's page tables, found through `pgd_list`, below the
/// kernel's (which are followed by their own walk), and whether the list
/// and every table below it were read whole: only then may a table missing
/// from them lose its class.
/// Empty, and not whole, when the agent named no list.
fn process_page_tables(ctx: &ExitContext<'_>) -> (Vec<u64>, bool) {
    let Some(engine) = ctx.guest.integrity.as_ref().map(|i| &i.engine) else { return (Vec::new(), false) };
    let Some((list, objects)) = engine.layout().and_then(|l| Some((l.processes?, l.objects.as_ref()?))) else {
        return (Vec::new(), false);
    };
    let read = |at: u64| read_phys_u64(ctx, at);
    let Some(first) = gpa_of(ctx, list.head).ok().and_then(read) else { return (Vec::new(), false) };
    let (pgds, whole) = list.roots(first, objects, read);
    let roots: Vec<tables::Root> = pgds.into_iter().map(|table| tables::Root { table, first: 0 }).collect();
    let kernel = |t: u64| engine.class_of(t) == Some(PageClass::PageTable) && !engine.is_process_table(t);
    let walk = tables::walk(&roots, |at| read_table(ctx, at), |t| ctx.guest.memory.contains(t), kernel);
    (walk.tables, whole && walk.whole)
}

/// Tables the kernel allocated since the last look (vmalloc, a split of
/// the direct map, a new process's) are classified as page tables,
/// read-only to every module view from now on (a grant made before is
/// taken back); the class of a process's table that is gone is dropped.
/// Called on the agent's drain (every second), before a module is
/// registered, and before a decision on a process's table.
fn refresh_page_tables(ctx: &mut ExitContext<'_>) {
    if !ctx.guest.integrity.as_ref().is_some_and(|s| s.engine.is_locked()) {
        return;
    }
    let Ok(kernel) = kernel_page_tables(ctx) else { return };
    let Some(state) = ctx.guest.integrity.as_mut() else { return };
    let mut added = state.engine.add_page_tables(kernel);
    let (processes, whole) = process_page_tables(ctx);
    let (Some(state), Some(control)) = (ctx.guest.integrity.as_mut(), ctx.control.as_deref_mut()) else {
        return;
    };
    let (new, gone) = state.engine.set_process_tables(&processes, whole);
    added.extend_from_slice(&new);
    let modules: Vec<u32> = state.engine.modules().collect();
    for &page in &added {
        let _ = control.set_perms(View::Kernel, page, kernel_view_perms(PageClass::PageTable));
        for &m in &modules {
            take_back_write(control, m, page);
        }
    }
    // An untracked page again: the kernel's to use, executable unless a
    // module was ever granted a write to it.
    for &page in &gone {
        let perms = if state.engine.is_tainted(page) { Perms::RW } else { Perms::RWX };
        let _ = control.set_perms(View::Kernel, page, perms);
    }
    if !added.is_empty() || !gone.is_empty() {
        log::debug!("guest {}: page tables: {} protected, {} released", ctx.guest.name(), added.len(), gone.len());
    }
}

/// Finds every task's stack in the kernel's tables (see
/// [`tables::stacks`]), so that a module's write through another address
/// of a stack's page (the direct map) is judged as one to the stack. A
/// stack known before needs no mark again: a module that cleared the mark
/// through such an address does not unmake it. Called with the periodic
/// refresh of the page tables (the agent's drain, the lock, a module's
/// registration), not with the refreshes a fault on a table asks for.
fn refresh_stacks(ctx: &mut ExitContext<'_>) {
    let Some(engine) = ctx.guest.integrity.as_ref().map(|i| &i.engine) else { return };
    let Some(Ok(root)) = engine.layout().map(|l| gpa_of(ctx, l.page_table)) else { return };
    let (found, whole) = tables::stacks(
        root,
        |at| read_table(ctx, at),
        |t| ctx.guest.memory.contains(t),
        |va, gpa| engine.stack_page(gpa) == Some(va) || read_phys_u64(ctx, gpa) == Some(STACK_END_MAGIC),
    );
    stacks_found(ctx, found.iter().flat_map(tables::Stack::pages).collect(), whole);
}

/// Stack pages found, (linear, guest-physical) (`whole`: every task's):
/// a page newly known as a stack's is no module view's to write as a heap
/// page any more.
fn stacks_found(ctx: &mut ExitContext<'_>, found: Vec<(u64, u64)>, whole: bool) {
    let Some(engine) = ctx.guest.integrity.as_ref().map(|i| &i.engine) else { return };
    // Pages known before and not found: kept while their mapping holds.
    let mapped: Vec<(u64, u64)> = if whole {
        let found_gpas: alloc::collections::BTreeSet<u64> = found.iter().map(|&(_, g)| g & !0xfff).collect();
        engine.stack_pages().filter(|&(va, gpa)| !found_gpas.contains(&gpa) && maps_page(ctx, va, gpa)).collect()
    } else {
        Vec::new()
    };
    let (Some(state), Some(control)) = (ctx.guest.integrity.as_mut(), ctx.control.as_deref_mut()) else { return };
    let new = if whole {
        state.engine.set_stacks(found, |va, gpa| mapped.contains(&(va, gpa)))
    } else {
        state.engine.add_stacks(found)
    };
    let modules: Vec<u32> = state.engine.modules().collect();
    for &page in &new {
        for &m in &modules {
            take_back_write(control, m, page);
        }
    }
}

/// The stack's own linear address of guest-physical `gpa`, when its page is
/// a known stack page, whatever linear address a module reached it
/// through: a stack the last walk found, or one a module was entered on
/// (see [`enter_view`]), whose mapping still holds.
fn stack_alias(ctx: &mut ExitContext<'_>, gpa: u64) -> Option<u64> {
    let at = ctx.guest.integrity.as_ref()?.engine.stack_page(gpa)?;
    if maps_page(ctx, at, gpa) {
        return Some(at);
    }
    // The kernel freed that stack since the walk: its page is not one now.
    ctx.guest.integrity.as_mut()?.engine.forget_stack_page(gpa);
    None
}

/// Whether linear `va` still maps guest-physical `gpa`'s page: a stack page
/// known by its page is one only while its mapping holds.
fn maps_page(ctx: &ExitContext<'_>, va: u64, gpa: u64) -> bool {
    ctx.inspect().translate(va).is_ok_and(|g| g & !0xfff == gpa & !0xfff)
}

/// Makes the stack the CPU runs on (`rsp`) known by its pages: a task's
/// younger than the last walk (every CPU's interrupt and exception stacks
/// are known from the lock, see [`interrupt_stacks`]; should one be
/// unknown, it is taken here too), which a module's handler runs on below
/// the kernel's frames.
fn note_running_stack(ctx: &mut ExitContext<'_>, rsp: u64) {
    if ctx.guest.integrity.as_ref().is_none_or(|i| i.engine.knows_stack(rsp)) {
        return;
    }
    if let Some(pages) = stack_around(ctx, rsp) {
        stacks_found(ctx, pages, false);
    }
}

/// The pages of the stack `rsp` is on, (linear, guest-physical): a task's
/// 16 KiB (its end-of-stack mark), or else the run of mapped pages around
/// `rsp` between two unmapped ones, if it is no longer than a stack (an
/// interrupt stack is vmap'd, with guard pages; exception stacks sit
/// between guard pages in the CPU entry area). `None` otherwise (the
/// direct map, the kernel image).
///
/// Such a stack is page-aligned, not 16 KiB-aligned, and unless its extent
/// is known the return points judge its frames within the 16 KiB-aligned
/// window of `rsp` (see [`crate::integrity::returns::ReturnPoints::stack_of`]):
/// of the run, only the pages in that window are taken, those the live
/// return points can speak for. The rest stays judged by its linear
/// address alone.
fn stack_around(ctx: &ExitContext<'_>, rsp: u64) -> Option<Vec<(u64, u64)>> {
    let mapped = |va: u64| page_of(ctx, va);
    let max = tables::STACK_PAGES as u64;
    let window = ctx.guest.integrity.as_ref()?.engine.stack_of(rsp);
    let (low, high) = if is_task_stack(ctx, rsp) {
        (window.start, window.end)
    } else {
        let top = rsp & !0xfff;
        let low = (1..=max).map(|i| top.wrapping_sub(0x1000 * i)).find(|&va| mapped(va).is_none())? + 0x1000;
        let high = (1..=max).map(|i| top.wrapping_add(0x1000 * i)).find(|&va| mapped(va).is_none())?;
        if (high - low) / 0x1000 > max {
            return None;
        }
        (low.max(window.start), high.min(window.end))
    };
    mapped_pages(ctx, low, high)
}

/// The pages `low..high`, (linear, guest-physical), if all are mapped.
fn mapped_pages(ctx: &ExitContext<'_>, low: u64, high: u64) -> Option<Vec<(u64, u64)>> {
    (low..high).step_by(0x1000).map(|va| Some((va, page_of(ctx, va)?))).collect()
}

/// The guest-physical page linear `va` maps to, in the guest's tables.
fn page_of(ctx: &ExitContext<'_>, va: u64) -> Option<u64> {
    ctx.inspect().translate(va).ok().map(|g| g & !0xfff)
}

/// The rights a tracked page has in the kernel view. Read-only kernel data
/// keeps execute: the vDSO, which user space runs, lives in rodata, and
/// without mode-based execute control EPT cannot tell user from kernel.
/// The guest's own page tables keep it non-executable for the kernel.
fn kernel_view_perms(class: PageClass) -> Perms {
    match class {
        PageClass::KernelText | PageClass::KernelReadOnly | PageClass::SyscallTable | PageClass::Idt => Perms::RX,
        PageClass::PageTable | PageClass::Sensitive | PageClass::ModuleData(_) => Perms::RW,
        PageClass::ModuleCode(_) => Perms::READ,
    }
}

/// Page rights changed in the views by a request, to put back if the
/// request fails half-way: a refused hypercall leaves the views (and the
/// engine) as they were.
#[derive(Default)]
struct Undo {
    perms: Vec<(View, u64, Option<Perms>)>,
    created: Option<u32>,
}

impl Undo {
    fn set(&mut self, control: &mut dyn GuestControl, view: View, page: u64, perms: Perms) -> Result<(), ControlError> {
        let before = control.perms(view, page);
        control.set_perms(view, page, perms)?;
        self.perms.push((view, page, before));
        Ok(())
    }

    fn create_view(&mut self, control: &mut dyn GuestControl, module: u32) -> Result<(), ControlError> {
        control.create_view(module)?;
        self.created = Some(module);
        Ok(())
    }

    fn revert(self, control: &mut dyn GuestControl) {
        if let Some(m) = self.created {
            control.destroy_view(m);
        }
        for (view, page, before) in self.perms.into_iter().rev() {
            if self.created.is_none_or(|m| view != View::Module(m)) {
                // Back to rights the page had: no new table is needed.
                let _ = control.set_perms(view, page, before.unwrap_or(Perms::empty()));
            }
        }
    }
}

/// Why the lock was refused.
#[derive(Debug)]
pub enum LockRefused {
    /// A bad call: nothing changed, and the guest may try again.
    Call(Error),
    /// The agent is not the code `ctvm.policy` pins: nothing may drive
    /// the views, so enforcement cannot start.
    Agent(alloc::string::String),
}

/// [`guest_agent::Call::KernelLock`]: pins the agent, whose own
/// registration `agent` points to, then locks the layout; returns the
/// agent's module id.
pub fn lock(ctx: &mut ExitContext<'_>, agent: u64) -> Result<u64, LockRefused> {
    if ctx.guest.integrity.as_ref().is_some_and(|s| s.engine.is_locked()) {
        return Err(LockRefused::Call(Error::Locked));
    }
    let module = read_module(ctx, agent).map_err(LockRefused::Call)?;
    if module.info.name != abi::AGENT_NAME {
        return Err(LockRefused::Agent(alloc::format!(
            "the module locking is {:?}, not {}",
            module.info.name,
            abi::AGENT_NAME
        )));
    }
    match trust_verdict(ctx, &module.info).map_err(LockRefused::Call)? {
        Some(Ok(())) => {}
        None => {
            return Err(LockRefused::Agent(alloc::format!(
                "{} is not named in trust= with a ctvm.policy entry",
                abi::AGENT_NAME
            )))
        }
        Some(Err(m)) => return Err(LockRefused::Agent(alloc::format!("its code has {m}"))),
    }
    let agent_pages: Vec<u64> = module.code.iter().chain(&module.data).copied().collect();
    let (undo, added) = lock_layout(ctx, &agent_pages).map_err(LockRefused::Call)?;
    let pinned = add_module(ctx, module, true, None).and_then(|id| {
        let state = ctx.guest.integrity.as_mut().ok_or(Error::NotPermitted)?;
        state.engine.set_agent(id as u32).map_err(map_err).map(|()| id)
    });
    let (Some(state), Some(control)) = (ctx.guest.integrity.as_mut(), ctx.control.as_deref_mut()) else {
        return Err(LockRefused::Call(Error::NotPermitted));
    };
    let id = match pinned {
        Ok(id) => id,
        Err(e) => {
            undo.revert(control);
            state.engine.revert_lock(&added);
            return Err(LockRefused::Call(e));
        }
    };
    control.guard_control_registers(CR0_WP, CR4_SMEP | CR4_SMAP);
    control.trap_descriptor_tables();
    control.trap_msr_writes(&GUARDED_MSRS);
    let kernel = state.engine.pages().filter(|&(_, c)| c == PageClass::PageTable).count();
    refresh_page_tables(ctx);
    refresh_stacks(ctx);
    // Every CPU's interrupt and exception stacks, known by their pages from
    // now on (a later walk keeps them while they are mapped).
    let interrupt_stacks =
        ctx.guest.integrity.as_ref().and_then(|s| s.engine.layout()).map(|l| l.interrupt_stacks.clone());
    let pages = interrupt_stacks
        .unwrap_or_default()
        .iter()
        .filter_map(|r| mapped_pages(ctx, r.start, r.end))
        .flatten()
        .collect();
    stacks_found(ctx, pages, false);
    let engine = ctx.guest.integrity.as_ref().map(|s| &s.engine);
    let processes = match engine.filter(|e| e.layout().is_some_and(|l| l.processes.is_some())) {
        Some(e) => alloc::format!("{} of processes", e.process_table_count()),
        None => "none of processes: the agent named no pgd_list".into(),
    };
    log::info!(
        "guest {}: kernel layout locked, agent pinned; protections on ({kernel} kernel page tables, {processes})",
        ctx.guest.name()
    );
    measure_lock(ctx);
    Ok(id)
}

/// The console line for a guest configured with run-time integrity that
/// stops without its agent ever having locked: it ran without module
/// isolation (the agent was kept from loading, or failed), and nothing
/// else would say so. `None` when it locked, or asked for no integrity.
pub fn never_locked(guest: &crate::guest::Guest) -> Option<alloc::string::String> {
    let mode = crate::tpm::config_event::IntegrityMode::of(Some(guest.config.integrity?)).as_str();
    if guest.integrity.as_ref().is_some_and(|s| s.engine.is_locked()) {
        return None;
    }
    Some(alloc::format!(
        "guest {}: ran without module isolation: integrity={mode}, but its agent never locked the kernel layout \
         (its quotes show no lock event)",
        guest.name()
    ))
}

/// Extends the lock event into the guest's PCR 11 and its event log: the
/// one thing in a quote that says module isolation started, and which a
/// guest whose agent never locked cannot add (PCR 11 takes no guest
/// extend). Should it fail, the lock stands (the guest is protected) and
/// the console says that its quotes will not show it.
fn measure_lock(ctx: &mut ExitContext<'_>) {
    use crate::tpm::config_event::{lock_event, IntegrityMode};
    let Some(state) = ctx.guest.integrity.as_ref() else { return };
    let mode = IntegrityMode::of(Some(state.engine.mode()));
    // The digest the lock just checked the agent's code against.
    let Some(agent) = state.trusted.iter().find(|e| e.name == abi::AGENT_NAME).map(|e| e.sha256) else { return };
    let name = ctx.guest.config.name.clone();
    // A guest without a vTPM quotes nothing to mislead a verifier with.
    let Some(vtpm) = ctx.guest.vtpm.as_mut() else { return };
    match vtpm.measure_event(&lock_event(vtpm_core::sha1, &agent, mode)) {
        Ok(()) => log::info!("guest {name}: lock measured into PCR 11 (ctvm.lock v1, mode={})", mode.as_str()),
        Err(e) => log::error!(
            "guest {name}: the lock could not be measured into PCR 11 ({e:?}): its quotes will say the agent never locked"
        ),
    }
}

/// Locks the layout in the engine and the kernel view; the caller pins
/// the agent, or reverts both.
fn lock_layout(ctx: &mut ExitContext<'_>, agent: &[u64]) -> Result<(Undo, Vec<u64>), Error> {
    let mut tables = kernel_page_tables(ctx)?;
    // The agent's own pages are no page tables in a sane kernel; should the
    // walk say so, they stay the agent's (protected from modules either
    // way), and the console says which.
    tables.retain(|&t| {
        let agents = agent.contains(&(t & !0xfff));
        if agents {
            log::warn!("guest {}: page {t:#x} is both the agent's and a kernel page table", ctx.guest.name());
        }
        !agents
    });
    let (Some(state), Some(control)) = (ctx.guest.integrity.as_mut(), ctx.control.as_deref_mut()) else {
        return Err(Error::NotPermitted);
    };
    if state.engine.is_locked() {
        return Err(Error::Locked);
    }
    // What the lock protects: the registered pages, and the kernel's page
    // tables where they are not registered as something else.
    let mut pages: alloc::collections::BTreeMap<u64, PageClass> = state.engine.pages().collect();
    for &t in &tables {
        pages.entry(t & !0xfff).or_insert(PageClass::PageTable);
    }
    let mut undo = Undo::default();
    for (&page, &class) in &pages {
        if undo.set(control, View::Kernel, page, kernel_view_perms(class)).is_err() {
            undo.revert(control);
            return Err(Error::NoSpace);
        }
    }
    match state.engine.lock(tables) {
        Ok(added) => Ok((undo, added)),
        Err(e) => {
            undo.revert(control);
            Err(map_err(e))
        }
    }
}

/// A module's guest-physical pages: its code, its data, and those of its
/// data that hold its `struct module`.
#[derive(Clone, Copy)]
struct Placement<'a> {
    code: &'a [u64],
    data: &'a [u64],
    shielded: &'a [u64],
}

/// Maps a new module's pages into the views. Pages that other modules'
/// views were granted while nobody owned them are taken back first: they
/// are this module's now. Its own view may read, not write, the pages of
/// its data in `shielded` (its `struct module`'s).
fn module_views(
    control: &mut dyn GuestControl,
    undo: &mut Undo,
    id: u32,
    trusted: bool,
    others: &[u32],
    pages: Placement<'_>,
) -> Result<(), ControlError> {
    let Placement { code, data, shielded } = pages;
    for &other in others {
        for &p in code.iter().chain(data) {
            if control.perms(View::Module(other), p).is_some() {
                undo.set(control, View::Module(other), p, Perms::empty())?;
            }
        }
    }
    // Its data is never executable for the kernel (W^X across views).
    for &p in data {
        undo.set(control, View::Kernel, p, Perms::RW)?;
    }
    if trusted {
        // Runs in the kernel view; its code is not writable there either.
        for &p in code {
            undo.set(control, View::Kernel, p, Perms::RX)?;
        }
        return Ok(());
    }
    undo.create_view(control, id)?;
    for &p in code {
        undo.set(control, View::Module(id), p, Perms::RX)?;
        undo.set(control, View::Kernel, p, Perms::READ)?;
    }
    for &p in data {
        let own = if shielded.contains(&p) { Perms::READ } else { Perms::RW };
        undo.set(control, View::Module(id), p, own)?;
    }
    Ok(())
}

/// [`guest_agent::Call::ModuleRegister`]. A module the hypervisor cannot
/// isolate is reported (`kind=registration-refused`): the agent then
/// vetoes its load, so no module runs unisolated.
pub fn register_module(ctx: &mut ExitContext<'_>, address: u64) -> Result<u64, Error> {
    let result = register_module_checked(ctx, address);
    if let Err(e) = result {
        let rip = ctx.vcpu.read(Field::Rip);
        if let Some(state) = ctx.guest.integrity.as_mut().filter(|s| s.engine.is_locked()) {
            let v = state.engine.record_denied(ViolationKind::RegistrationRefused, View::Kernel, rip, address);
            log::warn!("guest {}: a module could not be isolated ({e:?}): its load is vetoed", ctx.guest.name());
            report(ctx, &v);
        }
    }
    result
}

/// A module's registration, read in once: nothing the guest changes
/// afterwards alters what was checked.
struct ModuleRead {
    info: ModuleInfo,
    code: Vec<u64>,
    data: Vec<u64>,
}

fn read_module(ctx: &ExitContext<'_>, address: u64) -> Result<ModuleRead, Error> {
    let bytes = read_guest(ctx, address, core::mem::size_of::<abi::ModuleInfo>())?;
    let message = wire::module_info(&bytes).map_err(|_| Error::InvalidArgument)?;
    let mut info = message.info;
    let raw = read_guest(ctx, message.entries_address, message.entry_count as usize * 8)?;
    info.entries = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    let fixup_bytes = message.fixup_count as usize * core::mem::size_of::<abi::Fixup>();
    if fixup_bytes > 0 {
        info.fixups = wire::fixups(&read_guest(ctx, message.fixups_address, fixup_bytes)?, &info.code);
    }
    for table in message.ksymtabs.iter().filter(|t| !t.is_empty()) {
        let bytes = read_guest(ctx, table.start, table.len() as usize)?;
        let in_code = |a: u64| info.code.iter().any(|r| r.contains(a));
        info.exports.extend(wire::ksymtab(*table, &bytes).into_iter().map(|(value, _)| value).filter(|&v| in_code(v)));
    }
    if module_state(ctx, info.module_struct.start)? != abi::module_state::COMING {
        return Err(Error::InvalidArgument);
    }
    let mut code = Vec::new();
    for r in &info.code {
        code.extend(pages_of(ctx, *r)?);
    }
    let mut data = Vec::new();
    for r in &info.data {
        data.extend(pages_of(ctx, *r)?);
    }
    Ok(ModuleRead { info, code, data })
}

/// The kernel's `state` of the `struct module` at `address`.
fn module_state(ctx: &ExitContext<'_>, address: u64) -> Result<u32, Error> {
    let bytes = read_guest(ctx, address, 4)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn register_module_checked(ctx: &mut ExitContext<'_>, address: u64) -> Result<u64, Error> {
    let module = read_module(ctx, address)?;
    let verdict = trust_verdict(ctx, &module.info)?;
    let mode = ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?.engine.mode;
    // Audit mode reports a mismatch and trusts the module all the same.
    let (trusted, mismatch) = match verdict {
        None => (false, None),
        Some(Ok(())) => (true, None),
        Some(Err(m)) => (mode == crate::integrity::Mode::Audit, Some(m)),
    };
    let id = add_module(ctx, module, trusted, mismatch)?;
    // The process loading the module may be younger than the last walk:
    // its tables are protected before the module's code runs.
    refresh_page_tables(ctx);
    refresh_stacks(ctx);
    Ok(id)
}

/// Adds a module that was read and judged to the engine and the views.
fn add_module(
    ctx: &mut ExitContext<'_>,
    module: ModuleRead,
    trusted: bool,
    mismatch: Option<Mismatch>,
) -> Result<u64, Error> {
    let ModuleRead { info, code, data } = module;
    let rip = ctx.vcpu.read(Field::Rip);
    let guest = alloc::string::String::from(ctx.guest.name());
    let (Some(state), Some(control)) = (ctx.guest.integrity.as_mut(), ctx.control.as_deref_mut()) else {
        return Err(Error::NotPermitted);
    };
    let name = info.name.clone();
    let fixups = info.fixups.len();
    let code_start = info.code.first().map_or(0, |r| r.start);
    let id = state.engine.register_module(info, trusted, &code, &data).map_err(|e| {
        // Say which page clashes, and with what: an overlap is either a
        // lying registration or a page the hypervisor misclassified.
        if let Some((page, class)) = code.iter().chain(&data).find_map(|&p| Some((p, state.engine.class_of(p)?))) {
            log::warn!("module {}: page {:#x} is already {:?}", name, page, class);
        }
        map_err(e)
    })?;
    let others: Vec<u32> = state.engine.modules().filter(|&m| m != id).collect();
    let shielded = state.engine.shielded_pages(id);
    let mut undo = Undo::default();
    if module_views(
        control,
        &mut undo,
        id,
        trusted,
        &others,
        Placement { code: &code, data: &data, shielded: &shielded },
    )
    .is_err()
    {
        undo.revert(control);
        let _ = state.engine.unregister_module(id);
        return Err(Error::NoSpace);
    }
    // Reported once the module is in place, so a refused call records nothing.
    if let Some(m) = mismatch {
        log::warn!("guest {guest}: module {name} is named in trust= but its code has {m}");
        let v = state.engine.record(crate::integrity::ViolationKind::CodeDigest, View::Module(id), rip, code_start);
        report(ctx, &v);
    }
    log::info!(
        "guest {guest}: module {name} registered as {} ({} code pages, {} data pages, {fixups} fault fixups)",
        if trusted { "trusted" } else { "untrusted, isolated" },
        code.len(),
        data.len()
    );
    Ok(u64::from(id))
}

/// Whether a module may run in the kernel view: `None` if the guest does
/// not trust its name, else whether its code is the code the policy pins.
fn trust_verdict(ctx: &ExitContext<'_>, info: &ModuleInfo) -> Result<Option<Result<(), Mismatch>>, Error> {
    let state = ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?;
    let Some(entry) = state.trusted.iter().find(|e| e.name == info.name) else {
        return Ok(None);
    };
    let s = &info.sections;
    let symbol = |name: &str| state.symbols.get(name).copied().flatten();
    let is_return_thunk = |a: u64| state.engine.layout().is_some_and(|l| l.is_return_thunk(a));
    let kernel = Kernel { symbol: &symbol, is_return_thunk: &is_return_thunk };
    if !entry.sizes_match(s) {
        // Sizes alone decide; nothing is read for a module of another size.
        return Ok(Some(entry.check(s, &mut [], &kernel)));
    }
    // Bounded by the policy's sizes, which match.
    let mut code = Vec::new();
    for r in [s.text, s.init, s.rodata, s.ro_after_init].iter().filter(|r| !r.is_empty()) {
        code.extend(read_guest(ctx, r.start, r.len() as usize)?);
    }
    Ok(Some(entry.check(s, &mut code, &kernel)))
}

/// Returns a module's pages to the kernel view and drops them from its
/// view. Untrusted code is scrubbed first, so that no page that held it
/// becomes executable for the kernel; untrusted data stays non-executable
/// (the engine keeps it tainted).
fn release_pages(ctx: &mut ExitContext<'_>, id: u32, trusted: bool, code: &[u64], data: &[u64]) {
    if !trusted {
        for &p in code {
            let _ = ctx.guest.memory.zero(&ctx.phys, p, 0x1000);
        }
    }
    let data_perms = if trusted { Perms::RWX } else { Perms::RW };
    let Ok(control) = control(ctx) else { return };
    for (&p, perms) in code.iter().map(|p| (p, Perms::RWX)).chain(data.iter().map(|p| (p, data_perms))) {
        let _ = control.set_perms(View::Kernel, p, perms);
        let _ = control.set_perms(View::Module(id), p, Perms::empty());
    }
}

/// Whether the kernel's own `struct module` of module `id` is in `state`:
/// a report that a module is live or going must be the kernel's news, not
/// a call forged through the agent's code.
fn kernel_says(ctx: &ExitContext<'_>, id: u32, state: u32) -> Result<(), Error> {
    let engine = &ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?.engine;
    let address = engine.module_struct(id).ok_or(Error::NotFound)?;
    if module_state(ctx, address)? != state {
        log::warn!("guest {}: module {id} is not in the state its report says ({state}): refused", ctx.guest.name());
        return Err(Error::InvalidArgument);
    }
    Ok(())
}

/// Whether the hypercall being served comes from the pinned agent's code,
/// fetched through the page it is registered at. Before the lock there is
/// no agent yet: the measured kernel's init registers its layout.
pub fn from_agent(ctx: &ExitContext<'_>) -> bool {
    let Some(state) = ctx.guest.integrity.as_ref() else {
        return false;
    };
    if !state.engine.is_locked() {
        return true;
    }
    let rip = ctx.vcpu.read(Field::Rip);
    gpa_of(ctx, rip).is_ok_and(|gpa| state.engine.is_agent_code(rip, gpa))
}

/// [`guest_agent::Call::ModuleLive`].
pub fn module_live(ctx: &mut ExitContext<'_>, id: u32) -> Result<u64, Error> {
    let init = {
        let state = ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?;
        state.engine.module_init(id).ok_or(Error::NotFound)?
    };
    kernel_says(ctx, id, abi::module_state::LIVE)?;
    let mut pages = Vec::new();
    for r in init {
        pages.extend(pages_of(ctx, r).unwrap_or_default());
    }
    let state = ctx.guest.integrity.as_mut().ok_or(Error::NotPermitted)?;
    // The init ranges translate anew, to anything by now: only the module's
    // own pages go back to the kernel view.
    let (mut code, mut data) = (Vec::new(), Vec::new());
    for p in pages {
        match state.engine.class_of(p) {
            Some(PageClass::ModuleCode(m)) if m == id => code.push(p),
            Some(PageClass::ModuleData(m)) if m == id => data.push(p),
            _ => {}
        }
    }
    let freed: Vec<u64> = code.iter().chain(&data).copied().collect();
    let trusted = state.engine.is_trusted(id);
    state.engine.module_live(id, &freed).map_err(map_err)?;
    release_pages(ctx, id, trusted, &code, &data);
    Ok(0)
}

/// [`guest_agent::Call::ModuleUnregister`].
pub fn unregister_module(ctx: &mut ExitContext<'_>, id: u32) -> Result<u64, Error> {
    kernel_says(ctx, id, abi::module_state::GOING)?;
    let state = ctx.guest.integrity.as_mut().ok_or(Error::NotPermitted)?;
    let (mut code, mut data) = (Vec::new(), Vec::new());
    for (p, c) in state.engine.pages() {
        match c {
            PageClass::ModuleCode(m) if m == id => code.push(p),
            PageClass::ModuleData(m) if m == id => data.push(p),
            _ => {}
        }
    }
    let trusted = state.engine.is_trusted(id);
    state.engine.unregister_module(id).map_err(map_err)?;
    if state.local.view == View::Module(id) {
        state.local.view = View::Kernel;
    }
    release_pages(ctx, id, trusted, &code, &data);
    if let Ok(control) = control(ctx) {
        if !trusted {
            let _ = control.activate_view(View::Kernel).ok();
            control.destroy_view(id);
        }
    }
    Ok(0)
}

/// [`guest_agent::Call::ViolationsRead`]: returns how many records were written.
pub fn read_violations(ctx: &mut ExitContext<'_>, buffer: u64, count: u32) -> Result<u64, Error> {
    let log = &ctx.guest.integrity.as_ref().ok_or(Error::NotPermitted)?.engine.violations;
    let mut bytes = Vec::with_capacity(log.len().min(count as usize) * VIOLATION_RECORD_SIZE);
    let records = log.peek(count as usize).map(|r| bytes.extend_from_slice(&r.to_bytes())).count();
    let dropped = log.dropped;
    ctx.access().write(buffer, &bytes).map_err(|_| Error::BadAddress)?;
    // Records leave the log only once the agent has them.
    let state = ctx.guest.integrity.as_mut().ok_or(Error::NotPermitted)?;
    state.engine.violations.take(records).for_each(drop);
    ctx.vcpu.regs().rbx = dropped;
    refresh_page_tables(ctx);
    refresh_stacks(ctx);
    revoke_heap_grants(ctx);
    Ok(records as u64)
}

/// [`guest_agent::Call::StackNew`]: a task's stack the moment the kernel
/// made it, before any module can know the task. Without this, a module
/// that made a kthread would write the new task's stack through the
/// direct map as a heap page until the next walk (scenario attack
/// `atk_young`).
pub fn new_stack(ctx: &mut ExitContext<'_>, base: u64) -> Result<u64, Error> {
    if ctx.guest.integrity.as_ref().and_then(|i| i.engine.layout()).is_none() {
        return Err(Error::NotPermitted);
    }
    if !is_task_stack(ctx, base) {
        return Err(Error::InvalidArgument);
    }
    let pages = mapped_pages(ctx, base, base + 0x4000).ok_or(Error::BadAddress)?;
    stacks_found(ctx, pages, false);
    Ok(0)
}

/// A module's branch out of its code (to `page`) on a stack other than the
/// one its view was entered on (see [`crate::integrity::Engine::pivoted`]):
/// refused with #GP in enforce mode (reported as the #GP leaves the
/// module), reported and let go in audit mode.
fn stack_pivot(ctx: &mut ExitContext<'_>, fault: &Fault, page: u64) -> Option<Action> {
    let (View::Module(m), super::Access::Execute) = (fault.view, fault.access) else { return None };
    let state = ctx.guest.integrity.as_mut()?;
    if state.engine.class_of(page) == Some(PageClass::ModuleCode(m))
        || !state.engine.is_pivoted(fault.rsp, state.local.stack)
    {
        return None;
    }
    if state.engine.mode() == crate::integrity::Mode::Enforce {
        return Some(general_protection(ctx));
    }
    let v = state.engine.pivoted(m, fault.rip, fault.rsp, state.local.stack)?;
    report(ctx, &v);
    None
}

/// A module's write-through call that may run: held, once let go, until it
/// returns (see [`crate::integrity::returns::InFlight`]). Guest-physical,
/// a piece a page.
struct Deputy {
    m: u32,
    inputs: Vec<Range>,
    writes: Vec<Range>,
}

/// A module's branch to a write-through kernel function (`memcpy`,
/// `kobject_del`, ...): `Err` with the refusal when it would write what the
/// module could not itself, or what another such call still running was
/// judged by, or when it is judged by what one writes; `Ok` with the call to
/// hold; `None` when the branch is judged as any other.
fn deputy_check(ctx: &mut ExitContext<'_>, fault: &Fault) -> Option<Result<Deputy, Outcome>> {
    let (View::Module(m), super::Access::Execute) = (fault.view, fault.access) else {
        return None;
    };
    let engine = &ctx.guest.integrity.as_ref()?.engine;
    let target = engine.call_target(fault);
    let spec = engine.deputy_spec(target)?;
    let read = |at: u64, len: usize| read_guest(ctx, at, len).ok();
    let refuse = |ctx: &mut ExitContext<'_>, kind, at| {
        ctx.guest.integrity.as_mut().map(|s| Err(s.engine.deputy_refused(fault, m, kind, at)))
    };
    let Some(judged) = crate::integrity::deputy::destinations(spec, &fault.gprs, &read) else {
        return refuse(ctx, ViolationKind::DeputyWrite, fault.gprs[7]);
    };
    // A destination where a dead task's stack was is judged as what is
    // there now (the caller's own stack is alive).
    let own = ctx.guest.integrity.as_ref()?.engine.stack_of(fault.rsp);
    for va in judged.writes.iter().flat_map(|r| r.pieces().map(|p| p.start)) {
        if !own.contains(va) && ctx.guest.integrity.as_ref()?.engine.crossings_on_task_window(va) {
            if let Ok(gpa) = ctx.inspect().translate(va) {
                forget_if_dead_stack(ctx, va, gpa);
            }
        }
    }
    // A destination on a plain page no walk has seen may be a table the
    // kernel left untyped: walked for, as a grant would be.
    let mut walk = false;
    let mut writes = Vec::new();
    let mut blocked = judged.writes.iter().find_map(|range| first_unwritable(ctx, m, range, &mut walk, &mut writes));
    if blocked.is_none() && walk {
        refresh_page_tables(ctx);
        ctx.guest.integrity.as_mut()?.engine.stats.table_walks += 1;
        writes.clear();
        blocked = judged.writes.iter().find_map(|range| first_unwritable(ctx, m, range, &mut false, &mut writes));
    }
    if let Some(at) = blocked {
        return refuse(ctx, ViolationKind::DeputyWrite, at);
    }
    let mut inputs = Vec::new();
    for &range in &judged.inputs {
        if let Err(at) = physical_pieces(ctx, range, &mut inputs) {
            return refuse(ctx, ViolationKind::DeputyWrite, at);
        }
    }
    if let Some(gpa) = ctx.guest.integrity.as_ref()?.engine.call_conflict(&inputs, &writes) {
        // Reported at the guest-virtual address of that byte.
        let va = judged.inputs.iter().copied().chain(judged.writes.iter()).flat_map(|r| r.pieces()).find_map(|piece| {
            let at = ctx.inspect().translate(piece.start).ok()?;
            Range::new(at, at + piece.len()).contains(gpa).then(|| piece.start + (gpa - at))
        });
        return refuse(ctx, ViolationKind::DeputyInput, va.unwrap_or(fault.gprs[7]));
    }
    Some(Ok(Deputy { m, inputs, writes }))
}

/// The guest-physical pieces of guest-virtual `range`, a page at a time;
/// `Err` with the first address that does not translate.
fn physical_pieces(ctx: &ExitContext<'_>, range: Range, out: &mut Vec<Range>) -> Result<(), u64> {
    for piece in range.pieces() {
        let gpa = ctx.inspect().translate(piece.start).map_err(|_| piece.start)?;
        out.push(Range::new(gpa, gpa + piece.len()));
    }
    Ok(())
}

/// A write-through call let go: held until it returns, and no module view
/// keeps a right to write what it was judged by (a module's next write
/// there is judged, and refused or let through beside it).
fn hold_call(ctx: &mut ExitContext<'_>, fault: &Fault, call: Deputy) {
    let Some(state) = ctx.guest.integrity.as_mut() else { return };
    let mut pages: Vec<u64> = call.inputs.iter().map(|r| r.start & !0xfff).collect();
    pages.dedup();
    state.engine.hold_call(call.m, fault.rsp.wrapping_add(8), call.inputs, call.writes);
    if pages.is_empty() {
        return;
    }
    let modules: Vec<u32> = state.engine.modules().collect();
    let Some(control) = ctx.control.as_deref_mut() else { return };
    for page in pages {
        for &m in &modules {
            if control.perms(View::Module(m), page).is_some_and(|p| p.contains(Perms::WRITE)) {
                take_back_write(control, m, page);
            }
        }
    }
}

/// The first address of `range` (guest-virtual, as the kernel would
/// write it) that module `m` could not write itself, if any. A page its
/// view already maps writable was judged when it was granted (its own
/// data, a heap page), and grants are taken back whenever a page changes
/// class: no need to read its `struct page` again. `walk` is set when a
/// page judged writable may be a table no walk has seen; `physical` gets
/// the guest-physical piece of each page judged.
fn first_unwritable(
    ctx: &ExitContext<'_>,
    m: u32,
    range: Range,
    walk: &mut bool,
    physical: &mut Vec<Range>,
) -> Option<u64> {
    let engine = &ctx.guest.integrity.as_ref()?.engine;
    let control = ctx.control.as_deref();
    range.pieces().find_map(|piece| {
        let from = piece.start;
        let Ok(gpa) = ctx.inspect().translate(from) else {
            return Some(from);
        };
        let bytes = Range::new(gpa, gpa + piece.len());
        physical.push(bytes);
        if control.and_then(|c| c.perms(View::Module(m), gpa & !0xfff)).is_some_and(|p| p.contains(Perms::WRITE)) {
            return None;
        }
        let untracked = engine.class_of(gpa).is_none();
        let task_stack = untracked && is_task_stack(ctx, from);
        // As for a module's own write (see [`ept_violation`]).
        let alias = if untracked && !engine.is_stack_address(from, task_stack) {
            engine.stack_page(gpa).filter(|&at| maps_page(ctx, at, gpa))
        } else {
            None
        };
        if let Some(ok) = engine.stack_may_write(m, piece, task_stack, alias) {
            return (!ok).then_some(from);
        }
        if untracked && probe_list_on(ctx, gpa & !0xfff).is_some_and(|list| list.overlaps(&bytes)) {
            return Some(from);
        }
        let object = if untracked { kernel_object(ctx, gpa & !0xfff) } else { None };
        if !engine.module_may_write(m, bytes, object) {
            return Some(from);
        }
        *walk |= untracked && may_be_untyped_table(ctx, gpa & !0xfff);
        None
    })
}

/// The protected kernel object guest-physical `page` holds, if any (see
/// [`ObjectMap::object_at`]); pages outside guest RAM hold none.
fn kernel_object(ctx: &ExitContext<'_>, page: u64) -> Option<&'static str> {
    let objects = ctx.guest.integrity.as_ref()?.engine.layout()?.objects.as_ref()?;
    if !ctx.guest.memory.contains(page) {
        return None;
    }
    objects.object_at(page, |at| read_phys_u64(ctx, at)).unwrap_or(Some("unknown"))
}

/// Whether guest RAM `page` looks like a top-level page table made since
/// the last walk: its `struct page` (or, with page-table isolation, that
/// of the kernel copy before it) names an `mm_struct` where x86 keeps a
/// table's process (`pt_mm`). The kernel puts such a table on `pgd_list`
/// before any process runs on it, but gives it no page type; a walk then
/// decides. A page that merely looks like one costs a walk, no refusal.
fn new_top_level_table(ctx: &ExitContext<'_>, page: u64) -> bool {
    let Some(layout) = ctx.guest.integrity.as_ref().and_then(|s| s.engine.layout()) else { return false };
    let (Some(list), Some(objects)) = (layout.processes, layout.objects.as_ref()) else { return false };
    let Some(owner_offset) = list.owner_offset else { return false };
    let read = |at: u64| read_phys_u64(ctx, at);
    let first = if list.pgd_pages == 2 { page & !0x1fff } else { page };
    let Some(mm) = objects.page_word(first, owner_offset, read) else { return false };
    crate::integrity::layout::is_kernel_address(mm)
        && ctx.inspect().translate(mm).is_ok_and(|gpa| objects.in_cache(gpa, abi::MM_CACHE_SLOT, read))
}

/// Whether guest RAM `page` may be a page table the kernel made since the
/// last walk without a page type (see [`ObjectMap::may_be_untyped_table`]):
/// granting one to a module costs a walk first. Outside guest RAM no walk
/// would find a table.
fn may_be_untyped_table(ctx: &ExitContext<'_>, page: u64) -> bool {
    let Some(objects) = ctx.guest.integrity.as_ref().and_then(|s| s.engine.layout()?.objects.as_ref()) else {
        return false;
    };
    ctx.guest.memory.contains(page) && objects.may_be_untyped_table(page, |at| read_phys_u64(ctx, at))
}

/// What a violation names a write into a probe list.
const PROBE_LIST: &str = "probe-list";

/// The bytes of guest RAM `page` that hold a probe list of a tracepoint
/// the agent hooks (see [`crate::integrity::layout::KernelLayout::probe_lists`]),
/// guest-physical. Read afresh at each judgement: the kernel replaces the
/// list whenever a probe comes or goes, and the pointer to it lies in the
/// image's data, which no module writes.
fn probe_list_on(ctx: &ExitContext<'_>, page: u64) -> Option<Range> {
    let layout = ctx.guest.integrity.as_ref()?.engine.layout()?;
    let inspect = ctx.inspect();
    layout.probe_lists.iter().find_map(|&at| {
        let list = inspect.read_u64(at).ok().filter(|&l| l != 0)?;
        // A list spans two pages at most: the one it starts on and the next.
        // Its entries are read only when one of them is `page`.
        let va = [0, 0x1000]
            .map(|o| (list & !0xfff).wrapping_add(o))
            .into_iter()
            .find(|&va| inspect.translate(va).is_ok_and(|gpa| gpa & !0xfff == page))?;
        let r = crate::integrity::layout::probe_list(list, |a| inspect.read_u64(a).ok());
        let (from, to) = (r.start.max(va), r.end.min(va + 0x1000));
        (from < to).then(|| Range::new(page + (from - va), page + (to - va)))
    })
}

/// The reference count every module may write that guest-physical
/// `gpa`, in a protected kernel object, lies in (see
/// [`ObjectMap::shared_field_at`]).
fn shared_field(ctx: &ExitContext<'_>, gpa: u64) -> Option<Range> {
    let objects = ctx.guest.integrity.as_ref()?.engine.layout()?.objects.as_ref()?;
    objects.shared_field_at(gpa, |at| read_phys_u64(ctx, at))
}

/// Takes back every heap page granted writable to a module view since the
/// last call: a page may since have been freed and now serve a protected
/// cache. A module's next write to it is judged again. Called on the
/// agent's drain, every second.
fn revoke_heap_grants(ctx: &mut ExitContext<'_>) {
    let Some(state) = ctx.guest.integrity.as_mut() else { return };
    let grants = core::mem::take(&mut state.heap_grants);
    let Some(control) = ctx.control.as_deref_mut() else { return };
    for (m, page) in grants {
        take_back_write(control, m, page);
    }
}

/// A module's write at `gva` (guest-physical `gpa`), on a task stack window
/// crossings were left on, where no task stack is now (no end-of-stack
/// mark at the window's base): if no walk finds a stack there either, the
/// task is gone, and so are its crossings. Otherwise memory the kernel
/// reused at that address (a `vmalloc` buffer) would be judged as another
/// task's stack, and a benign module's writes to it refused. A module
/// cannot make a live stack look gone: a stack page a walk knows stays
/// known, mark or not.
fn forget_if_dead_stack(ctx: &mut ExitContext<'_>, gva: u64, gpa: u64) {
    let known = |ctx: &ExitContext<'_>| {
        ctx.guest.integrity.as_ref().is_none_or(|s| s.engine.stack_page(gpa) == Some(gva & !0xfff))
    };
    let crossings = ctx.guest.integrity.as_ref().is_some_and(|s| s.engine.crossings_on_task_window(gva));
    if !crossings || has_stack_mark(ctx, gva) || known(ctx) {
        return;
    }
    refresh_stacks(ctx);
    if !known(ctx) {
        if let Some(state) = ctx.guest.integrity.as_mut() {
            state.engine.forget_dead_stack(gva);
        }
    }
}

/// The kernel's end-of-stack mark, at the lowest word of every task's stack.
const STACK_END_MAGIC: u64 = 0x57ac_6e9d;

/// Whether `gva` lies on a task's kernel stack: the 16 KiB-aligned stack
/// it would be on starts with the kernel's mark, and the page below it is
/// a guard page (stacks are vmalloc'd; in the direct map, which has no
/// guard pages, any physical page may happen to start with the mark). A
/// module cannot remove the mark (it lies on that stack, where the module
/// may not write); a module that puts it into its own memory only refuses
/// itself.
fn is_task_stack(ctx: &ExitContext<'_>, gva: u64) -> bool {
    let base = crate::integrity::returns::task_stack_of(gva).start;
    crate::integrity::layout::is_kernel_address(gva)
        && has_stack_mark(ctx, gva)
        && ctx.inspect().translate(base.wrapping_sub(0x1000)).is_err()
}

/// Whether the 16 KiB window holding `gva` starts with the kernel's
/// end-of-stack mark.
fn has_stack_mark(ctx: &ExitContext<'_>, gva: u64) -> bool {
    let base = crate::integrity::returns::task_stack_of(gva).start;
    ctx.inspect().read_u64(base) == Ok(STACK_END_MAGIC)
}

/// The out-parameters the kernel hands a module it calls at `rsp`: its
/// argument registers that point into its own frames above (see
/// [`crate::integrity::returns::out_parameter`]).
fn out_parameters(ctx: &ExitContext<'_>, gprs: &[u64; 16], rsp: u64) -> [Option<Range>; 6] {
    use crate::integrity::returns::out_parameter;
    // RDI, RSI, RDX, RCX, R8, R9.
    const ARGS: [usize; 6] = [7, 6, 2, 1, 8, 9];
    let stack = ctx.guest.integrity.as_ref().map(|s| s.engine.stack_of(rsp));
    core::array::from_fn(|i| {
        let (arg, stack) = (gprs[ARGS[i]], stack?);
        if !stack.contains(arg) || arg < rsp.wrapping_add(8) {
            return None;
        }
        let first = arg & !7;
        let len = (stack.end.min(first + 4096 + 8) - first) as usize;
        let mut bytes = alloc::vec![0u8; len];
        ctx.inspect().read(first, &mut bytes).ok()?;
        let words: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        out_parameter(arg, rsp, stack, &words, |w| is_return_address(ctx, w))
    })
}

/// Whether `addr` is where a call in the kernel's or a module's code
/// returns to: registered code, right after a call instruction.
fn is_return_address(ctx: &ExitContext<'_>, addr: u64) -> bool {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let Some(state) = ctx.guest.integrity.as_ref() else { return false };
    if state.engine.expected_page(addr).is_none() {
        return false;
    }
    let mut before = [0u8; 7];
    if ctx.inspect().read(addr.wrapping_sub(7), &mut before).is_err() {
        return false;
    }
    // call rel32 (5 bytes), call *reg (2 or 3), call *disp32(reg) (6 or 7).
    [5usize, 2, 3, 6, 7].iter().any(|&len| {
        let at = addr.wrapping_sub(len as u64);
        let insn = Decoder::with_ip(64, &before[7 - len..], at, DecoderOptions::NONE).decode();
        !insn.is_invalid() && insn.len() == len && insn.mnemonic() == Mnemonic::Call
    })
}

/// Control entered `view` with the stack at `rsp`: a module's view loses
/// the stack pages it may no longer write wholly (another task's stack,
/// the kernel's frames above where it was called this time).
fn enter_view(ctx: &mut ExitContext<'_>, view: View, rsp: u64) {
    let View::Module(m) = view else { return };
    // The kernel's frames above, on any stack the module runs on, are
    // known by their pages whatever address a module writes them through.
    note_running_stack(ctx, rsp);
    let Some(state) = ctx.guest.integrity.as_mut() else { return };
    state.local.stack = Some(state.engine.stack_of(rsp));
    let stale = state.engine.stale_stack_grants(m, rsp);
    let Some(control) = ctx.control.as_deref_mut() else { return };
    for page in stale {
        take_back_write(control, m, page);
    }
}

/// Leaves module `m`'s view able to read `page`, if it maps it, no more.
fn take_back_write(control: &mut dyn GuestControl, m: u32, page: u64) {
    if control.perms(View::Module(m), page).is_some() {
        let _ = control.set_perms(View::Module(m), page, Perms::READ);
    }
}

/// Prints a violation's console line.
fn report(ctx: &mut ExitContext<'_>, v: &Violation) {
    report_object(ctx, v, None);
}

/// Prints a violation's console line, naming the kernel object written.
fn report_object(ctx: &mut ExitContext<'_>, v: &Violation, object: Option<&str>) {
    let say = ctx.guest.integrity.as_mut().map_or(Say::Line, |s| s.repeats.note(v));
    let state = ctx.guest.integrity.as_ref();
    let module = match v.module {
        Some(m) => state.and_then(|s| s.engine.module_name(m)).unwrap_or("?"),
        None => "kernel",
    };
    // A refused kernel API is named, with its group.
    let api = state
        .filter(|_| v.kind == ViolationKind::CallDeniedApi)
        .and_then(|s| s.denied_apis.get(&v.target))
        .map(|d| (d.name.as_str(), d.group.as_str()));
    let line = Line { guest: ctx.guest.name(), module, violation: v, api, object };
    match say {
        Say::Line => console::write_line(format_args!("{line}")),
        Say::Repeated(n) => console::write_line(format_args!("{line} repeated={n}")),
        Say::Quiet => {}
    }
    let Some(newly) = ctx.guest.integrity.as_mut().map(|s| s.engine.take_quarantined()) else { return };
    let state = ctx.guest.integrity.as_ref();
    for m in newly {
        let name = state.and_then(|s| s.engine.module_name(m)).unwrap_or("?");
        console::write_line(format_args!(
            "ctvm: guest {}: module {name} quarantined: the kernel may enter it only to unload it",
            ctx.guest.name()
        ));
    }
}

/// Whose protected data a refused write landed in, for its console line:
/// the kernel's (`.data`, `.bss`, the module list) or a module's, named.
fn protected_data_owner(ctx: &ExitContext<'_>, v: &Violation, gpa: u64) -> Option<alloc::string::String> {
    if v.kind != ViolationKind::WriteProtectedData {
        return None;
    }
    let engine = &ctx.guest.integrity.as_ref()?.engine;
    match engine.class_of(gpa)? {
        PageClass::Sensitive => Some("kernel-data".into()),
        PageClass::ModuleData(m) => Some(alloc::format!("module-data:{}", engine.module_name(m).unwrap_or("?"))),
        _ => None,
    }
}

/// The kernel runs code of its own in an untracked page a module could
/// once write: the kernel's, if no module view can write it now (see
/// `Engine::kernel_reuses`).
fn kernel_reuses(ctx: &mut ExitContext<'_>, fault: &Fault) -> bool {
    let page = fault.gpa & !0xfff;
    let (Some(state), Some(views)) = (ctx.guest.integrity.as_ref(), ctx.control.as_deref()) else { return false };
    let kernel_fetch = fault.view == View::Kernel && fault.access == super::Access::Execute;
    if !kernel_fetch || state.engine.class_of(page).is_some() || !state.engine.is_tainted(page) {
        return false;
    }
    let writable =
        state.engine.modules().any(|m| views.perms(View::Module(m), page).is_some_and(|p| p.contains(Perms::WRITE)));
    ctx.guest.integrity.as_mut().is_some_and(|s| s.engine.kernel_reuses(page, fault.gva, writable))
}

/// The kernel runs into a quarantined module's code: if it is unloading
/// the module (the state in its `struct module`, which no module can
/// write, reads GOING), its exit routine may run. A state that cannot be
/// read changes nothing: the entry stays refused.
fn unloading_check(ctx: &mut ExitContext<'_>, fault: &Fault) {
    if fault.access != super::Access::Execute {
        return;
    }
    let Some(state) = ctx.guest.integrity.as_ref() else { return };
    let Some((m, module)) = state.engine.quarantined_code(fault.gpa) else { return };
    if module_state(ctx, module).ok() == Some(abi::module_state::GOING) {
        if let Some(state) = ctx.guest.integrity.as_mut() {
            state.engine.set_unloading(m);
        }
    }
}

/// An attempt refused outside the EPT: a hypercall from an isolated module
/// or from user space, a module's MSR write or port access, an IPI that
/// would start a CPU. Refused whatever the integrity mode, and reported:
/// the kernel's and its modules' attempts are recorded as violations (when
/// the guest has integrity views); user space's are counted per kind and
/// the first of each shown, so that no process can flood the log the agent
/// reads.
pub fn refusal(ctx: &mut ExitContext<'_>, kind: ViolationKind, target: u64) {
    let who = ctx.principal();
    let rip = ctx.vcpu.read(Field::Rip);
    if who.cpl == 0 {
        if let Some(state) = ctx.guest.integrity.as_mut() {
            let v = state.engine.record_denied(kind, who.view, rip, target);
            report(ctx, &v);
            return;
        }
    }
    if ctx.guest.refusals.count(kind) == 1 {
        console::write_line(format_args!(
            "ctvm: refused guest={} kind={} cpl={} rip={rip:#x} target={target:#x} (further ones are counted)",
            ctx.guest.name(),
            kind.name(),
            who.cpl
        ));
    }
}

/// An access the hypervisor was to make for the guest (an emulated
/// instruction's operand) that the principal's view does not allow, or
/// that is not the guest's RAM. With integrity views it is what the
/// processor's EPT violation would have been: reported by the class of the
/// page, and the instruction skipped with nothing written (in audit mode
/// too: the hypervisor never writes where the guest could not). Without
/// them, the guest touched memory it does not own and stops, as it would
/// on an EPT violation.
pub fn refused_access(ctx: &mut ExitContext<'_>, address: u64, gpa: u64, kind: Kind) -> Action {
    let view = ctx.view();
    let rip = ctx.vcpu.read(Field::Rip);
    let locked = ctx.guest.integrity.as_ref().is_some_and(|s| s.engine.is_locked());
    if locked && ctx.guest.memory.contains(gpa) {
        let Some(state) = ctx.guest.integrity.as_mut() else { return Action::Resume };
        let v = state.engine.refused_access(view, gpa, rip, address, kind);
        report(ctx, &v);
        return skip(ctx);
    }
    let access = match kind {
        Kind::Read => super::Access::Read,
        Kind::Write => super::Access::Write,
        Kind::Fetch => super::Access::Execute,
    };
    Action::Stop(StopReason::EptViolation {
        gpa,
        access,
        rip,
        linear: Some(address),
        guest_memory: ctx.guest.memory.contains(gpa),
    })
}

/// An EPT violation in a guest with integrity views, or `None` when it is
/// not an integrity matter.
pub fn ept_violation(ctx: &mut ExitContext<'_>) -> Option<Action> {
    let state = ctx.guest.integrity.as_ref()?;
    if !state.engine.is_locked() || ctx.control.is_none() {
        return None;
    }
    // A page the kernel view does not map (the hypervisor's memory, the
    // vTPM's window) is not the views' business: no view may map it, and
    // the access is handled (emulated, or the guest stopped) as it would be
    // without integrity.
    let page = ctx.exit.guest_physical & !0xfff;
    // A process's table may have gone since the last walk, and its page
    // been reused: the class is confirmed before it decides anything.
    if state.engine.is_process_table(page) {
        refresh_page_tables(ctx);
    }
    let info = ViolationInfo::from_qualification(ctx.exit.qualification);
    // A new process's top-level table, which no walk has seen yet.
    let state = ctx.guest.integrity.as_ref()?;
    let module_write = matches!(state.local.view, View::Module(_)) && info.access == super::Access::Write;
    if module_write && state.engine.class_of(page).is_none() && new_top_level_table(ctx, page) {
        refresh_page_tables(ctx);
    }
    let state = ctx.guest.integrity.as_ref()?;
    let kept = ctx.control.as_deref().and_then(|c| c.perms(View::Kernel, page))?;
    // A module's view never gets more than the kernel view has: an access
    // the kernel view itself refuses on an untracked page (the local APIC's,
    // which is read-only so that its writes are checked) is not the views'
    // business either.
    let needed = match info.access {
        super::Access::Read => Perms::READ,
        super::Access::Write => Perms::WRITE,
        super::Access::Execute => Perms::EXECUTE,
    };
    let untracked = state.engine.class_of(page).is_none();
    if matches!(state.local.view, View::Module(_)) && untracked && !kept.contains(needed) {
        return None;
    }
    // The processor's own walk for a module's access, setting an accessed
    // or dirty bit in a table the module may not write.
    let walk = info.linear_valid && !info.final_translation && info.access == super::Access::Write;
    let protected_table =
        matches!(state.local.view, View::Module(_)) && state.engine.class_of(page) == Some(PageClass::PageTable);
    if walk && protected_table && set_accessed_or_dirty(ctx, ctx.exit.guest_physical) {
        return Some(Action::Resume);
    }
    let state = ctx.guest.integrity.as_ref()?;
    let rip = ctx.vcpu.read(Field::Rip);
    let rsp = ctx.vcpu.read(Field::Rsp);
    // What the stack shows is the hypervisor's own look, not an access made
    // for the guest: it changes nothing and needs no right.
    let inspect = ctx.inspect();
    let stack = [inspect.read_u64(rsp).ok(), inspect.read_u64(rsp.wrapping_add(8)).ok()];
    let gva = if info.linear_valid { ctx.exit.guest_linear } else { rip };
    let regs = *ctx.vcpu.regs();
    let gprs = core::array::from_fn(|i| regs.get(i as u8, rsp));
    let kernel_object = match (state.local.view, info.access) {
        (View::Module(_), super::Access::Write) if untracked => kernel_object(ctx, page),
        _ => None,
    };
    let shared_field = kernel_object.and_then(|_| shared_field(ctx, ctx.exit.guest_physical));
    let task_stack = match (state.local.view, info.access) {
        (View::Module(_), super::Access::Write) if untracked => is_task_stack(ctx, gva),
        _ => false,
    };
    if matches!((state.local.view, info.access), (View::Module(_), super::Access::Write)) && untracked && !task_stack {
        forget_if_dead_stack(ctx, gva, ctx.exit.guest_physical);
    }
    let state = ctx.guest.integrity.as_ref()?;
    let by_address = state.engine.is_stack_address(gva, task_stack);
    let stack_alias = match (state.local.view, info.access) {
        (View::Module(_), super::Access::Write) if untracked && !by_address => {
            stack_alias(ctx, ctx.exit.guest_physical)
        }
        _ => None,
    };
    let state = ctx.guest.integrity.as_ref()?;
    // A stack page holds no probe list (and a write there is judged as one
    // to the stack first).
    let kernel_shield = match (state.local.view, info.access) {
        (View::Module(_), super::Access::Write) if untracked && !by_address && stack_alias.is_none() => {
            probe_list_on(ctx, page)
        }
        _ => None,
    };
    // Only a call to a module's entry hands it out-parameters (a return
    // into its code finds the kernel's leftovers in those registers).
    let entry = match state.engine.class_of(page) {
        Some(PageClass::ModuleCode(m)) => state.engine.is_module_entry(m, gva),
        _ => false,
    };
    let out_params = match (state.local.view, info.access) {
        (View::Kernel, super::Access::Execute) if entry => out_parameters(ctx, &gprs, rsp),
        _ => [None; 6],
    };
    let fault = Fault {
        view: state.local.view,
        access: info.access,
        gpa: ctx.exit.guest_physical,
        gva,
        rip,
        rsp,
        stack,
        gprs,
        kernel_object,
        shared_field,
        kernel_shield,
        task_stack,
        stack_alias,
        out_params,
    };
    unloading_check(ctx, &fault);
    if let Some(refused) = stack_pivot(ctx, &fault, page) {
        return Some(refused);
    }
    let outcome = if kernel_reuses(ctx, &fault) {
        Outcome { step: Step::AllowExecute, violation: None }
    } else {
        match deputy_check(ctx, &fault) {
            Some(Err(refused)) => refused,
            Some(Ok(call)) => {
                let outcome = ctx.guest.integrity.as_mut()?.engine.decide(&fault);
                if matches!(outcome.step, Step::Switch(View::Kernel) | Step::Branch { view: View::Kernel, .. }) {
                    hold_call(ctx, &fault, call);
                }
                outcome
            }
            None => ctx.guest.integrity.as_mut()?.engine.decide(&fault),
        }
    };
    log::trace!(
        "integrity: {:?} {:?} gpa {:#x} gva {:#x} rip {:#x} stack {:x?} -> {:?}",
        fault.view,
        fault.access,
        fault.gpa,
        fault.gva,
        fault.rip,
        fault.stack,
        outcome.step
    );
    if let Some(v) = &outcome.violation {
        let whose = protected_data_owner(ctx, v, fault.gpa);
        let shielded = kernel_shield.filter(|s| s.contains(fault.gpa)).map(|_| PROBE_LIST);
        report_object(ctx, v, kernel_object.or(shielded).or(whose.as_deref()));
    }
    let view = ctx.guest.integrity.as_ref()?.local.view;
    let action = match outcome.step {
        Step::NotMine => return None,
        Step::Switch(to) => match control(ctx).ok()?.activate_view(to) {
            Ok(()) => {
                ctx.guest.integrity.as_mut()?.local.view = to;
                enter_view(ctx, to, rsp);
                Action::Resume
            }
            Err(_) => Action::Stop(StopReason::HypervisorError(alloc::format!("no view {to:?}"))),
        },
        Step::Grant(perms) => {
            // A plain page is granted writable only once a walk has shown it
            // is no table the kernel left untyped; one it is, is judged again
            // as one (the write exits again).
            let module_view = matches!(view, View::Module(_));
            if module_view && untracked && perms.contains(Perms::WRITE) && may_be_untyped_table(ctx, page) {
                refresh_page_tables(ctx);
                let engine = &mut ctx.guest.integrity.as_mut()?.engine;
                engine.stats.table_walks += 1;
                if engine.class_of(page).is_some() {
                    engine.stats.grants = engine.stats.grants.saturating_sub(1);
                    return Some(Action::Resume);
                }
            }
            let perms = perms & kept;
            let control = control(ctx).ok()?;
            // What a module may write, the kernel may not execute (W^X across views).
            let w_x = perms.contains(Perms::WRITE) && kept.contains(Perms::EXECUTE);
            let granted = (!w_x || control.set_perms(View::Kernel, page, kept - Perms::EXECUTE).is_ok())
                && control.set_perms(view, page, perms).is_ok();
            if let (true, View::Module(m)) = (perms.contains(Perms::WRITE), view) {
                let state = ctx.guest.integrity.as_mut()?;
                state.engine.taint(m, page);
                if untracked {
                    state.heap_grants.insert((m, page));
                }
            }
            if granted {
                Action::Resume
            } else {
                Action::Stop(StopReason::HypervisorError("out of memory for a module view".into()))
            }
        }
        Step::AllowExecute => match control(ctx).ok()?.set_perms(view, page, kept | Perms::EXECUTE) {
            Ok(()) => Action::Resume,
            Err(_) => Action::Stop(StopReason::HypervisorError("cannot map a page executable".into())),
        },
        Step::StepOver => step_over(ctx, view, page, None),
        Step::StepBeside(kept) => {
            match call_carried_out(ctx, view, rip, rsp, |r| r.end <= kept.start || kept.end <= r.start) {
                Some(done) => done,
                None => guarded_step(ctx, view, page, rip, kept, None),
            }
        }
        Step::StepWithin { guard, allowed } => {
            match call_carried_out(ctx, view, rip, rsp, |r| allowed.start <= r.start && r.end <= allowed.end) {
                Some(done) => done,
                None => guarded_step(ctx, view, page, rip, guard, Some(allowed)),
            }
        }
        Step::Skip => skip(ctx),
        Step::ReturnError => return_error(ctx, stack[0], EPERM.wrapping_neg()),
        Step::ReturnNull => return_error(ctx, stack[0], 0),
        Step::Fault => general_protection(ctx),
        Step::Branch { view: to, rip: target, pop } => {
            // The hypervisor carries the branch out: the target must map the
            // code registered there, or the next fetch would run other code.
            let expected = ctx.guest.integrity.as_ref()?.engine.expected_page(target);
            let actual = ctx.inspect().translate(target).ok().map(|gpa| gpa & !0xfff);
            if expected.is_some() && actual != expected {
                let state = ctx.guest.integrity.as_mut()?;
                let v = state.engine.record(crate::integrity::ViolationKind::Alias, view, rip, target);
                report(ctx, &v);
                if v.action == abi::ViolationAction::Denied {
                    return Some(general_protection(ctx));
                }
            }
            if to != view {
                if control(ctx).ok()?.activate_view(to).is_err() {
                    return Some(Action::Stop(StopReason::HypervisorError(alloc::format!("no view {to:?}"))));
                }
                ctx.guest.integrity.as_mut()?.local.view = to;
                enter_view(ctx, to, if pop { rsp.wrapping_add(8) } else { rsp });
            }
            if pop {
                ctx.vcpu.write(Field::Rsp, rsp.wrapping_add(8));
            }
            ctx.vcpu.write(Field::Rip, target);
            Action::Resume
        }
    };
    reopen_window(ctx);
    Some(action)
}

/// Interrupts held while a module's branch out waited for its judgement
/// (see [`branched_out`]) are delivered once the guest can take them.
fn reopen_window(ctx: &mut ExitContext<'_>) {
    if ctx.guest.integrity.as_ref().is_some_and(|s| !s.local.pending_interrupts.is_empty()) {
        if let Ok(control) = control(ctx) {
            control.set_interrupt_window(true);
        }
    }
}

/// Lets one write to `page` through in `view`: opens the page, and arms a
/// single step that closes it again ([`monitor_trap`]).
fn step_over(ctx: &mut ExitContext<'_>, view: View, page: u64, guard: Option<Guard>) -> Action {
    let Ok(control) = control(ctx) else {
        return Action::Stop(StopReason::HypervisorError("a write to step over without integrity views".into()));
    };
    let before = control.perms(view, page);
    let open = before.unwrap_or(Perms::READ) | Perms::WRITE;
    if control.set_perms(view, page, open).is_err() {
        return Action::Stop(StopReason::HypervisorError("cannot open a page for one write".into()));
    }
    // One instruction, then close: with the monitor trap flag, or
    // else with RFLAGS.TF and a #DB exit.
    let trap_flag = if control.has_monitor_trap() {
        control.set_monitor_trap(true);
        None
    } else {
        control.intercept_debug_exceptions(true);
        let rflags = ctx.vcpu.read(Field::Rflags);
        ctx.vcpu.write(Field::Rflags, rflags | RFLAGS_TF);
        // The step's trap is the only one due: nothing pending from before
        // may fire at entry, ahead of the instruction (a trap flag the guest
        // does not have set leaves none due).
        if rflags & RFLAGS_TF == 0 {
            ctx.vcpu.write(Field::PendingDebugExceptions, 0);
        }
        Some(rflags & RFLAGS_TF != 0)
    };
    if let Some(state) = ctx.guest.integrity.as_mut() {
        state.local.stepping = Some(Stepping { view, page, before, trap_flag, guard });
    }
    Action::Resume
}

/// Lets one write to `page` through with the bytes of `kept` (guest-physical)
/// kept: after the step, those outside `allowed` are put back if it changed
/// them ([`check_guard`]).
/// A module's near call whose return-address push lands where only some
/// bytes are its own (a stack page beside the kernel's frames): carried out
/// here, push and jump, when `may_write` allows the eight bytes (guest-
/// physical), rather than stepped. Its target's fetch is then judged as any
/// branch out of the module. Stepping a branch has the processor fetch the
/// target inside the step, where a trap flag's #DB can come before the
/// fetch's own exit (so Bochs does, for a target whose translation exits,
/// retrying the call forever); and it saves an exit per call.
fn call_carried_out(
    ctx: &mut ExitContext<'_>,
    view: View,
    rip: u64,
    rsp: u64,
    may_write: impl Fn(Range) -> bool,
) -> Option<Action> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
    let View::Module(m) = view else { return None };
    let push = rsp.checked_sub(8)?;
    if ctx.exit.guest_linear != push || push & 0xfff > 0xff8 {
        return None;
    }
    let mut bytes = [0u8; 15];
    ctx.inspect().read(rip, &mut bytes).ok()?;
    let insn = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() || insn.mnemonic() != Mnemonic::Call {
        return None;
    }
    let target = match insn.op0_kind() {
        OpKind::NearBranch64 => insn.near_branch64(),
        OpKind::Register => {
            let reg = crate::mmio::decode::gpr(insn.op0_register()).filter(|r| r.size == 8)?;
            ctx.vcpu.regs().get(reg.index, rsp)
        }
        _ => return None,
    };
    let gpa = ctx.exit.guest_physical;
    let held = ctx.guest.integrity.as_ref().is_some_and(|s| s.engine.holds_input(Range::new(gpa, gpa + 8)));
    if held || !may_write(Range::new(gpa, gpa + 8)) {
        return None;
    }
    ctx.guest.memory.write(&ctx.phys, gpa, &insn.next_ip().to_le_bytes()).ok()?;
    ctx.vcpu.write(Field::Rsp, push);
    ctx.vcpu.write(Field::Rip, target);
    let blocking = ctx.vcpu.read(Field::Interruptibility);
    ctx.vcpu.write(Field::Interruptibility, blocking & !BLOCKING_BY_STI_OR_MOV_SS);
    // The module's own trap flag: the call's single-step trap is due, as a
    // trap after any branch (see [`branched_out`]).
    if ctx.vcpu.read(Field::Rflags) & RFLAGS_TF != 0 {
        if branched_out(ctx, m) {
            drop_debug_traps(ctx);
        } else if let Err(stop) = own_single_step(ctx, m) {
            return Some(stop);
        }
        return Some(Action::Resume);
    }
    Some(fetch_now(ctx, view, target).unwrap_or(Action::Resume))
}

/// The fetch at `target` the guest would make next, in `view`, judged now
/// if the view would refuse it (a call out of a module): the exit it would
/// take, saved. The guest stands exactly where that exit would find it; an
/// interrupt that comes meanwhile is held for the judgement either way (see
/// [`branched_out`]). `None`: the fetch is the guest's to make.
fn fetch_now(ctx: &mut ExitContext<'_>, view: View, target: u64) -> Option<Action> {
    let gpa = ctx.inspect().translate(target).ok()?;
    let perms = ctx.control.as_deref()?.perms(view, gpa & !0xfff);
    if perms.is_some_and(|p| p.contains(Perms::EXECUTE)) {
        return None;
    }
    // An instruction fetch, through a linear address, at its final translation.
    let fetch = crate::vcpu::ExitInfo {
        reason: super::reason::EPT_VIOLATION,
        qualification: (1 << 2) | (1 << 7) | (1 << 8),
        guest_physical: gpa,
        guest_linear: target,
        ..*ctx.exit
    };
    let mut at_fetch = ExitContext {
        guest: &mut *ctx.guest,
        vcpu: &mut *ctx.vcpu,
        exit: &fetch,
        host: ctx.host,
        phys: ctx.phys,
        control: ctx.control.as_deref_mut().map(|c| c as &mut dyn GuestControl),
    };
    ept_violation(&mut at_fetch)
}

/// Module `m` single-steps itself inside its code: its #DB is due,
/// delivered in the kernel view as any event from a module's view.
fn own_single_step(ctx: &mut ExitContext<'_>, m: u32) -> Result<(), Action> {
    let rip = ctx.vcpu.read(Field::Rip);
    if leave_module_for_event(ctx, m, rip).is_err() {
        return Err(Action::Stop(StopReason::HypervisorError("cannot leave a module's view".into())));
    }
    inject_exception(ctx.vcpu, VECTOR_DB as u8, None);
    Ok(())
}

fn guarded_step(
    ctx: &mut ExitContext<'_>,
    view: View,
    page: u64,
    rip: u64,
    kept: Range,
    allowed: Option<Range>,
) -> Action {
    // The bytes kept are read, and compared after the step, with no other
    // vCPU running: the kernel there may write them meanwhile (the next
    // object's reference count), and its write is neither the module's nor
    // to be undone.
    if let Ok(control) = control(ctx) {
        control.run_alone();
    }
    // What write-through calls still running were judged by is kept too.
    let held = ctx.guest.integrity.as_ref().map_or_else(Vec::new, |s| s.engine.inputs_on(page));
    let start = held.iter().fold(kept.start, |a, r| a.min(r.start));
    let end = held.iter().fold(kept.end, |a, r| a.max(r.end));
    let mut bytes = alloc::vec![0; (end - start) as usize];
    if ctx.guest.memory.read(&ctx.phys, start, &mut bytes).is_err() {
        return Action::Stop(StopReason::HypervisorError("a guarded range outside guest RAM".into()));
    }
    step_over(ctx, view, page, Some(Guard { at: start, bytes, rip, kept, allowed, held }))
}

/// After a write let through beside guarded bytes: if it changed them, they
/// are put back (in enforce mode) and the writer is reported.
fn check_guard(ctx: &mut ExitContext<'_>, view: View, guard: Guard) -> Option<Action> {
    let mut now = alloc::vec![0; guard.bytes.len()];
    if ctx.guest.memory.read(&ctx.phys, guard.at, &mut now).is_err() {
        return Some(Action::Stop(StopReason::HypervisorError("a guarded range outside guest RAM".into())));
    }
    // What the write may change keeps its new value.
    let mut restored = guard.bytes.clone();
    for (i, b) in restored.iter_mut().enumerate().filter(|&(i, _)| guard.may_change(guard.at + i as u64)) {
        *b = now[i];
    }
    let changed = now.iter().zip(&restored).position(|(a, b)| a != b)?;
    let state = ctx.guest.integrity.as_mut()?;
    let at = guard.at + changed as u64;
    let v = if guard.held.iter().any(|r| r.contains(at)) {
        state.engine.record(ViolationKind::DeputyInput, view, guard.rip, at)
    } else if guard.allowed.is_none() {
        state.engine.shield_breached(view, guard.rip, at)
    } else {
        state.engine.record(ViolationKind::WriteProtectedData, view, guard.rip, at)
    };
    if v.action == abi::ViolationAction::Denied && ctx.guest.memory.write(&ctx.phys, guard.at, &restored).is_err() {
        return Some(Action::Stop(StopReason::HypervisorError("cannot restore guarded bytes".into())));
    }
    report(ctx, &v);
    None
}

/// Refuses a write: the instruction is skipped (decoded for its length),
/// or, when it cannot be decoded, faults with #GP.
fn skip(ctx: &mut ExitContext<'_>) -> Action {
    let rip = ctx.vcpu.read(Field::Rip);
    let mut bytes = [0u8; crate::guest::access::MAX_INSTRUCTION_LEN];
    let len = ctx
        .access()
        .fetch_instruction(rip, &mut bytes)
        .ok()
        .and_then(|n| crate::mmio::decode::instruction_length(&bytes[..n]));
    match len {
        Some(len) => {
            let exit = crate::vcpu::ExitInfo { instruction_len: u64::from(len), ..*ctx.exit };
            crate::vcpu::skip_instruction(ctx.vcpu, &exit);
        }
        None => return general_protection(ctx),
    }
    Action::Resume
}

/// Refuses a transfer that cannot return a value: a #GP, delivered as the
/// processor delivers any exception from a module's view, in the kernel
/// view (the handler is no entry of the module's). Injected in the
/// module's view, the handler's fetch would be refused in turn, and so on
/// until the guest's stack overflows.
fn general_protection(ctx: &mut ExitContext<'_>) -> Action {
    if let View::Module(m) = ctx.view() {
        // Faulted in the module's own code, not at the refused target (see
        // [`crate::integrity::engine::Engine::fault_site`]).
        if let Some(site) = ctx.guest.integrity.as_ref().and_then(|s| s.engine.fault_site(m)) {
            ctx.vcpu.write(Field::Rip, site);
        }
        let rip = ctx.vcpu.read(Field::Rip);
        if leave_module_for_event(ctx, m, rip).is_err() {
            return Action::Stop(StopReason::HypervisorError("cannot leave a module's view".into()));
        }
    }
    inject_exception(ctx.vcpu, VECTOR_GP, Some(0));
    Action::Resume
}

/// Refuses a call: returns to the caller with `value` (-EPERM, or NULL for
/// a callee that fails with NULL), as if the callee had.
fn return_error(ctx: &mut ExitContext<'_>, return_address: Option<u64>, value: u64) -> Action {
    match return_address {
        Some(ret) => {
            let rsp = ctx.vcpu.read(Field::Rsp);
            ctx.vcpu.write(Field::Rsp, rsp.wrapping_add(8));
            ctx.vcpu.write(Field::Rip, ret);
            ctx.vcpu.regs().rax = value;
        }
        None => return general_protection(ctx),
    }
    Action::Resume
}

/// The exit after a let-through write (monitor trap, or the #DB of
/// RFLAGS.TF): close the page again.
pub fn monitor_trap(ctx: &mut ExitContext<'_>) -> Action {
    let stepping = ctx.guest.integrity.as_mut().and_then(|s| s.local.stepping.take());
    let rip = ctx.vcpu.read(Field::Rip);
    let Some(stepping) = stepping else {
        return Action::Stop(StopReason::Unsupported { what: "a single-step exit with nothing being stepped", rip });
    };
    if stepping.trap_flag.is_some() {
        // The step's trap was taken by this exit: none of it stays pending.
        ctx.vcpu.write(Field::PendingDebugExceptions, 0);
    }
    let Ok(control) = control(ctx) else {
        return Action::Stop(StopReason::Unsupported { what: "a single-step exit without integrity views", rip });
    };
    match stepping.trap_flag {
        None => control.set_monitor_trap(false),
        Some(_) => control.intercept_debug_exceptions(false),
    }
    if control.set_perms(stepping.view, stepping.page, stepping.before.unwrap_or(Perms::empty())).is_err() {
        return Action::Stop(StopReason::HypervisorError("cannot close a page after one write".into()));
    }
    if let Some(guard) = stepping.guard {
        if let Some(stop) = check_guard(ctx, stepping.view, guard) {
            return stop;
        }
    }
    // The stepped instruction branched out of the module (a call whose push
    // was stepped): its trap would outrun the fetch's judgement.
    if let View::Module(m) = stepping.view {
        if branched_out(ctx, m) {
            drop_debug_traps(ctx);
            return step_done(ctx);
        }
    }
    if let Some(guest_had_tf) = stepping.trap_flag {
        if !guest_had_tf {
            let rflags = ctx.vcpu.read(Field::Rflags);
            ctx.vcpu.write(Field::Rflags, rflags & !RFLAGS_TF);
        } else if let View::Module(m) = stepping.view {
            if let Err(stop) = own_single_step(ctx, m) {
                return stop;
            }
        } else {
            // The guest was single-stepping itself: its #DB is due.
            inject_exception(ctx.vcpu, 1, None);
        }
    }
    step_done(ctx)
}

/// After a step: a module's view keeps every event exiting, #DB included
/// (the step's own interception of #DB ends only in the kernel view), and
/// interrupts held meanwhile wait for their window.
fn step_done(ctx: &mut ExitContext<'_>) -> Action {
    if matches!(ctx.view(), View::Module(_)) {
        if let Ok(control) = control(ctx) {
            control.intercept_debug_exceptions(true);
        }
    }
    reopen_window(ctx);
    Action::Resume
}

/// Interruption types (SDM Vol. 3C, 25.8.3 and 27.2.2).
mod event_type {
    pub const EXTERNAL: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HARDWARE_EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const SOFTWARE_EXCEPTION: u32 = 6;
}

const EVENT_VALID: u32 = 1 << 31;
const ERROR_CODE_VALID: u32 = 1 << 11;
const NMI_UNBLOCKING: u32 = 1 << 12;
const VECTOR_PF: u32 = 14;
const VECTOR_DB: u32 = 1;
const VECTOR_NMI: u32 = 2;

/// Leaves a module's view for the kernel's, for an event: the handler's
/// return (or the kernel's exception fixup) into the module is recorded,
/// and events exit no more.
fn leave_module_for_event(ctx: &mut ExitContext<'_>, m: u32, resume: u64) -> Result<(), ControlError> {
    let (rip, rsp) = (ctx.vcpu.read(Field::Rip), ctx.vcpu.read(Field::Rsp));
    control(ctx).map_err(|_| ControlError)?.activate_view(View::Kernel)?;
    let state = ctx.guest.integrity.as_mut().ok_or(ControlError)?;
    let entered = state.local.stack.take();
    state.local.view = View::Kernel;
    // On a stack it moved to, the event's return point would end another
    // task's frames: none is recorded, and the return into the module is
    // refused.
    match state.engine.pivoted(m, rip, rsp, entered) {
        Some(v) => {
            let denied = v.action == abi::ViolationAction::Denied;
            if !denied {
                state.engine.event_leaves_module(m, rip, resume, rsp);
            }
            report(ctx, &v);
        }
        None => state.engine.event_leaves_module(m, rip, resume, rsp),
    }
    Ok(())
}

/// Whether module `m`'s view stands at an address outside the module's
/// code: its last instruction branched out (a call, a jump, a return) and
/// the fetch there, which exits and is judged, has not happened yet. An
/// event taken now would come back there in the kernel's view, and the
/// branch would never be judged: the event waits for that fetch (an
/// interrupt), or gives way to it (the single-step trap of the branch).
fn branched_out(ctx: &ExitContext<'_>, m: u32) -> bool {
    let rip = ctx.vcpu.read(Field::Rip);
    ctx.guest.integrity.as_ref().is_some_and(|s| !s.engine.is_code_of(m, rip))
}

/// The debug traps of a module's branch out that stands before its fetch
/// (see [`branched_out`]) are dropped, with the trap flag, as the kernel's
/// own #DB handler clears a trap flag it finds set in kernel code: a trap
/// taken there, delivered or pending across the exit (which the processor
/// may deliver through the IDT at the next entry), would come back to the
/// branch's target in the kernel's view.
fn drop_debug_traps(ctx: &mut ExitContext<'_>) {
    let rflags = ctx.vcpu.read(Field::Rflags);
    ctx.vcpu.write(Field::Rflags, rflags & !RFLAGS_TF);
    ctx.vcpu.write(Field::PendingDebugExceptions, 0);
}

/// Queues an event for the next VM entry, as the exit reported it.
fn inject(ctx: &mut ExitContext<'_>, info: u32, error: Option<u32>, len: u64) {
    let mut entry = (info & !NMI_UNBLOCKING & !ERROR_CODE_VALID) | EVENT_VALID;
    if let Some(code) = error {
        entry |= ERROR_CODE_VALID;
        ctx.vcpu.write(Field::EntryExceptionErrorCode, u64::from(code));
    }
    ctx.vcpu.write(Field::EntryInterruptionInfo, u64::from(entry));
    ctx.vcpu.write(Field::EntryInstructionLength, len);
}

/// Delivers the oldest held-back external interrupt if the guest can take
/// it, leaving a module's view for it first; keeps the interrupt window
/// open while more wait.
fn deliver_pending(ctx: &mut ExitContext<'_>) -> Action {
    let pending = ctx.guest.integrity.as_ref().is_some_and(|s| !s.local.pending_interrupts.is_empty());
    let busy = ctx.vcpu.read(Field::EntryInterruptionInfo) & u64::from(EVENT_VALID) != 0;
    if let (View::Module(m), true) = (ctx.view(), pending) {
        if branched_out(ctx, m) {
            // The fetch there exits next and is judged; the interrupt waits
            // for it (see [`branched_out`]).
            drop_debug_traps(ctx);
            if let Ok(control) = control(ctx) {
                control.set_interrupt_window(false);
            }
            return Action::Resume;
        }
    }
    if pending && !busy && crate::vcpu::interruptible(ctx.vcpu) {
        if let View::Module(m) = ctx.view() {
            let rip = ctx.vcpu.read(Field::Rip);
            if leave_module_for_event(ctx, m, rip).is_err() {
                return Action::Stop(StopReason::HypervisorError("cannot leave a module's view".into()));
            }
        }
        if let Some(vector) = ctx.guest.integrity.as_mut().and_then(|s| s.local.pending_interrupts.pop_front()) {
            let kind = if u32::from(vector) == VECTOR_NMI { event_type::NMI } else { event_type::EXTERNAL };
            inject(ctx, u32::from(vector) | (kind << 8), None, 0);
        }
    }
    let more = ctx.guest.integrity.as_ref().is_some_and(|s| !s.local.pending_interrupts.is_empty());
    if let Ok(control) = control(ctx) {
        control.set_interrupt_window(more);
    }
    Action::Resume
}

/// An event that exited from a module's view: an external interrupt
/// (acknowledged on exit), an NMI, or an exception. It is delivered in the
/// kernel view, as the processor would have delivered it, and the
/// handler's return into the module is recorded. Interrupts the guest
/// cannot take yet wait for its interrupt window.
pub fn module_event(ctx: &mut ExitContext<'_>, m: u32) -> Action {
    let info = ctx.exit.interruption_info;
    if info & EVENT_VALID == 0 {
        return Action::Stop(StopReason::HypervisorError("an event exit without its event".into()));
    }
    let kind = (info >> 8) & 7;
    if kind == event_type::EXTERNAL {
        if let Some(state) = ctx.guest.integrity.as_mut() {
            state.local.pending_interrupts.push_back(info as u8);
        }
        return deliver_pending(ctx);
    }
    let vector = info & 0xff;
    if branched_out(ctx, m) {
        match (kind, vector) {
            // Held as an interrupt is (vector 2 is no external interrupt's).
            (event_type::NMI, _) => {
                if let Some(state) = ctx.guest.integrity.as_mut() {
                    state.local.pending_interrupts.push_back(VECTOR_NMI as u8);
                }
                return deliver_pending(ctx);
            }
            // The branch's single-step or data-breakpoint trap: dropped, so
            // that the fetch comes first, and the trap flag cleared with it
            // (as the kernel's own #DB handler clears a trap flag it finds
            // set in kernel code).
            (event_type::HARDWARE_EXCEPTION, VECTOR_DB) => {
                drop_debug_traps(ctx);
                return Action::Resume;
            }
            // A fault fetching the target (not mapped): the kernel would take
            // the same fault fetching it itself.
            _ => {}
        }
    }
    let rip = ctx.vcpu.read(Field::Rip);
    let software = matches!(
        kind,
        event_type::SOFTWARE_INTERRUPT | event_type::PRIVILEGED_SOFTWARE_EXCEPTION | event_type::SOFTWARE_EXCEPTION
    );
    let len = if software { ctx.exit.instruction_len } else { 0 };
    if leave_module_for_event(ctx, m, rip.wrapping_add(len)).is_err() {
        return Action::Stop(StopReason::HypervisorError("cannot leave a module's view".into()));
    }
    // A page fault that exits leaves CR2 alone: the guest's handler needs it.
    if kind == event_type::HARDWARE_EXCEPTION && info & 0xff == VECTOR_PF {
        ctx.vcpu.regs().cr2 = ctx.exit.qualification;
    }
    let error = (info & ERROR_CODE_VALID != 0).then_some(ctx.exit.interruption_error);
    inject(ctx, info, error, len);
    Action::Resume
}

/// Exception and NMI exits: the end of a single step (#DB), or an event
/// leaving a module's view.
pub fn exception(ctx: &mut ExitContext<'_>) -> Action {
    let vector = ctx.exit.interruption_info & 0xff;
    // Only a step made with the trap flag ends in #DB; with the monitor
    // trap flag, a #DB is the guest's own (its trap flag, a breakpoint).
    let stepping =
        ctx.guest.integrity.as_ref().is_some_and(|s| s.local.stepping.as_ref().is_some_and(|s| s.trap_flag.is_some()));
    if vector == 1 && stepping {
        return monitor_trap(ctx);
    }
    if let View::Module(m) = ctx.view() {
        return module_event(ctx, m);
    }
    Action::Stop(StopReason::Unhandled {
        reason: 0,
        qualification: u64::from(ctx.exit.interruption_info),
        rip: ctx.vcpu.read(Field::Rip),
    })
}

/// The guest can take an interrupt again: deliver what waits.
pub fn interrupt_window(ctx: &mut ExitContext<'_>) -> Action {
    deliver_pending(ctx)
}

/// Whether writing `new` over `old` clears a guarded bit after the lock;
/// reports the violation and says whether to refuse.
pub fn control_register_write(ctx: &mut ExitContext<'_>, old: u64, new: u64, guarded: u64) -> bool {
    let Some(state) = ctx.guest.integrity.as_mut() else { return false };
    if !state.engine.is_locked() || old & guarded & !new == 0 {
        return false;
    }
    let view = state.local.view;
    let v = state.engine.record(crate::integrity::ViolationKind::ControlRegister, view, ctx.vcpu.read(Field::Rip), new);
    report(ctx, &v);
    v.action == abi::ViolationAction::Denied
}

/// The accessed or dirty bit the processor's page walk could not set in
/// a protected table (the entry at guest-physical `entry`), set for it:
/// accessed first, then, with accessed already set, dirty (the walk comes
/// back for it on a write through a leaf). Nothing else of the entry
/// changes, atomically (the kernel may be changing it on another CPU: then
/// the walk comes back); `false` when both are set already (then the exit
/// is judged as a write).
fn set_accessed_or_dirty(ctx: &mut ExitContext<'_>, entry: u64) -> bool {
    const ACCESSED: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;
    let at = entry & !7;
    let Some(value) = read_phys_u64(ctx, at) else { return false };
    let bit = if value & ACCESSED == 0 { ACCESSED } else { DIRTY };
    if value & 1 == 0 || value & bit != 0 {
        return false;
    }
    // Lost to a change on another CPU: the processor walks again.
    let _ = ctx.guest.memory.compare_exchange_u64(&ctx.phys, at, value, value | bit);
    true
}

/// A MOV to CR3 from a module's view after the lock: refused in enforce
/// mode. Page tables of its own would map any linear address to any page
/// (a denied API under an allowed one's address, kernel data under a user
/// one), and the kernel's own loads run in the kernel view.
pub fn cr3_load(ctx: &mut ExitContext<'_>, value: u64) -> bool {
    let Some(state) = ctx.guest.integrity.as_mut() else { return false };
    if !state.engine.is_locked() || !matches!(state.local.view, View::Module(_)) {
        return false;
    }
    let view = state.local.view;
    let v = state.engine.record(ViolationKind::ControlRegister, view, ctx.vcpu.read(Field::Rip), value);
    report(ctx, &v);
    v.action == abi::ViolationAction::Denied
}

/// A guarded MSR write after the lock (the syscall entry points).
pub fn msr_write(ctx: &mut ExitContext<'_>, msr: u32, value: u64) -> bool {
    let Some(state) = ctx.guest.integrity.as_mut() else { return false };
    if !state.engine.is_locked() || ctx.host.read_msr(msr) == value {
        return false;
    }
    let view = state.local.view;
    let v = state.engine.record(
        crate::integrity::ViolationKind::GuardedMsr,
        view,
        ctx.vcpu.read(Field::Rip),
        u64::from(msr),
    );
    report(ctx, &v);
    v.action == abi::ViolationAction::Denied
}

/// LGDT/LIDT after the lock.
pub fn descriptor_table_load(ctx: &mut ExitContext<'_>, base: u64) -> bool {
    let Some(state) = ctx.guest.integrity.as_mut() else { return false };
    if !state.engine.is_locked() {
        return false;
    }
    let view = state.local.view;
    let v =
        state.engine.record(crate::integrity::ViolationKind::DescriptorTable, view, ctx.vcpu.read(Field::Rip), base);
    report(ctx, &v);
    v.action == abi::ViolationAction::Denied
}

#[cfg(test)]
mod tests {
    //! The whole generic path on a miniature guest: the agent's hypercalls
    //! against guest memory laid out like a kernel's, then EPT violations
    //! decided and carried out through a fake VMX layer.
    use super::*;
    use crate::exits::testing::FakeHost;
    use crate::exits::{dispatch, reason};
    use crate::guest::memory::fake::FakePhys;
    use crate::guest::memory::HostPhys;
    use crate::guest::{test_guest, Guest};
    use crate::integrity::control::fake::FakeControl;
    use crate::integrity::policy::Entry;
    use crate::integrity::{GuestIntegrity, Mode, ViolationKind};
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, VcpuState};

    /// Guest RAM is 16 MiB at host 0x1000_0000; kernel virtual K + x maps
    /// guest-physical x through 2 MiB pages.
    const K: u64 = 0xffff_ffff_8000_0000;
    const TEXT: u64 = 0x40_0000;
    const PRINTK: u64 = TEXT + 0x1000;
    const SET_MEMORY_RW: u64 = TEXT + 0x2000;
    const THUNK_RAX: u64 = TEXT + 0x3000;
    const ENTRY_SYSCALL: u64 = TEXT + 0x3000;
    const HANDLER: u64 = TEXT + 0x4000;
    const MEMCPY: u64 = TEXT + 0x6000;
    const SYMBOL_GET: u64 = TEXT + 0x7000;
    const SEQ_PUTS: u64 = TEXT + 0x8000;
    const RODATA: u64 = 0x60_0000;
    const SYSCALL_TABLE: u64 = 0x61_0000;
    const IDT: u64 = 0x62_0000;
    const LAYOUT: u64 = 0x10_0000;
    const KSYMTAB: u64 = 0x11_0000;
    const NAMES: u64 = 0x11_1000;
    const MODULE_INFO: u64 = 0x13_0000;
    const MODULE_ENTRIES: u64 = 0x13_1000;
    const MODULE_CODE: u64 = 0x80_0000;
    const MODULE_DATA: u64 = 0x80_1000;
    /// Its `struct module`, in its data.
    const MODULE_STRUCT: u64 = MODULE_DATA + 0xf00;
    /// The agent: one code page whose VMCALL makes the calls, one data page.
    const AGENT_INFO: u64 = 0x14_0000;
    const AGENT_CODE: u64 = 0x82_0000;
    const AGENT_VMCALL: u64 = AGENT_CODE + 0x40;
    const AGENT_DATA: u64 = 0x82_1000;
    const STACK: u64 = 0x90_0000;
    /// A page of the kernel image's .data; the `struct page` array (16 MiB
    /// of RAM: 4096 frames, 64 pages); a page of credentials (its struct
    /// page names CRED_JAR) and an ordinary heap page.
    const KERNEL_DATA: u64 = 0x98_0000;
    const VMEMMAP: u64 = 0xa0_0000;
    const CRED_JAR: u64 = K + 0xb0_0000;
    const CRED_PAGE: u64 = 0xc0_0000;
    const HEAP_PAGE: u64 = 0xc1_0000;
    /// `pgd_list`, in the image's data, and one process's page tables.
    const PGD_LIST: u64 = KERNEL_DATA + 0x200;
    const PROCESS_PGD: u64 = 0xd8_0000;
    const PROCESS_PDPT: u64 = 0xd9_0000;
    const PROCESS_PD: u64 = 0xda_0000;
    const PROCESS_PT: u64 = 0xdb_0000;
    /// The mm_structs' cache, and a page of them.
    const MM_CACHE: u64 = K + 0xb2_0000;
    const MM_PAGE: u64 = 0xc2_0000;
    /// Where the tracepoint the agent hooks keeps its probe list, in .data.
    const PROBE_LIST_AT: u64 = KERNEL_DATA + 0x300;

    struct Fixture {
        guest: Guest,
        vcpu: FakeVcpu,
        host: FakeHost,
        phys: FakePhys,
        control: FakeControl,
    }

    fn w(phys: &FakePhys, gpa: u64, bytes: &[u8]) {
        phys.write(0x1000_0000 + gpa, bytes);
    }

    fn as_bytes(m: &abi::ModuleInfo) -> &[u8] {
        // SAFETY: repr(C) plain data viewed as bytes.
        unsafe { core::slice::from_raw_parts((m as *const abi::ModuleInfo).cast::<u8>(), core::mem::size_of_val(m)) }
    }

    fn fixture(mode: Mode) -> Fixture {
        let phys = FakePhys::new(0x1000_0000, 16 << 20);
        // Page tables: PML4[511] -> PDPT, PDPT[510] -> PD, PD[i] -> 2 MiB page i.
        w(&phys, 0x1000 + 511 * 8, &(0x2000u64 | 3).to_le_bytes());
        w(&phys, 0x2000 + 510 * 8, &(0x3000u64 | 3).to_le_bytes());
        for i in 0..8u64 {
            w(&phys, 0x3000 + i * 8, &((i << 21) | 0x83).to_le_bytes());
        }
        // The layout the agent reports.
        let mut l = abi::KernelLayout {
            version: abi::STRUCT_VERSION,
            size: core::mem::size_of::<abi::KernelLayout>() as u32,
            text: abi::WireRange { start: K + TEXT, end: K + TEXT + 0x10_0000 },
            rodata: abi::WireRange { start: K + RODATA, end: K + RODATA + 0x1000 },
            syscall_table: abi::WireRange { start: K + SYSCALL_TABLE, end: K + SYSCALL_TABLE + 0x1000 },
            idt: abi::WireRange { start: K + IDT, end: K + IDT + 0x1000 },
            entry_syscall: K + ENTRY_SYSCALL,
            ksymtab: abi::WireRange { start: K + KSYMTAB, end: K + KSYMTAB + 72 },
            kernel_page_table: K + 0x1000,
            ..Default::default()
        };
        l.poke_routines[0] = abi::WireRange { start: K + TEXT + 0x5000, end: K + TEXT + 0x5100 };
        // The image's .data, and the struct page array with one protected cache.
        l.sensitive[1] = abi::WireRange { start: K + KERNEL_DATA, end: K + KERNEL_DATA + 0x1000 };
        l.page_structs = K + VMEMMAP;
        l.page_struct_size = 64;
        l.slab_cache_offset = 24;
        l.protected_caches[0] = CRED_JAR;
        // Credentials 0xc0 bytes apart, their reference count first.
        l.protected_strides[0] = 0xc0;
        l.object_fields[0] = abi::ObjectField { cache: 1, offset: 0, size: 4, reserved: 0 };
        l.shared[0] = abi::WireRange { start: K + KERNEL_DATA + 0x94, end: K + KERNEL_DATA + 0x98 };
        // pgd_list in the image's data, holding one process's top-level
        // table (two pages, as with page-table isolation), linked through
        // its struct page: PGD[0] -> PDPT -> PD -> PT; PGD[511] -> the
        // kernel's PDPT, shared.
        l.pgd_list = K + PGD_LIST;
        l.pgd_link_offset = 8;
        l.pgd_pages = 2;
        // A top-level table's struct page names its mm_struct here; the
        // mm_structs' cache.
        l.pgd_owner_offset = 32;
        // The agent's tracepoint keeps its probe list's address in .data.
        l.probe_lists[0] = K + PROBE_LIST_AT;
        l.protected_caches[abi::MM_CACHE_SLOT] = MM_CACHE;
        // Page tables typed in their struct page as 6.1 types them.
        l.page_type_offset = 48;
        l.page_table_mask = 0xf000_0200;
        l.page_table_value = 0xf000_0000;
        let link = K + VMEMMAP + (PROCESS_PGD >> 12) * 64 + 8;
        w(&phys, PGD_LIST, &link.to_le_bytes());
        w(&phys, VMEMMAP + (PROCESS_PGD >> 12) * 64 + 8, &(K + PGD_LIST).to_le_bytes());
        for (table, index, next) in [
            (PROCESS_PGD, 0, PROCESS_PDPT),
            (PROCESS_PGD + 0x1000, 0, PROCESS_PDPT),
            (PROCESS_PGD, 511, 0x2000),
            (PROCESS_PDPT, 0, PROCESS_PD),
            (PROCESS_PD, 3, PROCESS_PT),
            (PROCESS_PT, 7, HEAP_PAGE),
        ] {
            w(&phys, table + index * 8, &(next | 7).to_le_bytes());
        }
        // SAFETY: repr(C) plain data viewed as bytes.
        let bytes = unsafe {
            core::slice::from_raw_parts((&l as *const abi::KernelLayout).cast::<u8>(), core::mem::size_of_val(&l))
        };
        w(&phys, LAYOUT, bytes);
        // __ksymtab: printk, set_memory_rw and a retpoline thunk, PREL32.
        for (i, (value, name, text)) in [
            (PRINTK, NAMES, &b"printk\0"[..]),
            (SET_MEMORY_RW, NAMES + 0x10, &b"set_memory_rw\0"[..]),
            (THUNK_RAX, NAMES + 0x20, &b"__x86_indirect_thunk_rax\0"[..]),
            (MEMCPY, NAMES + 0x40, &b"memcpy\0"[..]),
            (SYMBOL_GET, NAMES + 0x50, &b"__symbol_get\0"[..]),
            (SEQ_PUTS, NAMES + 0x60, &b"seq_puts\0"[..]),
        ]
        .iter()
        .enumerate()
        {
            let at = KSYMTAB + i as u64 * 12;
            w(&phys, at, &((*value as i64 - at as i64) as i32).to_le_bytes());
            w(&phys, at + 4, &((*name as i64 - (at + 4) as i64) as i32).to_le_bytes());
            w(&phys, *name, text);
        }
        // One present interrupt gate.
        let h = K + HANDLER;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
        gate[5] = 0x8e;
        gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
        w(&phys, IDT + 14 * 16, &gate);
        // A module: one code page holding `mov [rax], rbx`, one data page.
        let mut m = abi::ModuleInfo::default();
        m.name[..4].copy_from_slice(b"evil");
        m.code[0] = abi::WireRange { start: K + MODULE_CODE, end: K + MODULE_CODE + 0x1000 };
        m.data[0] = abi::WireRange { start: K + MODULE_DATA, end: K + MODULE_DATA + 0x1000 };
        m.entries = K + MODULE_ENTRIES;
        m.entry_count = 1;
        m.module = K + MODULE_STRUCT;
        m.module_size = 0x100;
        w(&phys, MODULE_INFO, as_bytes(&m));
        w(&phys, MODULE_ENTRIES, &(K + MODULE_CODE).to_le_bytes());
        w(&phys, MODULE_CODE + 0x10, &[0x48, 0x89, 0x18]);
        w(&phys, MODULE_STRUCT, &abi::module_state::COMING.to_le_bytes());
        // The agent, pinned by its code.
        let mut a = abi::ModuleInfo { module: K + AGENT_DATA, module_size: 0x100, ..Default::default() };
        a.name[..abi::AGENT_NAME.len()].copy_from_slice(abi::AGENT_NAME.as_bytes());
        a.code[0] = abi::WireRange { start: K + AGENT_CODE, end: K + AGENT_CODE + 0x1000 };
        a.data[0] = abi::WireRange { start: K + AGENT_DATA, end: K + AGENT_DATA + 0x1000 };
        w(&phys, AGENT_INFO, as_bytes(&a));
        w(&phys, AGENT_VMCALL, &[0x0f, 0x01, 0xc1]);
        w(&phys, AGENT_DATA, &abi::module_state::COMING.to_le_bytes());
        w(&phys, VMEMMAP + (CRED_PAGE >> 12) * 64 + 24, &CRED_JAR.to_le_bytes());
        w(&phys, VMEMMAP + (MM_PAGE >> 12) * 64 + 24, &MM_CACHE.to_le_bytes());
        let mut agent_code = alloc::vec![0u8; 0x1000];
        agent_code[0x40..0x43].copy_from_slice(&[0x0f, 0x01, 0xc1]);
        let agent = Entry {
            name: abi::AGENT_NAME.into(),
            text_len: 0x1000,
            sha256: sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &agent_code)).into(),
            masks: alloc::vec![],
            ..Default::default()
        };

        let mut guest = test_guest();
        guest.platform = crate::guest::Platform::PassThrough { pm1a_control: None, lapic: None };
        guest.integrity = Some(GuestIntegrity::new(mode, alloc::vec![agent]));
        guest.integrity.as_mut().unwrap().api = alloc::sync::Arc::new(api_policy(API));
        let mut vcpu = FakeVcpu::new();
        vcpu.write(Field::Cr0, 0x8000_0031);
        vcpu.write(Field::Cr3, 0x1000);
        vcpu.write(Field::Cr4, 0x20);
        vcpu.write(Field::Efer, 0x500);
        vcpu.write(Field::CsAccessRights, 0xa09b);
        vcpu.write(Field::IdtrBase, K + IDT);
        vcpu.write(Field::Rsp, K + STACK);
        let mut host = FakeHost::default();
        host.msrs.insert(MSR_LSTAR, K + ENTRY_SYSCALL);
        Fixture { guest, vcpu, host, phys, control: FakeControl::default() }
    }

    /// The fixture kernel's API policy: printk allowed, set_memory_rw in a group.
    const API: &str = "ctvm.api v1 kernel=test\ngroup code-permissions\nallow printk\nallow memcpy\nallow seq_puts\n\
                       deny code-permissions set_memory_rw\n";

    fn api_policy(text: &str) -> api::ApiPolicy {
        api::ApiPolicy::parse(text).unwrap()
    }

    impl Fixture {
        fn exit(&mut self, exit: ExitInfo) -> Action {
            let mut ctx = ExitContext {
                guest: &mut self.guest,
                vcpu: &mut self.vcpu,
                exit: &exit,
                host: &self.host,
                phys: &self.phys,
                control: Some(&mut self.control),
            };
            dispatch(&mut ctx)
        }

        /// A hypercall from the agent's VMCALL.
        fn call(&mut self, nr: u64, rbx: u64, rcx: u64) -> i64 {
            self.call_at(K + AGENT_VMCALL, nr, rbx, rcx)
        }

        fn call_at(&mut self, rip: u64, nr: u64, rbx: u64, rcx: u64) -> i64 {
            self.vcpu.write(Field::Rip, rip);
            self.vcpu.regs.rax = nr;
            self.vcpu.regs.rbx = rbx;
            self.vcpu.regs.rcx = rcx;
            self.exit(ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() });
            self.vcpu.regs.rax as i64
        }

        fn ept(&mut self, access: u64, gpa: u64, gva: u64, rip: u64) -> Action {
            self.vcpu.write(Field::Rip, rip);
            let q = access | (1 << 7) | (1 << 8);
            self.exit(ExitInfo {
                reason: reason::EPT_VIOLATION,
                qualification: q,
                guest_physical: gpa,
                guest_linear: gva,
                ..Default::default()
            })
        }

        /// The 16 KiB at STACK are a task's stack: its end-of-stack mark.
        fn mark_stack(&mut self) {
            w(&self.phys, STACK, &STACK_END_MAGIC.to_le_bytes());
        }

        fn register_everything(&mut self) -> u32 {
            let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
            assert_eq!(self.call(0x10, K + LAYOUT, layout_size), 0, "kernel registered");
            let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
            assert_eq!(self.call(0x11, K + AGENT_INFO, info_size), 1, "locked; the agent is module 1");
            let id = self.call(0x12, K + MODULE_INFO, info_size);
            assert!(id > 0, "module registered: {id}");
            id as u32
        }
    }

    const READ: u64 = 1;
    const WRITE: u64 = 2;
    const FETCH: u64 = 4;

    #[test]
    fn the_api_policy_is_an_allow_list() {
        // A kernel export the policy does not name is denied like a grouped
        // one (another kernel, a renamed API); an empty policy denies all.
        for (text, denied) in [
            ("ctvm.api v1 kernel=test\ngroup code-permissions\ndeny code-permissions set_memory_rw\n", 5),
            ("ctvm.api v1 kernel=other\n", 5),
        ] {
            let mut f = fixture(Mode::Enforce);
            f.guest.integrity.as_mut().unwrap().api = alloc::sync::Arc::new(api_policy(text));
            let id = f.register_everything();
            let state = f.guest.integrity.as_ref().unwrap();
            assert_eq!(state.engine.layout().unwrap().denied_entries.len(), denied, "{text}");
            assert_eq!(state.denied_apis.get(&(K + PRINTK)).map(|d| d.group.as_str()), Some("unlisted"));
            // The module's call to printk is now refused with -EPERM, reported.
            let module = View::Module(id);
            f.guest.integrity.as_mut().unwrap().local.view = module;
            f.control.active = Some(module);
            w(&f.phys, STACK, &(K + MODULE_CODE + 0x40).to_le_bytes());
            f.vcpu.write(Field::Rsp, K + STACK);
            assert_eq!(f.ept(FETCH | READ, TEXT + 0x1000, K + PRINTK, K + PRINTK), Action::Resume);
            assert_eq!(f.vcpu.read(Field::Rip), K + MODULE_CODE + 0x40);
            assert_eq!(f.vcpu.regs.rax as i64, -1);
            assert_eq!(f.control.active, Some(module), "still in the module's view");
            let v = f.guest.integrity.as_mut().unwrap().engine.violations.take(8).last().unwrap();
            assert_eq!((v.kind, v.target), (ViolationKind::CallDeniedApi as u32, K + PRINTK));
        }
    }

    #[test]
    fn registration_protects_the_kernel_and_isolates_the_module() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let e = &f.guest.integrity.as_ref().unwrap().engine;
        // The thunk, known by its exported name, is a branch to judge, not an entry.
        let entries = alloc::vec![K + PRINTK, K + SET_MEMORY_RW, K + MEMCPY, K + SYMBOL_GET, K + SEQ_PUTS];
        assert_eq!(e.layout().unwrap().entries, entries);
        // __symbol_get fails with NULL: refused, it returns NULL.
        assert_eq!(e.layout().unwrap().null_on_failure, alloc::vec![K + SYMBOL_GET]);
        assert_eq!(e.layout().unwrap().thunk_register(K + THUNK_RAX), Some(0));
        // memcpy is an entry that writes where its caller points.
        let deputies: Vec<u64> = e.layout().unwrap().deputies.iter().map(|d| d.0).collect();
        assert_eq!(deputies, alloc::vec![K + MEMCPY, K + SEQ_PUTS]);
        assert_eq!(e.layout().unwrap().denied_entries, alloc::vec![K + SET_MEMORY_RW, K + SYMBOL_GET]);
        let denied = &f.guest.integrity.as_ref().unwrap().denied_apis;
        assert_eq!(
            denied.get(&(K + SET_MEMORY_RW)).map(|d| (d.name.as_str(), d.group.as_str())),
            Some(("set_memory_rw", "code-permissions"))
        );
        assert_eq!(denied.len(), 2, "set_memory_rw, and __symbol_get (unlisted)");
        assert_eq!(e.layout().unwrap().gates, alloc::vec![(14, K + HANDLER)]);
        // The kernel view: text RX, the syscall table and IDT read-only, module code not executable.
        assert_eq!(f.control.perms(View::Kernel, TEXT), Some(Perms::RX));
        assert_eq!(f.control.perms(View::Kernel, SYSCALL_TABLE), Some(Perms::RX));
        assert_eq!(f.control.perms(View::Kernel, IDT), Some(Perms::RX));
        assert_eq!(f.control.perms(View::Kernel, MODULE_CODE), Some(Perms::READ));
        // The module's view: its code RX, its data RW but for the page of
        // its struct module (the kernel's structure), nothing else.
        assert_eq!(f.control.perms(View::Module(id), MODULE_CODE), Some(Perms::RX));
        assert_eq!(f.control.perms(View::Module(id), MODULE_DATA), Some(Perms::READ));
        assert_eq!(f.control.perms(View::Module(id), TEXT), None);
        // The kernel's own page tables (PML4, PDPT, PD) are the kernel's alone.
        for table in [0x1000, 0x2000, 0x3000] {
            assert_eq!(e.class_of(table), Some(PageClass::PageTable), "{table:#x}");
            assert_eq!(f.control.perms(View::Kernel, table), Some(Perms::RW));
        }
        // The registers that could undo it are guarded.
        assert_eq!(f.control.guarded, (CR0_WP, CR4_SMEP | CR4_SMAP));
        assert!(f.control.descriptor_tables);
        assert!(f.control.trapped_msrs.contains(&MSR_LSTAR));
        // A second registration or lock is refused.
        let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
        assert_eq!(f.call(0x10, K + LAYOUT, layout_size), Error::Locked.code());
        let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
        assert_eq!(f.call(0x11, K + AGENT_INFO, info_size), Error::Locked.code());
    }

    /// Registers the fixture's module (one code page holding `mov [rax], rbx`)
    /// under a policy that pins `evil` to that page with `byte` at 0x20.
    fn register_pinned(mode: Mode, byte: u8) -> (Fixture, u32) {
        register_pinned_calling(mode, byte, K + PRINTK)
    }

    /// The same, its code calling `callee` at 0x30 where the policy says
    /// the `.ko` calls printk.
    fn register_pinned_calling(mode: Mode, byte: u8, callee: u64) -> (Fixture, u32) {
        use crate::integrity::policy::{Reloc, Target};
        use sha2::Digest;
        let mut code = alloc::vec![0u8; 0x1000];
        code[0x10..0x13].copy_from_slice(&[0x48, 0x89, 0x18]);
        code[0x20] = byte;
        code[0x30] = 0xe8;
        // The masked byte counts for nothing, whatever the loader put there.
        code[0x11] = 0;
        let sha256 = sha2::Sha256::digest(&code).into();
        let call = Reloc { offset: 0x31, kind: 4, target: Target::Symbol("printk".into()), addend: -4, site: None };
        let entry = Entry {
            name: "evil".into(),
            text_len: 0x1000,
            sha256,
            masks: alloc::vec![(0x11, 1)],
            relocs: alloc::vec![call],
            ..Default::default()
        };
        let mut f = fixture(mode);
        let rel = callee.wrapping_sub(K + MODULE_CODE + 0x35) as u32;
        w(&f.phys, MODULE_CODE + 0x30, &[0xe8]);
        w(&f.phys, MODULE_CODE + 0x31, &rel.to_le_bytes());
        f.guest.integrity.as_mut().unwrap().trusted.push(entry);
        let id = f.register_everything();
        (f, id)
    }

    fn violation_kinds(f: &mut Fixture) -> Vec<u32> {
        let e = &mut f.guest.integrity.as_mut().unwrap().engine;
        e.violations.take(usize::MAX).map(|r| r.kind).collect()
    }

    #[test]
    fn trust_is_pinned_to_the_code_not_the_name() {
        // The code the policy pins: the module runs in the kernel view.
        let (mut f, id) = register_pinned(Mode::Enforce, 0);
        assert!(f.guest.integrity.as_ref().unwrap().engine.is_trusted(id));
        assert!(!f.control.views.contains(&id), "no view of its own");
        assert_eq!(f.control.perms(View::Kernel, MODULE_CODE), Some(Perms::RX));
        assert_eq!(violation_kinds(&mut f), [0u32; 0]);
        // The same name with one other byte: isolated, and reported.
        let (mut f, id) = register_pinned(Mode::Enforce, 0xcc);
        assert!(!f.guest.integrity.as_ref().unwrap().engine.is_trusted(id));
        assert!(f.control.views.contains(&id));
        assert_eq!(f.control.perms(View::Kernel, MODULE_CODE), Some(Perms::READ));
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CodeDigest as u32]);
        // Audit mode reports the mismatch and trusts it all the same.
        let (mut f, id) = register_pinned(Mode::Audit, 0xcc);
        assert!(f.guest.integrity.as_ref().unwrap().engine.is_trusted(id));
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CodeDigest as u32]);
    }

    #[test]
    fn a_look_alike_whose_call_points_elsewhere_is_isolated() {
        // Its bytes are the pinned ones; its call, which the `.ko` says is
        // to printk (resolved from the kernel's __ksymtab), goes to
        // set_memory_rw.
        let (mut f, id) = register_pinned_calling(Mode::Enforce, 0, K + SET_MEMORY_RW);
        assert!(!f.guest.integrity.as_ref().unwrap().engine.is_trusted(id));
        assert!(f.control.views.contains(&id));
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CodeDigest as u32]);
        assert_eq!(f.guest.integrity.as_ref().unwrap().symbols.get("printk"), Some(&Some(K + PRINTK)));
        // One byte past printk is elsewhere too.
        let (f, id) = register_pinned_calling(Mode::Enforce, 0, K + PRINTK + 1);
        assert!(!f.guest.integrity.as_ref().unwrap().engine.is_trusted(id));
    }

    #[test]
    fn a_lying_layout_is_refused() {
        let mut f = fixture(Mode::Enforce);
        f.host.msrs.insert(MSR_LSTAR, K + TEXT + 0x9000);
        let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
        assert_eq!(f.call(0x10, K + LAYOUT, layout_size), Error::InvalidArgument.code());
        let mut f = fixture(Mode::Enforce);
        f.vcpu.write(Field::IdtrBase, K + RODATA);
        assert_eq!(f.call(0x10, K + LAYOUT, layout_size), Error::InvalidArgument.code());
    }

    #[test]
    fn crossings_and_attacks_through_the_exit_path() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let module = View::Module(id);
        // The kernel calls the module's entry: switch to its view.
        w(&f.phys, STACK, &(K + TEXT + 0x77).to_le_bytes());
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        assert_eq!(f.control.active, Some(module));
        // The module writes the syscall table: refused, the instruction skipped.
        let rip = K + MODULE_CODE + 0x10;
        assert_eq!(f.ept(WRITE, SYSCALL_TABLE, K + SYSCALL_TABLE, rip), Action::Resume);
        assert_eq!(f.vcpu.read(Field::Rip), rip + 3, "mov [rax], rbx skipped");
        let last = f.guest.integrity.as_mut().unwrap().engine.violations.take(1).next().unwrap();
        assert_eq!(last.kind, ViolationKind::WriteSyscallTable as u32);
        // It reads kernel data: granted read-only in its view.
        assert_eq!(f.ept(READ, 0x20_0000, K + 0x20_0000, rip), Action::Resume);
        assert_eq!(f.control.perms(module, 0x20_0000), Some(Perms::READ));
        // It calls set_memory_rw: returns -EPERM to it instead.
        w(&f.phys, STACK, &(K + MODULE_CODE + 0x40).to_le_bytes());
        assert_eq!(f.ept(FETCH | READ, TEXT + 0x2000, K + SET_MEMORY_RW, K + SET_MEMORY_RW), Action::Resume);
        assert_eq!(f.vcpu.read(Field::Rip), K + MODULE_CODE + 0x40);
        assert_eq!(f.vcpu.regs.rax as i64, -1);
        assert_eq!(f.control.active, Some(module), "still in the module's view");
        // It looks a symbol up with __symbol_get: refused, NULL, as a failed lookup.
        f.vcpu.write(Field::Rsp, K + STACK);
        assert_eq!(f.ept(FETCH | READ, SYMBOL_GET, K + SYMBOL_GET, K + SYMBOL_GET), Action::Resume);
        assert_eq!((f.vcpu.read(Field::Rip), f.vcpu.regs.rax), (K + MODULE_CODE + 0x40, 0));
        // It calls printk: switch to the kernel view.
        f.vcpu.write(Field::Rsp, K + STACK);
        assert_eq!(f.ept(FETCH | READ, TEXT + 0x1000, K + PRINTK, K + PRINTK), Action::Resume);
        assert_eq!(f.control.active, Some(View::Kernel));
        // An isolated module's own VMCALL is refused.
        f.guest.integrity.as_mut().unwrap().local.view = module;
        assert_eq!(f.call(0x14, u64::from(id), 0), Error::NotPermitted.code());
    }

    #[test]
    fn text_poke_opens_one_page_for_one_instruction() {
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        let poke_rip = K + TEXT + 0x5010;
        assert_eq!(f.ept(WRITE, TEXT + 0x1000, K + PRINTK, poke_rip), Action::Resume);
        assert_eq!(f.control.perms(View::Kernel, TEXT + 0x1000), Some(Perms::RWX));
        assert!(f.control.monitor_trap);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.perms(View::Kernel, TEXT + 0x1000), Some(Perms::RX));
        assert!(!f.control.monitor_trap);
        assert_eq!(f.guest.integrity.as_ref().unwrap().engine.stats.pokes, 1);
    }

    #[test]
    fn without_the_monitor_trap_flag_a_trap_flag_steps_the_write() {
        let mut f = fixture(Mode::Enforce);
        f.control.no_monitor_trap = true;
        f.register_everything();
        f.vcpu.write(Field::Rflags, 0x2);
        assert_eq!(f.ept(WRITE, TEXT + 0x1000, K + PRINTK, K + TEXT + 0x5010), Action::Resume);
        assert!(!f.control.monitor_trap);
        assert!(f.control.debug_exits);
        assert_eq!(f.vcpu.read(Field::Rflags), 0x102);
        assert_eq!(f.control.perms(View::Kernel, TEXT + 0x1000), Some(Perms::RWX));
        let db = ExitInfo { reason: 0, interruption_info: 0x8000_0301, ..Default::default() };
        assert_eq!(f.exit(db), Action::Resume);
        assert_eq!(f.vcpu.read(Field::Rflags), 0x2);
        assert!(!f.control.debug_exits);
        assert_eq!(f.control.perms(View::Kernel, TEXT + 0x1000), Some(Perms::RX));
        assert_eq!(f.vcpu.injected(), None);
    }

    #[test]
    fn clearing_cr0_wp_after_the_lock_is_refused() {
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        f.vcpu.write(Field::Cr0ReadShadow, 0x8005_0033);
        f.vcpu.regs.rbx = 0x8004_0033; // WP cleared
        let exit =
            ExitInfo { reason: reason::CR_ACCESS, qualification: 3 << 8, instruction_len: 3, ..Default::default() };
        f.vcpu.write(Field::Rip, 0x1000);
        assert_eq!(f.exit(exit), Action::Resume);
        assert_eq!(f.vcpu.read(Field::Cr0ReadShadow), 0x8005_0033, "not written");
        assert_eq!(f.vcpu.read(Field::Rip), 0x1003);
        let v = f.guest.integrity.as_mut().unwrap().engine.violations.take(1).next().unwrap();
        assert_eq!(v.kind, ViolationKind::ControlRegister as u32);
        let _ = ViolationKind::ControlRegister;
    }

    // -------------------------------------------------------------------
    // Containment routes: the hypervisor never writes for a principal where
    // that principal could not write itself.
    // -------------------------------------------------------------------

    /// A user page at linear 0 (2 MiB, user, writable) at guest-physical 10 MiB.
    const USER_PAGE: u64 = 0xa0_0000;

    fn with_user_page(f: &mut Fixture) {
        w(&f.phys, 0x1000, &(0x4000u64 | 7).to_le_bytes());
        w(&f.phys, 0x4000, &(0x5000u64 | 7).to_le_bytes());
        w(&f.phys, 0x5000, &(USER_PAGE | 0x87).to_le_bytes());
    }

    fn as_user(f: &mut Fixture) {
        f.vcpu.write(Field::SsAccessRights, 0x93 | (3 << 5));
        f.vcpu.write(Field::CsAccessRights, 0xa0fb);
    }

    fn guest_bytes(f: &Fixture, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = alloc::vec![0u8; len];
        f.phys.read(0x1000_0000 + gpa, &mut b);
        b
    }

    /// A descriptor-table exit: `identity` (SGDT 0, SIDT 1, SLDT 0, STR 1 with
    /// reason 47) with a memory operand at [RAX].
    fn dtable_exit(f: &mut Fixture, reason: u16, identity: u64, at: u64) -> Action {
        f.vcpu.regs.rax = at;
        // 64-bit addresses, DS, no index, base RAX.
        let info = (2 << 7) | (3 << 15) | (1 << 22) | (identity << 28);
        f.exit(ExitInfo { reason, instruction_info: info, instruction_len: 3, ..Default::default() })
    }

    #[test]
    fn user_space_descriptor_table_stores_never_write_kernel_memory() {
        for (reason, identity) in [(reason::DESCRIPTOR_TABLE, 0), (reason::DESCRIPTOR_TABLE, 1), (47, 0), (47, 1)] {
            let mut f = fixture(Mode::Enforce);
            f.register_everything();
            as_user(&mut f);
            let before = guest_bytes(&f, SYSCALL_TABLE, 16);
            f.vcpu.write(Field::Rip, 0x1000);
            assert_eq!(dtable_exit(&mut f, reason, identity, K + SYSCALL_TABLE + 8), Action::Resume);
            assert_eq!(guest_bytes(&f, SYSCALL_TABLE, 16), before, "reason {reason} identity {identity}");
            // The page fault the processor would raise for a user write to a
            // supervisor page: present, write, user.
            assert_eq!(f.vcpu.injected(), Some((14, Some(7))), "reason {reason} identity {identity}");
            assert_eq!(f.vcpu.regs.cr2, K + SYSCALL_TABLE + 8);
            assert_eq!(f.vcpu.read(Field::Rip), 0x1000, "the instruction faults, it is not skipped");
        }
    }

    #[test]
    fn user_space_gets_what_umip_would_give_it() {
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        with_user_page(&mut f);
        as_user(&mut f);
        assert_eq!(dtable_exit(&mut f, reason::DESCRIPTOR_TABLE, 1, 0x100), Action::Resume);
        let mut want = alloc::vec![0u8, 0];
        want.extend_from_slice(&super::super::dtable::UMIP_DUMMY_IDT_BASE.to_le_bytes());
        assert_eq!(guest_bytes(&f, USER_PAGE + 0x100, 10), want, "limit 0 and the dummy base, not the real IDT");
        assert_eq!(dtable_exit(&mut f, 47, 1, 0x200), Action::Resume);
        assert_eq!(guest_bytes(&f, USER_PAGE + 0x200, 2), [0, 0]);
        // LIDT from user space: #GP, nothing loaded.
        f.vcpu.write(Field::IdtrBase, K + IDT);
        assert_eq!(dtable_exit(&mut f, reason::DESCRIPTOR_TABLE, 3, 0x100), Action::Resume);
        assert_eq!(f.vcpu.injected(), Some((13, Some(0))));
        assert_eq!(f.vcpu.read(Field::IdtrBase), K + IDT);
    }

    #[test]
    fn the_kernel_cannot_store_a_descriptor_table_over_protected_pages_either() {
        // SIDT by kernel code onto the syscall table, which the kernel view maps read-only.
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        let before = guest_bytes(&f, SYSCALL_TABLE, 16);
        f.vcpu.write(Field::Rip, K + TEXT + 0x10);
        w(&f.phys, TEXT + 0x10, &[0x0f, 0x01, 0x08]); // sidt [rax]
        assert_eq!(dtable_exit(&mut f, reason::DESCRIPTOR_TABLE, 1, K + SYSCALL_TABLE), Action::Resume);
        assert_eq!(guest_bytes(&f, SYSCALL_TABLE, 16), before);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteSyscallTable as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), K + TEXT + 0x13, "refused and skipped");
    }

    fn with_event_log(f: &mut Fixture) {
        let mut vtpm = crate::tpm::GuestTpm::new(alloc::boxed::Box::new(crate::tpm::fake::FakeTpm::default()));
        let event = crate::tpm::event_log::Event { pcr: 9, kind: 0xd, digest: [0x5a; 20], data: alloc::vec![b'k'; 64] };
        vtpm.log.push(&event).unwrap();
        f.guest.vtpm = Some(vtpm);
    }

    #[test]
    fn an_isolated_module_makes_no_hypercall_at_all() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        with_event_log(&mut f);
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        let before = guest_bytes(&f, SYSCALL_TABLE, 64);
        // The event log copied over the syscall table; the version; a shutdown.
        for (nr, rbx, rcx) in [(0x20, K + SYSCALL_TABLE, 64), (0, 0, 0), (1, 0, 0)] {
            f.vcpu.regs.rdx = 0;
            assert_eq!(f.call(nr, rbx, rcx), Error::NotPermitted.code(), "call {nr:#x}");
        }
        assert!(f.guest.is_running());
        assert_eq!(guest_bytes(&f, SYSCALL_TABLE, 64), before);
        let kinds = violation_kinds(&mut f);
        assert_eq!(kinds, [ViolationKind::Hypercall as u32; 3], "each attempt reported");
    }

    #[test]
    fn the_event_log_goes_only_where_the_kernel_may_write() {
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        with_event_log(&mut f);
        let before = guest_bytes(&f, SYSCALL_TABLE, 64);
        f.vcpu.regs.rdx = 0;
        assert_eq!(f.call(0x20, K + SYSCALL_TABLE, 64), Error::BadAddress.code());
        assert_eq!(guest_bytes(&f, SYSCALL_TABLE, 64), before);
        // Into kernel data it may write: the log's size comes back.
        let size = f.call(0x20, K + STACK - 0x1000, 64);
        assert!(size > 64, "{size}");
        assert_ne!(guest_bytes(&f, STACK - 0x1000, 64), [0u8; 64]);
    }

    #[test]
    fn user_space_hypercalls_are_refused_and_counted() {
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        as_user(&mut f);
        for nr in [0u64, 1, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x20] {
            assert_eq!(f.call(nr, 0, 0), Error::NotPermitted.code(), "call {nr:#x}");
        }
        assert!(f.guest.is_running());
        assert_eq!(f.guest.refusals.seen().collect::<Vec<_>>(), [("hypercall", 9)]);
        // Not in the agent's log: user space cannot flood it.
        assert_eq!(violation_kinds(&mut f), [0u32; 0]);
    }

    #[test]
    fn a_module_view_gets_no_more_than_the_kernel_view() {
        // The local APIC's page: read-only in the kernel view, so that its
        // writes (the ICR's INIT and start-up IPIs) are checked.
        const LAPIC: u64 = 0xfee0_0000;
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.control.set_perms(View::Kernel, LAPIC, Perms::READ).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        f.control.active = Some(View::Module(id));
        let rip = K + MODULE_CODE + 0x10;
        // A write is not granted: it goes on to the APIC's emulation (here,
        // with no LAPIC configured, the guest stops for the access).
        let a = f.ept(WRITE, LAPIC + 0x300, 0xffff_c900_0000_0300, rip);
        assert!(matches!(a, Action::Stop(StopReason::EptViolation { .. })), "{a:?}");
        assert_eq!(f.control.perms(View::Module(id), LAPIC), None);
        // A read is granted, read-only.
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.control.set_perms(View::Kernel, LAPIC, Perms::READ).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        assert_eq!(f.ept(READ, LAPIC, 0xffff_c900_0000_0000, rip), Action::Resume);
        assert_eq!(f.control.perms(View::Module(id), LAPIC), Some(Perms::READ));
    }

    /// The fixture registered, running in its module's view at `rip`.
    fn in_module(rip: u64) -> (Fixture, u32) {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.control.activate_view(View::Module(id)).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        f.vcpu.write(Field::Rip, rip);
        (f, id)
    }

    #[test]
    fn events_leave_a_module_through_the_hypervisor() {
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        assert!(f.control.events_exit, "in a module's view every event exits");
        // The timer interrupt (acknowledged on exit) while interrupts are on.
        f.vcpu.write(Field::Rflags, 0x202);
        let timer =
            ExitInfo { reason: reason::EXTERNAL_INTERRUPT, interruption_info: 0x8000_00ec, ..Default::default() };
        assert_eq!(f.exit(timer), Action::Resume);
        assert_eq!(f.control.active, Some(View::Kernel), "delivered in the kernel view");
        assert!(!f.control.events_exit);
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo), 0x8000_00ec);
        // Its handler's iretq comes back to the interrupted instruction, at its RSP.
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, rip, rip), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)));
    }

    #[test]
    fn an_interrupt_after_a_branch_out_waits_for_the_branchs_judgement() {
        // The module's `call set_memory_rw` is done; the fetch there, which
        // exits and is judged, is not. A timer interrupt exits first.
        let target = K + SET_MEMORY_RW;
        let (mut f, id) = in_module(target);
        f.vcpu.write(Field::Rflags, 0x202);
        w(&f.phys, STACK, &(K + MODULE_CODE + 0x20).to_le_bytes());
        let timer =
            ExitInfo { reason: reason::EXTERNAL_INTERRUPT, interruption_info: 0x8000_00ec, ..Default::default() };
        assert_eq!(f.exit(timer), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)), "not taken in the kernel view at the target");
        assert_eq!(f.vcpu.injected(), None);
        assert!(!f.control.interrupt_window, "no window before the fetch: it would exit again at once");
        // The fetch exits and the call is refused; the interrupt waits for its window.
        f.ept(FETCH | READ, SET_MEMORY_RW, target, target);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CallDeniedApi as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), K + MODULE_CODE + 0x20, "the refused call returns");
        assert!(f.control.interrupt_window);
        assert_eq!(f.exit(ExitInfo { reason: reason::INTERRUPT_WINDOW, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.active, Some(View::Kernel));
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo), 0x8000_00ec);
    }

    #[test]
    fn a_trap_after_a_branch_out_does_not_carry_it_past_its_judgement() {
        // The module sets the trap flag and calls set_memory_rw: the
        // single-step trap exits with RIP at the target.
        let target = K + SET_MEMORY_RW;
        let (mut f, id) = in_module(target);
        f.vcpu.write(Field::Rflags, 0x302);
        let db = ExitInfo { reason: reason::EXCEPTION_OR_NMI, interruption_info: 0x8000_0301, ..Default::default() };
        assert_eq!(f.exit(db), Action::Resume);
        assert_eq!(f.vcpu.read(Field::Rflags), 0x202, "the trap flag cleared: no trap is due again");
        assert_eq!(f.control.active, Some(View::Module(id)), "the fetch comes first");
        assert_eq!(f.vcpu.injected(), None);
        // An NMI there waits too, and is delivered as an NMI.
        let nmi = ExitInfo { reason: reason::EXCEPTION_OR_NMI, interruption_info: 0x8000_0202, ..Default::default() };
        f.vcpu.write(Field::Rflags, 0x202);
        assert_eq!(f.exit(nmi), Action::Resume);
        assert_eq!((f.control.active, f.vcpu.injected()), (Some(View::Module(id)), None));
        w(&f.phys, STACK, &(K + MODULE_CODE + 0x20).to_le_bytes());
        f.ept(FETCH | READ, SET_MEMORY_RW, target, target);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CallDeniedApi as u32]);
        assert_eq!(f.exit(ExitInfo { reason: reason::INTERRUPT_WINDOW, ..Default::default() }), Action::Resume);
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo), 0x8000_0202);
    }

    #[test]
    fn the_guests_own_trap_during_a_monitor_trap_step_is_no_end_of_step() {
        // A `call` whose push is let through alone (beside the module's
        // struct module, as a stack write beside a kernel frame is) with
        // the trap flag set: its #DB exits before the monitor trap does.
        let (mut f, id) = in_module(K + MODULE_CODE + 0x10);
        let module = View::Module(id);
        assert_eq!(f.ept(WRITE, MODULE_DATA + 0x10, K + MODULE_DATA + 0x10, K + MODULE_CODE + 0x10), Action::Resume);
        assert!(f.control.monitor_trap);
        f.vcpu.write(Field::Rip, K + SET_MEMORY_RW);
        f.vcpu.write(Field::Rflags, 0x302);
        let db = ExitInfo { reason: reason::EXCEPTION_OR_NMI, interruption_info: 0x8000_0301, ..Default::default() };
        assert_eq!(f.exit(db), Action::Resume);
        assert_eq!(f.vcpu.injected(), None);
        assert!(f.control.monitor_trap, "still stepping: the page closes at the monitor trap");
        assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::RW));
        f.vcpu.write(Field::Rflags, 0x302);
        f.vcpu.write(Field::PendingDebugExceptions, 1 << 14);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::READ));
        assert_eq!(f.vcpu.read(Field::PendingDebugExceptions), 0, "no single step pending past the exit");
        assert_eq!(f.vcpu.read(Field::Rflags), 0x202);
        // And the call is judged at its fetch.
        w(&f.phys, STACK, &(K + MODULE_CODE + 0x20).to_le_bytes());
        f.ept(FETCH | READ, SET_MEMORY_RW, K + SET_MEMORY_RW, K + SET_MEMORY_RW);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CallDeniedApi as u32]);
    }

    #[test]
    fn a_modules_own_trap_flag_does_not_carry_a_stepped_call_past_its_judgement() {
        // Without the monitor trap flag, a step is a trap flag of CTVM's; the
        // module had set its own, and the stepped instruction is a `call`.
        for branch in [true, false] {
            let writer = K + MODULE_CODE + 0x10;
            let (mut f, id) = in_module(writer);
            f.control.no_monitor_trap = true;
            let module = View::Module(id);
            f.vcpu.write(Field::Rflags, 0x302);
            assert_eq!(f.ept(WRITE, MODULE_DATA + 0x10, K + MODULE_DATA + 0x10, writer), Action::Resume);
            assert!(f.control.debug_exits);
            let next = if branch { K + SET_MEMORY_RW } else { writer + 3 };
            f.vcpu.write(Field::Rip, next);
            let db =
                ExitInfo { reason: reason::EXCEPTION_OR_NMI, interruption_info: 0x8000_0301, ..Default::default() };
            assert_eq!(f.exit(db), Action::Resume);
            assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::READ), "the page closed");
            assert_eq!(f.control.debug_exits, branch, "#DB keeps exiting in a module's view, not in the kernel's");
            if branch {
                // No #DB delivered at the target: the fetch there is judged first.
                assert_eq!(f.vcpu.injected(), None);
                assert_eq!(f.control.active, Some(module));
                assert_eq!(f.vcpu.read(Field::Rflags), 0x202);
                w(&f.phys, STACK, &(K + MODULE_CODE + 0x20).to_le_bytes());
                f.ept(FETCH | READ, SET_MEMORY_RW, K + SET_MEMORY_RW, K + SET_MEMORY_RW);
                assert_eq!(violation_kinds(&mut f), [ViolationKind::CallDeniedApi as u32]);
            } else {
                // Its own single step inside its code: the #DB is due, in the kernel view.
                assert_eq!(f.vcpu.injected(), Some((1, None)));
                assert_eq!(f.control.active, Some(View::Kernel));
            }
        }
    }

    #[test]
    fn a_call_pushing_beside_the_kernels_frames_is_carried_out_not_stepped() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.mark_stack();
        // The kernel calls the module's entry with its return address at
        // STACK + 0x800, mid-page.
        let entry_rsp = K + STACK + 0x800;
        w(&f.phys, STACK + 0x800, &(K + TEXT + 0x9999).to_le_bytes());
        f.vcpu.write(Field::Rsp, entry_rsp);
        let entry = K + MODULE_CODE;
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, entry, entry), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)));
        // In its frame, it calls its own function: `call rel32`.
        let (at, callee) = (MODULE_CODE + 0x10, MODULE_CODE + 0x100);
        let rel = (callee - (at + 5)) as u32;
        w(&f.phys, at, &[&[0xe8][..], &rel.to_le_bytes()].concat());
        let rsp = entry_rsp - 0x40;
        f.vcpu.write(Field::Rsp, rsp);
        let push = STACK + 0x800 - 0x48;
        let before = guest_bytes(&f, STACK + 0x800, 0x10);
        assert_eq!(f.ept(WRITE, push, rsp - 8, K + at), Action::Resume);
        assert!(!f.control.monitor_trap, "not stepped");
        assert_eq!(f.vcpu.read(Field::Rip), K + callee);
        assert_eq!(f.vcpu.read(Field::Rsp), rsp - 8);
        assert_eq!(guest_bytes(&f, push, 8), (K + at + 5).to_le_bytes());
        assert_eq!(guest_bytes(&f, STACK + 0x800, 0x10), before, "the kernel's frame untouched");
        assert!(violation_kinds(&mut f).is_empty());
        // A call out of its code, to printk: the fetch its view would refuse
        // is judged in the same exit, and the kernel's view runs printk.
        let (at3, out3) = (MODULE_CODE + 0x30, PRINTK);
        let rel = (out3.wrapping_sub(at3 + 5)) as u32;
        w(&f.phys, at3, &[&[0xe8][..], &rel.to_le_bytes()].concat());
        f.vcpu.write(Field::Rsp, rsp);
        assert_eq!(f.ept(WRITE, push, rsp - 8, K + at3), Action::Resume);
        assert_eq!((f.vcpu.read(Field::Rip), f.control.active), (K + out3, Some(View::Kernel)));
        assert!(violation_kinds(&mut f).is_empty());
        // printk returns into the module.
        f.vcpu.write(Field::Rsp, rsp);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + at3 + 5, K + at3 + 5), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)));
        assert!(violation_kinds(&mut f).is_empty());
        // With its trap flag set, a call out of its code: the trap is
        // dropped with the flag, the fetch judged first.
        let (at2, out) = (MODULE_CODE + 0x20, PRINTK);
        let rel = (out.wrapping_sub(at2 + 5)) as u32;
        w(&f.phys, at2, &[&[0xe8][..], &rel.to_le_bytes()].concat());
        f.vcpu.write(Field::Rsp, rsp);
        f.vcpu.write(Field::Rflags, 0x302);
        assert_eq!(f.ept(WRITE, push, rsp - 8, K + at2), Action::Resume);
        assert_eq!((f.vcpu.read(Field::Rip), f.vcpu.read(Field::Rflags)), (K + out, 0x202));
        assert_eq!(f.vcpu.injected(), None);
        // A push onto the kernel's return address is no call of its own: refused.
        f.vcpu.write(Field::Rsp, entry_rsp + 8);
        assert_eq!(f.ept(WRITE, STACK + 0x800, entry_rsp, K + at), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32]);
        assert_eq!(guest_bytes(&f, STACK + 0x800, 0x10), before);
    }

    #[test]
    fn a_call_to_a_module_hands_it_the_out_parameter_in_its_callers_frame() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.mark_stack();
        // The caller's frame: an object at +0x20 above the entry, its own
        // return address (right after a call instruction) at +0x40.
        let entry_rsp = K + STACK + 0x800;
        let (caller, callers_caller) = (TEXT + 0x9999, TEXT + 0x8888);
        w(&f.phys, STACK + 0x800, &(K + caller).to_le_bytes());
        w(&f.phys, STACK + 0x840, &(K + callers_caller).to_le_bytes());
        w(&f.phys, callers_caller - 5, &[0xe8, 0, 0, 0, 0]);
        f.vcpu.write(Field::Rsp, entry_rsp);
        f.vcpu.regs().rdi = entry_rsp + 0x20;
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        f.vcpu.write(Field::Rsp, entry_rsp - 0x40);
        let writer = K + MODULE_CODE + 0x10;
        assert_eq!(f.ept(WRITE, STACK + 0x828, entry_rsp + 0x28, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty(), "the out-parameter is the module's to write");
        f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() });
        assert_eq!(f.ept(WRITE, STACK + 0x840, entry_rsp + 0x40, writer), Action::Resume);
        assert_eq!(
            violation_kinds(&mut f),
            [ViolationKind::WriteKernelStack as u32],
            "the frame's return address is not"
        );
        assert_eq!(f.guest.integrity.as_ref().map(|s| s.engine.is_quarantined(id)), Some(true));
    }

    #[test]
    fn an_interrupt_the_module_cannot_take_yet_waits_for_its_window() {
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        f.vcpu.write(Field::Rflags, 0x2); // cli
        let timer =
            ExitInfo { reason: reason::EXTERNAL_INTERRUPT, interruption_info: 0x8000_00ec, ..Default::default() };
        assert_eq!(f.exit(timer), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)), "still in the module");
        assert!(f.control.interrupt_window);
        assert_eq!(f.vcpu.injected(), None);
        // sti: the window opens; the interrupt is delivered in the kernel view.
        f.vcpu.write(Field::Rflags, 0x202);
        f.vcpu.write(Field::Rip, rip + 1);
        assert_eq!(f.exit(ExitInfo { reason: reason::INTERRUPT_WINDOW, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.active, Some(View::Kernel));
        assert!(!f.control.interrupt_window);
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo), 0x8000_00ec);
    }

    #[test]
    fn a_page_fault_in_a_module_is_delivered_with_its_address() {
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, _) = in_module(rip);
        let pf = ExitInfo {
            reason: reason::EXCEPTION_OR_NMI,
            interruption_info: 0x8000_0b0e,
            interruption_error: 2,
            qualification: 0x7f00_dead_0000,
            ..Default::default()
        };
        assert_eq!(f.exit(pf), Action::Resume);
        assert_eq!(f.vcpu.injected(), Some((14, Some(2))));
        assert_eq!(f.vcpu.regs.cr2, 0x7f00_dead_0000, "the handler needs CR2");
        assert_eq!(f.control.active, Some(View::Kernel));
    }

    #[test]
    fn a_jump_to_a_handler_with_a_forged_frame_is_no_interrupt() {
        // The module pushes a frame that would iretq into kernel text and
        // jumps to the page-fault handler: no event exited, so this is a jump.
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        w(&f.phys, STACK, &(K + TEXT + 0x9999).to_le_bytes());
        f.ept(FETCH | READ, TEXT + 0x4000, K + HANDLER, K + HANDLER);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::CallNonEntry as u32]);
        assert_eq!(f.vcpu.injected(), Some((13, Some(0))), "refused: the jump faults");
        // In the module's code, which has no fixup there: at the handler's
        // address, an exception-table entry there would have the kernel's
        // view run on from its fixup.
        let site = f.vcpu.read(Field::Rip);
        let engine = &f.guest.integrity.as_ref().unwrap().engine;
        assert!(engine.is_code_of(id, site), "{site:#x}");
        // The #GP is delivered in the kernel view, as any exception from a
        // module's view is: in the module's, its handler's fetch would be
        // refused in turn, again and again.
        assert_eq!(f.control.active, Some(View::Kernel));
        assert_eq!(f.guest.integrity.as_ref().unwrap().local.view, View::Kernel);
    }

    #[test]
    fn a_quarantined_module_is_entered_only_to_unload_it() {
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        w(&f.phys, SYSCALL_TABLE, &[0; 8]);
        assert_eq!(f.ept(WRITE, SYSCALL_TABLE, K + SYSCALL_TABLE, rip), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteSyscallTable as u32]);
        assert!(f.guest.integrity.as_ref().unwrap().engine.is_quarantined(id));
        // Back in the kernel, which calls the callback the module handed it.
        f.control.activate_view(View::Kernel).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        let caller = K + TEXT + 0x9999;
        w(&f.phys, STACK, &caller.to_le_bytes());
        let entry = K + MODULE_CODE;
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, entry, entry), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::EnterQuarantined as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), caller, "the kernel's call returns at once");
        assert_eq!(f.vcpu.regs().rax, EPERM.wrapping_neg());
        assert_eq!(f.control.active, Some(View::Kernel));
        // rmmod: the kernel set GOING in the structure the module cannot write.
        w(&f.phys, MODULE_STRUCT, &abi::module_state::GOING.to_le_bytes());
        f.vcpu.write(Field::Rip, caller);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, entry, entry), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.active, Some(View::Module(id)), "its exit routine runs");
    }

    #[test]
    fn what_a_module_can_write_the_kernel_cannot_execute() {
        // The shellcode route: the module writes a heap page, then makes
        // the kernel jump there through a function pointer.
        const HEAP: u64 = 0x50_0000;
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        assert_eq!(f.control.perms(View::Kernel, MODULE_DATA), Some(Perms::RW), "its own data: not executable");
        assert_eq!(f.ept(WRITE, HEAP, K + HEAP, rip), Action::Resume);
        assert_eq!(f.control.perms(View::Module(id), HEAP), Some(Perms::RW));
        assert_eq!(f.control.perms(View::Kernel, HEAP), Some(Perms::RW), "no longer executable for the kernel");
        f.control.activate_view(View::Kernel).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        for (page, gva) in [(HEAP, K + HEAP), (MODULE_DATA, K + MODULE_DATA)] {
            assert_eq!(f.ept(FETCH | READ, page, gva, gva), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::ExecuteData as u32], "{page:#x}");
            assert_eq!(f.vcpu.injected(), Some((13, Some(0))));
            f.vcpu.write(Field::EntryInterruptionInfo, 0);
        }
    }

    /// A page a module was granted (its task's stack, say) is freed and
    /// becomes an ftrace trampoline: once no module view can write it, the
    /// kernel runs its own code there; while one can, it may not (W^X).
    #[test]
    fn the_kernel_runs_its_code_in_a_page_no_module_can_write_any_more() {
        const HEAP: u64 = 0x50_0000;
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(rip);
        assert_eq!(f.ept(WRITE, HEAP, K + HEAP, rip), Action::Resume);
        assert_eq!(f.control.perms(View::Module(id), HEAP), Some(Perms::RW));
        f.control.activate_view(View::Kernel).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        let trampoline = K + HEAP;
        assert_eq!(f.ept(FETCH | READ, HEAP, trampoline, trampoline), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::ExecuteData as u32], "the module can write it");
        f.vcpu.write(Field::EntryInterruptionInfo, 0);
        // The agent drains: the grant is taken back.
        assert_eq!(f.call(0x15, K + AGENT_DATA + 0x800, 4), 0);
        assert_eq!(f.ept(FETCH | READ, HEAP, trampoline, trampoline), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.vcpu.injected(), None);
        assert_eq!(f.control.perms(View::Kernel, HEAP), Some(Perms::RWX));
        // The module writes it again: a new grant, and the kernel may not execute it.
        f.control.activate_view(View::Module(id)).unwrap();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        assert_eq!(f.ept(WRITE, HEAP, K + HEAP, rip), Action::Resume);
        assert_eq!(f.control.perms(View::Kernel, HEAP), Some(Perms::RW));
    }

    #[test]
    fn only_the_agents_code_drives_the_views() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let agent = f.guest.integrity.as_ref().unwrap().engine.agent().expect("pinned at the lock");
        w(&f.phys, MODULE_STRUCT, &abi::module_state::GOING.to_le_bytes());
        let before = f.control.clone();
        // Kernel code that is not the agent's (a module's deputy, or the
        // kernel itself): refused and reported, nothing changes.
        assert_eq!(f.call_at(K + PRINTK, 0x14, u64::from(id), 0), Error::NotPermitted.code());
        assert_eq!(f.call_at(K + PRINTK, 0x15, K + STACK, 16), Error::NotPermitted.code());
        // The agent's physical page through another linear address (a
        // page-table alias, here PD[6] -> the 2 MiB page holding it).
        w(&f.phys, 0x3000 + 6 * 8, &((4u64 << 21) | 0x83).to_le_bytes());
        let alias = K + (6 << 21) + (AGENT_VMCALL - (4 << 21));
        assert_eq!(f.call_at(alias, 0x14, u64::from(id), 0), Error::NotPermitted.code());
        let e = &mut f.guest.integrity.as_mut().unwrap().engine;
        assert!(e.modules().any(|m| m == id), "still registered");
        let records: Vec<_> = e.violations.take(usize::MAX).collect();
        assert_eq!(records.iter().map(|r| r.kind).collect::<Vec<_>>(), [ViolationKind::Hypercall as u32; 3]);
        assert!(records.iter().all(|r| r.module == u32::MAX), "reported for the kernel view");
        assert_eq!(f.control, before);
        // The agent itself is pinned for good.
        w(&f.phys, AGENT_DATA, &abi::module_state::GOING.to_le_bytes());
        assert_eq!(f.call(0x14, u64::from(agent), 0), Error::NotPermitted.code());
        // Its own calls work.
        assert_eq!(f.call(0x14, u64::from(id), 0), 0);
    }

    #[test]
    fn after_the_lock_only_the_agent_reaches_the_vtpm_store_channel() {
        // A module's deputy confirming a store that never happened would
        // release a held TPM response before its state is on disk.
        let mut f = fixture(Mode::Enforce);
        f.register_everything();
        let store = crate::tpm::fake::FakeStore::default();
        let reports = store.reports.clone();
        f.guest.vtpm = Some(crate::tpm::GuestTpm::new(alloc::boxed::Box::new(store)));
        w(&f.phys, MODULE_DATA, &[0xee; 16]);
        assert_eq!(f.call_at(K + PRINTK, 0x30, K + MODULE_DATA, 4096), Error::NotPermitted.code());
        assert_eq!(f.call_at(K + PRINTK, 0x31, 9, 0), Error::NotPermitted.code());
        let mut buffer = [0u8; 16];
        f.phys.read(0x1000_0000 + MODULE_DATA, &mut buffer);
        assert_eq!(buffer, [0xee; 16], "no blob handed over");
        assert!(reports.borrow().is_empty(), "no report taken");
        let e = &mut f.guest.integrity.as_mut().unwrap().engine;
        let kinds: Vec<_> = e.violations.take(usize::MAX).map(|r| r.kind).collect();
        assert_eq!(kinds, [ViolationKind::Hypercall as u32; 2]);
        // The agent's own calls are served.
        assert_eq!(f.call(0x30, K + MODULE_DATA, 4096), 12);
        assert_eq!(f.call(0x31, 9, 0), 0);
        assert_eq!(*reports.borrow(), [9]);
    }

    #[test]
    fn a_guest_that_never_locked_is_named_when_it_stops() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let mut f = fixture(mode);
            f.guest.config.integrity = Some(mode);
            let line = never_locked(&f.guest).expect("never locked");
            assert!(line.contains("ran without module isolation"), "{line}");
            f.register_everything();
            assert_eq!(never_locked(&f.guest), None, "locked");
        }
        let mut f = fixture(Mode::Enforce);
        f.guest.config.integrity = None;
        f.guest.integrity = None;
        assert_eq!(never_locked(&f.guest), None, "integrity=off asks for no lock");
    }

    /// The lock is what a quote must show: measured into PCR 11 with the
    /// agent's pinned digest and the mode, once, when it succeeds; a
    /// refused lock measures nothing.
    #[test]
    fn the_lock_is_measured_into_pcr_11() {
        use crate::tpm::config_event::{lock_event, IntegrityMode};
        for (mode, want) in [(Mode::Enforce, IntegrityMode::Enforce), (Mode::Audit, IntegrityMode::Audit)] {
            let mut f = fixture(mode);
            let mut vtpm = crate::tpm::GuestTpm::new(alloc::boxed::Box::new(crate::tpm::fake::FakeTpm::default()));
            vtpm.measure_launch(&[]).unwrap();
            f.guest.vtpm = Some(vtpm);
            f.register_everything();
            let agent = f.guest.integrity.as_ref().unwrap().trusted[0].sha256;
            let events = crate::tpm::event_log::parse(f.guest.vtpm.as_ref().unwrap().log.as_bytes()).unwrap();
            assert_eq!(events, [lock_event(vtpm_core::sha1, &agent, want)]);
            // A second lock is refused and measures nothing more.
            let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
            assert_eq!(f.call(0x11, K + AGENT_INFO, info_size), Error::Locked.code());
            assert_eq!(crate::tpm::event_log::parse(f.guest.vtpm.as_ref().unwrap().log.as_bytes()).unwrap().len(), 1);
        }
    }

    #[test]
    fn the_lock_pins_the_agent_or_the_guest_stops() {
        // Locks with `info` as the agent's registration: the stop's reason.
        fn lock_with(f: &mut Fixture, info: u64) -> alloc::string::String {
            let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
            assert_eq!(f.call(0x10, K + LAYOUT, layout_size), 0);
            f.vcpu.write(Field::Rip, K + AGENT_VMCALL);
            (f.vcpu.regs.rax, f.vcpu.regs.rbx, f.vcpu.regs.rcx) = (0x11, info, size_of::<abi::ModuleInfo>() as u64);
            let stop = f.exit(ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() });
            assert!(!f.guest.integrity.as_ref().unwrap().engine.is_locked());
            match stop {
                Action::Stop(StopReason::IntegrityRefused(why)) => why,
                other => panic!("{other:?}"),
            }
        }
        // Another module offering itself as the agent.
        assert!(lock_with(&mut fixture(Mode::Enforce), K + MODULE_INFO).contains("evil"));
        // The agent's name with other code: the same (in audit mode too).
        for mode in [Mode::Enforce, Mode::Audit] {
            let mut f = fixture(mode);
            w(&f.phys, AGENT_CODE + 0x100, &[0xcc]);
            assert!(lock_with(&mut f, K + AGENT_INFO).contains("sha256"));
        }
        // A guest that asks for integrity without naming the agent, or
        // without a kernel-API policy, does not boot.
        let api = Some(alloc::sync::Arc::new(api_policy(API)));
        assert!(GuestIntegrity::for_guest(Mode::Enforce, alloc::vec![], api.clone()).is_err());
        let agent = fixture(Mode::Enforce).guest.integrity.unwrap().trusted[0].clone();
        let err = GuestIntegrity::for_guest(Mode::Enforce, alloc::vec![agent.clone()], None).err().unwrap();
        assert!(err.contains("ctvm.api"), "{err}");
        let ok = GuestIntegrity::for_guest(Mode::Enforce, alloc::vec![agent], api).unwrap();
        assert_eq!(ok.api.kernel, "test");
    }

    #[test]
    fn a_gone_modules_code_is_scrubbed_before_the_kernel_gets_it_back() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        assert_ne!(guest_bytes(&f, MODULE_CODE + 0x10, 3), [0, 0, 0]);
        // Not going yet, as the kernel's own record says: refused.
        assert_eq!(f.call(0x14, u64::from(id), 0), Error::InvalidArgument.code());
        assert_ne!(guest_bytes(&f, MODULE_CODE + 0x10, 3), [0, 0, 0], "nothing scrubbed");
        w(&f.phys, MODULE_STRUCT, &abi::module_state::GOING.to_le_bytes());
        assert_eq!(f.call(0x14, u64::from(id), 0), 0, "unregistered");
        assert_eq!(guest_bytes(&f, MODULE_CODE, 0x1000), alloc::vec![0u8; 0x1000], "code scrubbed");
        assert_eq!(f.control.perms(View::Kernel, MODULE_CODE), Some(Perms::RWX));
        assert_eq!(f.control.perms(View::Kernel, MODULE_DATA), Some(Perms::RW), "data never executable");
        // A pointer it left behind into its old data: the kernel's jump is
        // a reported violation, not shellcode run.
        let gva = K + MODULE_DATA;
        assert_eq!(f.ept(FETCH | READ, MODULE_DATA, gva, gva), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::ExecuteData as u32]);
        assert_eq!(f.vcpu.injected(), Some((13, Some(0))));
    }

    /// A rootkit hides by unlinking its own `struct module` from the
    /// kernel's list: the neighbours' links are the kernel's (refused), and
    /// so are its own, though they lie in its data; else the list is left
    /// half-unlinked and the next walk of it oopses.
    #[test]
    fn a_module_cannot_write_its_own_struct_module() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let module = View::Module(id);
        assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::READ), "the page of its struct module");
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.control.active = Some(module);
        let writer = K + MODULE_CODE + 0x10;
        // Into the structure (its list links at +8): refused and skipped.
        let links = MODULE_STRUCT + 8;
        assert_eq!(f.ept(WRITE, links, K + links, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteProtectedData as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
        assert!(!f.control.monitor_trap);
        // Beside it, on the same page: let through alone, and the page closes again.
        assert_eq!(f.ept(WRITE, MODULE_DATA + 0x10, K + MODULE_DATA + 0x10, writer), Action::Resume);
        assert!(f.control.monitor_trap);
        assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::RW));
        w(&f.phys, MODULE_DATA + 0x10, &[0x5a; 8]);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.perms(module, MODULE_DATA), Some(Perms::READ));
        assert_eq!(guest_bytes(&f, MODULE_DATA + 0x10, 8), [0x5a; 8], "its own data written");
        assert!(violation_kinds(&mut f).is_empty());
        // A wide store that starts beside the structure and reaches into
        // it: put back after the step, and reported at the writer.
        let before = guest_bytes(&f, MODULE_STRUCT, 0x100);
        assert_eq!(f.ept(WRITE, MODULE_STRUCT - 0x20, K + MODULE_STRUCT - 0x20, writer), Action::Resume);
        w(&f.phys, MODULE_STRUCT - 0x20, &[0xee; 0x40]);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(guest_bytes(&f, MODULE_STRUCT, 0x100), before, "the structure put back");
        assert_eq!(guest_bytes(&f, MODULE_STRUCT - 0x20, 0x20), [0xee; 0x20], "its own bytes kept");
        let records: Vec<_> = f.guest.integrity.as_ref().unwrap().engine.violations.peek(4).copied().collect();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, ViolationKind::WriteProtectedData as u32);
        assert_eq!((records[0].rip, records[0].target), (writer, K + MODULE_STRUCT));
        let kernel_writes = f.control.perms(View::Kernel, MODULE_DATA);
        assert_eq!(kernel_writes, Some(Perms::RW), "the kernel still writes the structure");
    }

    /// Least privilege for the kernel's data: the image's .data and .bss,
    /// the objects of protected caches (found through the struct page
    /// array, itself unwritable) are refused; an ordinary heap page is
    /// granted, and the grant is taken back at the agent's next drain.
    #[test]
    fn a_module_writes_no_kernel_data_it_was_not_given() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let module = View::Module(id);
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.control.active = Some(module);
        let writer = K + MODULE_CODE + 0x10;
        let struct_page = VMEMMAP + (CRED_PAGE >> 12) * 64;
        for (gpa, kind) in [
            (KERNEL_DATA + 0x80, ViolationKind::WriteProtectedData),
            (struct_page + 24, ViolationKind::WriteProtectedData),
            (CRED_PAGE + 0x48, ViolationKind::WriteKernelObject),
        ] {
            f.vcpu.write(Field::Rip, writer);
            assert_eq!(f.ept(WRITE, gpa, K + gpa, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [kind as u32], "{gpa:#x}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
            assert_eq!(f.control.perms(module, gpa & !0xfff), None, "not granted");
        }
        // The kernel itself writes all of them.
        for page in [KERNEL_DATA, VMEMMAP] {
            assert_eq!(f.control.perms(View::Kernel, page), Some(Perms::RW));
        }
        // A shared reference count on the .data page: written, guarded; a
        // wide store reaching past it is put back beyond the field.
        w(&f.phys, KERNEL_DATA + 0x90, &[0x11; 16]);
        assert_eq!(f.ept(WRITE, KERNEL_DATA + 0x94, K + KERNEL_DATA + 0x94, writer), Action::Resume);
        assert!(f.control.monitor_trap);
        w(&f.phys, KERNEL_DATA + 0x94, &[0x22; 8]);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        let expected = [[0x11; 4], [0x22; 4], [0x11; 4], [0x11; 4]].concat();
        assert_eq!(guest_bytes(&f, KERNEL_DATA + 0x90, 16), expected);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteProtectedData as u32]);
        assert_eq!(f.control.perms(module, KERNEL_DATA), None, "closed again");
        // Starting with the end-of-stack mark makes no stack of a page with
        // no guard page below it (the direct map's pages).
        w(&f.phys, HEAP_PAGE, &STACK_END_MAGIC.to_le_bytes());
        assert_eq!(f.ept(WRITE, HEAP_PAGE + 8, K + HEAP_PAGE + 8, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::RW), "an ordinary heap page is granted");
        // The agent drains the log: the grant is taken back, to be judged
        // again (the page may serve credentials by then).
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        assert_eq!(f.call(0x15, K + AGENT_DATA + 0x800, 4), 0);
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::READ));
        f.guest.integrity.as_mut().unwrap().local.view = module;
        w(&f.phys, struct_page - (CRED_PAGE >> 12) * 64 + (HEAP_PAGE >> 12) * 64 + 24, &CRED_JAR.to_le_bytes());
        assert_eq!(f.ept(WRITE, HEAP_PAGE + 8, K + HEAP_PAGE + 8, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelObject as u32]);
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::READ), "no longer granted");
    }

    /// `get_cred` inlined in a module: the reference count of a protected
    /// object, and no byte beside it.
    #[test]
    fn a_module_changes_a_kernel_objects_reference_count_alone() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let count = CRED_PAGE + 2 * 0xc0;
        w(&f.phys, count, &[0x11; 16]);
        assert_eq!(f.ept(WRITE, count, K + count, writer), Action::Resume);
        assert!(f.control.monitor_trap, "stepped, not skipped");
        assert_eq!(f.control.perms(module, CRED_PAGE), Some(Perms::RW), "open for the one step");
        // A store as wide as 8 bytes: the uid after the count is put back.
        w(&f.phys, count, &[0x22; 8]);
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(guest_bytes(&f, count, 16), [[0x22; 4], [0x11; 4], [0x11; 4], [0x11; 4]].concat());
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteProtectedData as u32]);
        assert_eq!(f.control.perms(module, CRED_PAGE), None, "closed again");
        // A write beside the count, in the same object: refused.
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, count + 4, K + count + 4, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelObject as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
    }

    /// A guarded step compares the bytes beside the write before and after
    /// it: on several CPUs the kernel may write them meanwhile (the next
    /// object's own reference count, 0xc0 bytes on), and its write would
    /// be blamed on the module and undone. The step runs the guest alone,
    /// from before the bytes are kept; a step with no guard does not.
    #[test]
    fn a_guarded_step_runs_the_guest_alone() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let count = CRED_PAGE + 2 * 0xc0;
        assert_eq!(f.ept(WRITE, count, K + count, writer), Action::Resume);
        assert!(f.control.monitor_trap, "stepped");
        assert!(f.control.alone, "no other vCPU runs while the bytes beside the count are kept");
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        // A write to a heap page no object of the kernel's holds: granted, no guard.
        let (mut f, _) = in_module(writer);
        assert_eq!(f.ept(WRITE, HEAP_PAGE, K + HEAP_PAGE, writer), Action::Resume);
        assert_eq!(f.control.perms(View::Module(id), HEAP_PAGE), Some(Perms::RW));
        assert!(!f.control.alone, "nothing beside the write is compared");
    }

    /// A module asks memcpy to write for it: judged by the destination, as
    /// if the module wrote it itself, whether called directly or through a
    /// retpoline thunk.
    #[test]
    fn a_write_through_call_is_judged_by_its_destination() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let mut f = fixture(mode);
            let id = f.register_everything();
            let module = View::Module(id);
            let call_site = K + MODULE_CODE + 0x40;
            let call = |f: &mut Fixture, dest: u64, len: u64, through_thunk: bool| {
                f.guest.integrity.as_mut().unwrap().local.view = module;
                f.control.active = Some(module);
                f.vcpu.write(Field::Rsp, K + STACK);
                w(&f.phys, STACK, &call_site.to_le_bytes());
                f.vcpu.regs.rdi = dest;
                f.vcpu.regs.rdx = len;
                f.vcpu.regs.rax = K + MEMCPY;
                let (gpa, at) = if through_thunk { (THUNK_RAX, K + THUNK_RAX) } else { (MEMCPY, K + MEMCPY) };
                f.ept(FETCH | READ, gpa, at, at);
                let kinds = violation_kinds(f);
                (f.vcpu.read(Field::Rip), kinds)
            };
            let refused = [ViolationKind::DeputyWrite as u32];
            for (dest, len, thunk) in [
                (K + KERNEL_DATA + 0x10, 16, false),
                (K + KERNEL_DATA + 0x10, 16, true),
                (K + CRED_PAGE + 0x40, 8, false),
                // Its own struct module, and a range that runs into the .data page.
                (K + MODULE_STRUCT + 8, 16, false),
                (K + KERNEL_DATA - 8, 16, false),
                (K + HEAP_PAGE, crate::integrity::deputy::MAX_DESTINATION + 1, false),
            ] {
                let (rip, kinds) = call(&mut f, dest, len, thunk);
                assert_eq!(kinds, refused, "{mode:?} {dest:#x}+{len}");
                if mode == Mode::Enforce {
                    assert_eq!(rip, call_site, "returned to the caller");
                    assert_eq!(f.vcpu.regs.rax as i64, -1);
                    assert_eq!(f.control.active, Some(module));
                } else {
                    assert_eq!(f.control.active, Some(View::Kernel), "audit: the call goes on");
                }
            }
            // Its own data beside the structure, a heap page: the call goes on.
            for dest in [K + MODULE_DATA + 0x10, K + HEAP_PAGE + 0x100] {
                let (rip, kinds) = call(&mut f, dest, 16, false);
                assert!(kinds.is_empty(), "{dest:#x}");
                assert_eq!((rip, f.control.active), (K + MEMCPY, Some(View::Kernel)));
            }
        }
    }

    /// The probe list the agent's `task_newtask` probe sits in is a heap
    /// object the kernel calls through at every fork: a module may write
    /// the objects beside it, not the list, neither itself nor through a
    /// write-through call.
    #[test]
    fn a_probe_list_the_agent_hooks_is_no_modules_to_write() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        // One probe (function, data, priority), then the ending entry.
        let list = HEAP_PAGE + 0x100;
        w(&f.phys, PROBE_LIST_AT, &(K + list).to_le_bytes());
        w(&f.phys, list, &(K + AGENT_CODE).to_le_bytes());
        for (at, what) in [(list, "the probe's function"), (list + 8, "its data"), (list + 24, "the ending entry")] {
            f.vcpu.write(Field::Rip, writer);
            assert_eq!(f.ept(WRITE, at, K + at, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteProtectedData as u32], "{what}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "{what}: skipped");
            assert_eq!(f.control.perms(module, HEAP_PAGE), None, "{what}: not granted");
        }
        // An object beside it on the page: the write goes through alone.
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, HEAP_PAGE + 0x800, K + HEAP_PAGE + 0x800, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert!(f.control.monitor_trap, "stepped, not granted");
        let walks = f.guest.integrity.as_ref().unwrap().engine.stats.table_walks;
        assert_eq!(walks, 0, "a write stepped alone grants nothing: no walk for it");
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(f.control.perms(module, HEAP_PAGE), None, "closed again");
        // memcpy onto the list, for the module.
        let call_site = K + MODULE_CODE + 0x40;
        w(&f.phys, STACK, &call_site.to_le_bytes());
        f.vcpu.write(Field::Rsp, K + STACK);
        (f.vcpu.regs.rdi, f.vcpu.regs.rdx) = (K + list - 8, 16);
        f.ept(FETCH | READ, MEMCPY, K + MEMCPY, K + MEMCPY);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyWrite as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), call_site, "returned to the caller");
        // With the list elsewhere, the page is a heap page again.
        w(&f.phys, PROBE_LIST_AT, &0u64.to_le_bytes());
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, list + 8, K + list + 8, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::RW));
    }

    /// A `seq_file` the module (running at `writer`) forges in a heap page
    /// it is granted, naming a 256-byte buffer on that page: its address.
    fn forged_seq_file(f: &mut Fixture, writer: u64) -> u64 {
        let file = HEAP_PAGE + 0x100;
        assert_eq!(f.ept(WRITE, file, K + file, writer), Action::Resume);
        w(&f.phys, file, &(K + HEAP_PAGE + 0x800).to_le_bytes());
        w(&f.phys, file + 8, &0x100u64.to_le_bytes());
        file
    }

    /// A module's code runs on the stack the kernel entered it on. One that
    /// moves its stack pointer onto another task's stack would have its
    /// crossings end that task's frames: here, the `seq_puts` task A is
    /// inside, whose `seq_file` is held until it returns. Task B, entered
    /// on its own stack, points RSP above A's call and calls `printk`: the
    /// call is refused (`kind=stack-pivot`), A's call stays held, and B's
    /// write to the `seq_file` is refused. So is an interrupt taken there:
    /// no return point is left on A's stack for it.
    #[test]
    fn a_module_ends_no_other_tasks_crossings_from_its_stack() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let file = forged_seq_file(&mut f, writer);
        let enter = |f: &mut Fixture, rsp: u64| {
            f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
            f.control.active = Some(View::Kernel);
            w(&f.phys, rsp - K, &(K + TEXT + 0x9999).to_le_bytes());
            f.vcpu.write(Field::Rsp, rsp);
            assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
            assert_eq!(f.control.active, Some(module));
        };
        // Task A, entered at STACK + 0x800, calls seq_puts from its frame.
        let (a, b) = (K + STACK + 0x800, K + STACK + 0x1_0800);
        enter(&mut f, a);
        let call_site = K + MODULE_CODE + 0x40;
        w(&f.phys, a - 0x48 - K, &call_site.to_le_bytes());
        f.vcpu.write(Field::Rsp, a - 0x48);
        f.vcpu.regs.rdi = K + file;
        f.ept(FETCH | READ, SEQ_PUTS, K + SEQ_PUTS, K + SEQ_PUTS);
        assert!(violation_kinds(&mut f).is_empty());
        // Task B, entered on its own stack, calls printk with RSP above A's call.
        enter(&mut f, b);
        let pivot = a - 0x20;
        w(&f.phys, pivot - K, &(K + MODULE_CODE + 0x48).to_le_bytes());
        f.vcpu.write(Field::Rsp, pivot);
        assert_eq!(f.ept(FETCH | READ, TEXT + 0x1000, K + PRINTK, K + PRINTK), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::StackPivot as u32]);
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo) & 0xff, 13, "refused with #GP");
        // A's call is still held: B's write to the seq_file is refused.
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.control.active = Some(module);
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, file, K + file, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyInput as u32]);
        // An interrupt taken there leaves no return point on A's stack.
        let b_stack = Some(Range::new(b & !0x3fff, (b & !0x3fff) + 0x4000));
        f.guest.integrity.as_mut().unwrap().local.stack = b_stack;
        f.vcpu.write(Field::Rflags, 0x202);
        f.vcpu.write(Field::EntryInterruptionInfo, 0);
        let timer =
            ExitInfo { reason: reason::EXTERNAL_INTERRUPT, interruption_info: 0x8000_00ec, ..Default::default() };
        assert_eq!(f.exit(timer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::StackPivot as u32]);
        assert_eq!(f.vcpu.read(Field::EntryInterruptionInfo), 0x8000_00ec, "delivered all the same");
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.control.active = Some(module);
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, file, K + file, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyInput as u32], "still held");
        // On its own stack, B's call goes.
        f.guest.integrity.as_mut().unwrap().local.stack = b_stack;
        f.vcpu.write(Field::Rsp, b - 0x40);
        w(&f.phys, b - 0x40 - K, &(K + MODULE_CODE + 0x48).to_le_bytes());
        assert_eq!(f.ept(FETCH | READ, TEXT + 0x1000, K + PRINTK, K + PRINTK), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.active, Some(View::Kernel));
    }

    /// A task that died inside a call into a module (or left it through
    /// `do_exit`) leaves that crossing on its stack, and the kernel reuses
    /// the address (a `vmalloc` buffer). A module's write there is then a
    /// write to that memory, not to a stack's kernel frames: refusing it
    /// would break the benign module that owns the buffer. While the stack
    /// lives (its end-of-stack mark), the same write is refused.
    #[test]
    fn crossings_a_dead_task_left_make_no_stack_of_reused_memory() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        // The kernel called the module on the stack at STACK; that task is
        // still in it, or died there.
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        f.control.active = Some(View::Kernel);
        w(&f.phys, STACK + 0x800, &(K + TEXT + 0x9999).to_le_bytes());
        f.vcpu.write(Field::Rsp, K + STACK + 0x800);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)));
        // Another task in the module, on its own stack, writes above that
        // crossing: the kernel's frames while the task lives.
        f.mark_stack();
        let own = K + STACK + 0x1_0000;
        f.guest.integrity.as_mut().unwrap().local.stack = Some(Range::new(own, own + 0x4000));
        let at = STACK + 0x900;
        f.vcpu.write(Field::Rsp, K + STACK + 0x1_0800);
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, at, K + at, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32]);
        let memcpy = |f: &mut Fixture| {
            f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
            f.control.active = Some(View::Module(id));
            w(&f.phys, STACK + 0x1_0800, &(writer + 3).to_le_bytes());
            f.vcpu.write(Field::Rsp, K + STACK + 0x1_0800);
            (f.vcpu.regs.rdi, f.vcpu.regs.rdx) = (K + at, 8);
            f.ept(FETCH | READ, MEMCPY, K + MEMCPY, K + MEMCPY);
            violation_kinds(f)
        };
        assert_eq!(memcpy(&mut f), [ViolationKind::DeputyWrite as u32]);
        // The task is gone, its stack's address reused: no mark, and no
        // walk finds a stack there. The memory is a heap page's, for a
        // write-through call as for the module's own write.
        w(&f.phys, STACK, &0u64.to_le_bytes());
        assert!(memcpy(&mut f).is_empty());
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        f.control.active = Some(View::Module(id));
        f.vcpu.write(Field::Rsp, K + STACK + 0x1_0800);
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, at, K + at, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(View::Module(id), STACK), Some(Perms::RW));
    }

    /// What a write-through call was judged by (here a `seq_file` the
    /// module forged in a heap page of its own: the buffer and size the
    /// kernel writes by) must stay as judged until the call returns: a
    /// module (another of its threads, on another CPU or once the call is
    /// preempted) would otherwise point the buffer at `modprobe_path` once
    /// the check is done. The module's grant on the page is taken back;
    /// its write into the fields is refused, beside them let through
    /// alone; another call that would write them is refused. Once the call
    /// returns, the page is the module's again.
    #[test]
    fn what_a_write_through_call_was_judged_by_holds_until_it_returns() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let file = forged_seq_file(&mut f, writer);
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::RW), "a heap page of its own");
        // seq_puts(file, ...): judged by the buffer it names, and let go.
        let call_site = K + MODULE_CODE + 0x40;
        w(&f.phys, STACK, &call_site.to_le_bytes());
        f.vcpu.write(Field::Rsp, K + STACK);
        f.vcpu.regs.rdi = K + file;
        f.ept(FETCH | READ, SEQ_PUTS, K + SEQ_PUTS, K + SEQ_PUTS);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.active, Some(View::Kernel), "the call runs");
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::READ), "the grant taken back");
        // Meanwhile, the module: into the buffer pointer and the size, refused.
        let in_module = |f: &mut Fixture| {
            f.guest.integrity.as_mut().unwrap().local.view = module;
            f.control.active = Some(module);
            f.vcpu.write(Field::Rsp, K + STACK - 0x1000);
        };
        for at in [file, file + 12] {
            in_module(&mut f);
            assert_eq!(f.ept(WRITE, at, K + at, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyInput as u32], "{at:#x}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
        }
        // Beside them: let through alone, the page still not granted.
        in_module(&mut f);
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, file + 16, K + file + 16, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert!(f.control.monitor_trap, "stepped, not granted");
        // A wide store that reached from beside into the size is undone.
        w(&f.phys, file + 8, &0x1000_0000u64.to_le_bytes());
        assert_eq!(f.exit(ExitInfo { reason: reason::MONITOR_TRAP, ..Default::default() }), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyInput as u32]);
        assert_eq!(guest_bytes(&f, file + 8, 8), 0x100u64.to_le_bytes(), "put back");
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::READ), "closed again");
        // memcpy onto the size, for the module (from another task): refused.
        in_module(&mut f);
        let other_site = K + MODULE_CODE + 0x48;
        w(&f.phys, STACK - 0x1000, &other_site.to_le_bytes());
        (f.vcpu.regs.rdi, f.vcpu.regs.rdx) = (K + file + 8, 8);
        f.ept(FETCH | READ, MEMCPY, K + MEMCPY, K + MEMCPY);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyInput as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), other_site, "returned to the caller");
        // seq_puts returns: the page is a heap page of the module's again.
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        f.control.active = Some(View::Kernel);
        f.vcpu.write(Field::Rsp, K + STACK + 8);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, call_site, call_site), Action::Resume);
        assert_eq!(f.control.active, Some(module));
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, file, K + file, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(module, HEAP_PAGE), Some(Perms::RW));
    }

    /// A page table the kernel allocates after the lock (here a PT under
    /// the kernel's PD) is found at the agent's next drain: a module's grant
    /// on it is taken back and its writes are refused from then on.
    #[test]
    fn page_tables_allocated_after_the_lock_are_protected() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        let module = View::Module(id);
        let new_table = 0xd0_0000;
        let writer = K + MODULE_CODE + 0x10;
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.control.active = Some(module);
        assert_eq!(f.ept(WRITE, new_table, K + new_table, writer), Action::Resume);
        assert_eq!(f.control.perms(module, new_table), Some(Perms::RW), "a heap page, for now");
        // The kernel makes it a table: PD[9] -> it.
        w(&f.phys, 0x3000 + 9 * 8, &(new_table | 3).to_le_bytes());
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        assert_eq!(f.call(0x15, K + AGENT_DATA + 0x800, 4), 0);
        let e = &f.guest.integrity.as_ref().unwrap().engine;
        assert_eq!(e.class_of(new_table), Some(PageClass::PageTable));
        assert_eq!(e.class_of(0x3000), Some(PageClass::PageTable), "the PD, since the lock");
        assert_eq!(f.control.perms(module, new_table), Some(Perms::READ));
        assert_eq!(f.control.perms(View::Kernel, new_table), Some(Perms::RW), "the kernel writes it, never runs it");
        f.guest.integrity.as_mut().unwrap().local.view = module;
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, new_table + 8, K + new_table + 8, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
    }

    /// A process's page tables, at every level and in both halves of its
    /// top-level pair, are found through pgd_list at the lock: no module
    /// writes them. When the process goes, the class goes too, and the
    /// pages are the kernel's (executable) and a module's heap again; a
    /// kernel table its top level pointed at stays protected.
    #[test]
    fn process_page_tables_are_protected_while_they_live() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let tables = [PROCESS_PGD, PROCESS_PGD + 0x1000, PROCESS_PDPT, PROCESS_PD, PROCESS_PT];
        let e = &f.guest.integrity.as_ref().unwrap().engine;
        for t in tables {
            assert_eq!(e.class_of(t), Some(PageClass::PageTable), "{t:#x}");
            assert!(e.is_process_table(t), "{t:#x}");
            assert_eq!(f.control.perms(View::Kernel, t), Some(Perms::RW), "{t:#x}");
        }
        assert!(!e.is_process_table(0x2000), "the kernel's PDPT stays the kernel's");
        assert_eq!(e.class_of(HEAP_PAGE), None, "a page a PT maps is no table");
        for t in tables {
            assert_eq!(f.ept(WRITE, t + 0x18, 0xffff_8880_0000_0000 + t, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32], "{t:#x}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
        }
        // The process exits: pgd_list is empty, and the agent drains.
        w(&f.phys, PGD_LIST, &(K + PGD_LIST).to_le_bytes());
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        assert_eq!(f.call(0x15, K + AGENT_DATA + 0x800, 4), 0);
        let e = &f.guest.integrity.as_ref().unwrap().engine;
        for t in tables {
            assert_eq!(e.class_of(t), None, "{t:#x}");
            assert_eq!(f.control.perms(View::Kernel, t), Some(Perms::RWX), "{t:#x}");
        }
        assert_eq!(e.class_of(0x2000), Some(PageClass::PageTable));
        f.guest.integrity.as_mut().unwrap().local.view = module;
        assert_eq!(f.ept(WRITE, PROCESS_PT + 0x18, 0xffff_8880_0000_0000 + PROCESS_PT, writer), Action::Resume);
        assert_eq!(f.control.perms(module, PROCESS_PT), Some(Perms::RW), "a heap page again");
        assert!(violation_kinds(&mut f).is_empty());
    }

    /// A pgd_list read in part (a link that is no struct page, as a list
    /// changed under the walk on another CPU may show) drops no class: a
    /// table is released only when a whole list no longer holds it.
    #[test]
    fn a_list_read_in_part_releases_no_table() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        w(&f.phys, PGD_LIST, &(K + VMEMMAP + 3).to_le_bytes());
        f.guest.integrity.as_mut().unwrap().local.view = View::Kernel;
        assert_eq!(f.call(0x15, K + AGENT_DATA + 0x800, 4), 0);
        let e = &f.guest.integrity.as_ref().unwrap().engine;
        assert_eq!(e.class_of(PROCESS_PT), Some(PageClass::PageTable));
        assert!(e.is_process_table(PROCESS_PGD));
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        assert_eq!(f.ept(WRITE, PROCESS_PT + 8, 0xffff_8880_0000_0000 + PROCESS_PT, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32]);
    }

    /// A page that was a process's table may be freed and reused before
    /// the next drain: a fault on it is judged on a fresh walk, so the
    /// reuse is not refused, and a table still listed still is.
    #[test]
    fn a_process_table_is_confirmed_before_a_refusal() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        // The PT is unhooked from the PD (the process unmapped that range).
        w(&f.phys, PROCESS_PD + 3 * 8, &0u64.to_le_bytes());
        assert_eq!(f.ept(WRITE, PROCESS_PT + 8, 0xffff_8880_0000_0000 + PROCESS_PT, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty(), "no table any more");
        assert_eq!(f.control.perms(module, PROCESS_PT), Some(Perms::RW));
        assert_eq!(f.ept(WRITE, PROCESS_PD + 8, 0xffff_8880_0000_0000 + PROCESS_PD, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32], "still a table");
    }

    /// A process's page table made since the last walk is typed in its
    /// struct page from the start: a module's first write is refused all
    /// the same, and the next walk classifies it.
    #[test]
    fn a_page_table_newer_than_the_walk_is_refused_by_its_type() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let fresh = 0xdc_0000;
        w(&f.phys, VMEMMAP + (fresh >> 12) * 64 + 48, &0xffff_fdffu32.to_le_bytes());
        assert_eq!(f.ept(WRITE, fresh + 0x20, 0xffff_8880_0000_0000 + fresh, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32]);
        assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
        assert_eq!(f.control.perms(module, fresh), None, "not granted");
        // A page whose type is anything else is a heap page.
        w(&f.phys, VMEMMAP + (fresh >> 12) * 64 + 48, &0xffff_ffffu32.to_le_bytes());
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, fresh + 0x20, 0xffff_8880_0000_0000 + fresh, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(module, fresh), Some(Perms::RW));
    }

    /// Tables the kernel makes without a page type (6.1's PUDs, and the
    /// kernel's own PTE tables for vmalloc space on 6.1 and 6.12), linked
    /// since the last walk: the hypervisor walks before it grants a plain
    /// page, so the module's write is refused from the start.
    #[test]
    fn an_untyped_table_newer_than_the_walk_is_walked_before_a_write() {
        let writer = K + MODULE_CODE + 0x10;
        for (parent, index, name) in [(0x3000, 8, "a kernel PTE table"), (PROCESS_PGD, 1, "a process's PUD")] {
            let (mut f, id) = in_module(writer);
            let module = View::Module(id);
            let fresh: u64 = 0xdc_0000;
            w(&f.phys, parent + index * 8, &(fresh | 3).to_le_bytes());
            let walks = |f: &Fixture| f.guest.integrity.as_ref().unwrap().engine.stats.table_walks;
            // The walk finds it: not granted, and the write comes again.
            assert_eq!(f.ept(WRITE, fresh + 0x20, 0xffff_8880_0000_0000 + fresh, writer), Action::Resume);
            assert_eq!((walks(&f), f.vcpu.read(Field::Rip)), (1, writer), "{name}: walked");
            assert_eq!(f.control.perms(module, fresh), None, "{name}: not granted");
            assert_eq!(f.ept(WRITE, fresh + 0x20, 0xffff_8880_0000_0000 + fresh, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32], "{name}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "{name}: skipped");
            assert_eq!(f.control.perms(module, fresh), None, "{name}: not granted");
        }
        // memcpy onto such a table, for the module: the deputy's
        // destination is walked for too.
        for (parent, index, name) in [(0x3000, 8, "a kernel PTE table"), (PROCESS_PGD, 1, "a process's PUD")] {
            let (mut f, _) = in_module(writer);
            let fresh: u64 = 0xdc_0000;
            w(&f.phys, parent + index * 8, &(fresh | 3).to_le_bytes());
            let call_site = K + MODULE_CODE + 0x40;
            w(&f.phys, STACK, &call_site.to_le_bytes());
            f.vcpu.write(Field::Rsp, K + STACK);
            (f.vcpu.regs.rdi, f.vcpu.regs.rdx) = (K + fresh + 0x20, 8);
            f.ept(FETCH | READ, MEMCPY, K + MEMCPY, K + MEMCPY);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::DeputyWrite as u32], "{name}: memcpy");
            assert_eq!(f.vcpu.read(Field::Rip), call_site, "{name}: returned to the caller");
        }
        // The same page linked nowhere is a heap page.
        let (mut f, id) = in_module(writer);
        let fresh = 0xdc_0000;
        assert_eq!(f.ept(WRITE, fresh + 0x20, 0xffff_8880_0000_0000 + fresh, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(View::Module(id), fresh), Some(Perms::RW));
    }

    /// A process forked since the last walk: its top-level table is on
    /// pgd_list but untyped. Its struct page names its mm_struct, so a
    /// module's first write makes the hypervisor walk before deciding.
    #[test]
    fn a_new_processs_top_level_table_is_walked_before_a_write() {
        let writer = K + MODULE_CODE + 0x10;
        let (mut f, id) = in_module(writer);
        let module = View::Module(id);
        let pgd = 0xde_0000;
        let page_of = |t: u64| VMEMMAP + (t >> 12) * 64;
        // The kernel lists it (head -> it -> the old process -> head) and names its mm.
        w(&f.phys, page_of(pgd) + 32, &(K + MM_PAGE + 0x140).to_le_bytes());
        w(&f.phys, PGD_LIST, &(K + page_of(pgd) + 8).to_le_bytes());
        w(&f.phys, page_of(pgd) + 8, &(K + page_of(PROCESS_PGD) + 8).to_le_bytes());
        for (at, name) in [(pgd, "kernel copy"), (pgd + 0x1000, "user copy")] {
            f.vcpu.write(Field::Rip, writer);
            assert_eq!(f.ept(WRITE, at + 0x18, 0xffff_8880_0000_0000 + at, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32], "{name}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
            assert_eq!(f.control.perms(module, at), None, "not granted");
        }
        // A page whose struct page names no mm_struct there is a heap page.
        let other = 0xdf_0000;
        w(&f.phys, page_of(other) + 32, &(K + CRED_PAGE).to_le_bytes());
        f.vcpu.write(Field::Rip, writer);
        assert_eq!(f.ept(WRITE, other + 8, 0xffff_8880_0000_0000 + other, writer), Action::Resume);
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.control.perms(module, other), Some(Perms::RW));
    }

    /// The processor's walk for a module's access sets accessed and dirty
    /// bits in tables the module may not write: the hypervisor sets them
    /// for it, one bit at a time and nothing else, and a write to an entry
    /// whose bits are both set is the module's, refused.
    #[test]
    fn the_walk_of_a_modules_access_may_set_accessed_and_dirty_bits() {
        let rip = K + MODULE_CODE + 0x10;
        let (mut f, _) = in_module(rip);
        let entry = PROCESS_PT + 7 * 8;
        let walk = |f: &mut Fixture| {
            f.vcpu.write(Field::Rip, rip);
            // Linear address valid, not the final translation: a paging-structure access.
            let exit = ExitInfo {
                reason: reason::EPT_VIOLATION,
                qualification: WRITE | (1 << 7),
                guest_physical: entry,
                guest_linear: 0x7000,
                ..Default::default()
            };
            assert_eq!(f.exit(exit), Action::Resume);
            u64::from_le_bytes(guest_bytes(f, entry, 8).try_into().unwrap())
        };
        let before = HEAP_PAGE | 7;
        assert_eq!(walk(&mut f), before | 0x20, "accessed");
        assert_eq!(walk(&mut f), before | 0x60, "then dirty");
        assert!(violation_kinds(&mut f).is_empty());
        assert_eq!(f.vcpu.read(Field::Rip), rip, "the instruction runs again");
        assert_eq!(walk(&mut f), before | 0x60, "nothing more to set: the module's own write");
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32]);
        // A not-present entry is the guest's page fault, not ours to fill.
        w(&f.phys, entry, &0x7000u64.to_le_bytes());
        assert_eq!(walk(&mut f), 0x7000);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WritePageTable as u32]);
    }

    /// A module's view makes MOV to CR3 exit: its load is refused (enforce)
    /// or reported and done (audit); the kernel's loads are its own.
    #[test]
    fn a_module_cannot_load_cr3() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let mut f = fixture(mode);
            let id = f.register_everything();
            let load = |f: &mut Fixture, value: u64| {
                f.vcpu.write(Field::Cr3, 0x1000);
                f.vcpu.regs.rbx = value;
                f.vcpu.write(Field::Rip, K + MODULE_CODE + 0x20);
                let exit = ExitInfo {
                    reason: reason::CR_ACCESS,
                    qualification: 3 | (3 << 8),
                    instruction_len: 3,
                    ..Default::default()
                };
                assert_eq!(f.exit(exit), Action::Resume);
                assert_eq!(f.vcpu.read(Field::Rip), K + MODULE_CODE + 0x23, "past the MOV");
                f.vcpu.read(Field::Cr3)
            };
            assert_eq!(load(&mut f, 0x5000), 0x5000, "the kernel's");
            assert!(violation_kinds(&mut f).is_empty());
            f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
            let expected = if mode == Mode::Enforce { 0x1000 } else { 0x5000 };
            assert_eq!(load(&mut f, 0x5000), expected, "{mode:?}");
            assert_eq!(violation_kinds(&mut f), [ViolationKind::ControlRegister as u32]);
        }
    }

    /// On a guest with several CPUs, a violation names the one it happened on.
    #[test]
    fn a_violation_names_its_cpu() {
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        f.control.active = Some(View::Module(id));
        for cpu in [1usize, 0, 3] {
            f.guest.cpus.current = cpu;
            let writer = K + MODULE_CODE + 0x10;
            assert_eq!(f.ept(WRITE, SYSCALL_TABLE, K + SYSCALL_TABLE, writer), Action::Resume);
            let records: Vec<_> = f.guest.integrity.as_mut().unwrap().engine.violations.take(4).collect();
            assert_eq!(records.iter().map(|r| r.cpu).collect::<Vec<_>>(), [cpu as u32]);
            assert_eq!(records[0].to_bytes()[36..40], (cpu as u32).to_le_bytes());
        }
    }

    #[test]
    fn audit_mode_lets_the_write_through_once() {
        let mut f = fixture(Mode::Audit);
        let id = f.register_everything();
        f.guest.integrity.as_mut().unwrap().local.view = View::Module(id);
        f.control.active = Some(View::Module(id));
        assert_eq!(f.ept(WRITE, SYSCALL_TABLE, K + SYSCALL_TABLE, K + MODULE_CODE + 0x10), Action::Resume);
        assert!(f.control.monitor_trap, "stepped over, not skipped");
        assert_eq!(f.guest.integrity.as_ref().unwrap().engine.violations.len(), 1);
    }
    /// Maps four pages at `va` (in PML4 slot 402, as vmalloc's area) to
    /// guest-physical `pages`, through tables of their own.
    fn map_stack(f: &Fixture, va: u64, pages: [u64; 4]) {
        const PDPT: u64 = 0xe0_0000;
        const PD: u64 = 0xe1_0000;
        const PT: u64 = 0xe2_0000;
        w(&f.phys, 0x1000 + 402 * 8, &(PDPT | 3).to_le_bytes());
        w(&f.phys, PDPT, &(PD | 3).to_le_bytes());
        w(&f.phys, PD, &(PT | 3).to_le_bytes());
        for (i, gpa) in pages.iter().enumerate() {
            let index = ((va >> 12) & 0x1ff) + i as u64;
            w(&f.phys, PT + index * 8, &(gpa | 3).to_le_bytes());
        }
    }

    #[test]
    fn a_stack_written_through_another_address_of_its_page_is_judged_as_the_stack() {
        // A task's stack (its end-of-stack mark at the bottom) and an
        // interrupt stack (none), both vmap'd between unmapped pages.
        const TASK: u64 = 0xffff_c900_0000_4000;
        const IRQ: u64 = 0xffff_c900_0001_0000;
        let task_pages = [0xe4_0000, 0xe5_0000, 0xe6_0000, 0xe7_0000];
        let irq_pages = [0xe8_0000, 0xe9_0000, 0xea_0000, 0xeb_0000];
        for (at, pages, mark) in [(TASK, task_pages, true), (IRQ, irq_pages, false)] {
            let mut f = fixture(Mode::Enforce);
            map_stack(&f, at, pages);
            if mark {
                w(&f.phys, pages[0], &STACK_END_MAGIC.to_le_bytes());
            }
            let id = f.register_everything();
            // The kernel calls the module's entry from the stack's top page.
            let rsp = at + 0x3f00;
            w(&f.phys, pages[3] + 0xf00, &(K + TEXT + 0x77).to_le_bytes());
            f.vcpu.write(Field::Rsp, rsp);
            assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
            assert_eq!(f.control.active, Some(View::Module(id)));
            f.vcpu.write(Field::Rsp, rsp - 0x100);
            // The kernel's return address, through the direct map's address
            // of its page: refused, skipped.
            let writer = K + MODULE_CODE + 0x10;
            let alias = K + pages[3] + 0xf00;
            assert_eq!(f.ept(WRITE, pages[3] + 0xf00, alias, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32], "mark {mark}");
            assert_eq!(f.vcpu.read(Field::Rip), writer + 3, "skipped");
            assert_eq!(f.control.perms(View::Module(id), pages[3]), None, "not granted");
            // Its own frame there goes through, alone.
            assert_eq!(f.ept(WRITE, pages[3] + 0xe00, K + pages[3] + 0xe00, writer), Action::Resume);
            assert!(violation_kinds(&mut f).is_empty());
            assert!(f.control.monitor_trap, "stepped alone");
        }
    }
    #[test]
    fn a_task_stack_the_agent_reports_at_its_birth_is_judged_as_a_stack_before_any_walk() {
        const TASK: u64 = 0xffff_c900_0000_4000;
        const UNMARKED: u64 = 0xffff_c900_0001_0000;
        let pages = [0xe4_0000, 0xe5_0000, 0xe6_0000, 0xe7_0000];
        let mut f = fixture(Mode::Enforce);
        let id = f.register_everything();
        // The kernel makes a task after the lock's walk.
        map_stack(&f, TASK, pages);
        w(&f.phys, pages[0], &STACK_END_MAGIC.to_le_bytes());
        map_stack(&f, UNMARKED, [0xe8_0000, 0xe9_0000, 0xea_0000, 0xeb_0000]);
        // No stack at the base, or a base off its 16 KiB: refused.
        assert_eq!(f.call(0x16, UNMARKED, 0), Error::InvalidArgument.code());
        assert_eq!(f.call(0x16, TASK + 0x1000, 0), Error::InvalidArgument.code());
        assert_eq!(f.call(0x16, TASK, 0), 0);
        // The module runs on another stack and writes the new task's frame
        // through the direct map: refused as the kernel's stack, not granted.
        let rsp = K + 0x70_0f00;
        w(&f.phys, 0x70_0f00, &(K + TEXT + 0x77).to_le_bytes());
        f.vcpu.write(Field::Rsp, rsp);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        assert_eq!(f.control.active, Some(View::Module(id)));
        let writer = K + MODULE_CODE + 0x10;
        assert_eq!(f.ept(WRITE, pages[3] + 0xe80, K + pages[3] + 0xe80, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32]);
        assert_eq!(f.control.perms(View::Module(id), pages[3]), None, "not granted");
    }

    /// One CPU's per-CPU area at guest-physical [`PERCPU`], as the agent
    /// reports it: the interrupt stack's store at 0x1000..0x5000, the
    /// exception stacks' at 0x5000..0x7000; the interrupt stack's top less
    /// 8 at 0x10, the TSS's interrupt stack table at 0x100. The interrupt
    /// stack is vmap'd page-aligned at `irq` (across a 16 KiB boundary); the
    /// NMI and debug stacks are single pages between guard pages, named by
    /// IST entries 1 and 2 (entry 4 names a top with nothing mapped, as
    /// #VC's without SEV-ES).
    const PERCPU: u64 = 0xf0_0000;
    const IRQ_STACK: u64 = 0xffff_c900_0001_2000;
    const NMI_STACK: u64 = 0xffff_c900_0002_0000;
    const DB_STACK: u64 = 0xffff_c900_0002_2000;

    fn give_cpu_stacks(f: &Fixture, irq_top: u64) {
        let at = |field: usize| LAYOUT + field as u64;
        let range = |start: u64, end: u64| [start.to_le_bytes(), end.to_le_bytes()].concat();
        w(&f.phys, at(core::mem::offset_of!(abi::KernelLayout, percpu)), &range(0, 0x8000));
        let stacks = at(core::mem::offset_of!(abi::KernelLayout, percpu_stacks));
        w(&f.phys, stacks, &range(0x1000, 0x5000));
        w(&f.phys, stacks + 16, &range(0x5000, 0x7000));
        w(&f.phys, at(core::mem::offset_of!(abi::KernelLayout, percpu_bases)), &(K + PERCPU).to_le_bytes());
        let tops = at(core::mem::offset_of!(abi::KernelLayout, percpu_stack_tops));
        w(&f.phys, tops, &[0x10u64.to_le_bytes(), 0x100u64.to_le_bytes()].concat());
        map_stack(f, IRQ_STACK, core::array::from_fn(|i| PERCPU + 0x1000 * (1 + i as u64)));
        const PT: u64 = 0xe2_0000;
        for (va, gpa) in [(NMI_STACK, PERCPU + 0x5000), (DB_STACK, PERCPU + 0x6000)] {
            w(&f.phys, PT + ((va >> 12) & 0x1ff) * 8, &(gpa | 3).to_le_bytes());
        }
        w(&f.phys, PERCPU + 0x10, &(irq_top - 8).to_le_bytes());
        for (entry, top) in [(1, NMI_STACK + 0x1000), (2, DB_STACK + 0x1000), (4, 0xffff_c900_0002_8000)] {
            w(&f.phys, PERCPU + 0x100 + 8 * entry, &top.to_le_bytes());
        }
    }

    #[test]
    fn every_cpus_interrupt_and_exception_stacks_are_known_from_the_lock() {
        let irq = Range::new(IRQ_STACK, IRQ_STACK + 0x4000);
        let (nmi, db) = (Range::new(NMI_STACK, NMI_STACK + 0x1000), Range::new(DB_STACK, DB_STACK + 0x1000));
        let mut f = fixture(Mode::Enforce);
        give_cpu_stacks(&f, irq.end);
        let id = f.register_everything();
        let engine = &f.guest.integrity.as_ref().unwrap().engine;
        assert_eq!(engine.layout().unwrap().interrupt_stacks, [irq, nmi, db]);
        let writer = K + MODULE_CODE + 0x10;
        // No module ever ran on them: a write to each, through its own
        // address or the direct map's, is a write to a kernel stack (it was
        // a heap page's before, granted).
        for (gva, gpa) in [
            (NMI_STACK + 0x800, PERCPU + 0x5800),
            (K + PERCPU + 0x6800, PERCPU + 0x6800),
            (IRQ_STACK + 0x100, PERCPU + 0x1100),
            (K + PERCPU + 0x4f00, PERCPU + 0x4f00),
        ] {
            let module = View::Module(id);
            f.guest.integrity.as_mut().unwrap().local.view = module;
            f.control.active = Some(module);
            f.vcpu.write(Field::Rsp, K + STACK + 0x800);
            assert_eq!(f.ept(WRITE, gpa, gva, writer), Action::Resume);
            assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32], "{gva:#x}");
            assert_eq!(f.control.perms(module, gpa & !0xfff), None, "not granted");
        }
        // A handler of the module entered high on the interrupt stack: its
        // own frames reach past the 16 KiB boundary, and are its own there
        // too; the kernel's return address above them is not.
        let mut f = fixture(Mode::Enforce);
        give_cpu_stacks(&f, irq.end);
        let id = f.register_everything();
        w(&f.phys, PERCPU + 0x4f00, &(K + TEXT + 0x77).to_le_bytes());
        f.vcpu.write(Field::Rsp, IRQ_STACK + 0x3f00);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        f.vcpu.write(Field::Rsp, IRQ_STACK + 0x1800);
        assert_eq!(f.ept(WRITE, PERCPU + 0x2800, IRQ_STACK + 0x1800, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [0u32; 0]);
        assert_eq!(f.control.perms(View::Module(id), PERCPU + 0x2000), Some(Perms::RW), "wholly its frames");
        assert_eq!(f.ept(WRITE, PERCPU + 0x4f00, K + PERCPU + 0x4f00, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32]);
        // A top that is not its CPU's store, or not a page's end, or none
        // (a CPU never started): the layout is refused, and nothing locks.
        for top in [irq.end + 0x1000, irq.end - 0x10, 8] {
            let mut f = fixture(Mode::Enforce);
            give_cpu_stacks(&f, top);
            let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
            assert_eq!(f.call(0x10, K + LAYOUT, layout_size), Error::InvalidArgument.code(), "{top:#x}");
        }
    }

    #[test]
    fn of_an_interrupt_stack_across_a_16k_boundary_only_the_entrys_window_is_known() {
        // Page-aligned, as vmap places it: pages 0x12000..0x16000, the
        // boundary at 0x14000. The module is entered at its top.
        const IRQ: u64 = 0xffff_c900_0001_2000;
        let pages = [0xe8_0000, 0xe9_0000, 0xea_0000, 0xeb_0000];
        let mut f = fixture(Mode::Enforce);
        map_stack(&f, IRQ, pages);
        let id = f.register_everything();
        let rsp = IRQ + 0x3f00;
        w(&f.phys, pages[3] + 0xf00, &(K + TEXT + 0x77).to_le_bytes());
        f.vcpu.write(Field::Rsp, rsp);
        assert_eq!(f.ept(FETCH | READ, MODULE_CODE, K + MODULE_CODE, K + MODULE_CODE), Action::Resume);
        f.vcpu.write(Field::Rsp, IRQ + 0x1800);
        let writer = K + MODULE_CODE + 0x10;
        // The kernel's return address, in the entry's window: refused through the direct map.
        assert_eq!(f.ept(WRITE, pages[3] + 0xf00, K + pages[3] + 0xf00, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [ViolationKind::WriteKernelStack as u32]);
        // Its own deep frames past the boundary, which no return point speaks
        // for: judged by address, as before, not refused as the kernel's.
        assert_eq!(f.ept(WRITE, pages[1] + 0x800, IRQ + 0x1800, writer), Action::Resume);
        assert_eq!(violation_kinds(&mut f), [0u32; 0]);
        assert_eq!(f.control.perms(View::Module(id), pages[1]), Some(Perms::RW));
    }
}
