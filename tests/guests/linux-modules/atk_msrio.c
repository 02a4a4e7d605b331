// SPDX-License-Identifier: GPL-2.0
/*
 * Attack from an isolated module's view: the machine's registers rather than
 * its memory. Redirect the system-call entry (LSTAR), the kernel's per-CPU
 * base (GS_BASE), switch NX off (EFER), reset the machine through the PCI
 * reset register, reprogram PCI configuration space, and call the hypervisor.
 * Each must be refused and reported, and the kernel keep working.
 */
#include <linux/module.h>
#include <asm/msr.h>
#include <asm/io.h>
#include "alias.h"

static u64 rd(u32 msr)
{
	u32 lo, hi;

	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

/* A raw WRMSR: the module's own instruction, not the kernel's helper. */
static void wr(u32 msr, u64 value)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static int __init atk_init(void)
{
	u64 lstar = rd(MSR_LSTAR), gs = rd(MSR_GS_BASE), efer = rd(MSR_EFER);
	unsigned long ret;
	u32 cf8;

	wr(MSR_LSTAR, 0xffffffffc0de0000ULL);
	wr(MSR_GS_BASE, 0xffffffffc0de1000ULL);
	wr(MSR_EFER, efer & ~EFER_NX);
	cf8 = inl(0xcf8);
	outl(0x80000000, 0xcf8);
	outb(0x06, 0xcf9);
	asm volatile("vmcall" : "=a"(ret) : "a"(0x20UL), "b"(0UL), "c"(64UL), "d"(0UL) : "memory");
	report("LSTAR %s, GS_BASE %s, EFER.NXE %s; machine up after the reset write, 0xcf8 read %#x; vmcall returned %ld",
	       rd(MSR_LSTAR) == lstar ? "kept" : "CHANGED WENT THROUGH",
	       rd(MSR_GS_BASE) == gs ? "kept" : "CHANGED WENT THROUGH",
	       rd(MSR_EFER) & EFER_NX ? "kept" : "CLEARED WENT THROUGH", cf8, (long)ret);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
