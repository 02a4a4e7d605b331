// SPDX-License-Identifier: GPL-2.0
/* Attack: attach a probe to a kernel tracepoint: the module's code then
 * runs on every exec (process hiding and credential theft start there). */
#include <linux/module.h>
#include <linux/tracepoint.h>
#include "alias.h"

static unsigned long tp;
module_param(tp, ulong, 0400);

static void probe(void *data)
{
}

static int __init atk_init(void)
{
	int r = tracepoint_probe_register((struct tracepoint *)tp, probe, NULL);

	report("tracepoint probe %s (%d)", r == 0 ? "WENT THROUGH" : "blocked", r);
	if (r == 0)
		tracepoint_probe_unregister((struct tracepoint *)tp, probe, NULL);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
