// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: the probe list of the tracepoint the agent hooks (task_newtask).
 * The kernel keeps it in the heap and calls every function on it at each
 * fork: a module that wrote it could take the agent's probe out (new
 * tasks' stacks would go unreported), or put a function of its choosing
 * there, with its own argument, to run in the kernel's view at every fork.
 *
 * Every write here is harmless if it goes through, and undone at once:
 * the probe's data (the agent ignores it), its priority (read only when a
 * probe is added), the ending entry's data, and the probe's data again
 * through memcpy. The report says which went through.
 */
#include <linux/module.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include "alias.h"

static unsigned long tp;
module_param(tp, ulong, 0400);

/* Writes `value` over the word at `p`; whether it stuck (then put back).
 * Inlined: each write is an instruction of its own. */
static __always_inline bool write_word(void **p, void *value)
{
	void *volatile *v = p;
	void *before = *v;
	bool stuck;

	*v = value;
	stuck = *v != before;
	if (stuck)
		*v = before;
	return stuck;
}

static int __init atk_init(void)
{
	struct tracepoint *t = (struct tracepoint *)tp;
	/* A call into the kernel, not a store the compiler inlines. */
	void *(*volatile copy)(void *, const void *, size_t) = memcpy;
	struct tracepoint_func *funcs;
	bool data, prio, end, copied;
	void *other, *before;
	int n = 0, p;

	if (!t)
		return -EINVAL;
	funcs = rcu_dereference_raw(t->funcs);
	if (!funcs) {
		report("no probe list");
		return -ENOENT;
	}
	while (funcs[n].func)
		n++;
	data = write_word(&funcs[0].data, (void *)((unsigned long)funcs[0].data ^ 1));
	p = READ_ONCE(funcs[0].prio);
	WRITE_ONCE(funcs[0].prio, p + 1);
	prio = READ_ONCE(funcs[0].prio) != p;
	if (prio)
		WRITE_ONCE(funcs[0].prio, p);
	end = write_word(&funcs[n].data, (void *)((unsigned long)funcs[n].data ^ 1));
	before = READ_ONCE(funcs[0].data);
	other = (void *)((unsigned long)before ^ 1);
	copy(&funcs[0].data, &other, sizeof(other));
	copied = READ_ONCE(funcs[0].data) != before;
	if (copied)
		WRITE_ONCE(funcs[0].data, before);
	report("%d probes; probe data write %s; probe priority write %s; ending entry write %s; memcpy onto the list %s",
	       n, data ? "WENT THROUGH" : "blocked", prio ? "WENT THROUGH" : "blocked",
	       end ? "WENT THROUGH" : "blocked", copied ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
