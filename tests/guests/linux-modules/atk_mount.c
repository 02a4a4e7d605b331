// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: lift a mount's restrictions through its heap object. A rootkit
 * clears MNT_NOEXEC, MNT_NOSUID or MNT_READONLY on the mount that holds
 * them (a noexec /tmp, a container's read-only root) by writing the
 * vfsmount's flags, which live inside a struct mount from mnt_cache. Here
 * the root mount's MNT_NOEXEC is flipped, and put back if it changed.
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/fs_struct.h>
#include <linux/mount.h>
#include "alias.h"

static int __init atk_init(void)
{
	struct vfsmount *mnt = current->fs->root.mnt;
	volatile int *flags = &mnt->mnt_flags;
	int old = *flags;
	bool changed;

	*flags = old ^ MNT_NOEXEC;
	changed = *flags != old;
	if (changed)
		*flags = old;
	report("root mount's flags write %s", changed ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
