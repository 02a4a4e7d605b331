// SPDX-License-Identifier: GPL-2.0
/*
 * Benign peer of the race scenario, loaded and unloaded in a loop on CPU 0:
 * calls exported kernel functions, and tells atk_race (on the other CPU)
 * where its data is: the address of `secret`, a variable on a page of its
 * own data (granted to its view when it writes it), the address of a point
 * inside one of its functions, and a generation count, in the heap page
 * `page`. At unload it clears those addresses first, then checks that
 * `secret` is intact.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/string.h>
#include "alias.h"

static unsigned long page;
module_param(page, ulong, 0400);
static int loops = 50;
module_param(loops, int, 0400);

#define SECRET 0x5ec2e75ec2e7UL
static unsigned long secret;

static noinline long peer_work(void)
{
	return READ_ONCE(secret) == SECRET ? 0x5eed : 0;
}

static int __init peer_init(void)
{
	char buf[16];
	int i, bad = 0, v;

	WRITE_ONCE(secret, SECRET);
	for (i = 0; i < loops; i++) {
		snprintf(buf, sizeof(buf), "%d", i);
		if (kstrtoint(buf, 10, &v) || v != i)
			bad++;
	}
	if (page) {
		WRITE_ONCE(*(unsigned long *)(page + 8), (unsigned long)&secret);
		/* Not a function's start: no entry of this module. */
		WRITE_ONCE(*(unsigned long *)(page + 16), (unsigned long)peer_work + 1);
		WRITE_ONCE(*(u32 *)(page + 64), READ_ONCE(*(u32 *)(page + 64)) + 1);
	}
	report("%d rounds, %d wrong, on CPU %d, generation %u, work %lx", loops, bad, raw_smp_processor_id(),
	       page ? *(u32 *)(page + 64) : 0, peer_work());
	return 0;
}

static void __exit peer_exit(void)
{
	if (page) {
		WRITE_ONCE(*(unsigned long *)(page + 8), 0);
		WRITE_ONCE(*(unsigned long *)(page + 16), 0);
	}
	report("unloading on CPU %d: secret %s", raw_smp_processor_id(),
	       READ_ONCE(secret) == SECRET ? "intact" : "CHANGED");
}
module_init(peer_init);
module_exit(peer_exit);
MODULE_LICENSE("GPL");
