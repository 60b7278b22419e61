/**
 * The ckpt ABI (../shared/ABI.md). syscalls/ckpt.h carries the same numbers
 * for C programs; test/abi.test.ts checks that the two agree.
 */
export const NR = {
  checkpoint: 1000,
  restart: 1001,
  ckpt_writeback: 1002,
  ckpt_release: 1003,
  ckpt_query: 1004,
} as const;

export const NR_FIRST = NR.checkpoint;
export const NR_LAST = NR.ckpt_query;

export const CKPT = {
  DEFER: 0x1,
  KEEP: 0x2,
  KILL: 0x4,
  HANDLE: 0x8,
} as const;

export type SyscallName = keyof typeof NR;
