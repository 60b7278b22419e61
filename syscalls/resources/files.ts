/**
 * Descriptors, cwd and umask, for a whole tree.
 *
 * An open file description is captured once, however many descriptors (in
 * however many processes) refer to it: descriptors are matched with
 * kcmp(KCMP_FILE). At restart each description is created once, in its
 * first holder (its owner), and every other holder gets the very same
 * description by an injected pidfd_open + pidfd_getfd, so offsets and status
 * flags stay shared and the restore order does not depend on fork order.
 *
 * Kinds: files, directories and devices reopened by path (offset, flags);
 * pipes and FIFOs with their unread data (read without consuming it, with
 * tee); descriptors that are the very files the supervisor was given by its
 * own parent ("outside": connected to the restarter's descriptor of the same
 * number); event files (events.ts), inotify and fanotify groups
 * (notify.ts). Anything else, or a pipe also held by a process outside the
 * subtree, is refused with EOPNOTSUPP.
 */
import { isMqueue, captureMqueue, openMqueue, unlinkTemporaryQueues, mqueueSchema, type MqueueState, type MadeQueues } from './mqueue.js';
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { listFds, readFdinfo, readStat } from '../../lib/proc.js';
import { nsPids } from '../../supervisor/pidns.js';
import { sys, SYS } from '../../lib/libc.js';
import { logError } from '../../lib/log.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { openIn, pathGone } from './memory.js';
import { isShm, type ShmCapture, type ShmRestore } from './shm.js';
import { unixSockets, type UnixSockInfo } from '../../lib/sockdiag.js';
import { captureEvent, makeEvent, addWatches, addMovedWatch, watchesFile, type EventState } from './events.js';
import { captureOwners, restoreOwners, hasOwner, ownerSchema, type OwnerState } from './fown.js';
import { captureLocks, restoreLocks, lockSchema, type LockState } from './locks.js';
import { UnixSockets, sockName, sockSelf, peekQueue, peekDatagrams, waitingClients, waitingOn, linkSockets, sockDependents, holderOf, printable, type SockFix, type Orphan, soloSockFields, sockPairSchema, type SockPairState, type SoloSockState, type Place } from './unixsock.js';
import { peekWithFds, peekDatagramsWithFds } from './inflight.js';
import { sharedTables, refuseInFlight, unknownKind, statelessDevice, capturePidfd, makePidfd, treeMember, nsLevel, makeDeletedDir, makeDeletedDevice, type PidfdState, type DeletedDevice } from './fdkinds.js';
import { inTaskRoot } from './attrs.js';
import { TtyCapture, TtyRestore, isPtyDevice, ptySchema, terminalSchema, ttyDescFields, type TtyDesc, type PtyState, type TerminalState } from './tty.js';
import { captureNetSock, makeNetSock, netSockSchema, NetDiag, addSockOpts, knownOpt, sockOptsSchema, type NetSockState, type SockOpt } from './netdgram.js';
import { TcpCapture, TcpRestore, silenceLiveTcp, tcpFields, type TcpState } from './tcp.js';
import { eventSchema } from './events.js';
import { refuseUring } from './aio.js';
import { parseCreds } from './process.js';
import { captureNotify, findWatchedGhosts, makeNotify, addMarks, notifySchema, type NotifyState } from './notify.js';
import { z, int, id, fd, path, openFlags, base64, dec63, MANY, PID_MAX, type Same } from '../../lib/schema.js';

export type { SockPairState } from './unixsock.js';

const O_ACCMODE = 3, O_RDONLY = 0, O_WRONLY = 1, O_RDWR = 2, O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000, O_CREAT = 0o100, O_EXCL = 0o200, O_TRUNC = 0o1000, O_NOCTTY = 0o400;
const F_SETFD = 2, F_SETFL = 4, F_SETPIPE_SZ = 1031, F_GETPIPE_SZ = 1032, SEEK_SET = 0;
const SYS_kcmp = 312, KCMP_FILE = 0, SPLICE_F_NONBLOCK = 2;
const SOCK_STREAM = 1, SOCK_DGRAM = 2;
const SYS_pipe2 = 293;
/** Status flags F_SETFL can change. */
const SETFL_MASK = 0o2000 | O_NONBLOCK | 0o20000 | 0o40000 | 0o1000000; // APPEND NONBLOCK ASYNC DIRECT NOATIME
/**
 * O_ASYNC given to open() shows in the flags but arms nothing (the kernel
 * calls a file's fasync only when F_SETFL changes the flag): it is left out
 * of every open and set with F_SETFL afterwards.
 */
const O_ASYNC = 0o20000;
/** What open() must not be given again: it creates, truncates, or only arms half of O_ASYNC. */
const reopenFlags = (flags: number) => flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_ASYNC);

export type FileDesc =
  | { id: number; kind: 'path'; path: string; flags: number; pos: string }
  | { id: number; kind: 'fifo'; path: string; flags: number; data: string; ino?: number; deleted?: { mode: number } }
  | { id: number; kind: 'pipe'; pipe: number; end: 'r' | 'w'; flags: number }
  | { id: number; kind: 'memfd'; shmKey: string; flags: number; pos: string }
  | { id: number; kind: 'ghost'; path: string; mode: number; shmKey: string; flags: number; pos: string; uid?: number; gid?: number }
  | ({ id: number; kind: 'pidfd'; flags: number } & PidfdState)
  | { id: number; kind: 'deldir'; path: string; mode: number; flags: number }
  | ({ id: number; kind: 'deldev'; flags: number; pos: string } & DeletedDevice)
  | { id: number; kind: 'unix'; pair: number; end: 0 | 1; flags: number; sockOpts?: SockOpt[] }
  | ({ id: number; kind: 'usock'; flags: number; sockOpts?: SockOpt[] } & SoloSockState)
  | { id: number; kind: 'event'; flags: number; ev: EventState }
  | TtyDesc
  | { id: number; kind: 'net'; flags: number; net: NetSockState }
  | { id: number; kind: 'notify'; flags: number; nt: NotifyState }
  | { id: number; kind: 'mqueue'; flags: number; mq: MqueueState }
  | ({ id: number; kind: 'tcp'; flags: number } & TcpState);

export interface PipeState {
  id: number;
  size: number;
  data: string; // base64 of the unread bytes
}

/** `sfd`: the supervisor's own descriptor it is the same open file as. */
export type FdRef = { fd: number; cloexec: boolean } & ({ desc: number } | { outside: true; sfd: number });

export interface FilesTable {
  descs: FileDesc[];
  pipes: PipeState[];
  socks: SockPairState[];
  /** Descriptions with an owner or signal (F_SETOWN_EX, F_SETSIG): fown.ts. */
  owners?: OwnerState[];
  /** Locks and leases held by the subtree: locks.ts. */
  locks?: LockState[];
  /** Pty pairs whose master the subtree holds, and the terminal outside it: tty.ts. */
  ptys?: PtyState[];
  terminal?: TerminalState;
  /** Descriptions held only in flight (SCM_RIGHTS): made at a temporary number of process `pid` (the receiver). */
  flying?: { desc: number; pid: number }[];
}

/** A descriptor as captureFiles met it (not part of the image): for what fown.ts and locks.ts read. */
export interface FdProbe { pid: number; fd: number; desc: number | 'outside'; first: boolean; text: string }

export interface FilesState {
  fds: FdRef[];
  cwd: string;
  /** The cwd had been removed: made again empty, with this mode (cwd is its path). */
  cwdDeleted?: { mode: number };
  umask: number;
  /**
   * The process (of the tree, before this one) whose descriptor table this
   * one uses, shared (clone CLONE_FILES): its owner, who lists the
   * descriptors; this one lists none (fdkinds.ts).
   */
  filesOf?: number;
  /** Its controlling terminal is this pty of the tree (FilesTable.ptys): tty.ts. */
  ctty?: number;
}

/** Pipe buffers are at most 2^31 bytes (F_SETPIPE_SZ); their data at most that. */
const PIPE_MAX = 2 ** 31;
const descId = int(0, MANY);
const fileFields = { id: descId, flags: openFlags };
export const fileDescSchema = z.discriminatedUnion('kind', [
  z.strictObject({ ...fileFields, kind: z.literal('path'), path, pos: dec63 }),
  z.strictObject({ ...fileFields, kind: z.literal('fifo'), path, data: base64(PIPE_MAX), ino: int(0, Number.MAX_SAFE_INTEGER).optional(), deleted: z.strictObject({ mode: int(0, 0o7777) }).optional() }),
  z.strictObject({ ...fileFields, kind: z.literal('pipe'), pipe: int(0, MANY), end: z.enum(['r', 'w']) }),
  z.strictObject({ ...fileFields, kind: z.literal('memfd'), shmKey: z.string().min(1).max(64), pos: dec63 }),
  z.strictObject({ ...fileFields, kind: z.literal('ghost'), path, mode: int(0, 0o7777), shmKey: z.string().min(1).max(64), pos: dec63, uid: id.optional(), gid: id.optional() }),
  z.strictObject({ ...fileFields, kind: z.literal('pidfd'), pid: int(-PID_MAX, PID_MAX) }),
  z.strictObject({ ...fileFields, kind: z.literal('deldir'), path, mode: int(0, 0o7777) }),
  z.strictObject({ ...fileFields, kind: z.literal('deldev'), path, mode: int(0, 0o177777), rdev: int(0, 2 ** 32 - 1), uid: id, gid: id, pos: dec63 }),
  z.strictObject({ ...fileFields, kind: z.literal('unix'), pair: int(0, MANY), end: z.union([z.literal(0), z.literal(1)]), sockOpts: sockOptsSchema.optional() }),
  z.strictObject({ ...fileFields, kind: z.literal('usock'), ...soloSockFields, sockOpts: sockOptsSchema.optional() }),
  z.strictObject({ ...fileFields, kind: z.literal('event'), ev: eventSchema }),
  z.strictObject({ ...fileFields, kind: z.literal('tty'), ...ttyDescFields }),
  z.strictObject({ ...fileFields, kind: z.literal('net'), net: netSockSchema }),
  z.strictObject({ ...fileFields, kind: z.literal('notify'), nt: notifySchema }),
  z.strictObject({ ...fileFields, kind: z.literal('mqueue'), mq: mqueueSchema }),
  z.strictObject({ ...fileFields, kind: z.literal('tcp'), ...tcpFields }),
]);
export const pipeSchema = z.strictObject({ id: int(0, MANY), size: int(4096, PIPE_MAX), data: base64(PIPE_MAX) });
export const fdRefSchema = z.union([
  z.strictObject({ fd, cloexec: z.boolean(), desc: descId }),
  z.strictObject({ fd, cloexec: z.boolean(), outside: z.literal(true), sfd: fd }),
]);
export const filesTableSchema = z.strictObject({
  descs: z.array(fileDescSchema).max(MANY),
  pipes: z.array(pipeSchema).max(MANY),
  socks: z.array(sockPairSchema).max(MANY),
  owners: z.array(ownerSchema).max(MANY).optional(),
  locks: z.array(lockSchema).max(MANY).optional(),
  ptys: z.array(ptySchema).max(MANY).optional(),
  terminal: terminalSchema.optional(),
  flying: z.array(z.strictObject({ desc: descId, pid: int(1, PID_MAX) })).max(MANY).optional(),
});
export const filesStateSchema = z.strictObject({ fds: z.array(fdRefSchema).max(MANY), cwd: path, cwdDeleted: z.strictObject({ mode: int(0, 0o7777) }).optional(), umask: int(0, 0o777), filesOf: int(1, PID_MAX).optional(), ctty: int(0, MANY).optional() });
type DescOf<K> = Extract<FileDesc, { kind: K }>;
type SchemaOf<K> = Extract<z.infer<typeof fileDescSchema>, { kind: K }>;
const sameDescs: [Same<SchemaOf<'path'>, DescOf<'path'>>, Same<SchemaOf<'fifo'>, DescOf<'fifo'>>, Same<SchemaOf<'pipe'>, DescOf<'pipe'>>, Same<SchemaOf<'memfd'>, DescOf<'memfd'>>,
  Same<SchemaOf<'ghost'>, DescOf<'ghost'>>, Same<SchemaOf<'pidfd'>, DescOf<'pidfd'>>, Same<SchemaOf<'deldir'>, DescOf<'deldir'>>, Same<SchemaOf<'deldev'>, DescOf<'deldev'>>, Same<SchemaOf<'unix'>, DescOf<'unix'>>, Same<SchemaOf<'usock'>, DescOf<'usock'>>, Same<SchemaOf<'event'>, DescOf<'event'>>, Same<SchemaOf<'tty'>, DescOf<'tty'>>, Same<SchemaOf<'net'>, DescOf<'net'>>, Same<SchemaOf<'notify'>, DescOf<'notify'>>, Same<SchemaOf<'mqueue'>, DescOf<'mqueue'>>, Same<SchemaOf<'tcp'>, DescOf<'tcp'>>] = [true, true, true, true, true, true, true, true, true, true, true, true, true, true, true, true];
const sameFiles: [Same<z.infer<typeof pipeSchema>, PipeState>, Same<z.infer<typeof filesTableSchema>, FilesTable>, Same<z.infer<typeof filesStateSchema>, FilesState>] = [true, true, true];
void [sameDescs, sameFiles];

/**
 * The descriptors the supervisor was given by its own parent: read once at
 * start-up, before it opens anything of its own that a tracee could share.
 */
export function inheritedFds(): number[] {
  return listFds(process.pid);
}

const kcmpFile = (p1: number, f1: number, p2: number, f2: number) => sys.syscall(SYS_kcmp, p1, p2, KCMP_FILE, f1, f2) === 0;
const unsupported = (pid: number, fd: number, what: string) =>
  new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (${what})`);

/**
 * Capture the descriptors of every process of a frozen tree. `others`: what
 * the processes outside it hold, read before the freeze (a pipe shared with
 * one is refused).
 */
export function captureFiles(procs: number[], outside: number[], statusOf: (pid: number) => Map<string, string>, shm: ShmCapture, others: OutsideHolders, tcp = new TcpCapture()): { table: FilesTable; perProc: Map<number, FilesState> } {
  const table: FilesTable = { descs: [], pipes: [], socks: [] };
  let diag: Map<number, UnixSockInfo> | undefined;
  let netDiag: NetDiag | undefined;
  const pairIds = new Map<number, number>();
  const sockHolders = new Map<number, { pid: number; fd: number }>(); // by inode
  const perProc = new Map<number, FilesState>();
  const seen: { key: string; pid: number; fd: number; desc: number }[] = [];
  const pipeIds = new Map<string, number>();
  const pipeHolders: { ino: string; pid: number; fd: number; end: 'r' | 'w' }[] = [];
  const procSet = new Set(procs);
  const inTree = treeMember(procSet);
  const level = procs.length ? nsLevel(procs[0]) : 0;
  // Who sent each queued message (SCM_CREDENTIALS), as the tree names it (0: not of the tree).
  const msgCreds = (msgs: { cred?: { pid: number; uid: number; gid: number } }[]) =>
    msgs.some((m) => m.cred) ? msgs.map((m) => (m.cred ? { ...m.cred, pid: procSet.has(m.cred.pid) ? (nsPids(m.cred.pid)[level] ?? 0) : 0 } : { pid: 0, uid: 65534, gid: 65534 })) : undefined;
  const msgCredsOf = (msgs: { cred?: { pid: number; uid: number; gid: number } }[]) => {
    const c = msgCreds(msgs);
    return c ? { msgCreds: c } : {};
  };
  const pairMsgCreds = (p: SockPairState, end: 0 | 1, msgs: { cred?: { pid: number; uid: number; gid: number } }[]) => {
    const c = msgCreds(msgs);
    if (c) (p.msgCreds ??= [[], []])[end] = c;
  };
  // A table several processes share is listed once, by its owner.
  const tableOf = sharedTables(procs, others.pids, (p) => Number(readStat(p).field(4)));
  const probes: FdProbe[] = [];
  const ttys = new TtyCapture(level);
  const queues = new Set<number>(); // message queues whose messages are recorded (mqueue.ts)
  let pendingOf: Map<number, number> | undefined; // client of a connection not yet accepted -> its listener (inodes)
  const sockDescs = new Map<number, number>(); // socket inode -> its description
  const sockFix: SockFix[] = []; // references between sockets, by inode until every one is met
  const soloFlying: { desc: number; pid: number; fd: number }[] = []; // datagram sockets on their own with files in flight
  const flyingHolder = new Map<number, number>(); // a supervisor's copy of a file in flight -> the process it is made in
  /** One descriptor of `pid` (the supervisor itself for files in flight) into `fds` and the table. */
  const captureFd = (pid: number, fd: number, fds: FdRef[]): void => {
    const link = `/proc/${pid}/fd/${fd}`;
    let target: string, st: fs.Stats;
    try {
      target = fs.readlinkSync(link);
      st = fs.statSync(link);
    } catch {
      return; // closed meanwhile
    }
    const info = readFdinfo(pid, fd);
    const cloexec = (info.flags & O_CLOEXEC) !== 0;
    const flags = info.flags & ~O_CLOEXEC;
    const key = `${st.dev}:${st.ino}`;
    const twin = seen.find((s) => s.key === key && kcmpFile(s.pid, s.fd, pid, fd));
    if (twin) {
      fds.push({ fd, cloexec, desc: twin.desc });
      if (pid !== process.pid) probes.push({ pid, fd, desc: twin.desc, first: false, text: info.text });
      return;
    }
    const sfd = outside.find((s) => !(pid === process.pid && s === fd) && kcmpFile(process.pid, s, pid, fd)); // (a copy of a file in flight is not itself outside)
    if (sfd !== undefined) {
      fds.push({ fd, cloexec, outside: true, sfd });
      probes.push({ pid, fd, desc: 'outside', first: false, text: info.text });
      return;
    }
    const id = table.descs.length;
    const pipe = /^pipe:\[(\d+)\]$/.exec(target);
    if (pipe) {
      let pid2 = pipeIds.get(pipe[1]);
      if (pid2 === undefined) {
        pid2 = table.pipes.length;
        pipeIds.set(pipe[1], pid2);
        table.pipes.push({ id: pid2, size: 0, data: '' });
      }
      const end = (flags & O_ACCMODE) === O_RDONLY ? 'r' : 'w';
      table.descs.push({ id, kind: 'pipe', pipe: pid2, end, flags });
      pipeHolders.push({ ino: pipe[1], pid, fd, end });
    } else if (/^socket:\[(\d+)\]$/.test(target) && !(diag ??= unixSockets()).has(Number(target.slice(8, -1))) && tcp.has(pid, fd, Number(target.slice(8, -1)))) {
      table.descs.push(tcp.add(pid, fd, Number(target.slice(8, -1)), { id, kind: 'tcp' as const, flags })); // read by tcp.finish()
    } else if (/^socket:\[(\d+)\]$/.test(target) && !diag!.has(Number(target.slice(8, -1)))) {
      // Not a unix socket: netdgram.ts (UDP, ping, raw, packet, netlink) keeps it or says why not.
      const ext = others.sockHolder(Number(target.slice(8, -1)), new Set(procs));
      if (ext !== undefined) throw unsupported(pid, fd, `${target}: a socket also held by process ${ext} outside the subtree`);
      table.descs.push({ id, kind: 'net', flags, net: captureNetSock(pid, fd, Number(target.slice(8, -1)), (netDiag ??= new NetDiag())) });
    } else if (/^socket:\[(\d+)\]$/.test(target)) {
      const ino = Number(/^socket:\[(\d+)\]$/.exec(target)![1]);
      diag ??= unixSockets();
      const info = diag.get(ino);
      if (!info) throw unsupported(pid, fd, `${target}: a socket that is not a unix socket`);
      const name = sockName(pid, fd, info.name, info.fileIno);
      const peer = info.peer ? diag.get(info.peer) : undefined;
      const { opts, cred } = sockSelf(pid, fd, info.type, procSet, level); // (before any peek: its peek offset is one of its options)
      const withCred = cred ? { cred } : {};
      const listenerOf = (pendingOf ??= waitingClients(diag)).get(ino);
      // A pair (its other end may be outside: refused below); a datagram
      // socket connected to its own name is one socket, below.
      if (info.peer && info.peer !== ino && (!peer || peer.peer === ino)) {
        const lo = Math.min(ino, info.peer);
        let pair = pairIds.get(lo);
        if (pair === undefined) {
          pair = table.socks.length;
          pairIds.set(lo, pair);
          table.socks.push({ id: pair, type: info.type, queues: [[], []], names: [{}, {}] });
        }
        const end = ino === lo ? 0 : 1;
        table.socks[pair].names![end] = name;
        if (info.shutdown) (table.socks[pair].shutdown ??= [0, 0])[end] = info.shutdown;
        table.descs.push({ id, kind: 'unix', pair, end, flags });
        if (!sockHolders.has(ino)) {
          sockHolders.set(ino, { pid, fd });
          if (cred) (table.socks[pair].creds ??= [cred, cred])[end] = cred;
        }
      } else if (info.state === 10) {
        refuseInFlight(pid, fd, target, readFdinfo(pid, fd));
        // Connections not yet accepted: their clients connect again, in order, once it listens.
        const waiting = info.rqueue ? waitingOn(pid, fd, target, info, diag) : undefined;
        if (waiting) sockFix.push({ desc: id, waiting });
        table.descs.push({ id, kind: 'usock', type: info.type, flags, backlog: info.wqueue, ...withCred, ...name });
      } else if (listenerOf !== undefined) {
        // The client of a connection not yet accepted: connected again to its listener, after it.
        refuseInFlight(pid, fd, target, readFdinfo(pid, fd));
        sockFix.push({ desc: id, pendingOn: listenerOf });
        const ids = parseCreds(statusOf(pid));
        const connectAs = { pid: nsPids(pid)[level] ?? 0, uid: ids.uid[1] ?? 0, gid: ids.gid[1] ?? 0 };
        table.descs.push({ id, kind: 'usock', type: info.type, flags, ...(info.shutdown ? { shutdown: info.shutdown } : {}), ...withCred, connectAs, ...name });
      } else if (info.hasPeer && !info.peer) {
        // Its peer is gone: a stream reads what it has, then EOF; a datagram one sends into nothing.
        // Files in flight in its messages (not a stream's: where they attach in the bytes
        // is seen only by reading them back through the peer) are read once every descriptor is captured.
        const flies = info.type !== SOCK_STREAM && inFlight(pid, fd);
        if (flies) soloFlying.push({ desc: id, pid, fd });
        else refuseInFlight(pid, fd, target, readFdinfo(pid, fd));
        // (An empty datagram at the head reads as a queue of 0 bytes: only a stream's length is all of it.)
        const got = (info.rqueue || info.type !== SOCK_STREAM) && !flies ? peekQueue(pid, fd) : undefined;
        const queue = got?.map((m) => m.data.toString('base64'));
        table.descs.push({ id, kind: 'usock', type: info.type, flags, peerGone: true, ...withCred, ...msgCredsOf(got ?? []), ...(queue?.length ? { queue } : {}), ...(info.shutdown && info.type === SOCK_DGRAM ? { shutdown: info.shutdown } : {}), ...name });
      } else if (info.state === 7 || info.type === SOCK_DGRAM) {
        // Not connected (bound or not), or a datagram one connected to a
        // named socket (in the tree or not: /dev/log...) that is not
        // connected back; a datagram one keeps what was sent to it, with
        // each sender's name.
        if (peer && peer.name === undefined) throw unsupported(pid, fd, `${target}: a datagram unix socket connected to an unnamed one that is connected elsewhere`);
        // One with files in flight is read once every descriptor is captured (below).
        const flies = info.type === SOCK_DGRAM && inFlight(pid, fd);
        if (flies) soloFlying.push({ desc: id, pid, fd });
        else refuseInFlight(pid, fd, target, readFdinfo(pid, fd));
        const got = info.type === SOCK_DGRAM && !flies ? peekDatagrams(pid, fd, true) : [];
        const queue = got.length ? got.map((m) => m.data.toString('base64')) : undefined;
        const from = got.some((m) => m.from) ? got.map((m) => m.from) : undefined;
        // (The kernel purges a datagram socket's queue when it disconnects: an unnamed one has none on its own.)
        if (queue && name.name === undefined) throw unsupported(pid, fd, `${target}: datagrams queued to an unnamed unix socket on its own`);
        if (from) sockFix.push({ desc: id, from });
        if (info.peer && info.peer !== ino) sockFix.push({ desc: id, peer: info.peer });
        table.descs.push({ id, kind: 'usock', type: info.type, flags, queue, from, ...msgCredsOf(got), connectTo: peer?.name, ...(info.shutdown ? { shutdown: info.shutdown } : {}), ...name });
      } else throw unsupported(pid, fd, `${target}: a connected unix socket ${printable(info.name)} in a state of its own (${info.state})`);
      sockDescs.set(ino, id);
      if (opts.length) (table.descs[id] as Extract<FileDesc, { kind: 'unix' | 'usock' }>).sockOpts = opts;
    } else if (isShm(target)) {
      shm.add(key, target.replace(/ \(deleted\)$/, ''), link);
      table.descs.push({ id, kind: 'memfd', shmKey: key, flags, pos: info.pos.toString() });
    } else if (isMqueue(link, st)) {
      table.descs.push({ id, kind: 'mqueue', flags, mq: captureMqueue(pid, fd, target, st, queues) });
    } else if (st.isFIFO() && target.startsWith('/')) {
      // A FIFO removed while open is still one pipe between its holders: made again under a temporary name.
      const gone = target.endsWith(' (deleted)') && st.nlink === 0;
      table.descs.push({ id, kind: 'fifo', path: gone ? target.slice(0, -10) : target, flags, data: '', ino: st.ino, ...(gone ? { deleted: { mode: st.mode & 0o7777 } } : {}) });
      pipeHolders.push({ ino: String(st.ino), pid, fd, end: (flags & O_ACCMODE) === O_WRONLY ? 'w' : 'r' });
    } else if (st.isFile() && target.startsWith('/') && target.endsWith(' (deleted)')) {
      // Unlinked while open, it cannot be opened again by its path: its
      // contents are kept (as shared memory's are), up to GHOST_MAX.
      if (st.size > GHOST_MAX) throw unsupported(pid, fd, `${target}: a deleted file of ${st.size} bytes (up to ${GHOST_MAX} are kept)`);
      const path = target.replace(/ \(deleted\)$/, '');
      shm.add(`ghost:${key}`, path, link);
      table.descs.push({ id, kind: 'ghost', path, mode: st.mode & 0o7777, shmKey: `ghost:${key}`, flags, pos: info.pos.toString(), uid: st.uid, gid: st.gid });
    } else if (st.isCharacterDevice() && statelessDevice(st) && !isPtyDevice(st) && target.startsWith('/') && target.endsWith(' (deleted)') && st.nlink === 0) {
      // A device node removed while open: made again (mknod) and removed, with its mode and owner.
      // Not a pty slave: its /dev/pts node goes with its pair (a hung-up slave), which tty.ts keeps.
      table.descs.push({ id, kind: 'deldev', path: target.slice(0, -10), mode: st.mode, rdev: st.rdev, uid: st.uid, gid: st.gid, flags, pos: info.pos.toString() });
    } else if (st.isDirectory() && target.startsWith('/') && target.endsWith(' (deleted)') && st.nlink === 0) {
      table.descs.push({ id, kind: 'deldir', path: target.slice(0, -10), mode: st.mode & 0o7777, flags });
    } else if (target === 'anon_inode:[pidfd]') {
      table.descs.push({ id, kind: 'pidfd', flags, ...capturePidfd(pid, fd, info, inTree, level) });
    } else if (isPtyDevice(st) && target.startsWith('/')) {
      table.descs.push(ttys.describe(pid, fd, target, st, info, id, flags));
    } else if ((st.isFile() || st.isDirectory() || (st.isCharacterDevice() && statelessDevice(st))) && target.startsWith('/') && !target.endsWith(' (deleted)') && !target.startsWith('/secretmem')) {
      table.descs.push({ id, kind: 'path', path: target, flags, pos: info.pos.toString() });
    } else {
      const nt = captureNotify(pid, fd, target, info);
      const ev = nt ? undefined : captureEvent(pid, fd, target, info);
      if (nt) table.descs.push({ id, kind: 'notify', flags, nt });
      else if (ev) table.descs.push({ id, kind: 'event', flags, ev });
      else {
        refuseUring(pid, fd, target); // named, with why
        throw unknownKind(pid, fd, target, st);
      }
    }
    seen.push({ key, pid, fd, desc: id });
    fds.push({ fd, cloexec, desc: id });
    // A file held only in flight has no holder to own or lock it again: refused if it has either.
    if (pid === process.pid && (hasOwner(fd) || /^lock:/m.test(info.text))) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `a file in flight in an SCM_RIGHTS message (${target}) has an owner or a lock and no holder in the subtree`);
    if (pid !== process.pid) probes.push({ pid, fd, desc: id, first: true, text: info.text });
  };
  for (const pid of procs) {
    const fds: FdRef[] = [];
    const owner = tableOf.get(pid);
    for (const fd of owner === undefined ? listFds(pid) : []) captureFd(pid, fd, fds);
    perProc.set(pid, {
      fds,
      ...captureCwd(pid),
      umask: parseInt(statusOf(pid).get('Umask') ?? '022', 8),
      ...(owner !== undefined ? { filesOf: nsPids(owner)[level] } : {}),
    });
  }
  const tt = ttys.finish((id, path, flags) => void (table.descs[id] = { id, kind: 'path', path, flags, pos: '0' }), procs,
    (pid) => perProc.get(pid)!.fds.filter((f): f is FdRef & { outside: true; sfd: number } => 'outside' in f),
    (pid, fd, rdev) => others.sharing(pid, fd, new Set(procs)) ?? (rdev === undefined ? undefined : others.holdingDevice(rdev, new Set(procs))));
  Object.assign(table, { ...(tt.ptys ? { ptys: tt.ptys } : {}), ...(tt.terminal ? { terminal: tt.terminal } : {}) });
  for (const [pid, pty] of tt.ctty) perProc.get(pid)!.ctty = pty;
  tcp.finish((ino) => others.sockHolder(ino, new Set(procs)));
  /**
   * The descriptions of files in flight in one message queued on socket `on`
   * (the supervisor's copies `fds`), captured as any descriptor; one held
   * nowhere else is made, at restore, in the process that would receive it.
   */
  const flyingDescs = (on: { pid: number; fd: number }, fds: number[]): number[] => {
    const receiver = on.pid === process.pid ? flyingHolder.get(on.fd)! : (nsPids(on.pid)[level] ?? on.pid);
    return fds.map((mine) => {
      const ref: FdRef[] = [];
      const known = table.descs.length;
      captureFd(process.pid, mine, ref);
      const f = ref[0];
      if (!f || !('desc' in f)) throw unsupported(on.pid, on.fd, `a descriptor in flight in an SCM_RIGHTS message that is one the supervisor was given`);
      if (f.desc >= known) (table.flying ??= []).push({ desc: f.desc, pid: receiver });
      flyingHolder.set(mine, receiver);
      return f.desc;
    });
  };
  // Each pair's queues; files in flight in them are captured too (they may
  // be sockets of pairs with queues of their own: until none is left).
  const flying: number[] = []; // the supervisor's copies, closed at the end
  try {
    const peeked = new Set<number>();
    for (let more = true; more; ) {
      more = false;
      for (const [lo, pair] of pairIds) {
        if (peeked.has(pair)) continue;
        peeked.add(pair);
        const peer = diag!.get(lo)!.peer;
        for (const [end, ino] of [[0, lo], [1, peer]] as const) {
          const h = sockHolders.get(ino);
          if (!h) {
            const other = sockHolders.get(end === 0 ? peer : lo)!;
            throw unsupported(other.pid, other.fd, `unix socket connected to ${holderOf(ino)}, outside the subtree`);
          }
          if (!inFlight(h.pid, h.fd)) {
            const got = peekQueue(h.pid, h.fd);
            table.socks[pair].queues[end] = got.map((m) => m.data.toString('base64'));
            pairMsgCreds(table.socks[pair], end, got);
            continue;
          }
          const other = sockHolders.get(end === 0 ? peer : lo);
          const msgs = peekWithFds(h.pid, h.fd, table.socks[pair].type === SOCK_STREAM ? other : undefined);
          for (const m of msgs) flying.push(...m.fds);
          table.socks[pair].queues[end] = msgs.map((m) => m.data.toString('base64'));
          pairMsgCreds(table.socks[pair], end, msgs);
          // Made, if nothing else holds them, in the process that will receive them.
          msgs.forEach((m, msg) => {
            if (m.fds.length) (table.socks[pair].inflight ??= []).push({ end, msg, descs: flyingDescs(h, m.fds) });
          });
          more = true;
        }
      }
      for (const f of soloFlying.splice(0)) {
        more = true;
        const msgs = peekDatagramsWithFds(f.pid, f.fd);
        for (const m of msgs) flying.push(...m.fds);
        const d = table.descs[f.desc] as Extract<FileDesc, { kind: 'usock' }>;
        if (msgs.length && d.name === undefined && !d.peerGone) throw unsupported(f.pid, f.fd, 'datagrams with files in flight queued to an unnamed unix socket');
        d.queue = msgs.map((m) => m.data.toString('base64'));
        Object.assign(d, msgCredsOf(msgs));
        if (msgs.some((m) => m.from) && !d.peerGone) { // (a socket whose peer is gone gets its queue from a stand-in for it)
          d.from = msgs.map((m) => m.from);
          sockFix.push({ desc: f.desc, from: d.from });
        }
        msgs.forEach((m, msg) => {
          if (m.fds.length) (d.inflight ??= []).push({ msg, descs: flyingDescs(f, m.fds) });
        });
      }
    }
    capturePipeData(table, pipeIds, pipeHolders, others, new Set(procs));
    findMovedWatches(table, seen);
    findWatchedGhosts(table.descs, seen);
    if (sockFix.length) linkSockets(table, sockFix, sockDescs, diag!, (desc) => seen.find((x) => x.desc === desc));
  } finally {
    for (const f of flying) fs.closeSync(f);
  }
  captureOwners(table, probes, procs);
  captureLocks(table, probes, procs, others);
  return { table, perProc };
}

/** Does this unix socket hold files in flight (fdinfo scm_fds)? */
function inFlight(pid: number, fd: number): boolean {
  try {
    return Number(readFdinfo(pid, fd).extra.get('scm_fds') ?? 0) > 0;
  } catch {
    return false;
  }
}

/**
 * The description each epoll watch whose file left its number watches:
 * among the descriptions of the tree with that inode, the one kcmp says it
 * is. None (the file is held only outside the subtree): refused.
 */
function findMovedWatches(table: FilesTable, seen: { key: string; pid: number; fd: number; desc: number }[]): void {
  for (const d of table.descs) {
    if (d.kind !== 'event' || d.ev.kind !== 'epoll' || !d.ev.watches.some((w) => w.moved)) continue;
    const ep = seen.find((s) => s.desc === d.id)!;
    for (const w of d.ev.watches) {
      if (!w.moved) continue;
      const { ino, toff } = w.moved;
      const holder = seen.find((s) => s.key.endsWith(`:${ino}`) && watchesFile(s.pid, s.fd, ep.pid, ep.fd, w.fd, toff));
      if (!holder) throw unsupported(ep.pid, ep.fd, `epoll watching a file that no process of the subtree holds (added as descriptor ${w.fd})`);
      w.desc = holder.desc;
      delete w.moved;
    }
  }
}

/**
 * Unread data of each pipe and FIFO, copied with tee() from a read end (the
 * pipe keeps it); and a refusal if a process outside the subtree holds one.
 */
function capturePipeData(table: FilesTable, pipeIds: Map<string, number>, holders: { ino: string; pid: number; fd: number; end: 'r' | 'w' }[], others: OutsideHolders, inside: Set<number>): void {
  if (!holders.length) return;
  const inodes = new Set(holders.map((h) => h.ino));
  const ext = others.find(inodes, inside);
  if (ext) throw unsupported(holders.find((h) => h.ino === ext.ino)!.pid, holders.find((h) => h.ino === ext.ino)!.fd, `pipe also held by process ${ext.pid} outside the subtree`);
  const done = new Set<string>();
  for (const h of holders) {
    if (done.has(h.ino) || h.end !== 'r') continue;
    done.add(h.ino);
    const { data, size } = peekPipe(h.pid, h.fd);
    const pid = pipeIds.get(h.ino);
    if (pid !== undefined) Object.assign(table.pipes[pid], { data: data.toString('base64'), size });
    else {
      // a FIFO: its data lives with every descriptor of that FIFO's path
      for (const d of table.descs) if (d.kind === 'fifo' && d.ino === Number(h.ino)) d.data = data.toString('base64');
    }
  }
}

function peekPipe(pid: number, fd: number): { data: Buffer; size: number } {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const [r, w] = sys.pipe2(O_CLOEXEC | O_NONBLOCK);
    try {
      const size = sys.fcntl(mine, F_GETPIPE_SZ);
      sys.fcntl(w, F_SETPIPE_SZ, size);
      const n = sys.tee(mine, w, size, SPLICE_F_NONBLOCK);
      const data = Buffer.alloc(Math.max(0, n));
      let got = 0;
      while (got < data.length) got += fs.readSync(r, data, got, data.length - got, null);
      return { data, size };
    } finally {
      for (const f of [r, w]) fs.closeSync(f);
    }
  }, 'pipe fd');
}

/**
 * The pipes and FIFOs held by the supervised processes outside a subtree
 * (the ones that could share its pipes; descriptors passed to unrelated
 * processes over sockets are not looked for). Read before the subtree is
 * frozen: those processes are not frozen anyway, so reading them in the
 * stop would only make it longer. `inside` (known once frozen) is left out
 * of the answer: a child forked meanwhile belongs to the subtree.
 */
export class OutsideHolders {
  private readonly pipes = new Map<string, number[]>();
  /** Descriptors naming a path: a FIFO among them is only looked for when the subtree holds one. */
  private readonly paths: { pid: number; fd: string }[] = [];
  /** Sockets, by inode: a network socket shared with one is refused. */
  private readonly sockets = new Map<number, number[]>();
  constructor(readonly pids: number[]) {
    for (const pid of pids) {
      let fds: string[];
      try {
        fds = fs.readdirSync(`/proc/${pid}/fd`);
      } catch {
        continue; // gone
      }
      for (const fd of fds) {
        let t: string;
        try {
          t = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          continue;
        }
        const m = /^pipe:\[(\d+)\]$/.exec(t);
        const so = /^socket:\[(\d+)\]$/.exec(t);
        if (m) this.pipes.set(m[1], [...(this.pipes.get(m[1]) ?? []), pid]);
        else if (so) this.sockets.set(Number(so[1]), [...(this.sockets.get(Number(so[1])) ?? []), pid]);
        else if (t.startsWith('/')) this.paths.push({ pid, fd });
      }
    }
  }

  /** A process outside `inside` holding the very description fd `fd` of `pid` is (by path), if any. */
  sharing(pid: number, fd: number, inside: Set<number>): number | undefined {
    return this.paths.find((p) => !inside.has(p.pid) && kcmpFile(p.pid, Number(p.fd), pid, fd))?.pid;
  }

  /** A process outside `inside` holding a character device `rdev` (any description of it), if any. */
  holdingDevice(rdev: number, inside: Set<number>): number | undefined {
    for (const { pid, fd } of this.paths) {
      if (inside.has(pid)) continue;
      try {
        const st = fs.statSync(`/proc/${pid}/fd/${fd}`);
        if (st.isCharacterDevice() && st.rdev === rdev) return pid;
      } catch { /* gone */ }
    }
    return undefined;
  }

  /** A process outside `inside` holding socket inode `ino`, if any. */
  sockHolder(ino: number, inside: Set<number>): number | undefined {
    return this.sockets.get(ino)?.find((p) => !inside.has(p));
  }

  /** A process outside `inside` holding one of these pipe or FIFO inodes, if any. */
  find(inodes: Set<string>, inside: Set<number>): { pid: number; ino: string } | null {
    for (const ino of inodes) {
      const pid = this.pipes.get(ino)?.find((p) => !inside.has(p));
      if (pid !== undefined) return { pid, ino };
    }
    for (const { pid, fd } of this.paths) {
      if (inside.has(pid)) continue;
      try {
        const st = fs.statSync(`/proc/${pid}/fd/${fd}`);
        if (st.isFIFO() && inodes.has(String(st.ino))) return { pid, ino: String(st.ino) };
      } catch { /* gone */ }
    }
    return null;
  }
}

// ---------------------------------------------------------------- restore


export interface FilesRestore {
  remote: (pid: number) => Remote;
  table: FilesTable;
  perProc: Map<number, FilesState>;
  order: number[]; // processes, parents first
  /** Live processes rolled back in place: their "outside" descriptors come from the supervisor's own. */
  live?: Set<number>;
  /** Shared memory objects made again (memfds held as descriptors). */
  shm: ShmRestore;
  /** A process of the tree (as recorded) to its host pid (they differ in a pid namespace). */
  host: (pid: number) => number;
  /** Ptys made for session leaders already, or (rollback) found open: tty.ts. */
  ttys?: TtyRestore;
}

/**
 * Recreate every description once and hand it to every holder. Shells start
 * as copies of the caller: first each keeps only the caller's descriptors
 * that stand for "outside" ones.
 */
export function restoreFiles(ctx: FilesRestore): void {
  const { table, perProc, order, remote } = ctx;
  const ttys = ctx.ttys ?? new TtyRestore({ files: table, processes: order.map((pid) => ({ ids: { pid, sid: 0 }, files: perProc.get(pid)! })) });
  ttys.prepare();
  // Temporaries (pipe ends in transit, pidfds) live above every target number.
  const maxFd = Math.max(2, ...[...perProc.values()].flatMap((p) => p.fds.map((f) => f.fd)));
  const tempBase = maxFd + 1;
  let nextTemp = maxFd + 64;
  const temps: Place[] = [];
  /** Pipe ends ("pipe:end") whose made description is handed out already. */
  const endsGiven = new Set<string>();
  const transfer = (from: Place, to: Place & { cloexec: boolean }) => transferFd(remote, tempBase, from, to);
  const placed = new Map<number, Place>(); // desc id -> a place holding it
  const holders = new Map<number, (Place & { cloexec: boolean })[]>();
  for (const pid of order) {
    for (const f of perProc.get(pid)!.fds) {
      if ('desc' in f) {
        if (!holders.has(f.desc)) holders.set(f.desc, []);
        holders.get(f.desc)!.push({ pid, fd: f.fd, cloexec: f.cloexec });
      }
    }
  }
  if (ctx.live) silenceLiveTcp(table.descs, [...ctx.live].map(ctx.host)); // closed below without a packet
  // A file held only in flight is made at a temporary number of its receiver (closed once it is sent).
  for (const f of table.flying ?? []) {
    if (!perProc.has(f.pid) || holders.has(f.desc)) throw new CkptError(errno('EBADMSG'), 'image', `description ${f.desc} in flight: no process ${f.pid}, or held`);
    const at = { pid: f.pid, fd: nextTemp++ };
    holders.set(f.desc, [{ ...at, cloexec: true }]);
    temps.push(at);
  }
  // Per process, one batch first: what must go is closed (in a live process
  // what it still holds as at the checkpoint stays, its offset set back),
  // close-on-exec of the inherited descriptors, cwd, umask (before any
  // socket: one bound to a relative name binds in its cwd, with its umask).
  for (const pid of order) {
    const live = ctx.live?.has(pid) ?? false;
    const kept = live ? keptFiles(ctx.host(pid), perProc.get(pid)!, table, holders) : new Map<number, PathDesc>();
    settle(remote(pid), perProc.get(pid)!, live, kept);
    for (const [fd, d] of kept) placed.set(d.id, { pid, fd });
  }
  const reused = new Set(placed.keys());

  const pipeEnds = new Map<number, { r?: Place; w?: Place }>();
  const sockEnds = new Map<number, [Place, Place]>();
  const filledFifos = new Set<string>();
  const deletedFifos = new Map<number, { pid: number; path: string }>(); // by inode: made under a temporary name
  const ghosts = new Map<string, Place>(); // deleted files made again, by shmKey: one inode each
  const queues: MadeQueues = new Map(); // message queues made again, by their checkpoint inode
  const park = (pid: number, fd: bigint): Place => {
    const t = nextTemp++;
    moveFd(remote(pid), fd, t, true);
    temps.push({ pid, fd: t });
    return { pid, fd: t };
  };
  const relocate = (from: Place, pid: number, fd?: number): Place => {
    const to = fd ?? nextTemp++;
    if (fd === undefined) temps.push({ pid, fd: to });
    const r = remote(pid);
    moveFd(r, r.takeFd(from.pid, from.fd, tempBase), to, true);
    remote(from.pid).call(SYS.close, from.fd); // (a parked number is closed again at the end: nothing there by then)
    return { pid, fd: to };
  };
  const sockets = new UnixSockets({ remote, host: ctx.host, park, listeners: new Map(), inTree: (pid) => perProc.has(pid), relocate });
  const tcp = new TcpRestore({ remote, host: ctx.host, park, live: !!ctx.live, descs: table.descs });
  const epolls: { pid: number; fd: number; ev: Extract<EventState, { kind: 'epoll' }> }[] = [];
  const notifies: { pid: number; fd: number; nt: NotifyState }[] = [];
  // The first holder of each end of each socket pair: where that end is made.
  const pairHolder = (pair: number, end: 0 | 1) => {
    const d = table.descs.find((x) => x.kind === 'unix' && x.pair === pair && x.end === end);
    const h = d && holders.get(d.id)?.[0];
    if (!h) throw new CkptError(errno('EBADMSG'), 'image', `socket pair #${pair} has no holder of its end ${end}`);
    return h.pid;
  };

  // Sockets on their own first (those connected to others after them):
  // listeners are what connected pairs are remade through.
  // TCP listeners before connections on their port. A socket's dependents (those connected to it, the senders of its
  // datagrams) are made right after it, before its name,
  // if it was gone, goes again: another may be bound to it next.
  const rank = (x: FileDesc) => (x.kind === 'tcp' ? (x.backlog !== undefined ? 0 : 2) : x.kind !== 'usock' ? 2 : x.connectTo !== undefined || x.peerDesc !== undefined || x.pendingOn !== undefined ? 1 : 0);
  const sockets2 = sockDependents(table);
  const done = new Set<number>();
  const lateOrphans: Orphan[] = [];
  const lateSolos: { at: Place; d: Extract<FileDesc, { kind: 'usock' }>; target?: ReturnType<typeof sockets2.nameOf> }[] = [];
  const makeOne = (d: FileDesc): void => {
    if (done.has(d.id)) return;
    done.add(d.id);
    const hs = holders.get(d.id);
    if (!hs?.length) return;
    const owner = hs[0];
    const r = remote(owner.pid);
    if (!placed.has(d.id)) {
      if (d.kind === 'path') {
        const tmp = openIn(r, d.path, reopenFlags(d.flags) | O_NOCTTY, 'restart:files');
        const pos = BigInt(d.pos);
        moveFd(r, tmp, owner.fd, owner.cloexec, (b) => {
          if (pos) b.add('restart:files lseek', SYS.lseek, owner.fd, pos, SEEK_SET);
          if (d.flags & O_ASYNC) b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
        });
      } else if (d.kind === 'unix') {
        let ends = sockEnds.get(d.pair);
        if (!ends) {
          ends = sockets.makePair(table.socks[d.pair], [pairHolder(d.pair, 0), pairHolder(d.pair, 1)]);
          sockEnds.set(d.pair, ends);
        }
        transfer(ends[d.end], owner);
        r.check('restart:files', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
      } else if (d.kind === 'tcp') {
        transfer(tcp.make(owner.pid, d, owner), owner);
        r.check('restart:files', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
      } else if (d.kind === 'usock') {
        const at = d.peerGone ? sockets.makeOrphan(owner.pid, d, lateOrphans) : sockets.makeSolo(owner.pid, d);
        if (!d.peerGone) {
          for (const dep of sockets2.dependents(d)) makeOne(table.descs[dep]);
          const to = d.peerDesc ?? d.pendingOn;
          if (to !== undefined) makeOne(table.descs[to]); // bound before this one connects to it
          const target = to === undefined ? undefined : sockets2.nameOf(to);
          if (d.inflight?.length) lateSolos.push({ at, d, target }); // its datagrams carry files: once every description exists
          else sockets.finishSolo(at, d, target);
        }
        transfer(at, owner);
        r.check('restart:files', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
      } else if (d.kind === 'net') {
        moveFd(r, makeNetSock(r, ctx.host(owner.pid), d.net, `task ${owner.pid} fd ${owner.fd}`), owner.fd, owner.cloexec, (b) => b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK));
      } else if (d.kind === 'event') {
        moveFd(r, makeEvent(r, ctx.host(owner.pid), d.ev), owner.fd, owner.cloexec, (b) => b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK));
        if (d.ev.kind === 'epoll') epolls.push({ pid: owner.pid, fd: owner.fd, ev: d.ev });
      } else if (d.kind === 'notify') {
        moveFd(r, makeNotify(r, d.nt), owner.fd, owner.cloexec, (b) => b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK));
        notifies.push({ pid: owner.pid, fd: owner.fd, nt: d.nt });
      } else if (d.kind === 'memfd') {
        const pos = BigInt(d.pos);
        // Opened again through its own /proc entry: a description of its
        // own, with its own access mode and offset (the supervisor's, which
        // fdIn hands out, is shared by every process it is handed to).
        const shared = ctx.shm.fdIn(r, d.shmKey, tempBase);
        const own = openIn(r, `/proc/self/fd/${shared}`, reopenFlags(d.flags) | O_CLOEXEC, 'restart:files');
        r.call(SYS.close, shared);
        moveFd(r, own, owner.fd, owner.cloexec, (b) => {
          b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
          if (pos) b.add('restart:files lseek', SYS.lseek, owner.fd, pos, SEEK_SET);
        });
      } else if (d.kind === 'mqueue') {
        moveFd(r, openMqueue(r, ctx.host(owner.pid), d.mq, d.flags, ctx.live !== undefined, queues), owner.fd, owner.cloexec);
      } else if (d.kind === 'pidfd') {
        moveFd(r, makePidfd(r, d, d.flags), owner.fd, owner.cloexec);
      } else if (d.kind === 'tty') {
        moveFd(r, ttys.open(r, d, tempBase), owner.fd, owner.cloexec, (b) => b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK));
      } else if (d.kind === 'deldev') {
        const pos = BigInt(d.pos);
        moveFd(r, makeDeletedDevice(r, d, reopenFlags(d.flags) | O_NOCTTY), owner.fd, owner.cloexec, (b) => {
          if (pos) b.add('restart:files lseek', SYS.lseek, owner.fd, pos, SEEK_SET);
        });
      } else if (d.kind === 'deldir') {
        moveFd(r, makeDeletedDir(r, d, { open: d.flags }), owner.fd, owner.cloexec);
      } else if (d.kind === 'ghost') {
        const pos = BigInt(d.pos);
        moveFd(r, openGhost(r, owner.pid, ctx, d, tempBase, ghosts, park), owner.fd, owner.cloexec, (b) => {
          b.add('restart:files F_SETFL', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
          if (pos) b.add('restart:files lseek', SYS.lseek, owner.fd, pos, SEEK_SET);
        });
      } else if (d.kind === 'fifo') {
        const path = d.deleted ? deletedFifo(r, owner.pid, d, deletedFifos) : d.path;
        // O_RDWR first: opening one end alone would block until the other opens.
        const keep = r.raise(openIn(r, path, O_RDWR | O_NONBLOCK, 'restart:files'), tempBase); // never on a target number
        const tmp = openIn(r, path, reopenFlags(d.flags) | O_NONBLOCK, 'restart:files');
        r.check('restart:files', SYS.fcntl, tmp, F_SETFL, d.flags & SETFL_MASK);
        // The unread bytes belong to the FIFO, not to a descriptor: once.
        const fifoKey = d.ino !== undefined ? `ino:${d.ino}` : d.path;
        if (!filledFifos.has(fifoKey)) writeInto(ctx.host(owner.pid), Number(keep), Buffer.from(d.data, 'base64'));
        filledFifos.add(fifoKey);
        moveFd(r, tmp, owner.fd, owner.cloexec);
        r.call(SYS.close, keep);
      } else {
        if (d.kind !== 'pipe' || !table.pipes[d.pipe]) throw new CkptError(errno('EBADMSG'), 'image', `descriptor ${d.id}: unknown kind ${(d as { kind: unknown }).kind} or pipe`);
        const pipe = table.pipes[d.pipe];
        let ends = pipeEnds.get(d.pipe);
        if (!ends) {
          // Create the pipe here; the other end waits at a temporary number.
          const scratch = r.scratch();
          r.check('restart:files', SYS_pipe2, scratch, O_CLOEXEC);
          const fds = r.mem.read(scratch, 8);
          const [pr, pw] = [fds.readInt32LE(0), fds.readInt32LE(4)];
          if (pipe.size) r.call(SYS.fcntl, pw, F_SETPIPE_SZ, pipe.size);
          writeInto(ctx.host(owner.pid), pw, Buffer.from(pipe.data, 'base64'));
          const tr = nextTemp++, tw = nextTemp++;
          moveFd(r, BigInt(pr), tr, true);
          moveFd(r, BigInt(pw), tw, true);
          temps.push({ pid: owner.pid, fd: tr }, { pid: owner.pid, fd: tw });
          ends = { r: { pid: owner.pid, fd: tr }, w: { pid: owner.pid, fd: tw } };
          pipeEnds.set(d.pipe, ends);
        }
        const end = ends[d.end]!;
        const key = `${d.pipe}:${d.end}`;
        if (!endsGiven.has(key)) transfer(end, owner);
        else {
          // Another description of the same end (opened through /proc/self/fd): its own flags, so its own file.
          const re = remote(end.pid);
          const again = openIn(re, `/proc/self/fd/${end.fd}`, (d.end === 'r' ? O_RDONLY : O_WRONLY) | O_NONBLOCK | O_CLOEXEC, 'restart:files');
          const at = { pid: end.pid, fd: nextTemp++ };
          moveFd(re, again, at.fd, true);
          temps.push(at);
          transfer(at, owner);
        }
        endsGiven.add(key);
        r.check('restart:files', SYS.fcntl, owner.fd, F_SETFL, d.flags & SETFL_MASK);
      }
      placed.set(d.id, owner);
    }
    for (const h of hs.slice(1)) transfer(owner, h);
  };
  // A name whose file a socket gone (or replaced) left is bound before the one holding the file now.
  const gone = (x: FileDesc) => (x.kind === 'usock' && x.fileThere === false ? 0 : 1);
  // The clients of connections not yet accepted connect last, in order: a
  // pair made through the same listener is accepted before them.
  const waits = (x: FileDesc) => x.kind === 'usock' && x.pendingOn !== undefined;
  for (const d of [...table.descs].sort((x, y) => rank(x) - rank(y) || gone(x) - gone(y))) if (!waits(d)) makeOne(d);
  for (const l of table.descs) if (l.kind === 'usock') for (const c of l.waiting ?? []) makeOne(table.descs[c]);
  // Every description exists: the queues with files in flight can be sent.
  const take = (desc: number) => {
    const at = placed.get(desc);
    const mine = at ? sys.takeFd(ctx.host(at.pid), at.fd) : -1;
    if (mine < 0) throw new CkptError(errno('EBADMSG'), 'restart:files', `description ${desc}, in flight, was not made`);
    return mine;
  };
  for (const [pair, ends] of sockEnds) if (table.socks[pair].inflight?.length) sockets.finishPair(table.socks[pair], ends, take);
  for (const l of lateSolos) sockets.finishSolo(l.at, l.d, l.target, take);
  for (const o of lateOrphans) sockets.finishOrphan(o, take);
  sockets.finish(); // every socket is made: names gone at the checkpoint go again
  // Their options last: with SO_PASSCRED set, a queue refilled through an unnamed socket would have bound it a name.
  for (const d of table.descs) {
    if ((d.kind !== 'unix' && d.kind !== 'usock') || !d.sockOpts?.length) continue;
    const owner = holders.get(d.id)?.[0];
    if (!owner) continue;
    for (const o of d.sockOpts) if (!knownOpt(1, d.kind === 'usock' ? d.type : table.socks[d.pair].type, 0, o)) throw new CkptError(errno('EBADMSG'), 'image', `description ${d.id}: socket option ${o.level}/${o.name} is not one a checkpoint keeps`);
    const b = new CallBatch(remote(owner.pid));
    addSockOpts(b, owner.fd, d.sockOpts, `restart:files task ${owner.pid} fd ${owner.fd}`);
    b.run();
  }
  tcp.finish(); // every TCP socket made: out of repair mode together
  for (const f of deletedFifos.values()) unlinkIn(remote(f.pid), f.path);
  ttys.finish(remote, ctx.host, (pty, side) => table.descs.filter((x) => x.kind === 'tty' && x.pty === pty && x.side === side).flatMap((x) => holders.get(x.id) ?? []));
  unlinkTemporaryQueues(queues);
  // Every descriptor is in place: what each epoll watched can be named again.
  for (const e of epolls) {
    const r = remote(e.pid);
    addWatches(r, e.fd, e.ev);
    const table = new Map(perProc.get(e.pid)!.fds.map((f) => [f.fd, f]));
    for (const w of e.ev.watches) {
      if (w.desc === undefined) continue;
      // The file from wherever it is: this process's own descriptor of it, else a copy taken from its holder.
      const own = holders.get(w.desc)?.find((h) => h.pid === e.pid);
      const at = placed.get(w.desc);
      if (!own && !at) throw new CkptError(errno('EBADMSG'), 'image', `an epoll watch of fd ${w.fd} names description ${w.desc}, held by no process`);
      const src = own ? BigInt(own.fd) : r.takeFd(at!.pid, at!.fd, tempBase);
      addMovedWatch(r, e.fd, w, src, table.get(w.fd), nextTemp++);
      if (!own && src !== BigInt(w.fd)) r.call(SYS.close, src);
    }
  }
  // Watches and marks: a watch on a deleted file is added through a copy of a descriptor of it.
  const fileIn = (pid: number, desc: number): bigint => {
    const own = holders.get(desc)?.find((h) => h.pid === pid), at = placed.get(desc);
    if (own) return remote(pid).check('restart:files', SYS.fcntl, own.fd, F_DUPFD_CLOEXEC, tempBase);
    if (!at) throw new CkptError(errno('EBADMSG'), 'image', `an inotify watch names description ${desc}, held by no process`);
    return remote(pid).takeFd(at.pid, at.fd, tempBase);
  };
  for (const n of notifies) addMarks(remote(n.pid), n.fd, n.nt, (desc) => fileIn(n.pid, desc), (f) => void remote(n.pid).call(SYS.close, f));

  // Temporaries last: a file held only in flight is watched from its temporary place.
  for (const pid of new Set(temps.map((t) => t.pid))) remote(pid).batch(temps.filter((t) => t.pid === pid).map((t) => [SYS.close, t.fd]));
  // Locks once every holder has its descriptors; owners after them (a lease makes its taker the owner).
  restoreLocks({ ...ctx, reused });
  restoreOwners(table, perProc, order, remote, ctx.host, reused);
  // Memfds' modes and seals last: no description could be opened or written after them.
  ctx.shm.seal();
}

type PathDesc = Extract<FileDesc, { kind: 'path' }>;

function isCharDevice(pid: number, fd: number): boolean {
  try {
    return fs.statSync(`/proc/${pid}/fd/${fd}`).isCharacterDevice();
  } catch {
    return false;
  }
}

/** A process's cwd; one that was removed is made again (empty, as it must have been). */
function readlinkOr(path: string): string | undefined {
  try {
    return fs.readlinkSync(path);
  } catch {
    return undefined;
  }
}

function captureCwd(pid: number): { cwd: string; cwdDeleted?: { mode: number } } {
  const cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
  if (!cwd.endsWith(' (deleted)')) return { cwd };
  const st = fs.statSync(`/proc/${pid}/cwd`);
  return st.nlink === 0 ? { cwd: cwd.slice(0, -10), cwdDeleted: { mode: st.mode & 0o7777 } } : { cwd };
}

/** Deleted files larger than this are refused (their contents go into the image). */
const GHOST_MAX = 64 << 20;
const O_TMPFILE = 0o20200000, O_SYNC = 0o4010000; // O_SYNC includes O_DSYNC
const F_DUPFD_CLOEXEC = 1030, SYS_fchown = 93, SYS_mknodat = 259, SYS_chmod = 90, SYS_unlink = 87, AT_FDCWD = -100, S_IFIFO = 0o10000;

/**
 * A deleted file opened as it was: every description of one deleted file
 * (in one process or several) opens the same inode again, made once.
 */
function openGhost(r: Remote, pid: number, ctx: FilesRestore, d: Extract<FileDesc, { kind: 'ghost' }>, tempBase: number, ghosts: Map<string, Place>, park: (pid: number, fd: bigint) => Place): bigint {
  let at = ghosts.get(d.shmKey);
  if (!at) {
    const fd = makeGhost(r, ctx, d, tempBase);
    // Read-write, the new file itself is the description (with O_TMPFILE's flags if it was one); a copy stays for the others.
    if ((d.flags & O_ACCMODE) === O_RDWR && ((d.flags & O_TMPFILE) === O_TMPFILE || !(d.flags & O_SYNC))) {
      ghosts.set(d.shmKey, park(pid, r.check('restart:files', SYS.fcntl, fd, F_DUPFD_CLOEXEC, tempBase)));
      return fd;
    }
    ghosts.set(d.shmKey, (at = park(pid, fd)));
  }
  const local = at.pid === pid ? BigInt(at.fd) : r.takeFd(at.pid, at.fd, tempBase);
  // Through its /proc entry: a description of its own, with its own access mode.
  const again = openIn(r, `/proc/self/fd/${local}`, (reopenFlags(d.flags) & ~O_TMPFILE) | O_CLOEXEC, 'restart:files');
  if (at.pid !== pid) r.call(SYS.close, local);
  return again;
}

/**
 * A deleted file made again: an unnamed file (O_TMPFILE) in the directory
 * it was in (else in /tmp), with its mode, owner and contents (holes kept).
 * Made by the process itself, with its own permissions: an owner it could
 * not give the file itself is EPERM.
 */
function makeGhost(r: Remote, ctx: FilesRestore, d: Extract<FileDesc, { kind: 'ghost' }>, tempBase: number): bigint {
  let fd: bigint | undefined;
  let why: unknown;
  // Opened with O_TMPFILE: that very description again, with the flags only
  // open() sets (O_SYNC, O_DSYNC; the rest by F_SETFL once it is filled).
  const tmpfile = (d.flags & O_TMPFILE) === O_TMPFILE;
  const flags = tmpfile ? O_TMPFILE | (d.flags & (O_ACCMODE | O_SYNC)) : O_TMPFILE | O_RDWR;
  for (const dir of [d.path.slice(0, d.path.lastIndexOf('/')) || '/', '/tmp']) {
    try {
      fd = r.raise(openIn(r, dir, flags | O_CLOEXEC, 'restart:files', d.mode), tempBase);
      break;
    } catch (e) {
      why ??= e;
    }
  }
  if (fd === undefined) throw why;
  ctx.shm.copyTo(d.shmKey, r.task.tgid, fd);
  if (d.uid !== undefined && d.gid !== undefined) {
    const res = r.call(SYS_fchown, fd, d.uid, d.gid); // a no-op when the process made it so already
    if (res < 0n) throw new CkptError(errno('EPERM'), 'restart:files', `task ${r.task.tid}: the deleted file ${d.path} was owned by ${d.uid}:${d.gid}, which this process cannot give it (errno ${-res})`);
  }
  return fd;
}

/** A temporary name for a deleted FIFO, made (once per FIFO) next to where it was, else in /tmp. */
function deletedFifo(r: Remote, pid: number, d: Extract<FileDesc, { kind: 'fifo' }>, made: Map<number, { pid: number; path: string }>): string {
  const key = d.ino ?? -1;
  const had = made.get(key);
  if (had) return had.path;
  const parent = d.path.slice(0, d.path.lastIndexOf('/')) || '/';
  let last = 0n;
  for (const dir of [parent, '/tmp']) {
    const path = `${dir === '/' ? '' : dir}/.ckpt-fifo-${r.task.tid}-${Math.random().toString(36).slice(2, 10)}`;
    const b = new CallBatch(r);
    const p = b.put(Buffer.from(path + '\0'));
    b.add(undefined, SYS_mknodat, AT_FDCWD, p, S_IFIFO | 0o600, 0);
    b.add(undefined, SYS_chmod, p, d.deleted!.mode);
    [last] = b.run();
    if (last >= 0n) {
      made.set(key, { pid, path });
      return path;
    }
  }
  throw new CkptError(Number(-last), 'restart:files', `task ${r.task.tid}: cannot make the deleted FIFO ${d.path} again`);
}

function unlinkIn(r: Remote, path: string): void {
  const b = new CallBatch(r);
  b.add(`restart:files unlink ${path}`, SYS_unlink, b.put(Buffer.from(path + '\0')));
  b.run();
}

/**
 * The files a live process rolled back still holds as it held them at the
 * checkpoint: the same number, path, access mode and status flags, and an
 * open file description no other descriptor shared then. Keeping them, with
 * their offset set back, is the same to the program as opening them again,
 * and saves closing, reopening and moving each.
 */
/**
 * Before a rollback changes anything: what it would open again by path must
 * still be there, the files and FIFOs the checkpoint's descriptors held by
 * path and the processes' working directories. Whatever is gone since (a
 * program removed its file after the checkpoint: SQLite deletes its journal
 * when a transaction ends) would make the rollback fail half-way, with the
 * subtree killed; refused here with ENOENT instead, the subtree left as it
 * is. Only what is gone is refused: a descriptor still open on its file
 * stays as it is (keptFiles), and one whose file is there is opened again.
 */
export function checkPathsThere(table: FilesTable, processes: { ids: { pid: number }; files: FilesState }[], host: (pid: number) => number, crid: number): void {
  const gone = (what: string, p: string) => new CkptError(errno('ENOENT'), 'restart:files', `checkpoint ${crid}: ${what}: ${p} is gone since the checkpoint (removed or renamed), and a rollback would have to open it again`);
  for (const p of processes) {
    for (const f of p.files.fds) {
      if (!('desc' in f)) continue;
      const d = table.descs[f.desc];
      if ((d?.kind === 'path' || (d?.kind === 'fifo' && !d.deleted)) && pathGone(d.path)) throw gone(`task ${host(p.ids.pid)} fd ${f.fd}`, d.path);
    }
    if (!p.files.cwdDeleted && pathGone(p.files.cwd)) throw gone(`task ${host(p.ids.pid)} cwd`, p.files.cwd);
  }
}

function keptFiles(host: number, st: FilesState, table: FilesTable, holders: Map<number, unknown[]>): Map<number, PathDesc> {
  const kept = new Map<number, PathDesc>();
  const MASK = O_ACCMODE | SETFL_MASK;
  for (const f of st.fds) {
    if (!('desc' in f)) continue;
    const d = table.descs[f.desc];
    if (d?.kind !== 'path' || holders.get(d.id)?.length !== 1) continue;
    try {
      if (fs.readlinkSync(`/proc/${host}/fd/${f.fd}`) !== d.path) continue;
      if ((readFdinfo(host, f.fd).flags & MASK) !== (d.flags & MASK)) continue;
    } catch {
      continue; // not open there
    }
    kept.set(f.fd, d);
  }
  return kept;
}

/**
 * Close every descriptor but the "outside" ones and `kept`: a fresh shell
 * keeps the caller's; a live process keeps its own if they still are the
 * supervisor's files, else gets them again from the supervisor. In the same
 * batch: the kept files' offsets and flags, close-on-exec, cwd, umask.
 */
function settle(r: Remote, st: FilesState, live: boolean, kept: Map<number, PathDesc>): void {
  const pid = r.task.tid;
  const outside = st.fds.filter((f): f is FdRef & { outside: true; sfd: number } => 'outside' in f);
  const keep = new Set(outside.filter((f) => !live || kcmpFile(process.pid, f.sfd, pid, f.fd)).map((f) => f.fd));
  const b = new CallBatch(r);
  // A table shared with the owner (listed by it) is the owner's to settle: nothing of it is closed here.
  if (st.filesOf === undefined) for (const fd of listFds(pid)) if (!keep.has(fd) && !kept.has(fd)) b.add(undefined, SYS.close, fd);
  for (const f of outside) if (keep.has(f.fd) && fs.existsSync(`/proc/${pid}/fd/${f.fd}`)) b.add(`restart:files fd ${f.fd}`, SYS.fcntl, f.fd, F_SETFD, f.cloexec ? 1 : 0);
  for (const f of st.fds) {
    const d = kept.get(f.fd);
    if (!d) continue;
    // A device has no offset to set back (a terminal: ESPIPE).
    if (!isCharDevice(pid, f.fd)) b.add(`restart:files fd ${f.fd} lseek`, SYS.lseek, f.fd, BigInt(d.pos), SEEK_SET);
    b.add(`restart:files fd ${f.fd}`, SYS.fcntl, f.fd, F_SETFL, d.flags & SETFL_MASK);
    b.add(`restart:files fd ${f.fd}`, SYS.fcntl, f.fd, F_SETFD, f.cloexec ? 1 : 0);
  }
  // A live process still in its cwd is left there: it may no longer be allowed to enter it (it dropped root since).
  const stays = live && !st.cwdDeleted && readlinkOr(`/proc/${pid}/cwd`) === st.cwd;
  if (!st.cwdDeleted && !stays) b.add(`restart:files chdir ${st.cwd}`, SYS.chdir, b.put(Buffer.from(inTaskRoot(pid, st.cwd) + '\0'))); // a chrooted live process: from inside its root
  b.add(undefined, SYS.umask, st.umask);
  b.run();
  if (st.cwdDeleted) makeDeletedDir(r, { path: st.cwd, mode: st.cwdDeleted.mode }, 'cwd');
  if (live) {
    for (const f of outside) if (!keep.has(f.fd)) transferFd(() => r, Math.max(...st.fds.map((x) => x.fd)) + 1, { pid: process.pid, fd: f.sfd }, { pid, fd: f.fd, cloexec: f.cloexec });
    return;
  }
  for (const fd of keep) {
    // Stray inherited descriptors are common (a shell's, a test runner's);
    // a missing one is left closed rather than failing the whole restart.
    if (!fs.existsSync(`/proc/${pid}/fd/${fd}`)) logError(`task ${pid}: restart: fd ${fd} referred to something outside the tree and the caller has no fd ${fd}: left closed`);
  }
}

/** Put descriptor `from` at number `to` (with close-on-exec as asked) in one process. */
function moveFd(r: Remote, from: bigint, to: number, cloexec: boolean, then?: (b: CallBatch) => void): void {
  const b = new CallBatch(r); // with what follows on `to`, one resume
  if (from !== BigInt(to)) {
    b.add('restart:files dup3', SYS.dup3, from, to, cloexec ? O_CLOEXEC : 0);
    b.add(undefined, SYS.close, from);
  } else b.add('restart:files', SYS.fcntl, to, F_SETFD, cloexec ? 1 : 0);
  then?.(b);
  b.run();
}

/** Give `to` the open file that `from` holds: a dup in one process, pidfd_getfd across two. */
function transferFd(remote: (pid: number) => Remote, tempBase: number, from: Place, to: Place & { cloexec: boolean }): void {
  const r = remote(to.pid);
  if (from.pid === to.pid) {
    if (from.fd !== to.fd) r.check('restart:files', SYS.dup3, from.fd, to.fd, to.cloexec ? O_CLOEXEC : 0);
    return;
  }
  moveFd(r, r.takeFd(from.pid, from.fd, tempBase), to.fd, to.cloexec);
}

/** Write bytes into a tracee's pipe through a duplicate of its descriptor. */
function writeInto(pid: number, fd: number, data: Buffer): void {
  if (!data.length) return;
  withTraceeFd(pid, fd, 'restart:files', (mine) => {
    for (let off = 0; off < data.length; ) off += fs.writeSync(mine, data, off, data.length - off);
  });
}
