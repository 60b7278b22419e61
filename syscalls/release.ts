/** ckpt_release(crid, flags): discard an in-memory checkpoint and all it holds. */
import { CkptError, errno } from '../lib/errors.js';
import { CKPT } from './abi.js';
import type { SyscallCtx } from './context.js';
import { usableCheckpoint } from './memckpt.js';

export function release(ctx: SyscallCtx): number {
  const flags = ctx.args[1];
  if (flags & ~BigInt(CKPT.HANDLE)) throw new CkptError(errno('EINVAL'), 'ckpt_release', `flags 0x${flags.toString(16)}: only CKPT_HANDLE is accepted`);
  const handle = flags !== 0n;
  const crid = BigInt.asIntN(64, ctx.args[0]);
  if (!handle && crid < 1n) throw new CkptError(errno('EINVAL'), 'ckpt_release', `crid ${crid}`);
  ctx.sv.store.release(usableCheckpoint(ctx, Number(crid), handle));
  return 0;
}
