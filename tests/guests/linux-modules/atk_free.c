// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: free a credential. The allocator writes its free pointer into
 * the object it is given back and hands it out again, so a task still
 * holding a credential a module freed would have the next one built over
 * its own: the classic way from a use-after-free to root. The credential
 * here is one nobody uses, taken from the kernel's cred_jar; whether kfree
 * went through shows in the next allocation, which returns the object
 * freed last.
 */
#include <linux/module.h>
#include <linux/slab.h>
#include "alias.h"

static unsigned long jar;
module_param(jar, ulong, 0400);

static int __init atk_init(void)
{
	struct kmem_cache *creds = jar ? *(struct kmem_cache **)jar : NULL;
	void *a, *b;
	bool freed;

	if (!creds)
		return -EINVAL;
	a = kmem_cache_alloc(creds, GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	kfree(a);
	b = kmem_cache_alloc(creds, GFP_KERNEL);
	freed = b == a;
	/* Given back only where the free went through (else both are held,
	 * and stay so: a refused free is not tried again). */
	if (freed)
		kmem_cache_free(creds, b);
	report("kfree of a credential %s", freed ? "WENT THROUGH" : "blocked");
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
