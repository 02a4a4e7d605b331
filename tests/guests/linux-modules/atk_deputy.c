// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: have the kernel write for us (a confused deputy). memcpy unlinks
 * us from the module list, memset blanks modprobe_path, snprintf prints
 * our helper's path over it, kstrtouint parses a number into it, bin2hex
 * and __bitmap_set write it, sscanf stores a path into it through its
 * sixth pointer (on the stack, where the format says it is), seq_printf
 * prints into it through a forged seq_file, kobject_del takes us out of
 * /sys/module: exported, allowed functions, which run with the kernel's
 * rights.
 */
#include <linux/module.h>
#include <linux/string.h>
#include <linux/kobject.h>
#include <linux/bitmap.h>
#include <linux/kernel.h>
#include <linux/seq_file.h>
#include "alias.h"

static unsigned long modprobe;
module_param(modprobe, ulong, 0400);
static unsigned int word = sizeof(void *), path = 8;
module_param(word, uint, 0400);
module_param(path, uint, 0400);

static int __init atk_init(void)
{
	struct list_head *me = &THIS_MODULE->list, *prev = me->prev, *next = me->next;
	/* Through pointers, so that these are calls into the kernel and not
	 * stores the compiler inlines into this module. */
	void *(*volatile copy)(void *, const void *, size_t) = memcpy;
	void *(*volatile fill)(void *, int, size_t) = memset;
	size_t w = word, n = path;
	char before[8];
	unsigned int *number = (unsigned int *)modprobe;
	bool unlinked, blanked, printed, parsed, hexed, bits, scanned, sequenced;
	struct seq_file forged = { .buf = (char *)modprobe, .size = path };
	int d[5];

	if (!modprobe || w != sizeof(void *) || n > sizeof(before))
		return -EINVAL;
	/* prev->next = next, as list_del would, but written by memcpy. */
	copy(&prev->next, &next, w);
	unlinked = READ_ONCE(prev->next) != me;
	if (unlinked)
		WRITE_ONCE(prev->next, me);
	memcpy(before, (void *)modprobe, n);
	fill((void *)modprobe, 0, n);
	blanked = memcmp(before, (void *)modprobe, n) != 0;
	if (blanked)
		copy((void *)modprobe, before, n);
	snprintf((char *)modprobe, n, "/tmp/x");
	printed = memcmp(before, (void *)modprobe, n) != 0;
	if (printed)
		copy((void *)modprobe, before, n);
	/* A refused call fails (-EPERM) and leaves the bytes alone. */
	parsed = kstrtouint("1", 10, number) == 0 || memcmp(before, (void *)modprobe, n) != 0;
	if (parsed)
		copy((void *)modprobe, before, n);
	bin2hex((char *)modprobe, "\x2f\x74", 2);
	hexed = memcmp(before, (void *)modprobe, n) != 0;
	if (hexed)
		copy((void *)modprobe, before, n);
	__bitmap_set((unsigned long *)modprobe, 0, 8);
	bits = memcmp(before, (void *)modprobe, n) != 0;
	if (bits)
		copy((void *)modprobe, before, n);
	sscanf("1 2 3 4 5 /tmp/x", "%d %d %d %d %d %7s", &d[0], &d[1], &d[2], &d[3], &d[4], (char *)modprobe);
	scanned = memcmp(before, (void *)modprobe, n) != 0;
	if (scanned)
		copy((void *)modprobe, before, n);
	seq_printf(&forged, "/tmp/x");
	sequenced = memcmp(before, (void *)modprobe, n) != 0;
	if (sequenced)
		copy((void *)modprobe, before, n);
	kobject_del(&THIS_MODULE->mkobj.kobj);
	report("memcpy onto the module list %s, memset on modprobe_path %s, snprintf on modprobe_path %s, kstrtouint into modprobe_path %s, bin2hex on modprobe_path %s, __bitmap_set on modprobe_path %s, sscanf into modprobe_path %s, seq_printf on modprobe_path %s, kobject_del of its own kobject %s",
	       unlinked ? "WENT THROUGH" : "blocked", blanked ? "WENT THROUGH" : "blocked",
	       printed ? "WENT THROUGH" : "blocked", parsed ? "WENT THROUGH" : "blocked",
	       hexed ? "WENT THROUGH" : "blocked", bits ? "WENT THROUGH" : "blocked",
	       scanned ? "WENT THROUGH" : "blocked", sequenced ? "WENT THROUGH" : "blocked",
	       THIS_MODULE->mkobj.kobj.state_in_sysfs ? "blocked" : "WENT THROUGH");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
