// SPDX-License-Identifier: GPL-2.0
/* Attack: call a kernel function that is not exported (a syscall handler),
 * and jump into the middle of an exported one. */
#include <linux/module.h>
#include <linux/delay.h>
#include "alias.h"

static unsigned long hidden;
module_param(hidden, ulong, 0400);

static int __init atk_init(void)
{
	long (*fn)(const struct pt_regs *) = (void *)hidden;
	long (*mid)(unsigned int) = (void *)((unsigned long)msleep_interruptible + 4);
	long r = fn(NULL);
	long m = mid(1);

	report("non-exported call returned %ld; mid-function call returned %ld", r, m);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
