// SPDX-License-Identifier: GPL-2.0
/* Benign: calls exported kernel functions in a loop and checks every result;
 * each call crosses from the module's view into the kernel's and back. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/string.h>
#include <linux/ktime.h>
#include "alias.h"

static int loops = 1000;
module_param(loops, int, 0400);

static int __init calls_init(void)
{
	char buf[32];
	int i, bad = 0, v;
	u64 start = ktime_get_ns(), ns;

	for (i = 0; i < loops; i++) {
		snprintf(buf, sizeof(buf), "%d", i);
		if (kstrtoint(buf, 10, &v) || v != i || strlen(buf) != (i < 10 ? 1 : i < 100 ? 2 : i < 1000 ? 3 : 4))
			bad++;
	}
	ns = ktime_get_ns() - start;
	report("%d rounds of snprintf/kstrtoint/strlen, %d wrong, %llu ns per round", loops, bad, ns / loops);
	return 0;
}

static void __exit calls_exit(void)
{
}
module_init(calls_init);
module_exit(calls_exit);
MODULE_LICENSE("GPL");
