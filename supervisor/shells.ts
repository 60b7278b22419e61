/**
 * Shells: the stopped processes and threads a restart turns into the
 * checkpointed ones. A shell is made by injecting clone3 with set_tid into
 * its parent-to-be, so it gets its original pid and parent; a thread shell
 * is made the same way with CLONE_THREAD inside its process.
 */
import { CkptError, errno } from '../lib/errors.js';
import { sys, SYS } from '../lib/libc.js';
import { Remote } from './remote.js';
import type { Tracer, Task } from './tracer.js';

const SIGCHLD = 17, SIGKILL = 9;
const CLONE_VM = 0x100, CLONE_FS = 0x200, CLONE_FILES = 0x400, CLONE_SIGHAND = 0x800;
const CLONE_THREAD = 0x10000, CLONE_SYSVSEM = 0x40000;
export const THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;

/**
 * Inject clone3(flags, set_tid = [tid]) into the task behind `r`; returns the
 * new task, stopped at its first stop. `scratch` must be writable memory of
 * that process.
 */
export function cloneWithTid(tracer: Tracer, r: Remote, tid: number, flags: number, scratch: bigint): Task {
  const args = Buffer.alloc(88); // struct clone_args
  args.writeBigUInt64LE(BigInt(flags), 0);
  args.writeBigUInt64LE(BigInt(flags & CLONE_THREAD ? 0 : SIGCHLD), 32); // exit_signal
  args.writeBigUInt64LE(scratch + 128n, 64); // set_tid
  args.writeBigUInt64LE(1n, 72); // set_tid_size
  r.mem.write(scratch, args);
  const want = Buffer.alloc(8);
  want.writeBigInt64LE(BigInt(tid));
  r.mem.write(scratch + 128n, want);
  const before = r.newChildren.length;
  const res = r.call(SYS.clone3, scratch, args.length);
  if (res < 0n) {
    const e = Number(-res);
    if (e === errno('EEXIST')) throw new CkptError(errno('EBUSY'), 'restart', `pid ${tid} of the image is in use`);
    throw new CkptError(e, 'restart', `task ${r.task.tid}: clone3 with set_tid ${tid} failed`);
  }
  // The new task as we (the tracer) name it: rax has it as its parent names it,
  // which differs inside a pid namespace.
  const child = r.newChildren[before] ?? Number(res);
  const t = tracer.add(child, flags & CLONE_THREAD ? r.task.tgid : child);
  for (;;) {
    const ev = tracer.wait(child);
    if (!ev || ev.kind !== 'stopped') throw new CkptError(errno('ESRCH'), 'restart', `new task ${child} died before it could be rebuilt`);
    if (ev.event !== 0 || ev.signal === 19 || ev.signal === 5) break;
    t.heldSignals.push(ev.signal);
    sys.ptrace(7, child, 0, 0);
  }
  t.heldSignals.length = 0;
  return t;
}

/**
 * Kill half-built processes and leave no trace: the root's zombie is reaped
 * in the caller (the others, orphaned, come to us as subreaper), and the
 * SIGCHLD it caused is not passed on to the caller.
 */
export function destroyShells(tracer: Tracer, caller: Task, rootPid: number | undefined, pids: number[]): void {
  for (const p of pids) sys.kill(p, SIGKILL);
  for (const p of pids) tracer.waitGone(p);
  if (rootPid === undefined) return;
  const r = new Remote(tracer, caller);
  try {
    r.call(SYS.wait4, rootPid, 0, 0x40000000 /* __WALL */, 0);
  } finally {
    r.finish();
  }
  tracer.dropHeld([caller], SIGCHLD);
}
