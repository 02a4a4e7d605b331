// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: look kernel symbols up and use the answers as pointers, checking
 * only for NULL, as callers of lookups do: once through __symbol_get (an
 * export in the denied module-loading group), once through
 * kallsyms_lookup_name, which 6.x no longer exports and rootkits find
 * through a kprobe (here its address comes from kallsyms). A refusal must
 * not hand back an error code either check lets through as an address.
 */
#include <linux/module.h>
#include "alias.h"

static unsigned long kln;
module_param(kln, ulong, 0400);

static int __init atk_init(void)
{
	unsigned long (*lookup)(const char *name) = (void *)kln;
	unsigned long *p = __symbol_get("jiffies");
	unsigned long *table;

	if (p) {
		report("symbol lookup WENT THROUGH (%lu)", READ_ONCE(*p));
		return -EACCES;
	}
	if (!lookup)
		return -EINVAL;
	table = (unsigned long *)lookup("sys_call_table");
	if (table) {
		report("kallsyms_lookup_name WENT THROUGH (%lx)", READ_ONCE(table[0]));
		return -EACCES;
	}
	report("symbol lookup refused: NULL, kallsyms_lookup_name refused: 0");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
