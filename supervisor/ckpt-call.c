/*
 * ckpt-call: what `ckpt checkpoint` becomes (execve) to make the call. The
 * Node tool holds descriptors no checkpoint can keep (epoll, eventfd), so a
 * shell that checkpoints its own tree ("ckpt checkpoint $$") would be
 * refused; this small process is kept and restored like any other. After a
 * restart it sees the call return 0 and exits 0.
 *
 * usage: ckpt-call PID FD FLAGS PRINT_CRID DESCRIPTION [WRITTEN [FINAL]]
 *
 * WRITTEN is the file FD writes to: removed if the call fails (no empty or
 * partial image is left behind); renamed to FINAL once the call succeeds, so
 * that FINAL only ever holds a whole image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "../syscalls/ckpt.h"

int main(int argc, char **argv)
{
	if (argc < 6) return 2;
	long r = ckpt_checkpoint(atoi(argv[1]), atoi(argv[2]), strtoul(argv[3], NULL, 0));
	if (r < 0) {
		const char *e = strerrorname_np(errno);
		if (errno == ENOSYS) fprintf(stderr, "ckpt: checkpoint: not running under ckpt-supervise (ENOSYS)\n");
		else fprintf(stderr, "ckpt: checkpoint: %s (see the ckpt-supervise log for the reason)\n", e ? e : "?");
		if (argc > 6) unlink(argv[6]);
		return 1;
	}
	if (r == 0) {
		fprintf(stderr, "ckpt: back from a restart of this checkpoint\n");
		return 0;
	}
	if (argc > 7 && strcmp(argv[6], argv[7]) && rename(argv[6], argv[7]) < 0) {
		fprintf(stderr, "ckpt: checkpoint %ld: cannot rename %s to %s: %s\n", r, argv[6], argv[7], strerror(errno));
		return 1;
	}
	if (atoi(argv[4])) printf("%ld\n", r);
	fprintf(stderr, "ckpt: checkpoint %ld of %s\n", r, argv[5]);
	return 0;
}
