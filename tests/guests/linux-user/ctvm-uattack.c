// SPDX-License-Identifier: GPL-2.0
/*
 * User-space attacks on the hypervisor's emulation, run as root in the
 * guest once the CTVM agent has locked the kernel's layout (from then on
 * SGDT, SIDT, SLDT and STR exit to the hypervisor, which carries them out).
 *
 * 1. SGDT/SIDT/SLDT/STR with a kernel address as the memory operand: the
 *    hypervisor must not write there for a CPL-3 instruction. Each runs in a
 *    child; the kernel bytes at each target are read through /proc/kcore
 *    before and after.
 * 2. The same into the process's own memory: what UMIP would give (limit 0
 *    and Linux's dummy bases, selectors 0), never the real tables.
 * 3. VMCALL with every hypercall number: refused.
 *
 * Prints "ctvm-uattack: ..." lines; "WENT THROUGH" marks a failure.
 */
#include <elf.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t symbol(const char *name)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	char line[256], sym[128], type;
	unsigned long long addr;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%llx %c %127s", &addr, &type, sym) == 3 && !strcmp(sym, name)) {
			fclose(f);
			return addr;
		}
	}
	fclose(f);
	return 0;
}

/* Reads kernel memory at virtual address `va` through /proc/kcore's program headers. */
static int kcore_read(uint64_t va, void *buf, size_t len)
{
	int fd = open("/proc/kcore", O_RDONLY);
	Elf64_Ehdr eh;
	int ok = -1;

	if (fd < 0 || pread(fd, &eh, sizeof(eh), 0) != sizeof(eh))
		goto out;
	for (int i = 0; i < eh.e_phnum; i++) {
		Elf64_Phdr ph;

		if (pread(fd, &ph, sizeof(ph), eh.e_phoff + (uint64_t)i * eh.e_phentsize) != sizeof(ph))
			break;
		if (ph.p_type == PT_LOAD && va >= ph.p_vaddr && va + len <= ph.p_vaddr + ph.p_memsz) {
			ok = pread(fd, buf, len, ph.p_offset + (va - ph.p_vaddr)) == (ssize_t)len ? 0 : -1;
			break;
		}
	}
out:
	if (fd >= 0)
		close(fd);
	return ok;
}

enum insn { SGDT, SIDT, SLDT, STR };
static const char *const names[] = { "sgdt", "sidt", "sldt", "str" };

static void run(enum insn insn, uint64_t at)
{
	void *p = (void *)at;

	switch (insn) {
	case SGDT: asm volatile("sgdt (%0)" : : "r"(p) : "memory"); break;
	case SIDT: asm volatile("sidt (%0)" : : "r"(p) : "memory"); break;
	case SLDT: asm volatile("sldt (%0)" : : "r"(p) : "memory"); break;
	case STR: asm volatile("str (%0)" : : "r"(p) : "memory"); break;
	}
}

/* Runs one instruction in a child; returns the signal it died of, or 0. */
static int in_child(enum insn insn, uint64_t at)
{
	int status;
	pid_t pid = fork();

	if (pid == 0) {
		run(insn, at);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
}

int main(void)
{
	const char *targets[] = { "sys_call_table", "_stext", "init_cred", "idt_table" };
	int failures = 0;

	/* One line at a time, in order with the hypervisor's own lines. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	for (size_t t = 0; t < sizeof(targets) / sizeof(targets[0]); t++) {
		uint64_t addr = symbol(targets[t]);
		uint8_t before[16], after[16];

		if (!addr || kcore_read(addr, before, sizeof(before))) {
			printf("ctvm-uattack: FAIL: cannot read %s\n", targets[t]);
			failures++;
			continue;
		}
		for (int i = SGDT; i <= STR; i++) {
			int sig = in_child(i, addr + 2);

			kcore_read(addr, after, sizeof(after));
			int same = !memcmp(before, after, sizeof(before));
			printf("ctvm-uattack: %s at %s: %s, kernel memory %s\n", names[i], targets[t],
			       sig ? strsignal(sig) : "no fault", same ? "unchanged" : "CHANGED WENT THROUGH");
			failures += !same;
		}
	}

	/* Into its own memory: the values UMIP emulation gives. */
	uint8_t gdt[10] = { 0xcc }, idt[10] = { 0xcc };
	uint16_t ldt = 0xcccc, tr = 0xcccc;
	uint64_t gdt_base, idt_base;

	asm volatile("sgdt %0" : "=m"(gdt));
	asm volatile("sidt %0" : "=m"(idt));
	asm volatile("sldt %0" : "=m"(ldt));
	asm volatile("str %0" : "=m"(tr));
	memcpy(&gdt_base, gdt + 2, 8);
	memcpy(&idt_base, idt + 2, 8);
	printf("ctvm-uattack: own memory: sgdt limit %u base %#llx, sidt limit %u base %#llx, sldt %#x, str %#x\n",
	       gdt[0] | gdt[1] << 8, (unsigned long long)gdt_base, idt[0] | idt[1] << 8,
	       (unsigned long long)idt_base, ldt, tr);

	/* Every hypercall number, and some beyond. */
	int refused = 0, calls = 0;
	for (unsigned long nr = 0; nr < 0x40; nr++, calls++) {
		long ret;

		asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(0x1000UL), "c"(16UL), "d"(0UL), "S"(0UL) : "memory");
		refused += ret < 0;
	}
	printf("ctvm-uattack: vmcall: %d of %d calls refused\n", refused, calls);
	printf("ctvm-uattack: done, %d failures\n", failures);
	return failures != 0;
}
