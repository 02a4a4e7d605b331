// SPDX-License-Identifier: GPL-2.0
/* Attack: make the agent's own code issue the integrity hypercalls for the
 * module, by calling its (not exported) VMCALL routine: drain the violation
 * log to blind it, then unregister the agent itself. */
#include <linux/module.h>
#include "alias.h"

static unsigned long ctvm_call;
module_param(ctvm_call, ulong, 0400);

static u8 records[64 * 40];

static int __init atk_init(void)
{
	long (*call)(unsigned long, unsigned long, unsigned long, unsigned long, unsigned long) = (void *)ctvm_call;
	long drained, unregistered;

	if (!ctvm_call)
		return -EINVAL;
	drained = call(0x15, (unsigned long)records, 64, 0, 0);
	unregistered = call(0x14, 1, 0, 0, 0);
	report("agent call %s (drain %ld, unregister %ld)",
	       drained < 0 && unregistered < 0 ? "blocked" : "WENT THROUGH", drained, unregistered);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
