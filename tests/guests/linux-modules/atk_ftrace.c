// SPDX-License-Identifier: GPL-2.0
/* Attack: hook a syscall through the ftrace API with IPMODIFY. */
#include <linux/module.h>
#include <linux/ftrace.h>
#include "alias.h"

static unsigned long target;
module_param(target, ulong, 0400);

static void notrace hook(unsigned long ip, unsigned long parent, struct ftrace_ops *op, struct ftrace_regs *regs)
{
}

static struct ftrace_ops ops = {
	.func = hook,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY,
};

static int __init atk_init(void)
{
	int f = ftrace_set_filter_ip(&ops, target, 0, 0);
	int r = f ? f : register_ftrace_function(&ops);

	report("ftrace hook %s (%d)", r == 0 ? "WENT THROUGH" : "blocked", r);
	if (r == 0)
		unregister_ftrace_function(&ops);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
