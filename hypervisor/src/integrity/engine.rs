//! The decisions: what an EPT violation in a guest with integrity views means.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use guest_agent::integrity::ViolationAction;

use super::layout::{is_kernel_address, KernelLayout, ModuleInfo, Range};
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
    /// The two words at the top of the guest stack, where a call or an
    /// interrupt left its return address (`None` if unreadable).
    pub stack: [Option<u64>; 2],
    /// The general-purpose registers by number (RSP is 4): where a
    /// branch thunk goes.
    pub gprs: [u64; 16],
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
    /// Refuse a write: the instruction is skipped, memory is unchanged.
    Skip,
    /// Refuse a call: return to the caller with an error (-EPERM in RAX).
    ReturnError,
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

/// A place control may legitimately come back to: the view it returns into
/// and the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReturnPoint {
    view: View,
    address: u64,
}

/// Pending return points kept per guest. Tasks interleave (a module sleeps,
/// another task calls another module), so this is a bounded set, not a stack.
const MAX_RETURN_POINTS: usize = 512;

struct Module {
    info: ModuleInfo,
    trusted: bool,
    live: bool,
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
}

pub struct Engine {
    pub mode: Mode,
    layout: Option<KernelLayout>,
    locked: bool,
    pages: BTreeMap<u64, PageClass>,
    modules: BTreeMap<u32, Module>,
    next_id: u32,
    returns: Vec<ReturnPoint>,
    pub violations: ViolationLog,
    pub stats: Stats,
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
    pub violations: u64,
}

const MAX_MODULES: usize = 256;
/// Pages tracked for modules, all together (256 MiB of module memory): the
/// bookkeeping lives on the hypervisor's heap, which a guest must not exhaust.
pub const MAX_MODULE_PAGES: usize = 1 << 16;

fn page(addr: u64) -> u64 {
    addr & !0xfff
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
            returns: Vec::new(),
            violations: ViolationLog::new(256),
            stats: Stats::default(),
        }
    }

    pub fn layout(&self) -> Option<&KernelLayout> {
        self.layout.as_ref()
    }

    pub fn is_locked(&self) -> bool {
        self.locked
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
        layout.interrupt_handlers.sort_unstable();
        layout.return_thunks.sort_unstable();
        layout.return_thunks.dedup();
        self.pages.retain(|_, c| {
            !matches!(c, PageClass::KernelText | PageClass::KernelReadOnly | PageClass::SyscallTable | PageClass::Idt)
        });
        for (gpa, class) in pages {
            self.pages.insert(page(gpa), class);
        }
        self.layout = Some(layout);
        Ok(())
    }

    /// Locks the layout; from now on it cannot change and the protections hold.
    pub fn lock(&mut self, page_tables: impl IntoIterator<Item = u64>) -> Result<(), RegisterError> {
        if self.layout.is_none() {
            return Err(RegisterError::NotLocked);
        }
        if self.locked {
            return Err(RegisterError::Locked);
        }
        for gpa in page_tables {
            self.pages.entry(page(gpa)).or_insert(PageClass::PageTable);
        }
        self.locked = true;
        Ok(())
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
        let clash = code_pages.iter().chain(data_pages).any(|&p| self.pages.contains_key(&page(p)));
        if clash {
            return Err(RegisterError::Overlap);
        }
        let id = self.next_id;
        self.next_id += 1;
        // Trusted modules run in the kernel view, but their pages are still
        // tracked: no isolated module may write them.
        for &p in code_pages {
            self.pages.insert(page(p), PageClass::ModuleCode(id));
        }
        for &p in data_pages {
            self.pages.insert(page(p), PageClass::ModuleData(id));
        }
        info.entries.sort_unstable();
        info.entries.dedup();
        self.modules.insert(id, Module { info, trusted, live: false });
        Ok(id)
    }

    /// The module finished init: its init ranges stop being entries.
    pub fn module_live(&mut self, id: u32, init_pages: &[u64]) -> Result<(), RegisterError> {
        let m = self.modules.get_mut(&id).ok_or(RegisterError::UnknownModule)?;
        m.live = true;
        let init = core::mem::take(&mut m.info.init);
        m.info.entries.retain(|&e| !in_ranges(&init, e));
        for p in init_pages {
            if matches!(self.pages.get(&page(*p)), Some(PageClass::ModuleCode(m) | PageClass::ModuleData(m)) if *m == id)
            {
                self.pages.remove(&page(*p));
            }
        }
        Ok(())
    }

    /// The module is going: its pages and return points go too.
    pub fn unregister_module(&mut self, id: u32) -> Result<ModuleInfo, RegisterError> {
        let m = self.modules.remove(&id).ok_or(RegisterError::UnknownModule)?;
        self.pages.retain(|_, c| !matches!(c, PageClass::ModuleCode(x) | PageClass::ModuleData(x) if *x == id));
        self.returns.retain(|r| r.view != View::Module(id));
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
        let module = match view {
            View::Module(m) => Some(m),
            View::Kernel => None,
        };
        let v = Violation { kind, module, rip, target, action };
        self.violations.push(&v);
        self.stats.violations += 1;
        v
    }

    pub fn module_name(&self, id: u32) -> Option<&str> {
        self.modules.get(&id).map(|m| m.info.name.as_str())
    }

    pub fn is_trusted(&self, id: u32) -> bool {
        self.modules.get(&id).is_some_and(|m| m.trusted)
    }

    pub fn class_of(&self, gpa: u64) -> Option<PageClass> {
        self.pages.get(&page(gpa)).copied()
    }

    /// Every tracked page, for building the views.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageClass)> + '_ {
        self.pages.iter().map(|(&p, &c)| (p, c))
    }

    fn remember_return(&mut self, view: View, address: u64) {
        let point = ReturnPoint { view, address };
        if self.returns.contains(&point) {
            return;
        }
        if self.returns.len() == MAX_RETURN_POINTS {
            self.returns.remove(0);
        }
        self.returns.push(point);
    }

    fn take_return(&mut self, view: View, address: u64) -> bool {
        match self.returns.iter().position(|r| r.view == view && r.address == address) {
            Some(i) => {
                self.returns.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn violation(&mut self, fault: &Fault, kind: ViolationKind, deny: Step, allow: Step) -> Outcome {
        self.violation_at(fault, kind, fault.gva, deny, allow)
    }

    fn violation_at(&mut self, fault: &Fault, kind: ViolationKind, target: u64, deny: Step, allow: Step) -> Outcome {
        let (step, action) = match self.mode {
            Mode::Enforce => (deny, ViolationAction::Denied),
            Mode::Audit => (allow, ViolationAction::Allowed),
        };
        let module = match fault.view {
            View::Module(m) => Some(m),
            View::Kernel => None,
        };
        let v = Violation { kind, module, rip: fault.rip, target, action };
        self.violations.push(&v);
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
            (View::Module(m), Access::Write) => match class {
                Some(PageClass::ModuleData(owner)) if owner == m => Outcome::step(Step::Grant(Perms::RW)),
                None => Outcome::step(Step::Grant(Perms::RW)),
                _ => self.write_to_protected(fault, class, true),
            },
        }
    }

    /// The kernel view runs into code it may not execute: a module's.
    fn kernel_executes(&mut self, fault: &Fault, class: Option<PageClass>) -> Outcome {
        let Some(PageClass::ModuleCode(m)) = class else {
            return Outcome::step(Step::NotMine);
        };
        if self.is_trusted(m) {
            return Outcome::step(Step::NotMine);
        }
        let target = fault.gva;
        if self.take_return(View::Module(m), target) || self.resumes_after_fault(m, target) {
            return Outcome::step(Step::Switch(View::Module(m)));
        }
        let is_entry = self.modules.get(&m).is_some_and(|md| md.info.entries.binary_search(&target).is_ok());
        if is_entry {
            // A call from the kernel: it returns to the address it pushed.
            if let Some(ret) = fault.stack[0].filter(|&a| is_kernel_address(a)) {
                self.remember_return(View::Kernel, ret);
            }
            return Outcome::step(Step::Switch(View::Module(m)));
        }
        // A call from the kernel gets an error back; anything else faults.
        let deny = if fault.stack[0].is_some_and(is_kernel_address) { Step::ReturnError } else { Step::Fault };
        self.violation(fault, ViolationKind::EnterModuleOffEntry, deny, Step::Switch(View::Module(m)))
    }

    /// After a fault in module `m`, the kernel resumes it at an
    /// exception-table fixup: legitimate once for the faulting instruction
    /// the module was interrupted at.
    fn resumes_after_fault(&mut self, m: u32, target: u64) -> bool {
        let Some(md) = self.modules.get(&m) else { return false };
        let insns: Vec<u64> = md.info.fixups.iter().filter(|&&(_, f)| f == target).map(|&(i, _)| i).collect();
        insns.into_iter().any(|insn| self.take_return(View::Module(m), insn))
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
        let deny = self.refusal(fault, m, false);
        match self.leave_module(fault, m, target, dest, fault.stack[0]) {
            Ok(view) => Outcome::step(Step::Switch(view)),
            Err(kind) => self.violation(fault, kind, deny, Step::Switch(allowed)),
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
        let deny = self.refusal(fault, m, pop);
        // A jump leaves the caller's return address on top of the stack; a
        // return consumes it.
        let return_address = if pop { None } else { fault.stack[0] };
        match self.leave_module(fault, m, target, dest, return_address) {
            Ok(view) => Outcome::step(Step::Branch { view, rip: target, pop }),
            Err(kind) => {
                // Reported at the module's call site rather than in the thunk.
                let at =
                    Fault { rip: return_address.filter(|&a| self.is_code_of(m, a)).unwrap_or(fault.rip), ..*fault };
                self.violation_at(&at, kind, target, deny, Step::Branch { view: allowed, rip: target, pop })
            }
        }
    }

    /// Whether control may go from module `m` to `target` in `dest`, and
    /// the view it runs in there; records the return point of a call.
    fn leave_module(
        &mut self,
        fault: &Fault,
        m: u32,
        target: u64,
        dest: Destination,
        return_address: Option<u64>,
    ) -> Result<View, ViolationKind> {
        let verdict = self.judge_leaving(fault, m, target, dest, return_address);
        // Audit mode lets a refused call go: its return is then as
        // legitimate as any, not a second violation.
        if verdict.is_err() && self.mode == Mode::Audit {
            if let Some(ret) = return_address.filter(|&a| self.is_code_of(m, a)) {
                self.remember_return(View::Module(m), ret);
            }
        }
        verdict
    }

    fn judge_leaving(
        &mut self,
        fault: &Fault,
        m: u32,
        target: u64,
        dest: Destination,
        return_address: Option<u64>,
    ) -> Result<View, ViolationKind> {
        let call_return = return_address.filter(|&a| self.is_code_of(m, a));
        match dest {
            Destination::Own => Ok(View::Module(m)),
            Destination::Kernel => {
                if self.take_return(View::Kernel, target) {
                    return Ok(View::Kernel);
                }
                let layout = self.layout.as_ref().expect("locked implies a layout");
                if layout.denied_entries.binary_search(&target).is_ok() {
                    return Err(ViolationKind::CallDeniedApi);
                }
                if layout.interrupt_handlers.binary_search(&target).is_ok() {
                    // An interrupt or exception: the frame holds the interrupted
                    // RIP at the top, or after an error code.
                    for word in fault.stack {
                        if let Some(rip) = word.filter(|&w| self.is_code_of(m, w)) {
                            self.remember_return(View::Module(m), rip);
                        }
                    }
                    return Ok(View::Kernel);
                }
                if layout.entries.binary_search(&target).is_ok() {
                    if let Some(ret) = call_return {
                        self.remember_return(View::Module(m), ret);
                    }
                    return Ok(View::Kernel);
                }
                Err(ViolationKind::CallNonEntry)
            }
            Destination::Module(other) => {
                // A trusted module runs in the kernel view.
                let view = if self.is_trusted(other) { View::Kernel } else { View::Module(other) };
                if self.take_return(view, target) {
                    return Ok(view);
                }
                let is_entry =
                    self.modules.get(&other).is_some_and(|md| md.info.entries.binary_search(&target).is_ok());
                if !is_entry {
                    return Err(if view == View::Kernel {
                        ViolationKind::CallNonEntry
                    } else {
                        ViolationKind::EnterModuleOffEntry
                    });
                }
                if let Some(ret) = call_return {
                    self.remember_return(View::Module(m), ret);
                }
                Ok(view)
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

    /// How a refused transfer out of module `m` ends: a call returns an
    /// error to the module; anything else (a return, a jump) faults.
    fn refusal(&self, fault: &Fault, m: u32, pop: bool) -> Step {
        if !pop && fault.stack[0].is_some_and(|a| self.is_code_of(m, a)) {
            Step::ReturnError
        } else {
            Step::Fault
        }
    }

    fn module_with_code(&self, addr: u64) -> Option<u32> {
        self.modules.iter().find(|(_, md)| in_ranges(&md.info.code, addr)).map(|(&id, _)| id)
    }

    fn is_code_of(&self, m: u32, addr: u64) -> bool {
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
            PageClass::PageTable | PageClass::Sensitive | PageClass::ModuleData(_) => ViolationKind::WriteProtectedData,
        })
    }

    /// A write to a page one of the views protects.
    fn write_to_protected(&mut self, fault: &Fault, class: Option<PageClass>, from_module: bool) -> Outcome {
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
    const PRINTK: u64 = TEXT + 0x1000;
    const SET_MEMORY_RW: u64 = TEXT + 0x2000;
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

    fn engine(mode: Mode) -> (Engine, u32) {
        let mut e = Engine::new(mode);
        let layout = KernelLayout {
            text: Range::new(TEXT, TEXT + 0x100_0000),
            entry_syscall: TEXT + 0x80_0000,
            poke_routines: vec![Range::new(POKE, POKE + 0x100)],
            entries: vec![PRINTK, SET_MEMORY_RW],
            denied_entries: vec![SET_MEMORY_RW],
            interrupt_handlers: vec![IRQ_HANDLER],
            indirect_thunks: core::array::from_fn(|r| if r == 0 { THUNK_RAX } else { 0 }),
            return_thunks: vec![RETURN_THUNK],
            ..Default::default()
        };
        let pages = [
            (TEXT_GPA, PageClass::KernelText),
            (RODATA_GPA, PageClass::KernelReadOnly),
            (SYSCALL_GPA, PageClass::SyscallTable),
            (IDT_GPA, PageClass::Idt),
        ];
        e.register_kernel(layout, pages).unwrap();
        e.lock([PT_GPA]).unwrap();
        let info = ModuleInfo {
            name: String::from("evil"),
            code: vec![Range::new(MOD, MOD + 0x1000)],
            data: vec![Range::new(MOD + 0x1000, MOD + 0x2000)],
            init: vec![Range::new(MOD, MOD + 0x20)],
            entries: vec![MOD_FN, MOD_INIT],
            fixups: vec![(MOD + 0x400, MOD + 0x480)],
        };
        let id = e.register_module(info, false, &[MOD_CODE_GPA], &[MOD_DATA_GPA]).unwrap();
        (e, id)
    }

    fn fault(view: View, access: Access, gpa: u64, gva: u64, stack: u64) -> Fault {
        Fault { view, access, gpa, gva, rip: MOD + 0x200, stack: [Some(stack), None], gprs: [0; 16] }
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
            (m, Access::Execute, TEXT_GPA, PRINTK + 5, Step::ReturnError, Some(ViolationKind::CallNonEntry)),
            (m, Access::Execute, TEXT_GPA, SET_MEMORY_RW, Step::ReturnError, Some(ViolationKind::CallDeniedApi)),
            (m, Access::Execute, TEXT_GPA, TEXT + 0x9999, Step::ReturnError, Some(ViolationKind::CallNonEntry)),
            (m, Access::Execute, HEAP_GPA, 0xffff_8880_0000_0000, Step::ReturnError, Some(ViolationKind::ExecuteData)),
            (m, Access::Execute, TEXT_GPA, IRQ_HANDLER, Step::Switch(View::Kernel), None),
            // Module data accesses: reads granted read-only, heap writes granted, protected writes refused.
            (m, Access::Read, TEXT_GPA, TEXT, Step::Grant(Perms::READ), None),
            (m, Access::Read, HEAP_GPA, 0xffff_8880_0000_0000, Step::Grant(Perms::READ), None),
            (m, Access::Write, HEAP_GPA, 0xffff_8880_0000_0000, Step::Grant(Perms::RW), None),
            (m, Access::Write, MOD_DATA_GPA, MOD + 0x1000, Step::Grant(Perms::RW), None),
            (m, Access::Write, TEXT_GPA, PRINTK, Step::Skip, Some(ViolationKind::WriteKernelText)),
            (m, Access::Write, RODATA_GPA, 0, Step::Skip, Some(ViolationKind::WriteReadOnlyData)),
            (m, Access::Write, SYSCALL_GPA, 0, Step::Skip, Some(ViolationKind::WriteSyscallTable)),
            (m, Access::Write, IDT_GPA, 0, Step::Skip, Some(ViolationKind::WriteIdt)),
            (m, Access::Write, PT_GPA, 0, Step::Skip, Some(ViolationKind::WriteProtectedData)),
            (m, Access::Write, MOD_CODE_GPA, MOD, Step::Skip, Some(ViolationKind::WriteModuleCode)),
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
        let back = e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0));
        assert_eq!(back.step, Step::Switch(View::Module(id)));
        assert!(back.violation.is_none());
        assert_eq!(e.violations.len(), 2);
    }

    #[test]
    fn calls_and_returns_pair_up() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let kernel_ret = TEXT + 0x5555;
        let module_ret = MOD + 0x123;
        // The kernel calls the module's init; the return address is in the kernel.
        assert_eq!(
            e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD_INIT, kernel_ret)).step,
            Step::Switch(m)
        );
        // The module calls printk, which will return into the module.
        assert_eq!(e.decide(&fault(m, Access::Execute, TEXT_GPA, PRINTK, module_ret)).step, Step::Switch(View::Kernel));
        // printk returns into the middle of the module: allowed once, as recorded.
        assert_eq!(e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0)).step, Step::Switch(m));
        let again = e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0));
        assert_eq!(
            again.violation.map(|v| v.kind),
            Some(ViolationKind::EnterModuleOffEntry),
            "a return point is used once"
        );
        // The module returns to the kernel (not an exported symbol, but the recorded return).
        assert_eq!(e.decide(&fault(m, Access::Execute, TEXT_GPA, kernel_ret, 0)).step, Step::Switch(View::Kernel));
    }

    #[test]
    fn interrupts_while_in_a_module_return_to_it() {
        let (mut e, id) = engine(Mode::Enforce);
        let m = View::Module(id);
        let interrupted = MOD + 0x456;
        let f = Fault { stack: [Some(0), Some(interrupted)], ..fault(m, Access::Execute, TEXT_GPA, IRQ_HANDLER, 0) };
        assert_eq!(e.decide(&f).step, Step::Switch(View::Kernel));
        assert_eq!(e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, interrupted, 0)).step, Step::Switch(m));
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
    fn trusted_modules_run_in_the_kernel_view_but_stay_protected() {
        let (mut e, evil) = engine(Mode::Enforce);
        let info =
            ModuleInfo { name: String::from("agent"), entries: vec![0xffff_ffff_c100_0000], ..Default::default() };
        let id = e.register_module(info, true, &[0x4000_0000], &[0x4000_1000]).unwrap();
        assert!(e.is_trusted(id));
        assert_eq!(e.class_of(0x4000_1000), Some(PageClass::ModuleData(id)));
        // An isolated module may not write a trusted module's data.
        let out = e.decide(&fault(View::Module(evil), Access::Write, 0x4000_1000, 0, 0));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::WriteProtectedData));
        // It may call a trusted module's entry: that is the kernel view.
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
        assert_eq!(e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, module_ret, 0)).step, Step::Switch(m));
        // To the middle of a function, or a denied API: refused, reported
        // with the real target, and the call gets an error back.
        let out = e.decide(&thunk_fault(id, THUNK_RAX, PRINTK + 4, module_ret));
        assert_eq!(out.step, Step::ReturnError);
        let v = out.violation.unwrap();
        assert_eq!((v.kind, v.target, v.rip), (ViolationKind::CallNonEntry, PRINTK + 4, module_ret));
        let out = e.decide(&thunk_fault(id, THUNK_RAX, SET_MEMORY_RW, module_ret));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::CallDeniedApi));
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
        // No fault pending: the fixup is not an entry.
        let out = e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD + 0x480, TEXT + 0x10));
        assert_eq!(out.violation.map(|v| v.kind), Some(ViolationKind::EnterModuleOffEntry));
        // A page fault at the instruction the table names: the handler
        // resumes the module at the fixup, once.
        let f = Fault { stack: [Some(0), Some(MOD + 0x400)], ..fault(m, Access::Execute, TEXT_GPA, IRQ_HANDLER, 0) };
        assert_eq!(e.decide(&f).step, Step::Switch(View::Kernel));
        assert_eq!(e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD + 0x480, 0)).step, Step::Switch(m));
        let again = e.decide(&fault(View::Kernel, Access::Execute, MOD_CODE_GPA, MOD + 0x480, 0));
        assert_eq!(again.step, Step::Fault, "not a call from the kernel: the transfer faults");
    }
}
