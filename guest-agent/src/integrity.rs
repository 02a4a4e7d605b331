//! The run-time integrity part of the ABI: what the guest agent reports
//! (the kernel's layout, each module's ranges) and what it reads back (the
//! violation records). Every structure has a fixed little-endian layout and
//! a leading `size` field, so both sides can check what they were given.

/// Version of the structures below (6: every process's page tables in the
/// kernel layout; 7: how a page table is marked in its struct page, and a
/// module's data slots one region each, rodata on its own, on 6.1 as on
/// 6.4+; 8: the protected caches' object strides, the reference counts
/// in their objects every module may change, and where a top-level table's
/// struct page names its process; 9: the slab caches' own `kmem_cache` and
/// `kmem_cache_node` caches protected too; 10: the kernel's per-CPU
/// area; 12: the probe lists of the tracepoints the agent hooks).
pub const STRUCT_VERSION: u32 = 16;

/// A half-open range of guest-virtual addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireRange {
    pub start: u64,
    pub end: u64,
}

/// How many text-patching routines the layout can name.
pub const POKE_ROUTINES: usize = 8;

/// [`crate::Call::KernelRegister`]: the kernel as the agent sees it. The
/// hypervisor checks it against what it can see itself (LSTAR, IDTR) and
/// reads the exported-symbol tables it points to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub version: u32,
    pub size: u32,
    pub text: WireRange,
    pub rodata: WireRange,
    pub ro_after_init: WireRange,
    pub syscall_table: WireRange,
    /// `idt_table`: the writable IDT page, which IDTR's read-only alias maps.
    pub idt: WireRange,
    /// `entry_SYSCALL_64`, the anchor: IA32_LSTAR must hold it.
    pub entry_syscall: u64,
    /// `__start___ksymtab..__stop___ksymtab` and the GPL one: the kernel's
    /// exported symbols (`struct kernel_symbol`, PREL32), the legitimate entries.
    pub ksymtab: WireRange,
    pub ksymtab_gpl: WireRange,
    /// Functions that rewrite kernel text through `text_poke` (e.g.
    /// `__text_poke`); unused slots are zero.
    pub poke_routines: [WireRange; POKE_ROUTINES],
    /// Kernel data modules must not write (e.g. the `modules` list head);
    /// unused slots are zero.
    pub sensitive: [WireRange; SENSITIVE_RANGES],
    /// `init_top_pgt` (`swapper_pg_dir`): the kernel's own top-level page
    /// table, whose kernel half every process shares.
    pub kernel_page_table: u64,
    /// `__x86_indirect_thunk_<reg>` by register number (RAX = 0 .. R15 =
    /// 15), zero where absent: a call through one is a `jmp *reg`, and the
    /// hypervisor judges the register's target, not the thunk.
    pub indirect_thunks: [u64; INDIRECT_THUNKS],
    /// The return thunks a module's `ret` may be patched into
    /// (`__x86_return_thunk`, `srso_return_thunk`, ...), zero-padded: each
    /// is a `ret`, judged by the return address.
    pub return_thunks: [u64; RETURN_THUNKS],
    /// The `struct page` array (Linux's `vmemmap`), zero if the kernel has none: a
    /// slab page's `struct page` names the cache its objects come from.
    pub page_structs: u64,
    /// `sizeof(struct page)`.
    pub page_struct_size: u32,
    /// Where a slab's head `struct page` holds its `struct kmem_cache *`
    /// (`offsetof(struct slab, slab_cache)`, found by the agent).
    pub slab_cache_offset: u32,
    /// The slab caches of the kernel's own bookkeeping (credentials, tasks,
    /// pids, ...) in [`PROTECTED_CACHES_NAMES`] order, zero where absent:
    /// no isolated module writes their objects.
    pub protected_caches: [u64; PROTECTED_CACHES],
    /// Fields of the image's data that every module may write, because the
    /// kernel's inline helpers do so from module code (the reference counts
    /// of `init_net`, which `get_net`/`put_net` change); unused slots zero.
    /// Each lies within one page and is at most [`SHARED_FIELD_MAX`] bytes.
    pub shared: [WireRange; SHARED_FIELDS],
    /// x86's `pgd_list`: every process's top-level page table, linked
    /// through its `struct page` (zero if the agent gives none). A module
    /// that could edit a process's tables would alias kernel data into
    /// user space or other code under a kernel address.
    pub pgd_list: u64,
    /// Where a `struct page` holds the link of that list (`lru`, which
    /// 6.x's `ptdesc.pt_list` overlays).
    pub pgd_link_offset: u32,
    /// Pages per top-level table (`1 << PGD_ALLOCATION_ORDER`: two with
    /// page-table isolation, whose user copy follows the kernel's).
    pub pgd_pages: u32,
    /// Where a `struct page` holds its type (`page_type`), and the bits
    /// that mark a process's page table there: `(page_type & mask) ==
    /// value` (6.1: `PAGE_TYPE_BASE | PG_table`, `PAGE_TYPE_BASE`; 6.12:
    /// the top byte, `PGTY_table`). Zero mask: not given. Lets a module's
    /// first write to a table the last walk has not seen yet be refused.
    pub page_type_offset: u32,
    pub page_table_mask: u32,
    pub page_table_value: u32,
    /// Where a top-level table's `struct page` names the process's
    /// `mm_struct` (`pt_mm`; zero: not given). A new process's table is on
    /// `pgd_list` from its first moment but untyped: a page whose
    /// `struct page` names an `mm_struct` there is one, and the hypervisor
    /// walks the list before a module's first write to it.
    pub pgd_owner_offset: u32,
    /// The distance between two objects of each protected cache
    /// (`kmem_cache->size`), in slot order, zero where not known: where in
    /// its object a write lands.
    pub protected_strides: [u32; PROTECTED_CACHES],
    /// Fields of protected objects that every module may change, because
    /// the kernel's inline helpers do so from module code: the reference
    /// counts `get_task_struct`, `get_cred`, `get_pid`, `mmgrab` and
    /// `mmget` take; unused slots zero.
    pub object_fields: [ObjectField; OBJECT_FIELDS],
    /// The kernel's static per-CPU area, as offsets from a CPU's base
    /// (`__per_cpu_start..__per_cpu_end`: x86-64's per-CPU symbols are
    /// offsets). It holds each CPU's control data: the stack pointer the
    /// syscall entry loads, the TSS with its interrupt stack pointers,
    /// `current`. No isolated module writes it. Required.
    pub percpu: WireRange,
    /// The interrupt and exception stacks' backing stores in it
    /// (`irq_stack_backing_store`, `exception_stacks`), as offsets: a
    /// module's handler runs on them, and writes there are judged as
    /// writes to a stack, not to data. Empty slots are zero.
    pub percpu_stacks: [WireRange; PERCPU_STACKS],
    /// The field of it every module's inline helpers write
    /// (`__preempt_count`; 6.2+: `pcpu_hot.preempt_count`), as an offset:
    /// that field, and nothing beside it, is each module's to change.
    pub percpu_shared: WireRange,
    /// Each possible CPU's base (`__per_cpu_offset[cpu]`), zero past the
    /// last: the agent refuses to lock a kernel with more possible CPUs.
    pub percpu_bases: CpuBases,
    /// Where each CPU keeps the tops of the stacks in `percpu_stacks`, as
    /// offsets: [0] the word holding its interrupt stack's top less 8
    /// (`hardirq_stack_ptr`; 6.2+: `pcpu_hot.hardirq_stack_ptr`), [1] its
    /// TSS's interrupt stack table (`cpu_tss_rw.x86_tss.ist`, seven tops).
    /// The hypervisor reads them to know every CPU's interrupt and
    /// exception stacks from the lock, at their own addresses; required
    /// with the backing stores.
    pub percpu_stack_tops: [u64; PERCPU_STACKS],
    /// Where the kernel keeps the probe list of each tracepoint the agent
    /// hooks (`&tracepoint->funcs`, in the image's data), zero-padded. The
    /// list itself is a heap object (`struct tracepoint_func`s, ended by a
    /// null function) that the kernel calls through: no module may write
    /// it, or it would blind the agent, or have the kernel call a function
    /// of its choosing at every fork.
    pub probe_lists: [u64; PROBE_LISTS],
}

/// Each possible CPU's per-CPU base, zero past the last.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuBases(pub [u64; CPUS_MAX]);

impl Default for CpuBases {
    fn default() -> Self {
        CpuBases([0; CPUS_MAX])
    }
}

/// How many per-CPU stacks the layout can name.
pub const PERCPU_STACKS: usize = 2;

/// How many tracepoints' probe lists the layout can name.
pub const PROBE_LISTS: usize = 2;
/// How many CPUs' per-CPU areas the layout can name.
pub const CPUS_MAX: usize = 256;

/// A field of the objects of one protected cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectField {
    /// The cache's slot in [`KernelLayout::protected_caches`], plus one
    /// (zero: an unused slot).
    pub cache: u32,
    /// Its offset in the object, and its size (at most [`SHARED_FIELD_MAX`]).
    pub offset: u32,
    pub size: u32,
    pub reserved: u32,
}

/// How many object fields the layout can name.
pub const OBJECT_FIELDS: usize = 8;

/// How many shared fields the layout can name, and their largest size.
pub const SHARED_FIELDS: usize = 4;
pub const SHARED_FIELD_MAX: u64 = 16;

/// How many protected slab caches the layout can name.
pub const PROTECTED_CACHES: usize = 16;

/// What each slot of [`KernelLayout::protected_caches`] holds: the kernel's
/// variable (or, for `pid`, `init_pid_ns.pid_cachep`) and the name violation
/// lines give the object.
pub const PROTECTED_CACHES_NAMES: [(&str, &str); PROTECTED_CACHES] = [
    ("cred_jar", "cred"),
    ("task_struct_cachep", "task"),
    ("init_pid_ns.pid_cachep", "pid"),
    ("signal_cachep", "signal"),
    ("sighand_cachep", "sighand"),
    ("files_cachep", "files"),
    ("fs_cachep", "fs"),
    ("mm_cachep", "mm"),
    // The caches' own bookkeeping: a module that rewrote a protected
    // cache's `struct kmem_cache` would change its object size or its
    // constructor, a function pointer the kernel calls.
    ("kmem_cache", "kmem-cache"),
    ("kmem_cache_node", "kmem-cache-node"),
    // procfs, the surface a rootkit hides behind: an entry's operations
    // (`proc_ops`, `seq_ops`: swap the `/proc/modules` or `/proc/net/tcp`
    // entry's and its listing leaves lines out) and a proc inode's `i_fop`
    // (every later open of that file or directory, `/proc` itself, runs
    // the module's code). Both heap objects: no page of the image.
    ("proc_dir_entry_cache", "proc-entry"),
    ("proc_inode_cachep", "proc-inode"),
    // The namespaces, a way around the credentials: a user namespace's
    // uid_map onto the host's uid 0 lets its root setuid(0) into the host's
    // root; an nsproxy's pointers move its tasks out of their container.
    ("user_ns_cachep", "user-ns"),
    ("nsproxy_cachep", "nsproxy"),
    // sysfs (and cgroupfs): a node's name, flags and links are what a
    // rootkit renames or hides its /sys/module directory by; its `attr.ops`
    // is what every read of an attribute runs.
    ("kernfs_node_cache", "kernfs-node"),
    // A mount's flags (nosuid, noexec, read-only) and its place in its
    // namespace's tree: lifted or unlinked, a restriction or a mount is gone.
    ("mnt_cache", "mount"),
];

/// The slot of `mm_cachep` in [`KernelLayout::protected_caches`].
pub const MM_CACHE_SLOT: usize = 7;

/// One indirect-branch thunk per general-purpose register.
pub const INDIRECT_THUNKS: usize = 16;
/// How many return thunks the layout can name.
pub const RETURN_THUNKS: usize = 8;

/// How many sensitive data ranges the layout can name.
pub const SENSITIVE_RANGES: usize = 4;

pub const MODULE_NAME_MAX: usize = 56;
pub const MODULE_CODE_RANGES: usize = 2;
pub const MODULE_DATA_RANGES: usize = 4;
pub const MODULE_INIT_RANGES: usize = 2;
/// Upper bound on a module's entry points in one registration.
pub const MODULE_ENTRIES_MAX: u32 = 4096;

/// [`crate::Call::ModuleRegister`]: one module, reported at
/// MODULE_STATE_COMING, before any of its code runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    pub version: u32,
    pub size: u32,
    /// NUL-padded.
    pub name: [u8; MODULE_NAME_MAX],
    /// Core text, init text.
    pub code: [WireRange; MODULE_CODE_RANGES],
    /// One region each, in this order: writable data (with bss), read-only
    /// data, read-only-after-init data, init data (6.4's `MOD_DATA`,
    /// `MOD_RODATA`, `MOD_RO_AFTER_INIT`, `MOD_INIT_DATA`; the same parts of
    /// 6.1's core and init layouts). Trusted modules' relocations and rodata
    /// are checked against these bases.
    pub data: [WireRange; MODULE_DATA_RANGES],
    /// Init text and init data (dropped at MODULE_STATE_LIVE).
    pub init: [WireRange; MODULE_INIT_RANGES],
    /// Guest-virtual address of an array of `u64` entry points (init, exit,
    /// and the functions in its symbol table).
    pub entries: u64,
    pub entry_count: u32,
    pub flags: u32,
    /// Guest-virtual address of an array of [`Fixup`]s: the module's
    /// exception table, where the kernel may resume it after a fault.
    pub fixups: u64,
    pub fixup_count: u32,
    /// `sizeof(struct module)`: the whole structure is the kernel's, not
    /// the module's, though it lies in the module's data.
    pub module_size: u32,
    /// Its `struct module`, inside its data: the kernel's `state` (the
    /// first field) shows whether a LIVE or GOING report is true.
    pub module: u64,
    /// Its exported-symbol tables (`mod->syms`, `mod->gpl_syms`: `struct
    /// kernel_symbol`, PREL32), inside its data: the only places another
    /// module may call it if it runs in the kernel's view.
    pub ksymtab: WireRange,
    pub ksymtab_gpl: WireRange,
}

/// The module the hypervisor pins as the guest's agent: named in `trust=`,
/// its code matched against `ctvm.policy`, and the only code that may make
/// integrity hypercalls once the layout is locked.
pub const AGENT_NAME: &str = "ctvm_agent";

/// `enum module_state` (`include/linux/module.h`): the first field of
/// `struct module`, stable since 2.6.
pub mod module_state {
    pub const LIVE: u32 = 0;
    pub const COMING: u32 = 1;
    pub const GOING: u32 = 2;
}

/// Modules registered at once (the agent's own table holds as many):
/// servers load a few hundred.
pub const MODULES_MAX: u32 = 1024;

/// A `struct kernel_symbol` on x86-64: three PREL32 offsets (value, name,
/// namespace), each relative to its own address.
pub const KERNEL_SYMBOL_SIZE: u64 = 12;

/// Bounds on `sizeof(struct module)` (about 1 KiB on x86-64 kernels from
/// 5.x to 6.12, whatever the configuration): a size outside them is no
/// `struct module`.
pub const MODULE_STRUCT_MIN: u32 = 64;
pub const MODULE_STRUCT_MAX: u32 = 16384;

/// Upper bound on a module's exported symbols in one registration.
pub const MODULE_EXPORTS_MAX: u32 = 16384;

/// Upper bound on a module's exception-table entries in one registration.
pub const MODULE_FIXUPS_MAX: u32 = 4096;

/// One exception-table entry, as absolute addresses: a fault at `insn`
/// resumes at `fixup`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fixup {
    pub insn: u64,
    pub fixup: u64,
}

impl Default for ModuleInfo {
    fn default() -> Self {
        ModuleInfo {
            version: STRUCT_VERSION,
            size: core::mem::size_of::<ModuleInfo>() as u32,
            name: [0; MODULE_NAME_MAX],
            code: [WireRange::default(); MODULE_CODE_RANGES],
            data: [WireRange::default(); MODULE_DATA_RANGES],
            init: [WireRange::default(); MODULE_INIT_RANGES],
            entries: 0,
            entry_count: 0,
            flags: 0,
            fixups: 0,
            fixup_count: 0,
            module_size: 0,
            module: 0,
            ksymtab: WireRange::default(),
            ksymtab_gpl: WireRange::default(),
        }
    }
}

/// What was attempted, as numbered in [`ViolationRecord::kind`]: the one
/// definition the hypervisor and the agents share (the C header carries
/// the names).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    WriteKernelText = 1,
    WriteReadOnlyData = 2,
    WriteSyscallTable = 3,
    WriteIdt = 4,
    WriteModuleCode = 5,
    /// Kernel data that only the kernel may write (page tables, the module
    /// list, other modules' and the agent's data).
    WriteProtectedData = 6,
    /// A module called into the kernel somewhere that is not an entry.
    CallNonEntry = 7,
    /// A module called a kernel API it may not use.
    CallDeniedApi = 8,
    /// The kernel (or another module) jumped into a module off its entries.
    EnterModuleOffEntry = 9,
    /// Execution of something that is not code in this view.
    ExecuteData = 10,
    /// CR0.WP or CR4.SMEP/SMAP cleared after the lock.
    ControlRegister = 11,
    /// LIDT/LGDT after the lock.
    DescriptorTable = 12,
    /// A write to a guarded MSR (the syscall entry points, EFER, the GS
    /// bases, the APIC base, the microcode trigger) after the lock.
    GuardedMsr = 13,
    /// A module named as trusted whose code is not the code the policy pins.
    CodeDigest = 14,
    /// A hypercall from an isolated module.
    Hypercall = 15,
    /// An MSR write from an isolated module.
    ModuleMsr = 16,
    /// Port I/O from an isolated module.
    ModulePortIo = 17,
    /// An INIT or start-up IPI: the guest tried to start a CPU it was not given.
    StartCpu = 18,
    /// Code reached through a linear address that does not map the code
    /// registered there (page tables edited to alias other code).
    Alias = 19,
    /// A module the hypervisor could not isolate: its load is vetoed.
    RegistrationRefused = 20,
    /// A kernel function a module called wrote what the module may not
    /// (the module's deputy).
    DeputyWrite = 21,
    /// An IPI to a CPU the guest was not given, or of a kind no guest may
    /// send (SMI, the reserved delivery modes).
    ForeignIpi = 22,
    /// An object of the kernel's own bookkeeping (a `cred`, a task, a pid,
    /// ...) in a protected slab cache.
    WriteKernelObject = 23,
    /// A page table: the kernel's, at any level, or a process's.
    WritePageTable = 24,
    /// The kernel (or another module) called a quarantined module, one
    /// that attacked before, other than to unload it.
    EnterQuarantined = 25,
    /// A kernel stack outside the module's own frames and the
    /// out-parameters it was handed: the kernel's frames (return addresses,
    /// saved registers), another task's.
    WriteKernelStack = 26,
    /// What a write-through call still running was judged by (its format,
    /// its input, the pointers it reads from the stack, its `seq_file`),
    /// changed before it returned: by a module's write, or by another
    /// write-through call's destination.
    DeputyInput = 27,
    /// A module left its code (a branch out, or an event) with its stack
    /// pointer on a stack other than the one its view was entered on:
    /// there its crossings would end another task's frames (their return
    /// points, the write-through calls they hold).
    StackPivot = 28,
}

impl ViolationKind {
    /// Every kind, in code order.
    pub const ALL: [ViolationKind; 28] = [
        Self::WriteKernelText,
        Self::WriteReadOnlyData,
        Self::WriteSyscallTable,
        Self::WriteIdt,
        Self::WriteModuleCode,
        Self::WriteProtectedData,
        Self::CallNonEntry,
        Self::CallDeniedApi,
        Self::EnterModuleOffEntry,
        Self::ExecuteData,
        Self::ControlRegister,
        Self::DescriptorTable,
        Self::GuardedMsr,
        Self::CodeDigest,
        Self::Hypercall,
        Self::ModuleMsr,
        Self::ModulePortIo,
        Self::StartCpu,
        Self::Alias,
        Self::RegistrationRefused,
        Self::DeputyWrite,
        Self::ForeignIpi,
        Self::WriteKernelObject,
        Self::WritePageTable,
        Self::EnterQuarantined,
        Self::WriteKernelStack,
        Self::DeputyInput,
        Self::StackPivot,
    ];

    /// The name on console lines and in `/proc/ctvm_violations`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::WriteKernelText => "write-kernel-text",
            Self::WriteReadOnlyData => "write-rodata",
            Self::WriteSyscallTable => "write-syscall-table",
            Self::WriteIdt => "write-idt",
            Self::WriteModuleCode => "write-module-code",
            Self::WriteProtectedData => "write-protected-data",
            Self::CallNonEntry => "call-non-entry",
            Self::CallDeniedApi => "call-denied-api",
            Self::EnterModuleOffEntry => "enter-module-off-entry",
            Self::ExecuteData => "execute-data",
            Self::ControlRegister => "control-register",
            Self::DescriptorTable => "descriptor-table",
            Self::GuardedMsr => "guarded-msr",
            Self::CodeDigest => "code-digest",
            Self::Hypercall => "hypercall",
            Self::ModuleMsr => "module-msr",
            Self::ModulePortIo => "module-port-io",
            Self::StartCpu => "start-cpu",
            Self::Alias => "alias",
            Self::RegistrationRefused => "registration-refused",
            Self::DeputyWrite => "deputy-write",
            Self::ForeignIpi => "foreign-ipi",
            Self::WriteKernelObject => "write-kernel-object",
            Self::WritePageTable => "write-page-table",
            Self::EnterQuarantined => "enter-quarantined",
            Self::WriteKernelStack => "write-kernel-stack",
            Self::DeputyInput => "deputy-input",
            Self::StackPivot => "stack-pivot",
        }
    }
}

/// What the hypervisor did about a violation.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationAction {
    /// Audit mode: reported and let through.
    Allowed = 1,
    /// Enforce mode: reported and refused (the write or call did not happen).
    Denied = 2,
}

impl ViolationAction {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allow",
            Self::Denied => "deny",
        }
    }
}

/// One record of [`crate::Call::ViolationsRead`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViolationRecord {
    /// Increases by one per violation; a gap means records were dropped.
    pub sequence: u64,
    pub kind: u32,
    /// The module whose view was active; `u32::MAX` for the kernel view.
    pub module: u32,
    pub rip: u64,
    pub target: u64,
    pub action: u32,
    /// The guest CPU (vCPU index) that made the attempt.
    pub cpu: u32,
}

pub const VIOLATION_RECORD_SIZE: usize = core::mem::size_of::<ViolationRecord>();

impl ViolationRecord {
    pub fn to_bytes(&self) -> [u8; VIOLATION_RECORD_SIZE] {
        let mut out = [0u8; VIOLATION_RECORD_SIZE];
        out[0..8].copy_from_slice(&self.sequence.to_le_bytes());
        out[8..12].copy_from_slice(&self.kind.to_le_bytes());
        out[12..16].copy_from_slice(&self.module.to_le_bytes());
        out[16..24].copy_from_slice(&self.rip.to_le_bytes());
        out[24..32].copy_from_slice(&self.target.to_le_bytes());
        out[32..36].copy_from_slice(&self.action.to_le_bytes());
        out[36..40].copy_from_slice(&self.cpu.to_le_bytes());
        out
    }
}

#[cfg(feature = "c-header")]
/// The C view of this ABI, for the Linux agent: generated from the Rust
/// definitions (sizes and offsets checked at compile time on both sides),
/// so the numbers are defined once.
pub fn c_header() -> alloc::string::String {
    use core::fmt::Write;
    use core::mem::{offset_of, size_of};
    let mut h = alloc::string::String::new();
    let _ = writeln!(h, "/* Generated by guest-agent (Rust): do not edit. */");
    let _ =
        writeln!(h, "#ifndef CTVM_ABI_H\n#define CTVM_ABI_H\n#include <linux/types.h>\n#include <linux/build_bug.h>\n");
    let _ = writeln!(h, "#define CTVM_ABI_VERSION {:#x}", crate::ABI_VERSION);
    let _ = writeln!(h, "#define CTVM_CAP_INTEGRITY {:#x}ULL", crate::Capabilities::INTEGRITY);
    let _ = writeln!(h, "#define CTVM_CAP_EVENT_LOG {:#x}ULL", crate::Capabilities::EVENT_LOG);
    for (name, call) in [
        ("VERSION", crate::Call::Version),
        ("KERNEL_REGISTER", crate::Call::KernelRegister),
        ("KERNEL_LOCK", crate::Call::KernelLock),
        ("MODULE_REGISTER", crate::Call::ModuleRegister),
        ("MODULE_LIVE", crate::Call::ModuleLive),
        ("MODULE_UNREGISTER", crate::Call::ModuleUnregister),
        ("VIOLATIONS_READ", crate::Call::ViolationsRead),
        ("STACK_NEW", crate::Call::StackNew),
        ("EVENT_LOG_READ", crate::Call::EventLogRead),
    ] {
        let _ = writeln!(h, "#define CTVM_CALL_{name} {:#x}", call as u64);
    }
    let _ = writeln!(h, "#define CTVM_STRUCT_VERSION {STRUCT_VERSION}");
    let _ = writeln!(h, "#define CTVM_POKE_ROUTINES {POKE_ROUTINES}\n#define CTVM_SENSITIVE_RANGES {SENSITIVE_RANGES}");
    let _ = writeln!(h, "#define CTVM_INDIRECT_THUNKS {INDIRECT_THUNKS}\n#define CTVM_RETURN_THUNKS {RETURN_THUNKS}\n#define CTVM_PROTECTED_CACHES {PROTECTED_CACHES}\n#define CTVM_SHARED_FIELDS {SHARED_FIELDS}\n#define CTVM_OBJECT_FIELDS {OBJECT_FIELDS}\n#define CTVM_PERCPU_STACKS {PERCPU_STACKS}\n#define CTVM_CPUS_MAX {CPUS_MAX}\n#define CTVM_PROBE_LISTS {PROBE_LISTS}");
    let _ = writeln!(
        h,
        "#define CTVM_MODULE_NAME_MAX {MODULE_NAME_MAX}\n#define CTVM_MODULE_ENTRIES_MAX {MODULE_ENTRIES_MAX}\n#define CTVM_MODULE_FIXUPS_MAX {MODULE_FIXUPS_MAX}\n#define CTVM_AGENT_NAME \"{AGENT_NAME}\"\n#define CTVM_MODULES_MAX {MODULES_MAX}\n#define CTVM_KERNEL_SYMBOL_SIZE {KERNEL_SYMBOL_SIZE}\n"
    );
    let _ = writeln!(h, "struct ctvm_range {{ __u64 start; __u64 end; }};\n");
    let _ = writeln!(h, "struct ctvm_object_field {{ __u32 cache; __u32 offset; __u32 size; __u32 reserved; }};\n");
    let _ = writeln!(
        h,
        "struct ctvm_kernel_layout {{\n\t__u32 version;\n\t__u32 size;\n\tstruct ctvm_range text, rodata, ro_after_init, syscall_table, idt;\n\t__u64 entry_syscall;\n\tstruct ctvm_range ksymtab, ksymtab_gpl;\n\tstruct ctvm_range poke_routines[CTVM_POKE_ROUTINES];\n\tstruct ctvm_range sensitive[CTVM_SENSITIVE_RANGES];\n\t__u64 kernel_page_table;\n\t__u64 indirect_thunks[CTVM_INDIRECT_THUNKS];\n\t__u64 return_thunks[CTVM_RETURN_THUNKS];\n\t__u64 page_structs;\n\t__u32 page_struct_size;\n\t__u32 slab_cache_offset;\n\t__u64 protected_caches[CTVM_PROTECTED_CACHES];\n\tstruct ctvm_range shared[CTVM_SHARED_FIELDS];\n\t__u64 pgd_list;\n\t__u32 pgd_link_offset;\n\t__u32 pgd_pages;\n\t__u32 page_type_offset;\n\t__u32 page_table_mask;\n\t__u32 page_table_value;\n\t__u32 pgd_owner_offset;\n\t__u32 protected_strides[CTVM_PROTECTED_CACHES];\n\tstruct ctvm_object_field object_fields[CTVM_OBJECT_FIELDS];\n\tstruct ctvm_range percpu;\n\tstruct ctvm_range percpu_stacks[CTVM_PERCPU_STACKS];\n\tstruct ctvm_range percpu_shared;\n\t__u64 percpu_bases[CTVM_CPUS_MAX];\n\t__u64 percpu_stack_tops[CTVM_PERCPU_STACKS];\n\t__u64 probe_lists[CTVM_PROBE_LISTS];\n}};"
    );
    let _ = writeln!(
        h,
        "struct ctvm_module_info {{\n\t__u32 version;\n\t__u32 size;\n\tchar name[CTVM_MODULE_NAME_MAX];\n\tstruct ctvm_range code[{MODULE_CODE_RANGES}];\n\tstruct ctvm_range data[{MODULE_DATA_RANGES}];\n\tstruct ctvm_range init[{MODULE_INIT_RANGES}];\n\t__u64 entries;\n\t__u32 entry_count;\n\t__u32 flags;\n\t__u64 fixups;\n\t__u32 fixup_count;\n\t__u32 module_size;\n\t__u64 module;\n\tstruct ctvm_range ksymtab, ksymtab_gpl;\n}};\n\nstruct ctvm_fixup {{ __u64 insn; __u64 fixup; }};"
    );
    let _ = writeln!(
        h,
        "struct ctvm_violation_record {{\n\t__u64 sequence;\n\t__u32 kind;\n\t__u32 module;\n\t__u64 rip;\n\t__u64 target;\n\t__u32 action;\n\t__u32 cpu;\n}};\n"
    );
    let _ = write!(h, "static const char *const ctvm_violation_kinds[] = {{\n\t\"?\",");
    for kind in ViolationKind::ALL {
        let _ = write!(h, " \"{}\",", kind.name());
    }
    let _ = writeln!(h, "\n}};\n");
    for (c, size) in [
        ("struct ctvm_kernel_layout", size_of::<KernelLayout>()),
        ("struct ctvm_module_info", size_of::<ModuleInfo>()),
        ("struct ctvm_fixup", size_of::<Fixup>()),
        ("struct ctvm_violation_record", size_of::<ViolationRecord>()),
    ] {
        let _ = writeln!(h, "static_assert(sizeof({c}) == {size});");
    }
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, entry_syscall) == {});",
        offset_of!(KernelLayout, entry_syscall)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, sensitive) == {});",
        offset_of!(KernelLayout, sensitive)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, return_thunks) == {});",
        offset_of!(KernelLayout, return_thunks)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, protected_caches) == {});",
        offset_of!(KernelLayout, protected_caches)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, pgd_list) == {});",
        offset_of!(KernelLayout, pgd_list)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, object_fields) == {});",
        offset_of!(KernelLayout, object_fields)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, percpu_bases) == {});",
        offset_of!(KernelLayout, percpu_bases)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, percpu_stack_tops) == {});",
        offset_of!(KernelLayout, percpu_stack_tops)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_kernel_layout, probe_lists) == {});",
        offset_of!(KernelLayout, probe_lists)
    );
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_module_info, entries) == {});",
        offset_of!(ModuleInfo, entries)
    );
    let _ =
        writeln!(h, "static_assert(offsetof(struct ctvm_module_info, fixups) == {});", offset_of!(ModuleInfo, fixups));
    let _ =
        writeln!(h, "static_assert(offsetof(struct ctvm_module_info, module) == {});", offset_of!(ModuleInfo, module));
    let _ = writeln!(
        h,
        "static_assert(offsetof(struct ctvm_violation_record, action) == {});",
        offset_of!(ViolationRecord, action)
    );
    let _ = writeln!(h, "\n#endif");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_kinds_are_listed_in_code_order_with_distinct_names() {
        for (i, kind) in ViolationKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i + 1, "{kind:?}");
        }
        for (i, a) in ViolationKind::ALL.iter().enumerate() {
            assert!(ViolationKind::ALL[i + 1..].iter().all(|b| a.name() != b.name()), "{a:?}");
        }
    }

    #[cfg(feature = "c-header")]
    #[test]
    fn the_agents_kind_names_are_generated() {
        assert!(c_header().contains("\"?\", \"write-kernel-text\","));
        assert!(c_header().contains(" \"start-cpu\","));
        assert!(c_header().contains(" \"write-kernel-object\","));
    }

    #[test]
    fn structure_sizes_are_fixed() {
        assert_eq!(core::mem::size_of::<WireRange>(), 16);
        assert_eq!(
            core::mem::size_of::<KernelLayout>(),
            8 + 16 * 5
                + 8
                + 16 * 2
                + 16 * POKE_ROUTINES
                + 16 * SENSITIVE_RANGES
                + 8
                + 8 * INDIRECT_THUNKS
                + 8 * RETURN_THUNKS
                + 16
                + 8 * PROTECTED_CACHES
                + 16 * SHARED_FIELDS
                + 16
                + 16
                + 4 * PROTECTED_CACHES
                + 16 * OBJECT_FIELDS
                + 16 * (2 + PERCPU_STACKS)
                + 8 * CPUS_MAX
                + 8 * PERCPU_STACKS
                + 8 * PROBE_LISTS
        );
        assert_eq!(core::mem::size_of::<ObjectField>(), 16);
        assert_eq!(core::mem::size_of::<ModuleInfo>(), 8 + 56 + 16 * 8 + 8 + 8 + 16 + 8 + 32);
        assert_eq!(core::mem::size_of::<Fixup>(), 16);
        assert_eq!(VIOLATION_RECORD_SIZE, 40);
    }

    #[test]
    fn record_bytes_match_the_repr_c_layout() {
        let r = ViolationRecord { sequence: 7, kind: 3, module: 2, rip: 0x1122, target: 0x3344, action: 2, cpu: 1 };
        let bytes = r.to_bytes();
        // SAFETY: ViolationRecord is repr(C) plain data of exactly this size.
        let back: ViolationRecord = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back, r);
    }
}
