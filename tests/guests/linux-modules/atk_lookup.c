// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: look a kernel symbol up (__symbol_get, in the denied
 * module-loading group) and use the answer as a pointer, checking only for
 * NULL, as callers of lookups do. A refusal must not hand back an error
 * code this turns into a wild pointer.
 */
#include <linux/module.h>
#include "alias.h"

static int __init atk_init(void)
{
	unsigned long *p = __symbol_get("jiffies");

	if (p) {
		report("symbol lookup WENT THROUGH (%lu)", READ_ONCE(*p));
		return -EACCES;
	}
	report("symbol lookup refused: NULL");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
