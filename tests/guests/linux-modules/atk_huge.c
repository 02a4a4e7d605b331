// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a module too big for CTVM to track (a data section over the 64 MiB
 * a range may span), hoping to run unisolated in the kernel's view when its
 * registration fails. It must not load at all.
 */
#include <linux/module.h>
#include "alias.h"

static char ballast[65 << 20] __used;

static int __init atk_init(void)
{
	WRITE_ONCE(ballast[sizeof(ballast) - 1], 1);
	report("loaded UNISOLATED WENT THROUGH (%d)", READ_ONCE(ballast[0]));
	return 0;
}

static void __exit atk_exit(void)
{
}

module_init(atk_init);
module_exit(atk_exit);
MODULE_LICENSE("GPL");
