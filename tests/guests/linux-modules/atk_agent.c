// SPDX-License-Identifier: GPL-2.0
/* Attack: write into the agent's own data, through a vmap alias. */
#include <linux/module.h>
#include "alias.h"

static unsigned long target;
module_param(target, ulong, 0400);

static int __init atk_init(void)
{
	u64 zero = 0;
	int r = alias_write(target, &zero, sizeof(zero));

	report("agent data write %s", r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
