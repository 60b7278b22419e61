/** The state of a subtree as the image carries it (the TREE record). */
import type { ProcessIds, Creds, MmState } from './resources/process.js';
import type { VmaState } from './resources/memory.js';
import type { FilesState, FilesTable } from './resources/files.js';
import type { SignalState } from './resources/signals.js';
import type { ThreadState } from './resources/thread.js';
import type { ShmObject } from './resources/shm.js';
import { procAttrsSchema, type ProcAttrs } from './resources/attrs.js';
import { timersSchema, type TimersState } from './resources/timers.js';
import { aioSchema, type AioRing } from './resources/aio.js';
import { CkptError, errno } from '../lib/errors.js';
import { z, int, pid, pid0, siginfo, PID_MAX, MANY, type Same } from '../lib/schema.js';
import { idsSchema, credsSchema, mmSchema } from './resources/process.js';
import { vmaSchema } from './resources/memory.js';
import { filesStateSchema, filesTableSchema } from './resources/files.js';
import { signalStateSchema } from './resources/signals.js';
import { threadSchema } from './resources/thread.js';
import { shmObjectSchema } from './resources/shm.js';
import { inheritIssue } from './resources/cowshare.js';
import { sharedTableIssues } from './resources/fdkinds.js';
import { sysvIpcSchema, semUndoSchema, type SysvIpcState, type SemUndo } from './resources/sysvipc.js';

export interface ProcessState {
  ids: ProcessIds;
  creds: Creds;
  mm: MmState;
  memory: VmaState[];
  files: FilesState;
  signals: SignalState;
  /** Signals pending for the whole process (siginfo, base64). */
  sharedPending?: string[];
  /** Stopped by job control at the checkpoint: the stop signal (it comes back stopped). */
  stopSignal?: number;
  threads: ThreadState[];
  /** rlimits, oom_score_adj, personality, prctl flags, securebits, membarrier, root, cgroups (attrs.ts). */
  attrs?: ProcAttrs;
  /** Interval and POSIX timers (see timers.ts); absent: none. */
  timers?: TimersState;
  /** AIO contexts (io_setup rings), see aio.ts; absent: none. */
  aio?: AioRing[];
  /** SysV semaphore undo adjustments (SEM_UNDO; sysvipc.ts); absent: none. */
  semUndo?: SemUndo[];
}

/** A child that exited and was not reaped: it comes back as a zombie with the same status. */
export interface ZombieState {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  /** As waitpid reports it. */
  status: number;
}

export interface TreeState {
  root: number;
  /** Parents before children. */
  processes: ProcessState[];
  zombies: ZombieState[];
  files: FilesTable;
  /** Shared memory objects (their contents travel separately: SHM records or the checkpoint). */
  shm: ShmObject[];
  /** SysV segments, semaphore sets and message queues of the subtree (sysvipc.ts); absent: none. */
  sysvipc?: SysvIpcState;
  /** The root is the init of a pid namespace; ids are as seen inside it. */
  pidns?: boolean;
  /** Ids are as seen in the root's pid namespace (below the supervisor's); a restart reads them in the caller's. */
  nsView?: boolean;
}

const bad = (why: string) => new CkptError(errno('EBADMSG'), 'image', `TREE record: ${why}`);

/** Threads of one process: far more than any real program, few enough to walk. */
const MAX_THREADS = 1 << 16;
/** vm.max_map_count's ceiling is far above its default of 65530; this is still a bound. */
const MAX_VMAS = 1 << 18;

const processSchema = z.strictObject({
  ids: idsSchema,
  creds: credsSchema,
  mm: mmSchema,
  memory: z.array(vmaSchema).max(MAX_VMAS),
  files: filesStateSchema,
  signals: signalStateSchema,
  sharedPending: z.array(siginfo).max(MANY).optional(),
  stopSignal: int(1, 64).optional(),
  threads: z.array(threadSchema).min(1).max(MAX_THREADS),
  attrs: procAttrsSchema.optional(),
  timers: timersSchema.optional(),
  aio: aioSchema.optional(),
  semUndo: semUndoSchema.optional(),
});
const zombieSchema = z.strictObject({ pid, ppid: pid, pgid: pid0, sid: pid0, status: int(0, 0xffff) });

type Ctx = z.RefinementCtx;
const issue = (ctx: Ctx, path: (string | number)[], message: string) => ctx.addIssue({ code: 'custom', path, message });

/** What the shape alone cannot say: uniqueness, order, and every reference pointing at something there. */
function crossCheck(t: z.infer<typeof treeShape>, ctx: Ctx): void {
  if (t.processes.length && t.processes[0].ids.pid !== t.root) issue(ctx, ['root'], `the root ${t.root} is not the first process`);
  const shmKeys = new Set<string>();
  t.shm.forEach((o, i) => {
    if (shmKeys.has(o.key)) issue(ctx, ['shm', i, 'key'], `shared object ${o.key} twice`);
    shmKeys.add(o.key);
  });
  const { descs, pipes, socks } = t.files;
  descs.forEach((d, i) => {
    const at = ['files', 'descs', i];
    if (d.id !== i) issue(ctx, [...at, 'id'], `description ${i} says it is ${d.id}`);
    if (d.kind === 'pipe' && d.pipe >= pipes.length) issue(ctx, [...at, 'pipe'], `pipe end of no pipe (${d.pipe})`);
    if (d.kind === 'unix' && d.pair >= socks.length) issue(ctx, [...at, 'pair'], `socket end of no pair (${d.pair})`);
    if (d.kind === 'usock') {
      const sock = (x: number) => x !== i && (descs[x]?.kind === 'usock' || descs[x]?.kind === 'unix');
      if (d.peerDesc !== undefined && !sock(d.peerDesc)) issue(ctx, [...at, 'peerDesc'], `connected to no socket (${d.peerDesc})`);
      const l = d.pendingOn === undefined ? undefined : descs[d.pendingOn];
      if (l && (l.kind !== 'usock' || !l.waiting?.includes(i))) issue(ctx, [...at, 'pendingOn'], `waiting on a listener that does not list it (${d.pendingOn})`);
      if (d.pendingOn !== undefined && !l) issue(ctx, [...at, 'pendingOn'], `waiting on no listener (${d.pendingOn})`);
      if (d.waiting?.some((x) => !sock(x))) issue(ctx, [...at, 'waiting'], 'a connection waiting from no socket');
      if (d.from && d.from.length !== (d.queue?.length ?? 0)) issue(ctx, [...at, 'from'], 'senders and datagrams do not match');
      d.inflight?.forEach((x, j) => {
        if (x.msg >= (d.queue?.length ?? 0)) issue(ctx, [...at, 'inflight', j, 'msg'], `files in flight on datagram ${x.msg} of a queue of ${d.queue?.length ?? 0}`);
        if (x.descs.some((e) => e >= descs.length)) issue(ctx, [...at, 'inflight', j, 'descs'], 'a file in flight of no description');
      });
    }
    if ((d.kind === 'memfd' || d.kind === 'ghost') && !shmKeys.has(d.shmKey)) issue(ctx, [...at, 'shmKey'], `contents of no shared object (${d.shmKey})`);
    if (d.kind === 'event' && d.ev.kind === 'epoll') d.ev.watches.forEach((w, j) => void (w.desc !== undefined && (w.desc >= descs.length || w.desc === i) && issue(ctx, [...at, 'ev', 'watches', j, 'desc'], `a watch of no description (${w.desc})`)));
  });
  pipes.forEach((p, i) => {
    if (p.id !== i) issue(ctx, ['files', 'pipes', i, 'id'], `pipe ${i} says it is ${p.id}`);
    if (Buffer.byteLength(p.data, 'base64') > p.size) issue(ctx, ['files', 'pipes', i, 'data'], `more data than the pipe holds (${p.size})`);
  });
  socks.forEach((p, i) => void (p.id !== i && issue(ctx, ['files', 'socks', i, 'id'], `socket pair ${i} says it is ${p.id}`)));
  socks.forEach((p, i) => p.inflight?.forEach((x, j) => {
    if (x.msg >= p.queues[x.end].length) issue(ctx, ['files', 'socks', i, 'inflight', j, 'msg'], `files in flight on message ${x.msg} of a queue of ${p.queues[x.end].length}`);
    if (x.descs.some((d) => d >= descs.length)) issue(ctx, ['files', 'socks', i, 'inflight', j, 'descs'], 'a file in flight of no description');
  }));
  t.files.flying?.forEach((f, i) => {
    if (f.desc >= descs.length) issue(ctx, ['files', 'flying', i, 'desc'], `a description in flight of no description (${f.desc})`);
    if (!t.processes.some((p) => p.ids.pid === f.pid)) issue(ctx, ['files', 'flying', i, 'pid'], `a description in flight made in no process (${f.pid})`);
  });
  const pids = new Set<number>(), tids = new Set<number>();
  const byPid = new Map<number, ProcessState>();
  t.processes.forEach((p, i) => {
    if (!byPid.has(p.ids.pid)) byPid.set(p.ids.pid, p as ProcessState);
    const at = ['processes', i];
    const me = p.ids.pid;
    if (pids.has(me)) issue(ctx, [...at, 'ids', 'pid'], `process ${me} twice`);
    if (i > 0 && !pids.has(p.ids.ppid)) issue(ctx, [...at, 'ids', 'ppid'], `process ${me} comes before its parent ${p.ids.ppid}`);
    pids.add(me);
    p.threads.forEach((th, j) => {
      if (tids.has(th.tid)) issue(ctx, [...at, 'threads', j, 'tid'], `thread ${th.tid} twice`);
      tids.add(th.tid);
    });
    if (!p.threads.some((th) => th.tid === me)) issue(ctx, [...at, 'threads'], `process ${me} has no leader thread`);
    const fds = new Set<number>();
    p.files.fds.forEach((f, j) => {
      if (fds.has(f.fd)) issue(ctx, [...at, 'files', 'fds', j, 'fd'], `fd ${f.fd} of ${me} twice`);
      fds.add(f.fd);
      if ('desc' in f && f.desc >= descs.length) issue(ctx, [...at, 'files', 'fds', j, 'desc'], `fd ${f.fd} of ${me} names no description (${f.desc})`);
    });
    let end = 0n;
    p.memory.forEach((v, j) => {
      if (BigInt(v.start) < end) issue(ctx, [...at, 'memory', j, 'start'], `mapping at ${v.start} overlaps or precedes the one before it`);
      end = BigInt(v.end);
      if (v.kind === 'sysv' && !(t.sysvipc?.shm.some((s) => s.id === v.sysvId) && shmKeys.has(`sysv:${v.sysvId}`))) issue(ctx, [...at, 'memory', j, 'sysvId'], `mapping of no SysV segment (${v.sysvId})`);
      if (v.kind === 'shm' && !shmKeys.has(v.shmKey!)) issue(ctx, [...at, 'memory', j, 'shmKey'], `mapping of no shared object (${v.shmKey})`);
      const bad = inheritIssue(v, byPid.get(p.ids.ppid));
      if (bad) issue(ctx, [...at, 'memory', j, 'inherit'], bad);
    });
  });
  for (const s of sharedTableIssues(t.processes)) issue(ctx, ['processes', s.at, 'files', 'filesOf'], s.message);
  t.zombies.forEach((z, i) => {
    if (pids.has(z.pid) || tids.has(z.pid)) issue(ctx, ['zombies', i, 'pid'], `zombie ${z.pid} is also a live task or another zombie`);
    if (!pids.has(z.ppid)) issue(ctx, ['zombies', i, 'ppid'], `zombie ${z.pid} has no parent in the tree (${z.ppid})`);
    pids.add(z.pid);
  });
}

const treeShape = z.strictObject({
  root: pid,
  processes: z.array(processSchema).min(1).max(PID_MAX),
  zombies: z.array(zombieSchema).max(PID_MAX),
  files: filesTableSchema,
  shm: z.array(shmObjectSchema).max(MANY),
  sysvipc: sysvIpcSchema.optional(),
  pidns: z.boolean().optional(),
  nsView: z.boolean().optional(),
});
export const treeSchema = treeShape.superRefine(crossCheck);
const sameTree: [Same<z.infer<typeof processSchema>, ProcessState>, Same<z.infer<typeof zombieSchema>, ZombieState>, Same<z.infer<typeof treeShape>, TreeState>] = [true, true, true];
void sameTree;

const memoryRecord = z.strictObject({ pid });
/** The payload of a MEMORY record: whose pages follow. */
export function parseMemoryRecord(v: unknown): { pid: number } {
  const r = memoryRecord.safeParse(v);
  if (!r.success) throw new CkptError(errno('EBADMSG'), 'image', `MEMORY record: ${where(r.error.issues[0].path)}: ${r.error.issues[0].message}`);
  return r.data;
}

/** "processes[0].memory[3].start" */
function where(path: PropertyKey[]): string {
  return path.map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i ? '.' : ''}${String(k)}`)).join('') || '(the record)';
}

/**
 * Shape, bounds and consistency of a TREE record from an image: the checksum
 * says it is what was written, not that the writer was sane. The first
 * problem, named by its field, is EBADMSG.
 */
export function validateTree(t: unknown): TreeState {
  const r = treeSchema.safeParse(t);
  if (r.success) return r.data as TreeState;
  const first = r.error.issues[0];
  const more = r.error.issues.length > 1 ? ` (and ${r.error.issues.length - 1} more)` : '';
  throw bad(`${where(first.path)}: ${first.message}${more}`);
}
