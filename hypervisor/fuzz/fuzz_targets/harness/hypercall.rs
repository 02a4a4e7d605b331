//! The `hypercall` target: the agent's hypercalls served end to end
//! (`exits::dispatch` → `hypercall::handle` → the integrity handlers) on a
//! small guest laid out like a kernel with its agent (page tables, a kernel
//! layout, `__ksymtab` with names, an IDT, a module with entries and
//! fixups, a vTPM event log), through fakes of the VMX layer
//! (`hypervisor::testing`). The guest holds two modules: the agent
//! (`ctvm_agent`, whose registration the lock carries) and "evil", each
//! with its `struct module`. The input patches that guest (before, and
//! between calls, as a racing kernel would) and makes a sequence of calls
//! with registers aimed at its structures or anywhere, as the kernel (from
//! the agent's code, from the kernel's, from anywhere), as user space, or
//! from an isolated module's view.
//!
//! Properties, after every call:
//! * a call from user space or from a module's view is refused
//!   (`NotPermitted`) and changes nothing but the violation and refusal
//!   records: not the engine, not the views, not guest memory, no register
//!   but RAX;
//! * once the layout is locked, an integrity call from kernel code other
//!   than the pinned agent's (by an independent walk of RIP) is refused;
//! * a refused call changes no engine state (but one `hypercall` violation
//!   or refusal record, and only with `NotPermitted`), no view and no byte
//!   of guest memory, no register but RAX;
//! * the lock succeeds only for the agent the policy pins, which then stays
//!   pinned; a lock the guest is stopped for (another module, other code)
//!   changes nothing at all, and an intact, pinned agent is never stopped;
//! * a call that succeeds writes guest memory only for the two calls that
//!   return data, and then only inside the buffer the kernel named, on
//!   pages the kernel's view lets it write, plus the accessed and dirty bits
//!   of the entries walked; a module going live or away has only its own
//!   code scrubbed (zeros), and only if untrusted; no call changes any other
//!   register than its results;
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
use hypervisor::integrity::{GuestIntegrity, Mode, Stepping, View, ViolationKind};
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
const AGENT_INFO: u64 = 0x1_3200;
const INFO_SIZE: u64 = core::mem::size_of::<abi::ModuleInfo>() as u64;
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
const AGENT_CODE: u64 = 0x8_2000;
const AGENT_DATA: u64 = 0x8_3000;
const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
/// `sizeof(struct module)` as the modules report it (their export table follows).
const MODULE_STRUCT: u32 = 0x80;
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
        // struct ModuleInfo "evil": one code page, one data page (its
        // struct module at the start, COMING; one export), one entry, one fixup.
        let m = MODULE_INFO;
        module_info(&mut b, m, b"evil", MODULE_CODE, MODULE_DATA);
        put(&mut b, m + 192, &(K + MODULE_ENTRIES).to_le_bytes());
        put(&mut b, m + 200, &1u32.to_le_bytes());
        put(&mut b, m + 208, &(K + MODULE_FIXUPS).to_le_bytes());
        put(&mut b, m + 216, &1u32.to_le_bytes());
        range(&mut b, m + 232, K + MODULE_DATA + 0x100, K + MODULE_DATA + 0x100 + abi::KERNEL_SYMBOL_SIZE);
        put(&mut b, MODULE_DATA + 0x100, &((MODULE_CODE as i64 - (MODULE_DATA + 0x100) as i64) as i32).to_le_bytes());
        put(&mut b, MODULE_ENTRIES, &(K + MODULE_CODE).to_le_bytes());
        put(&mut b, MODULE_FIXUPS, &(K + MODULE_CODE + 0x10).to_le_bytes());
        put(&mut b, MODULE_FIXUPS + 8, &(K + MODULE_CODE + 0x20).to_le_bytes());
        put(&mut b, MODULE_CODE + 0x10, &[0x48, 0x89, 0x18]);
        // The agent: a code page with its VMCALL, a data page, no entries.
        module_info(&mut b, AGENT_INFO, abi::AGENT_NAME.as_bytes(), AGENT_CODE, AGENT_DATA);
        put(&mut b, AGENT_CODE, &VMCALL);
        b
    })
}

/// A `struct ModuleInfo` at `at` for one code page and one data page
/// (`struct module`, [`MODULE_STRUCT`] bytes, at its start, in the
/// kernel's COMING state).
fn module_info(b: &mut [u8], at: u64, name: &[u8], code: u64, data: u64) {
    put(b, at, &abi::STRUCT_VERSION.to_le_bytes());
    put(b, at + 4, &(INFO_SIZE as u32).to_le_bytes());
    put(b, at + 8, name);
    range(b, at + 64, K + code, K + code + 0x1000);
    range(b, at + 96, K + data, K + data + 0x1000);
    put(b, at + 220, &MODULE_STRUCT.to_le_bytes());
    put(b, at + 224, &(K + data).to_le_bytes());
    put(b, data, &abi::module_state::COMING.to_le_bytes());
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
    PolicyEntry { name: "evil".into(), text_len: 0x1000, sha256, masks: vec![(0x11, 1)], ..Default::default() }
}

/// The agent's policy entry: its code page as loaded, or (`wrong`) a page
/// no patch budget can turn it into.
fn pin_agent(wrong: bool) -> PolicyEntry {
    use sha2::Digest;
    let code = if wrong { vec![0xcc; 0x1000] } else { pristine()[page(AGENT_CODE)].to_vec() };
    let sha256 = sha2::Sha256::digest(&code).into();
    PolicyEntry { name: abi::AGENT_NAME.into(), text_len: 0x1000, sha256, masks: vec![], ..Default::default() }
}

fn page(gpa: u64) -> core::ops::Range<usize> {
    gpa as usize..gpa as usize + 0x1000
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
    Module(u16),
    Agent(u16),
    AgentCode(u16),
    /// The state of evil's (true) or the agent's `struct module`.
    State(bool),
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
            Spot::Module(o) => MODULE_INFO + u64::from(o) % INFO_SIZE,
            Spot::Agent(o) => AGENT_INFO + u64::from(o) % INFO_SIZE,
            Spot::AgentCode(o) => AGENT_CODE + u64::from(o) % 0x1000,
            Spot::State(evil) => {
                if evil {
                    MODULE_DATA
                } else {
                    AGENT_DATA
                }
            }
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
    Agent,
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

/// Where the VMCALL is: in the agent's code, in the kernel's, or anywhere.
#[derive(Arbitrary, Debug)]
enum Rip {
    Agent(u16),
    Kernel,
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Call {
    number: u8,
    rip: Rip,
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
    /// For the agent (trust % 3) and for "evil" (trust / 3 % 3): 0 not
    /// trusted; 1 pinned to its code; 2 pinned to other code.
    trust: u8,
    views: bool,
    vtpm: Option<u8>,
    patches: Vec<Patch>,
    /// How many of the agent's own first calls come first (kernel layout,
    /// lock, the module, its going live): the deep states, reached at once.
    prologue: u8,
    calls: Vec<Call>,
}

/// The agent's calls at boot, in order: the kernel's layout (from the
/// kernel's init), the lock with the agent's registration, then, from the
/// agent's code, "evil" and (once the kernel says so) its going live.
fn prologue(n: u8) -> Vec<Call> {
    let call = |number, rip, rbx, patch| Call {
        number,
        rip,
        rbx,
        rcx: Rcx::Exact,
        rdx: 0,
        user: false,
        from_module: false,
        patch,
    };
    let live = Patch { spot: Spot::State(true), value: u64::from(abi::module_state::LIVE), width: 3 };
    let all = [
        call(2, Rip::Kernel, Rbx::Layout, None),
        call(3, Rip::Kernel, Rbx::Agent, None),
        call(4, Rip::Agent(0), Rbx::Module, None),
        call(5, Rip::Agent(0), Rbx::Small(0), Some(live)),
    ];
    all.into_iter().take(usize::from(n % 5)).collect()
}

pub type Module = (u32, Option<String>, bool, Option<Vec<Range>>);

/// Everything a call may not change when it is refused, by public API.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineState {
    pub view: View,
    pub stepping: Option<Stepping>,
    pub locked: bool,
    pub agent: Option<u32>,
    pub layout: Option<KernelLayout>,
    pub pages: Vec<(u64, PageClass)>,
    /// (id, name, trusted, init ranges)
    pub modules: Vec<Module>,
    pub violations: Vec<abi::ViolationRecord>,
    pub dropped: u64,
}

fn engine_state(g: &Guest) -> Option<EngineState> {
    let s = g.integrity.as_ref()?;
    let e = &s.engine;
    Some(EngineState {
        view: s.local.view,
        stepping: s.local.stepping.clone(),
        locked: e.is_locked(),
        agent: e.agent(),
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
    let _ = run_calls(data);
}

/// The guest's integrity state after the input's calls (`None` without
/// integrity), for the smoke test to check that the deep states are reached.
pub fn run_calls(data: &[u8]) -> Option<EngineState> {
    let input = Input::arbitrary_take_rest(Unstructured::new(data)).ok()?;
    run_input(&input)
}

/// The agent's boot calls alone, on an unpatched guest whose policy pins
/// the agent to its code (or, `wrong_agent`, to other code).
pub fn boot(wrong_agent: bool) -> Option<EngineState> {
    let trust = if wrong_agent { 2 } else { 1 };
    let input = Input {
        integrity: true,
        audit: false,
        trust,
        views: true,
        vtpm: None,
        patches: Vec::new(),
        prologue: 4,
        calls: Vec::new(),
    };
    run_input(&input)
}

thread_local! {
    /// The last input's RAM buffer, reused: a fresh 576 KiB allocation per
    /// input cost more in page faults than the calls themselves.
    static SPARE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn run_input(input: &Input) -> Option<EngineState> {
    let mut image = SPARE.with(|s| s.take());
    image.clear();
    image.extend_from_slice(pristine());
    for p in input.patches.iter().take(16) {
        p.apply(&mut image);
    }
    let ram = Ram::with_bytes(HOST_BASE, image);
    let mut guest = test_guest();
    guest.memory = GuestMemory::new();
    guest.memory.add(Region::new(0, RAM), HOST_BASE).expect("one region");
    let agent_pinned = input.integrity && input.trust % 3 == 1;
    if input.integrity {
        let mut trusted = Vec::new();
        match input.trust % 3 {
            0 => {}
            n => trusted.push(pin_agent(n == 2)),
        }
        match input.trust / 3 % 3 {
            0 => {}
            n => trusted.push(pin(n == 2)),
        }
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
            0x11 | 0x12 => INFO_SIZE,
            0x15 => 4,
            _ => 64,
        };
        let last_module = guest.integrity.as_ref().and_then(|s| s.engine.modules().last()).unwrap_or(1);
        vcpu.write(
            Field::Rip,
            match call.rip {
                Rip::Agent(o) => K + AGENT_CODE + u64::from(o) % 0x1000,
                Rip::Kernel => K + TEXT + 0x100,
                Rip::Any(v) => v,
            },
        );
        let regs = vcpu.regs();
        regs.rax = number;
        regs.rbx = match call.rbx {
            Rbx::Layout => K + LAYOUT,
            Rbx::Module => K + MODULE_INFO,
            Rbx::Agent => K + AGENT_INFO,
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
            s.local.view = if from_module { View::Module(last_module) } else { View::Kernel };
        }
        let what = What { i, call, number, rbx: vcpu.regs.rbx, rcx: vcpu.regs.rcx };
        let (rbx, rcx) = (vcpu.regs.rbx, vcpu.regs.rcx);
        let kernel = !call.user && !from_module;
        let integrity_call = (0x10..=0x15).contains(&number);

        let before_vcpu = vcpu.clone();
        let before_engine = engine_state(&guest);
        let before_control = control.clone();
        let before_refusals: Vec<_> = guest.refusals.seen().collect();
        // By an independent walk: is the VMCALL in the pinned agent's code?
        let from_agent_code = guest.integrity.as_ref().is_some_and(|s| {
            let e = &s.engine;
            e.agent().is_some_and(|a| {
                let bytes = ram.bytes.borrow();
                let walk =
                    reference::walk(&|gpa| entry_at(&bytes, gpa), &Paging::from_vcpu(&vcpu), vcpu.read(Field::Rip));
                matches!(walk.end, End::Gpa(gpa) if e.class_of(gpa) == Some(PageClass::ModuleCode(a)))
            })
        });
        let agent_intact = number == 0x11 && rbx == K + AGENT_INFO && rcx == INFO_SIZE && intact(&ram.bytes.borrow());
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
        let after_engine = engine_state(&guest);
        if let Action::Stop(StopReason::IntegrityRefused(why)) = &action {
            // The lock of an agent the policy does not pin: the guest stops
            // as it was, with nothing changed.
            let locked = before_engine.as_ref().is_some_and(|e| e.locked);
            assert!(kernel && number == 0x11 && !locked && input.integrity, "{what}: stopped: {why}");
            assert!(!(agent_pinned && agent_intact), "{what}: the pinned agent, intact, was refused: {why}");
            assert_eq!(vcpu, before_vcpu, "{what}: a refused lock changed registers");
            assert_eq!(after_engine, before_engine, "{what}: a refused lock changed the engine");
            assert!(same_views(&control, &before_control), "{what}: a refused lock changed the views");
            assert!(writes.is_empty(), "{what}: a refused lock wrote guest memory: {writes:x?}");
            break;
        }
        let rax = vcpu.regs.rax;
        // The registers: RIP past the VMCALL, RAX the status, and the
        // results of the calls that return more.
        let mut expected = before_vcpu.clone();
        expected.write(Field::Rip, before_vcpu.read(Field::Rip).wrapping_add(3));
        expected.regs.rax = rax;
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

        if !kernel {
            assert_eq!(rax as i64, Error::NotPermitted.code(), "{what}: not refused");
        }
        // Without integrity, or once locked from other code than the
        // agent's, the integrity calls are refused.
        let locked = before_engine.as_ref().is_some_and(|e| e.locked);
        if kernel && integrity_call && (!input.integrity || locked && !from_agent_code) {
            assert!(is_error(rax), "{what}: an integrity call from outside the agent's code was served");
        }
        if kernel && number == 0x11 && !is_error(rax) {
            assert!(agent_pinned, "{what}: locked with an agent the policy does not pin");
            let e = after_engine.as_ref().expect("locked: integrity on");
            assert!(e.locked && e.agent == Some(rax as u32), "{what}: locked without the agent pinned: {e:?}");
        }
        if let Some(a) = before_engine.as_ref().and_then(|e| e.agent) {
            let e = after_engine.as_ref().expect("an agent: integrity on");
            assert!(e.agent == Some(a) && e.modules.iter().any(|m| m.0 == a), "{what}: the agent was unpinned");
        }
        if !kernel || is_error(rax) {
            let not_permitted = rax as i64 == Error::NotPermitted.code();
            let mut engine = after_engine.clone();
            if let (Some(after), Some(before)) = (engine.as_mut(), before_engine.as_ref()) {
                // One violation recorded, at most: a refused hypercall, or
                // (once locked) a module that cannot be isolated, whose load
                // the agent then vetoes.
                let new = after.violations.get(before.violations.len()..).unwrap_or_default();
                let allowed = |v: &abi::ViolationRecord| {
                    not_permitted && v.kind == ViolationKind::Hypercall as u32
                        || kernel
                            && number == 0x12
                            && before.locked
                            && v.kind == ViolationKind::RegistrationRefused as u32
                };
                assert!(new.len() <= 1 && new.iter().all(allowed), "{what}: {new:?} recorded");
                after.violations.clone_from(&before.violations);
                after.dropped = before.dropped;
            }
            assert_eq!(engine, before_engine, "{what}: a refused call changed the engine");
            let refusals: Vec<_> = guest.refusals.seen().collect();
            if refusals != before_refusals {
                let counted = |r: &[(&'static str, u64)]| r.iter().find(|k| k.0 == "hypercall").map_or(0, |k| k.1);
                let others =
                    |r: &[(&'static str, u64)]| r.iter().filter(|k| k.0 != "hypercall").copied().collect::<Vec<_>>();
                assert!(
                    not_permitted
                        && counted(&refusals) == counted(&before_refusals) + 1
                        && others(&refusals) == others(&before_refusals),
                    "{what}: refusals {before_refusals:?} -> {refusals:?}"
                );
            }
            assert!(same_views(&control, &before_control), "{what}: a refused call changed the views");
            // Every write goes through the log.
            assert!(writes.is_empty(), "{what}: a refused call wrote guest memory: {writes:x?}");
        } else if !writes.is_empty() {
            let returns_data = matches!(number, 0x15 | 0x20);
            let len = if number == 0x15 { rax * abi::VIOLATION_RECORD_SIZE as u64 } else { rcx };
            // A module going live or away: its code pages, if untrusted, scrubbed.
            let scrubbed: Vec<u64> = match (number, before_engine.as_ref()) {
                (0x13 | 0x14, Some(e)) if !e.modules.iter().any(|m| u64::from(m.0) == rbx && m.2) => {
                    e.pages.iter().filter(|(_, c)| u64::from(module_of(*c)) == rbx).map(|(p, _)| *p).collect()
                }
                _ => Vec::new(),
            };
            let call = Served { buffer: rbx, len, returns_data, scrubbed };
            check_writes(&what, &ram.bytes.borrow(), &writes, &before_vcpu, &before_control, input.views, &call);
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
            s.local.view = View::Kernel;
        }
    }
    let state = engine_state(&guest);
    SPARE.with(|s| *s.borrow_mut() = ram.bytes.take());
    state
}

/// The id of the module owning a page of module code (0: not module code).
fn module_of(class: PageClass) -> u32 {
    match class {
        PageClass::ModuleCode(m) => m,
        _ => 0,
    }
}

fn entry_at(bytes: &[u8], gpa: u64) -> Option<u64> {
    let at = usize::try_from(gpa).ok()?;
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Whether the agent is as loaded: its registration, code and `struct
/// module`, and the table entries that map them (accessed and dirty bits aside).
fn intact(b: &[u8]) -> bool {
    let p = pristine();
    let same = |at: u64, n: u64| b[at as usize..(at + n) as usize] == p[at as usize..(at + n) as usize];
    let entry = |bytes: &[u8], at| entry_at(bytes, at).map(|e| e & !0x60);
    [PML4 + 511 * 8, 0x2000 + 510 * 8, 0x3000].into_iter().all(|at| entry(b, at) == entry(p, at))
        && same(AGENT_INFO, INFO_SIZE)
        && same(AGENT_CODE, 0x1000)
        && same(AGENT_DATA, 4)
}

/// The views as the guest sees them: a page given back the rights it had
/// (an explicit RWX in the kernel view, an explicit nothing) is the same.
fn same_views(a: &FakeControl, b: &FakeControl) -> bool {
    let normal = |c: &FakeControl| {
        let mut c = c.clone();
        c.perms.retain(|(view, _), p| !(p.is_empty() || *view == View::Kernel && *p == Perms::RWX));
        c
    };
    normal(a) == normal(b)
}

/// What a served call may write.
struct Served {
    buffer: u64,
    len: u64,
    returns_data: bool,
    /// Pages of untrusted module code it may zero.
    scrubbed: Vec<u64>,
}

/// A successful call's writes: none unless it returns data (or scrubs a
/// module's code); those only in the bytes of `buffer..buffer + len` (by the
/// walk before the call) on pages the kernel's view may write, zeros in the
/// scrubbed pages, and accessed or dirty bits of entries.
fn check_writes(
    what: &What<'_>,
    after: &[u8],
    writes: &[Write],
    vcpu: &Vcpu,
    control: &FakeControl,
    views: bool,
    call: &Served,
) {
    let scrub = |w: &Write| {
        let gpa = w.hpa - HOST_BASE;
        !w.exchange
            && w.new.iter().all(|&b| b == 0)
            && call.scrubbed.contains(&(gpa & !0xfff))
            && (gpa + w.new.len() as u64 - 1) & !0xfff == gpa & !0xfff
    };
    let kept: Vec<&Write> = writes.iter().filter(|w| !scrub(w)).collect();
    if !call.returns_data {
        assert!(kept.iter().all(|w| w.exchange), "{what}: a call that returns no data wrote guest memory: {kept:x?}");
    }
    let (buffer, len) = (call.buffer, if call.returns_data { call.len } else { 0 });
    let paging = Paging::from_vcpu(vcpu);
    // An entry as it was before the call: the writes undone over it.
    let read = |gpa: u64| {
        let mut e = entry_at(after, gpa)?.to_le_bytes();
        for w in writes.iter().rev() {
            let at = w.hpa - HOST_BASE;
            for (k, &old) in w.old.iter().enumerate() {
                if let Some(i) = (at + k as u64).checked_sub(gpa).filter(|&i| i < 8) {
                    e[i as usize] = old;
                }
            }
        }
        Some(u64::from_le_bytes(e))
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
    for w in kept {
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
