// SPDX-License-Identifier: GPL-2.0
/* Attack: clear CR0.WP with a raw mov, then write to rodata. */
#include <linux/module.h>
#include <linux/uaccess.h>
#include <asm/processor-flags.h>
#include "alias.h"

static unsigned long rodata;
module_param(rodata, ulong, 0400);

static int __init atk_init(void)
{
	unsigned long cr0, after;
	long r;

	asm volatile("mov %%cr0, %0" : "=r"(cr0));
	asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	asm volatile("mov %%cr0, %0" : "=r"(after));
	r = nofault_write(rodata, 'X');
	asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
	report("CR0.WP %s; rodata write %s", after & X86_CR0_WP ? "stayed set" : "CLEARED",
	       r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
