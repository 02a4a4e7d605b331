//! Run-time kernel integrity: the kernel view (KEPT) and one view per
//! untrusted module (MEPT), and the decisions taken when control or data
//! crosses between them.
//!
//! Everything here is pure policy over guest-physical pages and guest
//! addresses: the VMX layer turns an EPT violation into a [`Fault`], asks
//! [`Engine::decide`], and carries out the [`Outcome`] (switch EPTP, map a
//! page into a module view, skip a denied write, ...). That keeps the
//! security decisions testable on the host, table by table.
//!
//! What is protected, and how:
//! - KEPT maps the kernel's text read/execute, its rodata, the syscall table
//!   and the IDT read-only, and untrusted modules' code without execute.
//! - MEPT(m) maps m's code read/execute and m's data read/write, and nothing
//!   else until first touched: kernel data is then granted page by page,
//!   read-only by default, writable where the policy allows, never executable.
//! - Crossings: kernel → module only at m's registered entries or at a
//!   recorded return address into m; module → kernel only at legitimate
//!   kernel entries (exported functions the kernel-API policy [`api`]
//!   allows), interrupt handlers, or a recorded return address into the
//!   kernel.

pub mod api;
pub mod control;
pub mod deputy;
pub mod engine;
pub mod layout;
pub mod objects;
pub mod policy;
pub mod returns;
pub mod tables;
pub mod violation;
pub mod wire;

pub use engine::{Engine, Fault, Outcome, Step};
pub use layout::{KernelLayout, ModuleInfo, Range};
pub use violation::{Violation, ViolationKind, ViolationLog};

/// What to do with a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Report and allow.
    Audit,
    /// Report and deny.
    Enforce,
}

/// An EPT view of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum View {
    Kernel,
    Module(u32),
}

/// What each vCPU has of its own in the integrity views: the view it
/// runs, the write being let through on it, and the interrupts it took in
/// a module's view, held for the kernel view. Kept with the vCPU
/// (`guest::VcpuLocal`) and swapped into [`GuestIntegrity`] for the
/// handling of its exits, so that one vCPU can run a module's view while
/// the others run the kernel's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuIntegrity {
    pub view: View,
    pub stepping: Option<Stepping>,
    /// External interrupts taken from a module's view and not yet delivered
    /// (the guest could not take them yet), oldest first.
    pub pending_interrupts: alloc::collections::VecDeque<u8>,
    /// In a module's view: the kernel stack the view was entered on, the
    /// only one the module's code runs on until it leaves.
    pub stack: Option<Range>,
}

impl VcpuIntegrity {
    /// Whether the vCPU is anywhere but plainly in the kernel view: in a
    /// module's view, in a step, or with interrupts held for the kernel view.
    pub fn is_busy(&self) -> bool {
        self.view != View::Kernel || self.stepping.is_some() || !self.pending_interrupts.is_empty()
    }
}

impl Default for VcpuIntegrity {
    fn default() -> Self {
        VcpuIntegrity { view: View::Kernel, stepping: None, pending_interrupts: Default::default(), stack: None }
    }
}

/// A write being let through: the page opened, and how the single step is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stepping {
    pub view: View,
    pub page: u64,
    pub before: Option<crate::mm::paging::Perms>,
    /// Stepped with RFLAGS.TF (no monitor trap flag); whether TF was already
    /// set by the guest, whose own #DB must then still arrive.
    pub trap_flag: Option<bool>,
    /// Bytes on the page the write must leave as they were.
    pub guard: Option<Guard>,
}

/// Guest-physical bytes kept across a let-through write
/// ([`engine::Step::StepBeside`]), and the instruction that wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guard {
    /// The bytes read before the write: `kept` and every range of `held`.
    pub at: u64,
    pub bytes: alloc::vec::Vec<u8>,
    pub rip: u64,
    /// The bytes guarded for the step's own reason (a `struct module`, a
    /// kernel object beside a shared field, a stack's other frames).
    pub kept: Range,
    /// Bytes inside `kept` that the write may change.
    pub allowed: Option<Range>,
    /// Bytes on the page that write-through calls still running were
    /// judged by: never the write's to change.
    pub held: alloc::vec::Vec<Range>,
}

impl Guard {
    /// Whether the write may change guest-physical byte `at`.
    pub fn may_change(&self, at: u64) -> bool {
        !self.held.iter().any(|r| r.contains(at))
            && (!self.kept.contains(at) || self.allowed.is_some_and(|r| r.contains(at)))
    }
}

/// A guest's integrity state: the engine, the view the vCPU runs in, and a
/// write being let through.
pub struct GuestIntegrity {
    pub engine: Engine,
    /// The state of the vCPU whose exit is handled (swapped in from its
    /// own [`VcpuIntegrity`] before, and back out after).
    pub local: VcpuIntegrity,
    /// The modules this guest trusts, each pinned by its code's digest: a
    /// module whose name and code match runs in the kernel view.
    pub trusted: alloc::vec::Vec<policy::Entry>,
    /// What the console has shown of the violations.
    pub repeats: violation::Repeats,
    /// Which exported kernel functions an isolated module may call
    /// (`ctvm.api`); resolved against the kernel's exports at registration.
    pub api: alloc::sync::Arc<api::ApiPolicy>,
    /// The exports the policy denies, by address, for reports.
    pub denied_apis: alloc::collections::BTreeMap<u64, api::DeniedApi>,
    /// The kernel exports trusted modules' relocations name, by name, read
    /// from the kernel's own `__ksymtab` at registration; `None` for a name
    /// exported twice at two addresses (nothing resolves against it).
    pub symbols: alloc::collections::BTreeMap<alloc::string::String, Option<u64>>,
    /// Untracked (heap) pages granted writable to a module view, by
    /// (module, page): revoked on the agent's next drain.
    pub heap_grants: alloc::collections::BTreeSet<(u32, u64)>,
}

impl GuestIntegrity {
    /// Swaps a vCPU's own state in (before its exit is handled) or back out.
    pub fn swap_local(&mut self, local: &mut VcpuIntegrity) {
        core::mem::swap(&mut self.local, local);
    }

    /// A guest's integrity state, if its trust list pins the agent (the
    /// views are driven by the agent alone, identified by its code) and a
    /// kernel-API policy says what isolated modules may call.
    pub fn for_guest(
        mode: Mode,
        trusted: alloc::vec::Vec<policy::Entry>,
        api: Option<alloc::sync::Arc<api::ApiPolicy>>,
    ) -> Result<Self, alloc::string::String> {
        if !trusted.iter().any(|e| e.name == guest_agent::integrity::AGENT_NAME) {
            return Err(alloc::format!(
                "integrity needs its agent pinned: add trust={} (with its ctvm.policy entry, which cargo xtask writes), or integrity=off",
                guest_agent::integrity::AGENT_NAME
            ));
        }
        let api = api.ok_or(
            "integrity needs a kernel-API policy: a ctvm.api module (cargo xtask writes it from the kernel's exports), or integrity=off",
        )?;
        let mut state = Self::new(mode, trusted);
        state.api = api;
        Ok(state)
    }

    /// With an empty kernel-API policy: isolated modules may call nothing.
    pub fn new(mode: Mode, trusted: alloc::vec::Vec<policy::Entry>) -> Self {
        GuestIntegrity {
            engine: Engine::new(mode),
            local: VcpuIntegrity::default(),
            trusted,
            repeats: violation::Repeats::default(),
            api: alloc::sync::Arc::default(),
            denied_apis: alloc::collections::BTreeMap::new(),
            symbols: alloc::collections::BTreeMap::new(),
            heap_grants: alloc::collections::BTreeSet::new(),
        }
    }
}
