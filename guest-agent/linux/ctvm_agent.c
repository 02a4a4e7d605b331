// SPDX-License-Identifier: GPL-2.0
/*
 * The CTVM guest agent: tells the hypervisor where the kernel's protected
 * parts are, locks that layout, then reports every module before its code
 * runs, so that CTVM can isolate it in its own EPT view.
 *
 * The kernel addresses come as module parameters, taken from /proc/kallsyms
 * by /init while the kernel is still the measured, trusted one; CTVM checks
 * them against what it sees itself (LSTAR, IDTR) and reads the exported
 * symbols from the kernel's own __ksymtab.
 *
 * Works with Linux 6.1's core_layout/init_layout and 6.4's mod->mem[].
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/mutex.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/mm.h>
#include <linux/pid_namespace.h>
#include <linux/cred.h>
#include <linux/sched.h>
#include <linux/mm_types.h>
#include <net/net_namespace.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/workqueue.h>
#include <linux/elf.h>
#include <linux/extable.h>
#include <asm/processor.h>
#include <asm/nospec-branch.h>
#include <asm/pgalloc.h>
#include <asm/cpu_entry_area.h>
#include <asm/percpu.h>
#include <linux/tracepoint.h>
#include <linux/sched/task_stack.h>
#include "ctvm_abi.h"

static unsigned long text_start, text_end, rodata_start, rodata_end;
static unsigned long ro_after_init_start, ro_after_init_end;
static unsigned long syscall_table, idt, syscall_entry;
static unsigned long ksymtab_start, ksymtab_end, ksymtab_gpl_start, ksymtab_gpl_end;
static unsigned long poke_start, poke_end, module_list, page_table;
module_param(text_start, ulong, 0400);
module_param(text_end, ulong, 0400);
module_param(rodata_start, ulong, 0400);
module_param(rodata_end, ulong, 0400);
module_param(ro_after_init_start, ulong, 0400);
module_param(ro_after_init_end, ulong, 0400);
module_param(syscall_table, ulong, 0400);
module_param(idt, ulong, 0400);
module_param(syscall_entry, ulong, 0400);
module_param(ksymtab_start, ulong, 0400);
module_param(ksymtab_end, ulong, 0400);
module_param(ksymtab_gpl_start, ulong, 0400);
module_param(ksymtab_gpl_end, ulong, 0400);
module_param(poke_start, ulong, 0400);
module_param(poke_end, ulong, 0400);
module_param(module_list, ulong, 0400);
module_param(page_table, ulong, 0400);
/* x86's pgd_list (declared by the kernel's headers, not exported): every
 * process's top-level page table. */
static unsigned long pgd_list_address;
module_param_named(pgd_list, pgd_list_address, ulong, 0400);
/* The image's .data and .bss (modprobe_path, init_task, init_cred, ...). */
static unsigned long data_start, data_end, bss_start, bss_end;
module_param(data_start, ulong, 0400);
module_param(data_end, ulong, 0400);
module_param(bss_start, ulong, 0400);
module_param(bss_end, ulong, 0400);
/* The kernel's static per-CPU area (__per_cpu_start..__per_cpu_end) and the
 * interrupt and exception stacks' backing stores in it, as the per-CPU
 * offsets /proc/kallsyms shows for them. */
static unsigned long percpu_start, percpu_end, irq_stacks, exception_stacks;
module_param(percpu_start, ulong, 0400);
module_param(percpu_end, ulong, 0400);
module_param(irq_stacks, ulong, 0400);
module_param(exception_stacks, ulong, 0400);
/* 6.1's hardirq_stack_ptr, a per-CPU offset from /proc/kallsyms (6.2+ keeps
 * it in pcpu_hot, which the agent reads itself). */
static unsigned long irq_stack_top;
module_param(irq_stack_top, ulong, 0400);
/* The addresses of the kernel's variables that hold its protected slab
 * caches, in CTVM's slot order (PROTECTED_CACHES_NAMES in
 * guest-agent/src/integrity.rs); 0 where absent. Slot 2 (pids) the agent
 * fills. */
static unsigned long caches[CTVM_PROTECTED_CACHES];
static int cache_count;
module_param_array(caches, ulong, &cache_count, 0400);
/* The return thunks a module's returns may be patched into (srso_return_thunk
 * and the like are not exported); __x86_return_thunk is added here. */
static unsigned long return_thunks[CTVM_RETURN_THUNKS - 1];
static int return_thunk_count;
module_param_array(return_thunks, ulong, &return_thunk_count, 0400);

/* One entry per module CTVM knows, to find its id again at LIVE and GOING.
 * In the agent's own data, which CTVM lets no module write (a list in the
 * kernel's heap would share pages with anyone's objects). */
struct tracked {
	struct module *mod;
	long id;
};
static struct tracked tracked_modules[CTVM_MODULES_MAX];
static DEFINE_MUTEX(tracked_lock);

/* The agent's one VMCALL for the integrity calls: CTVM takes them only from
 * the agent's pinned code. Not exported: no module may call it. */
static noinline long ctvm_call(unsigned long nr, unsigned long a, unsigned long b,
			       unsigned long c, unsigned long d)
{
	long ret;

	/* Calls may return values in RBX..RSI too: all are in/out. */
	asm volatile("vmcall"
		     : "=a"(ret), "+b"(a), "+c"(b), "+d"(c), "+S"(d)
		     : "a"(nr)
		     : "memory");
	return ret;
}

static bool ctvm_present(void)
{
	unsigned int eax, ebx, ecx, edx;
	char sig[13];

	cpuid(0x40000000, &eax, &ebx, &ecx, &edx);
	memcpy(sig, &ebx, 4);
	memcpy(sig + 4, &ecx, 4);
	memcpy(sig + 8, &edx, 4);
	sig[12] = 0;
	return strcmp(sig, "CTVMCTVMCTVM") == 0;
}

static void range(struct ctvm_range *r, unsigned long start, unsigned long size)
{
	r->start = start;
	r->end = start + size;
}

/* Where a module's memory is: 6.4 split it by kind, 6.1 had two layouts. */
static void module_ranges(struct module *mod, struct ctvm_module_info *info)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	range(&info->code[0], (unsigned long)mod->mem[MOD_TEXT].base, mod->mem[MOD_TEXT].size);
	range(&info->code[1], (unsigned long)mod->mem[MOD_INIT_TEXT].base, mod->mem[MOD_INIT_TEXT].size);
	range(&info->data[0], (unsigned long)mod->mem[MOD_DATA].base, mod->mem[MOD_DATA].size);
	range(&info->data[1], (unsigned long)mod->mem[MOD_RODATA].base, mod->mem[MOD_RODATA].size);
	range(&info->data[2], (unsigned long)mod->mem[MOD_RO_AFTER_INIT].base,
	      mod->mem[MOD_RO_AFTER_INIT].size);
	range(&info->data[3], (unsigned long)mod->mem[MOD_INIT_DATA].base, mod->mem[MOD_INIT_DATA].size);
	info->init[0] = info->code[1];
	info->init[1] = info->data[3];
#else
	unsigned long core = (unsigned long)mod->core_layout.base;
	unsigned long init = (unsigned long)mod->init_layout.base;

	range(&info->code[0], core, mod->core_layout.text_size);
	range(&info->code[1], init, mod->init_layout.text_size);
	/* The core layout is text, rodata, ro_after_init, data, each part
	 * page-aligned; init data here includes init rodata. */
	range(&info->data[0], core + mod->core_layout.ro_after_init_size,
	      mod->core_layout.size - mod->core_layout.ro_after_init_size);
	range(&info->data[1], core + mod->core_layout.text_size,
	      mod->core_layout.ro_size - mod->core_layout.text_size);
	range(&info->data[2], core + mod->core_layout.ro_size,
	      mod->core_layout.ro_after_init_size - mod->core_layout.ro_size);
	range(&info->data[3], init + mod->init_layout.text_size,
	      mod->init_layout.size - mod->init_layout.text_size);
	range(&info->init[0], init, mod->init_layout.size);
#endif
}

/* The functions the kernel may call in a module: init, exit, and every
 * function in its symbol table (the ones it hands out as callbacks). */
static u64 *module_entries(struct module *mod, u32 *count)
{
	struct mod_kallsyms *ks;
	u64 *entries;
	u32 n = 0;
	unsigned int i;

	entries = kmalloc_array(CTVM_MODULE_ENTRIES_MAX, sizeof(u64), GFP_KERNEL);
	if (!entries)
		return NULL;
	if (mod->init)
		entries[n++] = (unsigned long)mod->init;
#ifdef CONFIG_MODULE_UNLOAD
	if (mod->exit)
		entries[n++] = (unsigned long)mod->exit;
#endif
	preempt_disable();
	ks = rcu_dereference_sched(mod->kallsyms);
	for (i = 0; ks && i < ks->num_symtab && n < CTVM_MODULE_ENTRIES_MAX; i++) {
		const Elf_Sym *sym = &ks->symtab[i];

		if (ELF_ST_TYPE(sym->st_info) == STT_FUNC && sym->st_value)
			entries[n++] = sym->st_value;
	}
	preempt_enable();
	*count = n;
	return entries;
}

/* Its exception table: where the kernel resumes it after a fault (the
 * entries hold offsets relative to themselves). */
static struct ctvm_fixup *module_fixups(struct module *mod, u32 *count)
{
	struct ctvm_fixup *fixups;
	unsigned int i, n = min_t(unsigned int, mod->num_exentries, CTVM_MODULE_FIXUPS_MAX);

	fixups = kmalloc_array(max(n, 1U), sizeof(*fixups), GFP_KERNEL);
	if (!fixups)
		return NULL;
	for (i = 0; i < n; i++) {
		const struct exception_table_entry *e = &mod->extable[i];

		fixups[i].insn = (unsigned long)&e->insn + e->insn;
		fixups[i].fixup = (unsigned long)&e->fixup + e->fixup;
	}
	*count = n;
	return fixups;
}

/* Fills in a module's registration: ranges, entries, fault fixups, its
 * struct module and its export tables. The caller frees the arrays. */
static int module_report(struct module *mod, struct ctvm_module_info *info,
			 u64 **entries, struct ctvm_fixup **fixups)
{
	u32 count = 0, fixup_count = 0;

	*entries = module_entries(mod, &count);
	*fixups = module_fixups(mod, &fixup_count);
	if (!*entries || !*fixups) {
		kfree(*entries);
		kfree(*fixups);
		return -ENOMEM;
	}
	memset(info, 0, sizeof(*info));
	info->version = CTVM_STRUCT_VERSION;
	info->size = sizeof(*info);
	strscpy(info->name, mod->name, sizeof(info->name));
	module_ranges(mod, info);
	info->entries = (unsigned long)*entries;
	info->entry_count = count;
	info->fixups = (unsigned long)*fixups;
	info->fixup_count = fixup_count;
	info->module = (unsigned long)mod;
	info->module_size = sizeof(*mod);
	/* struct kernel_symbol is private to the module loader since 6.4;
	 * x86-64 uses its PREL32 form everywhere. */
	range(&info->ksymtab, (unsigned long)mod->syms, mod->num_syms * CTVM_KERNEL_SYMBOL_SIZE);
	range(&info->ksymtab_gpl, (unsigned long)mod->gpl_syms, mod->num_gpl_syms * CTVM_KERNEL_SYMBOL_SIZE);
	return 0;
}

/* Registers a module (CTVM_CALL_MODULE_REGISTER), or the agent itself while
 * locking (CTVM_CALL_KERNEL_LOCK): its id, or a negative error. */
static long report_module(unsigned long call, struct module *mod)
{
	struct ctvm_module_info *info = kzalloc(sizeof(*info), GFP_KERNEL);
	struct ctvm_fixup *fixups;
	u64 *entries;
	long id;

	if (!info)
		return -ENOMEM;
	id = module_report(mod, info, &entries, &fixups);
	if (id == 0) {
		id = ctvm_call(call, (unsigned long)info, sizeof(*info), 0, 0);
		kfree(fixups);
		kfree(entries);
	}
	kfree(info);
	return id;
}

static bool track(struct module *mod, long id)
{
	bool done = false;
	int i;

	mutex_lock(&tracked_lock);
	for (i = 0; i < ARRAY_SIZE(tracked_modules) && !done; i++) {
		if (!tracked_modules[i].mod) {
			tracked_modules[i] = (struct tracked){ mod, id };
			done = true;
		}
	}
	mutex_unlock(&tracked_lock);
	return done;
}

static long tracked_id(struct module *mod, bool remove)
{
	long id = -1;
	int i;

	mutex_lock(&tracked_lock);
	for (i = 0; i < ARRAY_SIZE(tracked_modules); i++) {
		if (tracked_modules[i].mod == mod) {
			id = tracked_modules[i].id;
			if (remove)
				tracked_modules[i] = (struct tracked){ NULL, 0 };
			break;
		}
	}
	mutex_unlock(&tracked_lock);
	return id;
}

static struct notifier_block module_nb;

static int module_event(struct notifier_block *nb, unsigned long state, void *data)
{
	struct module *mod = data;
	long id;

	/* Only the kernel's module notifier chain calls this (a work item or
	 * timer a module aimed here would not pass its own notifier block). */
	if (nb != &module_nb)
		return NOTIFY_DONE;
	switch (state) {
	case MODULE_STATE_COMING:
		id = report_module(CTVM_CALL_MODULE_REGISTER, mod);
		if (id < 0) {
			/* Fail closed: a module CTVM cannot isolate does not load. */
			pr_err("ctvm: module %s not loaded: CTVM could not isolate it (%ld)\n", mod->name, id);
			return notifier_from_errno(-EPERM);
		}
		/* CTVM holds at most as many modules as the table. */
		if (!track(mod, id))
			pr_err("ctvm: module %s: the agent's table is full\n", mod->name);
		break;
	case MODULE_STATE_LIVE:
		id = tracked_id(mod, false);
		if (id >= 0)
			ctvm_call(CTVM_CALL_MODULE_LIVE, id, 0, 0, 0);
		break;
	case MODULE_STATE_GOING:
		id = tracked_id(mod, true);
		if (id >= 0)
			ctvm_call(CTVM_CALL_MODULE_UNREGISTER, id, 0, 0, 0);
		break;
	}
	return NOTIFY_OK;
}

/* Lowest priority: run after the kernel's own COMING notifiers. */
static struct notifier_block module_nb = {
	.notifier_call = module_event,
	.priority = INT_MIN,
};


/*
 * Violation records, drained from CTVM every second and whenever
 * /proc/ctvm_violations is opened, and kept here, in the agent's own data
 * (which CTVM lets no module write), until the ring wraps. Reading the file
 * consumes nothing: it shows every record kept, after a line counting what
 * was lost (a gap in CTVM's sequence: its log overflowed before a drain; or
 * the ring wrapped before a read).
 */
#define RECORDS 4096
static struct ctvm_violation_record records[RECORDS];
static struct ctvm_violation_record batch[64];
static u64 records_stored, records_lost, next_sequence = 1;
static DEFINE_MUTEX(records_lock);

static void drain(void)
{
	long n, i;

	mutex_lock(&records_lock);
	do {
		n = ctvm_call(CTVM_CALL_VIOLATIONS_READ, (unsigned long)batch, ARRAY_SIZE(batch), 0, 0);
		for (i = 0; i < n; i++) {
			if (batch[i].sequence > next_sequence)
				records_lost += batch[i].sequence - next_sequence;
			next_sequence = batch[i].sequence + 1;
			records[records_stored++ % RECORDS] = batch[i];
		}
	} while (n == ARRAY_SIZE(batch));
	mutex_unlock(&records_lock);
}

static void drain_work(struct work_struct *work);
static DECLARE_DELAYED_WORK(drainer, drain_work);

static void drain_work(struct work_struct *work)
{
	drain();
	schedule_delayed_work(&drainer, HZ);
}

/* The seq_file position is the record's index since boot (0 the header):
 * a show that runs again after its buffer filled prints the same record. */
static u64 oldest_kept(void)
{
	return records_stored > RECORDS ? records_stored - RECORDS : 0;
}

static void *violations_start(struct seq_file *m, loff_t *pos)
{
	mutex_lock(&records_lock);
	if (*pos == 0)
		return SEQ_START_TOKEN;
	if (*pos - 1 < oldest_kept())
		*pos = oldest_kept() + 1;
	return *pos - 1 < records_stored ? &records[(*pos - 1) % RECORDS] : NULL;
}

static void *violations_next(struct seq_file *m, void *v, loff_t *pos)
{
	++*pos;
	if (*pos - 1 < oldest_kept())
		*pos = oldest_kept() + 1;
	return *pos - 1 < records_stored ? &records[(*pos - 1) % RECORDS] : NULL;
}

static void violations_stop(struct seq_file *m, void *v)
{
	mutex_unlock(&records_lock);
}

static int violations_show(struct seq_file *m, void *v)
{
	const struct ctvm_violation_record *r = v;
	const char *kind;

	if (v == SEQ_START_TOKEN) {
		seq_printf(m, "# records=%llu lost=%llu\n", records_stored,
			   records_lost + oldest_kept());
		return 0;
	}
	kind = r->kind < ARRAY_SIZE(ctvm_violation_kinds) ? ctvm_violation_kinds[r->kind] : "?";
	seq_printf(m, "seq=%llu kind=%s module=%d rip=%#llx target=%#llx action=%s cpu=%u\n",
		   r->sequence, kind, (int)r->module, r->rip, r->target,
		   r->action == 2 ? "deny" : "allow", r->cpu);
	return 0;
}

static const struct seq_operations violations_ops = {
	.start = violations_start,
	.next = violations_next,
	.stop = violations_stop,
	.show = violations_show,
};

static int violations_open(struct inode *inode, struct file *file)
{
	drain();
	return seq_open(file, &violations_ops);
}

static const struct proc_ops violations_proc = {
	.proc_open = violations_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = seq_release,
};

/*
 * /proc/ctvm_event_log: the measured-launch event log as CTVM keeps it now.
 * Linux copies the ACPI log area once, when its TPM driver probes, so
 * binary_bios_measurements ends before the events CTVM measures later: the
 * lock event in PCR 11 above all, which a quote of a protected guest must
 * replay to. Each open takes a fresh copy (the log is public: a quote, not
 * this file, is what a verifier trusts).
 */
#define EVENT_LOG_MAX (64 * 1024)

struct event_log_copy {
	size_t len;
	char data[];
};

static int event_log_open(struct inode *inode, struct file *file)
{
	struct event_log_copy *copy = kvmalloc(sizeof(*copy) + EVENT_LOG_MAX, GFP_KERNEL);
	long total;

	if (!copy)
		return -ENOMEM;
	total = ctvm_call(CTVM_CALL_EVENT_LOG_READ, (unsigned long)copy->data, EVENT_LOG_MAX, 0, 0);
	if (total < 0 || total > EVENT_LOG_MAX) {
		kvfree(copy);
		return total < 0 ? -EIO : -EFBIG;
	}
	copy->len = total;
	file->private_data = copy;
	return 0;
}

static ssize_t event_log_read(struct file *file, char __user *buf, size_t count, loff_t *pos)
{
	struct event_log_copy *copy = file->private_data;

	return simple_read_from_buffer(buf, count, pos, copy->data, copy->len);
}

static int event_log_release(struct inode *inode, struct file *file)
{
	kvfree(file->private_data);
	return 0;
}

static const struct proc_ops event_log_proc = {
	.proc_open = event_log_open,
	.proc_read = event_log_read,
	.proc_lseek = default_llseek,
	.proc_release = event_log_release,
};

/* Where a slab's head struct page holds its kmem_cache (struct slab is
 * private to mm/): found on an object of a cache of our own. 0 if not. */
static u32 slab_cache_offset(void)
{
	struct kmem_cache *probe = kmem_cache_create("ctvm_probe", 64, 0, 0, NULL);
	unsigned long *words;
	void *obj;
	u32 off, found = 0;

	if (!probe)
		return 0;
	obj = kmem_cache_alloc(probe, GFP_KERNEL);
	if (obj) {
		words = (unsigned long *)virt_to_head_page(obj);
		for (off = 8; off + 8 <= sizeof(struct page) && !found; off += 8)
			if (words[off / 8] == (unsigned long)probe)
				found = off;
		kmem_cache_free(probe, obj);
	}
	kmem_cache_destroy(probe);
	return found;
}

static void probe_ctor(void *obj)
{
}

/* Where struct kmem_cache holds its object stride (`size`, just before
 * `object_size`; the structure is private to mm/ since 6.9): found on a
 * cache of our own whose constructor puts the free pointer after each
 * 200-byte object. -1 unless found exactly once. */
static int kmem_cache_size_offset(void)
{
	struct kmem_cache *probe = kmem_cache_create("ctvm_probe_ctor", 200, 8, 0, probe_ctor);
	u32 *words;
	int i, found = -1, seen = 0;

	if (!probe)
		return -1;
	words = (u32 *)probe;
	for (i = 0; i + 1 < 32; i++)
		if (words[i + 1] == 200 && words[i] > 200 && words[i] <= 264 && words[i] % 8 == 0) {
			found = i * 4;
			seen++;
		}
	kmem_cache_destroy(probe);
	return seen == 1 ? found : -1;
}

static void object_field(struct ctvm_kernel_layout *layout, int n, int slot, u32 offset, u32 size)
{
	layout->object_fields[n] = (struct ctvm_object_field){ slot + 1, offset, size, 0 };
}

/* The reference counts in the protected objects that the kernel's inline
 * helpers (get_cred, get_task_struct, get_pid, mmget, mmgrab) change from
 * a module's own code: CTVM lets a module write those fields alone.
 * Caches the kernel merged (cred_jar and pid share one on 6.1) share the
 * fields of both. */
static void shared_object_fields(struct ctvm_kernel_layout *layout)
{
	int size_offset = kmem_cache_size_offset();
	int i;

	if (size_offset < 0) {
		pr_warn("ctvm: no object size found in struct kmem_cache: modules may not take references to kernel objects\n");
		return;
	}
	for (i = 0; i < CTVM_PROTECTED_CACHES; i++)
		if (layout->protected_caches[i])
			layout->protected_strides[i] = *(u32 *)(layout->protected_caches[i] + size_offset);
	object_field(layout, 0, 0, offsetof(struct cred, usage), sizeof_field(struct cred, usage));
	/* get_cred() also clears non_rcu, so that the last put frees through RCU. */
	object_field(layout, 5, 0, offsetof(struct cred, non_rcu), sizeof_field(struct cred, non_rcu));
	object_field(layout, 1, 1, offsetof(struct task_struct, usage), sizeof_field(struct task_struct, usage));
	object_field(layout, 2, 2, offsetof(struct pid, count), sizeof_field(struct pid, count));
	object_field(layout, 3, 7, offsetof(struct mm_struct, mm_users), sizeof_field(struct mm_struct, mm_users));
	object_field(layout, 4, 7, offsetof(struct mm_struct, mm_count), sizeof_field(struct mm_struct, mm_count));
}

/* The image's .data and .bss as the kernel still holds them (its pages
 * stay reserved): pages it gave back after boot are heap, where a task's
 * stack or anyone's object may land. .bss ends with some 2 MiB of it: the
 * unused part of .bss..decrypted, freed at free_initmem(). Protected as
 * kernel data, a module's own stack there would be refused to it. */
static unsigned long image_given_back;

static int image_data(struct ctvm_kernel_layout *layout)
{
	const unsigned long parts[2][2] = { { data_start, data_end }, { bss_start, bss_end } };
	unsigned int slot = 1, i;

	for (i = 0; i < ARRAY_SIZE(parts); i++) {
		unsigned long va, next, run = 0, end = parts[i][1];

		if (!parts[i][0] || end <= parts[i][0])
			continue;
		for (va = parts[i][0]; va < end; va = next) {
			bool held = PageReserved(virt_to_page((void *)va));

			next = min((va & PAGE_MASK) + PAGE_SIZE, end);
			if (held && !run)
				run = va;
			if (!held)
				image_given_back++;
			/* A run ends at a page given back, or at the part's end. */
			if (!run || (held && next < end))
				continue;
			if (slot >= CTVM_SENSITIVE_RANGES) {
				pr_err("ctvm: the kernel's .data and .bss are in more pieces than CTVM takes\n");
				return -E2BIG;
			}
			layout->sensitive[slot++] = (struct ctvm_range){ run, held ? next : va };
			run = 0;
		}
	}
	return 0;
}

/* Each CPU's copy of the kernel's static per-CPU area: its control data
 * (the syscall entry's stack pointer, the TSS, current) is no module's to
 * write, but for the preempt count their inline helpers change. */
static int percpu_areas(struct ctvm_kernel_layout *layout)
{
	unsigned int cpu;

	if (!percpu_end || percpu_end <= percpu_start) {
		pr_err("ctvm: the kernel's per-CPU area was not given (module parameters)\n");
		return -EINVAL;
	}
	layout->percpu = (struct ctvm_range){ percpu_start, percpu_end };
	if (irq_stacks)
		layout->percpu_stacks[0] = (struct ctvm_range){ irq_stacks, irq_stacks + sizeof(struct irq_stack) };
	if (exception_stacks)
		layout->percpu_stacks[1] =
			(struct ctvm_range){ exception_stacks, exception_stacks + sizeof(struct exception_stacks) };
	/* Where each CPU finds those stacks: CTVM reads the tops to know every
	 * CPU's stacks at their own addresses from the lock. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	layout->percpu_stack_tops[0] = (unsigned long)&pcpu_hot.hardirq_stack_ptr;
#else
	layout->percpu_stack_tops[0] = irq_stack_top;
#endif
	layout->percpu_stack_tops[1] = (unsigned long)&cpu_tss_rw.x86_tss.ist;
	if (!layout->percpu_stacks[0].end || !layout->percpu_stacks[1].end || !layout->percpu_stack_tops[0]) {
		pr_err("ctvm: the interrupt and exception stacks were not given (module parameters)\n");
		return -EINVAL;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	layout->percpu_shared = (struct ctvm_range){ (unsigned long)&pcpu_hot.preempt_count,
						     (unsigned long)(&pcpu_hot.preempt_count + 1) };
#else
	layout->percpu_shared = (struct ctvm_range){ (unsigned long)&__preempt_count,
						     (unsigned long)(&__preempt_count + 1) };
#endif
	for_each_possible_cpu(cpu) {
		if (cpu >= CTVM_CPUS_MAX) {
			pr_err("ctvm: more possible CPUs than CTVM can protect (%u)\n", CTVM_CPUS_MAX);
			return -E2BIG;
		}
		layout->percpu_bases[cpu] = per_cpu_offset(cpu);
	}
	return 0;
}

/* The kernel's own objects in its heap: CTVM reads a page's struct page to
 * tell a credential or a task from a module's object. */
static void kernel_objects(struct ctvm_kernel_layout *layout)
{
	u32 offset = slab_cache_offset();
	unsigned long cache;
	int i;

	if (!offset) {
		pr_warn("ctvm: no slab cache field found in struct page: kernel objects not protected\n");
		return;
	}
	layout->page_structs = (unsigned long)vmemmap;
	layout->page_struct_size = sizeof(struct page);
	layout->slab_cache_offset = offset;
	for (i = 0; i < cache_count && i < CTVM_PROTECTED_CACHES; i++)
		if (caches[i] && !get_kernel_nofault(cache, (unsigned long *)caches[i]))
			layout->protected_caches[i] = cache;
	layout->protected_caches[2] = (unsigned long)init_pid_ns.pid_cachep;
	shared_object_fields(layout);
}

/* The kernel's branch thunks: a module's indirect calls and returns go
 * through them, so CTVM judges the branch, not the thunk. */
static void branch_thunks(struct ctvm_kernel_layout *layout)
{
	int i, n = 0;

/* CONFIG_MITIGATION_* since 6.9. */
#if defined(CONFIG_RETPOLINE) || defined(CONFIG_MITIGATION_RETPOLINE)
#define THUNK(i, reg) layout->indirect_thunks[i] = (unsigned long)__x86_indirect_thunk_##reg
	THUNK(0, rax); THUNK(1, rcx); THUNK(2, rdx); THUNK(3, rbx);
	THUNK(4, rsp); THUNK(5, rbp); THUNK(6, rsi); THUNK(7, rdi);
	THUNK(8, r8); THUNK(9, r9); THUNK(10, r10); THUNK(11, r11);
	THUNK(12, r12); THUNK(13, r13); THUNK(14, r14); THUNK(15, r15);
#undef THUNK
#endif
#if defined(CONFIG_RETHUNK) || defined(CONFIG_MITIGATION_RETHUNK)
	layout->return_thunks[n++] = (unsigned long)__x86_return_thunk;
#endif
	for (i = 0; i < return_thunk_count && n < CTVM_RETURN_THUNKS; i++)
		layout->return_thunks[n++] = return_thunks[i];
}

/* Each new task's stack, reported the moment the kernel made it (the
 * task_newtask tracepoint fires in copy_process, before the task is on any
 * list a module could find it by): CTVM knows its pages as a stack's from
 * then on, not only from its next walk of the kernel's tables, so a module
 * cannot write a young task's frames through the direct map. */
static struct tracepoint *task_newtask;

static void new_task(void *data, struct task_struct *task, unsigned long clone_flags)
{
	ctvm_call(CTVM_CALL_STACK_NEW, (unsigned long)task_stack_page(task), 0, 0, 0);
}

static void find_task_newtask(struct tracepoint *tp, void *priv)
{
	if (!strcmp(tp->name, "task_newtask"))
		task_newtask = tp;
}

static int watch_new_tasks(void)
{
	for_each_kernel_tracepoint(find_task_newtask, NULL);
	if (!task_newtask) {
		pr_err("ctvm: no task_newtask tracepoint: new tasks' stacks cannot be reported\n");
		return -ENOENT;
	}
	return tracepoint_probe_register(task_newtask, new_task, NULL);
}

/* Only if the agent fails to start: the probe must be gone, on every CPU,
 * before the agent's code is. */
static void stop_watching_new_tasks(void)
{
	tracepoint_probe_unregister(task_newtask, new_task, NULL);
	tracepoint_synchronize_unregister();
}

/* The durable vTPM's store channel (/dev/ctvm_vtpm_store), kept apart. */
#include "ctvm_vtpm_store.c"

static int __init ctvm_agent_init(void)
{
	struct ctvm_kernel_layout *layout;
	unsigned long version;
	long ret, caps;

	if (!ctvm_present()) {
		pr_err("ctvm: not running under CTVM\n");
		return -ENODEV;
	}
	asm volatile("vmcall" : "=a"(ret), "=b"(version), "=c"(caps) : "a"(CTVM_CALL_VERSION) : "rdx", "memory");
	if (ret != 0 || version >> 16 != CTVM_ABI_VERSION >> 16) {
		pr_err("ctvm: the hypervisor speaks ABI %#lx, the agent %#x\n", version, CTVM_ABI_VERSION);
		return -EPROTO;
	}
	if (!(caps & CTVM_CAP_INTEGRITY)) {
		/* A guest without integrity views may still need its vTPM store. */
		if (ctvm_vtpm_store_register(caps) == 0) {
			if (caps & CTVM_CAP_EVENT_LOG)
				proc_create("ctvm_event_log", 0400, NULL, &event_log_proc);
			__module_get(THIS_MODULE);
			pr_info("ctvm: agent ready; vTPM store only (no integrity views for this guest)\n");
			return 0;
		}
		pr_err("ctvm: the hypervisor offers no integrity views for this guest\n");
		return -EOPNOTSUPP;
	}
	if (!text_start || !text_end || !syscall_table || !idt || !syscall_entry) {
		pr_err("ctvm: kernel addresses missing (module parameters)\n");
		return -EINVAL;
	}
	layout = kzalloc(sizeof(*layout), GFP_KERNEL);
	if (!layout)
		return -ENOMEM;
	layout->version = CTVM_STRUCT_VERSION;
	layout->size = sizeof(*layout);
	layout->text = (struct ctvm_range){ text_start, text_end };
	layout->rodata = (struct ctvm_range){ rodata_start, rodata_end };
	layout->ro_after_init = (struct ctvm_range){ ro_after_init_start, ro_after_init_end };
	layout->syscall_table = (struct ctvm_range){ syscall_table, syscall_table + 8 * 512 };
	layout->idt = (struct ctvm_range){ idt, idt + 4096 };
	layout->entry_syscall = syscall_entry;
	layout->ksymtab = (struct ctvm_range){ ksymtab_start, ksymtab_end };
	layout->ksymtab_gpl = (struct ctvm_range){ ksymtab_gpl_start, ksymtab_gpl_end };
	layout->poke_routines[0] = (struct ctvm_range){ poke_start, poke_end };
	if (module_list)
		layout->sensitive[0] = (struct ctvm_range){ module_list, module_list + 16 };
	ret = image_data(layout);
	if (!ret)
		ret = percpu_areas(layout);
	kernel_objects(layout);
	if (ret) {
		kfree(layout);
		return ret;
	}
	/* Reference counts the kernel's inline get_net()/put_net() change from
	 * module code (veth drops its hold on init_net): each module may write
	 * these fields, and nothing beside them. */
	layout->shared[0] = (struct ctvm_range){ (unsigned long)&init_net.ns.count,
						 (unsigned long)(&init_net.ns.count + 1) };
	layout->shared[1] = (struct ctvm_range){ (unsigned long)&init_net.passive,
						 (unsigned long)(&init_net.passive + 1) };
	layout->kernel_page_table = page_table;
	/* Each process's page tables, which modules must not edit: listed
	 * through their struct page (6.x's ptdesc.pt_list overlays lru). */
	if (pgd_list_address && layout->page_structs) {
		layout->pgd_list = pgd_list_address;
		layout->pgd_link_offset = offsetof(struct page, lru);
		layout->pgd_pages = 1 << PGD_ALLOCATION_ORDER;
		/* A process's PTE and PMD pages are typed as page tables in
		 * their struct page from the moment they are made. */
		layout->page_type_offset = offsetof(struct page, page_type);
#ifdef PG_table
		layout->page_table_mask = PAGE_TYPE_BASE | PG_table;
		layout->page_table_value = PAGE_TYPE_BASE;
		layout->pgd_owner_offset = offsetof(struct page, pt_mm);
#else
		layout->page_table_mask = 0xff000000;
		layout->page_table_value = (u32)PGTY_table << 24;
		layout->pgd_owner_offset = offsetof(struct ptdesc, pt_mm);
#endif
		/* A new process's top-level table is untyped, but its struct
		 * page names its mm_struct from the moment it is listed. */
	} else {
		pr_warn("ctvm: no pgd_list: processes' page tables not protected\n");
	}
	branch_thunks(layout);
	/* Reported from now on; until the lock, CTVM refuses them and they do
	 * not load: nothing loads unisolated while the agent starts. */
	ret = register_module_notifier(&module_nb);
	if (ret) {
		kfree(layout);
		return ret;
	}
	/* From before the lock's walk on: no task falls between the two. */
	ret = watch_new_tasks();
	if (ret) {
		kfree(layout);
		unregister_module_notifier(&module_nb);
		return ret;
	}
	/* The probe list the kernel calls new_task through is a heap object:
	 * CTVM keeps modules from writing it (else one would take the probe
	 * out, or have every fork call a function of its choosing). */
	layout->probe_lists[0] = (unsigned long)&task_newtask->funcs;
	ret = ctvm_call(CTVM_CALL_KERNEL_REGISTER, (unsigned long)layout, sizeof(*layout), 0, 0);
	kfree(layout);
	if (ret < 0) {
		pr_err("ctvm: kernel layout refused (%ld)\n", ret);
		stop_watching_new_tasks();
		unregister_module_notifier(&module_nb);
		return -EPERM;
	}
	/* The lock pins the agent: CTVM checks its code against ctvm.policy,
	 * and takes the integrity calls from its code alone from now on. */
	ret = report_module(CTVM_CALL_KERNEL_LOCK, THIS_MODULE);
	if (ret < 0) {
		pr_err("ctvm: lock refused (%ld)\n", ret);
		stop_watching_new_tasks();
		unregister_module_notifier(&module_nb);
		return -EPERM;
	}
	track(THIS_MODULE, ret);
	proc_create("ctvm_violations", 0400, NULL, &violations_proc);
	if (caps & CTVM_CAP_EVENT_LOG)
		proc_create("ctvm_event_log", 0400, NULL, &event_log_proc);
	schedule_delayed_work(&drainer, HZ);
	/* The agent must not go away: hold a reference forever. */
	__module_get(THIS_MODULE);
	ctvm_vtpm_store_register(caps);
	pr_info("ctvm: agent ready; kernel layout locked\n");
	if (image_given_back)
		pr_info("ctvm: %lu pages of the kernel's .data and .bss given back after boot: heap, not image\n",
			image_given_back);
	return 0;
}

module_init(ctvm_agent_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("CTVM guest agent: reports the kernel layout and modules to the hypervisor");
