/**
 * POSIX message queues held as descriptors (mq_open): the queue's name
 * (or that it was unlinked), mode, owner, attributes (mq_maxmsg,
 * mq_msgsize) and its messages with their priorities; each description's
 * access mode and O_NONBLOCK.
 *
 * Capture, during the stop: the supervisor opens the queue again through
 * the holder's /proc/PID/fd entry (a description of its own, O_RDWR,
 * O_NONBLOCK), reads its status (a registered mq_notify is refused: the
 * kernel shows no sigev_value, and taking the messages out and back would
 * fire it), takes every message (mq_timedreceive: highest priority first,
 * in order within one) and sends them back in the same order with the
 * same priorities, which leaves the queue as it was. The messages are
 * recorded once per queue (its first description).
 *
 * Restore, in the first holder (its own credentials, its IPC namespace):
 * mq_open(O_CREAT|O_EXCL) with the attributes; a name taken is EBUSY
 * (in a rollback the live queue of that name is taken over: emptied and
 * refilled); mode and owner set again (fchmod, fchown: EPERM if the
 * caller could not); the messages sent by the supervisor through a copy
 * of that descriptor; then each description opened by name with its own
 * flags. An unlinked queue is made under a temporary name, unlinked once
 * every description is open. With CKPT_KILL, the subtree's named queues
 * are unlinked with it (as its SysV objects are removed), so that a
 * restart finds their names free.
 */
import fs from 'node:fs';
import { CkptError, errno, errnoName } from '../../lib/errors.js';
import { sys, errnoNow, addressOf } from '../../lib/libc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { z, int, MANY, type Same } from '../../lib/schema.js';

const SYS_mq_open = 240, SYS_mq_unlink = 241, SYS_mq_timedsend = 242, SYS_mq_timedreceive = 243, SYS_mq_getsetattr = 245;
const SYS_fchmod = 91, SYS_fchown = 93, SYS_close = 3;
const O_RDWR = 2, O_ACCMODE = 3, O_NONBLOCK = 0o4000, O_CREAT = 0o100, O_EXCL = 0o200, O_CLOEXEC = 0o2000000;
const MQUEUE_MAGIC = 0x19800202;
/** The size the kernel gives every queue's inode (FILENT_SIZE): a cheap first test before statfs. */
const FILENT_SIZE = 80;

export interface MqueueState {
  /** The name without its leading slash. */
  name: string;
  /** Unlinked while open: made under a temporary name and unlinked again. */
  deleted?: boolean;
  /** The queue's inode at the checkpoint: descriptions of one queue share it. */
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  maxmsg: number;
  msgsize: number;
  /** In the order they are received; only on the queue's first description. */
  messages?: { prio: number; data: string }[];
}

export const mqueueSchema = z.strictObject({
  name: z.string().min(1).max(255).refine((s) => !s.includes('/') && !s.includes('\0'), 'a slash or NUL in a queue name'),
  deleted: z.boolean().optional(),
  ino: int(0, Number.MAX_SAFE_INTEGER),
  mode: int(0, 0o7777),
  uid: int(0, 2 ** 32 - 2),
  gid: int(0, 2 ** 32 - 2),
  maxmsg: int(1, 65536),
  msgsize: int(1, 16 << 20),
  messages: z.array(z.strictObject({ prio: int(0, 32767), data: z.string().max(1 << 26) })).max(MANY).optional(),
});
const sameMq: Same<z.infer<typeof mqueueSchema>, MqueueState> = true;
void sameMq;

const unsupported = (pid: number, fd: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (${what})`);

/** Is /proc/PID/fd/N (already stat'ed as `st`) a POSIX message queue? */
export function isMqueue(link: string, st: fs.Stats): boolean {
  if (!st.isFile() || st.size !== FILENT_SIZE) return false;
  try {
    return fs.statfsSync(link).type === MQUEUE_MAGIC;
  } catch {
    return false;
  }
}

function getattr(fd: number, what: string): { flags: number; maxmsg: number; msgsize: number; curmsgs: number } {
  const a = Buffer.alloc(64);
  if (sys.syscall(SYS_mq_getsetattr, fd, 0, addressOf(a)) < 0) throw new CkptError(errnoNow(), 'checkpoint:files', `${what}: mq_getattr: ${errnoName(errnoNow())}`);
  return { flags: Number(a.readBigInt64LE(0)), maxmsg: Number(a.readBigInt64LE(8)), msgsize: Number(a.readBigInt64LE(16)), curmsgs: Number(a.readBigInt64LE(24)) };
}

/** Every message out (in the order they come), then back in that order with their priorities. */
function takeAndPutBack(fd: number, msgsize: number, what: string, keep: boolean): { prio: number; data: string }[] {
  const buf = Buffer.alloc(msgsize);
  const prio = Buffer.alloc(4);
  const got: { prio: number; data: Buffer }[] = [];
  for (;;) {
    const n = sys.syscall(SYS_mq_timedreceive, fd, addressOf(buf), msgsize, addressOf(prio), 0);
    if (n < 0) {
      if (errnoNow() === errno('EAGAIN')) break;
      throw new CkptError(errnoNow(), 'checkpoint:files', `${what}: mq_timedreceive: ${errnoName(errnoNow())}`);
    }
    got.push({ prio: prio.readUInt32LE(0), data: Buffer.from(buf.subarray(0, n)) });
  }
  if (keep) sendAll(fd, got, what);
  return got.map((m) => ({ prio: m.prio, data: m.data.toString('base64') }));
}

function sendAll(fd: number, msgs: { prio: number; data: Buffer }[], what: string, op = 'checkpoint:files'): void {
  for (const m of msgs) {
    if (sys.syscall(SYS_mq_timedsend, fd, addressOf(m.data.length ? m.data : Buffer.alloc(1)), m.data.length, m.prio, 0) < 0) throw new CkptError(errnoNow(), op, `${what}: mq_timedsend of ${m.data.length} bytes: ${errnoName(errnoNow())}`);
  }
}

/** The queue behind fd `fd` of `pid` (`seen`: queues whose messages are recorded already, by inode). */
export function captureMqueue(pid: number, fd: number, target: string, st: fs.Stats, seen: Set<number>): MqueueState {
  const link = `/proc/${pid}/fd/${fd}`;
  const deleted = target.endsWith(' (deleted)');
  const name = target.replace(/ \(deleted\)$/, '').replace(/^\//, '');
  const what = `task ${pid}: fd ${fd} (message queue /${name})`;
  const mine = fs.openSync(link, O_RDWR | O_NONBLOCK | O_CLOEXEC);
  try {
    const status = Buffer.alloc(256);
    const n = fs.readSync(mine, status, 0, status.length, 0);
    const notifyPid = Number(/NOTIFY_PID:\s*(\d+)/.exec(status.subarray(0, n).toString())?.[1] ?? 0);
    if (notifyPid) throw unsupported(pid, fd, `message queue /${name} with an mq_notify registration of process ${notifyPid}: not kept`);
    const a = getattr(mine, what);
    const first = !seen.has(st.ino);
    seen.add(st.ino);
    const messages = first ? takeAndPutBack(mine, a.msgsize, what, true) : undefined;
    return { name, ...(deleted ? { deleted } : {}), ino: st.ino, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, maxmsg: a.maxmsg, msgsize: a.msgsize, messages };
  } finally {
    fs.closeSync(mine);
  }
}

/** Queues made during one restore, by their checkpoint inode: where later descriptions open them. */
export type MadeQueues = Map<number, { name: string; pid: number; r: Remote; temp: boolean }>;

function mqOpen(r: Remote, name: string, flags: number, mode: number, attr?: Buffer): bigint {
  const b = new CallBatch(r);
  const p = b.put(Buffer.from(name + '\0'));
  const a = attr ? b.put(attr) : 0n;
  b.add(undefined, SYS_mq_open, p, flags, mode, a);
  return b.run()[0];
}

/**
 * A description of queue `mq` in `r` (host pid `host`) with `flags`: the
 * queue made first if this restore has not made it yet. `live`: a rollback
 * (the live queue of that name is taken over).
 */
export function openMqueue(r: Remote, host: number, mq: MqueueState, flags: number, live: boolean, made: MadeQueues): bigint {
  const what = `task ${host}: message queue /${mq.name}`;
  let q = made.get(mq.ino);
  if (!q) {
    const name = mq.deleted ? `ckpt-deleted-${host}-${Math.random().toString(36).slice(2, 10)}` : mq.name;
    const attr = Buffer.alloc(64);
    attr.writeBigInt64LE(BigInt(mq.maxmsg), 8);
    attr.writeBigInt64LE(BigInt(mq.msgsize), 16);
    let fd = mqOpen(r, name, O_RDWR | O_CREAT | O_EXCL | O_NONBLOCK | O_CLOEXEC, mq.mode & 0o777, attr);
    let takeOver = false;
    if (fd === -BigInt(errno('EEXIST'))) {
      if (!live || mq.deleted) throw new CkptError(errno('EBUSY'), 'restart:files', `${what}: the name is taken`);
      fd = mqOpen(r, name, O_RDWR | O_NONBLOCK | O_CLOEXEC, 0);
      takeOver = true;
    }
    if (fd < 0n) throw new CkptError(Number(-fd) === errno('EACCES') ? errno('EPERM') : Number(-fd), 'restart:files', `${what}: mq_open: ${errnoName(Number(-fd))}`);
    try {
      const b = new CallBatch(r);
      b.add(`restart:files ${what}: fchmod`, SYS_fchmod, fd, mq.mode);
      b.add(undefined, SYS_fchown, fd, mq.uid, mq.gid);
      const [, own] = b.run();
      if (own < 0n) throw new CkptError(errno('EPERM'), 'restart:files', `${what}: owned by uid ${mq.uid} gid ${mq.gid}, which the caller cannot give it (${errnoName(Number(-own))})`);
      const mine = sys.takeFd(host, Number(fd));
      if (mine < 0) throw new CkptError(errnoNow(), 'restart:files', `${what}: cannot take its descriptor`);
      try {
        const a = getattr(mine, what);
        if (a.maxmsg !== mq.maxmsg || a.msgsize !== mq.msgsize) throw new CkptError(errno('EBUSY'), 'restart:files', `${what}: the live queue of that name has maxmsg ${a.maxmsg} msgsize ${a.msgsize}, not ${mq.maxmsg} ${mq.msgsize}`);
        if (takeOver) takeAndPutBack(mine, a.msgsize, what, false); // emptied: the checkpoint's messages only
        sendAll(mine, (mq.messages ?? []).map((m) => ({ prio: m.prio, data: Buffer.from(m.data, 'base64') })), what, 'restart:files');
      } finally {
        fs.closeSync(mine);
      }
    } finally {
      r.call(SYS_close, fd);
    }
    made.set(mq.ino, (q = { name, pid: host, r, temp: !!mq.deleted }));
  }
  const fd = mqOpen(r, q.name, (flags & (O_ACCMODE | O_NONBLOCK)) | O_CLOEXEC, 0);
  if (fd < 0n) throw new CkptError(Number(-fd) === errno('EACCES') ? errno('EPERM') : Number(-fd), 'restart:files', `${what}: mq_open with flags 0${flags.toString(8)}: ${errnoName(Number(-fd))}`);
  return fd;
}

/** Queues that were unlinked at the checkpoint: unlinked again once every description is open. */
export function unlinkTemporaryQueues(made: MadeQueues): void {
  for (const q of made.values()) {
    if (!q.temp) continue;
    const b = new CallBatch(q.r);
    b.add(`restart:files mq_unlink ${q.name}`, SYS_mq_unlink, b.put(Buffer.from(q.name + '\0')));
    b.run();
  }
}

/** CKPT_KILL: the subtree's named queues go with it (the caller is in their IPC namespace). */
export function unlinkQueues(names: string[]): void {
  for (const n of new Set(names)) {
    const p = Buffer.from(n + '\0');
    sys.syscall(SYS_mq_unlink, addressOf(p));
  }
}
