// SPDX-License-Identifier: GPL-2.0
/* Attack: overwrite an IDT gate (#BP) through a vmap alias of idt_table. */
#include <linux/module.h>
#include "alias.h"

static unsigned long idt;
module_param(idt, ulong, 0400);

static int __init atk_init(void)
{
	u8 gate[16] = { 0 };
	int r = alias_write(idt + 3 * 16, gate, sizeof(gate));

	report("IDT write %s", r == 0 ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
