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
