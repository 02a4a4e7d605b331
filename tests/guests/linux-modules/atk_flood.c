// SPDX-License-Identifier: GPL-2.0
/*
 * A flood of violations that change nothing: `count` writes of a byte of
 * kernel data (modprobe_path) with the value it already holds. In audit
 * mode each is reported and let through, so this is the load audit mode
 * must carry: every record kept, the console readable, the guest on time.
 */
#include <linux/module.h>
#include "alias.h"

static unsigned long target;
module_param(target, ulong, 0400);
static unsigned int count = 1500;
module_param(count, uint, 0400);

static int __init atk_init(void)
{
	volatile u8 *p = (volatile u8 *)target;
	u8 value;
	unsigned int i;

	if (!target)
		return -EINVAL;
	value = *p;
	for (i = 0; i < count; i++)
		*p = value;
	report("flood of %u same-value writes done, byte %s", count, *p == value ? "unchanged" : "CHANGED");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
