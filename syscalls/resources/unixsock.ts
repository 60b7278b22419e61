/**
 * Unix sockets, the parts files.ts leaves to them: names, queues, and how
 * each kind is made again.
 *
 * - A connected pair, both ends in the tree, with what each end has yet to
 *   read. Unnamed: socketpair. If an end has a name (an accepted
 *   connection has its listener's; a client may have bound one), the pair
 *   is made the way it was: the client end binds its own name if any and
 *   connects to the other's name, where the restored listener of that name
 *   (or, if it is gone, a temporary one) accepts it. A datagram pair is a
 *   socketpair whose named ends bind their names.
 * - A socket on its own: listening (with no connection waiting to be
 *   accepted: those would need their clients), or not connected, or a
 *   datagram one connected one way to a named socket, in the tree or not
 *   (such as /dev/log), connected again by that name; bound to its own
 *   name or not; a datagram one keeps the datagrams sent to it. Those
 *   connected to others are made after the others.
 *
 * Names are the kernel's bytes (a path with its NUL, or NUL and an abstract
 * name). A path's socket file that a socket now gone left behind is
 * unlinked before binding (a live socket holding it: EBUSY); a file the
 * program had unlinked by the checkpoint is unlinked again after.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, SYS } from '../../lib/libc.js';
import { unixSockets } from '../../lib/sockdiag.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, base64, MANY, type Same } from '../../lib/schema.js';
import { sendWithFds } from './inflight.js';

const AF_UNIX = 1, SOCK_DGRAM = 2, SOCK_CLOEXEC = 0o2000000, EADDRINUSE = 98;
const SOL_SOCKET = 1, SO_PEEK_OFF = 42, MSG_PEEK = 2, MSG_DONTWAIT = 0x40;
const SYS_shutdown = 48, SYS_socket = 41, SYS_connect = 42, SYS_bind = 49, SYS_listen = 50, SYS_socketpair = 53, SYS_unlink = 87, SYS_accept4 = 288;

/**
 * A socket's name as the kernel keeps it, and, for a path, whether the
 * socket file was there at the checkpoint (one unlinked since is not made).
 */
export interface SockName { name?: string; fileThere?: boolean }

/** A connected pair of unix sockets, both ends in the tree; what each end has yet to read. */
export interface SockPairState {
  id: number;
  type: number; // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
  /** Per end, its receive queue: messages (one for a stream), base64. */
  queues: [string[], string[]];
  /** Per end, its name if it has one. */
  names?: [SockName, SockName];
  /** Per end, what is shut down (1 receiving, 2 sending, 3 both), if anything. */
  shutdown?: [number, number];
  /** Files in flight: message `msg` of end `end`'s queue carries these descriptions (SCM_RIGHTS). */
  inflight?: { end: 0 | 1; msg: number; descs: number[] }[];
}

/**
 * A socket on its own: listening (backlog), or not connected, or (datagram)
 * connected one way to a named socket (connectTo), with the datagrams
 * queued to it.
 */
export interface SoloSockState extends SockName {
  type: number;
  backlog?: number;
  queue?: string[];
  connectTo?: string;
  /** What is shut down (1 receiving, 2 sending), if anything. */
  shutdown?: number;
}

/** At most this many descriptors ride in one message (the kernel's SCM_MAX_FD). */
const SCM_MAX_FD = 253;
/** sun_path is 108 bytes; a path name keeps its NUL. */
const sockNameString = z.string().min(1).max(109);
/** A message is at most what one peek reads (1 MiB). */
const queueSchema = z.array(base64(1 << 20)).max(MANY);
const sockType = z.union([z.literal(1), z.literal(2), z.literal(5)]); // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
export const sockNameSchema = z.strictObject({ name: sockNameString.optional(), fileThere: z.boolean().optional() });
export const sockPairSchema = z.strictObject({
  id: int(0, MANY),
  type: sockType,
  queues: z.tuple([queueSchema, queueSchema]),
  names: z.tuple([sockNameSchema, sockNameSchema]).optional(),
  shutdown: z.tuple([int(0, 3), int(0, 3)]).optional(),
  inflight: z.array(z.strictObject({ end: z.union([z.literal(0), z.literal(1)]), msg: int(0, MANY), descs: z.array(int(0, MANY)).min(1).max(SCM_MAX_FD) })).max(MANY).optional(),
});
/** The fields of a socket on its own (a 'usock' description adds id, kind and flags). */
export const soloSockFields = {
  name: sockNameString.optional(),
  fileThere: z.boolean().optional(),
  type: sockType,
  backlog: int(0, 2 ** 31 - 1).optional(),
  queue: queueSchema.optional(),
  connectTo: sockNameString.optional(),
  shutdown: int(0, 3).optional(),
};
const samePair: Same<z.infer<typeof sockPairSchema>, SockPairState> = true;
const soloSchema = z.strictObject(soloSockFields);
const sameSolo: Same<z.infer<typeof soloSchema>, SoloSockState> = true;
void [samePair, sameSolo];

/** A name as sock_diag gives it, for the log. */
export const printable = (name?: string) => (name === undefined ? '(unnamed)' : name.replace(/\0/g, '@').replace(/@$/, ''));

const isPath = (name: string) => !name.startsWith('\0');

/** A path name as the supervisor can reach it: relative ones are the process's cwd's. */
function sockPath(pid: number, name: string): string {
  const p = name.replace(/\0$/, '');
  return p.startsWith('/') ? p : `/proc/${pid}/cwd/${p}`;
}

/** What to keep of a socket's name: the name, and for a path whether its file is there now. */
export function sockName(pid: number, name: string | undefined): SockName {
  if (name === undefined || name === '') return {};
  if (!isPath(name)) return { name };
  let fileThere = false;
  try {
    fileThere = fs.lstatSync(sockPath(pid, name)).isSocket();
  } catch { /* unlinked since it was bound */ }
  return { name, fileThere };
}

/**
 * What a socket has yet to read, without reading it: with SO_PEEK_OFF each
 * MSG_PEEK returns the next message (or stream bytes) after the last one.
 */
export function peekQueue(pid: number, fd: number): Buffer[] {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    if (sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, 0) !== 0) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd}: cannot peek at its queue`);
    const out: Buffer[] = [];
    const buf = Buffer.alloc(1 << 20);
    for (;;) {
      const n = sys.recv(mine, buf, MSG_PEEK | MSG_DONTWAIT);
      if (n <= 0) break; // EAGAIN: the queue is read
      out.push(Buffer.from(buf.subarray(0, n)));
    }
    sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, -1);
    return out;
  }, 'socket fd');
}

/** Send messages through a tracee's socket, via a duplicate of its descriptor. */
function sendInto(pid: number, fd: number | bigint, msgs: string[]): void {
  if (!msgs.length) return;
  withTraceeFd(pid, fd, 'restart:files', (mine) => {
    for (const m of msgs.map((x) => Buffer.from(x, 'base64'))) {
      if (sys.send(mine, m, MSG_DONTWAIT) !== m.length) throw new CkptError(errno('ENOMEM'), 'restart:files', `task ${pid}: cannot queue ${m.length} bytes on a socket`);
    }
  }, 'socket fd');
}

/**
 * Shut a socket down as it was: sk_shutdown's bits (1 receive, 2 send) are
 * shutdown()'s `how` plus one. On a connected stream or seqpacket socket the
 * kernel marks the peer too (its opposite side), which the peer's own bits
 * already say: doing both ends gives back both ends' bits.
 */
function shutDown(r: Remote, fd: number, how: number): void {
  r.check(`restart:files shutdown(${how - 1}) of a unix socket`, SYS_shutdown, fd, (how & 3) - 1);
}

/** Where a restored socket lives (a process, a descriptor number in it). */
export interface Place { pid: number; fd: number }

/** What making sockets needs from the files restore. */
export interface SockRestore {
  remote: (pid: number) => Remote;
  host: (pid: number) => number;
  /** Park descriptor `fd` of `pid` at a temporary number (closed at the end); returns its place. */
  park: (pid: number, fd: bigint) => Place;
  /** Listening sockets made so far, by name. */
  listeners: Map<string, Place>;
}

/** The restore of one tree's sockets: knows which socket files live sockets hold. */
export class UnixSockets {
  private held?: Set<number>;
  constructor(private readonly ctx: SockRestore) {}

  /** A socket on its own, made in `pid`; its place (parked). */
  makeSolo(pid: number, s: SoloSockState): Place {
    const r = this.ctx.remote(pid);
    const fd = r.check('restart:files socket', SYS_socket, AF_UNIX, s.type | SOCK_CLOEXEC, 0);
    const at = this.ctx.park(pid, fd);
    if (s.name !== undefined) this.bind(pid, at.fd, s.name);
    if (s.backlog !== undefined) r.check('restart:files listen', SYS_listen, at.fd, s.backlog);
    if (s.queue?.length) {
      // Datagrams sent to it: sent again, from a socket connected to it for the purpose.
      const tmp = r.check('restart:files socket', SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      try {
        if (s.name === undefined) throw new CkptError(errno('EOPNOTSUPP'), 'restart:files', `task ${pid}: datagrams queued to an unnamed socket`);
        this.callWithName(r, 'connect', SYS_connect, tmp, s.name);
        sendInto(this.ctx.host(pid), tmp, s.queue);
      } finally {
        r.call(SYS.close, tmp);
      }
    }
    // Connected only once its queue is back: a datagram socket connected to
    // another (itself, say) refuses what anyone else sends it (EPERM).
    if (s.connectTo !== undefined) this.callWithName(r, 'connect', SYS_connect, at.fd, s.connectTo);
    if (s.shutdown) shutDown(r, at.fd, s.shutdown);
    if (s.backlog !== undefined && s.name !== undefined) this.ctx.listeners.set(s.name, at);
    if (s.name !== undefined && isPath(s.name) && !s.fileThere) this.unlink(pid, s.name);
    return at;
  }

  /**
   * A connected pair: `where[e]` is the process that first holds end e.
   * Returns each end's place (parked), its queue refilled.
   */
  makePair(p: SockPairState, where: [number, number]): [Place, Place] {
    const names = p.names ?? [{}, {}];
    let ends: [Place, Place];
    if (names.every((n) => n.name === undefined) || p.type === SOCK_DGRAM) {
      const r = this.ctx.remote(where[0]);
      const scratch = r.scratch();
      r.check('restart:files socketpair', SYS_socketpair, AF_UNIX, p.type | SOCK_CLOEXEC, 0, scratch);
      const fds = r.mem.read(scratch, 8);
      ends = [this.ctx.park(where[0], BigInt(fds.readInt32LE(0))), this.ctx.park(where[0], BigInt(fds.readInt32LE(4)))];
      names.forEach((n, e) => n.name !== undefined && this.bind(where[0], ends[e].fd, n.name));
      names.forEach((n) => n.name !== undefined && isPath(n.name) && !n.fileThere && this.unlink(where[0], n.name));
    } else {
      // The server end: the one named as a listener that was made, else a named one.
      const s = ([0, 1] as const).find((e) => names[e].name !== undefined && this.ctx.listeners.has(names[e].name!)) ?? (names[0].name !== undefined ? 0 : 1);
      const c = 1 - s;
      const sname = names[s].name!;
      let listener = this.ctx.listeners.get(sname);
      const temporary = !listener;
      if (!listener) listener = this.makeSolo(where[s], { type: p.type, name: sname, backlog: 1, fileThere: true });
      const rc = this.ctx.remote(where[c]);
      const client = this.ctx.park(where[c], rc.check('restart:files socket', SYS_socket, AF_UNIX, p.type | SOCK_CLOEXEC, 0));
      if (names[c].name !== undefined) this.bind(where[c], client.fd, names[c].name!);
      this.callWithName(rc, 'connect', SYS_connect, client.fd, sname);
      const rl = this.ctx.remote(listener.pid);
      const server = this.ctx.park(listener.pid, rl.check('restart:files accept', SYS_accept4, listener.fd, 0, 0, SOCK_CLOEXEC));
      if (temporary) {
        rl.call(SYS.close, listener.fd);
        this.ctx.listeners.delete(sname);
        if (isPath(sname) && !names[s].fileThere) this.unlink(listener.pid, sname);
      }
      if (names[c].name !== undefined && isPath(names[c].name!) && !names[c].fileThere) this.unlink(where[c], names[c].name!);
      ends = s === 0 ? [server, client] : [client, server];
    }
    // Each end's queue is refilled by sending from the other end; one with
    // files in flight once every description exists (finishPair).
    const late = new Set((p.inflight ?? []).map((x) => x.end));
    p.queues.forEach((q, e) => !late.has(e as 0 | 1) && sendInto(this.ctx.host(ends[1 - e].pid), ends[1 - e].fd, q));
    if (!late.size) this.shutDownPair(p, ends);
    return ends;
  }

  /**
   * The queues of a pair with files in flight: each message sent again with
   * its files attached (`take`: a description as a descriptor of the
   * supervisor, closed here), then what was shut down is shut down.
   */
  finishPair(p: SockPairState, ends: [Place, Place], take: (desc: number) => number): void {
    for (const e of [0, 1] as const) {
      const carried = (p.inflight ?? []).filter((x) => x.end === e);
      if (!carried.length) continue;
      const from = ends[1 - e];
      withTraceeFd(this.ctx.host(from.pid), from.fd, 'restart:files', (mine) => {
        p.queues[e].forEach((m, i) => {
          const fds = carried.filter((x) => x.msg === i).flatMap((x) => x.descs).map(take);
          try {
            sendWithFds(mine, Buffer.from(m, 'base64'), fds, `task ${from.pid}`);
          } finally {
            for (const f of fds) fs.closeSync(f);
          }
        });
      }, 'socket fd');
    }
    this.shutDownPair(p, ends);
  }

  /** Once the queues are refilled (an end shut for sending could not refill its peer's). */
  private shutDownPair(p: SockPairState, ends: [Place, Place]): void {
    p.shutdown?.forEach((how, e) => how && shutDown(this.ctx.remote(ends[e].pid), ends[e].fd, how));
  }

  /** Bind fd of `pid` to `name`; a stale socket file in the way goes first. */
  private bind(pid: number, fd: number, name: string): void {
    const r = this.ctx.remote(pid);
    if (isPath(name)) {
      let ino: number | undefined;
      try {
        const st = fs.lstatSync(sockPath(this.ctx.host(pid), name));
        if (st.isSocket()) ino = st.ino;
      } catch { /* nothing there */ }
      if (ino !== undefined) {
        this.held ??= new Set([...unixSockets().values()].map((x) => x.fileIno ?? 0));
        if (this.held.has(ino)) throw new CkptError(errno('EBUSY'), 'restart:files', `task ${pid}: unix socket name ${printable(name)} is held by a live socket`);
        this.unlink(pid, name);
      }
    }
    this.callWithName(r, 'bind', SYS_bind, fd, name);
  }

  /** bind or connect with a sockaddr_un holding `name`; EADDRINUSE means the name is taken. */
  private callWithName(r: Remote, what: string, nr: number, fd: number | bigint, name: string): void {
    const b = new CallBatch(r);
    const addr = Buffer.concat([Buffer.from([AF_UNIX, 0]), Buffer.from(name, 'latin1')]);
    b.add(undefined, nr, fd, b.put(addr), addr.length);
    const [res] = b.run();
    if (res === -BigInt(EADDRINUSE)) throw new CkptError(errno('EBUSY'), `restart:files ${what}`, `task ${r.task.tid}: unix socket name ${printable(name)} is in use`);
    if (res < 0n) throw new CkptError(Number(-res), `restart:files ${what}`, `task ${r.task.tid}: unix socket name ${printable(name)}`);
  }

  /** Unlink a path name's file, as the process itself (its permissions, its cwd). */
  private unlink(pid: number, name: string): void {
    const b = new CallBatch(this.ctx.remote(pid));
    b.add(undefined, SYS_unlink, b.put(Buffer.from(name.replace(/\0$/, '') + '\0', 'latin1')));
    b.run();
  }
}
