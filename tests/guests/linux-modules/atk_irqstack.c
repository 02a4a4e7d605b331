// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: the interrupt and exception stacks. Each CPU takes its hardware
 * interrupts on a stack of its own (vmap'd from irq_stack_backing_store)
 * and its NMIs, double faults, debug and machine-check exceptions on
 * stacks the TSS names (mapped in the CPU entry area). None is a task's,
 * so no walk of the tasks finds them. While another CPU is in the middle
 * of an interrupt, a module that writes a return address on that CPU's
 * interrupt stack takes the kernel's control flow wherever it likes when
 * the handler returns; on this CPU, the NMI stack also keeps the state of
 * NMI nesting between NMIs.
 *
 * This CPU's stacks stand in for the others' (a module's code reaches them
 * the same way): a word low on each is changed through the stack's own
 * address, and through the direct map's address of its page, with
 * interrupts off, and put back if the change took.
 */
#include <linux/module.h>
#include <linux/version.h>
#include <linux/irqflags.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <asm/processor.h>
#include "alias.h"

/* 6.1's hardirq_stack_ptr (a per-CPU offset from /proc/kallsyms). */
static unsigned long irq_ptr;
module_param(irq_ptr, ulong, 0400);

/* The top (its last word) of this CPU's interrupt stack. */
static unsigned long irq_stack_top(void)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	return (unsigned long)this_cpu_read(pcpu_hot.hardirq_stack_ptr);
#else
	return irq_ptr ? *this_cpu_ptr((unsigned long __percpu *)irq_ptr) : 0;
#endif
}

/* The top of this CPU's NMI stack, from its TSS. */
static unsigned long nmi_stack_top(void)
{
	return this_cpu_ptr(&cpu_tss_rw)->x86_tss.ist[IST_INDEX_NMI];
}

/* The direct map's address of the byte at vmap'd (or CPU entry area)
 * address `va`, through the kernel's own tables. */
static unsigned long *direct(unsigned long va)
{
	struct page *page = vmalloc_to_page((void *)va);

	return page ? page_address(page) + offset_in_page(va) : NULL;
}

/* Whether a write of another value through `through` changed *at. */
static bool flip(volatile unsigned long *at, volatile unsigned long *through)
{
	unsigned long before = *at;
	bool took;

	*through = before ^ 0x10;
	took = *at != before;
	if (took)
		*at = before;
	return took;
}

static const char *said(bool took)
{
	return took ? "WENT THROUGH" : "blocked";
}

static int __init atk_init(void)
{
	unsigned long flags, irq_top, nmi_top, *irq_word, *nmi_word, *irq_alias, *nmi_alias;
	bool irq, irq_direct, nmi, nmi_direct;

	irq_top = irq_stack_top();
	nmi_top = nmi_stack_top();
	if (!irq_top || !nmi_top)
		return -EINVAL;
	/* Low on each stack, where only a deep call chain's frames reach. */
	irq_word = (unsigned long *)((irq_top & PAGE_MASK) - 3 * PAGE_SIZE + 0x100);
	nmi_word = (unsigned long *)((nmi_top - 1) & PAGE_MASK) + 0x20;
	irq_alias = direct((unsigned long)irq_word);
	nmi_alias = direct((unsigned long)nmi_word);
	if (!irq_alias || !nmi_alias)
		return -EINVAL;
	local_irq_save(flags);
	irq = flip(irq_word, irq_word);
	irq_direct = flip(irq_word, irq_alias);
	nmi = flip(nmi_word, nmi_word);
	nmi_direct = flip(nmi_word, nmi_alias);
	local_irq_restore(flags);
	report("interrupt stack write %s, through the direct map %s; NMI stack write %s, through the direct map %s",
	       said(irq), said(irq_direct), said(nmi), said(nmi_direct));
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
