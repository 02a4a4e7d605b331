//! The decisions: what an EPT violation in a guest with integrity views means.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use guest_agent::integrity::ViolationAction;

use super::layout::{is_kernel_address, KernelLayout, ModuleInfo, Range};
use super::returns::{InFlight, ReturnPoint, ReturnPoints};
use super::violation::{Violation, ViolationKind, ViolationLog};
use super::{Mode, View};
use crate::exits::Access;
use crate::mm::paging::Perms;

/// What a guest-physical page holds, as far as integrity is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    KernelText,
    KernelReadOnly,
    SyscallTable,
    Idt,
    /// A page of the kernel's own page tables (found at lock time).
    PageTable,
    /// Kernel data the layout names as sensitive (the module list).
    Sensitive,
    ModuleCode(u32),
    ModuleData(u32),
}

/// An EPT violation, as the engine needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub view: View,
    pub access: Access,
    pub gpa: u64,
    /// The guest-linear address accessed (for a fetch: the target).
    pub gva: u64,
    pub rip: u64,
    /// The stack pointer: return points are tied to it.
    pub rsp: u64,
    /// The two words at the top of the guest stack, where a call left its
    /// return address (`None` if unreadable).
    pub stack: [Option<u64>; 2],
    /// The general-purpose registers by number (RSP is 4): where a
    /// branch thunk goes.
    pub gprs: [u64; 16],
    /// For a module's write to an untracked page: the kernel object it
    /// holds if that is one of the protected kinds (`"cred"`, `"task"`,
    /// ...; `"unknown"` when the page's `struct page` cannot be read).
    pub kernel_object: Option<&'static str>,
    /// For a write into such an object: the field there every module may
    /// write (a reference count), if the write lands in one.
    pub shared_field: Option<Range>,
    /// For a module's write to an untracked page: the bytes of it that
    /// hold a kernel structure in the heap no module may write (a probe
    /// list the kernel calls through), guest-physical.
    pub kernel_shield: Option<Range>,
    /// For a module's write to an untracked page: the 16 KiB stack the
    /// address would lie on starts with the kernel's end-of-stack mark (a
    /// task's stack, whatever that task is doing).
    pub task_stack: bool,
    /// For such a write through another linear address of a task's stack
    /// page (the direct map): the stack's own address of the byte written.
    pub stack_alias: Option<u64>,
    /// For the kernel's call into a module: the out-parameters it hands it
    /// in its own frames (see [`super::returns::out_parameter`]).
    pub out_params: [Option<Range>; 6],
}

/// Where control goes when it leaves a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    Own,
    Kernel,
    Module(u32),
    Elsewhere,
}

/// What the VMX layer must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Retry the instruction in another view.
    Switch(View),
    /// Map the faulting page into the current module view with these rights
    /// (never execute), then retry.
    Grant(Perms),
    /// Let this one write to a protected page through: open it, single-step
    /// the instruction, close it again.
    StepOver,
    /// As `StepOver`, for a write beside bytes the writer may not change
    /// (guest-physical, on the same page): they are kept before the step
    /// and put back after it if it changed them.
    StepBeside(Range),
    /// As `StepOver`, for a write into a field every module may write
    /// (`allowed`) on a page it may not: the bytes the instruction could
    /// reach (`guard`, from the faulting address on) are kept, and those
    /// outside `allowed` put back after the step if it changed them.
    StepWithin { guard: Range, allowed: Range },
    /// Audit mode: make the page executable for the kernel again.
    AllowExecute,
    /// Refuse a write: the instruction is skipped, memory is unchanged.
    Skip,
    /// Refuse a call: return to the caller with an error (-EPERM in RAX).
    ReturnError,
    /// Refuse a call to a function whose failure value is NULL: return to
    /// the caller with 0 in RAX.
    ReturnNull,
    /// Refuse a transfer that is not a call (a jump or a return): #GP.
    Fault,
    /// Carry out a branch the hypervisor emulates (a thunk): continue at
    /// `rip` in `view`, after popping the return address if `pop`.
    Branch { view: View, rip: u64, pop: bool },
    /// Not about integrity (an access the views do not explain); the caller
    /// handles it as an ordinary EPT violation.
    NotMine,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub step: Step,
    pub violation: Option<Violation>,
}

impl Outcome {
    fn step(step: Step) -> Self {
        Outcome { step, violation: None }
    }
}

struct Module {
    info: ModuleInfo,
    trusted: bool,
    live: bool,
    /// The guest-physical pages of its code ranges, in order: what a code
    /// address must translate to.
    code_pages: Vec<u64>,
    /// Where its `struct module` lies in guest-physical memory, one piece
    /// per page: the kernel's structure, which its own view may not write.
    shield: Vec<Range>,
    /// It attacked (a refusal in enforce mode): see [`Engine::quarantine`].
    quarantined: bool,
    /// The kernel is unloading it (its `struct module` says GOING).
    unloading: bool,
}

/// Why a registration is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The layout is locked; it cannot change.
    Locked,
    /// No layout yet, or the protections are not on.
    NotLocked,
    /// A range overlaps the kernel or another module.
    Overlap,
    TooMany,
    UnknownModule,
    /// The agent is pinned for the guest's lifetime.
    Pinned,
}

pub struct Engine {
    pub mode: Mode,
    layout: Option<KernelLayout>,
    locked: bool,
    pages: BTreeMap<u64, PageClass>,
    modules: BTreeMap<u32, Module>,
    next_id: u32,
    returns: ReturnPoints,
    /// Pages an untrusted module could write (the heap pages it was
    /// granted; its data once it is gone), with the modules that could: not
    /// executable for the kernel (W^X across views), until registered as
    /// module code, whose checks they then pass, or until the kernel makes
    /// code of its own there once every such module is gone (see
    /// [`Engine::gone_data`]).
    tainted: BTreeMap<u64, Vec<u32>>,
    /// The linear ranges gone untrusted modules' data had, most recent
    /// last (at most [`GONE_RANGES`]): a jump there is a stale pointer into
    /// the module's leftovers, refused even after the module is gone.
    gone_data: alloc::collections::VecDeque<Range>,
    /// Pages classified as page tables because a process's tables hold
    /// them (the kernel's own never go away): the class goes when the
    /// process's table does, so a page the kernel reuses is not refused.
    process_tables: alloc::collections::BTreeSet<u64>,
    /// Pages of the image's data the lock found to be page tables (and
    /// classified so), given back to `Sensitive` if the lock is undone.
    tables_in_data: Vec<u64>,
    /// The guest's agent, pinned at the lock: the only code that may make
    /// integrity hypercalls from then on.
    agent: Option<u32>,
    pub violations: ViolationLog,
    pub stats: Stats,
    /// The guest CPU whose exit is being handled: violations name it.
    pub cpu: u32,
    /// Modules quarantined since the caller last asked ([`Engine::take_quarantined`]).
    newly_quarantined: Vec<u32>,
    /// Stack pages granted writable to a module's view (the module, the
    /// page's linear and guest-physical address): its own frames then,
    /// taken back once they may hold the kernel's (see
    /// [`Engine::stale_stack_grants`]).
    stack_grants: Vec<(u32, u64, u64)>,
    /// Tasks' stack pages by guest-physical page: the stack's own linear
    /// address of each. A module may reach them through other addresses
    /// (the direct map); its write is judged as one to the stack.
    stacks: BTreeMap<u64, u64>,
    /// The same pages by linear address.
    stack_vas: alloc::collections::BTreeSet<u64>,
}

/// What the engine decided, counted: the cost of isolation is in these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// View switches at crossings between kernel and modules.
    pub switches: u64,
    /// Thunk branches carried out by the hypervisor.
    pub branches: u64,
    /// Pages granted into module views on first touch.
    pub grants: u64,
    /// Writes to protected text let through for the kernel's own patching.
    pub pokes: u64,
    /// Walks of the page tables before a module is granted a page that
    /// may be a table no walk has seen.
    pub table_walks: u64,
    pub violations: u64,
}

/// Violation records kept for the agent, which drains them every second
/// and whenever `/proc/ctvm_violations` is read: a burst of thousands fits.
/// Past it, the oldest are dropped and counted (a gap in the sequence).
pub const VIOLATION_LOG: usize = 8192;

const MAX_MODULES: usize = guest_agent::integrity::MODULES_MAX as usize;
/// Pages tracked for modules, all together (256 MiB of module memory): the
/// bookkeeping lives on the hypervisor's heap, which a guest must not
/// exhaust. Debian's largest module, amdgpu, is 4.7 MiB of text and 2.5 MiB
/// of data (1 850 pages; i915 550, xfs 300, mlx5_core 280).
pub const MAX_MODULE_PAGES: usize = 1 << 16;

/// Gone modules' data ranges remembered ([`Engine::gone_data`]): a module
/// gone this many unloads ago has long had its addresses freed.
const GONE_RANGES: usize = 4096;

/// The most bytes one instruction stores (a 512-bit vector register).
const MAX_STORE: u64 = 64;

fn page(addr: u64) -> u64 {
    addr & !0xfff
}

/// The bytes one store at `gpa` can reach on its page.
fn store_guard(gpa: u64) -> Range {
    Range::new(gpa, (gpa + MAX_STORE).min(page(gpa) + 0x1000))
}

/// The guest-physical pieces (one per page) of `r`, a guest-virtual range
/// inside `ranges`, whose pages translate to `pages` in order (as a
/// registration reads them). Parts outside `ranges` have no pieces.
fn physical(ranges: &[Range], pages: &[u64], r: Range) -> Vec<Range> {
    let gpa_of = |va: u64| ranges.iter().flat_map(Range::pages).zip(pages).find(|(v, _)| *v == va).map(|(_, g)| *g);
    r.pieces()
        .filter_map(|piece| {
            let va = page(piece.start);
            let gpa = page(gpa_of(va)?);
            Some(Range::new(gpa + (piece.start - va), gpa + (piece.end - va)))
        })
        .collect()
}

fn in_ranges(ranges: &[Range], addr: u64) -> bool {
    ranges.iter().any(|r| r.contains(addr))
}

impl Engine {
    pub fn new(mode: Mode) -> Self {
        Engine {
            mode,
            layout: None,
            locked: false,
            pages: BTreeMap::new(),
            modules: BTreeMap::new(),
            next_id: 1,
            returns: ReturnPoints::default(),
            tainted: BTreeMap::new(),
            gone_data: alloc::collections::VecDeque::new(),
            process_tables: alloc::collections::BTreeSet::new(),
            tables_in_data: Vec::new(),
            agent: None,
            violations: ViolationLog::new(VIOLATION_LOG),
            stats: Stats::default(),
            cpu: 0,
            newly_quarantined: Vec::new(),
            stack_grants: Vec::new(),
            stacks: BTreeMap::new(),
            stack_vas: alloc::collections::BTreeSet::new(),
        }
    }

    pub fn layout(&self) -> Option<&KernelLayout> {
        self.layout.as_ref()
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Takes the kernel's layout (already validated against LSTAR) and the
    /// guest-physical pages of its protected parts, as (page, class).
    pub fn register_kernel(
        &mut self,
        mut layout: KernelLayout,
        pages: impl IntoIterator<Item = (u64, PageClass)>,
    ) -> Result<(), RegisterError> {
        if self.locked {
            return Err(RegisterError::Locked);
        }
        layout.entries.sort_unstable();
        layout.entries.dedup();
        layout.denied_entries.sort_unstable();
        layout.gates.sort_unstable();
        layout.gates.dedup_by_key(|g| g.0);
        layout.return_thunks.sort_unstable();
        layout.return_thunks.dedup();
        layout.deputies.sort_unstable_by_key(|d| d.0);
        layout.null_on_failure.sort_unstable();
        layout.null_on_failure.dedup();
        layout.deputies.dedup_by_key(|d| d.0);
        if !self.returns.set_extents(layout.interrupt_stacks.clone()) {
            return Err(RegisterError::Overlap);
        }
        // Before the lock only the kernel's classes exist: a layout given
        // again replaces them all, leaving nothing of the one before.
        self.pages.clear();
        for (gpa, class) in pages {
            self.pages.insert(page(gpa), class);
        }
        self.layout = Some(layout);
        Ok(())
    }

    /// Locks the layout; from now on it cannot change and the protections hold.
    /// Returns the page-table pages it classified, for [`Self::revert_lock`].
    pub fn lock(&mut self, page_tables: impl IntoIterator<Item = u64>) -> Result<Vec<u64>, RegisterError> {
        if self.layout.is_none() {
            return Err(RegisterError::NotLocked);
        }
        if self.locked {
            return Err(RegisterError::Locked);
        }
        let mut added = Vec::new();
        self.tables_in_data.clear();
        for gpa in page_tables {
            match self.pages.entry(page(gpa)) {
                alloc::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(PageClass::PageTable);
                    added.push(page(gpa));
                }
                // The image's static tables (level2_kernel_pgt, ...) lie in
                // its .data: the same rights, named for what they are.
                alloc::collections::btree_map::Entry::Occupied(mut o) if *o.get() == PageClass::Sensitive => {
                    o.insert(PageClass::PageTable);
                    self.tables_in_data.push(page(gpa));
                }
                alloc::collections::btree_map::Entry::Occupied(_) => {}
            }
        }
        self.locked = true;
        Ok(added)
    }

    /// Page tables the kernel allocated after the lock, found by a later
    /// walk: classified where nothing else claims the page. Returns those
    /// newly classified. (Kernel page tables are not freed on x86-64 short
    /// of memory hot-unplug, so a class once given stays.)
    pub fn add_page_tables(&mut self, tables: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut added = Vec::new();
        for gpa in tables {
            match self.pages.entry(page(gpa)) {
                alloc::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(PageClass::PageTable);
                    added.push(page(gpa));
                }
                // A process's table the kernel now holds as its own stays.
                alloc::collections::btree_map::Entry::Occupied(o) => {
                    self.process_tables.remove(o.key());
                }
            }
        }
        added
    }

    /// The processes' page tables, as a fresh walk found them: the pages
    /// newly classified, and those no longer tables whose class is
    /// dropped (the process went and the kernel may reuse the page), but
    /// only from a `whole` walk: a list read in part drops nothing.
    /// Pages something else claims are left alone.
    pub fn set_process_tables(&mut self, found: &[u64], whole: bool) -> (Vec<u64>, Vec<u64>) {
        let found: alloc::collections::BTreeSet<u64> = found.iter().map(|&p| page(p)).collect();
        let mut added = Vec::new();
        for &p in &found {
            if let alloc::collections::btree_map::Entry::Vacant(v) = self.pages.entry(p) {
                v.insert(PageClass::PageTable);
                self.process_tables.insert(p);
                added.push(p);
            }
        }
        let gone: Vec<u64> = if whole {
            self.process_tables.iter().copied().filter(|p| !found.contains(p)).collect()
        } else {
            Vec::new()
        };
        for p in &gone {
            self.process_tables.remove(p);
            self.pages.remove(p);
        }
        (added, gone)
    }

    /// How many pages are classified as processes' page tables.
    pub fn process_table_count(&self) -> usize {
        self.process_tables.len()
    }

    /// Whether `gpa` is classified because a process's tables hold it
    /// (a class the next walk may drop).
    pub fn is_process_table(&self, gpa: u64) -> bool {
        self.process_tables.contains(&page(gpa))
    }

    /// Whether an isolated module was ever granted a write to `gpa`: the
    /// page is never executable for the kernel.
    pub fn is_tainted(&self, gpa: u64) -> bool {
        self.tainted.contains_key(&page(gpa))
    }

    /// Undoes a lock whose agent could not be put in place (before any
    /// other module registered): the lock is all or nothing.
    pub fn revert_lock(&mut self, added: &[u64]) {
        if self.agent.is_none() && self.modules.is_empty() {
            for p in added {
                self.pages.remove(p);
            }
            for p in core::mem::take(&mut self.tables_in_data) {
                self.pages.insert(p, PageClass::Sensitive);
            }
            self.locked = false;
        }
    }

    /// Adds a module with the guest-physical pages of its code and data.
    /// Trusted modules keep running in the kernel view.
    pub fn register_module(
        &mut self,
        mut info: ModuleInfo,
        trusted: bool,
        code_pages: &[u64],
        data_pages: &[u64],
    ) -> Result<u32, RegisterError> {
        if !self.locked {
            return Err(RegisterError::NotLocked);
        }
        let tracked = self.pages.values().filter(|c| matches!(c, PageClass::ModuleCode(_) | PageClass::ModuleData(_)));
        if self.modules.len() >= MAX_MODULES || tracked.count() + code_pages.len() + data_pages.len() > MAX_MODULE_PAGES
        {
            return Err(RegisterError::TooMany);
        }
        // A page a process's table held until lately is the kernel's to
        // give: the kernel freed it and the walk has not looked since.
        let clash = code_pages
            .iter()
            .chain(data_pages)
            .any(|&p| self.pages.contains_key(&page(p)) && !self.process_tables.contains(&page(p)));
        if clash {
            return Err(RegisterError::Overlap);
        }
        let shield = physical(&info.data, data_pages, info.module_struct);
        // Two virtual pages of the structure on one physical page would let
        // a write into one piece pass as a write beside the other.
        if shield.iter().enumerate().any(|(i, r)| shield[..i].iter().any(|o| page(o.start) == page(r.start))) {
            return Err(RegisterError::Overlap);
        }
        let id = self.next_id;
        self.next_id += 1;
        // Trusted modules run in the kernel view, but their pages are still
        // tracked: no isolated module may write them.
        for &p in code_pages.iter().chain(data_pages) {
            self.process_tables.remove(&page(p));
        }
        for &p in code_pages {
            self.pages.insert(page(p), PageClass::ModuleCode(id));
            self.tainted.remove(&page(p));
        }
        for &p in data_pages {
            self.pages.insert(page(p), PageClass::ModuleData(id));
        }
        info.entries.sort_unstable();
        info.entries.dedup();
        info.exports.sort_unstable();
        info.exports.dedup();
        let module = Module {
            info,
            trusted,
            live: false,
            code_pages: code_pages.to_vec(),
            shield,
            quarantined: false,
            unloading: false,
        };
        self.modules.insert(id, module);
        Ok(id)
    }

    /// The module finished init: its init ranges stop being entries.
    pub fn module_live(&mut self, id: u32, init_pages: &[u64]) -> Result<(), RegisterError> {
        let m = self.modules.get_mut(&id).ok_or(RegisterError::UnknownModule)?;
        m.live = true;
        let init = core::mem::take(&mut m.info.init);
        m.info.entries.retain(|&e| !in_ranges(&init, e));
        // Its init code is freed: those addresses may soon be another
        // module's, and must not be taken for this one's.
        let within_init = |r: &Range| init.iter().any(|i| i.start <= r.start && r.end <= i.end);
        let mut pages = core::mem::take(&mut m.code_pages).into_iter();
        let mut kept = Vec::new();
        for r in &m.info.code {
            let n = r.pages().count();
            let slice: Vec<u64> = pages.by_ref().take(n).collect();
            if !within_init(r) {
                kept.extend(slice);
            }
        }
        m.code_pages = kept;
        m.info.code.retain(|r| !within_init(r));
        let trusted = m.trusted;
        for p in init_pages {
            match self.pages.get(&page(*p)) {
                Some(PageClass::ModuleCode(m)) if *m == id => {
                    self.pages.remove(&page(*p));
                }
                Some(PageClass::ModuleData(m)) if *m == id => {
                    self.pages.remove(&page(*p));
                    if !trusted {
                        self.taint(id, *p);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The module is going: its pages and return points go too. An
    /// untrusted module's data stays tainted: it wrote there, so the kernel
    /// must not execute it whatever the page holds next.
    pub fn unregister_module(&mut self, id: u32) -> Result<ModuleInfo, RegisterError> {
        if self.agent == Some(id) {
            return Err(RegisterError::Pinned);
        }
        let m = self.modules.remove(&id).ok_or(RegisterError::UnknownModule)?;
        let mut data = Vec::new();
        self.pages.retain(|&p, c| match c {
            PageClass::ModuleCode(x) if *x == id => false,
            PageClass::ModuleData(x) if *x == id => {
                data.push(p);
                false
            }
            _ => true,
        });
        if !m.trusted {
            for p in data {
                self.taint(id, p);
            }
            for &r in &m.info.data {
                if self.gone_data.len() == GONE_RANGES {
                    self.gone_data.pop_front();
                }
                self.gone_data.push_back(r);
            }
        }
        self.returns.forget(View::Module(id));
        self.stack_grants.retain(|g| g.0 != id);
        Ok(m.info)
    }

    /// The registered modules' ids.
    pub fn modules(&self) -> impl Iterator<Item = u32> + '_ {
        self.modules.keys().copied()
    }

    /// The init ranges of a module that has not gone live yet.
    pub fn module_init(&self, id: u32) -> Option<Vec<Range>> {
        self.modules.get(&id).map(|m| m.info.init.clone())
    }

    /// Records a violation found outside the EPT (a register write), in
    /// `view`, and says what the mode makes of it.
    pub fn record(&mut self, kind: ViolationKind, view: View, rip: u64, target: u64) -> Violation {
        let action = match self.mode {
            Mode::Enforce => ViolationAction::Denied,
            Mode::Audit => ViolationAction::Allowed,
        };
        self.record_action(kind, view, rip, target, action)
    }

    /// Records a violation that was refused whatever the mode (containment:
    /// no mode lets a guest out of the hypervisor's hands).
    pub fn record_denied(&mut self, kind: ViolationKind, view: View, rip: u64, target: u64) -> Violation {
        self.record_action(kind, view, rip, target, ViolationAction::Denied)
    }

    fn record_action(
        &mut self,
        kind: ViolationKind,
        view: View,
        rip: u64,
        target: u64,
        action: ViolationAction,
    ) -> Violation {
        self.stats.violations += 1;
        self.log(kind, view, rip, target, action)
    }

    /// Every violation goes through here: logged for the agent, and the
    /// module that made it quarantined if that is what it means.
    fn log(&mut self, kind: ViolationKind, view: View, rip: u64, target: u64, action: ViolationAction) -> Violation {
        let module = match view {
            View::Module(m) => Some(m),
            View::Kernel => None,
        };
        let v = Violation { kind, module, rip, target, action, cpu: self.cpu };
        self.violations.push(&v);
        self.quarantine(&v);
        v
    }

    /// A module that attacked is quarantined (enforce mode): each of its
    /// refused actions is already undone, but a module that tried once will
    /// try again, through every callback it handed the kernel. From now on
    /// the kernel and other modules may not enter it, except while the
    /// kernel unloads it (its `struct module`, which it cannot write, says
    /// GOING), so that its exit routine can take its hooks back and `rmmod`
    /// works. Returns into it stay allowed: the call chain it is in ends as
    /// it would, each further step judged as before. Audit mode reports and
    /// quarantines nothing.
    fn quarantine(&mut self, v: &Violation) {
        // An action the module's code took. Not: calling a module
        // quarantined before (no attack of the caller's), nor a verdict on
        // the module's identity at registration (a look-alike of a trusted
        // module runs isolated, each of its actions judged).
        let not_an_action = matches!(
            v.kind,
            ViolationKind::EnterQuarantined | ViolationKind::CodeDigest | ViolationKind::RegistrationRefused
        );
        let attack = self.mode == Mode::Enforce && v.action == ViolationAction::Denied && !not_an_action;
        let Some(id) = v.module.filter(|_| attack) else { return };
        if let Some(m) = self.modules.get_mut(&id).filter(|m| !m.trusted && !m.quarantined) {
            m.quarantined = true;
            self.newly_quarantined.push(id);
        }
    }

    /// The modules quarantined since the last call, for the console.
    pub fn take_quarantined(&mut self) -> Vec<u32> {
        core::mem::take(&mut self.newly_quarantined)
    }

    pub fn is_quarantined(&self, id: u32) -> bool {
        self.modules.get(&id).is_some_and(|m| m.quarantined)
    }

    /// For an execution of module code at `gpa`: the quarantined module
    /// whose `struct module` (at the address returned) the caller must
    /// read to tell whether the kernel is unloading it.
    pub fn quarantined_code(&self, gpa: u64) -> Option<(u32, u64)> {
        let Some(PageClass::ModuleCode(id)) = self.class_of(gpa) else { return None };
        let m = self.modules.get(&id).filter(|m| m.quarantined && !m.unloading)?;
        Some((id, m.info.module_struct.start))
    }

    /// The kernel unloads module `id` (its state read GOING): a state it
    /// never leaves, so the exit routine may run.
    pub fn set_unloading(&mut self, id: u32) {
        if let Some(m) = self.modules.get_mut(&id) {
            m.unloading = true;
        }
    }

    /// Whether the kernel or another module may enter module `id` now.
    fn enterable(&self, id: u32) -> bool {
        self.modules.get(&id).is_some_and(|m| !m.quarantined || m.unloading)
    }

    pub fn module_name(&self, id: u32) -> Option<&str> {
        self.modules.get(&id).map(|m| m.info.name.as_str())
    }

    pub fn is_trusted(&self, id: u32) -> bool {
        self.modules.get(&id).is_some_and(|m| m.trusted)
    }

    /// Pins module `id`, registered trusted, as the guest's agent.
    pub fn set_agent(&mut self, id: u32) -> Result<(), RegisterError> {
        if self.agent.is_some() || !self.is_trusted(id) {
            return Err(RegisterError::Pinned);
        }
        self.agent = Some(id);
        Ok(())
    }

    pub fn agent(&self) -> Option<u32> {
        self.agent
    }

    /// Whether code at `addr`, fetched from guest-physical `gpa`, is the
    /// pinned agent's, reached through the page it is registered at.
    pub fn is_agent_code(&self, addr: u64, gpa: u64) -> bool {
        self.agent.is_some_and(|a| self.class_of(gpa) == Some(PageClass::ModuleCode(a)))
            && self.translates_as_registered(addr, gpa)
    }

    /// The address of module `id`'s `struct module`.
    pub fn module_struct(&self, id: u32) -> Option<u64> {
        self.modules.get(&id).map(|m| m.info.module_struct.start)
    }

    pub fn class_of(&self, gpa: u64) -> Option<PageClass> {
        self.pages.get(&page(gpa)).copied()
    }

    /// Every tracked page, for building the views.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageClass)> + '_ {
        self.pages.iter().map(|(&p, &c)| (p, c))
    }

    fn remember(&mut self, into: View, from: View, address: u64, rsp: u64) {
        self.returns.remember(ReturnPoint { into, from, address, rsp });
    }

    /// Return points live, and forgotten to their bound.
    pub fn return_points(&self) -> (usize, u64) {
        (self.returns.len(), self.returns.forgotten)
    }

    /// The module on whose behalf kernel code running at `rsp` runs (the
    /// nearest module call live on that stack), if any.
    pub fn deputy_of(&self, rsp: u64) -> Option<u32> {
        self.returns.caller_on_stack(rsp)
    }

    /// Where a branch out of a module really goes: the register of an
    /// indirect-branch thunk, else the fetched address.
    pub fn call_target(&self, fault: &Fault) -> u64 {
        let thunk = self.layout.as_ref().and_then(|l| l.thunk_register(fault.gva));
        thunk.map_or(fault.gva, |reg| fault.gprs[reg])
    }

    /// For a branch to a write-through kernel function (see [`super::deputy`]):
    /// what it writes. `None` for any other target.
    pub fn deputy_spec(&self, target: u64) -> Option<super::deputy::Spec> {
        let deputies = &self.layout.as_ref()?.deputies;
        let i = deputies.binary_search_by_key(&target, |d| d.0).ok()?;
        Some(deputies[i].1)
    }

    /// Whether module `m` may itself write `bytes` (guest-physical, on one
    /// page, which holds the protected `object` if any): what it may ask a
    /// write-through function to write for it.
    pub fn module_may_write(&self, m: u32, bytes: Range, object: Option<&str>) -> bool {
        match self.class_of(bytes.start) {
            None => object.is_none(),
            Some(PageClass::ModuleData(owner)) if owner == m => self
                .modules
                .get(&m)
                .is_some_and(|md| md.shield.iter().all(|s| s.end <= bytes.start || bytes.end <= s.start)),
            _ => false,
        }
    }

    /// A module's call to a write-through function whose destination (at
    /// `at`, guest-virtual) it may not write: the function would be its
    /// deputy. Refused in enforce mode; in audit mode reported, and the
    /// call judged as any other.
    pub fn deputy_refused(&mut self, fault: &Fault, m: u32, kind: ViolationKind, at: u64) -> Outcome {
        // Write-through functions are exports returning a count, a status
        // or their destination, never checked for NULL: -EPERM.
        let deny = if self.is_call_from(fault, m, false) { Step::ReturnError } else { Step::Fault };
        // Reported at the module's call site.
        let call_site = fault.stack[0].filter(|&a| self.is_code_of(m, a)).unwrap_or(fault.rip);
        let site = Fault { rip: call_site, ..*fault };
        let out = self.violation_at(&site, kind, at, deny, Step::NotMine);
        self.stats.violations += 1;
        if out.step != Step::NotMine {
            return out;
        }
        Outcome { step: self.decide(fault).step, violation: out.violation }
    }

    /// Where a module's write-through call (judged by `inputs`, writing
    /// `writes`, guest-physical) and the calls already running disagree:
    /// the first byte one writes that another was judged by. `Some(0)`
    /// when no more calls can be held. Refused, as a call whose
    /// destination the module could not write is ([`Self::deputy_refused`]).
    pub fn call_conflict(&self, inputs: &[Range], writes: &[Range]) -> Option<u64> {
        if !self.returns.can_hold_call() {
            return Some(0);
        }
        self.returns.conflict(inputs, writes)
    }

    /// Holds a module's write-through call, let run, until it returns: with
    /// RSP `rsp`, the frame above its return address.
    pub fn hold_call(&mut self, m: u32, rsp: u64, inputs: Vec<Range>, writes: Vec<Range>) {
        if !inputs.is_empty() || !writes.is_empty() {
            // Room was made sure of by `call_conflict`.
            let held = self.returns.hold_call(rsp, InFlight { module: m, inputs, writes });
            debug_assert!(held);
        }
    }

    /// The bytes of guest-physical `page` that write-through calls still
    /// running were judged by (a write beside them keeps them).
    pub fn inputs_on(&self, page: u64) -> Vec<Range> {
        self.returns.inputs_on(page)
    }

    /// Whether `bytes` (guest-physical) reach into what a write-through
    /// call still running was judged by.
    pub fn holds_input(&self, bytes: Range) -> bool {
        self.returns.holds_input(bytes)
    }

    /// The guest-physical page a code address must translate to: kernel
    /// text or a module's code as registered.
    pub fn expected_page(&self, addr: u64) -> Option<u64> {
        let page_index = |r: &Range| (addr >> 12) - (r.start >> 12);
        if let Some(l) = self.layout.as_ref().filter(|l| l.text.contains(addr)) {
            return l.text_pages.get(page_index(&l.text) as usize).copied();
        }
        let (_, md) = self.modules.iter().find(|(_, md)| in_ranges(&md.info.code, addr))?;
        let mut before = 0u64;
        for r in &md.info.code {
            if r.contains(addr) {
                return md.code_pages.get((before + page_index(r)) as usize).copied();
            }
            before += r.pages().count() as u64;
        }
        None
    }

    /// Whether a code address was reached through the page it is
    /// registered at (a remapped linear address gains nothing).
    fn translates_as_registered(&self, addr: u64, gpa: u64) -> bool {
        self.expected_page(addr) == Some(page(gpa))
    }

    fn violation(&mut self, fault: &Fault, kind: ViolationKind, deny: Step, allow: Step) -> Outcome {
        self.violation_at(fault, kind, fault.gva, deny, allow)
    }

    fn violation_at(&mut self, fault: &Fault, kind: ViolationKind, target: u64, deny: Step, allow: Step) -> Outcome {
        let (step, action) = match self.mode {
            Mode::Enforce => (deny, ViolationAction::Denied),
            Mode::Audit => (allow, ViolationAction::Allowed),
        };
        let v = self.log(kind, fault.view, fault.rip, target, action);
        Outcome { step, violation: Some(v) }
    }

    /// Decides what an EPT violation means.
    pub fn decide(&mut self, fault: &Fault) -> Outcome {
        let out = self.judge(fault);
        let counter = match out.step {
            Step::Switch(_) => Some(&mut self.stats.switches),
            Step::Branch { .. } => Some(&mut self.stats.branches),
            Step::Grant(_) => Some(&mut self.stats.grants),
            _ => None,
        };
        if let Some(c) = counter {
            *c += 1;
        }
        if out.violation.is_some() {
            self.stats.violations += 1;
        }
        out
    }

    fn judge(&mut self, fault: &Fault) -> Outcome {
        if !self.locked {
            return Outcome::step(Step::NotMine);
        }
        let class = self.class_of(fault.gpa);
        match (fault.view, fault.access) {
            (View::Kernel, Access::Execute) => self.kernel_executes(fault, class),
            (View::Kernel, Access::Write) => self.write_to_protected(fault, class, false),
            (View::Kernel, Access::Read) => Outcome::step(Step::NotMine),
            (View::Module(m), Access::Execute) => self.module_executes(fault, m, class),
            (View::Module(_), Access::Read) => Outcome::step(Step::Grant(Perms::READ)),
            // What a write-through call still running was judged by.
            (View::Module(_), Access::Write) if self.returns.holds_input(Range::new(fault.gpa, fault.gpa + 1)) => {
                self.violation(fault, ViolationKind::DeputyInput, Step::Skip, Step::StepOver)
            }
            (View::Module(m), Access::Write) => {
                let out = self.module_writes(fault, m, class);
                self.beside_inputs(fault, out)
            }
        }
    }

    /// A module's write to a page holding what a write-through call still
    /// running was judged by is let through alone, never granted: the
    /// bytes held are put back if it changed them (see `exits::check_guard`).
    fn beside_inputs(&self, fault: &Fault, out: Outcome) -> Outcome {
        let page_range = Range::new(page(fault.gpa), page(fault.gpa) + 0x1000);
        match out.step {
            Step::Grant(perms) if perms.contains(Perms::WRITE) && self.returns.holds_input(page_range) => {
                Outcome { step: Step::StepWithin { guard: page_range, allowed: page_range }, ..out }
            }
            _ => out,
        }
    }

    fn module_writes(&mut self, fault: &Fault, m: u32, class: Option<PageClass>) -> Outcome {
        match class {
            Some(PageClass::ModuleData(owner)) if owner == m => self.own_data_write(fault, m),
            None if self.stack_address(fault.gva, fault.task_stack, fault.stack_alias).is_some() => {
                self.stack_write(fault, m)
            }
            // A process's page table the last walk has not seen yet.
            None if fault.kernel_object == Some(super::objects::PAGE_TABLE) => {
                self.violation(fault, ViolationKind::WritePageTable, Step::Skip, Step::StepOver)
            }
            // A structure the kernel calls through, amid heap objects.
            None if fault.kernel_shield.is_some() => self.shielded_write(fault, fault.kernel_shield),
            // The kernel's bookkeeping in its heap is the kernel's, but
            // for a reference count the kernel's inline helpers change
            // from module code: that field alone.
            None if fault.kernel_object.is_some() => match fault.shared_field {
                Some(allowed) => Outcome::step(Step::StepWithin { guard: store_guard(fault.gpa), allowed }),
                None => self.violation(fault, ViolationKind::WriteKernelObject, Step::Skip, Step::StepOver),
            },
            None => Outcome::step(Step::Grant(Perms::RW)),
            _ => self.write_to_protected(fault, class, true),
        }
    }

    /// A module writes its own data. The page holding its `struct module`
    /// (the kernel's list links, state and reference count, which a rootkit
    /// unlinks to hide) stays read-only in its view: a write into the
    /// structure is refused, a write beside it goes through alone, with the
    /// structure's bytes checked afterwards (an instruction's width is not
    /// known here: a wide store may start beside the structure and reach into it).
    fn own_data_write(&mut self, fault: &Fault, m: u32) -> Outcome {
        let shield = self.modules.get(&m).and_then(|x| x.shield.iter().find(|r| page(r.start) == page(fault.gpa)));
        self.shielded_write(fault, shield.copied())
    }

    /// A module writes a page that may hold bytes it must not change
    /// (`shield`, on the same page): into them it is refused, beside them
    /// it goes through alone, the shield's bytes kept.
    fn shielded_write(&mut self, fault: &Fault, shield: Option<Range>) -> Outcome {
        match shield {
            None => Outcome::step(Step::Grant(Perms::RW)),
            Some(r) if r.contains(fault.gpa) => {
                self.violation(fault, ViolationKind::WriteProtectedData, Step::Skip, Step::StepOver)
            }
            Some(r) => Outcome::step(Step::StepBeside(r)),
        }
    }

    /// Where a module's write to `gva` lands on a kernel stack, by the
    /// stack's own linear address: a stack a crossing is live on, or a
    /// task's (its end-of-stack mark, `task_stack`), or, reached through
    /// another address of its page, `alias`. `None`: on no stack.
    fn stack_address(&self, gva: u64, task_stack: bool, alias: Option<u64>) -> Option<u64> {
        if self.is_stack_address(gva, task_stack) {
            return Some(gva);
        }
        alias
    }

    /// The kernel stack that holds `addr`: a CPU's interrupt or exception
    /// stack, or else a task's 16 KiB window.
    pub fn stack_of(&self, addr: u64) -> Range {
        self.returns.stack_of(addr)
    }

    /// Whether `gva` is known as a kernel stack's own address: a crossing
    /// is live on its stack, or the stack is a task's (`task_stack`). A
    /// write there needs no look for another address of its page.
    pub fn is_stack_address(&self, gva: u64, task_stack: bool) -> bool {
        task_stack || self.returns.owner(gva).is_some()
    }

    /// Stack pages found, as (linear, guest-physical) pairs, by a walk cut
    /// short, at a task's birth or on a stack a module runs on: added in
    /// place, at the cost of those pages alone (a birth is a fork). Returns
    /// the guest-physical pages that were not known as stack pages: a
    /// module view that could write one as a heap page must lose that right.
    pub fn add_stacks(&mut self, found: impl IntoIterator<Item = (u64, u64)>) -> Vec<u64> {
        let mut new = Vec::new();
        for (va, gpa) in found {
            let (va, gpa) = (page(va), page(gpa));
            match self.stacks.insert(gpa, va) {
                Some(old) if old == va => continue,
                Some(old) if !self.stacks.values().any(|&v| v == old) => {
                    self.stack_vas.remove(&old);
                }
                _ => {}
            }
            self.stack_vas.insert(va);
            new.push(gpa);
        }
        new
    }

    /// Every task's stack pages, found by a whole walk of the kernel's
    /// tables: they replace what was known, but a page known before and
    /// not found again stays known while `still_mapped(va, gpa)` (an
    /// interrupt or exception stack, which no walk finds); the rest were
    /// freed. Returns the pages not known before, as [`Engine::add_stacks`].
    pub fn set_stacks(
        &mut self,
        found: impl IntoIterator<Item = (u64, u64)>,
        still_mapped: impl Fn(u64, u64) -> bool,
    ) -> Vec<u64> {
        let mut new = Vec::new();
        let mut stacks = BTreeMap::new();
        for (va, gpa) in found {
            let (va, gpa) = (page(va), page(gpa));
            if self.stacks.get(&gpa) != Some(&va) {
                new.push(gpa);
            }
            stacks.insert(gpa, va);
        }
        let kept = core::mem::take(&mut self.stacks);
        for (gpa, va) in kept {
            if !stacks.contains_key(&gpa) && still_mapped(va, gpa) {
                stacks.entry(gpa).or_insert(va);
            }
        }
        self.stack_vas = stacks.values().copied().collect();
        self.stacks = stacks;
        new
    }

    /// The stack's own linear address of guest-physical `gpa`, if its page
    /// is a known stack page (from the last walk, or a stack a module was
    /// entered on; the caller checks the mapping still holds).
    pub fn stack_page(&self, gpa: u64) -> Option<u64> {
        self.stacks.get(&page(gpa)).map(|va| va + (gpa & 0xfff))
    }

    /// Every known stack page, (linear, guest-physical).
    pub fn stack_pages(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.stacks.iter().map(|(&gpa, &va)| (va, gpa))
    }

    /// Whether the stack page at linear `va` is known.
    pub fn knows_stack(&self, va: u64) -> bool {
        self.stack_vas.contains(&page(va))
    }

    /// A stack page whose mapping is gone (the kernel freed the stack).
    pub fn forget_stack_page(&mut self, gpa: u64) {
        if let Some(va) = self.stacks.remove(&page(gpa)) {
            self.stack_vas.remove(&va);
        }
    }

    /// Whether crossings are live on the task stack window holding `gva`:
    /// a stack only while its task is alive (see [`Self::forget_dead_stack`]).
    pub fn crossings_on_task_window(&self, gva: u64) -> bool {
        self.returns.crossings_on_task_window(gva)
    }

    /// The task whose stack held `gva` is gone (it died inside a call into a
    /// module, or left one through `do_exit`), and the kernel reuses the
    /// address for other memory: the crossings it left there no longer
    /// make that memory a stack.
    pub fn forget_dead_stack(&mut self, gva: u64) {
        self.returns.forget_stack(gva);
    }

    /// A module writes a kernel stack. It runs on the kernel's stacks, and
    /// the kernel's frames share them: the caller of a callback lies above
    /// it, a task the module called the kernel from sleeps on its own. The
    /// module may write its own frames and the out-parameters a call handed
    /// it, nothing else: a return address or a saved register there would
    /// steer the kernel's view where no crossing is judged.
    ///
    /// A page of the running stack wholly the module's is granted (until
    /// it may hold the kernel's frames again); any other write exits and is
    /// stepped over alone, with the bytes around it that are not the
    /// module's put back.
    fn stack_write(&mut self, fault: &Fault, m: u32) -> Outcome {
        let me = View::Module(m);
        let at = self.stack_address(fault.gva, fault.task_stack, fault.stack_alias).unwrap_or(fault.gva);
        let (owner, run) = self.returns.owner(at).unwrap_or((View::Kernel, Range::new(0, 0)));
        let page_va = page(at);
        let on_page = |r: Range| {
            let (from, to) = (r.start.max(page_va), r.end.min(page_va + 0x1000));
            Range::new(page(fault.gpa) + (from - page_va), page(fault.gpa) + (to - page_va))
        };
        let allowed = if owner == me {
            if self.returns.same_stack(at, fault.rsp) && run.start <= page_va && page_va + 0x1000 <= run.end {
                let grant = (m, page_va, page(fault.gpa));
                if !self.stack_grants.contains(&grant) {
                    self.stack_grants.push(grant);
                }
                return Outcome::step(Step::Grant(Perms::RW));
            }
            Some(run)
        } else {
            self.returns.window(me, at)
        };
        match allowed {
            Some(r) => Outcome::step(Step::StepWithin { guard: store_guard(fault.gpa), allowed: on_page(r) }),
            None => self.violation(fault, ViolationKind::WriteKernelStack, Step::Skip, Step::StepOver),
        }
    }

    /// Whether module `m` may write `bytes` (guest-virtual, on one page)
    /// of a kernel stack itself: `None` when they are on no stack CTVM
    /// knows of. `task_stack` and `alias` as for a [`Fault`].
    pub fn stack_may_write(&self, m: u32, bytes: Range, task_stack: bool, alias: Option<u64>) -> Option<bool> {
        let at = self.stack_address(bytes.start, task_stack, alias)?;
        let bytes = Range::new(at, at + bytes.len());
        let me = View::Module(m);
        let within = |r: Range| r.start <= bytes.start && bytes.end <= r.end;
        Some(match self.returns.owner(at) {
            Some((owner, run)) => (owner == me && within(run)) || self.returns.window(me, at).is_some_and(within),
            None => false,
        })
    }

    /// Stack pages granted to module `m`'s view that are no longer wholly
    /// its own frames now that it runs at `rsp`: another task's stack (a
    /// module's view serves every task that enters it), or pages above
    /// where the kernel called it this time. The caller takes write back.
    pub fn stale_stack_grants(&mut self, m: u32, rsp: u64) -> Vec<u64> {
        let returns = &self.returns;
        let mut stale = Vec::new();
        self.stack_grants.retain(|&(owner, va, gpa)| {
            let own = owner != m
                || returns.same_stack(va, rsp)
                    && returns
                        .owner(va)
                        .is_some_and(|(o, run)| o == View::Module(m) && run.start <= va && va + 0x1000 <= run.end);
            if !own {
                stale.push(gpa);
            }
            own
        });
        stale
    }

    /// The guest-physical pages of a module's data that its own view maps
    /// read-only: those holding its `struct module`.
    pub fn shielded_pages(&self, id: u32) -> Vec<u64> {
        self.modules.get(&id).map_or_else(Vec::new, |m| m.shield.iter().map(|r| page(r.start)).collect())
    }

    /// A write let through beside a module's `struct module` changed the
    /// structure: the caller put its bytes back; recorded at the writer.
    pub fn shield_breached(&mut self, view: View, rip: u64, gpa: u64) -> Violation {
        let target = match view {
            View::Module(m) => self.modules.get(&m).and_then(|x| {
                let mut at = x.info.module_struct.start;
                x.shield.iter().find_map(|r| {
                    let found = r.contains(gpa).then(|| at + (gpa - r.start));
                    at += r.len();
                    found
                })
            }),
            View::Kernel => None,
        };
        self.record(ViolationKind::WriteProtectedData, view, rip, target.unwrap_or(gpa))
    }

    /// A page module `m` was given write access to.
    pub fn taint(&mut self, m: u32, gpa: u64) {
        let writers = self.tainted.entry(page(gpa)).or_default();
        if !writers.contains(&m) {
            writers.push(m);
        }
    }

    /// The kernel executes an untracked page a module could once write,
    /// which no module view can write now (its grant was taken back, or
    /// its module is gone), through a linear address no gone module had
    /// for its data: the kernel freed the page and mapped it anew for code
    /// of its own (an ftrace trampoline in what was a task's stack). It is
    /// untainted and the kernel's to execute; a module's next write to it
    /// is a new grant, which takes execution away again (W^X). A stale
    /// pointer into a gone module's data still lands in
    /// [`Engine::gone_data`] and is refused. (What the kernel left of a
    /// module's bytes on the page is reachable only through the new
    /// address.) The caller says whether any module view can write it.
    pub fn kernel_reuses(&mut self, gpa: u64, gva: u64, writable_by_module: bool) -> bool {
        let p = page(gpa);
        let reusable = self.class_of(p).is_none()
            && self.tainted.contains_key(&p)
            && !writable_by_module
            && !self.gone_data.iter().any(|r| r.contains(gva));
        if reusable {
            self.tainted.remove(&p);
        }
        reusable
    }

    /// The kernel view runs into code it may not execute: a module's, or
    /// a page a module could write.
    fn kernel_executes(&mut self, fault: &Fault, class: Option<PageClass>) -> Outcome {
        let written_by_module = matches!(class, None | Some(PageClass::ModuleData(_)))
            && (self.tainted.contains_key(&page(fault.gpa)) || matches!(class, Some(PageClass::ModuleData(_))));
        if written_by_module {
            return self.violation(fault, ViolationKind::ExecuteData, Step::Fault, Step::AllowExecute);
        }
        let Some(PageClass::ModuleCode(m)) = class else {
            return Outcome::step(Step::NotMine);
        };
        if self.is_trusted(m) {
            return Outcome::step(Step::NotMine);
        }
        let target = fault.gva;
        // A call from the kernel gets an error back; anything else faults.
        let deny = if fault.stack[0].is_some_and(is_kernel_address) { Step::ReturnError } else { Step::Fault };
        if !self.translates_as_registered(target, fault.gpa) {
            return self.violation(fault, ViolationKind::Alias, deny, Step::Switch(View::Module(m)));
        }
        if self.returns.take(View::Module(m), View::Kernel, target, fault.rsp) {
            return Outcome::step(Step::Switch(View::Module(m)));
        }
        let is_entry = self.is_module_entry(m, target);
        if is_entry && !self.enterable(m) {
            return self.violation(fault, ViolationKind::EnterQuarantined, deny, Step::Switch(View::Module(m)));
        }
        if is_entry {
            // A call from the kernel: it returns to the address it pushed.
            if let Some(ret) = fault.stack[0].filter(|&a| is_kernel_address(a)) {
                let point = ReturnPoint {
                    into: View::Kernel,
                    from: View::Module(m),
                    address: ret,
                    rsp: fault.rsp.wrapping_add(8),
                };
                let out: Vec<Range> = fault.out_params.iter().flatten().copied().collect();
                self.returns.remember_call(point, &out);
            }
            return Outcome::step(Step::Switch(View::Module(m)));
        }
        self.violation(fault, ViolationKind::EnterModuleOffEntry, deny, Step::Switch(View::Module(m)))
    }

    /// The fixup the kernel resumes module `m` at after a fault at `insn`.
    fn fixup_for(&self, m: u32, insn: u64) -> Option<u64> {
        let md = self.modules.get(&m)?;
        md.info.fixups.iter().find(|&&(i, _)| i == insn).map(|&(_, f)| f)
    }

    /// Where a transfer module `m` made, refused with #GP, is reported to
    /// the kernel: the first address of the module's code that its own
    /// exception table does not cover. Not the target's address: the
    /// kernel's #GP handler resumes an instruction it finds in its exception
    /// table at the fixup, so a jump to such an instruction would have the
    /// kernel's view run on from the fixup, mid-function, with the module's
    /// registers. Reported in the module's code, the fault is the module's
    /// (an oops, its task killed).
    pub fn fault_site(&self, m: u32) -> Option<u64> {
        let md = self.modules.get(&m)?;
        let covered = |a: u64| md.info.fixups.iter().any(|&(i, _)| i == a);
        // Each address a fixup covers moves the site by one: bounded by
        // the module's fixups.
        md.info.code.iter().find_map(|r| {
            let mut a = r.start;
            while a < r.end && covered(a) {
                a += 1;
            }
            (a < r.end).then_some(a)
        })
    }

    /// An interrupt, NMI or exception leaves module `m`: the hypervisor saw
    /// it exit from the module's view and delivers it in the kernel view.
    /// The handler's `iretq` may come back to `resume` (the interrupted
    /// instruction, or the one after a software interrupt) at the
    /// interrupted RSP, or, after a fault at an instruction with an
    /// exception-table entry, to its fixup. (In a module's view every event
    /// exits, so a jump to a handler is never an interrupt.)
    pub fn event_leaves_module(&mut self, m: u32, at: u64, resume: u64, rsp: u64) {
        let mut points = alloc::vec![ReturnPoint { into: View::Module(m), from: View::Kernel, address: resume, rsp }];
        if let Some(fixup) = self.fixup_for(m, at) {
            points.push(ReturnPoint { into: View::Module(m), from: View::Kernel, address: fixup, rsp });
        }
        self.returns.remember_all(&points);
        self.stats.switches += 1;
    }

    /// Module `m` leaves its code (`rip`: a branch out, or an event taken
    /// there) with RSP `rsp`, its view entered on stack `entered`: the
    /// violation if `rsp` lies on another stack. A module's code runs only
    /// on the stack the kernel entered it on; one that moves its stack
    /// pointer onto another task's would have its crossings end that
    /// task's frames (their return points, the write-through calls they
    /// hold), or forge that task's return into the module.
    pub fn pivoted(&mut self, m: u32, rip: u64, rsp: u64, entered: Option<Range>) -> Option<Violation> {
        if !self.is_pivoted(rsp, entered) {
            return None;
        }
        let action = match self.mode {
            Mode::Enforce => ViolationAction::Denied,
            Mode::Audit => ViolationAction::Allowed,
        };
        self.stats.violations += 1;
        Some(self.log(ViolationKind::StackPivot, View::Module(m), rip, rsp, action))
    }

    /// Whether `rsp` lies off `entered`, the stack a module's view was
    /// entered on (see [`Self::pivoted`]), nor just past its top (where a
    /// return from the stack's top slot leaves it).
    pub fn is_pivoted(&self, rsp: u64, entered: Option<Range>) -> bool {
        entered.is_some_and(|stack| self.stack_of(rsp) != stack && self.stack_of(rsp.wrapping_sub(8)) != stack)
    }

    /// A module's view runs into code outside the module.
    fn module_executes(&mut self, fault: &Fault, m: u32, class: Option<PageClass>) -> Outcome {
        let target = fault.gva;
        if class == Some(PageClass::KernelText) {
            let layout = self.layout.as_ref().expect("locked implies a layout");
            // The kernel's branch thunks are branches, judged by where they go.
            if let Some(reg) = layout.thunk_register(target) {
                return self.emulated_branch(fault, m, fault.gprs[reg], false);
            }
            if layout.is_return_thunk(target) {
                return match fault.stack[0] {
                    Some(ret) => self.emulated_branch(fault, m, ret, true),
                    None => self.violation(fault, ViolationKind::CallNonEntry, Step::Fault, Step::Switch(View::Kernel)),
                };
            }
        }
        let dest = match class {
            Some(PageClass::KernelText) => Destination::Kernel,
            Some(PageClass::ModuleCode(other)) if other != m => Destination::Module(other),
            Some(PageClass::ModuleCode(_)) => return Outcome::step(Step::NotMine),
            _ => Destination::Elsewhere,
        };
        let allowed = self.destination_view(m, dest);
        // How a refusal would end is worked out only for a refusal: every
        // allowed call crosses here.
        let crossing = matches!(dest, Destination::Kernel | Destination::Module(_));
        if crossing && !self.translates_as_registered(target, fault.gpa) {
            let deny = self.refusal(fault, m, false, target);
            return self.violation(fault, ViolationKind::Alias, deny, Step::Switch(allowed));
        }
        match self.leave_module(fault, m, target, dest, fault.stack[0], fault.rsp) {
            Ok(view) => Outcome::step(Step::Switch(view)),
            Err(kind) => {
                let deny = self.refusal(fault, m, false, target);
                self.violation(fault, kind, deny, Step::Switch(allowed))
            }
        }
    }

    /// A branch the hypervisor carries out for a thunk (`jmp *reg`, or a
    /// `ret` when `pop`), after judging its real target.
    fn emulated_branch(&mut self, fault: &Fault, m: u32, target: u64, pop: bool) -> Outcome {
        let layout = self.layout.as_ref().expect("locked implies a layout");
        let dest = if self.is_code_of(m, target) {
            Destination::Own
        } else if layout.text.contains(target) {
            Destination::Kernel
        } else if let Some(other) = self.module_with_code(target) {
            Destination::Module(other)
        } else {
            Destination::Elsewhere
        };
        let allowed = self.destination_view(m, dest);
        // A jump leaves the caller's return address on top of the stack; a
        // return consumes it, and arrives 8 bytes higher.
        let return_address = if pop { None } else { fault.stack[0] };
        let rsp = if pop { fault.rsp.wrapping_add(8) } else { fault.rsp };
        match self.leave_module(fault, m, target, dest, return_address, rsp) {
            Ok(view) => Outcome::step(Step::Branch { view, rip: target, pop }),
            Err(kind) => {
                let deny = self.refusal(fault, m, pop, target);
                // Reported at the module's call site rather than in the thunk.
                let at =
                    Fault { rip: return_address.filter(|&a| self.is_code_of(m, a)).unwrap_or(fault.rip), ..*fault };
                self.violation_at(&at, kind, target, deny, Step::Branch { view: allowed, rip: target, pop })
            }
        }
    }

    /// Whether control may go from module `m` to `target` in `dest`, and
    /// the view it runs in there; records the return point of a call.
    /// Whether control may go from module `m` to `target` in `dest`, and
    /// the view it runs in there; records the return point of a call.
    /// `rsp` is the stack pointer once the transfer is done.
    fn leave_module(
        &mut self,
        fault: &Fault,
        m: u32,
        target: u64,
        dest: Destination,
        return_address: Option<u64>,
        rsp: u64,
    ) -> Result<View, ViolationKind> {
        let call_return = return_address.filter(|&a| self.is_code_of(m, a));
        let verdict = self.judge_leaving(fault, m, target, dest, call_return, rsp);
        // Audit mode lets a refused call go: its return is then as
        // legitimate as any, not a second violation.
        if verdict.is_err() && self.mode == Mode::Audit {
            if let Some(ret) = call_return {
                self.remember(View::Module(m), View::Kernel, ret, rsp.wrapping_add(8));
            }
        }
        verdict
    }

    fn judge_leaving(
        &mut self,
        _fault: &Fault,
        m: u32,
        target: u64,
        dest: Destination,
        call_return: Option<u64>,
        rsp: u64,
    ) -> Result<View, ViolationKind> {
        // A return to where this module's caller called it from, on this
        // stack: wherever that is (kernel text, a trampoline, a module).
        let back_into = match dest {
            Destination::Own => return Ok(View::Module(m)),
            Destination::Module(other) if !self.is_trusted(other) => View::Module(other),
            _ => View::Kernel,
        };
        if self.returns.take(back_into, View::Module(m), target, rsp) {
            return Ok(back_into);
        }
        match dest {
            Destination::Own => Ok(View::Module(m)),
            Destination::Kernel => {
                let layout = self.layout.as_ref().expect("locked implies a layout");
                if layout.denied_entries.binary_search(&target).is_ok() {
                    return Err(ViolationKind::CallDeniedApi);
                }
                if layout.entries.binary_search(&target).is_ok() {
                    if let Some(ret) = call_return {
                        self.remember(View::Module(m), View::Kernel, ret, rsp.wrapping_add(8));
                    }
                    return Ok(View::Kernel);
                }
                Err(ViolationKind::CallNonEntry)
            }
            Destination::Module(other) => {
                // A module in the kernel's view is part of the kernel: it is
                // called at what it exports, like the kernel. An isolated one
                // also at the callbacks it hands out.
                let trusted = back_into == View::Kernel;
                let is_entry = self.modules.get(&other).is_some_and(|md| {
                    let entries = if trusted { &md.info.exports } else { &md.info.entries };
                    entries.binary_search(&target).is_ok()
                });
                if !is_entry {
                    return Err(if back_into == View::Kernel {
                        ViolationKind::CallNonEntry
                    } else {
                        ViolationKind::EnterModuleOffEntry
                    });
                }
                if !self.enterable(other) {
                    return Err(ViolationKind::EnterQuarantined);
                }
                if let Some(ret) = call_return {
                    self.remember(View::Module(m), back_into, ret, rsp.wrapping_add(8));
                }
                Ok(back_into)
            }
            Destination::Elsewhere => Err(ViolationKind::ExecuteData),
        }
    }

    /// Where a transfer out of module `m` runs when audit mode lets it go.
    fn destination_view(&self, m: u32, dest: Destination) -> View {
        match dest {
            Destination::Own => View::Module(m),
            Destination::Module(other) if !self.is_trusted(other) => View::Module(other),
            _ => View::Kernel,
        }
    }

    /// Whether `target` is one of module `m`'s registered entries.
    pub fn is_module_entry(&self, m: u32, target: u64) -> bool {
        self.modules.get(&m).is_some_and(|md| md.info.entries.binary_search(&target).is_ok())
    }

    /// Whether a transfer is a call module `m` made, which a refusal can
    /// return from: its return address, on top of the stack, is the
    /// module's code.
    fn is_call_from(&self, fault: &Fault, m: u32, pop: bool) -> bool {
        !pop && fault.stack[0].is_some_and(|a| self.is_code_of(m, a))
    }

    /// How a refused transfer out of module `m` to `target` ends: a call
    /// returns the callee's own failure value to the module; anything else
    /// (a return, a jump) faults.
    ///
    /// An export's convention is known from its name: NULL for the ones
    /// that fail with NULL, so that a caller checking for it goes on
    /// cleanly, else -EPERM. Any other target (a kernel function that is
    /// not exported, such as `kallsyms_lookup_name` found through a kprobe,
    /// the middle of a function, data) has no convention a caller could
    /// rely on, and a caller that reached it for an address checks for 0:
    /// it gets 0, which no caller can take for a valid pointer, where
    /// -EPERM would pass its check and turn into a wild one.
    fn refusal(&self, fault: &Fault, m: u32, pop: bool, target: u64) -> Step {
        if !self.is_call_from(fault, m, pop) {
            return Step::Fault;
        }
        let Some(layout) = self.layout.as_ref() else { return Step::ReturnNull };
        if layout.null_on_failure.binary_search(&target).is_ok() {
            return Step::ReturnNull;
        }
        let exported = layout.entries.binary_search(&target).is_ok()
            || self.module_with_code(target).is_some_and(|o| self.is_module_entry(o, target));
        if exported {
            Step::ReturnError
        } else {
            Step::ReturnNull
        }
    }

    fn module_with_code(&self, addr: u64) -> Option<u32> {
        self.modules.iter().find(|(_, md)| in_ranges(&md.info.code, addr)).map(|(&id, _)| id)
    }

    /// Whether `addr` is module `m`'s code.
    pub fn is_code_of(&self, m: u32, addr: u64) -> bool {
        self.modules.get(&m).is_some_and(|md| in_ranges(&md.info.code, addr))
    }

    /// An access the hypervisor refused to make for `view` (an emulated
    /// operand its view does not allow): recorded by the class of the page,
    /// always denied.
    pub fn refused_access(
        &mut self,
        view: View,
        gpa: u64,
        rip: u64,
        target: u64,
        kind: crate::guest::access::Kind,
    ) -> Violation {
        let class = self.class_of(gpa);
        let violation = match kind {
            crate::guest::access::Kind::Fetch => ViolationKind::ExecuteData,
            _ => Self::write_kind(class).unwrap_or(ViolationKind::WriteProtectedData),
        };
        self.record_denied(violation, view, rip, target)
    }

    /// The violation a write to a page of this class is.
    fn write_kind(class: Option<PageClass>) -> Option<ViolationKind> {
        Some(match class? {
            PageClass::KernelText => ViolationKind::WriteKernelText,
            PageClass::KernelReadOnly => ViolationKind::WriteReadOnlyData,
            PageClass::SyscallTable => ViolationKind::WriteSyscallTable,
            PageClass::Idt => ViolationKind::WriteIdt,
            PageClass::ModuleCode(_) => ViolationKind::WriteModuleCode,
            PageClass::PageTable => ViolationKind::WritePageTable,
            PageClass::Sensitive | PageClass::ModuleData(_) => ViolationKind::WriteProtectedData,
        })
    }

    /// A write to a page one of the views protects.
    fn write_to_protected(&mut self, fault: &Fault, class: Option<PageClass>, from_module: bool) -> Outcome {
        // A field of the kernel's data that every module's inline helpers
        // write (a reference count): that field, and nothing beside it.
        let shared = self.layout.as_ref().and_then(|l| l.shared.iter().find(|r| r.contains(fault.gpa)));
        if let (true, Some(PageClass::Sensitive), Some(&allowed)) = (from_module, class, shared) {
            return Outcome::step(Step::StepWithin { guard: store_guard(fault.gpa), allowed });
        }
        // The kernel view may write its page tables and module data.
        let kernel_may = matches!(class, Some(PageClass::PageTable | PageClass::Sensitive | PageClass::ModuleData(_)));
        let kind = match Self::write_kind(class) {
            Some(kind) if from_module || !kernel_may => kind,
            _ => return Outcome::step(Step::NotMine),
        };
        // The kernel's own text patching (static keys, alternatives, ftrace,
        // kprobes) writes text and module text through text_poke: either in
        // the poke routine itself, or in the memcpy it calls, whose return
        // address is then on top of the stack.
        let in_poke = |addr: u64| self.layout.as_ref().is_some_and(|l| in_ranges(&l.poke_routines, addr));
        let poking = !from_module
            && matches!(kind, ViolationKind::WriteKernelText | ViolationKind::WriteModuleCode)
            && (in_poke(fault.rip) || fault.stack[0].is_some_and(in_poke));
        if poking {
            self.stats.pokes += 1;
            return Outcome::step(Step::StepOver);
        }
        self.violation(fault, kind, Step::Skip, Step::StepOver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const TEXT_GPA: u64 = 0x100_0000;
    const RODATA_GPA: u64 = 0x220_0000;
    const SYSCALL_GPA: u64 = 0x230_0000;
    const IDT_GPA: u64 = 0x240_0000;
    const PT_GPA: u64 = 0x9000;
    /// A page of the kernel image's .data (modprobe_path, init_task, ...).
    const DATA_GPA: u64 = 0x250_0000;
    const PRINTK: u64 = TEXT + 0x1000;
    const SET_MEMORY_RW: u64 = TEXT + 0x2000;
    /// A denied lookup that fails with NULL (`__symbol_get`).
    const LOOKUP: u64 = TEXT + 0x2800;
    const IRQ_HANDLER: u64 = TEXT + 0x3000;
    const POKE: u64 = TEXT + 0x4000;
    const THUNK_RAX: u64 = TEXT + 0x5000;
    const RETURN_THUNK: u64 = TEXT + 0x5800;
    const MOD: u64 = 0xffff_ffff_c000_0000;
    const MOD_CODE_GPA: u64 = 0x3000_0000;
    const MOD_DATA_GPA: u64 = 0x3000_1000;
    const MOD_INIT: u64 = MOD + 0x10;
    const MOD_FN: u64 = MOD + 0x100;
    const HEAP_GPA: u64 = 0x5000_0000;

    /// Pages of kernel text, mapped contiguously at TEXT_GPA.
    const TEXT_PAGES: u64 = 0x1000;
    /// The kernel stack the faults happen on, and a second task's.
    const STACK: u64 = 0xffff_c900_0001_3f00;
    const OTHER_STACK: u64 = 0xffff_c900_0002_3f00;
    const VECTOR_PF: u8 = 14;
    const VECTOR_TIMER: u8 = 0xec;

    fn engine(mode: Mode) -> (Engine, u32) {
        let mut e = Engine::new(mode);
        let layout = KernelLayout {
            text: Range::new(TEXT, TEXT + TEXT_PAGES * 0x1000),
            text_pages: (0..TEXT_PAGES).map(|i| TEXT_GPA + i * 0x1000).collect(),
            entry_syscall: TEXT + 0x80_0000,
            poke_routines: vec![Range::new(POKE, POKE + 0x100)],
            entries: vec![PRINTK, SET_MEMORY_RW, LOOKUP],
            denied_entries: vec![SET_MEMORY_RW, LOOKUP],
            null_on_failure: vec![LOOKUP],
            gates: vec![(VECTOR_PF, IRQ_HANDLER), (VECTOR_TIMER, IRQ_HANDLER + 0x40)],
            indirect_thunks: core::array::from_fn(|r| if r == 0 { THUNK_RAX } else { 0 }),
            return_thunks: vec![RETURN_THUNK],
            ..Default::default()
        };
        let text = (0..TEXT_PAGES).map(|i| (TEXT_GPA + i * 0x1000, PageClass::KernelText));
        let pages = text.chain([
            (RODATA_GPA, PageClass::KernelReadOnly),
            (SYSCALL_GPA, PageClass::SyscallTable),
            (IDT_GPA, PageClass::Idt),
            (DATA_GPA, PageClass::Sensitive),
        ]);
        e.register_kernel(layout, pages).unwrap();
        e.lock([PT_GPA]).unwrap();
        let info = ModuleInfo {
            name: String::from("evil"),
            code: vec![Range::new(MOD, MOD + 0x1000)],
            data: vec![Range::new(MOD + 0x1000, MOD + 0x2000)],
            init: vec![Range::new(MOD, MOD + 0x20)],
            entries: vec![MOD_FN, MOD_INIT],
            fixups: vec![(MOD + 0x400, MOD + 0x480)],
            ..Default::default()
        };
        let id = e.register_module(info, false, &[MOD_CODE_GPA], &[MOD_DATA_GPA]).unwrap();
        (e, id)
    }

    /// A fault on STACK; `gpa` TEXT_GPA stands for the page a text address
    /// is registered at.
    fn fault(view: View, access: Access, gpa: u64, gva: u64, stack: u64) -> Fault {
        let in_text = (TEXT..TEXT + TEXT_PAGES * 0x1000).contains(&gva);
        let gpa = if gpa == TEXT_GPA && in_text { TEXT_GPA + ((gva - TEXT) & !0xfff) } else { gpa };
        Fault {
            view,
            access,
            gpa,
            gva,
            rip: MOD + 0x200,
            rsp: STACK,
            stack: [Some(stack), None],
            gprs: [0; 16],
            kernel_object: None,
            shared_field: None,
            kernel_shield: None,
            task_stack: false,
            stack_alias: None,
            out_params: [None; 6],
        }
    }

    fn at_rsp(f: Fault, rsp: u64) -> Fault {
        Fault { rsp, ..f }
    }

    #[test]
    fn module_pages_are_bounded_in_total() {
        let (mut e, _) = engine(Mode::Enforce);
        let info = |name: &str| ModuleInfo { name: name.into(), ..Default::default() };
        let big: Vec<u64> = (0..MAX_MODULE_PAGES as u64 - 2).map(|i| 0x1_0000_0000 + i * 0x1000).collect();
        e.register_module(info("big"), false, &big, &[]).unwrap();
        let before = e.pages().count();
        // Two pages are tracked already (evil's): one more page is one too many.
        assert_eq!(e.register_module(info("more"), false, &[0x2_0000_0000], &[]), Err(RegisterError::TooMany));
        assert_eq!(e.pages().count(), before, "a refused registration tracks nothing");
    }

    /// Table: (view, access, gpa, target) → step and violation kind, in enforce mode.
    #[test]
    fn decisions_table_enforce() {
        let (_, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        type Case = (View, Access, u64, u64, Step, Option<ViolationKind>);
        let cases: &[Case] = &[
            // Kernel → module: at an entry it switches, elsewhere it is refused.
            (View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, Step::Switch(m), None),
            (
                View::Kernel,
                Access::Execute,
                MOD_CODE_GPA,
                MOD_FN + 3,
                Step::ReturnError,
                Some(ViolationKind::EnterModuleOffEntry),
            ),
            // Module → kernel: exported function yes, mid-function or denied API no.
            (m, Access::Execute, TEXT_GPA, PRINTK, Step::Switch(View::Kernel), None),
            // Code that is no export has no return convention a caller could
            // know: the refusal returns 0, never an error taken for an address.
            (m, Access::Execute, TEXT_GPA, PRINTK + 5, Step::ReturnNull, Some(ViolationKind::CallNonEntry)),
            (m, Access::Execute, TEXT_GPA, SET_MEMORY_RW, Step::ReturnError, Some(ViolationKind::CallDeniedApi)),
            // A refused lookup returns what a failed one does, NULL, not an error a caller takes for an address.
            (m, Access::Execute, TEXT_GPA, LOOKUP, Step::ReturnNull, Some(ViolationKind::CallDeniedApi)),
            (m, Access::Execute, TEXT_GPA, TEXT + 0x9999, Step::ReturnNull, Some(ViolationKind::CallNonEntry)),
            (m, Access::Execute, HEAP_GPA, 0xffff_8880_0000_0000, Step::ReturnNull, Some(ViolationKind::ExecuteData)),
            // An interrupt handler is no entry: only an event being delivered makes it one.
            (m, Access::Execute, TEXT_GPA, IRQ_HANDLER, Step::ReturnNull, Some(ViolationKind::CallNonEntry)),
            // Module data accesses: reads granted read-only, heap writes granted, protected writes refused.
            (m, Access::Read, TEXT_GPA, TEXT, Step::Grant(Perms::READ), None),
            (m, Access::Read, HEAP_GPA, 0xffff_8880_0000_0000, Step::Grant(Perms::READ), None),
            (m, Access::Write, HEAP_GPA, 0xffff_8880_0000_0000, Step::Grant(Perms::RW), None),
            (m, Access::Write, MOD_DATA_GPA, MOD + 0x1000, Step::Grant(Perms::RW), None),
            (m, Access::Write, TEXT_GPA, PRINTK, Step::Skip, Some(ViolationKind::WriteKernelText)),
            (m, Access::Write, RODATA_GPA, 0, Step::Skip, Some(ViolationKind::WriteReadOnlyData)),
            (m, Access::Write, SYSCALL_GPA, 0, Step::Skip, Some(ViolationKind::WriteSyscallTable)),
            (m, Access::Write, IDT_GPA, 0, Step::Skip, Some(ViolationKind::WriteIdt)),
            (m, Access::Write, PT_GPA, 0, Step::Skip, Some(ViolationKind::WritePageTable)),
            (m, Access::Write, MOD_CODE_GPA, MOD, Step::Skip, Some(ViolationKind::WriteModuleCode)),
            // The kernel image's data (modprobe_path, core_pattern, init_task) is the kernel's.
            (m, Access::Write, DATA_GPA, TEXT + 0x150_0000, Step::Skip, Some(ViolationKind::WriteProtectedData)),
            (m, Access::Read, DATA_GPA, TEXT + 0x150_0000, Step::Grant(Perms::READ), None),
            (View::Kernel, Access::Write, DATA_GPA, 0, Step::NotMine, None),
            // The kernel view: writes to protected pages are refused, reads are not integrity matters.
            (View::Kernel, Access::Write, SYSCALL_GPA, 0, Step::Skip, Some(ViolationKind::WriteSyscallTable)),
            (View::Kernel, Access::Write, TEXT_GPA, PRINTK, Step::Skip, Some(ViolationKind::WriteKernelText)),
            (View::Kernel, Access::Write, PT_GPA, 0, Step::NotMine, None),
            (View::Kernel, Access::Read, TEXT_GPA, TEXT, Step::NotMine, None),
            (View::Kernel, Access::Execute, HEAP_GPA, 0, Step::NotMine, None),
        ];
        for (i, &(view, access, gpa, gva, step, kind)) in cases.iter().enumerate() {
            let (mut e, _) = engine(Mode::Enforce);
            let out = e.decide(&fault(view, access, gpa, gva, MOD + 0x300));
            assert_eq!(out.step, step, "case {i}: {view:?} {access:?} {gpa:#x} {gva:#x}");
            assert_eq!(out.violation.as_ref().map(|v| v.kind), kind, "case {i}");
            if let Some(v) = out.violation {
                assert_eq!(v.action, ViolationAction::Denied);
                assert_eq!(e.violations.len(), 1, "every violation is recorded");
            }
        }
    }

    /// A heap page serving a protected slab cache (credentials, tasks) is
    /// never granted; any other heap page is.
    #[test]
    fn the_kernels_objects_in_its_heap_are_not_the_modules() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let (mut e, id) = engine(mode);
            let heap = fault(View::Module(id), Access::Write, HEAP_GPA, 0xffff_8880_5000_0010, 0);
            for object in ["cred", "task", "unknown"] {
                let out = e.decide(&Fault { kernel_object: Some(object), ..heap });
                let v = out.violation.expect("reported");
                assert_eq!(v.kind, ViolationKind::WriteKernelObject);
                let expected = if mode == Mode::Enforce { Step::Skip } else { Step::StepOver };
                assert_eq!(out.step, expected, "{object}: never a grant");
            }
            assert_eq!(e.stats.grants, 0);
            assert_eq!(e.decide(&heap).step, Step::Grant(Perms::RW));
        }
    }

    /// A shared field (init_net's reference count) on a page of the
    /// kernel's data: that field's write goes through, guarded; the rest
    /// of the page stays refused.
    #[test]
    fn a_shared_field_and_nothing_beside_it() {
        let mut e = Engine::new(Mode::Enforce);
        let count = Range::new(DATA_GPA + 0x94, DATA_GPA + 0x98);
        let layout = KernelLayout { shared: vec![count], ..Default::default() };
        e.register_kernel(layout, [(DATA_GPA, PageClass::Sensitive)]).unwrap();
        e.lock([]).unwrap();
        let m = e.register_module(ModuleInfo { name: "veth".into(), ..Default::default() }, false, &[], &[]).unwrap();
        let write = |gpa| fault(View::Module(m), Access::Write, gpa, 0xffff_ffff_8290_0000 + (gpa & 0xfff), 0);
        let out = e.decide(&write(DATA_GPA + 0x94));
        assert_eq!(out.step, Step::StepWithin { guard: Range::new(DATA_GPA + 0x94, DATA_GPA + 0xd4), allowed: count });
        assert!(out.violation.is_none());
        // Near the end of the page, the guard stops at it.
        let e2 = KernelLayout { shared: vec![Range::new(DATA_GPA + 0xffc, DATA_GPA + 0x1000)], ..Default::default() };
        let mut late = Engine::new(Mode::Enforce);
        late.register_kernel(e2, [(DATA_GPA, PageClass::Sensitive)]).unwrap();
        late.lock([]).unwrap();
        let id = late.register_module(ModuleInfo { name: "x".into(), ..Default::default() }, false, &[], &[]).unwrap();
        let out = late.decide(&fault(View::Module(id), Access::Write, DATA_GPA + 0xffc, 0, 0));
        assert!(matches!(out.step, Step::StepWithin { guard, .. } if guard.end == DATA_GPA + 0x1000));
        for beside in [DATA_GPA + 0x90, DATA_GPA + 0x98, DATA_GPA] {
            let out = e.decide(&write(beside));
            assert_eq!(out.step, Step::Skip, "{beside:#x}");
            assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::WriteProtectedData));
        }
        // The kernel writes the page as ever.
        assert_eq!(e.decide(&fault(View::Kernel, Access::Write, DATA_GPA + 0x10, 0, 0)).step, Step::NotMine);
    }

    #[test]
    fn audit_mode_reports_and_allows() {
        let (mut e, id) = engine(Mode::Audit);
        let out = e.decide(&fault(View::Module(id), Access::Write, SYSCALL_GPA, 0, 0));
        assert_eq!(out.step, Step::StepOver);
        assert_eq!(out.violation.unwrap().action, ViolationAction::Allowed);
        // A call into the middle of printk: reported, let through, and its
        // return into the module is then no second violation.
        let module_ret = MOD + 0x123;
        let out = e.decide(&fault(View::Module(id), Access::Execute, TEXT_GPA, PRINTK + 5, module_ret));
        assert_eq!(out.step, Step::Switch(View::Kernel));
        let back = e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0), STACK + 8));
        assert_eq!(back.step, Step::Switch(View::Module(id)));
        assert!(back.violation.is_none());
        assert_eq!(e.violations.len(), 2);
    }

    /// A module that attacked keeps no way back in: the callbacks it handed
    /// the kernel are refused, by the kernel and by other modules, until the
    /// kernel unloads it; the call it is in still returns to it.
    #[test]
    fn a_module_that_attacked_is_quarantined() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let kernel_ret = TEXT + 0x5555;
        let module_ret = MOD + 0x123;
        let enter = |e: &mut Engine, gva, rsp| {
            e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, gva, kernel_ret), rsp))
        };
        // The kernel calls a callback; the module calls printk, then attacks.
        assert_eq!(enter(&mut e, MOD_FN, STACK).step, Step::Switch(m));
        let call = at_rsp(fault(m, Access::Execute, TEXT_GPA, PRINTK, module_ret), STACK - 0x100);
        assert_eq!(e.decide(&call).step, Step::Switch(View::Kernel));
        // A look-alike of a trusted module runs isolated: no attack yet.
        e.record(ViolationKind::CodeDigest, m, 0, MOD);
        assert!(!e.is_quarantined(id));
        assert_eq!(e.decide(&fault(m, Access::Write, SYSCALL_GPA, 0, 0)).step, Step::Skip);
        assert!(e.is_quarantined(id));
        assert_eq!(e.take_quarantined(), [id]);
        assert!(e.take_quarantined().is_empty(), "announced once");
        // printk still returns into it.
        let back = e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0), STACK - 0xf8));
        assert_eq!(back.step, Step::Switch(m));
        // The kernel's next call of the callback is refused with an error.
        let again = enter(&mut e, MOD_FN, STACK - 0x400);
        assert_eq!(again.step, Step::ReturnError);
        let v = again.violation.unwrap();
        assert_eq!((v.kind, v.module, v.target), (ViolationKind::EnterQuarantined, None, MOD_FN));
        // So is another isolated module's call of it.
        let other = ModuleInfo {
            name: "other".into(),
            code: vec![Range::new(MOD + 0x10_0000, MOD + 0x10_1000)],
            ..Default::default()
        };
        let o = e.register_module(other, false, &[0x3100_0000], &[]).unwrap();
        let from_other = fault(View::Module(o), Access::Execute, MOD_CODE_GPA, MOD_FN, MOD + 0x10_0100);
        let out = e.decide(&from_other);
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::EnterQuarantined));
        assert!(!e.is_quarantined(o), "refusing a call into a quarantined module is no attack");
        // Unloading it: its exit routine may run.
        assert_eq!(e.quarantined_code(MOD_CODE_GPA), Some((id, 0)));
        e.set_unloading(id);
        assert_eq!(e.quarantined_code(MOD_CODE_GPA), None);
        assert_eq!(enter(&mut e, MOD_FN, STACK - 0x800).step, Step::Switch(m));
    }

    #[test]
    fn audit_mode_quarantines_nothing() {
        let (mut e, id) = engine(Mode::Audit);
        assert_eq!(e.decide(&fault(View::Module(id), Access::Write, SYSCALL_GPA, 0, 0)).step, Step::StepOver);
        let refused = e.record_denied(ViolationKind::Hypercall, View::Module(id), MOD + 0x200, 0);
        assert_eq!(refused.action, ViolationAction::Denied);
        assert!(!e.is_quarantined(id) && e.take_quarantined().is_empty());
        let entry = at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, TEXT + 0x5555), STACK);
        assert_eq!(e.decide(&entry).step, Step::Switch(View::Module(id)));
    }

    /// The kernel makes code of its own (an ftrace trampoline) in a page a
    /// gone module wrote, through an address of its own: the kernel's.
    /// Through the module's old address it is a stale pointer, refused; a
    /// page a loaded module can write stays refused through any address.
    #[test]
    fn a_gone_modules_page_is_the_kernels_to_make_code_in() {
        let (mut e, id) = engine(Mode::Enforce);
        let other = ModuleInfo { name: "other".into(), ..Default::default() };
        let live = e.register_module(other, false, &[], &[]).unwrap();
        e.taint(live, HEAP_GPA);
        e.taint(id, HEAP_GPA + 0x1000);
        e.unregister_module(id).unwrap();
        let trampoline = 0xffff_ffff_c100_0000;
        let kernel = |gpa, gva| fault(View::Kernel, Access::Execute, gpa, gva, TEXT + 0x100);
        assert!(!e.kernel_reuses(MOD_DATA_GPA, MOD + 0x1040, false), "its old address");
        let stale = e.decide(&kernel(MOD_DATA_GPA, MOD + 0x1040));
        assert_eq!(stale.violation.map(|v| v.kind), Some(ViolationKind::ExecuteData));
        assert!(e.kernel_reuses(MOD_DATA_GPA, trampoline, false));
        assert!(!e.is_tainted(MOD_DATA_GPA));
        assert!(e.kernel_reuses(HEAP_GPA + 0x1000, trampoline + 0x1000, false));
        // A page a loaded module's view can write now stays refused.
        assert!(!e.kernel_reuses(HEAP_GPA, trampoline + 0x2000, true));
        let writable = e.decide(&kernel(HEAP_GPA, trampoline + 0x2000));
        assert_eq!(writable.violation.map(|v| v.kind), Some(ViolationKind::ExecuteData), "a loaded module's");
        assert!(e.kernel_reuses(HEAP_GPA, trampoline + 0x2000, false), "once its grant is taken back");
    }

    #[test]
    fn calls_and_returns_pair_up() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let kernel_ret = TEXT + 0x5555;
        let module_ret = MOD + 0x123;
        let kernel = |gva, rsp| at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, gva, 0), rsp);
        // The kernel calls the module's init at STACK; its return address is in the kernel.
        assert_eq!(
            e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_INIT, kernel_ret), STACK)).step,
            Step::Switch(m)
        );
        // The module calls printk deeper, which will return into the module.
        let call = at_rsp(fault(m, Access::Execute, TEXT_GPA, PRINTK, module_ret), STACK - 0x100);
        assert_eq!(e.decide(&call).step, Step::Switch(View::Kernel));
        // printk's return must land at the address, with the stack pointer, of that call.
        let wrong = e.decide(&kernel(module_ret, STACK - 0x100 + 0x10));
        assert_eq!(wrong.violation.map(|v| v.kind), Some(ViolationKind::EnterModuleOffEntry), "another depth");
        assert_eq!(e.decide(&kernel(module_ret, STACK - 0x100 + 8)).step, Step::Switch(m));
        let again = e.decide(&kernel(module_ret, STACK - 0x100 + 8));
        assert_eq!(
            again.violation.map(|v| v.kind),
            Some(ViolationKind::EnterModuleOffEntry),
            "a return point is used once"
        );
        // The module returns to the kernel (not an exported symbol, but the recorded return).
        let ret = at_rsp(fault(m, Access::Execute, TEXT_GPA, kernel_ret, 0), STACK + 8);
        assert_eq!(e.decide(&ret).step, Step::Switch(View::Kernel));
    }

    #[test]
    fn a_return_point_is_its_own_tasks_and_its_own_modules() {
        let (mut e, id) = engine(Mode::Enforce);
        let other = e
            .register_module(
                ModuleInfo {
                    name: "other".into(),
                    code: vec![Range::new(MOD + 0x10_0000, MOD + 0x10_1000)],
                    entries: vec![MOD + 0x10_0100],
                    ..Default::default()
                },
                false,
                &[0x3100_0000],
                &[],
            )
            .unwrap();
        let module_ret = MOD + 0x123;
        // Two tasks call printk from the same call site and sleep there.
        for rsp in [STACK, OTHER_STACK] {
            let call = at_rsp(fault(View::Module(id), Access::Execute, TEXT_GPA, PRINTK, module_ret), rsp);
            assert_eq!(e.decide(&call).step, Step::Switch(View::Kernel));
        }
        // The second task's return uses its own point; the first's is still there.
        let back = |e: &mut Engine, rsp| {
            e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0), rsp))
        };
        assert_eq!(back(&mut e, OTHER_STACK + 8).step, Step::Switch(View::Module(id)));
        assert_eq!(back(&mut e, STACK + 8).step, Step::Switch(View::Module(id)));
        // Another module cannot return through a point recorded for this one:
        // it may not reach module `evil`'s code in the middle anyway, and a
        // kernel return point recorded for `evil`'s caller is not `other`'s.
        let kernel_ret = TEXT + 0x5555;
        e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, kernel_ret), STACK));
        let stolen = at_rsp(fault(View::Module(other), Access::Execute, TEXT_GPA, kernel_ret, 0), STACK + 8);
        assert_eq!(e.decide(&stolen).violation.map(|v| v.kind), Some(ViolationKind::CallNonEntry));
        let own = at_rsp(fault(View::Module(id), Access::Execute, TEXT_GPA, kernel_ret, 0), STACK + 8);
        assert_eq!(e.decide(&own).step, Step::Switch(View::Kernel));
    }

    #[test]
    fn interrupts_while_in_a_module_return_to_it() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let interrupted = MOD + 0x456;
        // The timer's interrupt exits from the module's view at `interrupted`.
        e.event_leaves_module(id, interrupted, interrupted, STACK);
        let back = at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, interrupted, 0), STACK);
        assert_eq!(e.decide(&back).step, Step::Switch(m));
        let again = e.decide(&back);
        assert!(again.violation.is_some(), "once");
    }

    #[test]
    fn a_forged_interrupt_frame_gains_nothing() {
        // The module pushes a frame pointing into the kernel and jumps to a
        // harmless handler: no event is being delivered, so it is no interrupt.
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let mut jump = fault(m, Access::Execute, TEXT_GPA, IRQ_HANDLER + 0x40, TEXT + 0x9999);
        jump.stack = [Some(TEXT + 0x9999), Some(0x10)];
        let out = e.decide(&jump);
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::Fault, Some(ViolationKind::CallNonEntry)));
        // And the handler's `iretq` finds no return point anywhere else.
        let back = at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD + 0x777, 0), STACK);
        assert_eq!(e.decide(&back).violation.map(|v| v.kind), Some(ViolationKind::EnterModuleOffEntry));
    }

    #[test]
    fn code_reached_through_an_alias_is_refused() {
        // A module calls `printk`'s linear address, which its page-table
        // edit maps onto another text page (a denied API's).
        let (mut e, id) = engine(Mode::Enforce);
        let mut call = fault(View::Module(id), Access::Execute, TEXT_GPA, PRINTK, MOD + 0x123);
        call.gpa = TEXT_GPA + (SET_MEMORY_RW - TEXT);
        let out = e.decide(&call);
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::ReturnError, Some(ViolationKind::Alias)));
        // The kernel entering the module at its entry through another page.
        let mut enter = fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, TEXT + 0x10);
        enter.gpa = 0x3000_5000;
        // (The page is not this module's code: not even a crossing.)
        assert_eq!(e.decide(&enter).step, Step::NotMine);
        e.register_module(
            ModuleInfo {
                name: "b".into(),
                code: vec![Range::new(MOD + 0x20_0000, MOD + 0x20_1000)],
                ..Default::default()
            },
            false,
            &[0x3000_5000],
            &[],
        )
        .unwrap();
        let out = e.decide(&enter);
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::Alias));
        // The expected page of each code address.
        assert_eq!(e.expected_page(PRINTK + 0x10), Some(TEXT_GPA + 0x1000));
        assert_eq!(e.expected_page(MOD_FN), Some(MOD_CODE_GPA));
        assert_eq!(e.expected_page(0xffff_8880_0000_0000), None);
    }

    #[test]
    fn text_poke_from_the_kernel_is_let_through_and_counted() {
        let (mut e, _) = engine(Mode::Enforce);
        let f = Fault { rip: POKE + 0x10, ..fault(View::Kernel, Access::Write, TEXT_GPA, PRINTK, 0) };
        let out = e.decide(&f);
        assert_eq!((out.step, out.violation), (Step::StepOver, None));
        assert_eq!(e.stats.pokes, 1);
        // Through memcpy: the return address into the poke routine is on the stack.
        let f = Fault {
            rip: TEXT + 0x7777,
            stack: [Some(POKE + 0x20), None],
            ..fault(View::Kernel, Access::Write, TEXT_GPA, PRINTK, 0)
        };
        assert_eq!(e.decide(&f).step, Step::StepOver);
        let f = Fault {
            rip: TEXT + 0x7777,
            stack: [Some(TEXT + 0x8888), None],
            ..fault(View::Kernel, Access::Write, TEXT_GPA, PRINTK, 0)
        };
        assert_eq!(e.decide(&f).step, Step::Skip);
        // The same write from a module's view is a violation whatever its RIP.
        let (mut e, id) = engine(Mode::Enforce);
        let f = Fault { rip: POKE + 0x10, ..fault(View::Module(id), Access::Write, TEXT_GPA, PRINTK, 0) };
        assert_eq!(e.decide(&f).step, Step::Skip);
    }

    #[test]
    fn registration_rules() {
        let mut e = Engine::new(Mode::Enforce);
        assert_eq!(e.register_module(ModuleInfo::default(), false, &[], &[]), Err(RegisterError::NotLocked));
        assert_eq!(e.lock([]), Err(RegisterError::NotLocked));
        let (mut e, id) = engine(Mode::Enforce);
        assert_eq!(e.register_kernel(KernelLayout::default(), []), Err(RegisterError::Locked));
        assert_eq!(e.lock([]), Err(RegisterError::Locked));
        // A module claiming kernel pages is refused.
        assert_eq!(e.register_module(ModuleInfo::default(), false, &[TEXT_GPA], &[]), Err(RegisterError::Overlap));
        // Going live drops the init entry; unregistering drops the pages.
        e.module_live(id, &[]).unwrap();
        assert_eq!(e.expected_page(MOD_FN), Some(MOD_CODE_GPA), "core code keeps its pages");
        let out = e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_INIT, TEXT + 0x10));
        assert_eq!(out.step, Step::ReturnError);
        e.unregister_module(id).unwrap();
        assert_eq!(e.class_of(MOD_CODE_GPA), None);
        assert_eq!(e.unregister_module(id).unwrap_err(), RegisterError::UnknownModule);
        // Before the lock nothing is an integrity matter.
        let mut fresh = Engine::new(Mode::Enforce);
        assert_eq!(fresh.decide(&fault(View::Kernel, Access::Write, TEXT_GPA, 0, 0)).step, Step::NotMine);
    }

    #[test]
    fn a_struct_module_across_two_pages_is_shielded_on_both() {
        let (mut e, _) = engine(Mode::Enforce);
        // Data over two virtual pages backed by scattered physical ones; its
        // struct module straddles them.
        let data = Range::new(MOD + 0x10_0000, MOD + 0x10_2000);
        let info = ModuleInfo {
            name: String::from("hider"),
            code: vec![Range::new(MOD + 0x20_0000, MOD + 0x20_1000)],
            data: vec![data],
            module_struct: Range::new(data.start + 0xe00, data.start + 0x1300),
            ..Default::default()
        };
        let id = e.register_module(info, false, &[0x3400_0000], &[0x3500_0000, 0x3600_7000]).unwrap();
        assert_eq!(e.shielded_pages(id), [0x3500_0000, 0x3600_7000]);
        let at = |gpa: u64| at_rsp(fault(View::Module(id), Access::Write, gpa, 0, MOD + 0x20_0010), STACK);
        // Into the structure, on either page: refused.
        for gpa in [0x3500_0e00, 0x3500_0fff, 0x3600_7000, 0x3600_72ff] {
            let out = e.decide(&at(gpa));
            assert_eq!(out.step, Step::Skip, "{gpa:#x}");
            assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::WriteProtectedData));
        }
        // Beside it: through alone, the structure's piece on that page kept.
        assert_eq!(e.decide(&at(0x3500_0100)).step, Step::StepBeside(Range::new(0x3500_0e00, 0x3500_1000)));
        assert_eq!(e.decide(&at(0x3600_7300)).step, Step::StepBeside(Range::new(0x3600_7000, 0x3600_7300)));
        // Two virtual pages of a structure on one physical page: refused.
        let folded = Range::new(MOD + 0x30_0000, MOD + 0x30_2000);
        let info = ModuleInfo {
            name: String::from("folded"),
            code: vec![Range::new(MOD + 0x40_0000, MOD + 0x40_1000)],
            data: vec![folded],
            module_struct: Range::new(folded.start + 0xe00, folded.start + 0x1100),
            ..Default::default()
        };
        let pages = [0x3800_0000, 0x3800_0000];
        assert_eq!(e.register_module(info, false, &[0x3700_0000], &pages), Err(RegisterError::Overlap));
        // A breach found after the step is reported at the structure's address.
        let v = e.shield_breached(View::Module(id), MOD + 0x20_0010, 0x3600_7008);
        assert_eq!(v.target, data.start + 0x1008);
        assert_eq!(v.action, ViolationAction::Denied);
    }

    #[test]
    fn freed_init_code_is_no_longer_the_modules() {
        // A module with core text and init text (6.1's two layouts); after
        // it goes live, the kernel reuses the init text's addresses for the
        // next module, whose entry must translate as that module's.
        let (mut e, _) = engine(Mode::Enforce);
        let (core, init) = (MOD + 0x40_0000, MOD + 0x50_0000);
        let info = ModuleInfo {
            name: "a".into(),
            code: vec![Range::new(core, core + 0x1000), Range::new(init, init + 0x1000)],
            init: vec![Range::new(init, init + 0x2000)],
            entries: vec![core + 0x10, init],
            ..Default::default()
        };
        let a = e.register_module(info, false, &[0x3200_0000, 0x3201_0000], &[]).unwrap();
        e.module_live(a, &[0x3201_0000]).unwrap();
        assert_eq!(e.expected_page(core + 0x10), Some(0x3200_0000));
        assert_eq!(e.expected_page(init), None);
        let info = ModuleInfo {
            name: "b".into(),
            code: vec![Range::new(init, init + 0x1000)],
            entries: vec![init],
            ..Default::default()
        };
        let b = e.register_module(info, false, &[0x3300_0000], &[]).unwrap();
        let out = e.decide(&fault(View::Kernel, Access::Execute, 0x3300_0000, init, TEXT + 0x10));
        assert_eq!((out.step, out.violation), (Step::Switch(View::Module(b)), None));
    }

    #[test]
    fn trusted_modules_run_in_the_kernel_view_but_stay_protected() {
        let (mut e, evil) = engine(Mode::Enforce);
        let info = ModuleInfo {
            name: String::from("agent"),
            code: vec![Range::new(0xffff_ffff_c100_0000, 0xffff_ffff_c100_1000)],
            entries: vec![0xffff_ffff_c100_0000, 0xffff_ffff_c100_0800],
            exports: vec![0xffff_ffff_c100_0000],
            ..Default::default()
        };
        let id = e.register_module(info, true, &[0x4000_0000], &[0x4000_1000]).unwrap();
        // It is part of the kernel: a module calls it at its exports only,
        // not at the functions it hands the kernel (the agent's notifier).
        let out = e.decide(&fault(View::Module(evil), Access::Execute, 0x4000_0000, 0xffff_ffff_c100_0800, 0));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::CallNonEntry));
        assert!(e.is_trusted(id));
        assert_eq!(e.class_of(0x4000_1000), Some(PageClass::ModuleData(id)));
        // An isolated module may not write a trusted module's data.
        let out = e.decide(&fault(View::Module(evil), Access::Write, 0x4000_1000, 0, 0));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::WriteProtectedData));
        // It may call a trusted module's export: that is the kernel view.
        let out = e.decide(&fault(View::Module(evil), Access::Execute, 0x4000_0000, 0xffff_ffff_c100_0000, 0));
        assert_eq!(out.step, Step::Switch(View::Kernel));
        // The kernel view executing a trusted module is not a crossing.
        let out = e.decide(&fault(View::Kernel, Access::Execute, 0x4000_0000, 0xffff_ffff_c100_0000, 0));
        assert_eq!(out.step, Step::NotMine);
    }

    /// A fault at a thunk with RAX and the top of the stack set.
    fn thunk_fault(id: u32, thunk: u64, rax: u64, top: u64) -> Fault {
        let mut f = fault(View::Module(id), Access::Execute, TEXT_GPA, thunk, top);
        f.gprs[0] = rax;
        f
    }

    #[test]
    fn indirect_thunks_are_judged_by_their_real_target() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let module_ret = MOD + 0x123;
        // Through the thunk to an exported function: the branch is carried
        // out in the kernel view, and the call returns as usual.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, PRINTK, module_ret));
        assert_eq!(out.step, Step::Branch { view: View::Kernel, rip: PRINTK, pop: false });
        let back = at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0), STACK + 8);
        assert_eq!(e.decide(&back).step, Step::Switch(m));
        // To the middle of a function, or a denied API: refused, reported
        // with the real target, and the call gets 0 (no export's
        // convention) or an error back.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, PRINTK + 4, module_ret));
        assert_eq!(out.step, Step::ReturnNull);
        let v = out.violation.unwrap();
        assert_eq!((v.kind, v.target, v.rip), (ViolationKind::CallNonEntry, PRINTK + 4, module_ret));
        let out = e.decide(&thunk_fault(id, THUNK_RAX, SET_MEMORY_RW, module_ret));
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::ReturnError, Some(ViolationKind::CallDeniedApi)));
        let out = e.decide(&thunk_fault(id, THUNK_RAX, LOOKUP, module_ret));
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::ReturnNull, Some(ViolationKind::CallDeniedApi)));
        // To the module's own code: no crossing at all.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, MOD + 0x700, module_ret));
        assert_eq!((out.step, out.violation), (Step::Branch { view: m, rip: MOD + 0x700, pop: false }, None));
        // To data: refused.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, 0xffff_8880_0000_0000, module_ret));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::ExecuteData));
        // A tail jump (no return address into the module) that is refused faults.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, PRINTK + 4, TEXT + 0x9000));
        assert_eq!(out.step, Step::Fault);
        // A thunk is only a thunk for its own register.
        let out = e.decide(&thunk_fault(id, THUNK_RAX + 0x20, PRINTK, module_ret));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::CallNonEntry));
    }

    #[test]
    fn return_thunks_are_returns() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let kernel_ret = TEXT + 0x5555;
        // The kernel calls the module, which returns through the thunk.
        e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, kernel_ret));
        let out = e.decide(&thunk_fault(id, RETURN_THUNK, 0, kernel_ret));
        assert_eq!(out.step, Step::Branch { view: View::Kernel, rip: kernel_ret, pop: true });
        // A return inside the module stays in its view.
        let out = e.decide(&thunk_fault(id, RETURN_THUNK, 0, MOD + 0x200));
        assert_eq!(out.step, Step::Branch { view: m, rip: MOD + 0x200, pop: true });
        // A return to a kernel address nothing called from faults.
        let out = e.decide(&thunk_fault(id, RETURN_THUNK, 0, TEXT + 0x6666));
        assert_eq!(out.step, Step::Fault);
        assert_eq!(out.violation.map(|v| (v.kind, v.target)), Some((ViolationKind::CallNonEntry, TEXT + 0x6666)));
    }

    #[test]
    fn a_fault_resumes_the_module_at_its_fixup_only() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let resume =
            |e: &mut Engine, gva| e.decide(&at_rsp(fault(View::Kernel, Access::Execute, MOD_CODE_GPA, gva, 0), STACK));
        // No fault pending: the fixup is not an entry.
        let out = resume(&mut e, MOD + 0x480);
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::EnterModuleOffEntry));
        // A page fault at the instruction the table names leaves the
        // module: the handler may resume it at the fixup, once.
        e.event_leaves_module(id, MOD + 0x400, MOD + 0x400, STACK);
        assert_eq!(resume(&mut e, MOD + 0x480).step, Step::Switch(m));
        let again = resume(&mut e, MOD + 0x480);
        assert_eq!(again.step, Step::Fault, "not a call from the kernel: the transfer faults");
    }

    /// The image's static page tables lie in its .data: found by the lock's
    /// walk, they are named page tables (same rights), and an undone lock
    /// gives them back to the data.
    #[test]
    fn the_images_own_page_tables_are_named_page_tables() {
        let mut e = Engine::new(Mode::Enforce);
        e.register_kernel(
            KernelLayout::default(),
            [(DATA_GPA, PageClass::Sensitive), (DATA_GPA + 0x1000, PageClass::Sensitive)],
        )
        .unwrap();
        let added = e.lock([DATA_GPA, PT_GPA]).unwrap();
        assert_eq!(added, vec![PT_GPA]);
        assert_eq!(e.class_of(DATA_GPA), Some(PageClass::PageTable));
        assert_eq!(e.class_of(DATA_GPA + 0x1000), Some(PageClass::Sensitive));
        e.revert_lock(&added);
        assert_eq!(e.class_of(DATA_GPA), Some(PageClass::Sensitive));
        assert_eq!(e.class_of(PT_GPA), None);
        e.lock([DATA_GPA]).unwrap();
        let id = e.register_module(ModuleInfo { name: "x".into(), ..Default::default() }, false, &[], &[]).unwrap();
        let out = e.decide(&fault(View::Module(id), Access::Write, DATA_GPA + 8, 0, 0));
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::Skip, Some(ViolationKind::WritePageTable)));
    }

    /// The kernel calls module `id`'s entry with the stack at `rsp`,
    /// handing it `out` in its frames.
    fn kernel_calls(e: &mut Engine, id: u32, rsp: u64, out: Option<Range>) {
        let call = Fault {
            out_params: [out, None, None, None, None, None],
            ..fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_FN, TEXT + 0x123)
        };
        assert_eq!(e.decide(&at_rsp(call, rsp)).step, Step::Switch(View::Module(id)));
    }

    /// Module `id` writes stack address `gva` (at guest-physical `gpa`)
    /// running at `rsp`.
    fn stack_write(e: &mut Engine, id: u32, gva: u64, gpa: u64, rsp: u64) -> (Step, Option<ViolationKind>) {
        let out = e.decide(&at_rsp(fault(View::Module(id), Access::Write, gpa, gva, 0), rsp));
        (out.step, out.violation.map(|v| v.kind))
    }

    const STACK_BASE: u64 = STACK & !0x3fff;
    const STACK_GPA: u64 = 0x6000_0000;

    /// The guest-physical address of `va` on STACK's page.
    fn gpa_of_stack(va: u64) -> u64 {
        STACK_GPA + (va & 0xfff)
    }

    #[test]
    fn a_module_writes_its_own_frames_and_no_kernel_frame_above_them() {
        for mode in [Mode::Enforce, Mode::Audit] {
            let (mut e, id) = engine(mode);
            // The kernel calls the module at B = STACK: its return address is at B.
            kernel_calls(&mut e, id, STACK, None);
            let deeper = STACK - 0x100;
            // A page wholly below B is the module's: granted.
            assert_eq!(
                stack_write(&mut e, id, STACK_BASE + 0x2010, STACK_GPA + 0x10, deeper),
                (Step::Grant(Perms::RW), None)
            );
            // B's page below B: this write alone, the kernel's bytes from B on kept.
            let own = Range::new(STACK_GPA, STACK_GPA + (STACK & 0xfff));
            assert_eq!(
                stack_write(&mut e, id, STACK - 0x10, STACK_GPA + (STACK & 0xfff) - 0x10, deeper),
                (Step::StepWithin { guard: store_guard(STACK_GPA + (STACK & 0xfff) - 0x10), allowed: own }, None)
            );
            // The kernel's return address at B, and a frame above it: refused.
            let refused = if mode == Mode::Enforce { Step::Skip } else { Step::StepOver };
            for above in [STACK, STACK + 0x78] {
                let gpa = STACK_GPA + (above & 0xfff);
                assert_eq!(
                    stack_write(&mut e, id, above, gpa, deeper),
                    (refused, Some(ViolationKind::WriteKernelStack))
                );
            }
        }
    }

    #[test]
    fn a_module_writes_the_out_parameter_it_was_handed_and_no_more() {
        let (mut e, id) = engine(Mode::Enforce);
        let out = Range::new(STACK + 0x40, STACK + 0x70);
        kernel_calls(&mut e, id, STACK, Some(out));
        let gpa = |va: u64| STACK_GPA + (va & 0xfff);
        assert_eq!(
            stack_write(&mut e, id, STACK + 0x48, gpa(STACK + 0x48), STACK - 0x80),
            (
                Step::StepWithin {
                    guard: store_guard(gpa(STACK + 0x48)),
                    allowed: Range::new(gpa(out.start), gpa(out.end))
                },
                None
            )
        );
        let past = stack_write(&mut e, id, STACK + 0x70, gpa(STACK + 0x70), STACK - 0x80);
        assert_eq!(past, (Step::Skip, Some(ViolationKind::WriteKernelStack)));
        // Another module handed nothing there gets nothing.
        let other =
            e.register_module(ModuleInfo { name: "other".into(), ..Default::default() }, false, &[], &[]).unwrap();
        let theirs = stack_write(&mut e, other, STACK + 0x48, gpa(STACK + 0x48), STACK - 0x80);
        assert_eq!(theirs.1, Some(ViolationKind::WriteKernelStack));
    }

    #[test]
    fn a_module_writes_no_other_tasks_stack() {
        let (mut e, id) = engine(Mode::Enforce);
        // Another task inside the module (it called the kernel, which
        // sleeps): its module frames are the module's, the kernel's are not.
        kernel_calls(&mut e, id, OTHER_STACK, None);
        let call_out =
            at_rsp(fault(View::Module(id), Access::Execute, TEXT_GPA, PRINTK, MOD + 0x300), OTHER_STACK - 0x100);
        assert_eq!(e.decide(&call_out).step, Step::Switch(View::Kernel));
        kernel_calls(&mut e, id, STACK, None);
        let from_here = STACK - 0x80;
        let (own, kernels) = (OTHER_STACK - 0x80, OTHER_STACK - 0x200);
        let gpa = |va: u64| STACK_GPA + 0x8000 + (va & 0xfff);
        assert!(matches!(stack_write(&mut e, id, own, gpa(own), from_here), (Step::StepWithin { .. }, None)));
        // A task's stack no crossing is live on (its end-of-stack mark), and
        // the same address holding no stack: heap.
        let elsewhere = OTHER_STACK + 0x10_0000;
        let heap = at_rsp(fault(View::Module(id), Access::Write, STACK_GPA + 0x10_0000, elsewhere, 0), from_here);
        assert_eq!(e.decide(&heap).step, Step::Grant(Perms::RW));
        let sleeping = Fault { task_stack: true, ..heap };
        let out = e.decide(&sleeping);
        assert_eq!((out.step, out.violation.map(|v| v.kind)), (Step::Skip, Some(ViolationKind::WriteKernelStack)));
        assert_eq!(
            stack_write(&mut e, id, kernels, gpa(kernels), from_here),
            (Step::Skip, Some(ViolationKind::WriteKernelStack))
        );
        assert_eq!(
            stack_write(&mut e, id, OTHER_STACK + 8, gpa(OTHER_STACK + 8), from_here).1,
            Some(ViolationKind::WriteKernelStack)
        );
    }

    #[test]
    fn stack_grants_are_taken_back_once_the_kernels_frames_may_be_there() {
        let (mut e, id) = engine(Mode::Enforce);
        kernel_calls(&mut e, id, STACK, None);
        let low = STACK_BASE + 0x2000;
        assert_eq!(stack_write(&mut e, id, low, STACK_GPA + 0x2000, STACK - 0x100).0, Step::Grant(Perms::RW));
        assert!(e.stale_stack_grants(id, STACK - 0x100).is_empty(), "still its frames");
        // It returns; the kernel calls it again from deeper, below that page.
        let ret = at_rsp(fault(View::Module(id), Access::Execute, TEXT_GPA, TEXT + 0x123, 0), STACK + 8);
        assert_eq!(e.decide(&ret).step, Step::Switch(View::Kernel));
        kernel_calls(&mut e, id, STACK_BASE + 0x1800, None);
        assert_eq!(e.stale_stack_grants(id, STACK_BASE + 0x1700), vec![STACK_GPA + 0x2000]);
        // A grant on one task's stack is taken back when another enters.
        assert_eq!(
            stack_write(&mut e, id, STACK_BASE + 0x0800, STACK_GPA + 0x0800, STACK_BASE + 0x1700).0,
            Step::Grant(Perms::RW)
        );
        kernel_calls(&mut e, id, OTHER_STACK, None);
        assert_eq!(e.stale_stack_grants(id, OTHER_STACK - 0x100), vec![STACK_GPA]);
    }

    #[test]
    fn a_deputy_writes_only_what_the_module_could_on_a_stack() {
        let (mut e, id) = engine(Mode::Enforce);
        let out = Range::new(STACK + 0x40, STACK + 0x70);
        kernel_calls(&mut e, id, STACK, Some(out));
        let may = |e: &Engine, from: u64, len: u64| e.stack_may_write(id, Range::new(from, from + len), false, None);
        assert_eq!(may(&e, STACK - 0x40, 0x40), Some(true), "its own frame");
        assert_eq!(may(&e, STACK - 0x8, 0x10), Some(false), "reaching the return address");
        assert_eq!(may(&e, STACK + 0x40, 0x30), Some(true), "the out-parameter");
        assert_eq!(may(&e, STACK + 0x40, 0x38), Some(false), "past it");
        assert_eq!(
            e.stack_may_write(id, Range::new(OTHER_STACK, OTHER_STACK + 8), true, None),
            Some(false),
            "a task's stack"
        );
        assert_eq!(e.stack_may_write(id, Range::new(OTHER_STACK, OTHER_STACK + 8), false, None), None, "no stack");
    }

    #[test]
    fn a_stack_reached_through_the_direct_map_is_judged_as_the_stack() {
        let (mut e, id) = engine(Mode::Enforce);
        kernel_calls(&mut e, id, STACK, None);
        // The direct map's address of the stack's page: no crossing is live
        // there and no end-of-stack mark sits 16 KiB below it.
        const DIRECT: u64 = 0xffff_8880_0000_0000;
        let alias = |va: u64| DIRECT + gpa_of_stack(va);
        let write = |e: &mut Engine, va: u64, alias: Option<u64>| {
            let f = at_rsp(
                fault(View::Module(id), Access::Write, gpa_of_stack(va), DIRECT + gpa_of_stack(va), 0),
                STACK - 0x80,
            );
            let out = e.decide(&Fault { stack_alias: alias, ..f });
            (out.step, out.violation.map(|v| v.kind))
        };
        // Unknown as a stack page, the write is a heap page's: the gap this closes.
        assert_eq!(write(&mut e, STACK, None), (Step::Grant(Perms::RW), None));
        // Known, the kernel's return address is refused whatever the address.
        assert_eq!(write(&mut e, STACK, Some(STACK)), (Step::Skip, Some(ViolationKind::WriteKernelStack)));
        // Its own frame goes through, alone, with the kernel's bytes around it guarded.
        let (step, v) = write(&mut e, STACK - 0x40, Some(STACK - 0x40));
        assert!(v.is_none());
        let Step::StepWithin { allowed, .. } = step else { panic!("{step:?}") };
        assert!(allowed.contains(gpa_of_stack(STACK - 0x40)) && !allowed.contains(gpa_of_stack(STACK)));
        assert_ne!(alias(STACK), STACK);
        // A deputy is held to the same.
        let bytes = Range::new(alias(STACK), alias(STACK) + 8);
        assert_eq!(e.stack_may_write(id, bytes, false, Some(STACK)), Some(false));
        assert_eq!(e.stack_may_write(id, bytes, false, None), None);
    }

    #[test]
    fn stack_pages_are_known_by_their_physical_page_from_the_walk() {
        use super::super::tables::Stack;
        let (mut e, _) = engine(Mode::Enforce);
        let s = Stack { va: STACK_BASE, pages: [0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000] };
        let unmapped = |_: u64, _: u64| false;
        assert_eq!(e.set_stacks(s.pages(), unmapped), vec![0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000]);
        assert_eq!(e.stack_page(0x30_0123), Some(STACK_BASE + 0x2123));
        assert!(e.knows_stack(STACK_BASE + 0x1000));
        assert_eq!(e.set_stacks(s.pages(), unmapped), Vec::<u64>::new(), "nothing new");
        // A stack a module runs on adds; a whole walk drops what is no longer mapped.
        let t = Stack { va: STACK_BASE + 0x8000, pages: [0x50_0000, 0x51_0000, 0x52_0000, 0x53_0000] };
        assert_eq!(e.add_stacks(t.pages()).len(), 4);
        assert!(e.stack_page(0x10_0000).is_some());
        e.set_stacks(t.pages(), unmapped);
        assert_eq!((e.stack_page(0x10_0000), e.knows_stack(STACK_BASE)), (None, false));
        // An interrupt stack no walk finds stays known while it is mapped.
        let irq = Stack { va: 0xffff_fe00_0000_1000, pages: [0x60_0000, 0x61_0000, 0x62_0000, 0x63_0000] };
        e.add_stacks(irq.pages());
        e.set_stacks(t.pages(), |va, gpa| va == irq.va && gpa == 0x60_0000);
        assert_eq!(e.stack_page(0x60_0010), Some(irq.va + 0x10));
        assert_eq!(e.stack_page(0x61_0000), None);
        e.forget_stack_page(0x50_0000);
        assert_eq!((e.stack_page(0x50_0008), e.knows_stack(t.va)), (None, false));
        assert!(e.stack_page(0x51_0000).is_some());
    }
    #[test]
    fn a_refused_transfer_faults_in_the_modules_code_where_it_has_no_fixup() {
        let (e, id) = engine(Mode::Enforce);
        let code = e.modules[&id].info.code[0];
        assert_eq!(e.fault_site(id), Some(code.start));
        // A module that covers its first bytes with fixups moves the site past them.
        let (mut e, _) = engine(Mode::Enforce);
        let fixups: Vec<(u64, u64)> = (0..3).map(|i| (code.start + i, code.start + 0x480)).collect();
        let info = ModuleInfo { name: "covered".into(), code: vec![code], fixups, ..Default::default() };
        let other = e.register_module(info, false, &[], &[]).unwrap();
        assert_eq!(e.fault_site(other), Some(code.start + 3));
        assert_eq!(e.fault_site(other + 1), None, "no such module");
    }
}
