/**
 * The syscall table (gVisor style): number -> handler. The tracer calls
 * `serve` at every seccomp stop; handlers throw CkptError for errors, which
 * become -errno in the caller plus one log line.
 */
import { NR, type SyscallName } from './abi.js';
import { CkptError, asCkptError, errno, errnoName } from '../lib/errors.js';
import { getRegs, setRegs } from '../lib/ptrace.js';
import { log, logError } from '../lib/log.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { NO_RETURN, type Handler, type Supervisor, type SyscallCtx } from './context.js';
import { checkpoint } from './checkpoint.js';
import { restart } from './restart.js';
import { writeback } from './writeback.js';
import { release } from './release.js';
import { query } from './query.js';
import { noteForkAdvice } from './madvise.js';
import { noteItimer, SYS_alarm, SYS_setitimer } from './resources/timers.js';
import { SYS } from '../lib/libc.js';
import { collectYoung } from '../lib/gc.js';

export const TABLE: Record<number, { name: SyscallName; handler: Handler }> = {
  [NR.checkpoint]: { name: 'checkpoint', handler: checkpoint },
  [NR.restart]: { name: 'restart', handler: restart },
  [NR.ckpt_writeback]: { name: 'ckpt_writeback', handler: writeback },
  [NR.ckpt_release]: { name: 'ckpt_release', handler: release },
  [NR.ckpt_query]: { name: 'ckpt_query', handler: query },
};

/** Ordinary calls the filter traps only to take note of: they then run untouched. */
export const NOTED: Record<number, (ctx: SyscallCtx) => void> = {
  [SYS.madvise]: noteForkAdvice,
  [SYS_alarm]: noteItimer,
  [SYS_setitimer]: noteItimer,
};

const ARG_REGS = ['rdi', 'rsi', 'rdx', 'r10', 'r8', 'r9'] as const;

export function serve(sv: Supervisor, tracer: Tracer, caller: Task): void {
  const regs = getRegs(caller.tid);
  const nr = Number(regs.getSigned('orig_rax'));
  const args = ARG_REGS.map((r) => regs.get(r));
  const note = NOTED[nr];
  if (note) {
    note({ sv, tracer, caller, args });
    tracer.resume(caller); // from the seccomp stop: the call itself runs now
    return;
  }
  answer(sv, tracer, caller, nr, args);
  sv.runLater();
  collectYoung(); // while the program runs, not in the next stop
}

function answer(sv: Supervisor, tracer: Tracer, caller: Task, nr: number, args: bigint[]): void {
  const t0 = performance.now(), trips0 = tracer.roundTrips;
  const trips = () => tracer.roundTrips - trips0;
  const entry = TABLE[nr];
  let ret: bigint;
  if (!entry) {
    ret = -BigInt(errno('ENOSYS'));
  } else {
    try {
      const r = entry.handler({ sv, tracer, caller, args });
      if (r === NO_RETURN) {
        log.syscall('%d: %s(%s) did not return (%s ms, %d injected runs)', caller.tid, entry.name, args.slice(0, 3).join(', '), (performance.now() - t0).toFixed(2), trips());
        return;
      }
      ret = BigInt(r);
    } catch (e) {
      const err = asCkptError(e, entry.name);
      logError(`task ${caller.tid}: ${entry.name}: ${errnoName(err.errno)}: ${err.op === entry.name ? '' : err.op + ': '}${err.detail}`);
      ret = -BigInt(err.errno);
    }
  }
  log.syscall('%d: %s(%s) = %d (%s ms, %d injected runs)', caller.tid, entry?.name ?? nr, args.slice(0, 3).join(', '), ret, (performance.now() - t0).toFixed(2), trips());
  // Whatever stop the caller is in now (seccomp, or a stop after injected
  // syscalls that put its registers back), orig_rax -1 skips any syscall.
  // The caller may be gone (CKPT_KILL of its own subtree): nothing to answer.
  try {
    const now = getRegs(caller.tid);
    now.set('rax', ret);
    now.set('orig_rax', -1n);
    setRegs(caller.tid, now);
  } catch (e) {
    if (e instanceof CkptError && e.errno === errno('ESRCH')) return;
    throw e;
  }
  tracer.resume(caller);
}
