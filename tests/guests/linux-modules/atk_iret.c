// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a forged interrupt frame. The module pushes an iret frame whose
 * RIP is a kernel function it may not call (a syscall handler that is not
 * exported), then jumps to a harmless interrupt handler (#BP's entry): if
 * a jump to a handler passed for an interrupt, the handler's iretq would
 * take it to the forged RIP in the kernel's view.
 *
 * The attack runs in a kernel thread of its own: the refused jump faults
 * there (the thread dies with an oops, the kernel runs on), and the init
 * routine reports whether it came back. Whether the jump was taken for an
 * interrupt is the hypervisor's line to tell (`kind=call-non-entry`).
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/sched/task.h>
#include <asm/nospec-branch.h>
#include "alias.h"

static unsigned long hidden, handler;
module_param(hidden, ulong, 0400);
module_param(handler, ulong, 0400);

static bool came_back;

static int attack(void *unused)
{
	unsigned long rsp;

	asm volatile("mov %%rsp, %0" : "=r"(rsp));
	/* iretq pops RIP, CS, RFLAGS, RSP, SS: back to this stack at `hidden`. */
	asm volatile("push %[ss]\n\t"
		     "push %[sp]\n\t"
		     "pushfq\n\t"
		     "push %[cs]\n\t"
		     "push %[ip]\n\t"
		     ANNOTATE_RETPOLINE_SAFE "\n\t"
		     "jmp *%[h]\n\t"
		     "int3"
		     :
		     : [ss] "r"((unsigned long)__KERNEL_DS), [sp] "r"(rsp), [cs] "r"((unsigned long)__KERNEL_CS),
		       [ip] "r"(hidden), [h] "r"(handler)
		     : "memory");
	WRITE_ONCE(came_back, true);
	return 0;
}

static int __init atk_init(void)
{
	struct task_struct *t;

	if (!hidden || !handler)
		return -EINVAL;
	t = kthread_create(attack, NULL, "atk_iret");
	if (IS_ERR(t))
		return PTR_ERR(t);
	/* A jump let through comes back within microseconds; a refused one
	 * never, and the thread dies of it. */
	get_task_struct(t);
	wake_up_process(t);
	wait_for_thread(t, READ_ONCE(came_back));
	put_task_struct(t);
	report("forged interrupt frame: the attacking thread %s", READ_ONCE(came_back) ? "CAME BACK" : "was stopped");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
