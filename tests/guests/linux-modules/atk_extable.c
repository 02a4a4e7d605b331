// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a jump to a kernel instruction that has an exception-table
 * entry. CTVM refuses the jump (no module return address on the stack: no
 * call) with a #GP. Were the #GP raised at the target, the kernel's handler
 * would find the entry and resume at its fixup, in the kernel's view:
 * kernel code run from mid-function with the module's registers and stack,
 * no crossing judged. The target is the user load in __get_user_1, whose
 * fixup returns -EFAULT to the word on top of the stack: here `complete`,
 * with RDI = a completion of this module's, so the kernel would complete
 * it for the module (and return into this module's code, refused).
 *
 * The attack runs in a kernel thread of its own: the refused jump must
 * fault there, in this module's code (an oops, the thread dies, the kernel
 * runs on); the init routine reports whether the completion came.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/sched/task.h>
#include <asm/nospec-branch.h>
#include "alias.h"

static unsigned long table_start, table_end, fn, fn_end;
module_param(table_start, ulong, 0400);
module_param(table_end, ulong, 0400);
module_param(fn, ulong, 0400);
module_param(fn_end, ulong, 0400);

/* x86-64's exception-table entry: offsets from each field itself. */
struct entry {
	int insn, fixup, data;
};

static unsigned long target;
static DECLARE_COMPLETION(done);

/* The first instruction of [fn, fn_end) the kernel's exception table names. */
static unsigned long find_target(void)
{
	const struct entry *e;

	for (e = (const struct entry *)table_start; (unsigned long)(e + 1) <= table_end; e++) {
		unsigned long insn = (unsigned long)&e->insn + e->insn;

		if (insn >= fn && insn < fn_end)
			return insn;
	}
	return 0;
}

static int attack(void *unused)
{
	/* complete(&done) when the fixup returns, then back here (refused). */
	asm volatile("lea 1f(%%rip), %%rcx\n\t"
		     "push %%rcx\n\t"
		     "push %[complete]\n\t"
		     "mov %[done], %%rdi\n\t"
		     ANNOTATE_RETPOLINE_SAFE "\n\t"
		     "jmp *%[t]\n\t"
		     "1: int3"
		     :
		     : [t] "r"(target), [complete] "r"((unsigned long)complete), [done] "r"(&done), "a"(0x10UL)
		     : "rcx", "rdx", "rdi", "memory");
	return 0;
}

static int __init atk_init(void)
{
	struct task_struct *t;

	if (!table_start || table_end <= table_start || !fn || fn_end <= fn)
		return -EINVAL;
	target = find_target();
	if (!target) {
		report("no exception-table entry in the function");
		return -ENOENT;
	}
	t = kthread_create(attack, NULL, "atk_extable");
	if (IS_ERR(t))
		return PTR_ERR(t);
	/* (A fixup that ran completes `done` before the thread dies.) */
	get_task_struct(t);
	wake_up_process(t);
	wait_for_thread(t, completion_done(&done));
	put_task_struct(t);
	report("jump to an instruction with an exception-table fixup: the kernel's view %s",
	       completion_done(&done) ? "ran complete() for it: WENT THROUGH" : "ran nothing for it");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
