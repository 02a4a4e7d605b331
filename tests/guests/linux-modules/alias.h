/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by the attack modules: writing through a second, writable mapping
 * of a protected page (a vmap alias), which the guest's own page-table
 * protections know nothing about. Only the hypervisor's EPT stands between
 * such a write and the page.
 */
#include <linux/vmalloc.h>
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/delay.h>
#include <linux/sched.h>

/* Writes `len` bytes at kernel address `target` through a vmap alias;
 * returns 0 if the bytes read back changed, 1 if they did not. */
static __maybe_unused int alias_write(unsigned long target, const void *src, size_t len)
{
	struct page *page;
	void *alias;
	unsigned long offset = target & ~PAGE_MASK;
	int unchanged;

	if (target >= MODULES_VADDR && target < MODULES_END)
		page = vmalloc_to_page((void *)target);
	else
		page = virt_to_page(lm_alias((void *)target));
	alias = vmap(&page, 1, VM_MAP, PAGE_KERNEL);
	if (!alias)
		return -ENOMEM;
	memcpy(alias + offset, src, len);
	unchanged = memcmp((void *)target, src, len) != 0;
	vunmap(alias);
	return unchanged;
}

#define report(fmt, ...) pr_info("ctvm-test: " KBUILD_MODNAME ": " fmt "\n", ##__VA_ARGS__)

/* A one-byte write that reports a page fault instead of oopsing. */
static __maybe_unused int nofault_write(unsigned long target, u8 value)
{
	__put_kernel_nofault((u8 *)target, &value, u8, fault);
	return 0;
fault:
	return -EFAULT;
}

/* Swaps the pointer-sized word at `slot` for `fake`, reads it back and
 * puts the old value back if the swap held: "WENT THROUGH" or "blocked". */
static __maybe_unused const char *swap_held(volatile unsigned long *slot, unsigned long fake)
{
	unsigned long old = *slot;
	bool held;

	*slot = fake;
	held = *slot == fake;
	if (held)
		*slot = old;
	return held ? "WENT THROUGH" : "blocked";
}

/* Waits until `cond` holds or the kernel thread `t` (held: get_task_struct)
 * has died, a second at most, in 10 ms steps: an attack run in a thread of
 * its own either reports at once or dies of the refusal. (A fixed wait
 * would cost: an idle second of the guest lasts about a minute of the
 * wall's on two CPUs under Bochs.) */
#define wait_for_thread(t, cond)                                                          \
	do {                                                                               \
		int __waited;                                                              \
		for (__waited = 0; !(cond) && !READ_ONCE((t)->exit_state) && __waited < 1000; \
		     __waited += 10)                                                       \
			msleep(10);                                                        \
	} while (0)
