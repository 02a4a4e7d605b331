//! The `hypercall` target: the agent's hypercalls served end to end
//! (`exits::dispatch` → `hypercall::handle` → the integrity handlers) on a
//! small guest laid out like a kernel with its agent (page tables, a kernel
//! layout, `__ksymtab` with names, an IDT, a module with entries and
//! fixups, a vTPM event log), through fakes of the VMX layer
//! (`hypervisor::testing`). The input patches that guest (before, and
//! between calls, as a racing kernel would) and makes a sequence of calls
//! with registers aimed at its structures or anywhere, as the kernel, as
//! user space, or from an isolated module's view.
//!
//! Properties, after every call:
//! * a call from user space or from a module's view is refused
//!   (`NotPermitted`) and changes nothing but the violation and refusal
//!   records: not the engine, not the views, not guest memory, no register
//!   but RAX;
//! * a refused call from the kernel changes no engine state (violation log
//!   included), no view and no byte of guest memory, no register but RAX;
//! * a call that succeeds writes guest memory only for the two calls that
//!   return data, and then only inside the buffer the kernel named, on
//!   pages the kernel's view lets it write, plus the accessed and dirty bits
//!   of the entries walked; no call changes any other register than its
//!   results;
//! * the engine and the views only ever name guest RAM.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use guest_agent::integrity as abi;
use guest_agent::Error;
use hypervisor::devices::tis::TpmBackend;
use hypervisor::exits::{dispatch, Action, ExitContext, StopReason};
use hypervisor::guest::access::{Kind, Paging};
use hypervisor::guest::memory::GuestMemory;
use hypervisor::guest::Guest;
use hypervisor::integrity::control::GuestControl;
use hypervisor::integrity::engine::PageClass;
use hypervisor::integrity::layout::{KernelLayout, Range};
use hypervisor::integrity::policy::Entry as PolicyEntry;
use hypervisor::integrity::{GuestIntegrity, Mode, Stepping, View};
use hypervisor::mm::frames::Region;
use hypervisor::mm::paging::Perms;
use hypervisor::testing::{test_guest, FakeControl, FakeHost};
use hypervisor::vcpu::{ExitInfo, Field, VcpuState};

use super::fakes::{Ram, Vcpu, Write, HOST_BASE};
use super::reference::{self, End};

/// Guest RAM: 576 KiB at guest-physical 0. The kernel's addresses K + x
/// map guest-physical x through one 2 MiB page (most of it not RAM).
const RAM: u64 = 0x9_0000;
const K: u64 = 0xffff_ffff_8000_0000;
const PML4: u64 = 0x1000;
const LAYOUT: u64 = 0x1_0000;
const KSYMTAB: u64 = 0x1_1000;
const NAMES: u64 = 0x1_1100;
const MODULE_INFO: u64 = 0x1_3000;
const MODULE_ENTRIES: u64 = 0x1_4000;
const MODULE_FIXUPS: u64 = 0x1_4800;
const BUFFER: u64 = 0x2_0000;
const TEXT: u64 = 0x4_0000;
const PRINTK: u64 = TEXT + 0x1000;
const SET_MEMORY_RW: u64 = TEXT + 0x2000;
const ENTRY_SYSCALL: u64 = TEXT + 0x3000;
const HANDLER: u64 = TEXT + 0x4000;
const RODATA: u64 = 0x6_0000;
const SYSCALL_TABLE: u64 = 0x6_1000;
const IDT: u64 = 0x6_2000;
const MODULE_CODE: u64 = 0x8_0000;
const MODULE_DATA: u64 = 0x8_1000;
const MSR_LSTAR: u32 = 0xc000_0082;

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

fn range(b: &mut [u8], at: u64, start: u64, end: u64) {
    put(b, at, &start.to_le_bytes());
    put(b, at + 8, &end.to_le_bytes());
}

/// The guest's RAM as the agent and the kernel leave it: built once.
fn pristine() -> &'static [u8] {
    static RAM_IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    RAM_IMAGE.get_or_init(|| {
        let mut b = vec![0u8; RAM as usize];
        // PML4[511] -> PDPT, PDPT[510] -> PD, PD[0] -> 2 MiB page at 0.
        put(&mut b, PML4 + 511 * 8, &(0x2000u64 | 3).to_le_bytes());
        put(&mut b, 0x2000 + 510 * 8, &(0x3000u64 | 3).to_le_bytes());
        put(&mut b, 0x3000, &0x83u64.to_le_bytes());
        // struct KernelLayout (see guest_agent::integrity).
        let l = LAYOUT;
        put(&mut b, l, &abi::STRUCT_VERSION.to_le_bytes());
        put(&mut b, l + 4, &(core::mem::size_of::<abi::KernelLayout>() as u32).to_le_bytes());
        range(&mut b, l + 8, K + TEXT, K + TEXT + 0x1_0000);
        range(&mut b, l + 24, K + RODATA, K + RODATA + 0x1000);
        range(&mut b, l + 56, K + SYSCALL_TABLE, K + SYSCALL_TABLE + 0x1000);
        range(&mut b, l + 72, K + IDT, K + IDT + 0x1000);
        put(&mut b, l + 88, &(K + ENTRY_SYSCALL).to_le_bytes());
        range(&mut b, l + 96, K + KSYMTAB, K + KSYMTAB + 36);
        range(&mut b, l + 128, K + TEXT + 0x5000, K + TEXT + 0x5100);
        range(&mut b, l + 256, K + 0x7_0000, K + 0x7_1000);
        put(&mut b, l + 320, &(K + PML4).to_le_bytes());
        put(&mut b, l + 328, &(K + ENTRY_SYSCALL).to_le_bytes());
        // __ksymtab: printk, set_memory_rw and a retpoline thunk, PREL32.
        for (i, (value, name, text)) in [
            (PRINTK, NAMES, &b"printk\0"[..]),
            (SET_MEMORY_RW, NAMES + 0x10, &b"set_memory_rw\0"[..]),
            (ENTRY_SYSCALL, NAMES + 0x20, &b"__x86_indirect_thunk_rax\0"[..]),
        ]
        .into_iter()
        .enumerate()
        {
            let at = KSYMTAB + i as u64 * 12;
            put(&mut b, at, &((value as i64 - at as i64) as i32).to_le_bytes());
            put(&mut b, at + 4, &((name as i64 - (at + 4) as i64) as i32).to_le_bytes());
            put(&mut b, name, text);
        }
        // One present interrupt gate.
        let h = K + HANDLER;
        let gate = IDT + 14 * 16;
        put(&mut b, gate, &(h as u16).to_le_bytes());
        b[(gate + 5) as usize] = 0x8e;
        put(&mut b, gate + 6, &((h >> 16) as u16).to_le_bytes());
        put(&mut b, gate + 8, &((h >> 32) as u32).to_le_bytes());
        // struct ModuleInfo "evil": one code page, one data page, one entry, one fixup.
        let m = MODULE_INFO;
        put(&mut b, m, &abi::STRUCT_VERSION.to_le_bytes());
        put(&mut b, m + 4, &(core::mem::size_of::<abi::ModuleInfo>() as u32).to_le_bytes());
        put(&mut b, m + 8, b"evil");
        range(&mut b, m + 64, K + MODULE_CODE, K + MODULE_CODE + 0x1000);
        range(&mut b, m + 96, K + MODULE_DATA, K + MODULE_DATA + 0x1000);
        put(&mut b, m + 192, &(K + MODULE_ENTRIES).to_le_bytes());
        put(&mut b, m + 200, &1u32.to_le_bytes());
        put(&mut b, m + 208, &(K + MODULE_FIXUPS).to_le_bytes());
        put(&mut b, m + 216, &1u32.to_le_bytes());
        put(&mut b, MODULE_ENTRIES, &(K + MODULE_CODE).to_le_bytes());
        put(&mut b, MODULE_FIXUPS, &(K + MODULE_CODE + 0x10).to_le_bytes());
        put(&mut b, MODULE_FIXUPS + 8, &(K + MODULE_CODE + 0x20).to_le_bytes());
        put(&mut b, MODULE_CODE + 0x10, &[0x48, 0x89, 0x18]);
        b
    })
}

/// A policy entry pinning "evil" to its code page as loaded (or, with
/// `wrong`, to other code): the trusted-module path.
fn pin(wrong: bool) -> PolicyEntry {
    use sha2::Digest;
    let mut code = pristine()[MODULE_CODE as usize..MODULE_CODE as usize + 0x1000].to_vec();
    code[0x11] = 0;
    if wrong {
        code[0x20] ^= 1;
    }
    let sha256 = sha2::Sha256::digest(&code).into();
    PolicyEntry { name: "evil".into(), text_len: 0x1000, init_len: 0, sha256, masks: vec![(0x11, 1)] }
}

/// A vTPM that is never asked anything here.
struct Mute;

impl TpmBackend for Mute {
    fn execute(&mut self, _: u8, _: &[u8]) -> Vec<u8> {
        vec![0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 1]
    }
}

/// Where a patch goes: into one of the structures, or anywhere in RAM.
#[derive(Arbitrary, Debug)]
enum Spot {
    Layout(u16),
    Ksymtab(u8),
    Idt(u16),
    Module(u8),
    Entries(u8),
    Tables(u16),
    Anywhere(u32),
}

#[derive(Arbitrary, Debug)]
struct Patch {
    spot: Spot,
    value: u64,
    width: u8,
}

impl Patch {
    fn apply(&self, b: &mut [u8]) {
        let at = match self.spot {
            Spot::Layout(o) => LAYOUT + u64::from(o) % 520,
            Spot::Ksymtab(o) => KSYMTAB + u64::from(o) % 0x140,
            Spot::Idt(o) => IDT + u64::from(o) % 0x1000,
            Spot::Module(o) => MODULE_INFO + u64::from(o) % 224,
            Spot::Entries(o) => MODULE_ENTRIES + u64::from(o) % 0x820,
            Spot::Tables(o) => PML4 + u64::from(o) % 0x3000,
            Spot::Anywhere(a) => u64::from(a) % RAM,
        } as usize;
        let n = usize::from(self.width % 8) + 1;
        let n = n.min(b.len() - at);
        b[at..at + n].copy_from_slice(&self.value.to_le_bytes()[..n]);
    }
}

/// RBX: one of the guest's structures (as the kernel addresses them), the
/// buffer at an offset, a small number (a module id, an exit code), or any.
#[derive(Arbitrary, Debug)]
enum Rbx {
    Layout,
    Module,
    Buffer(u16),
    Small(u8),
    Any(u64),
}

/// RCX: the right size for the call, a small count, or any.
#[derive(Arbitrary, Debug)]
enum Rcx {
    Exact,
    Count(u16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Call {
    number: u8,
    rbx: Rbx,
    rcx: Rcx,
    rdx: u32,
    user: bool,
    from_module: bool,
    patch: Option<Patch>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    integrity: bool,
    audit: bool,
    /// 0: "evil" not trusted; 1: pinned to its code; 2: pinned to other code.
    trust: u8,
    views: bool,
    vtpm: Option<u8>,
    patches: Vec<Patch>,
    /// How many of the agent's own first calls come first (kernel layout,
    /// lock, the module, its going live): the deep states, reached at once.
    prologue: u8,
    calls: Vec<Call>,
}

/// The agent's calls at boot, in order.
fn prologue(n: u8) -> Vec<Call> {
    let call =
        |number, rbx| Call { number, rbx, rcx: Rcx::Exact, rdx: 0, user: false, from_module: false, patch: None };
    let all = [call(2, Rbx::Layout), call(3, Rbx::Small(0)), call(4, Rbx::Module), call(5, Rbx::Small(0))];
    all.into_iter().take(usize::from(n % 5)).collect()
}

type Module = (u32, Option<String>, bool, Option<Vec<Range>>);

/// Everything a call may not change when it is refused, by public API.
#[derive(Clone, Debug, PartialEq)]
struct EngineState {
    view: View,
    stepping: Option<Stepping>,
    locked: bool,
    layout: Option<KernelLayout>,
    pages: Vec<(u64, PageClass)>,
    /// (id, name, trusted, init ranges)
    modules: Vec<Module>,
    violations: Vec<abi::ViolationRecord>,
    dropped: u64,
}

fn engine_state(g: &Guest) -> Option<EngineState> {
    let s = g.integrity.as_ref()?;
    let e = &s.engine;
    Some(EngineState {
        view: s.view,
        stepping: s.stepping,
        locked: e.is_locked(),
        layout: e.layout().cloned(),
        pages: e.pages().collect(),
        modules: e
            .modules()
            .map(|m| (m, e.module_name(m).map(String::from), e.is_trusted(m), e.module_init(m)))
            .collect(),
        violations: e.violations.peek(usize::MAX).copied().collect(),
        dropped: e.violations.dropped,
    })
}

/// Names a call in a failure message (formatted only then).
struct What<'a> {
    i: usize,
    call: &'a Call,
    number: u64,
    rbx: u64,
    rcx: u64,
}

impl std::fmt::Display for What<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "call {} ({:?}, rax {:#x}, rbx {:#x}, rcx {:#x})", self.i, self.call, self.number, self.rbx, self.rcx)
    }
}

fn is_error(rax: u64) -> bool {
    Error::from_status(rax as i64).is_some()
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut image = pristine().to_vec();
    for p in input.patches.iter().take(16) {
        p.apply(&mut image);
    }
    let ram = Ram::with_bytes(HOST_BASE, image);
    let mut guest = test_guest();
    guest.memory = GuestMemory::new();
    guest.memory.add(Region::new(0, RAM), HOST_BASE).expect("one region");
    if input.integrity {
        let trusted = match input.trust % 3 {
            0 => vec![],
            n => vec![pin(n == 2)],
        };
        guest.integrity = Some(GuestIntegrity::new(if input.audit { Mode::Audit } else { Mode::Enforce }, trusted));
    }
    if let Some(events) = input.vtpm {
        let mut vtpm = hypervisor::tpm::GuestTpm::new(Box::new(Mute));
        for i in 0..events % 8 {
            let data = vec![b'k'; usize::from(i) * 37];
            let event = hypervisor::tpm::event_log::Event { pcr: 8 + u32::from(i), kind: 0xd, digest: [i; 20], data };
            let _ = vtpm.log.push(&event);
        }
        guest.vtpm = Some(vtpm);
    }
    let mut vcpu = Vcpu::default();
    vcpu.write(Field::Cr0, 0x8001_0031);
    vcpu.write(Field::Cr3, PML4);
    vcpu.write(Field::Cr4, 0x20);
    vcpu.write(Field::Efer, 0xd00);
    vcpu.write(Field::CsAccessRights, 0xa09b);
    vcpu.write(Field::SsAccessRights, 0x93);
    vcpu.write(Field::IdtrBase, K + IDT);
    vcpu.write(Field::Rip, K + TEXT + 0x100);
    vcpu.write(Field::Rflags, 2);
    let mut host = FakeHost::default();
    host.msrs.insert(MSR_LSTAR, K + ENTRY_SYSCALL);
    let mut control = FakeControl::default();
    let exit = ExitInfo { reason: 18, instruction_len: 3, ..Default::default() };

    let first = prologue(input.prologue);
    for (i, call) in first.iter().chain(input.calls.iter().take(12)).enumerate() {
        if let Some(p) = &call.patch {
            p.apply(&mut ram.bytes.borrow_mut());
        }
        let number = match call.number % 12 {
            0 => 0,
            1 => 1,
            n @ 2..=6 => 0x10 + u64::from(n - 2),
            7 => 0x15,
            8 => 0x20,
            n => u64::from(call.rdx).rotate_left(u32::from(n)),
        };
        let size_of = match number {
            0x10 => core::mem::size_of::<abi::KernelLayout>() as u64,
            0x12 => core::mem::size_of::<abi::ModuleInfo>() as u64,
            0x15 => 4,
            _ => 64,
        };
        let last_module = guest.integrity.as_ref().and_then(|s| s.engine.modules().last()).unwrap_or(1);
        let regs = vcpu.regs();
        regs.rax = number;
        regs.rbx = match call.rbx {
            Rbx::Layout => K + LAYOUT,
            Rbx::Module => K + MODULE_INFO,
            Rbx::Buffer(o) => K + BUFFER + u64::from(o),
            Rbx::Small(n) if n < 4 => u64::from(last_module),
            Rbx::Small(n) => u64::from(n),
            Rbx::Any(v) => v,
        };
        regs.rcx = match call.rcx {
            Rcx::Exact => size_of,
            Rcx::Count(n) => u64::from(n),
            Rcx::Any(v) => v,
        };
        regs.rdx = u64::from(call.rdx);
        vcpu.write(Field::SsAccessRights, if call.user { 0xf3 } else { 0x93 });
        let from_module = call.from_module && guest.integrity.is_some();
        if let Some(s) = guest.integrity.as_mut() {
            s.view = if from_module { View::Module(last_module) } else { View::Kernel };
        }
        let what = What { i, call, number, rbx: vcpu.regs.rbx, rcx: vcpu.regs.rcx };
        let (rbx, rcx) = (vcpu.regs.rbx, vcpu.regs.rcx);

        let before_vcpu = vcpu.clone();
        let before_engine = engine_state(&guest);
        let before_control = control.clone();
        let before_refusals: Vec<_> = guest.refusals.seen().collect();
        ram.take_log();
        let action = {
            let mut ctx = ExitContext {
                guest: &mut guest,
                vcpu: &mut vcpu,
                exit: &exit,
                host: &host,
                phys: &ram,
                control: if input.views { Some(&mut control) } else { None },
            };
            dispatch(&mut ctx)
        };
        let writes = ram.take_log();
        let rax = vcpu.regs.rax;
        // The registers: RIP past the VMCALL, RAX the status, and the
        // results of the calls that return more.
        let mut expected = before_vcpu.clone();
        expected.write(Field::Rip, before_vcpu.read(Field::Rip).wrapping_add(3));
        expected.regs.rax = rax;
        let kernel = !call.user && !from_module;
        if kernel && number == 1 && rbx <= u64::from(u32::MAX) {
            assert_eq!(action, Action::Stop(StopReason::Shutdown { code: rbx as u32 }), "{what}");
            expected = before_vcpu.clone();
        } else {
            assert_eq!(action, Action::Resume, "{what}");
        }
        if kernel && number == 0 {
            expected.regs.rbx = vcpu.regs.rbx;
            expected.regs.rcx = vcpu.regs.rcx;
        }
        if kernel && number == 0x15 && !is_error(rax) {
            expected.regs.rbx = vcpu.regs.rbx;
        }
        assert_eq!(vcpu, expected, "{what}: more registers changed than the call's results");

        let after_engine = engine_state(&guest);
        if !kernel {
            assert_eq!(rax as i64, Error::NotPermitted.code(), "{what}: not refused");
            let mut engine = after_engine.clone();
            if let (Some(after), Some(before)) = (engine.as_mut(), before_engine.as_ref()) {
                // One violation recorded, at most (from the kernel's CPL, in a module's view).
                assert!(after.violations.len() <= before.violations.len() + 1, "{what}");
                after.violations.clone_from(&before.violations);
                after.dropped = before.dropped;
            }
            assert_eq!(engine, before_engine, "{what}: a refused call changed the engine");
        } else if is_error(rax) {
            assert_eq!(after_engine, before_engine, "{what}: a refused call changed the engine");
            assert_eq!(guest.refusals.seen().collect::<Vec<_>>(), before_refusals, "{what}");
        }
        if !kernel || is_error(rax) {
            assert!(control == before_control, "{what}: a refused call changed the views");
            // Every write goes through the log.
            assert!(writes.is_empty(), "{what}: a refused call wrote guest memory: {writes:x?}");
        } else if !writes.is_empty() {
            // Guest memory before the call: the writes undone.
            let mut before_ram = ram.bytes.borrow().clone();
            for w in writes.iter().rev() {
                let at = (w.hpa - HOST_BASE) as usize;
                before_ram[at..at + w.old.len()].copy_from_slice(&w.old);
            }
            let returns_data = matches!(number, 0x15 | 0x20);
            let len = if number == 0x15 { rax * abi::VIOLATION_RECORD_SIZE as u64 } else { rcx };
            check_writes(
                &what,
                &before_ram,
                &writes,
                &before_vcpu,
                &before_control,
                input.views,
                returns_data,
                rbx,
                len,
            );
        }
        // Whatever the engine tracks and the views map is guest RAM.
        if let Some(s) = &guest.integrity {
            for (page, class) in s.engine.pages() {
                assert!(page < RAM, "{what}: the engine tracks {page:#x} ({class:?}), not guest RAM");
            }
        }
        for (view, page) in control.perms.keys() {
            assert!(*page < RAM, "{what}: view {view:?} maps {page:#x}, not guest RAM");
        }
        if let Some(s) = guest.integrity.as_mut() {
            s.view = View::Kernel;
        }
    }
}

/// A successful call's writes: none unless it returns data; those only in
/// the bytes of `buffer..buffer + len` (by the walk before the call) on
/// pages the kernel's view may write, and accessed or dirty bits of entries.
#[allow(clippy::too_many_arguments)]
fn check_writes(
    what: &What<'_>,
    before: &[u8],
    writes: &[Write],
    vcpu: &Vcpu,
    control: &FakeControl,
    views: bool,
    returns_data: bool,
    buffer: u64,
    len: u64,
) {
    if !returns_data {
        assert!(writes.is_empty(), "{what}: a call that returns no data wrote guest memory: {writes:x?}");
        return;
    }
    let paging = Paging::from_vcpu(vcpu);
    let read = |gpa: u64| {
        let at = usize::try_from(gpa).ok()?;
        Some(u64::from_le_bytes(before.get(at..at.checked_add(8)?)?.try_into().ok()?))
    };
    // Where the buffer's bytes are, page by page, by the tables before the call.
    let mut targets = Vec::new();
    let mut at = 0u64;
    while at < len {
        let linear = buffer.wrapping_add(at);
        let n = (0x1000 - (linear & 0xfff)).min(len - at);
        let walk = reference::walk(&read, &paging, linear);
        if let End::Gpa(gpa) = walk.end {
            if reference::allowed(&walk, &paging, 0, Kind::Write) {
                targets.push(gpa..gpa + n);
            }
        }
        at += n;
    }
    for w in writes {
        let gpa = w.hpa - HOST_BASE;
        if w.exchange {
            let (old, new) =
                (u64::from_le_bytes(w.old[..].try_into().unwrap()), u64::from_le_bytes(w.new[..].try_into().unwrap()));
            assert!(
                gpa.is_multiple_of(8) && new & !0x60 == old & !0x60 && new & old == old,
                "{what}: entry {gpa:#x} {old:#x} -> {new:#x}"
            );
            continue;
        }
        for k in 0..w.new.len() as u64 {
            let target = gpa + k;
            assert!(
                targets.iter().any(|r| r.contains(&target)),
                "{what}: wrote guest-physical {target:#x}, outside the buffer {buffer:#x}+{len:#x}"
            );
            if views {
                let p = control.perms(View::Kernel, target & !0xfff);
                assert!(
                    p.is_some_and(|p| p.contains(Perms::WRITE)),
                    "{what}: wrote {target:#x}, read-only in the kernel view"
                );
            }
        }
    }
}
