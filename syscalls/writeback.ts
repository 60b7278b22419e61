/**
 * ckpt_writeback(crid, fd, flags): write an in-memory checkpoint as an image
 * while the subtree runs on; the image is what checkpoint() would have
 * written at that moment. Released afterwards unless CKPT_KEEP; kept on a
 * failed write whatever the flags.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import { CKPT } from './abi.js';
import { InFlight, unwrap, type HandlerResult, type SyscallCtx } from './context.js';
import { int32, imagePlan } from './checkpoint.js';
import { usableCheckpoint } from './memckpt.js';

export function writeback(ctx: SyscallCtx): HandlerResult {
  const flags = ctx.args[2];
  const known = BigInt(CKPT.KEEP | CKPT.HANDLE);
  if (flags & ~known) throw new CkptError(errno('EINVAL'), 'ckpt_writeback', `flags 0x${flags.toString(16)}: only CKPT_KEEP and CKPT_HANDLE are accepted`);
  const handle = (flags & BigInt(CKPT.HANDLE)) !== 0n;
  const crid = BigInt.asIntN(64, ctx.args[0]);
  if (!handle && crid < 1n) throw new CkptError(errno('EINVAL'), 'ckpt_writeback', `crid ${crid}`);
  const c = usableCheckpoint(ctx, Number(crid), handle);
  const out = takeCallerFd(ctx.caller.tgid, int32(ctx.args[1]), 'write', 'ckpt_writeback');
  let plan;
  try {
    plan = imagePlan(c);
  } catch (e) {
    fs.closeSync(out);
    throw e;
  }
  // In flight (supervisor/io.ts): the reader may be a tracee of this tree.
  const store = ctx.sv.store;
  store.hold(c);
  return new InFlight({ kind: 'write', fd: out, plan }, (o) => {
    fs.closeSync(out);
    store.unhold(c);
    unwrap(o); // a failed write keeps the checkpoint, whatever the flags
    c.writtenBack = true;
    if (!(flags & BigInt(CKPT.KEEP))) store.release(c);
    return 0;
  });
}
