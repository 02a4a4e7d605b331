// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: root and a way out of a container through the namespaces, not
 * the credentials. The shell runs `pid` in a user and network namespace of
 * its own (unshare -U -n), unmapped. Map that namespace's uid 0 onto the
 * host's uid 0 (its uid_map, in a user_namespace from user_ns_cachep):
 * the process, root in its namespace, could then setuid(0) into the host's
 * root with its own credentials untouched. Then point its nsproxy (from
 * nsproxy_cachep) at the host's network namespace.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/cred.h>
#include <linux/pid.h>
#include <linux/nsproxy.h>
#include <linux/user_namespace.h>
#include <net/net_namespace.h>
#include "alias.h"

static int pid;
module_param(pid, int, 0400);

static const char *map_root(struct user_namespace *ns)
{
	volatile u32 *count = &ns->uid_map.nr_extents;
	struct uid_gid_extent *first = &ns->uid_map.extent[0];
	bool held;

	if (ns == &init_user_ns || *count)
		return "not tried (no unmapped namespace of its own)";
	first->first = 0;
	first->lower_first = 0;
	first->count = 1;
	*count = 1;
	held = *count == 1 && READ_ONCE(first->count) == 1;
	if (held)
		*count = 0;
	return held ? "WENT THROUGH" : "blocked";
}

static int __init atk_init(void)
{
	struct pid *p = find_get_pid(pid);
	struct task_struct *t = p ? get_pid_task(p, PIDTYPE_PID) : NULL;
	const char *mapped, *moved;

	put_pid(p);
	if (!t)
		return -ESRCH;
	mapped = map_root(t->real_cred->user_ns);
	if (t->nsproxy && t->nsproxy->net_ns != &init_net)
		moved = swap_held((volatile unsigned long *)&t->nsproxy->net_ns, (unsigned long)&init_net);
	else
		moved = "not tried (no namespaces of its own)";
	put_task_struct(t);
	report("user namespace uid 0 mapped to the host's %s, nsproxy moved to the host's network %s", mapped, moved);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
