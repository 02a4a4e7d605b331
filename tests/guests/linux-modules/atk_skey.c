// SPDX-License-Identifier: GPL-2.0
/* Attack: enable a kernel static key the module does not own; the kernel
 * patches its own text for it, through the poke path CTVM lets write. */
#include <linux/module.h>
#include <linux/jump_label.h>
#include "alias.h"

static unsigned long key;
module_param(key, ulong, 0400);

static int __init atk_init(void)
{
	struct static_key *k = (struct static_key *)key;
	int before = atomic_read(&k->enabled);

	static_key_enable(k);
	report("static_key_enable on a kernel key: count %d -> %d, %s", before, atomic_read(&k->enabled),
	       atomic_read(&k->enabled) > before ? "WENT THROUGH" : "blocked");
	if (atomic_read(&k->enabled) > before)
		static_key_disable(k);
	return -EACCES;
}
module_init(atk_init);
MODULE_LICENSE("GPL");
