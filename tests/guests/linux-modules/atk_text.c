// SPDX-License-Identifier: GPL-2.0
/* Attack: patch the first bytes of an exported function (msleep) with an
 * int3, through a vmap alias of the same physical page. */
#include <linux/module.h>
#include <linux/delay.h>
#include "alias.h"

static int __init atk_init(void)
{
	u8 int3 = 0xcc;
	int r = alias_write((unsigned long)msleep, &int3, 1);

	report("kernel text write %s", r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
