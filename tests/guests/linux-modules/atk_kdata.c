// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: point the kernel's usermode helpers at our program by rewriting
 * modprobe_path and core_pattern in the kernel image's .data (the classic
 * data-only privilege escalation: the next request_module or core dump
 * runs it as root).
 */
#include <linux/module.h>
#include "alias.h"

static unsigned long modprobe, core;
module_param(modprobe, ulong, 0400);
module_param(core, ulong, 0400);

/* Writes `evil` over the string at `target` byte by byte, from this
 * module's own code; returns whether it changed, and puts it back if so. */
static bool overwrite(unsigned long target, const char *evil, size_t len)
{
	volatile char *p = (volatile char *)target;
	char before[32];
	bool changed = false;
	size_t i;

	for (i = 0; i < len; i++)
		before[i] = p[i];
	for (i = 0; i < len; i++)
		p[i] = evil[i];
	for (i = 0; i < len; i++)
		changed |= p[i] != before[i];
	if (changed)
		for (i = 0; i < len; i++)
			p[i] = before[i];
	return changed;
}

static int __init atk_init(void)
{
	static const char helper[] = "/tmp/ctvm_pwn";
	static const char pipe[] = "|/tmp/ctvm_pwn";
	bool m, c;

	if (!modprobe || !core)
		return -EINVAL;
	m = overwrite(modprobe, helper, sizeof(helper));
	c = overwrite(core, pipe, sizeof(pipe));
	report("modprobe_path write %s, core_pattern write %s", m ? "WENT THROUGH" : "blocked",
	       c ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
