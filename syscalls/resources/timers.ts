/**
 * A process's timers: the three interval timers (setitimer: ITIMER_REAL,
 * ITIMER_VIRTUAL, ITIMER_PROF) and its POSIX timers (timer_create).
 *
 * Neither is inherited by fork, so a husk has none: they are read in the
 * stop, with injected calls, and only where there is something to read.
 * POSIX timers are listed by /proc/PID/timers (id, signal and sigev_value,
 * notify kind and target, clock), read while the stop's round of injected
 * calls runs; their time left, interval and overrun count come from
 * timer_gettime and timer_getoverrun. Interval timers show nowhere in
 * /proc: the supervisor's filter traps alarm and setitimer so that it
 * knows which processes ever armed one (Tracer.itimers), and only those
 * get the three getitimer calls.
 *
 * Restored after the process's threads exist (a SIGEV_THREAD_ID timer
 * names one): each POSIX timer is made again with its own id
 * (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.13), clock, signal, value and
 * target, and armed with the time it had left and its interval; interval
 * timers likewise. A rollback first deletes the timers the process has
 * now (made since, or the checkpoint's with their times since) and sets
 * every interval timer the process may have armed since. Times are
 * relative: a timer runs on for what it had left at the checkpoint, on
 * any clock.
 *
 * Refused (EOPNOTSUPP): a timer whose last expiry had overruns (the count
 * timer_getoverrun answers cannot be set again), an unknown notify kind.
 */
import { z, int, type Same } from '../../lib/schema.js';
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, addressOf } from '../../lib/libc.js';
import { Remote, CallBatch } from '../../supervisor/remote.js';
import type { Tracer } from '../../supervisor/tracer.js';
import type { SyscallCtx } from '../context.js';
import type { ProcessState } from '../state.js';
import type { ThreadState } from './thread.js';

export const SYS_alarm = 37, SYS_setitimer = 38;
const SYS_getitimer = 36, SYS_timer_create = 222, SYS_timer_settime = 223, SYS_timer_gettime = 224, SYS_timer_getoverrun = 225, SYS_timer_delete = 226, SYS_prctl = 157;
const PR_TIMER_CREATE_RESTORE_IDS = 77;
const SIGEV_SIGNAL = 0, SIGEV_NONE = 1, SIGEV_THREAD_ID = 4;
const ITIMERS = [0 /* REAL */, 1 /* VIRTUAL */, 2 /* PROF */] as const;

/** [seconds, fraction] as decimal strings: nanoseconds for POSIX timers, microseconds for interval timers. */
type Time = [string, string];

export interface PosixTimerState {
  id: number;
  clock: number;
  signo: number;
  /** sigev_value, hex. */
  value: string;
  notify: 'signal' | 'thread' | 'none';
  /** SIGEV_THREAD_ID: the index of the target in the process's threads. */
  thread?: number;
  /** Time left (zero: disarmed) and interval. */
  left: Time;
  interval: Time;
}

export interface ItimerState {
  which: 0 | 1 | 2;
  left: Time;
  interval: Time;
}

export interface TimersState {
  /** Armed interval timers only. */
  itimers?: ItimerState[];
  posix?: PosixTimerState[];
}

/** In the TREE record: ids, clocks, signals and times bounded. */
const timeSchema = z.tuple([z.string().regex(/^[0-9]{1,19}$/), z.string().regex(/^[0-9]{1,9}$/)]);
export const timersSchema = z.strictObject({
  itimers: z.array(z.strictObject({ which: z.union([z.literal(0), z.literal(1), z.literal(2)]), left: timeSchema, interval: timeSchema })).max(3).optional(),
  posix: z.array(z.strictObject({
    id: int(0, 2 ** 31 - 1), clock: int(-(2 ** 31), 2 ** 31 - 1), signo: int(0, 64), value: z.string().regex(/^[0-9a-f]{1,16}$/),
    notify: z.enum(['signal', 'thread', 'none']), thread: int(0, 1 << 16).optional(), left: timeSchema, interval: timeSchema,
  })).max(1 << 16).optional(),
});
const sameTimers: Same<z.infer<typeof timersSchema>, TimersState> = true;
void sameTimers;

/** setitimer or alarm seen on its way in: this process may have an interval timer from now on. */
export function noteItimer(ctx: SyscallCtx): void {
  ctx.tracer.itimers.add(ctx.caller.tgid);
}

interface ListedTimer { id: number; signo: number; value: string; notify: string; target: number; clock: number }

/** /proc/PID/timers. */
export function listTimers(pid: number): ListedTimer[] {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/timers`, 'utf8');
  } catch {
    return [];
  }
  const out: ListedTimer[] = [];
  for (const m of text.matchAll(/^ID: (\d+)\nsignal: (\d+)\/([0-9a-f]+)\nnotify: ([a-z]+\/[a-z]+)\.(\d+)\nClockID: (\d+)$/gm)) {
    out.push({ id: Number(m[1]), signo: Number(m[2]), value: m[3], notify: m[4], target: Number(m[5]), clock: Number(m[6]) });
  }
  return out;
}

const unsupported = (pid: number, why: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:timers', `task ${pid}: ${why}`);
const time = (b: Buffer, at: number): Time => [b.readBigInt64LE(at).toString(), b.readBigInt64LE(at + 8).toString()];
const armed = (t: Time) => t[0] !== '0' || t[1] !== '0';

/**
 * The timers of frozen process `pid` (`listed`: its /proc/PID/timers;
 * `threads`: its threads, host tids). Injected into its leader through
 * `r`, or a Remote of its own when there is none; undefined when it has
 * no timer.
 */
export function captureTimers(tracer: Tracer, pid: number, r: Remote | undefined, listed: ListedTimer[], threads: ThreadState[]): TimersState | undefined {
  const itimers = tracer.itimers.has(pid);
  if (!listed.length && !itimers) return undefined;
  const posix: PosixTimerState[] = listed.map((l) => {
    const [kind, whom] = l.notify.split('/');
    const notify = kind === 'none' ? 'none' : kind === 'signal' && whom === 'tid' ? 'thread' : kind === 'signal' ? 'signal' : undefined;
    if (!notify) throw unsupported(pid, `POSIX timer ${l.id} notifies as "${l.notify}"`);
    const thread = notify === 'thread' ? threads.findIndex((t) => t.tid === l.target) : undefined;
    if (thread === -1) throw unsupported(pid, `POSIX timer ${l.id} signals thread ${l.target}, not one of the process`);
    return { id: l.id, clock: l.clock, signo: l.signo, value: l.value, notify, thread, left: ['0', '0'], interval: ['0', '0'] };
  });
  const own = r ? undefined : new Remote(tracer, tracer.tasks.get(pid)!);
  const rr = (r ?? own)!;
  const n = posix.length + (itimers ? ITIMERS.length : 0);
  const slot = rr.stackScratch(32 * n);
  const base = slot?.addr ?? rr.scratch();
  try {
    const res: bigint[] = [];
    posix.forEach((p, i) => {
      res.push(rr.call(SYS_timer_gettime, p.id, base + BigInt(32 * i)));
      res.push(rr.call(SYS_timer_getoverrun, p.id));
    });
    if (itimers) ITIMERS.forEach((w, i) => res.push(rr.call(SYS_getitimer, w, base + BigInt(32 * (posix.length + i)))));
    const fail = res.findIndex((x) => x < 0n);
    if (fail >= 0) throw new CkptError(Number(-res[fail]), 'checkpoint:timers', `task ${pid}: injected timer call ${fail} failed`);
    const b = rr.mem.read(base, 32 * n);
    posix.forEach((p, i) => {
      p.interval = time(b, 32 * i);
      p.left = time(b, 32 * i + 16);
      if (res[2 * i + 1] > 0n) throw unsupported(pid, `POSIX timer ${p.id} had ${res[2 * i + 1]} overruns at its last expiry (timer_getoverrun cannot be made to answer that again)`);
    });
    const its: ItimerState[] = [];
    if (itimers) ITIMERS.forEach((which, i) => {
      const at = 32 * (posix.length + i);
      const it = { which, interval: time(b, at), left: time(b, at + 16) };
      if (armed(it.left)) its.push(it);
    });
    const state: TimersState = {};
    if (its.length) state.itimers = its;
    if (posix.length) state.posix = posix;
    return state.itimers || state.posix ? state : undefined;
  } finally {
    slot?.putBack();
    own?.finish();
  }
}

/**
 * The kernel adds one scheduler tick to a CPU interval timer as it is set
 * (ITIMER_VIRTUAL, ITIMER_PROF), and getitimer shows it: what was read is
 * set again less that tick, or every restore would add one. The tick
 * (1/HZ) is measured once, on the supervisor itself: set a far value,
 * read it back at once (less than a tick of CPU time passes), disarm.
 */
const tick = { ns: 0n };
function cpuTickNs(): bigint {
  if (tick.ns) return tick.ns;
  const set = Buffer.alloc(32), got = Buffer.alloc(32);
  set.writeBigInt64LE(1000n, 16);
  sys.syscall(SYS_setitimer, 2, addressOf(set), 0);
  sys.syscall(SYS_getitimer, 2, addressOf(got));
  sys.syscall(SYS_setitimer, 2, addressOf(Buffer.alloc(32)), 0);
  const extra = (got.readBigInt64LE(16) - 1000n) * 1_000_000_000n + got.readBigInt64LE(24) * 1000n;
  // The smallest tick of a usual HZ (1000, 300, 250, 100) that is not below what was seen.
  tick.ns = [1_000_000n, 3_333_334n, 4_000_000n, 10_000_000n].find((t) => extra <= t) ?? 0n;
  return tick.ns;
}

/** An interval timer's time left as read, to set again (see cpuTickNs): never down to 0, which would disarm it. */
function itimerLeft(it: ItimerState): Time {
  if (it.which === 0) return it.left;
  const us = BigInt(it.left[0]) * 1_000_000n + BigInt(it.left[1]);
  const left = us - cpuTickNs() / 1000n;
  const v = left > 0n ? left : 1n;
  return [(v / 1_000_000n).toString(), (v % 1_000_000n).toString()];
}

const spec = (interval: Time, left: Time) => {
  const b = Buffer.alloc(32);
  [...interval, ...left].forEach((v, i) => b.writeBigInt64LE(BigInt(v), 8 * i));
  return b;
};

/**
 * The checkpoint's timers in process `host` (rebuilt through `r`, its
 * threads all there), as the last calls before its registers and signals.
 * `live`: a process rolled back in place (what it has now goes first).
 */
export function restoreTimers(tracer: Tracer, r: Remote, p: ProcessState, host: number, live: boolean): void {
  const want = p.timers;
  const now = live ? listTimers(host) : [];
  // A live process that may have armed an interval timer since has all three set (to zero where the checkpoint had none).
  const setItimers = !!want?.itimers?.length || (live && tracer.itimers.has(host));
  if (!want?.posix?.length && !now.length && !setItimers) return;
  const b = new CallBatch(r);
  for (const t of now) b.add('restart:timers timer_delete', SYS_timer_delete, t.id);
  if (setItimers) {
    for (const which of ITIMERS) {
      const it = want?.itimers?.find((x) => x.which === which);
      b.add('restart:timers setitimer', SYS_setitimer, which, b.put(spec(it?.interval ?? ['0', '0'], it ? itimerLeft(it) : ['0', '0'])), 0);
    }
    tracer.itimers.add(host);
  }
  const posix = want?.posix ?? [];
  if (posix.length) b.add('restart:timers PR_TIMER_CREATE_RESTORE_IDS', SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0);
  b.run();
  // Each timer: a struct sigevent (64 bytes), its id, its itimerspec; a few dozen per batch.
  const PER = 24;
  for (let i = 0; i < posix.length; i += PER) {
    const part = new CallBatch(r);
    for (const t of posix.slice(i, i + PER)) {
      const sev = Buffer.alloc(64);
      sev.writeBigUInt64LE(BigInt('0x' + t.value), 0);
      sev.writeInt32LE(t.signo, 8);
      if (t.notify === 'thread') {
        const target = p.threads[t.thread ?? -1];
        if (!target) throw new CkptError(errno('EBADMSG'), 'image', `process ${p.ids.pid}: timer ${t.id} signals no thread of it`);
        sev.writeInt32LE(SIGEV_THREAD_ID, 12);
        sev.writeInt32LE(target.tid, 16); // as the process sees it: the tree's ids
      } else sev.writeInt32LE(t.notify === 'none' ? SIGEV_NONE : SIGEV_SIGNAL, 12);
      const id = Buffer.alloc(4);
      id.writeInt32LE(t.id);
      part.add(`restart:timers timer_create ${t.id}`, SYS_timer_create, t.clock, part.put(sev), part.put(id));
      if (armed(t.left)) part.add(`restart:timers timer_settime ${t.id}`, SYS_timer_settime, t.id, 0, part.put(spec(t.interval, t.left)), 0);
    }
    part.run();
  }
  // Back to ids chosen by the kernel for the program's own timer_create (a failure above kills the process anyway).
  if (posix.length) r.check('restart:timers PR_TIMER_CREATE_RESTORE_IDS', SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0);
}
