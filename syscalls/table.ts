/**
 * The syscall table (gVisor style): number -> handler. The tracer calls
 * `serve` at every seccomp stop; handlers throw CkptError for errors, which
 * become -errno in the caller plus one log line.
 */
import { NR, type SyscallName } from './abi.js';
import { CkptError, asCkptError, errno, errnoName } from '../lib/errors.js';
import { getRegs, setRegs, PT } from '../lib/ptrace.js';
import { log, logError } from '../lib/log.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { NO_RETURN, InFlight, type Handler, type HandlerResult, type Supervisor, type SyscallCtx } from './context.js';
import { checkpoint } from './checkpoint.js';
import { restart } from './restart.js';
import { writeback } from './writeback.js';
import { release } from './release.js';
import { query } from './query.js';
import { NOTED_MEMORY } from './madvise.js';
import { noteSeccompMode } from './strict.js';
import { noteItimer, SYS_alarm, SYS_setitimer } from './resources/timers.js';
import { SYS } from '../lib/libc.js';
import { NOTED_SYSV } from './resources/sysvipc.js';

const SYS_seccomp = 317;
import { collectYoung } from '../lib/gc.js';

export const TABLE: Record<number, { name: SyscallName; handler: Handler }> = {
  [NR.checkpoint]: { name: 'checkpoint', handler: checkpoint },
  [NR.restart]: { name: 'restart', handler: restart },
  [NR.ckpt_writeback]: { name: 'ckpt_writeback', handler: writeback },
  [NR.ckpt_release]: { name: 'ckpt_release', handler: release },
  [NR.ckpt_query]: { name: 'ckpt_query', handler: query },
};

/** Ordinary calls the filter traps only to take note of: they then run untouched (true: to their exit stop, Task.atSyscallExit). */
export const NOTED: Record<number, (ctx: SyscallCtx) => void | boolean> = {
  ...NOTED_MEMORY,
  ...NOTED_SYSV, // which SysV objects a tree uses; SEM_UNDO
  [SYS.prctl]: noteSeccompMode, // notes the prctl options attrs.ts keeps, and makes strict mode a filter
  [SYS_seccomp]: noteSeccompMode,
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
    const toExit = note({ sv, tracer, caller, args });
    tracer.resume(caller, 0, toExit === true ? PT.SYSCALL : PT.CONT); // from the seccomp stop: the call itself runs now
    return;
  }
  const entry = TABLE[nr];
  const call: Call = { sv, tracer, caller, name: entry?.name ?? String(nr), args, t0: performance.now(), trips0: tracer.roundTrips };
  if (!entry) reply(call, -BigInt(errno('ENOSYS')));
  else settle(call, () => entry.handler({ sv, tracer, caller, args }));
}

interface Call {
  sv: Supervisor;
  tracer: Tracer;
  caller: Task;
  name: string;
  args: bigint[];
  t0: number;
  trips0: number;
  /** It went in flight once (its caller's inFlight then names it, until a rollback clears that). */
  flew?: boolean;
}

/**
 * Run one step of a call: the handler, or the continuation of a call in
 * flight. An InFlight result hands its job to the I/O pool and comes back
 * here when the job is done; anything else answers the caller.
 */
function settle(call: Call, step: () => HandlerResult): void {
  let r: HandlerResult;
  try {
    r = step();
  } catch (e) {
    const err = asCkptError(e, call.name);
    logError(`task ${call.caller.tid}: ${call.name}: ${errnoName(err.errno)}: ${err.op === call.name ? '' : err.op + ': '}${err.detail}`);
    r = -BigInt(err.errno);
  }
  if (r instanceof InFlight) {
    const f = r;
    if (!call.flew) call.caller.inFlight = call;
    call.flew = true;
    call.sv.io.submit(f.job, (o) => settle(call, () => f.then(o as never)));
  } else if (r === NO_RETURN) {
    log.syscall('%d: %s(%s) did not return (%s ms, %d injected runs)', call.caller.tid, call.name, call.args.slice(0, 3).join(', '), (performance.now() - call.t0).toFixed(2), call.tracer.roundTrips - call.trips0);
  } else {
    reply(call, BigInt(r));
    return;
  }
  call.sv.runLater(); // the program runs now (a job in flight, or the caller went on)
}

function reply(call: Call, ret: bigint): void {
  const { tracer, caller } = call;
  log.syscall('%d: %s(%s) = %d (%s ms, %d injected runs)', caller.tid, call.name, call.args.slice(0, 3).join(', '), ret, (performance.now() - call.t0).toFixed(2), tracer.roundTrips - call.trips0);
  // A caller rolled back or restored while its call was in flight is no longer in that call.
  const current = !call.flew || caller.inFlight === call;
  if (current) {
    caller.inFlight = undefined;
    answerCaller(tracer, caller, ret);
  }
  call.sv.runLater();
  collectYoung(); // while the program runs, not in the next stop
}

function answerCaller(tracer: Tracer, caller: Task, ret: bigint): void {
  // Whatever stop the caller is in now (seccomp, or a stop after injected
  // syscalls that put its registers back), orig_rax -1 skips any syscall.
  // The caller may be gone (CKPT_KILL of its own subtree, or killed while
  // its call was in flight): nothing to answer.
  if (!tracer.tasks.has(caller.tid)) return;
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
