/**
 * ckpt_query(crid, buf, len, flags): a JSON description of one in-memory
 * checkpoint (crid >= 1, or a handle), or an array of all those the caller
 * may use (crid 0). Returns the full length; writes at most len bytes.
 */
import { CkptError, errno } from '../lib/errors.js';
import { RemoteMem } from '../lib/mem.js';
import { readStatus } from '../lib/proc.js';
import { CKPT } from './abi.js';
import type { SyscallCtx } from './context.js';
import { usableCheckpoint, referencedBytes, type MemCheckpoint } from './memckpt.js';
import { parseCreds } from './resources/process.js';

export function describeCheckpoint(c: MemCheckpoint) {
  return {
    crid: c.crid,
    root: c.tree.root,
    pids: c.tree.processes.map((p) => p.ids.pid),
    threads: c.tree.processes.reduce((n, p) => n + p.threads.length, 0),
    created: c.created,
    referencedBytes: referencedBytes(c),
    privateBytes: c.privateBytes,
    stopMs: Number(c.stopMs.toFixed(3)),
    writtenBack: c.writtenBack,
    handle: c.handleFd !== undefined,
    husks: [...c.husks.values()],
    note: 'memory is held by stopped copy-on-write snapshots (husks) living in the subtree\'s pid namespace; if that namespace\'s init dies, they die and the checkpoint with them',
  };
}

export function query(ctx: SyscallCtx): number {
  const [crid0, buf, len, flags] = ctx.args;
  if (flags & ~BigInt(CKPT.HANDLE)) throw new CkptError(errno('EINVAL'), 'ckpt_query', `flags 0x${flags.toString(16)}: only CKPT_HANDLE is accepted`);
  const crid = BigInt.asIntN(64, crid0);
  const handle = flags !== 0n;
  if (crid < 0n || (handle && crid === 0n)) throw new CkptError(errno('EINVAL'), 'ckpt_query', `crid ${crid}`);
  let value: unknown;
  if (crid === 0n && !handle) {
    ctx.sv.store.reapHandles();
    const cs = readStatus(ctx.caller.tgid);
    const privileged = (BigInt('0x' + (cs.get('CapEff') ?? '0')) & (1n << 19n)) !== 0n;
    const uid = parseCreds(cs).uid[0];
    value = [...ctx.sv.store.all.values()].filter((c) => privileged || c.uid === uid).map(describeCheckpoint);
  } else value = describeCheckpoint(usableCheckpoint(ctx, Number(crid), handle));
  const text = Buffer.from(JSON.stringify(value));
  const n = Math.min(Number(BigInt.asUintN(63, len)), text.length);
  if (n > 0) {
    if (buf === 0n) throw new CkptError(errno('EFAULT'), 'ckpt_query', `task ${ctx.caller.tid}: NULL buffer of ${len} bytes`);
    const mem = new RemoteMem(ctx.caller.tgid, true);
    try {
      mem.write(buf, text.subarray(0, n));
    } catch {
      throw new CkptError(errno('EFAULT'), 'ckpt_query', `task ${ctx.caller.tid}: buffer 0x${buf.toString(16)}+${n} is not writable`);
    } finally {
      mem.close();
    }
  }
  return text.length;
}
