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
 * Each word is written twice: through the stack's own (vmalloc) address,
 * then through the direct map, another linear address of the same
 * physical page, which no stack check by linear address sees.
 * Each write flips a bit, reads back, and puts the word back.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task_stack.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
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

/* The same word through the direct map, NULL if the stack is not vmalloc'd. */
static unsigned long *direct_map_alias(unsigned long *p)
{
	struct page *page = is_vmalloc_addr(p) ? vmalloc_to_page(p) : NULL;

	return page ? (unsigned long *)((char *)page_address(page) + offset_in_page(p)) : NULL;
}

/* Flips *slot through its own address, then through the direct map. */
static void flip_both(unsigned long *slot, const char **own, const char **alias)
{
	unsigned long *other = direct_map_alias(slot);

	*own = flip(slot);
	*alias = other ? flip(other) : "not found";
}

static noinline void callers_frame(const char **own, const char **alias)
{
	unsigned long *p = (unsigned long *)current_stack_pointer;
	int seen = 0, i;

	for (i = 0; i < 256; i++)
		if (is_text(p[i]) && ++seen == 2)
			return flip_both(&p[i], own, alias);
}

static noinline void parents_stack(const char **own, const char **alias)
{
	struct task_struct *parent = READ_ONCE(current->real_parent);
	unsigned long *bottom = task_stack_page(parent);
	unsigned long *top = bottom + THREAD_SIZE / sizeof(long);
	unsigned long *p;

	/* The deepest return address the sleeping task's frames hold. */
	for (p = bottom + 8; p < top; p++)
		if (is_text(READ_ONCE(*p)))
			return flip_both(p, own, alias);
}

static int __init atk_init(void)
{
	const char *caller = "not found", *caller_alias = "not found";
	const char *parent = "not found", *parent_alias = "not found";

	if (!text_lo || !text_hi)
		return -EINVAL;
	callers_frame(&caller, &caller_alias);
	parents_stack(&parent, &parent_alias);
	report("caller's return address write %s (direct map %s), sleeping parent's stack write %s (direct map %s)",
	       caller, caller_alias, parent, parent_alias);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
