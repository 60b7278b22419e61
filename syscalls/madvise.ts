/**
 * Calls the seccomp filter traps only to take note of (then they run as
 * asked; nothing is changed; the result is the kernel's):
 * - madvise(addr, len, MADV_DONTFORK or MADV_WIPEONFORK): the process may
 *   hold memory fork does not copy, which its checkpoints then look for
 *   during the stop (see copyUnforked);
 * - madvise with advice smaps shows as a VMA flag (MADV_DONTDUMP, HUGEPAGE,
 *   NOHUGEPAGE, RANDOM, SEQUENTIAL, MERGEABLE), mlock, mlock2, mlockall:
 *   its rollbacks compare those flags (reading smaps, which costs);
 * - mlockall(MCL_FUTURE), munlockall: whether mappings made later get
 *   locked, which /proc does not show (a checkpoint refuses it).
 */
import type { SyscallCtx } from './context.js';
import { MADV_DONTFORK, MADV_WIPEONFORK } from '../lib/seccomp.js';
import { SYS } from '../lib/libc.js';

const MCL_FUTURE = 2, SYS_munlockall = 152;

export function noteMadvise(ctx: SyscallCtx): void {
  const advice = Number(ctx.args[2] & 0xffffffffn);
  if (advice === MADV_DONTFORK || advice === MADV_WIPEONFORK) ctx.tracer.forkAdvice.add(ctx.caller.tgid);
  else ctx.tracer.vmAdvice.add(ctx.caller.tgid);
}

export function noteLock(ctx: SyscallCtx): void {
  ctx.tracer.vmAdvice.add(ctx.caller.tgid);
}

export function noteLockAll(ctx: SyscallCtx): void {
  ctx.tracer.vmAdvice.add(ctx.caller.tgid);
  if (Number(ctx.args[0] & 0xffffffffn) & MCL_FUTURE) ctx.tracer.lockFuture.add(ctx.caller.tgid);
}

export function noteUnlockAll(ctx: SyscallCtx): void {
  ctx.tracer.lockFuture.delete(ctx.caller.tgid);
}

export const NOTED_MEMORY: Record<number, (ctx: SyscallCtx) => void> = {
  [SYS.madvise]: noteMadvise,
  [SYS.mlock]: noteLock,
  [SYS.mlock2]: noteLock,
  [SYS.mlockall]: noteLockAll,
  [SYS_munlockall]: noteUnlockAll,
};
