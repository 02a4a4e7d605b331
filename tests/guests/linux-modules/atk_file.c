// SPDX-License-Identifier: GPL-2.0
/* Attack: files with the kernel's rights: create one with filp_open, and
 * write with kernel_write to a file the caller holds (its stdout). */
#include <linux/module.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/err.h>
#include "alias.h"

static int __init atk_init(void)
{
	static const char msg[] = "ctvm-test: atk_file: kernel_write WENT THROUGH\n";
	struct file *f = filp_open("/tmp/ctvm_file_written", O_CREAT | O_WRONLY | O_TRUNC, 0600);
	struct file *out;
	loff_t pos = 0;
	ssize_t n = -EBADF;

	if (!IS_ERR_OR_NULL(f))
		filp_close(f, NULL);
	out = fget(1);
	if (out) {
		n = kernel_write(out, msg, sizeof(msg) - 1, &pos);
		fput(out);
	}
	report("filp_open %s (%ld); kernel_write %s (%zd)", IS_ERR_OR_NULL(f) ? "blocked" : "WENT THROUGH",
	       IS_ERR(f) ? PTR_ERR(f) : 0L, n > 0 ? "WENT THROUGH" : "blocked", n);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
