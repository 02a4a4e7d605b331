// SPDX-License-Identifier: GPL-2.0
/* Attack: make rodata writable with set_memory_rw, then write to it. */
#include <linux/module.h>
#include <linux/uaccess.h>
#include <linux/set_memory.h>
#include "alias.h"

static unsigned long rodata, set_memory_rw_addr;
module_param(rodata, ulong, 0400);
/* set_memory_rw is not exported in 6.1: a rootkit finds it through kallsyms. */
module_param(set_memory_rw_addr, ulong, 0400);

static int __init atk_init(void)
{
	int (*set_rw)(unsigned long, int) = (void *)set_memory_rw_addr;
	int s = set_rw(rodata & PAGE_MASK, 1);
	long r = nofault_write(rodata, 'X');

	report("set_memory_rw returned %d; rodata write %s", s, r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
