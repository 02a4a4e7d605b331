// SPDX-License-Identifier: GPL-2.0
/* Attack: unlink itself from the kernel's module list (DKOM). */
#include <linux/module.h>
#include <linux/rculist.h>
#include "alias.h"

static int __init atk_init(void)
{
	struct list_head *me = &THIS_MODULE->list;
	struct list_head *prev = me->prev, *next = me->next;
	bool hidden;

	list_del_rcu(me);
	hidden = prev->next != me && next->prev != me;
	/* Put our own back pointer back, whatever happened to the neighbours'. */
	me->prev = prev;
	report("module list unlink %s", hidden ? "WENT THROUGH" : "blocked");
	if (hidden) {
		prev->next = me;
		next->prev = me;
	}
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
