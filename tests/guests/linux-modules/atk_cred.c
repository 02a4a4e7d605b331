// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: make our process root by writing its credentials in place (the
 * uid of its struct cred, in the kernel's cred_jar), and rename it by
 * writing its task_struct.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/cred.h>
#include "alias.h"

static int __init atk_init(void)
{
	volatile unsigned int *uid = (volatile unsigned int *)&current_cred()->uid.val;
	volatile char *comm = (volatile char *)current->comm;
	unsigned int old_uid = *uid;
	char old_comm = comm[0];
	bool uid_changed, comm_changed;

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
	report("cred uid write %s, task write %s", uid_changed ? "WENT THROUGH" : "blocked",
	       comm_changed ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
