//! The kernel's layout and the modules' ranges, as guest-virtual addresses,
//! with the guest-physical pages behind them.

use alloc::string::String;
use alloc::vec::Vec;

/// A half-open guest-virtual range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Its length in bytes (0 when empty).
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the two share a byte.
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Every 4 KiB page the range touches, by page address. Ends at the top
    /// of the address space rather than wrap around to page 0.
    pub fn pages(&self) -> impl Iterator<Item = u64> {
        let first = (!self.is_empty()).then_some(self.start & !0xfff);
        let end = self.end;
        core::iter::successors(first, |&p| p.checked_add(0x1000)).take_while(move |&p| p < end)
    }

    /// The range cut at page boundaries: its part on each page it touches,
    /// in order (what one translation serves).
    pub fn pieces(&self) -> impl Iterator<Item = Range> {
        let r = *self;
        self.pages().map(move |p| Range::new(r.start.max(p), r.end.min(p.saturating_add(0x1000))))
    }
}

/// A tracepoint's probe list: `struct tracepoint_func { func, data, prio }`
/// entries, the last with a null function.
const PROBE_ENTRY: u64 = 24;
/// Far more probes than one tracepoint ever has; the longest list still
/// spans two pages at most.
const PROBES_MAX: u64 = 64;
const _: () = assert!(PROBES_MAX * PROBE_ENTRY <= 0x1000);

/// The bytes of the probe list at `list`, its ending entry included, given
/// a reader of guest-virtual words. A list that does not end within
/// [`PROBES_MAX`] entries, or cannot be read, is taken at its longest (it
/// guards more, never less).
pub fn probe_list(list: u64, read: impl Fn(u64) -> Option<u64>) -> Range {
    let entries = (0..PROBES_MAX)
        .find(|&i| list.checked_add(i * PROBE_ENTRY).and_then(&read) == Some(0))
        .map_or(PROBES_MAX, |last| last + 1);
    Range::new(list, list.saturating_add(entries * PROBE_ENTRY))
}

/// Kernel addresses live in the upper canonical half.
pub const fn is_kernel_address(addr: u64) -> bool {
    addr >= 0xffff_8000_0000_0000
}

/// The kernel as the agent reports it and the hypervisor checks it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub text: Range,
    pub rodata: Range,
    pub ro_after_init: Range,
    pub syscall_table: Range,
    pub idt: Range,
    /// `entry_SYSCALL_64`: IA32_LSTAR must point here.
    pub entry_syscall: u64,
    /// The routines that legitimately rewrite kernel text (`text_poke` and
    /// friends): a write to protected text from these is let through once.
    pub poke_routines: Vec<Range>,
    /// Legitimate entry points (exported symbols), sorted.
    pub entries: Vec<u64>,
    /// Entries untrusted modules may not call (dangerous kernel APIs), sorted.
    pub denied_entries: Vec<u64>,
    /// The IDT's present gates: (vector, handler), by vector. A handler is
    /// a legitimate target only for its own vector's delivery.
    pub gates: Vec<(u8, u64)>,
    /// The guest-physical pages of the text, in order: what a text address
    /// must translate to.
    pub text_pages: Vec<u64>,
    /// Kernel data only the kernel view may write (the module list, the
    /// image's data, each CPU's per-CPU area, ...).
    pub sensitive: Vec<Range>,
    /// How many CPUs' per-CPU areas are among them, and how many stacks
    /// each leaves out (the interrupt and exception stacks).
    pub percpu_cpus: usize,
    pub percpu_stacks: usize,
    /// Every CPU's interrupt and exception stacks, at their own addresses
    /// (exact: they are not 16 KiB-aligned like a task's).
    pub interrupt_stacks: Vec<Range>,
    /// The kernel's top-level page table (guest-virtual).
    pub page_table: u64,
    /// `__x86_indirect_thunk_<reg>` by register number, zero where absent.
    pub indirect_thunks: [u64; 16],
    /// The return thunks (each a `ret`), sorted.
    pub return_thunks: Vec<u64>,
    /// The kernel's `struct page` array and the slab caches whose objects
    /// no module may write; `None` if the agent gave none.
    pub objects: Option<super::objects::ObjectMap>,
    /// Where every process's top-level page table is listed; `None` if
    /// the agent gave no list.
    pub processes: Option<super::tables::ProcessList>,
    /// Fields of the kernel's data every module may write (reference
    /// counts its inline helpers change): guest-virtual as reported, made
    /// guest-physical at registration.
    pub shared: Vec<Range>,
    /// The exported functions that write where an argument points
    /// (`memcpy`, `kobject_del`, ...), by address, sorted: a module's call
    /// to one is judged by its destination.
    pub deputies: Vec<(u64, super::deputy::Spec)>,
    /// Denied exports whose failure value is NULL (lookups, allocations of
    /// kernel objects), sorted: a refused call to one returns 0.
    pub null_on_failure: Vec<u64>,
    /// Where the kernel keeps the probe lists of the tracepoints the agent
    /// hooks (guest-virtual, in the image's data): the lists are heap
    /// objects no module may write.
    pub probe_lists: Vec<u64>,
}

impl KernelLayout {
    /// The handler of `vector`'s gate.
    pub fn gate(&self, vector: u8) -> Option<u64> {
        self.gates.binary_search_by_key(&vector, |g| g.0).ok().map(|i| self.gates[i].1)
    }
}

/// Why a layout is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// A range is empty, reversed, or outside kernel addresses.
    BadRange(&'static str),
    /// LSTAR does not point at the reported syscall entry (the layout lies,
    /// or KASLR was mis-reported).
    SyscallEntryMismatch { lstar: u64, reported: u64 },
    /// The syscall entry is not inside the reported text.
    EntryOutsideText,
}

impl KernelLayout {
    /// Checks the layout against what the hypervisor can see itself.
    pub fn validate(&self, lstar: u64) -> Result<(), LayoutError> {
        for (name, r) in
            [("text", self.text), ("rodata", self.rodata), ("syscall table", self.syscall_table), ("idt", self.idt)]
        {
            if r.is_empty() || !is_kernel_address(r.start) {
                return Err(LayoutError::BadRange(name));
            }
        }
        if !is_kernel_address(self.page_table) {
            return Err(LayoutError::BadRange("kernel page table"));
        }
        if !self.ro_after_init.is_empty() && !is_kernel_address(self.ro_after_init.start) {
            return Err(LayoutError::BadRange("ro_after_init"));
        }
        if lstar != self.entry_syscall {
            return Err(LayoutError::SyscallEntryMismatch { lstar, reported: self.entry_syscall });
        }
        if !self.text.contains(self.entry_syscall) {
            return Err(LayoutError::EntryOutsideText);
        }
        let thunks = self.indirect_thunks.iter().chain(&self.return_thunks).filter(|&&t| t != 0);
        if thunks.clone().any(|&t| !self.text.contains(t)) {
            return Err(LayoutError::BadRange("thunk"));
        }
        Ok(())
    }

    /// Read-only kernel data: rodata, ro-after-init, the syscall table and the IDT.
    pub fn read_only(&self) -> [Range; 4] {
        [self.rodata, self.ro_after_init, self.syscall_table, self.idt]
    }
}

/// A module as the agent reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleInfo {
    pub name: String,
    /// Executable ranges (core text, init text).
    pub code: Vec<Range>,
    /// Its own data (writable data, bss, rodata), mapped into its view.
    pub data: Vec<Range>,
    /// The init sections (code and data), dropped when the module goes live.
    pub init: Vec<Range>,
    /// Where the kernel may call it: init/exit and the functions it hands out.
    pub entries: Vec<u64>,
    /// Its exception table as (faulting instruction, fixup): after a fault
    /// at the first, the kernel resumes it at the second.
    pub fixups: Vec<(u64, u64)>,
    /// Its exported functions: where another module may call it when it
    /// runs in the kernel's view (a trusted module is part of the kernel).
    pub exports: Vec<u64>,
    /// Its `struct module` (inside its data), whose `state` the hypervisor
    /// reads to check a LIVE or GOING report. The structure is the
    /// kernel's: the module's own view may not write it.
    pub module_struct: Range,
    /// Its regions by kind (text, init text, rodata, ...), as reported:
    /// what a trusted module's relocations are checked against.
    pub sections: super::policy::Sections,
}

impl KernelLayout {
    /// The register an indirect-branch thunk at `addr` jumps through.
    pub fn thunk_register(&self, addr: u64) -> Option<usize> {
        self.indirect_thunks.iter().position(|&t| t == addr && t != 0)
    }

    pub fn is_return_thunk(&self, addr: u64) -> bool {
        self.return_thunks.binary_search(&addr).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_list_ends_with_its_null_entry_and_is_bounded() {
        let list = 0xffff_8880_0200_0040;
        let words = |funcs: &'static [u64]| {
            move |at: u64| {
                let i = (at - list) / 24;
                funcs.get(i as usize).copied()
            }
        };
        // Two probes and the ending entry.
        assert_eq!(
            probe_list(list, words(&[0xffff_ffff_c000_0000, 0xffff_ffff_8100_0000, 0])),
            Range::new(list, list + 72)
        );
        // No ending within reach (unreadable past two entries, or never null): the longest.
        assert_eq!(probe_list(list, words(&[1, 2])).len(), 64 * 24);
        assert_eq!(probe_list(list, |_| Some(1)).len(), 64 * 24);
    }

    pub fn layout() -> KernelLayout {
        KernelLayout {
            text: Range::new(0xffff_ffff_8100_0000, 0xffff_ffff_8200_0000),
            rodata: Range::new(0xffff_ffff_8220_0000, 0xffff_ffff_8280_0000),
            ro_after_init: Range::new(0xffff_ffff_8280_0000, 0xffff_ffff_8281_0000),
            syscall_table: Range::new(0xffff_ffff_8230_0000, 0xffff_ffff_8230_1000),
            idt: Range::new(0xffff_ffff_8300_0000, 0xffff_ffff_8300_1000),
            entry_syscall: 0xffff_ffff_8180_0000,
            page_table: 0xffff_ffff_8300_2000,
            ..Default::default()
        }
    }

    #[test]
    fn pages_cover_partial_ends() {
        let r = Range::new(0x1ff8, 0x3001);
        assert_eq!(r.pages().collect::<Vec<_>>(), [0x1000, 0x2000, 0x3000]);
        assert_eq!(Range::new(5, 5).pages().count(), 0);
        let top = Range::new(u64::MAX - 0x1800, u64::MAX);
        assert_eq!(top.pages().collect::<Vec<_>>(), [0xffff_ffff_ffff_e000, 0xffff_ffff_ffff_f000]);
    }

    #[test]
    fn layout_is_anchored_on_lstar() {
        let l = layout();
        assert_eq!(l.validate(0xffff_ffff_8180_0000), Ok(()));
        assert_eq!(
            l.validate(0xffff_ffff_8180_1000),
            Err(LayoutError::SyscallEntryMismatch { lstar: 0xffff_ffff_8180_1000, reported: 0xffff_ffff_8180_0000 })
        );
        let mut bad = layout();
        bad.text = Range::new(0x1000, 0x2000);
        assert_eq!(bad.validate(0xffff_ffff_8180_0000), Err(LayoutError::BadRange("text")));
        let mut no_table = layout();
        no_table.page_table = 0;
        assert_eq!(no_table.validate(0xffff_ffff_8180_0000), Err(LayoutError::BadRange("kernel page table")));
        let mut outside = layout();
        outside.entry_syscall = 0xffff_ffff_8300_0000;
        assert_eq!(outside.validate(0xffff_ffff_8300_0000), Err(LayoutError::EntryOutsideText));
        let mut thunk = layout();
        thunk.indirect_thunks[0] = 0xffff_ffff_8100_1000;
        assert_eq!(thunk.validate(0xffff_ffff_8180_0000), Ok(()));
        assert_eq!(thunk.thunk_register(0xffff_ffff_8100_1000), Some(0));
        assert_eq!(thunk.thunk_register(0), None);
        thunk.return_thunks.push(0xffff_ffff_8300_0000);
        assert_eq!(thunk.validate(0xffff_ffff_8180_0000), Err(LayoutError::BadRange("thunk")));
    }
}
