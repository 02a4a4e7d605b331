// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: start a CPU the guest was not given, outside the hypervisor, with
 * INIT and start-up IPIs through the local APIC's interrupt command
 * register, in its xAPIC (MMIO) and x2APIC (MSR) forms. A started CPU would
 * run guest code with all of memory, beyond every EPT. The IPIs must be
 * refused and reported, and this CPU keep running.
 */
#include <linux/module.h>
#include <linux/io.h>
#include <linux/delay.h>
#include "alias.h"

#define APIC_BASE_PHYS 0xfee00000UL
#define ICR_LOW 0x300
#define ICR_HIGH 0x310

static unsigned int target = 1;
module_param(target, uint, 0400);

static int __init atk_init(void)
{
	void __iomem *apic = ioremap(APIC_BASE_PHYS, 0x1000);
	u32 lo, hi;

	if (!apic)
		return -ENOMEM;
	writel(target << 24, apic + ICR_HIGH);
	writel(0x00004500, apic + ICR_LOW); /* INIT, level assert */
	udelay(10);
	writel(target << 24, apic + ICR_HIGH);
	writel(0x00000600 | 0x9a, apic + ICR_LOW); /* start-up at 0x9a000 */
	writel(0x00000600 | 0x9a, apic + ICR_LOW);
	iounmap(apic);
	/* The x2APIC form: INIT then SIPI through the ICR MSR. */
	lo = 0x4500;
	hi = target;
	asm volatile("1: wrmsr\n2:\n" _ASM_EXTABLE(1b, 2b) : : "c"(0x830), "a"(lo), "d"(hi) : "memory");
	lo = 0x069a;
	asm volatile("1: wrmsr\n2:\n" _ASM_EXTABLE(1b, 2b) : : "c"(0x830), "a"(lo), "d"(hi) : "memory");
	report("INIT and start-up IPIs sent to APIC %u; this CPU runs on", target);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
