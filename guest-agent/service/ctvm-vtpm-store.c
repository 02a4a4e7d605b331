// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * ctvm-vtpm-store: the store service of a durable CTVM vTPM.
 *
 *   ctvm-vtpm-store [-d DIR] [-n COUNT]
 *
 * The hypervisor holds the response of every vTPM command that changed
 * the vTPM's durable state (TakeOwnership, NV writes, ChangeAuth, ...)
 * until a sealed blob holding the change is on this guest's disk. This
 * service puts it there, one blob at a time:
 *
 *   1. read a record from /dev/ctvm_vtpm_store (the agent's device; it
 *      blocks until the hypervisor has a blob): the version (8 bytes,
 *      little-endian), then the blob;
 *   2. write the blob to DIR/NAME.vtpm.tmp, fsync it, rename it over
 *      DIR/NAME.vtpm, fsync DIR (NAME is the guest's name, from the blob);
 *   3. write the version back to the device: only now does the vTPM answer.
 *
 * A power cut at any point leaves DIR/NAME.vtpm whole: the old blob or the
 * new one. GRUB hands DIR/NAME.vtpm to CTVM at the next boot (module
 * command line vtpm.state=NAME). DIR is /boot/ctvm by default; -n stops
 * after COUNT blobs (0, the default: never). The blob is sealed by the
 * hypervisor: this service cannot read it, and can only hurt its own
 * guest by not writing it (the next boot then refuses the stale blob).
 *
 * Build: gcc -static -O2 -o ctvm-vtpm-store ctvm-vtpm-store.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEVICE "/dev/ctvm_vtpm_store"
/* guest-agent/src/vtpm_store.rs: RECORD_HEADER, MAX_BLOB. */
#define RECORD_HEADER 8
#define MAX_BLOB (64 * 1024)
/* vtpm-trust/src/blob.rs: the magic, then the guest name's length at 36. */
#define NAME_LEN_AT 36
#define NAME_AT 38
#define NAME_MAX_LEN 31

static unsigned char record[RECORD_HEADER + MAX_BLOB];

/* The guest name a blob carries, if it is one a file may be named after:
 * the hypervisor's guest names are [a-z0-9_-]{1,31}. With a platform TPM
 * the state blob follows the platform-sealed key and the host record
 * (hypervisor/src/tpm/host.rs): the first "CTVMVTPM" whose name parses. */
static int state_name(const unsigned char *blob, size_t len, char *name);

static int blob_name(const unsigned char *blob, size_t len, char *name)
{
	size_t at;

	for (at = 0; at + 8 <= len; at++)
		if (memcmp(blob + at, "CTVMVTPM", 8) == 0 && state_name(blob + at, len - at, name) == 0)
			return 0;
	return -1;
}

static int state_name(const unsigned char *blob, size_t len, char *name)
{
	size_t n, i;

	if (len < NAME_AT || memcmp(blob, "CTVMVTPM", 8) != 0)
		return -1;
	n = (size_t)blob[NAME_LEN_AT] << 8 | blob[NAME_LEN_AT + 1];
	if (n == 0 || n > NAME_MAX_LEN || NAME_AT + n > len)
		return -1;
	for (i = 0; i < n; i++) {
		unsigned char c = blob[NAME_AT + i];

		if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
			return -1;
		name[i] = (char)c;
	}
	name[n] = 0;
	return 0;
}

static int write_all(int fd, const unsigned char *p, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, p, len);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

/* Writes the blob atomically and durably: temporary file, fsync, rename,
 * fsync of the directory. */
static int store(const char *dir, const char *name, const unsigned char *blob, size_t len)
{
	char tmp[4096], final[4096];
	int fd, dfd, ok;

	snprintf(tmp, sizeof(tmp), "%s/%s.vtpm.tmp", dir, name);
	snprintf(final, sizeof(final), "%s/%s.vtpm", dir, name);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	ok = write_all(fd, blob, len) == 0 && fsync(fd) == 0;
	if (close(fd) != 0)
		ok = 0;
	if (!ok || rename(tmp, final) != 0) {
		unlink(tmp);
		return -1;
	}
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -1;
	ok = fsync(dfd) == 0;
	close(dfd);
	return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
	const char *dir = "/boot/ctvm";
	unsigned long count = 0, stored = 0;
	int opt, dev;

	while ((opt = getopt(argc, argv, "d:n:")) != -1) {
		switch (opt) {
		case 'd':
			dir = optarg;
			break;
		case 'n':
			count = strtoul(optarg, NULL, 10);
			break;
		default:
			fprintf(stderr, "usage: %s [-d DIR] [-n COUNT]\n", argv[0]);
			return 2;
		}
	}
	dev = open(DEVICE, O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		perror("ctvm-vtpm-store: " DEVICE);
		return 1;
	}
	printf("ctvm-vtpm-store: serving, blobs go to %s\n", dir);
	fflush(stdout);
	while (count == 0 || stored < count) {
		char name[NAME_MAX_LEN + 1];
		unsigned long long version = 0;
		ssize_t n = read(dev, record, sizeof(record));
		int i;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < RECORD_HEADER) {
			perror("ctvm-vtpm-store: read");
			return 1;
		}
		for (i = RECORD_HEADER - 1; i >= 0; i--)
			version = version << 8 | record[i];
		if (blob_name(record + RECORD_HEADER, (size_t)n - RECORD_HEADER, name) != 0) {
			fprintf(stderr, "ctvm-vtpm-store: version %llu is not a vTPM state blob\n", version);
			return 1;
		}
		/* Not stored, not reported: the hypervisor hands the same blob
		 * over again and keeps the vTPM's answer held meanwhile. */
		while (store(dir, name, record + RECORD_HEADER, (size_t)n - RECORD_HEADER) != 0) {
			perror("ctvm-vtpm-store: store");
			sleep(1);
		}
		if (write(dev, record, RECORD_HEADER) != RECORD_HEADER) {
			perror("ctvm-vtpm-store: report");
			return 1;
		}
		stored++;
		printf("ctvm-vtpm-store: stored %s version %llu (%ld bytes) in %s/%s.vtpm\n", name, version,
		       (long)(n - RECORD_HEADER), dir, name);
		fflush(stdout);
	}
	return 0;
}
