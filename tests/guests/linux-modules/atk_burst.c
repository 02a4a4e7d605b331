// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a burst of refused writes (a module hammering the syscall table),
 * to show that no violation record is lost and that the console stays
 * readable: every refused write is a record in /proc/ctvm_violations, while
 * the console shows the first and then every 10th, 100th, ... repeat.
 */
#include <linux/module.h>
#include <linux/syscalls.h>
#include "alias.h"

static unsigned long table;
module_param(table, ulong, 0400);
static unsigned int count = 1500;
module_param(count, uint, 0400);

static long hooked_getpid(const struct pt_regs *regs)
{
	return 4242;
}

static int __init atk_init(void)
{
	unsigned long target = (unsigned long)((unsigned long *)table + __NR_getpid);
	unsigned long hook = (unsigned long)hooked_getpid;
	/* A writable alias of the table's page: only EPT stands in the way. */
	struct page *page = virt_to_page(lm_alias((void *)target));
	void *alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	unsigned long *entry;
	unsigned int i, changed = 0;

	if (!alias)
		return -ENOMEM;
	entry = alias + (target & ~PAGE_MASK);
	for (i = 0; i < count; i++) {
		WRITE_ONCE(*entry, hook);
		barrier();
		changed += READ_ONCE(*(unsigned long *)target) == hook;
	}
	vunmap(alias);
	report("burst of %u syscall table writes: %s", count, changed ? "WENT THROUGH" : "all blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
