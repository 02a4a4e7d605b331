// SPDX-License-Identifier: GPL-2.0
/* Attack: an ftrace direct call, which makes a kernel function's fentry
 * site call the module's trampoline (what BPF trampolines use). */
#include <linux/module.h>
#include <linux/ftrace.h>
#include <linux/version.h>
#include "alias.h"

static unsigned long target;
module_param(target, ulong, 0400);

/* Returns straight away: were the hook placed, the function would run on. */
static noinline notrace void trampoline(void)
{
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
static struct ftrace_ops ops;
#endif

static int __init atk_init(void)
{
	int r;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
	r = ftrace_set_filter_ip(&ops, target, 0, 0);
	r = register_ftrace_direct(&ops, (unsigned long)trampoline);
	if (r == 0)
		unregister_ftrace_direct(&ops, (unsigned long)trampoline, true);
#else
	r = register_ftrace_direct(target, (unsigned long)trampoline);
	if (r == 0)
		unregister_ftrace_direct(target, (unsigned long)trampoline);
#endif
	report("ftrace direct hook %s (%d)", r == 0 ? "WENT THROUGH" : "blocked", r);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
