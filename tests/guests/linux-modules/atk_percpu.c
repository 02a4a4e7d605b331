// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: the kernel's per-CPU control data. Per-CPU variables live in the
 * per-CPU area, not in the image's .data, and each CPU reads its own
 * through GS. Among them: the stack pointer the syscall entry loads (6.1:
 * cpu_current_top_of_stack; 6.2+: pcpu_hot.top_of_stack), and the TSS the
 * CPU takes its interrupt stacks from (cpu_tss_rw's IST entries). Pointed
 * at memory the module writes, the kernel's next frames land there, with
 * their return addresses: the module then steers the kernel's own code.
 *
 * Each word is changed and, if the change took, put back, with interrupts
 * off so that no entry on this CPU uses the changed value.
 */
#include <linux/module.h>
#include <linux/version.h>
#include <linux/irqflags.h>
#include <asm/processor.h>
#include <asm/current.h>
#include "alias.h"

/* 6.1's cpu_current_top_of_stack (a per-CPU offset from /proc/kallsyms). */
static unsigned long top;
module_param(top, ulong, 0400);

static unsigned long *entry_stack_pointer(void)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	return &this_cpu_ptr(&pcpu_hot)->top_of_stack;
#else
	return top ? this_cpu_ptr((unsigned long __percpu *)top) : NULL;
#endif
}

static unsigned long *double_fault_stack_pointer(void)
{
	struct tss_struct *tss = this_cpu_ptr(&cpu_tss_rw);

	return (unsigned long *)((char *)&tss->x86_tss + offsetof(struct x86_hw_tss, ist) +
				 IST_INDEX_DF * sizeof(u64));
}

/* Whether a write of another value to *p took. */
static bool flip(unsigned long *p)
{
	volatile unsigned long *v = p;
	unsigned long before = *v;
	bool took;

	*v = before ^ 0x1000;
	took = *v != before;
	if (took)
		*v = before;
	return took;
}

static int __init atk_init(void)
{
	unsigned long flags, *entry;
	bool e, d;

	local_irq_save(flags);
	entry = entry_stack_pointer();
	e = entry && flip(entry);
	d = flip(double_fault_stack_pointer());
	local_irq_restore(flags);
	if (!entry)
		return -EINVAL;
	report("syscall entry stack pointer write %s, double-fault stack pointer write %s",
	       e ? "WENT THROUGH" : "blocked", d ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
