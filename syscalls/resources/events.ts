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
 *   every other descriptor is back. A watch is its file and the number it
 *   was added under: a watch whose file left that number (dup'ed, then
 *   closed or replaced there) is found among the tree's descriptions with
 *   kcmp(KCMP_EPOLL_TFD) and added again under its old number, the file
 *   put there just for the epoll_ctl (what the number holds now is put
 *   back). One whose file no process of the subtree holds is refused.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, addressOf } from '../../lib/libc.js';
import type { FdInfo } from '../../lib/proc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, fd, u32, hex64, dec63, dec64, MANY, type Same } from '../../lib/schema.js';

const SYS_timerfd_settime = 286, SYS_timerfd_gettime = 287, SYS_signalfd4 = 289, SYS_eventfd2 = 290, SYS_epoll_create1 = 291, SYS_timerfd_create = 283, SYS_epoll_ctl = 233;
const O_CLOEXEC = 0o2000000, EFD_SEMAPHORE = 1, TFD_TIMER_ABSTIME = 1, TFD_TIMER_CANCEL_ON_SET = 2, EPOLL_CTL_ADD = 1;
const TFD_IOC_SET_TICKS = 0x40085400n;
const SYS_kcmp = 312, KCMP_EPOLL_TFD = 7, SYS_dup3 = 292, SYS_close = 3;
/** Clocks whose absolute times mean the same on any machine and boot. */
const WALL_CLOCKS = new Set([0 /* REALTIME */, 8 /* REALTIME_ALARM */, 11 /* TAI */]);

export type EventState =
  /** count: hex, as fdinfo shows it ("eventfd-count: 5a" is 90). */
  | { kind: 'eventfd'; count: string; semaphore: boolean }
  | { kind: 'signalfd'; mask: string }
  | { kind: 'timerfd'; clock: number; settime: number; left: [string, string]; interval: [string, string]; ticks: string; takenAtMs: number }
  | { kind: 'epoll'; watches: EpollWatch[] };

/**
 * One watch: the number it was added under, its events and data; `desc`:
 * the description it watches when that is no longer at `fd` (a capture
 * first notes `moved`: its inode and rank among the watches of that number,
 * and the files pass finds the description).
 */
export interface EpollWatch { fd: number; events: number; data: string; desc?: number; moved?: { ino: number; toff: number } }

/**
 * Is the file of the `toff`-th watch under number `tfd` of the epoll at
 * `epfd` of `epPid` the open file at `fd` of `pid`? (kcmp KCMP_EPOLL_TFD)
 */
export function watchesFile(pid: number, fd: number, epPid: number, epfd: number, tfd: number, toff: number): boolean {
  const slot = Buffer.alloc(12);
  slot.writeUInt32LE(epfd, 0);
  slot.writeUInt32LE(tfd, 4);
  slot.writeUInt32LE(toff, 8);
  return sys.syscall(SYS_kcmp, pid, epPid, KCMP_EPOLL_TFD, fd, addressOf(slot)) === 0;
}

/** A watch; `desc`/`moved`: the description it watches when that left its number. */
const watchSchema = z.strictObject({ fd, events: u32, data: hex64, desc: int(0, MANY).optional(), moved: z.strictObject({ ino: int(0, Number.MAX_SAFE_INTEGER), toff: int(0, MANY) }).optional() });

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
  z.strictObject({ kind: z.literal('epoll'), watches: z.array(watchSchema).max(MANY) }),
]);
// Kind by kind: the keys of a union are only those all its members share.
type EvOf<K> = Extract<EventState, { kind: K }>;
type EvSchemaOf<K> = Extract<z.infer<typeof eventSchema>, { kind: K }>;
const sameEvent: [Same<EvSchemaOf<'eventfd'>, EvOf<'eventfd'>>, Same<EvSchemaOf<'signalfd'>, EvOf<'signalfd'>>, Same<EvSchemaOf<'timerfd'>, EvOf<'timerfd'>>, Same<EvSchemaOf<'epoll'>, EvOf<'epoll'>>, Same<z.infer<typeof watchSchema>, EpollWatch>] = [true, true, true, true, true];
void sameEvent;

/** "(2, 990651604)" -> ["2", "990651604"] */
function timespec(v: string | undefined): [string, string] {
  const m = /\((\d+),\s*(\d+)\)/.exec(v ?? '');
  return m ? [m[1], m[2]] : ['0', '0'];
}

/**
 * A periodic timerfd that expired and was not read yet shows "it_value:
 * (0, 0)" in fdinfo: the kernel moves it on to its next expiry only when
 * asked. timerfd_gettime on the supervisor's duplicate (the same file) asks:
 * the time left becomes right, and the expirations that passed are counted
 * in `ticks` (as the program's next read would count them).
 */
function forwardTimer(pid: number, fd: number, t: Extract<EventState, { kind: 'timerfd' }>): void {
  withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const cur = Buffer.alloc(32);
    if (sys.syscall(SYS_timerfd_gettime, mine, addressOf(cur)) !== 0) return;
    t.left = [cur.readBigInt64LE(16).toString(), cur.readBigInt64LE(24).toString()];
    const m = /^ticks:\s*(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
    if (m) t.ticks = m[1];
  });
}

/** The event file behind fd `fd` of `pid` (its /proc link says which kind), or undefined if it is none. */
export function captureEvent(pid: number, fd: number, target: string, info: FdInfo): EventState | undefined {
  const kv = info.extra;
  switch (target) {
    case 'anon_inode:[eventfd]':
      return { kind: 'eventfd', count: (kv.get('eventfd-count') ?? '0').trim(), semaphore: kv.get('eventfd-semaphore') === '1' };
    case 'anon_inode:[signalfd]':
      return { kind: 'signalfd', mask: kv.get('sigmask') ?? '0' };
    case 'anon_inode:[timerfd]': {
      const t: EventState = {
        kind: 'timerfd', clock: Number(kv.get('clockid') ?? 1), settime: parseInt(kv.get('settime flags') ?? '0', 8),
        left: timespec(kv.get('it_value')), interval: timespec(kv.get('it_interval')), ticks: kv.get('ticks') ?? '0', takenAtMs: Date.now(),
      };
      if (t.left.every((x) => x === '0') && t.interval.some((x) => x !== '0')) forwardTimer(pid, fd, t);
      return t;
    }
    case 'anon_inode:[eventpoll]': {
      const watches: EpollWatch[] = [];
      const rank = new Map<number, number>(); // watches under each number so far: kcmp's toff (fdinfo lists them in the kernel's order)
      for (const m of info.text.matchAll(/^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+).*?ino:([0-9a-f]+)/gm)) {
        const tfd = Number(m[1]);
        const toff = rank.get(tfd) ?? 0;
        rank.set(tfd, toff + 1);
        const w: EpollWatch = { fd: tfd, events: parseInt(m[2], 16), data: m[3] };
        if (!watchesFile(pid, tfd, pid, fd, tfd, toff)) w.moved = { ino: parseInt(m[4], 16), toff };
        watches.push(w);
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
    for (const w of e.watches.slice(i, i + PER).filter((x) => x.desc === undefined)) {
      const ev = Buffer.alloc(12); // struct epoll_event is packed on x86-64
      ev.writeUInt32LE(w.events >>> 0, 0);
      ev.writeBigUInt64LE(BigInt('0x' + w.data), 4);
      b.add(`restart:files epoll watch of fd ${w.fd}`, SYS_epoll_ctl, epfd, EPOLL_CTL_ADD, w.fd, b.put(ev));
    }
    b.run();
  }
}

/**
 * A watch whose file left its number, added again under that number: the
 * file (`src`, a descriptor of the same process holding it) is put at the
 * number for the epoll_ctl, then the number gets back what it holds in the
 * restored table (`now`: its close-on-exec, or nothing). `save`: a free
 * temporary number.
 */
export function addMovedWatch(r: Remote, epfd: number, w: EpollWatch, src: bigint, now: { cloexec: boolean } | undefined, save: number): void {
  const b = new CallBatch(r);
  const ev = Buffer.alloc(12);
  ev.writeUInt32LE(w.events >>> 0, 0);
  ev.writeBigUInt64LE(BigInt('0x' + w.data), 4);
  const what = `restart:files epoll watch of fd ${w.fd} (its file held elsewhere)`;
  if (now) b.add(what, SYS_dup3, w.fd, save, O_CLOEXEC);
  if (src !== BigInt(w.fd)) b.add(what, SYS_dup3, src, w.fd, O_CLOEXEC);
  b.add(what, SYS_epoll_ctl, epfd, EPOLL_CTL_ADD, w.fd, b.put(ev));
  if (now) {
    b.add(what, SYS_dup3, save, w.fd, now.cloexec ? O_CLOEXEC : 0);
    b.add(undefined, SYS_close, save);
  } else b.add(undefined, SYS_close, w.fd);
  b.run();
}
