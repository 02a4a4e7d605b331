// SPDX-License-Identifier: GPL-2.0
/*
 * Attack, then stay: a rootkit hands the kernel a callback (a /proc file's
 * read routine) and then hooks the syscall table. The hook is refused, and
 * the module is quarantined: the kernel's later calls of its callback are
 * refused too (the read fails with -EPERM), until rmmod unloads it, when
 * its exit routine runs and takes the file away.
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/fs.h>
#include <linux/syscalls.h>
#include "alias.h"

static unsigned long table;
module_param(table, ulong, 0400);

static ssize_t quar_read(struct file *file, char __user *buf, size_t n, loff_t *pos)
{
	static const char says[] = "the callback RAN\n";

	return simple_read_from_buffer(buf, n, pos, says, sizeof(says) - 1);
}

static const struct proc_ops quar_ops = { .proc_read = quar_read };

static long hooked_getpid(const struct pt_regs *regs)
{
	return 4242;
}

static int __init atk_init(void)
{
	unsigned long *entry = (unsigned long *)table + __NR_getpid;
	unsigned long hook = (unsigned long)hooked_getpid;
	int r;

	if (!table || !proc_create("ctvm_quar", 0444, NULL, &quar_ops))
		return -EINVAL;
	r = alias_write((unsigned long)entry, &hook, sizeof(hook));
	report("syscall table write %s", r == 0 ? "WENT THROUGH" : "blocked");
	/* A rootkit stays loaded, with its callback in the kernel's hands. */
	return 0;
}

static void __exit atk_exit(void)
{
	remove_proc_entry("ctvm_quar", NULL);
	report("exit ran");
}

module_init(atk_init);
module_exit(atk_exit);
MODULE_LICENSE("GPL");
