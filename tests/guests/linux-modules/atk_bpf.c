// SPDX-License-Identifier: GPL-2.0
/* Attack: have the kernel build and JIT a BPF program for the module
 * (bpf_prog_create, exported): code the kernel runs, made by the module. */
#include <linux/module.h>
#include <linux/filter.h>
#include "alias.h"

static int __init atk_init(void)
{
	static struct sock_filter code[] = { BPF_STMT(BPF_RET | BPF_K, 0) };
	struct sock_fprog_kern fprog = { .len = ARRAY_SIZE(code), .filter = code };
	struct bpf_prog *prog = NULL;
	int r = bpf_prog_create(&prog, &fprog);

	report("bpf_prog_create %s (%d)", r == 0 ? "WENT THROUGH" : "blocked", r);
	if (r == 0)
		bpf_prog_destroy(prog);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
