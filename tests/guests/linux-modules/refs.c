// SPDX-License-Identifier: GPL-2.0
/*
 * Benign: takes and drops references to the kernel's own objects the way
 * drivers do, through the kernel's inline helpers, whose atomic updates run
 * in the module's own code: get_task_struct/put_task_struct, get_cred/
 * put_cred, get_pid, mmgrab/mmdrop. Every count must move and come back.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/sched/mm.h>
#include <linux/cred.h>
#include <linux/pid.h>
#include "alias.h"

#define ROUNDS 100

static long cred_count(const struct cred *c)
{
	/* atomic_t on 6.1, atomic_long_t since 6.8. */
	if (sizeof(c->usage) == sizeof(long))
		return atomic_long_read((atomic_long_t *)&c->usage);
	return atomic_read((atomic_t *)&c->usage);
}

static const char *moved(long before, long during, long after, long by)
{
	return during == before + by && after == before ? "ok" : "WRONG";
}

static int __init refs_init(void)
{
	struct task_struct *task = current;
	const struct cred *cred = current_cred();
	struct pid *pid = task_pid(current);
	struct mm_struct *mm = current->mm;
	long t0, t1, c0, c1, p0, p1, m0, m1;
	int i;

	t0 = refcount_read(&task->usage);
	c0 = cred_count(cred);
	p0 = refcount_read(&pid->count);
	m0 = atomic_read(&mm->mm_count);
	for (i = 0; i < ROUNDS; i++) {
		get_task_struct(task);
		get_cred(cred);
		get_pid(pid);
		mmgrab(mm);
	}
	t1 = refcount_read(&task->usage);
	c1 = cred_count(cred);
	p1 = refcount_read(&pid->count);
	m1 = atomic_read(&mm->mm_count);
	for (i = 0; i < ROUNDS; i++) {
		put_task_struct(task);
		put_cred(cred);
		put_pid(pid);
		mmdrop(mm);
	}
	report("task %s, cred %s, pid %s, mm %s",
	       moved(t0, t1, refcount_read(&task->usage), ROUNDS), moved(c0, c1, cred_count(cred), ROUNDS),
	       moved(p0, p1, refcount_read(&pid->count), ROUNDS), moved(m0, m1, atomic_read(&mm->mm_count), ROUNDS));
	return 0;
}

static void __exit refs_exit(void)
{
}

module_init(refs_init);
module_exit(refs_exit);
MODULE_LICENSE("GPL");
