// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: write kernel frames on the kernel's stacks. A module runs on the
 * kernel's stack, below the frames of the kernel code that called it; a
 * return address there steers the kernel's view where no crossing is
 * judged (return-oriented code with the kernel's rights).
 *  1. The caller's frames: the second kernel-text word above this
 *     function's frame is do_one_initcall's return address (the first is
 *     init's own, into do_one_initcall).
 *  2. Another task's stack: a return address on the stack of the shell
 *     that runs insmod, asleep in wait4.
 * Each write flips a bit, reads back, and puts the word back.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task_stack.h>
#include "alias.h"

static unsigned long text_lo, text_hi;
module_param(text_lo, ulong, 0400);
module_param(text_hi, ulong, 0400);

static bool is_text(unsigned long v)
{
	return v >= text_lo && v < text_hi;
}

/* Flips a bit of *slot and puts it back: whether the flip was seen. */
static const char *flip(unsigned long *slot)
{
	unsigned long old = READ_ONCE(*slot);
	bool changed;

	WRITE_ONCE(*slot, old ^ 0x10);
	changed = READ_ONCE(*slot) != old;
	WRITE_ONCE(*slot, old);
	return changed ? "WENT THROUGH" : "blocked";
}

static noinline const char *callers_frame(void)
{
	unsigned long *p = (unsigned long *)current_stack_pointer;
	int seen = 0, i;

	for (i = 0; i < 256; i++)
		if (is_text(p[i]) && ++seen == 2)
			return flip(&p[i]);
	return "not found";
}

static noinline const char *parents_stack(void)
{
	struct task_struct *parent = READ_ONCE(current->real_parent);
	unsigned long *bottom = task_stack_page(parent);
	unsigned long *top = bottom + THREAD_SIZE / sizeof(long);
	unsigned long *p;

	/* The deepest return address the sleeping task's frames hold. */
	for (p = bottom + 8; p < top; p++)
		if (is_text(READ_ONCE(*p)))
			return flip(p);
	return "not found";
}

static int __init atk_init(void)
{
	const char *caller, *parent;

	if (!text_lo || !text_hi)
		return -EINVAL;
	caller = callers_frame();
	parent = parents_stack();
	report("caller's return address write %s, sleeping parent's stack write %s", caller, parent);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
