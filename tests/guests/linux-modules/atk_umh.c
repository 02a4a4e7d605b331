// SPDX-License-Identifier: GPL-2.0
/* Attack: start a user program as root through the usermode helper
 * (a reverse shell or dropper would go here). /init checks nothing ran. */
#include <linux/module.h>
#include <linux/umh.h>
#include <linux/slab.h>
#include "alias.h"

static int __init atk_init(void)
{
	static char *argv[] = { "/bin/sh", "-c", "echo root > /tmp/ctvm_umh_ran", NULL };
	static char *envp[] = { "PATH=/bin:/sbin", NULL };
	struct subprocess_info *info;
	int r;

	info = call_usermodehelper_setup(argv[0], argv, envp, GFP_KERNEL, NULL, NULL, NULL);
	/* Refused, setup fails as it would, with NULL. An adaptive attacker
	 * then hands exec an object of its own making: exec is refused too. */
	if (!info) {
		info = kzalloc(sizeof(*info), GFP_KERNEL);
		if (info) {
			info->path = argv[0];
			info->argv = argv;
			info->envp = envp;
		}
	}
	r = info ? call_usermodehelper_exec(info, UMH_WAIT_PROC) : -ENOMEM;
	if (r)
		kfree(info);
	report("usermode helper exec returned %d: %s", r, r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
