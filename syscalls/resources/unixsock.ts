/**
 * Unix sockets, the parts files.ts leaves to them: names, queues, and how
 * each kind is made again.
 *
 * - A connected pair, both ends in the tree, with what each end has yet to
 *   read (and the files in flight in it: inflight.ts). Unnamed: socketpair.
 *   If an end has a name (an accepted connection has its listener's; a
 *   client may have bound one), the pair is made the way it was: the client
 *   end binds its own name if any and connects to the other's name, where
 *   the restored listener of that name (or, if it is gone, a temporary one)
 *   accepts it. A datagram pair is a socketpair whose named ends bind their
 *   names.
 * - A socket on its own: listening, or not connected, or a datagram one
 *   connected one way to a named socket, in the tree or not (such as
 *   /dev/log), connected again by that name; bound to its own name or not;
 *   a datagram one keeps the datagrams sent to it, each sent again from its
 *   sender's name (the tree's socket of that name, else a temporary one
 *   bound to it), with the files they carry. Those connected to a socket
 *   and the senders of its datagrams are made right after it.
 * - A listener's connections not yet accepted (sock_diag UNIX_DIAG_ICONS
 *   names their clients): each client connects again, in accept order, once
 *   every pair made through that listener is made. A client that sent
 *   anything, or closed, is refused: what it sent is in the connection's
 *   server end, which only accept() could read.
 * - A socket whose peer is gone: made as a pair whose other end is closed
 *   (a stream reads its queue, then EOF; a datagram one gets ECONNREFUSED).
 *
 * Names are the kernel's bytes (a path with its NUL, or NUL and an abstract
 * name). A path's socket file that a socket now gone left behind is
 * unlinked before binding (a live socket holding it: EBUSY). A name whose
 * file was unlinked (or replaced by another socket's) by the checkpoint is
 * bound again, in directories made for it if they are gone too, and
 * unlinked once every socket is made (so that those connected to it can
 * connect); a relative one is bound from its directory. A socket file keeps
 * its mode and owner.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import path from 'node:path';
import { sys, SYS, addressOf, errnoNow } from '../../lib/libc.js';
import { inTaskRoot } from './attrs.js';
import { unixSockets, type UnixSockInfo } from '../../lib/sockdiag.js';
import { getsockopt, getsockoptInt } from '../../lib/netsock.js';
import { readStatus } from '../../lib/proc.js';
import { parseCreds, type Creds } from './process.js';
import { captureSockOpts, type SockOpt } from './netdgram.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, id, pid0, base64, path as pathSchema, MANY, type Same } from '../../lib/schema.js';
import { nsPids } from '../../supervisor/pidns.js';
import { sendWithFds, recvOne, withPassCred, CONTROL } from './inflight.js';
import type { FilesTable } from './files.js';

const AF_UNIX = 1, SOCK_DGRAM = 2, SOCK_CLOEXEC = 0o2000000, SOCK_NONBLOCK = 0o4000, EADDRINUSE = 98, EINPROGRESS = 115;
const O_PATH = 0o10000000, O_DIRECTORY = 0o200000, O_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1, SO_TYPE = 3, SO_PEERCRED = 17, SO_PEERGROUPS = 59, SOCK_STREAM = 1, POLLIN = 1, POLLHUP = 0x10, POLLRDHUP = 0x2000, SO_PEEK_OFF = 42, MSG_PEEK = 2, MSG_DONTWAIT = 0x40;
const SYS_rename = 82, SYS_chmod = 90, SYS_lchown = 94, SYS_sendto = 44, SYS_chdir = 80, SYS_fchdir = 81, SYS_mkdir = 83, SYS_rmdir = 84, SYS_shutdown = 48, SYS_socket = 41, SYS_connect = 42, SYS_bind = 49, SYS_listen = 50, SYS_socketpair = 53, SYS_unlink = 87, SYS_accept4 = 288, SYS_setresuid = 117, SYS_setresgid = 119, SYS_setgroups = 116;

/**
 * A socket's name as the kernel keeps it, and, for a path, whether the
 * socket file was there at the checkpoint (one unlinked since, or replaced
 * by another socket's, is not made: the socket is bound but unreachable by
 * its path, as it was). A relative name also keeps the directory it lives
 * in (the holder's cwd or root, where it was found; found in neither, it is
 * refused: bound elsewhere or unlinked, the kernel does not say which).
 */
export interface SockName { name?: string; fileThere?: boolean; dir?: string; file?: { mode: number; uid: number; gid: number } }

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
  /** Per end, its SO_PEERCRED. */
  creds?: [PeerCred, PeerCred];
  /** Per end (datagram, seqpacket), who sent each message of its queue (SCM_CREDENTIALS). */
  msgCreds?: [PeerCred[], PeerCred[]];
}

/**
 * SO_PEERCRED, as the kernel set it: a socketpair gives both ends its
 * maker; a connection gives the accepted end its client (at connect) and
 * the client the listener's (at listen); a listener has its own (at
 * listen). `pid` as the tree names it, 0 for a process not of the tree (gone,
 * or outside); `uid` and `gid` the effective ids that process had then, and
 * `groups` its supplementary groups (SO_PEERGROUPS) where there are any.
 */
export interface PeerCred { pid: number; uid: number; gid: number; groups?: number[] }

/**
 * A socket on its own: listening (backlog; `waiting`: the clients of the
 * connections not yet accepted, in accept order), or not connected, or
 * (datagram) connected one way to a named socket (connectTo; `peerDesc`
 * when that socket is one of the tree's), with the datagrams queued to it
 * (`from`: each one's sender name, '' for none); or the client of a
 * connection not yet accepted (`pendingOn`: the listener); or connected to
 * a peer that is gone (`peerGone`: a stream reads its queue, then EOF).
 */
export interface SoloSockState extends SockName {
  type: number;
  backlog?: number;
  queue?: string[];
  from?: string[];
  connectTo?: string;
  peerDesc?: number;
  waiting?: number[];
  pendingOn?: number;
  peerGone?: boolean;
  /** Files in flight: datagram `msg` of its queue carries these descriptions (SCM_RIGHTS). */
  inflight?: { msg: number; descs: number[] }[];
  /** What is shut down (1 receiving, 2 sending), if anything. */
  shutdown?: number;
  /** Its SO_PEERCRED (listening, connected, or its peer gone). */
  cred?: PeerCred;
  /** Who sent each message of its queue (SCM_CREDENTIALS). */
  msgCreds?: PeerCred[];
  /** The client of a connection not yet accepted: who connected (its holder, with its effective ids at the checkpoint). */
  connectAs?: PeerCred;
}

/** At most this many descriptors ride in one message (the kernel's SCM_MAX_FD). */
const SCM_MAX_FD = 253;
/** sun_path is 108 bytes; a path name keeps its NUL. */
const sockNameString = z.string().min(1).max(109);
/** A message is at most what one peek reads (1 MiB). */
const queueSchema = z.array(base64(1 << 20)).max(MANY);
const sockType = z.union([z.literal(1), z.literal(2), z.literal(5)]); // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
const nameFields = { name: sockNameString.optional(), fileThere: z.boolean().optional(), dir: pathSchema.optional(), file: z.strictObject({ mode: int(0, 0o7777), uid: id, gid: id }).optional() };
export const sockNameSchema = z.strictObject(nameFields);
const peerCredSchema = z.strictObject({ pid: pid0, uid: id, gid: id, groups: z.array(id).min(1).max(65536).optional() });
export const sockPairSchema = z.strictObject({
  id: int(0, MANY),
  type: sockType,
  queues: z.tuple([queueSchema, queueSchema]),
  names: z.tuple([sockNameSchema, sockNameSchema]).optional(),
  shutdown: z.tuple([int(0, 3), int(0, 3)]).optional(),
  inflight: z.array(z.strictObject({ end: z.union([z.literal(0), z.literal(1)]), msg: int(0, MANY), descs: z.array(int(0, MANY)).min(1).max(SCM_MAX_FD) })).max(MANY).optional(),
  creds: z.tuple([peerCredSchema, peerCredSchema]).optional(),
  msgCreds: z.tuple([z.array(peerCredSchema).max(MANY), z.array(peerCredSchema).max(MANY)]).optional(),
});
/** The fields of a socket on its own (a 'usock' description adds id, kind and flags). */
export const soloSockFields = {
  ...nameFields,
  type: sockType,
  backlog: int(0, 2 ** 31 - 1).optional(),
  queue: queueSchema.optional(),
  from: z.array(z.string().max(109)).max(MANY).optional(),
  connectTo: sockNameString.optional(),
  peerDesc: int(0, MANY).optional(),
  waiting: z.array(int(0, MANY)).min(1).max(MANY).optional(),
  pendingOn: int(0, MANY).optional(),
  peerGone: z.literal(true).optional(),
  inflight: z.array(z.strictObject({ msg: int(0, MANY), descs: z.array(int(0, MANY)).min(1).max(SCM_MAX_FD) })).max(MANY).optional(),
  shutdown: int(0, 3).optional(),
  cred: peerCredSchema.optional(),
  msgCreds: z.array(peerCredSchema).max(MANY).optional(),
  connectAs: peerCredSchema.optional(),
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

/**
 * What to keep of a socket's name: the name, and for a path whether its
 * file is there now, this socket's (`fileIno`, sock_diag's UNIX_DIAG_VFS:
 * another socket bound to the same path since holds another file), and for
 * a relative one the directory: the holder's cwd.
 */
export function sockName(pid: number, fd: number, name: string | undefined, fileIno?: number): SockName {
  if (name === undefined || name === '') return {};
  if (!isPath(name)) return { name };
  const rel = !name.startsWith('/');
  // A relative name is looked for where the holder is (its cwd, its root), as the kernel cannot say where it was bound.
  const dirs = rel ? ['cwd', 'root'].map((l) => { try { return fs.readlinkSync(`/proc/${pid}/${l}`).replace(/ \(deleted\)$/, ''); } catch { return undefined; } }).filter((d): d is string => d !== undefined) : [''];
  for (const dir of dirs) {
    try {
      const st = fs.lstatSync(rel ? `${dir === '/' ? '' : dir}/${name.replace(/\0$/, '')}` : sockPath(pid, name), { bigint: true });
      if (!st.isSocket() || fileIno === undefined || (st.ino & 0xffffffffn) !== BigInt(fileIno)) continue;
      // Its mode and owner, made again as the binder's umask and ids would not.
      const file = { mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid) };
      return { name, fileThere: true, ...(rel ? { dir } : {}), file };
    } catch { /* not there */ }
  }
  if (rel) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (unix socket bound to the relative name ${printable(name)}, whose file is neither in the cwd nor in the root of its holder: bound elsewhere, or unlinked)`);
  return { name, fileThere: false }; // unlinked since it was bound, or its path now another file's
}

/**
 * The process holding a socket (by inode) and its command, for the log:
 * /proc/PID/fd of every process, looked at only when refusing.
 */
export function holderOf(ino: number): string {
  const want = `socket:[${ino}]`;
  for (const d of fs.readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(d)) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${d}/fd`);
    } catch {
      continue;
    }
    for (const f of fds) {
      let t = '';
      try {
        t = fs.readlinkSync(`/proc/${d}/fd/${f}`);
      } catch { /* closed */ }
      if (t !== want) continue;
      let comm = '?';
      try {
        comm = fs.readFileSync(`/proc/${d}/comm`, 'utf8').trim();
      } catch { /* gone */ }
      return `process ${d} (${comm})`;
    }
  }
  return 'no process (its holder is gone or is in flight)';
}

/** A reference between sockets found during the capture, by inode until every socket has its description. */
export type SockFix = { desc: number } & ({ waiting: number[] } | { pendingOn: number } | { peer: number } | { from: string[] });

/** The client of each connection not yet accepted, to its listener (inodes). */
export function waitingClients(diag: Map<number, UnixSockInfo>): Map<number, number> {
  const out = new Map<number, number>();
  for (const s of diag.values()) for (const c of s.state === 10 ? (s.icons ?? []) : []) if (c) out.set(c, s.ino);
  return out;
}

/**
 * The clients of a listener's connections not yet accepted, in accept
 * order. What a client sent is in the connection's server end, which only
 * accept() gives a descriptor of: a client that sent anything, or that
 * closed, is refused.
 */
export function waitingOn(pid: number, fd: number, target: string, info: UnixSockInfo, diag: Map<number, UnixSockInfo>): number[] {
  const icons = info.icons ?? [];
  const refuse = (why: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (${target}: listening unix socket ${printable(info.name)} with ${info.rqueue} connections not yet accepted: ${why})`);
  if (icons.length !== info.rqueue || icons.includes(0)) throw refuse('the client of one has closed, and what it sent can only be read by accepting it');
  for (const c of icons) {
    const sent = diag.get(c)?.wqueue ?? 0;
    if (sent) throw refuse(`the client socket:[${c}] has sent data (${sent} bytes of buffers) that can only be read by accepting it`);
  }
  return icons;
}

/**
 * The references between sockets, as descriptions: a listener's waiting
 * clients, a client's listener, a datagram socket's peer in the tree. One
 * to a socket outside the subtree is refused naming the process holding it.
 */
export function linkSockets(table: FilesTable, fixes: SockFix[], descs: Map<number, number>, diag: Map<number, UnixSockInfo>, where: (desc: number) => { pid: number; fd: number } | undefined): void {
  const refuse = (desc: number, why: string) => {
    const at = where(desc);
    return new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${at?.pid ?? '?'}: fd ${at?.fd ?? '?'} (${why})`);
  };
  for (const f of fixes) {
    const d = table.descs[f.desc];
    if (d.kind !== 'usock') continue;
    if ('waiting' in f) {
      d.waiting = f.waiting.map((c) => {
        const id = descs.get(c);
        if (id === undefined) throw refuse(f.desc, `listening unix socket ${printable(d.name)}: a connection not yet accepted from ${holderOf(c)}, outside the subtree`);
        return id;
      });
    } else if ('pendingOn' in f) {
      const id = descs.get(f.pendingOn);
      if (id === undefined) throw refuse(f.desc, `unix socket waiting to be accepted by ${printable(diag.get(f.pendingOn)?.name)}, a listener of ${holderOf(f.pendingOn)}, outside the subtree`);
      d.pendingOn = id;
    } else if ('peer' in f) {
      const id = descs.get(f.peer);
      if (id !== undefined) d.peerDesc = id;
    } else {
      for (const name of new Set(f.from.filter((n) => n))) {
        const holders = [...diag.values()].filter((x) => x.name === name);
        if (holders.length && !holders.some((x) => descs.has(x.ino))) throw refuse(f.desc, `a datagram from ${printable(name)} queued on it: that name is held by ${holderOf(holders[0].ino)}, outside the subtree`);
      }
    }
  }
}

/**
 * What a unix socket says of itself, from one copy of its descriptor: its
 * SO_PEERCRED (none: not connected nor listening) and its options that
 * differ from a new socket's of its type (read before any peek: its peek
 * offset is one of them). `tree`: the tree's processes (host pids), at `level`.
 */
export function sockSelf(pid: number, fd: number, type: number, tree: Set<number>, level: number): { cred?: PeerCred; opts: SockOpt[] } {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const opts = captureSockOpts(mine, freshSocket(type), AF_UNIX, type, 0);
    const b = getsockopt(mine, SOL_SOCKET, SO_PEERCRED, 12);
    if (typeof b === 'number' || b.length < 12 || b.readInt32LE(0) <= 0) return { opts };
    const host = b.readInt32LE(0);
    const g = getsockopt(mine, SOL_SOCKET, SO_PEERGROUPS, 4 * 65536);
    const groups = typeof g === 'number' ? [] : [...Array(g.length >> 2).keys()].map((i) => g.readUInt32LE(4 * i));
    return { opts, cred: { pid: tree.has(host) ? (nsPids(host)[level] ?? 0) : 0, uid: b.readUInt32LE(4), gid: b.readUInt32LE(8), ...(groups.length ? { groups } : {}) } };
  }, 'socket fd');
}

/** A new unix socket of each type, made once: what a socket's options are compared with (the kernel's defaults). */
const fresh = new Map<number, number>();
function freshSocket(type: number): number {
  let f = fresh.get(type);
  if (f === undefined) fresh.set(type, (f = sys.socket(AF_UNIX, type | SOCK_CLOEXEC, 0)));
  return f;
}

/**
 * What a socket has yet to read, without reading it: with SO_PEEK_OFF each
 * MSG_PEEK returns the next message (or stream bytes) after the last one;
 * a datagram or seqpacket message says who sent it (SCM_CREDENTIALS).
 */
export function peekQueue(pid: number, fd: number): { data: Buffer; cred?: MsgCred }[] {
  return peekDatagrams(pid, fd, false);
}

/** Who sent a queued message (SCM_CREDENTIALS): a host pid here. */
export type MsgCred = { pid: number; uid: number; gid: number };

/**
 * The queue as peekQueue reads it, with (`senders`) each message's sender
 * name as recvfrom gives it ('' for an unnamed sender).
 */
export function peekDatagrams(pid: number, fd: number, senders: boolean): { data: Buffer; from: string; cred?: MsgCred }[] {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const old = getsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF) ?? -1; // the program's own, set back after
    if (sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, 0) !== 0) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd}: cannot peek at its queue`);
    const out: { data: Buffer; from: string; cred?: MsgCred }[] = [];
    const data = Buffer.alloc(1 << 20), control = Buffer.alloc(CONTROL), iov = Buffer.alloc(16), name = Buffer.alloc(112);
    try {
      withPassCred(mine, () => {
        for (;;) {
          const m = recvOne(mine, data, control, iov, MSG_PEEK, `task ${pid}: fd ${fd}`, data.length, senders ? name : undefined);
          if (!m || (m.data.length === 0 && endOfQueue(mine))) break; // EAGAIN: the queue is read
          for (const f of m.fds) fs.closeSync(f); // (none: a queue with files is read by inflight.ts)
          out.push({ data: m.data, from: m.from ?? '', ...(m.cred ? { cred: m.cred } : {}) });
        }
      });
    } finally {
      sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, old);
    }
    return out;
  }, 'socket fd');
}

/**
 * A peek that read nothing: an empty datagram or seqpacket message (kept:
 * the kernel returns each one once to peeks at an offset, then steps over
 * it), or the end of the queue of a stream, or of a socket shut down for
 * reading or whose peer is gone (then the queue is over: an empty message
 * right before such an end is not told from it). Empty messages a peek
 * returned before (the program's own MSG_PEEK, or an earlier checkpoint's)
 * are stepped over by every later peek: the kernel does not show them.
 */
export function endOfQueue(mine: number): boolean {
  const type = getsockoptInt(mine, SOL_SOCKET, SO_TYPE);
  if (type === SOCK_STREAM || type === undefined) return true;
  return (sys.pollOne(mine, POLLIN | POLLRDHUP, 0) & (POLLRDHUP | POLLHUP)) !== 0;
}

/** Among a tree's socket descriptions: who depends on whom, and each one's name. */
export function sockDependents(table: FilesTable) {
  const byName = new Map<string, number[]>();
  const connected = new Map<number, number[]>();
  const nameOf = (id: number): SockName => {
    const d = table.descs[id];
    if (d?.kind === 'usock') return { name: d.name, fileThere: d.fileThere, dir: d.dir, file: d.file };
    if (d?.kind === 'unix') return table.socks[d.pair]?.names?.[d.end] ?? {};
    throw new CkptError(errno('EBADMSG'), 'image', `description ${id} is not a unix socket`);
  };
  for (const d of table.descs) {
    if (d.kind !== 'usock' && d.kind !== 'unix') continue;
    const n = nameOf(d.id).name;
    if (n !== undefined) byName.set(n, [...(byName.get(n) ?? []), d.id]);
    if (d.kind === 'usock' && d.peerDesc !== undefined) connected.set(d.peerDesc, [...(connected.get(d.peerDesc) ?? []), d.id]);
  }
  return {
    nameOf,
    /** Made after `d` and before it is finished: those connected to it, the senders of its datagrams. */
    dependents(d: SoloSockState & { id: number }): number[] {
      const senders = (d.from ?? []).flatMap((n) => (n ? (byName.get(n) ?? []) : []));
      return [...new Set([...(connected.get(d.id) ?? []), ...senders])].filter((x) => x !== d.id);
    },
  };
}

/** Send messages through a tracee's socket, via a duplicate of its descriptor. */
function sendInto(pid: number, fd: number | bigint, msgs: string[], creds: (MsgCred | undefined)[] = []): void {
  if (!msgs.length) return;
  withTraceeFd(pid, fd, 'restart:files', (mine) => {
    msgs.forEach((x, i) => {
      const m = Buffer.from(x, 'base64');
      if (creds[i]) return sendWithFds(mine, m, [], `task ${pid}`, undefined, creds[i]);
      if (sys.send(mine, m, MSG_DONTWAIT) !== m.length) throw new CkptError(errno('ENOMEM'), 'restart:files', `task ${pid}: cannot queue ${m.length} bytes on a socket`);
    });
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

/** A socket whose peer is gone, made with a stand-in peer that goes once its queue is sent. */
export interface Orphan { pair: SockPairState; ends: [Place, Place] }

/** What making sockets needs from the files restore. */
export interface SockRestore {
  remote: (pid: number) => Remote;
  host: (pid: number) => number;
  /** Park descriptor `fd` of `pid` at a temporary number (closed at the end); returns its place. */
  park: (pid: number, fd: bigint) => Place;
  /** Listening sockets made so far, by name. */
  listeners: Map<string, Place>;
  /** Is `pid` a process of this restore (one sockets can be made in)? */
  inTree: (pid: number) => boolean;
  /** Move the socket at `from` into `pid` (at `fd`, else parked), closing it at `from`. */
  relocate: (from: Place, pid: number, fd?: number) => Place;
}

/** The restore of one tree's sockets: knows which socket files live sockets hold. */
export class UnixSockets {
  private held?: Set<number>;
  /** Names made again for sockets whose file was gone at the checkpoint: unlinked once every socket is made. */
  private readonly unlinks: { pid: number; path: string }[] = [];
  /** Directories made to bind such names in (gone too at the checkpoint): removed last, deepest first. */
  private readonly dirs: { pid: number; path: string }[] = [];
  /** Sockets bound so far, by name: a datagram queued from one of them is sent again from it. */
  private readonly named = new Map<string, Place>();
  /** Socket files this restore made that are there to stay (as the supervisor reaches them). */
  private readonly ours = new Set<string>();
  constructor(private readonly ctx: SockRestore) {}

  /**
   * A socket on its own, made in `pid` and bound (listening if it was);
   * its place (parked). What it reads, whom it is connected to and its
   * shutdown come with finishSolo, once its dependents exist.
   */
  makeSolo(pid: number, s: SoloSockState): Place {
    const r = this.ctx.remote(pid);
    // Non-blocking while it is made: a connection not yet accepted must not wait (its flags are set after).
    const fd = r.check('restart:files socket', SYS_socket, AF_UNIX, s.type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    const at = this.ctx.park(pid, fd);
    if (s.name !== undefined) this.bind(pid, at.fd, s);
    if (s.backlog !== undefined) this.onAs(at, s.cred, (rx, fd) => void rx.check('restart:files listen', SYS_listen, fd, s.backlog!));
    // A name gone at the checkpoint is still there until every socket is made: connections are made through it.
    if (s.backlog !== undefined && s.name !== undefined) this.ctx.listeners.set(s.name, at);
    return at;
  }

  /**
   * The rest of a socket on its own: the datagrams sent to it again (each
   * from its sender's name: `sender` gives the tree's socket bound to it,
   * else a temporary one binds it), then connected to `target` (the socket
   * it sends to, or the listener it waits on), then shut down as it was.
   */
  finishSolo(at: Place, s: SoloSockState, target?: SockName, take?: (desc: number) => number): void {
    const r = this.ctx.remote(at.pid);
    if (s.queue?.length) {
      if (s.name === undefined) throw new CkptError(errno('EOPNOTSUPP'), 'restart:files', `task ${at.pid}: datagrams queued to an unnamed socket`);
      if (s.inflight?.length && !take) throw new CkptError(errno('EBADMSG'), 'restart:files', `task ${at.pid}: files in flight to a socket, sent before they exist`);
      const to = this.address(at.pid, s);
      s.queue.forEach((m, i) => {
        const fds = (s.inflight ?? []).filter((x) => x.msg === i).flatMap((x) => x.descs).map((d) => take!(d));
        try {
          this.sendFrom(at.pid, s.from?.[i] ?? '', to, Buffer.from(m, 'base64'), fds, this.sender(s.msgCreds?.[i]));
        } finally {
          for (const f of fds) fs.closeSync(f);
        }
      });
    }
    // Connected only once its queue is back: a datagram socket connected to
    // another (itself, say) refuses what anyone else sends it (EPERM).
    const dest = target ?? (s.connectTo !== undefined ? { name: s.connectTo } : undefined);
    // A stream or seqpacket client connects as it did (the accepted end's SO_PEERCRED is who connected).
    const to = dest?.name !== undefined ? this.address(at.pid, dest) : undefined;
    if (to !== undefined) this.onAs(at, s.pendingOn !== undefined ? s.connectAs : undefined, (rx, fd) => this.callWithName(rx, 'connect', SYS_connect, fd, to, s.pendingOn !== undefined));
    if (s.shutdown) shutDown(r, at.fd, s.shutdown);
  }

  /**
   * A socket whose peer is gone: made as a pair whose other end is then
   * closed. A stream one reads its queue, then EOF (the closed end shut
   * it down); a datagram one is connected to a socket that is no more.
   */
  makeOrphan(pid: number, s: SoloSockState, late: Orphan[]): Place {
    const pair: SockPairState = { id: 0, type: s.type, queues: [s.queue ?? [], []], names: [{ name: s.name, fileThere: s.fileThere, dir: s.dir, file: s.file }, {}] };
    if (s.type === SOCK_DGRAM && s.shutdown) pair.shutdown = [s.shutdown, 0];
    if (s.inflight?.length) pair.inflight = s.inflight.map((x) => ({ end: 0, ...x }));
    if (s.cred) pair.creds = [s.cred, s.cred];
    if (s.msgCreds) pair.msgCreds = [s.msgCreds, []];
    const ends = this.makePair(pair, [pid, pid]);
    // With files in flight its queue is sent once every description exists (finishOrphan), its stand-in peer closed then.
    if (pair.inflight) late.push({ pair, ends });
    else this.ctx.remote(ends[1].pid).call(SYS.close, ends[1].fd); // its parked number is closed again at the end: nothing there by then
    return ends[0];
  }

  /** The queue of a socket whose peer is gone, with its files in flight; then its stand-in peer goes. */
  finishOrphan(o: Orphan, take: (desc: number) => number): void {
    this.finishPair(o.pair, o.ends, take);
    this.ctx.remote(o.ends[1].pid).call(SYS.close, o.ends[1].fd);
  }

  /**
   * A connected pair: `where[e]` is the process that first holds end e.
   * Returns each end's place (parked), its queue refilled.
   */
  makePair(p: SockPairState, where: [number, number]): [Place, Place] {
    const names = p.names ?? [{}, {}];
    let ends: [Place, Place];
    if (names.every((n) => n.name === undefined) || p.type === SOCK_DGRAM) {
      ends = this.madeAs(where[0], p.creds?.[0], (x, r) => {
        const scratch = r.scratch();
        r.check('restart:files socketpair', SYS_socketpair, AF_UNIX, p.type | SOCK_CLOEXEC, 0, scratch);
        const fds = r.mem.read(scratch, 8);
        return [this.ctx.park(x, BigInt(fds.readInt32LE(0))), this.ctx.park(x, BigInt(fds.readInt32LE(4)))];
      }) as [Place, Place];
      names.forEach((n, e) => n.name !== undefined && this.bind(where[0], ends[e].fd, n));
    } else {
      // The server end: the one named as a listener that was made, else a named one.
      const s = ([0, 1] as const).find((e) => names[e].name !== undefined && this.ctx.listeners.has(names[e].name!)) ?? (names[0].name !== undefined ? 0 : 1);
      const c = 1 - s;
      const sname = names[s].name!;
      let listener = this.ctx.listeners.get(sname);
      const temporary = !listener;
      // (A temporary listener listens as the one the client end names did: the client's SO_PEERCRED.)
      if (!listener) listener = this.makeSolo(where[s], { type: p.type, name: sname, dir: names[s].dir, backlog: 1, fileThere: names[s].fileThere, file: names[s].file, ...(p.creds ? { cred: p.creds[c] } : {}) });
      const rc = this.ctx.remote(where[c]);
      const client = this.ctx.park(where[c], rc.check('restart:files socket', SYS_socket, AF_UNIX, p.type | SOCK_CLOEXEC, 0));
      if (names[c].name !== undefined) this.bind(where[c], client.fd, names[c]);
      const to = this.address(where[c], names[s]);
      this.onAs(client, p.creds?.[s], (rx, fd) => this.callWithName(rx, 'connect', SYS_connect, fd, to));
      const rl = this.ctx.remote(listener.pid);
      const server = this.ctx.park(listener.pid, rl.check('restart:files accept', SYS_accept4, listener.fd, 0, 0, SOCK_CLOEXEC));
      if (temporary) {
        rl.call(SYS.close, listener.fd);
        this.ctx.listeners.delete(sname);
        this.named.delete(sname);
      }
      ends = s === 0 ? [server, client] : [client, server];
    }
    // Each end's queue is refilled by sending from the other end; one with
    // files in flight once every description exists (finishPair).
    const late = new Set((p.inflight ?? []).map((x) => x.end));
    p.queues.forEach((q, e) => !late.has(e as 0 | 1) && sendInto(this.ctx.host(ends[1 - e].pid), ends[1 - e].fd, q, (p.msgCreds?.[e] ?? []).map((c) => this.sender(c))));
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
            sendWithFds(mine, Buffer.from(m, 'base64'), fds, `task ${from.pid}`, undefined, this.sender(p.msgCreds?.[e][i]));
          } finally {
            for (const f of fds) fs.closeSync(f);
          }
        });
      }, 'socket fd');
    }
    this.shutDownPair(p, ends);
  }

  /**
   * A queued message's sender as the supervisor names it to send it again
   * (SCM_CREDENTIALS): the process of the tree, else (gone, or outside) the
   * supervisor itself, with the ids it sent with.
   */
  private sender(c: PeerCred | undefined): MsgCred | undefined {
    return c && { pid: c.pid && this.ctx.inTree(c.pid) ? this.ctx.host(c.pid) : process.pid, uid: c.uid, gid: c.gid };
  }

  /**
   * Make what SO_PEERCRED records (a socketpair, a listen, a connect) as it
   * was made: in the process named there if it is one of the tree's, else
   * in `home`, and with the effective ids it had then (an injected
   * setresuid/setresgid for the call, then back). The sockets `make`
   * returns are moved to `home`. A process gone since, or one outside, is
   * not there to make it: the socket then names `home`'s pid.
   */
  private madeAs(home: number, cred: PeerCred | undefined, make: (pid: number, r: Remote) => Place[]): Place[] {
    const x = cred && cred.pid && cred.pid !== home && this.ctx.inTree(cred.pid) ? cred.pid : home;
    const made = this.withIds(x, cred, () => make(x, this.ctx.remote(x)));
    return x === home ? made : made.map((m) => this.ctx.relocate(m, home));
  }

  /** `call` on the socket at `at` as madeAs makes it; the socket comes back to the same place. */
  private onAs(at: Place, cred: PeerCred | undefined, call: (r: Remote, fd: number) => void): void {
    this.madeAs(at.pid, cred, (x, r) => {
      const here = x === at.pid ? at : this.ctx.relocate(at, x);
      call(r, here.fd);
      return [here];
    }).forEach((m) => m.fd !== at.fd && this.ctx.relocate(m, at.pid, at.fd));
  }

  /** Run `fn` while process `pid` acts with the effective ids of `cred`. */
  private withIds<T>(pid: number, cred: PeerCred | undefined, fn: () => T): T {
    if (!cred) return fn();
    const ids = idsOf(this.ctx.host(pid));
    const groups = cred.groups ?? [];
    const sameGroups = sameSet(ids.groups, groups);
    if (ids.uid[1] === cred.uid && ids.gid[1] === cred.gid && sameGroups) return fn();
    const what = `task ${pid}: a unix socket made by uid ${cred.uid} gid ${cred.gid} (its SO_PEERCRED)`;
    // Back afterwards: to its own effective uid, which must be its real or saved one (no capability is left then).
    if (ids.uid[1] !== ids.uid[0] && ids.uid[1] !== ids.uid[2]) throw new CkptError(errno('EPERM'), 'restart:files peer credentials', `${what}: the process (euid ${ids.uid[1]}) could not act as it and come back`);
    const r = this.ctx.remote(pid);
    const set = (nr: number, v: number, name: string) => {
      const res = r.call(nr, -1, v, -1);
      if (res < 0n) throw new CkptError(Number(-res), 'restart:files peer credentials', `${what}: the process cannot set its effective ${name} to ${v}`);
    };
    const setGroups = (list: number[]) => {
      const b = new CallBatch(r);
      const buf = Buffer.alloc(Math.max(4, 4 * list.length));
      list.forEach((g, i) => buf.writeUInt32LE(g, 4 * i));
      b.add(`restart:files peer credentials: ${what}: setgroups`, SYS_setgroups, list.length, b.put(buf));
      b.run();
    };
    try {
      if (!sameGroups) setGroups(groups);
      set(SYS_setresgid, cred.gid, 'gid');
      set(SYS_setresuid, cred.uid, 'uid');
      return fn();
    } finally {
      r.call(SYS_setresuid, -1, ids.uid[1], -1);
      r.call(SYS_setresgid, -1, ids.gid[1], -1);
      if (!sameGroups) setGroups(ids.groups);
    }
  }

  /** Once every socket is made: the names that were gone at the checkpoint go again, and the directories made for them. */
  finish(): void {
    for (const u of this.unlinks.splice(0)) this.unlink(u.pid, u.path);
    for (const d of this.dirs.splice(0).reverse()) {
      const b = new CallBatch(this.ctx.remote(d.pid));
      b.add(undefined, SYS_rmdir, b.put(Buffer.from(d.path + '\0')));
      b.run();
    }
  }

  /** Once the queues are refilled (an end shut for sending could not refill its peer's). */
  private shutDownPair(p: SockPairState, ends: [Place, Place]): void {
    p.shutdown?.forEach((how, e) => how && shutDown(this.ctx.remote(ends[e].pid), ends[e].fd, how));
  }

  /** Send one datagram to `to` from a socket named `from` ('' unnamed): the tree's socket of that name, else a temporary one. */
  private sendFrom(pid: number, from: string, to: string, data: Buffer, fds: number[], cred?: MsgCred): void {
    const own = from ? this.named.get(from) : undefined;
    if (own) return sendTo(this.ctx.host(own.pid), own.fd, to, data, pid, fds, cred);
    const r = this.ctx.remote(pid);
    // A socket file the sender left (it is gone) stays, as a socket file no one holds; one made here goes.
    const left = !!from && isPath(from) && fs.existsSync(this.supervisorPath(pid, { name: from }));
    const tmp = r.check('restart:files socket', SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    try {
      if (from) this.bindRaw(pid, Number(tmp), { name: from, fileThere: false }, true);
      sendTo(this.ctx.host(pid), tmp, to, data, pid, fds, cred);
    } finally {
      r.call(SYS.close, tmp);
      if (from && isPath(from) && !left) this.unlink(pid, this.processPath(pid, { name: from }));
    }
  }

  /** Bind fd of `pid` to a name; a stale socket file in the way goes first. Noted for senders and for the unlink of a gone name. */
  private bind(pid: number, fd: number, n: SockName): void {
    const gone = this.bindRaw(pid, fd, n, false);
    this.named.set(n.name!, { pid, fd });
    if (!isPath(n.name!) || gone) return;
    const there = this.processPath(pid, n);
    if (!n.fileThere) this.unlinks.push({ pid, path: there });
    else {
      this.ours.add(this.supervisorPath(pid, n));
      if (n.file) {
        // As the process: an owner it could not give the file is EPERM.
        const b = new CallBatch(this.ctx.remote(pid));
        const p = b.put(Buffer.from(there + '\0', 'latin1'));
        b.add(`restart:files chmod ${there}`, SYS_chmod, p, n.file.mode);
        b.add(`restart:files lchown ${there} ${n.file.uid}:${n.file.gid}`, SYS_lchown, p, n.file.uid, n.file.gid);
        b.run();
      }
    }
  }

  /** Bind as the process; true if the file it made is gone already (bound aside). */
  private bindRaw(pid: number, fd: number, n: SockName, temporary: boolean): boolean {
    const name = n.name!;
    const r = this.ctx.remote(pid);
    if (isPath(name)) {
      const mine = this.supervisorPath(pid, n);
      const there = this.processPath(pid, n);
      // A name of ours, gone at the checkpoint, bound again since by another socket: it goes now.
      const ours = this.unlinks.findIndex((u) => u.pid === pid && u.path === there);
      if (ours >= 0) {
        this.unlink(pid, there);
        this.unlinks.splice(ours, 1);
        this.ctx.listeners.delete(name); // unreachable now: a connection to it goes through a temporary one
      }
      let ino: number | undefined;
      try {
        const st = fs.lstatSync(mine);
        if (st.isSocket()) ino = st.ino;
      } catch { /* nothing there */ }
      if (ino !== undefined && this.ours.has(mine)) {
        // The file of a socket made already, which has the name now (the
        // other was bound first, its file renamed or replaced since): this
        // one is bound aside, under that file moved away for a moment.
        if (n.fileThere) throw new CkptError(errno('EBADMSG'), 'image', `two unix sockets with the file of ${printable(name)}`);
        const aside = `${there}.ckpt-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
        this.rename(pid, there, aside);
        try {
          this.bindRaw(pid, fd, n, temporary);
          this.unlink(pid, there);
        } finally {
          this.rename(pid, aside, there);
        }
        return true; // its name is gone already

      }
      if (ino !== undefined) {
        this.held ??= new Set([...unixSockets().values()].map((x) => x.fileIno ?? 0));
        if (this.held.has(ino)) throw new CkptError(errno('EBUSY'), 'restart:files', `task ${pid}: unix socket name ${printable(name)} is held by a live socket`);
        this.unlink(pid, there);
      } else if (!n.fileThere || temporary) this.makeDirs(pid, mine, there);
    }
    if (isPath(name) && !name.startsWith('/') && n.dir) {
      // A relative name is bound from its directory: the name stays relative, as the kernel keeps it.
      const ob = new CallBatch(r);
      ob.add('restart:files open .', SYS.open, ob.put(Buffer.from('.\0')), O_PATH | O_DIRECTORY | O_CLOEXEC);
      const [back] = ob.run();
      try {
        const b = new CallBatch(r);
        b.add(`restart:files chdir ${n.dir}`, SYS_chdir, b.put(Buffer.from(inTaskRoot(this.ctx.host(pid), n.dir) + '\0')));
        b.run();
        this.callWithName(r, 'bind', SYS_bind, fd, name);
      } finally {
        r.call(SYS_fchdir, back);
        r.call(SYS.close, back);
      }
      return false;
    }
    this.callWithName(r, 'bind', SYS_bind, fd, name);
    return false;
  }

  /**
   * The directories above a path that are not there: made (as the process,
   * mode 0700) so that a name gone with its directory can be bound again;
   * removed at the end.
   */
  private makeDirs(pid: number, mine: string, there: string): void {
    const missing: string[] = [];
    for (let d = path.dirname(mine), t = path.dirname(there); d !== path.dirname(d) && !fs.existsSync(d); d = path.dirname(d), t = path.dirname(t)) missing.unshift(t);
    for (const t of missing) {
      const b = new CallBatch(this.ctx.remote(pid));
      b.add(`restart:files mkdir ${t}`, SYS_mkdir, b.put(Buffer.from(t + '\0')), 0o700);
      b.run();
      this.dirs.push({ pid, path: t });
    }
  }

  /** A path name as the supervisor reaches it: a relative one is in its directory (else the process's cwd). */
  private supervisorPath(pid: number, n: SockName): string {
    const p = n.name!.replace(/\0$/, '');
    if (p.startsWith('/') || !n.dir) return sockPath(this.ctx.host(pid), n.name!);
    return `${n.dir}/${p}`;
  }

  /** A path name as the process reaches it (from inside its root; a relative one by its directory, else its cwd). */
  private processPath(pid: number, n: SockName): string {
    const p = n.name!.replace(/\0$/, '');
    if (p.startsWith('/')) return inTaskRoot(this.ctx.host(pid), p);
    return n.dir ? `${inTaskRoot(this.ctx.host(pid), n.dir)}/${p}` : p;
  }

  /** The name to connect or send to: a relative one by its directory (the connector's cwd may be elsewhere). */
  private address(pid: number, n: SockName): string {
    if (!isPath(n.name!) || n.name!.startsWith('/') || !n.dir) return n.name!;
    return this.processPath(pid, n) + '\0';
  }

  /** bind or connect with a sockaddr_un holding `name`; EADDRINUSE means the name is taken. */
  private callWithName(r: Remote, what: string, nr: number, fd: number | bigint, name: string, inProgress = false): void {
    const addr = sockaddr(name);
    let res = 0n;
    // An abstract name may still be held by a socket of the checkpointed tree that only
    // files in flight kept alive (a loop the kernel's unix garbage collector frees soon after): a few short waits.
    for (let tries = 0; ; tries++) {
      const b = new CallBatch(r);
      b.add(undefined, nr, fd, b.put(addr), addr.length);
      [res] = b.run();
      if (res !== -BigInt(EADDRINUSE) || nr !== SYS_bind || isPath(name) || tries >= 10) break;
      kickUnixGc();
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    }
    if (inProgress && res === -BigInt(EINPROGRESS)) return;
    if (res === -BigInt(EADDRINUSE)) throw new CkptError(errno('EBUSY'), `restart:files ${what}`, `task ${r.task.tid}: unix socket name ${printable(name)} is in use`);
    if (res < 0n) throw new CkptError(Number(-res), `restart:files ${what}`, `task ${r.task.tid}: unix socket name ${printable(name)}`);
  }

  private rename(pid: number, from: string, to: string): void {
    const b = new CallBatch(this.ctx.remote(pid));
    b.add(`restart:files rename ${from}`, SYS_rename, b.put(Buffer.from(from + '\0', 'latin1')), b.put(Buffer.from(to + '\0', 'latin1')));
    b.run();
  }

  /** Unlink a path's file, as the process itself (its permissions, its cwd). */
  private unlink(pid: number, p: string): void {
    const b = new CallBatch(this.ctx.remote(pid));
    b.add(undefined, SYS_unlink, b.put(Buffer.from(p.replace(/\0$/, '') + '\0', 'latin1')));
    b.run();
  }
}

/**
 * Have the kernel's unix garbage collector run: a socket released while
 * files are in flight schedules it. One of ours is sent in flight to its
 * own pair and both are closed.
 */
function kickUnixGc(): void {
  const a = sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (a < 0) return;
  const b = sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  try {
    const name = Buffer.concat([Buffer.from([AF_UNIX, 0, 0]), Buffer.from(`ckpt-gc-${process.pid}`)]);
    if (b >= 0 && sys.syscall(SYS_bind, b, addressOf(name), name.length) === 0) sendWithFds(a, Buffer.from('g'), [a], 'gc', name);
  } catch { /* only a nudge */ } finally {
    fs.closeSync(a);
    if (b >= 0) fs.closeSync(b);
  }
}

/** A sockaddr_un holding a name as the kernel keeps it (a path with its NUL, or NUL and an abstract name). */
function sockaddr(name: string): Buffer {
  return Buffer.concat([Buffer.from([AF_UNIX, 0]), Buffer.from(name, 'latin1')]);
}

/** sendto from a tracee's socket (through the supervisor's duplicate of it). */
function sendTo(host: number, fd: number | bigint, to: string, data: Buffer, pid: number, fds: number[], cred?: MsgCred): void {
  withTraceeFd(host, fd, 'restart:files', (mine) => {
    const addr = sockaddr(to);
    if (fds.length || cred) return sendWithFds(mine, data, fds, `task ${pid}`, addr, cred);
    const n = sys.syscall(SYS_sendto, mine, addressOf(data), data.length, MSG_DONTWAIT, addressOf(addr), addr.length);
    if (n !== data.length) throw new CkptError(n < 0 ? errnoNow() : errno('ENOMEM'), 'restart:files', `task ${pid}: cannot queue a datagram of ${data.length} bytes to ${printable(to)} again`);
  }, 'socket fd');
}

/** A task's credentials (uids and gids: real, effective, saved, fs; groups) and effective capabilities. */
function idsOf(host: number): Creds & { capEff: bigint } {
  const st = readStatus(host);
  return { ...parseCreds(st), capEff: BigInt('0x' + (st.get('CapEff') || '0')) };
}

const sameSet = (a: number[], b: number[]) => {
  const x = [...a].sort(), y = [...b].sort();
  return x.length === y.length && x.every((v, i) => v === y[i]);
};

const CAP_SETGID = 6n, CAP_SETUID = 7n;

/**
 * A rollback's check, before anything changes: a live process that will
 * make a unix socket again as it made it (its SO_PEERCRED) must be able
 * to act with those ids (the same as now, or CAP_SETUID and CAP_SETGID
 * with a way back to its own). `live`: a process kept alive, to its host pid.
 */
export function checkPeerCreds(table: FilesTable, live: (pid: number) => number | undefined): void {
  const creds = [...table.socks.flatMap((p) => p.creds ?? []), ...table.descs.flatMap((d) => (d.kind === 'usock' ? [d.cred, d.connectAs] : []))];
  for (const c of creds) {
    const host = c?.pid ? live(c.pid) : undefined;
    if (!c || host === undefined) continue;
    const ids = idsOf(host);
    if (ids.uid[1] === c.uid && ids.gid[1] === c.gid && sameSet(ids.groups, c.groups ?? [])) continue;
    const can = (ids.capEff >> CAP_SETUID) & (ids.capEff >> CAP_SETGID) & 1n;
    if (!can || (ids.uid[1] !== ids.uid[0] && ids.uid[1] !== ids.uid[2])) {
      throw new CkptError(errno('EPERM'), 'restart:files peer credentials', `task ${c.pid}: made a unix socket as uid ${c.uid} gid ${c.gid} (its SO_PEERCRED), and acting as uid ${ids.uid[1]} gid ${ids.gid[1]} now it cannot make it so again`);
    }
  }
}
