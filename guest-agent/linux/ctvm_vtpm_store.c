// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/ctvm_vtpm_store: the durable vTPM's store channel, for the store
 * service (ctvm-vtpm-store) in user space, which cannot make hypercalls.
 * Part of the agent: ctvm_agent.c includes this file, so the calls come
 * from the agent's code, in the kernel's view. The protocol is
 * guest-agent/src/vtpm_store.rs:
 *
 *   read()  blocks until the hypervisor hands over a sealed state blob,
 *           then returns its version (8 bytes, little-endian) and the blob;
 *           with O_NONBLOCK, -EAGAIN when none waits. A buffer too small
 *           for the record gets -EMSGSIZE.
 *   write() of the 8-byte version reports that blob written and synced
 *           (file and directory): the hypervisor then releases the vTPM
 *           response it held. -EINVAL for a version it did not hand over.
 *
 * Only the hypervisor's checks matter: a store service that lies hurts
 * only its own guest, whose next boot refuses the stale or missing blob.
 */
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/uaccess.h>
#include "ctvm_vtpm_abi.h"

/* How often a waiting read asks the hypervisor again. */
#define STORE_POLL_MS 20

static DEFINE_MUTEX(store_lock);
static void *store_buffer;

/* VMCALL with RBX/RCX in and RAX/RBX out. */
static long store_call(unsigned long nr, unsigned long *rbx, unsigned long rcx)
{
	long ret;
	unsigned long rdx = 0, rsi = 0;

	asm volatile("vmcall"
		     : "=a"(ret), "+b"(*rbx), "+c"(rcx), "+d"(rdx), "+S"(rsi)
		     : "a"(nr)
		     : "memory");
	return ret;
}

static ssize_t store_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	unsigned long rbx;
	__le64 header;
	long n;
	ssize_t ret;

	for (;;) {
		if (mutex_lock_interruptible(&store_lock))
			return -EINTR;
		/* In: the buffer; out: the blob's version. */
		rbx = (unsigned long)store_buffer;
		n = store_call(CTVM_CALL_VTPM_STORE_FETCH, &rbx, CTVM_VTPM_MAX_BLOB);
		if (n != 0)
			break;
		mutex_unlock(&store_lock);
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		if (msleep_interruptible(STORE_POLL_MS))
			return -EINTR;
	}
	if (n < 0) {
		pr_err("ctvm: vTPM store: fetch refused (%ld)\n", n);
		ret = -EIO;
	} else if (count < CTVM_VTPM_RECORD_HEADER + (size_t)n) {
		ret = -EMSGSIZE;
	} else {
		header = cpu_to_le64(rbx);
		if (copy_to_user(buf, &header, sizeof(header)) ||
		    copy_to_user(buf + CTVM_VTPM_RECORD_HEADER, store_buffer, n))
			ret = -EFAULT;
		else
			ret = CTVM_VTPM_RECORD_HEADER + n;
	}
	mutex_unlock(&store_lock);
	return ret;
}

static ssize_t store_write(struct file *file, const char __user *buf, size_t count, loff_t *ppos)
{
	__le64 header;
	unsigned long version;
	long ret;

	if (count != sizeof(header))
		return -EINVAL;
	if (copy_from_user(&header, buf, sizeof(header)))
		return -EFAULT;
	version = le64_to_cpu(header);
	if (mutex_lock_interruptible(&store_lock))
		return -EINTR;
	ret = store_call(CTVM_CALL_VTPM_STORE_DONE, &version, 0);
	mutex_unlock(&store_lock);
	if (ret < 0) {
		pr_warn("ctvm: vTPM store: report of version %lu refused (%ld)\n", (unsigned long)le64_to_cpu(header), ret);
		return -EINVAL;
	}
	return count;
}

static const struct file_operations store_fops = {
	.owner = THIS_MODULE,
	.read = store_read,
	.write = store_write,
	.llseek = noop_llseek,
};

static struct miscdevice store_device = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "ctvm_vtpm_store",
	.fops = &store_fops,
	.mode = 0600,
};

/* Registers the device when the hypervisor offers the store calls (the
 * guest's vTPM is durable). Never unregistered: the agent stays loaded. */
static int ctvm_vtpm_store_register(unsigned long caps)
{
	int ret;

	if (!(caps & CTVM_CAP_VTPM_STORE))
		return -ENODEV;
	store_buffer = kvmalloc(CTVM_VTPM_MAX_BLOB, GFP_KERNEL);
	if (!store_buffer)
		return -ENOMEM;
	ret = misc_register(&store_device);
	if (ret) {
		kvfree(store_buffer);
		store_buffer = NULL;
		return ret;
	}
	pr_info("ctvm: vTPM store channel at /dev/ctvm_vtpm_store\n");
	return 0;
}
