/**
 * The kernel's event files: eventfd, signalfd, timerfd and epoll. Kept as
 * /proc/PID/fdinfo describes them, made again with their own calls:
 *
 * - eventfd: its counter and semaphore mode (the counter is written in
 *   after creation: eventfd2 takes only 32 bits).
 * - signalfd: its mask (the pending signals themselves are process state).
 * - timerfd: clock, time left, interval, and expirations not yet read
 *   (TFD_IOC_SET_TICKS). An absolute timer on a wall clock is set again at
 *   the same wall-clock time; any other runs on for the time it had left.
 * - epoll: every watch (descriptor number, events, data), added again once
 *   every other descriptor is back. A watch whose file is no longer at its
 *   number cannot be named again: EOPNOTSUPP.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys } from '../../lib/libc.js';
import type { FdInfo } from '../../lib/proc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, fd, u32, hex64, dec63, dec64, MANY, type Same } from '../../lib/schema.js';

const SYS_timerfd_settime = 286, SYS_signalfd4 = 289, SYS_eventfd2 = 290, SYS_epoll_create1 = 291, SYS_timerfd_create = 283, SYS_epoll_ctl = 233;
const O_CLOEXEC = 0o2000000, EFD_SEMAPHORE = 1, TFD_TIMER_ABSTIME = 1, TFD_TIMER_CANCEL_ON_SET = 2, EPOLL_CTL_ADD = 1;
const TFD_IOC_SET_TICKS = 0x40085400n;
/** Clocks whose absolute times mean the same on any machine and boot. */
const WALL_CLOCKS = new Set([0 /* REALTIME */, 8 /* REALTIME_ALARM */, 11 /* TAI */]);

export type EventState =
  /** count: hex, as fdinfo shows it ("eventfd-count: 5a" is 90). */
  | { kind: 'eventfd'; count: string; semaphore: boolean }
  | { kind: 'signalfd'; mask: string }
  | { kind: 'timerfd'; clock: number; settime: number; left: [string, string]; interval: [string, string]; ticks: string; takenAtMs: number }
  | { kind: 'epoll'; watches: { fd: number; events: number; data: string }[] };

/** "(seconds, nanoseconds)" as the code keeps it. */
const timespecSchema = z.tuple([dec63, z.string().regex(/^[0-9]{1,9}$/, 'not nanoseconds')]);
export const eventSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('eventfd'), count: hex64.refine((c) => c !== 'ffffffffffffffff', 'an eventfd counts at most 2^64-2'), semaphore: z.boolean() }),
  z.strictObject({ kind: z.literal('signalfd'), mask: hex64 }),
  z.strictObject({
    kind: z.literal('timerfd'),
    clock: z.union([0, 1, 7, 8, 9].map((c) => z.literal(c)) as [z.ZodLiteral<number>, ...z.ZodLiteral<number>[]]),
    settime: int(0, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET),
    left: timespecSchema,
    interval: timespecSchema,
    ticks: dec64,
    takenAtMs: z.number().min(0).max(1e16),
  }),
  z.strictObject({ kind: z.literal('epoll'), watches: z.array(z.strictObject({ fd, events: u32, data: hex64 })).max(MANY) }),
]);
const sameEvent: Same<z.infer<typeof eventSchema>, EventState> = true;
void sameEvent;

const unsupported = (pid: number, fd: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (${what})`);

/** "(2, 990651604)" -> ["2", "990651604"] */
function timespec(v: string | undefined): [string, string] {
  const m = /\((\d+),\s*(\d+)\)/.exec(v ?? '');
  return m ? [m[1], m[2]] : ['0', '0'];
}

/** The event file behind fd `fd` of `pid` (its /proc link says which kind), or undefined if it is none. */
export function captureEvent(pid: number, fd: number, target: string, info: FdInfo): EventState | undefined {
  const kv = info.extra;
  switch (target) {
    case 'anon_inode:[eventfd]':
      return { kind: 'eventfd', count: (kv.get('eventfd-count') ?? '0').trim(), semaphore: kv.get('eventfd-semaphore') === '1' };
    case 'anon_inode:[signalfd]':
      return { kind: 'signalfd', mask: kv.get('sigmask') ?? '0' };
    case 'anon_inode:[timerfd]':
      return {
        kind: 'timerfd', clock: Number(kv.get('clockid') ?? 1), settime: parseInt(kv.get('settime flags') ?? '0', 8),
        left: timespec(kv.get('it_value')), interval: timespec(kv.get('it_interval')), ticks: kv.get('ticks') ?? '0', takenAtMs: Date.now(),
      };
    case 'anon_inode:[eventpoll]': {
      const watches: { fd: number; events: number; data: string }[] = [];
      for (const m of info.text.matchAll(/^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+).*?ino:([0-9a-f]+)/gm)) {
        const tfd = Number(m[1]);
        let ino = -1;
        try {
          ino = fs.statSync(`/proc/${pid}/fd/${tfd}`).ino;
        } catch { /* closed since it was added */ }
        if (ino !== parseInt(m[4], 16)) throw unsupported(pid, fd, `epoll watching a file that is no longer at its descriptor ${tfd}`);
        watches.push({ fd: tfd, events: parseInt(m[2], 16), data: m[3] });
      }
      return { kind: 'epoll', watches };
    }
    default:
      return undefined;
  }
}

/** Make the event file in `r` (an epoll without its watches: see addWatches); its descriptor there. */
export function makeEvent(r: Remote, host: number, e: EventState): bigint {
  const what = `restart:files ${e.kind}`;
  if (e.kind === 'eventfd') {
    const fd = r.check(what, SYS_eventfd2, 0, O_CLOEXEC | (e.semaphore ? EFD_SEMAPHORE : 0));
    const count = BigInt('0x' + e.count);
    if (count) withTraceeFd(host, fd, what, (mine) => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(count);
      if (fs.writeSync(mine, b) !== 8) throw new CkptError(errno('EINVAL'), what, `task ${r.task.tid}: cannot set the counter to ${count}`);
    });
    return fd;
  }
  if (e.kind === 'signalfd') {
    const b = new CallBatch(r);
    const mask = Buffer.alloc(8);
    mask.writeBigUInt64LE(BigInt('0x' + e.mask));
    b.add(what, SYS_signalfd4, -1, b.put(mask), 8, O_CLOEXEC);
    return b.run()[0];
  }
  if (e.kind === 'epoll') return r.check(what, SYS_epoll_create1, O_CLOEXEC);
  if (e.kind !== 'timerfd') throw new CkptError(errno('EBADMSG'), 'image', `an event file of unknown kind ${(e as { kind: unknown }).kind}`);
  const fd = r.check(what, SYS_timerfd_create, e.clock, O_CLOEXEC);
  const [ls, ln] = e.left.map(BigInt), [is, ins] = e.interval.map(BigInt);
  if (ls || ln) {
    let flags = 0, at = [ls, ln];
    if (e.settime & TFD_TIMER_ABSTIME && WALL_CLOCKS.has(e.clock)) {
      // The same wall-clock time: when it was taken plus what was left then.
      const ns = BigInt(e.takenAtMs) * 1_000_000n + ls * 1_000_000_000n + ln;
      at = [ns / 1_000_000_000n, ns % 1_000_000_000n];
      flags = e.settime & (TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET);
    }
    const spec = Buffer.alloc(32);
    [is, ins, at[0], at[1]].forEach((v, i) => spec.writeBigInt64LE(v, 8 * i));
    const b = new CallBatch(r);
    b.add(what, SYS_timerfd_settime, fd, flags, b.put(spec), 0);
    b.run();
  }
  const ticks = BigInt(e.ticks);
  if (ticks) withTraceeFd(host, fd, what, (mine) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(ticks);
    if (sys.ioctl(mine, TFD_IOC_SET_TICKS, b) < 0) throw new CkptError(errno('EOPNOTSUPP'), what, `task ${r.task.tid}: cannot set ${ticks} expirations not yet read`);
  });
  return fd;
}

/** The watches of an epoll (at `epfd` in `r`), once every descriptor they name is back. */
export function addWatches(r: Remote, epfd: number, e: Extract<EventState, { kind: 'epoll' }>): void {
  const PER = 200; // 16 bytes of scratch each
  for (let i = 0; i < e.watches.length; i += PER) {
    const b = new CallBatch(r);
    for (const w of e.watches.slice(i, i + PER)) {
      const ev = Buffer.alloc(12); // struct epoll_event is packed on x86-64
      ev.writeUInt32LE(w.events >>> 0, 0);
      ev.writeBigUInt64LE(BigInt('0x' + w.data), 4);
      b.add(`restart:files epoll watch of fd ${w.fd}`, SYS_epoll_ctl, epfd, EPOLL_CTL_ADD, w.fd, b.put(ev));
    }
    b.run();
  }
}
