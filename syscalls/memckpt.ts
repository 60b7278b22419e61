/**
 * In-memory checkpoints: the supervisor's store, and the husks that hold
 * their memory.
 *
 * A husk is a copy-on-write snapshot of one process: a clone (exit signal 0,
 * so the program's wait() never sees it) injected into the frozen process.
 * Costs one fork (page-table copy); then it is disarmed (no descriptors, its
 * own process group, never resumed on its own) and kept stopped. Its
 * memory is read with pread on /proc/HUSK/mem, which keeps the pages
 * shared; at a rollback the husk itself also writes changed pages back
 * into the process (putBackFromHusk), through a small gadget mapped in it
 * outside the checkpoint's layout. Everything else about the checkpoint
 * (registers, files, signals...) is captured during the stop like for a
 * direct checkpoint.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { sys, SYS } from '../lib/libc.js';
import { readStat } from '../lib/proc.js';
import { log } from '../lib/log.js';
import { Remote } from '../supervisor/remote.js';
import { withTraceeFd } from '../supervisor/callerfd.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { Freeze } from '../supervisor/freeze.js';
import { viewPid } from '../supervisor/pidns.js';
import type { TreeState } from './state.js';
import type { ShmData } from './resources/shm.js';
import type { SyscallCtx } from './context.js';
import { readStatus } from '../lib/proc.js';
import { parseCreds } from './resources/process.js';
import type { MemoryCapture, HeldRun } from './resources/memory.js';
import { DirtyTracker, frameDiff, withPagemap, type HuskPageCache } from './resources/dirty.js';
import { normalize, union, type Runs } from '../lib/runs.js';

const SIGKILL = 9, WALL = 0x40000000;

export interface MemCheckpoint {
  crid: number;
  created: string;
  /** How long the subtree was stopped, in ms. */
  stopMs: number;
  tree: TreeState;
  /** process pid -> its husk's pid */
  husks: Map<number, number>;
  /** process pid -> what to copy from its husk (filled after the thaw) */
  memory: Map<number, MemoryCapture>;
  /** Bytes copied into the supervisor (state, and memory fork cannot share). */
  privateBytes: number;
  writtenBack: boolean;
  /** The uid that took it: the ABI's rule for who may use it. */
  uid: number;
  /** A handle's pipe inode, when the checkpoint is held by a handle. */
  handleIno?: number;
  handleFd?: number; // the supervisor's read end of that pipe
  /** Contents of shared memory objects, copied during the stop (fork cannot keep them). */
  shmData: ShmData;
  /** A pid of the tree (as recorded) to the host pid it had when taken. */
  hostOf: (pid: number) => number;
  /** Pages a husk cannot hold (MADV_DONTFORK), copied during the stop, by process. */
  held: Map<number, HeldRun[]>;
  /**
   * Host pid -> pages of the live process that may differ from its husk
   * beyond what its dirty tracker reports as written since the last
   * protect. Absent: the process is not tracked (rollback compares frames).
   */
  dirty: Map<number, Runs>;
  /** What the husks' page tables say, read once. */
  huskPages: HuskPageCache;
  /** By husk pid: where its port (a gadget) is, for putting pages back into the live process (see putBackFromHusk). */
  huskPorts: Map<number, bigint>;
  /** Calls in flight reading its husks (an image being written). */
  holds?: number;
  /** Released while held: destroyed when the last hold ends. */
  released?: boolean;
}

/** The supervisor's in-memory checkpoints. */
export class CheckpointStore {
  readonly all = new Map<number, MemCheckpoint>();
  /** Dirty-page trackers of live processes, by host pid: one per mm, shared by its checkpoints. */
  private readonly trackers = new Map<number, DirtyTracker>();
  constructor(private readonly tracer: Tracer, readonly max: number) {}

  /** The tracker of process `pid`, if it has one that still describes it. */
  tracker(pid: number): DirtyTracker | undefined {
    const t = this.trackers.get(pid);
    if (t && !t.valid(this.tracer.execGen(pid))) this.dropTracker(pid, 'the process is not the one tracked any more');
    return this.trackers.get(pid);
  }

  private dropTracker(pid: number, why: string): void {
    const t = this.trackers.get(pid);
    if (!t) return;
    log.syscall('dirty %d: tracking ends: %s', pid, why);
    this.trackers.delete(pid);
    t.close();
    for (const c of this.all.values()) c.dirty.delete(pid);
  }

  /**
   * Pages written since the last protect are now dirty for every checkpoint
   * of `pid` but `except` (which gets `own`), and are protected again.
   */
  private reprotect(pid: number, t: DirtyTracker, except: MemCheckpoint, own: (written: Runs) => Runs, register = true): void {
    try {
      if (register) t.register(); // mappings made since (by the program, or by a rollback)
      const written = t.protect();
      for (const o of this.all.values()) if (o !== except && o.dirty.has(pid)) o.dirty.set(pid, union(o.dirty.get(pid)!, written));
      except.dirty.set(pid, own(written));
    } catch (e) {
      this.dropTracker(pid, (e as Error).message);
    }
  }

  /**
   * Dirty tracking for the processes of new checkpoint `c` (after the
   * thaw; the program runs meanwhile). `uffds` are the userfaultfds made
   * during the stop for processes that had no tracker. For `c` itself a
   * page written since the last protect is dirty only if its frame is no
   * longer the husk's: what was written before the husk was made is not.
   */
  track(c: MemCheckpoint, uffds: Map<number, number>): void {
    for (const p of c.tree.processes) {
      const pid = c.hostOf(p.ids.pid);
      let t = this.tracker(pid);
      const fd = uffds.get(p.ids.pid);
      if (fd !== undefined && !t) {
        try {
          this.trackers.set(pid, (t = new DirtyTracker(pid, fd, readStat(pid).field(22), this.tracer.execGen(pid))));
        } catch {
          fs.closeSync(fd); // it exited already
        }
      } else if (fd !== undefined) fs.closeSync(fd);
      if (!t) continue;
      const husk = c.husks.get(p.ids.pid)!;
      this.reprotect(pid, t, c, (written) => refine(written, pid, husk, c.huskPages));
    }
  }

  /**
   * After a rollback of `c`: its tracked processes equal their husks again.
   * Only those in `remapped` have mappings to register first.
   */
  rolledBack(c: MemCheckpoint, remapped: Set<number>): void {
    for (const pid of c.dirty.keys()) {
      const t = this.tracker(pid);
      if (t) this.reprotect(pid, t, c, () => [], remapped.has(pid));
    }
  }

  add(c: MemCheckpoint): void {
    this.all.set(c.crid, c);
  }

  get(crid: number): MemCheckpoint {
    this.reapHandles();
    const c = this.all.get(crid);
    if (!c) throw new CkptError(errno('ENOENT'), 'checkpoint', `no in-memory checkpoint ${crid}`);
    return c;
  }

  /** The checkpoint a handle fd of `pid` stands for. */
  byHandle(pid: number, fd: number): MemCheckpoint {
    this.reapHandles();
    const ino = withTraceeFd(pid, fd, 'checkpoint', (mine) => fs.fstatSync(mine).ino, 'handle fd');
    for (const c of this.all.values()) if (c.handleIno === ino) return c;
    throw new CkptError(errno('ENOENT'), 'checkpoint', `task ${pid}: fd ${fd} is not a checkpoint handle (or its checkpoint was released)`);
  }

  /** Release checkpoints whose every handle copy was closed. */
  reapHandles(): void {
    for (const c of this.all.values()) {
      if (c.handleFd === undefined) continue;
      const rev = sys.pollOne(c.handleFd, 1, 0);
      if (rev & (0x10 | 0x8)) { // POLLHUP | POLLERR: no writer left
        log.syscall('checkpoint %d: its last handle was closed', c.crid);
        this.release(c);
      }
    }
  }

  /** A call in flight reads `c`'s husks: a release meanwhile waits for it. */
  hold(c: MemCheckpoint): void {
    c.holds = (c.holds ?? 0) + 1;
  }

  unhold(c: MemCheckpoint): void {
    if (--c.holds! === 0 && c.released) this.release(c);
  }

  /** Drop a checkpoint: its husks are killed and reaped, its handle closed. */
  release(c: MemCheckpoint): void {
    this.all.delete(c.crid);
    if (c.holds) {
      c.released = true; // gone for every caller now; its husks go when the call in flight is done
      return;
    }
    if (c.handleFd !== undefined) fs.closeSync(c.handleFd);
    destroyHusks(this.tracer, c.husks, c.hostOf);
    for (const pid of c.dirty.keys()) {
      if (![...this.all.values()].some((o) => o.dirty.has(pid))) this.dropTracker(pid, 'no checkpoint of it left');
    }
  }
}

/**
 * The pages of `written` that really differ from the husk: long runs are
 * checked frame by frame (a first protect reports every present page),
 * short ones are kept as they are (cheaper to copy than to check).
 */
function refine(written: Runs, pid: number, husk: number, cache: HuskPageCache): Runs {
  const short = written.filter(([s, e]) => e - s < 64 * 4096);
  const long = written.filter(([s, e]) => e - s >= 64 * 4096);
  if (!long.length) return written;
  return withPagemap(pid, (live) => normalize([...short, ...long.flatMap(([s, e]) => {
    const { copy, drop } = frameDiff(live, husk, s, e, true, cache);
    return [...copy, ...drop];
  })]));
}

/**
 * The call that makes a husk, injected into a frozen process's leader:
 * clone(flags = 0), exit signal 0, no sharing: a plain copy-on-write copy.
 * The orchestrator starts it in every process at once, beside other
 * injected work, so that the round trips and page-table copies overlap.
 */
export const HUSK_CLONE: [number, ...number[]] = [SYS.clone, 0, 0, 0, 0, 0];

/**
 * After HUSK_CLONE ran in each leader of `rs` (results `res`): take each
 * husk made. Returns their pids in order; if any clone failed, the husks
 * made are gone again and it throws.
 */
export function adoptHusks(tracer: Tracer, rs: Remote[], res: bigint[]): number[] {
  const husks: number[] = [], parents: number[] = [];
  try {
    rs.forEach((r, i) => {
      // The clone's own result is its pid inside the process's namespace; the ptrace event has the host's.
      const child = r.newChildren.at(-1) ?? (res[i] > 0n ? Number(res[i]) : 0);
      if (!child) return;
      parents.push(r.task.tgid);
      husks.push(child);
      adoptHusk(tracer, r.task, child);
    });
    const bad = res.findIndex((x) => x <= 0n);
    if (bad >= 0) throw new CkptError(Number(-res[bad]) || errno('ENOMEM'), 'checkpoint:husk', `task ${rs[bad].task.tid}: clone failed`);
  } catch (e) {
    husks.forEach((h, i) => destroyHusk(tracer, parents[i], h));
    throw e;
  }
  return husks;
}

/** A husk just cloned: ours to keep stopped (its first stop is awaited here). */
function adoptHusk(tracer: Tracer, parent: Task, husk: number): number {
  const t = tracer.add(husk, husk);
  t.husk = true;
  for (;;) {
    const ev = tracer.wait(husk);
    if (!ev || ev.kind !== 'stopped') throw new CkptError(errno('ENOMEM'), 'checkpoint:husk', `husk ${husk} of ${parent.tgid} died at birth`);
    if (ev.event !== 0 || ev.signal === 5 || ev.signal === 19) break;
  }
  return husk;
}

/**
 * After the thaw: read through the husk what it shares with the process at
 * checkpoint time (`read`), then disarm it: no descriptors (it must not keep
 * the program's pipes open), its own process group (signals to the
 * program's group must not reach it). It never runs again.
 */
export function finishHusk(tracer: Tracer, husk: number, read: (r: Remote) => void): void {
  const h = new Remote(tracer, tracer.tasks.get(husk)!);
  try {
    read(h);
    h.call(SYS.close_range, 0, 0xffffffff, 0);
    h.call(SYS_setpgid, 0, 0);
  } finally {
    h.finish(); // unmaps the scratch page: it must not show in the husk's memory
  }
}

const SYS_setpgid = 109;

/** Every husk of `husks` (process pid -> husk), each parent named through `hostOf`. */
export function destroyHusks(tracer: Tracer, husks: Map<number, number>, hostOf = (pid: number) => pid): void {
  for (const [pid, husk] of husks) destroyHusk(tracer, hostOf(pid), husk);
}

/** Kill a husk and reap it: in its parent (if alive) or ourselves (we are the subreaper). */
export function destroyHusk(tracer: Tracer, parent: number, husk: number): void {
  sys.kill(husk, SIGKILL);
  for (;;) {
    const ev = tracer.wait(husk);
    if (!ev || ev.kind !== 'stopped') break;
  }
  reapChild(tracer, parent, husk);
}

/**
 * Reap the zombie of `child`, a traced process whose death we have seen:
 * we do it if it is ours (orphans come to us, the subreaper), else its
 * parent `parent`, if it is a tracee, is made to (wait4 injected while it
 * is briefly frozen). A parent outside our reach reaps it itself.
 */
export function reapChild(tracer: Tracer, parent: number, child: number): void {
  let ppid = 0;
  try {
    const st = readStat(child);
    if (st.field(3) !== 'Z') return;
    ppid = Number(st.field(4));
  } catch {
    return; // already reaped
  }
  if (ppid === process.pid) {
    tracer.wait(child, true); // ours: orphans are reparented to us
    return;
  }
  if (ppid !== parent || !tracer.tasks.has(parent)) return; // a namespace's init, or a parent out of reach, reaps it
  const freeze = new Freeze(tracer);
  try {
    // Inside the try: a parent in the middle of a vfork cannot be frozen
    // (EOPNOTSUPP), and the child the freeze stopped meanwhile must be let
    // go again, or the parent waits for it for good. The zombie is then
    // left to the parent (a wait of its own with __WALL, or its exit).
    freeze.add([parent]);
    const r = new Remote(tracer, tracer.tasks.get(parent)!);
    try {
      r.call(SYS.wait4, viewPid(parent, child) || child, 0, WALL, 0); // as the parent sees it (a container's namespace)
    } finally {
      r.finish();
    }
  } catch (e) {
    log.syscall('reaping %d in %d: %s', child, parent, (e as Error).message);
  } finally {
    freeze.thaw();
  }
}

/** Bytes of page data a husk holds (what the checkpoint references). */
export function referencedBytes(c: MemCheckpoint): number {
  let n = 0;
  for (const m of c.memory.values()) for (const r of m.runs) n += r.len;
  return n;
}

/**
 * The checkpoint a call names (a crid, or a handle fd of the caller), if the
 * caller may use it (ABI: it could ptrace every task it was taken from) and
 * its husks are still there.
 */
export function usableCheckpoint(ctx: SyscallCtx, crid: number, handle: boolean): MemCheckpoint {
  const store = ctx.sv.store;
  const c = handle ? store.byHandle(ctx.caller.tgid, crid) : store.get(crid);
  const cs = readStatus(ctx.caller.tgid);
  const privileged = (BigInt('0x' + (cs.get('CapEff') ?? '0')) & (1n << 19n)) !== 0n;
  if (!privileged && parseCreds(cs).uid[0] !== c.uid) {
    throw new CkptError(errno('EPERM'), 'checkpoint', `task ${ctx.caller.tid}: checkpoint ${c.crid} was taken by uid ${c.uid}`);
  }
  for (const [pid, husk] of c.husks) {
    if (!ctx.tracer.tasks.has(husk)) {
      store.release(c);
      throw new CkptError(errno('ENOENT'), 'checkpoint', `checkpoint ${c.crid}: the snapshot of process ${pid} (husk ${husk}) was killed; the checkpoint is gone`);
    }
  }
  return c;
}
