/*
 * ckpt: checkpoint/restart system calls served by ckpt-supervise.
 * The contract is ../shared/ABI.md; syscalls/abi.ts holds the same values
 * (a test checks that they agree). Outside a supervisor every call fails
 * with ENOSYS.
 */
#ifndef CKPT_H
#define CKPT_H

#include <sys/types.h>
#include <stddef.h>
#include <unistd.h>
#include <sys/syscall.h>

#define __NR_checkpoint      1000
#define __NR_restart         1001
#define __NR_ckpt_writeback  1002
#define __NR_ckpt_release    1003
#define __NR_ckpt_query      1004

#define CKPT_DEFER   0x1UL  /* capture into memory only; fd must be -1 */
#define CKPT_KEEP    0x2UL  /* write the image and keep the checkpoint */
#define CKPT_KILL    0x4UL  /* kill the subtree after the checkpoint */
#define CKPT_HANDLE  0x8UL  /* the crid argument / result is a handle fd */

static inline long ckpt_checkpoint(pid_t pid, int fd, unsigned long flags)
{
	return syscall(__NR_checkpoint, pid, fd, flags);
}

static inline long ckpt_restart(long crid, int fd, unsigned long flags)
{
	return syscall(__NR_restart, crid, fd, flags);
}

static inline long ckpt_writeback(long crid, int fd, unsigned long flags)
{
	return syscall(__NR_ckpt_writeback, crid, fd, flags);
}

static inline long ckpt_release(long crid, unsigned long flags)
{
	return syscall(__NR_ckpt_release, crid, flags);
}

static inline long ckpt_query(long crid, char *buf, size_t len, unsigned long flags)
{
	return syscall(__NR_ckpt_query, crid, buf, len, flags);
}

#endif /* CKPT_H */
