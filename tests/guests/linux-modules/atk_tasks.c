// SPDX-License-Identifier: GPL-2.0
/* Attack: hide our process by unlinking it from the kernel's task list. */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/rculist.h>
#include "alias.h"

static int __init atk_init(void)
{
	struct list_head *me = &current->tasks;
	struct list_head *prev = me->prev, *next = me->next;
	bool hidden;

	list_del_rcu(me);
	hidden = prev->next != me || next->prev != me;
	/* Undo what went through, so that the kernel survives either way. */
	me->prev = prev;
	if (hidden) {
		prev->next = me;
		next->prev = me;
	}
	report("task list unlink %s", hidden ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
