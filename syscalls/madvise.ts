/**
 * madvise(addr, len, MADV_DONTFORK or MADV_WIPEONFORK), seen on its way in
 * (the seccomp filter traps only these two pieces of advice) and then run
 * as asked: the process is marked as one that may hold memory fork does
 * not copy, which its checkpoints then look for during the stop (see
 * copyUnforked). Nothing else is changed; the call's result is the kernel's.
 */
import type { SyscallCtx } from './context.js';

export function noteForkAdvice(ctx: SyscallCtx): void {
  ctx.tracer.forkAdvice.add(ctx.caller.tgid);
}
