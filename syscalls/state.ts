/** The state of a subtree as the image carries it (the TREE record). */
import type { ProcessIds, Creds, MmState } from './resources/process.js';
import type { VmaState } from './resources/memory.js';
import type { FilesState, FilesTable } from './resources/files.js';
import type { SignalState } from './resources/signals.js';
import type { ThreadState } from './resources/thread.js';
import type { ShmObject } from './resources/shm.js';
import type { ProcAttrs } from './resources/attrs.js';
import type { TimersState } from './resources/timers.js';
import { CkptError, errno } from '../lib/errors.js';

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
  /** The root is the init of a pid namespace; ids are as seen inside it. */
  pidns?: boolean;
  /** Ids are as seen in the root's pid namespace (below the supervisor's); a restart reads them in the caller's. */
  nsView?: boolean;
}

const bad = (why: string) => new CkptError(errno('EBADMSG'), 'image', `TREE record: ${why}`);
const isPid = (v: unknown) => Number.isInteger(v) && (v as number) > 0 && (v as number) < 1 << 22;

/** Shape and consistency check: the checksum says it is what was written, not that the writer was sane. */
export function validateTree(t: TreeState): TreeState {
  if (!t || typeof t !== 'object' || !Array.isArray(t.shm) || !Array.isArray(t.processes) || !Array.isArray(t.zombies) || !t.files || !Array.isArray(t.files.descs) || !Array.isArray(t.files.pipes) || !Array.isArray(t.files.socks)) throw bad('missing fields');
  if (!t.processes.length || t.processes[0]?.ids?.pid !== t.root) throw bad('the root is not the first process');
  const seen = new Set<number>();
  for (const p of t.processes) {
    const ok = p && p.ids && isPid(p.ids.pid) && Array.isArray(p.memory) && Array.isArray(p.threads) && p.threads.length >= 1 &&
      p.threads.every((th) => isPid(th.tid) && typeof th.regs === 'string') && p.files && Array.isArray(p.files.fds) &&
      p.mm && typeof p.mm.exe === 'string' && p.creds && Array.isArray(p.creds.uid) && p.signals && typeof p.signals === 'object';
    if (!ok) throw bad('a process lacks required fields');
    if (p.ids.pid !== t.root && !seen.has(p.ids.ppid)) throw bad(`process ${p.ids.pid} comes before its parent ${p.ids.ppid}`);
    if (!p.threads.some((th) => th.tid === p.ids.pid)) throw bad(`process ${p.ids.pid} has no leader thread`);
    for (const f of p.files.fds) if ('desc' in f && !(f.desc >= 0 && f.desc < t.files.descs.length)) throw bad(`fd ${f.fd} of ${p.ids.pid} names no description`);
    seen.add(p.ids.pid);
  }
  for (const z of t.zombies) {
    if (!isPid(z.pid) || !seen.has(z.ppid)) throw bad(`zombie ${z.pid} has no parent in the tree`);
  }
  const KINDS = new Set(['path', 'fifo', 'pipe', 'memfd', 'ghost', 'unix', 'usock', 'event', 'pidfd', 'deldir']);
  const EVENTS = new Set(['eventfd', 'signalfd', 'timerfd', 'epoll']);
  for (const [i, d] of t.files.descs.entries()) {
    if (!d || d.id !== i || !KINDS.has(d.kind) || typeof d.flags !== 'number') throw bad(`description ${i}: no such kind or flags`);
    if (d.kind === 'pipe' && !(d.pipe >= 0 && d.pipe < t.files.pipes.length)) throw bad('pipe end of no pipe');
    if (d.kind === 'unix' && !(d.pair >= 0 && d.pair < t.files.socks.length && (d.end === 0 || d.end === 1))) throw bad('socket end of no pair');
    if (d.kind === 'usock' && (typeof d.type !== 'number' || (d.name !== undefined && typeof d.name !== 'string'))) throw bad(`unix socket ${i}: type or name`);
    if (d.kind === 'pidfd' && !(Number.isInteger(d.pid) && d.pid > 0)) throw bad(`pidfd ${i}: pid`);
    if (d.kind === 'deldir' && (typeof d.path !== 'string' || typeof d.mode !== 'number')) throw bad(`deleted directory ${i}: path or mode`);
    if (d.kind === 'event' && (!d.ev || !EVENTS.has(d.ev.kind) || (d.ev.kind === 'epoll' && !Array.isArray(d.ev.watches)))) throw bad(`event file ${i}: no such kind`);
    if (d.kind === 'event' && d.ev.kind === 'epoll' && !d.ev.watches.every((w) => w.desc === undefined || (Number.isInteger(w.desc) && w.desc >= 0 && w.desc < t.files.descs.length && w.desc !== i))) throw bad(`epoll ${i}: a watch of no description`);
  }
  return t;
}
