// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: make our process root by writing its credentials in place (the
 * uid of its struct cred, in the kernel's cred_jar), rename it by writing
 * its task_struct, and rewrite cred_jar's own struct kmem_cache (its
 * min_partial here; a rootkit would go for the size or the constructor).
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/cred.h>
#include <linux/slab.h>
#include "alias.h"

static unsigned long jar;
module_param(jar, ulong, 0400);

static int __init atk_init(void)
{
	volatile unsigned int *uid = (volatile unsigned int *)&current_cred()->uid.val;
	volatile char *comm = (volatile char *)current->comm;
	unsigned int old_uid = *uid;
	char old_comm = comm[0];
	bool uid_changed, comm_changed, cache_changed;
	volatile unsigned char *cache;
	unsigned char old_cache;

	/* The process runs as root already: a uid it does not have shows
	 * whether the write landed. */
	*uid = old_uid + 4242;
	uid_changed = *uid != old_uid;
	if (uid_changed)
		*uid = old_uid;
	comm[0] = old_comm ^ 0x20;
	comm_changed = comm[0] != old_comm;
	if (comm_changed)
		comm[0] = old_comm;
	if (!jar)
		return -EINVAL;
	/* struct kmem_cache: cpu_slab, flags, then min_partial. */
	cache = (volatile unsigned char *)*(struct kmem_cache **)jar + 16;
	old_cache = *cache;
	*cache = old_cache ^ 1;
	cache_changed = *cache != old_cache;
	if (cache_changed)
		*cache = old_cache;
	report("cred uid write %s, task write %s, kmem_cache write %s", uid_changed ? "WENT THROUGH" : "blocked",
	       comm_changed ? "WENT THROUGH" : "blocked", cache_changed ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
