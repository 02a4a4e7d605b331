// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a task younger than CTVM's last look at the kernel's tables. A
 * kthread the module makes has run once, up to its first sleep, entirely
 * in the kernel's view, and sleeps with the frame switch_to will pop on
 * its stack: the address it resumes at. The module writes that word
 * through the direct map's address of the stack's page, the moment the
 * task exists. A task's stack reached through its own address is covered
 * by atk_stack.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/sched/task_stack.h>
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <asm/switch_to.h>
#include "alias.h"

static int idle(void *data)
{
	while (!kthread_should_stop())
		schedule_timeout_interruptible(HZ);
	return 0;
}

/* Writes the task's resume address through the direct map; whether it took. */
static bool overwrite(struct task_struct *t)
{
	struct inactive_task_frame *frame = (struct inactive_task_frame *)t->thread.sp;
	volatile unsigned long *alias =
		page_address(vmalloc_to_page(&frame->ret_addr)) + offset_in_page(&frame->ret_addr);
	unsigned long before = *alias;
	bool took;

	*alias = before ^ 0x10;
	took = frame->ret_addr != before;
	if (took)
		*alias = before;
	return took;
}

/* Freed stacks are kept for reuse (two a CPU), and a reused one is known
 * from before: of four tasks made at once, the last ones get new stacks. */
#define TASKS 4

static int __init atk_init(void)
{
	struct task_struct *t[TASKS];
	int i, made = 0, took = 0;

	for (i = 0; i < TASKS; i++) {
		t[i] = kthread_create(idle, NULL, "atk_young/%d", i);
		if (IS_ERR(t[i]))
			break;
		made++;
	}
	for (i = 0; i < made; i++)
		took += overwrite(t[i]);
	for (i = 0; i < made; i++)
		kthread_stop(t[i]);
	if (made < TASKS)
		return -ENOMEM;
	report("new tasks' resume address writes through the direct map %s",
	       took ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
