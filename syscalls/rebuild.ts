/**
 * Rebuilding processes from a captured TreeState: the steps a restart and a
 * rollback share. A Shell is one process being rebuilt: either a fresh one
 * made for a restart (a copy of its parent-to-be) or a live process being
 * rolled back in place. The orchestrators (restart.ts, rollback.ts) decide
 * the order; the steps are here.
 */
import { CkptError, errno } from '../lib/errors.js';
import { SYS, sys } from '../lib/libc.js';
import { readStat, readMaps } from '../lib/proc.js';
import { RemoteMem } from '../lib/mem.js';
import { Remote, CallBatch } from '../supervisor/remote.js';
import { cloneWithTid, THREAD_FLAGS } from '../supervisor/shells.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import type { ProcessState, TreeState, ZombieState } from './state.js';
import type { MemoryCapture } from './resources/memory.js';
import { fillPages, useGadget, installGadget, pickGadget, GADGET_SIZE, GADGET_IOV, GADGET_IOVS, GADGET_CALLS } from './resources/memory.js';
import { viewPid } from '../supervisor/pidns.js';
import { dropRseq, restoreThreadSyscalls, restoreThreadRegs, requeuePending, drainPending } from './resources/thread.js';
import { setSigmask } from '../lib/ptrace.js';
import { restoreSignals } from './resources/signals.js';
import { restoreMm, restoreName } from './resources/process.js';
import { restoreAttrs } from './resources/attrs.js';
import { restoreSeccomp } from './resources/seccomp.js';
import { restoreTimers } from './resources/timers.js';
import { tableFlags } from './resources/fdkinds.js';
import { restoreAio } from './resources/aio.js';

const SYS_process_vm_readv = 310, SYS_process_vm_writev = 311, SYS_setsid = 112, SYS_setpgid = 109, SYS_exit_group = 231, SIGCHLD = 17, SIGSTOP = 19, CLONE_NEWPID = 0x20000000;

export interface Shell {
  state: ProcessState;
  task: Task;
  remote: Remote;
  gadget?: bigint;
  /** Thread tasks by tid (the leader included) once they exist. */
  threads: Map<number, Task>;
  /** A live process rolled back in place (not a fresh shell). */
  live: boolean;
  /** Threads (by tid) whose rseq registration already is the checkpoint's: left as it is. */
  rseqKept: Set<number>;
  /** Its session's set-up (setsid, controlling terminal) is done: makeShells may visit it again. */
  sessionDone?: boolean;
}

export function openShell(tracer: Tracer, state: ProcessState, task: Task, live: boolean): Shell {
  const remote = new Remote(tracer, task);
  const sh: Shell = { state, task, remote, threads: new Map([[state.ids.pid, task]]), live, rseqKept: new Set() };
  // A fresh shell drops the caller's rseq area; a live process keeps its own if it is the checkpoint's.
  if (dropRseq(remote, live ? state.threads.find((t) => t.tid === state.ids.pid)?.rseq : undefined)) sh.rseqKept.add(state.ids.pid);
  return sh;
}

export function allIds(tree: TreeState): number[] {
  return [...tree.processes.flatMap((p) => p.threads.map((t) => t.tid)), ...tree.zombies.map((z) => z.pid)];
}

/**
 * Fresh shells for the processes of `tree` that `shells` lacks, each a child
 * of its parent's shell (the root's parent is `rootParent`): sessions set as
 * each is born, so children inherit them. Returns the pids made, in order.
 * A process `ready` says no to (it must be a fork of its parent once the
 * parent's memory is in place: cowshare.ts) is left for a later call, and
 * so are its descendants.
 */
export function makeShells(tracer: Tracer, tree: TreeState, shells: Map<number, Shell>, rootParent: Remote | undefined, made: number[], opts: { ready?: (p: ProcessState) => boolean; onSession?: (r: Remote, pid: number, live: boolean) => void } = {}): void {
  if (!shells.has(tree.root)) {
    if (!rootParent) throw new CkptError(errno('ESRCH'), 'restart', `no parent for the root ${tree.root}`);
    // A container's init starts a new pid namespace, as its pid 1: all its pids are free there.
    const t = cloneWithTid(tracer, rootParent, tree.root, tree.pidns ? CLONE_NEWPID : 0, rootParent.scratch());
    made.push(t.tid);
    shells.set(tree.root, openShell(tracer, tree.processes[0], t, false));
  }
  for (const p of tree.processes) {
    const sh = shells.get(p.ids.pid);
    if (!sh) continue; // its parent is not made yet
    const host = sh.task.tid;
    if (!sh.live && p.ids.sid === p.ids.pid && Number(readStat(host).field(6)) !== host) sh.remote.check('restart:session', SYS_setsid);
    if (p.ids.sid === p.ids.pid && !sh.sessionDone) opts.onSession?.(sh.remote, p.ids.pid, sh.live); // its controlling terminal, before its children are made (they inherit it)
    sh.sessionDone = true; // makeShells runs again for late children (cowshare.ts): once is enough
    for (const c of tree.processes.filter((c) => c.ids.ppid === p.ids.pid && !shells.has(c.ids.pid) && (opts.ready?.(c) ?? true))) {
      const t = cloneWithTid(tracer, sh.remote, c.ids.pid, tableFlags(c.files), sh.remote.scratch()); // CLONE_FILES: its parent's table, shared as it was
      made.push(t.tid);
      shells.set(c.ids.pid, openShell(tracer, c, t, false));
    }
  }
}

/** Zombies the tree needs and that do not exist: children of their parents, then dead. */
export function makeZombies(tracer: Tracer, tree: TreeState, shells: Map<number, Shell>, made: number[], exists: (pid: number) => boolean): { z: ZombieState; task: Task }[] {
  const out: { z: ZombieState; task: Task }[] = [];
  for (const z of tree.zombies) {
    if (exists(z.pid)) continue;
    const parent = shells.get(z.ppid)!;
    const task = cloneWithTid(tracer, parent.remote, z.pid, 0, parent.remote.scratch());
    out.push({ z, task });
    made.push(task.tid);
  }
  return out;
}

/** Process groups of the tree (leaders first); groups outside it stay as inherited. */
export function setGroups(tracer: Tracer, tree: TreeState, shells: Map<number, Shell>, zombies: { z: ZombieState; task: Task }[]): void {
  const ids = new Set(allIds(tree));
  const groups = [
    ...tree.processes.map((p) => ({ pid: p.ids.pid, pgid: p.ids.pgid, r: shells.get(p.ids.pid)!.remote as Remote | undefined, task: shells.get(p.ids.pid)!.task })),
    ...zombies.map(({ z, task }) => ({ pid: z.pid, pgid: z.pgid, r: undefined as Remote | undefined, task })),
  ];
  const hostOf = (pid: number) => groups.find((g) => g.pid === pid)?.task.tid ?? pid;
  groups.sort((a, b) => Number(b.pid === b.pgid) - Number(a.pid === a.pgid));
  for (const g of groups) {
    // A session leader already leads its group (and may not call setpgid).
    if (!ids.has(g.pgid) || Number(readStat(g.task.tid).field(5)) === hostOf(g.pgid)) continue;
    const r = g.r ?? new Remote(tracer, g.task);
    try {
      r.check('restart:pgid', SYS_setpgid, 0, g.pgid);
    } finally {
      if (!g.r) r.finish();
    }
  }
}

/**
 * Let a zombie shell die as the checkpointed child did. Its parent saw that
 * SIGCHLD before the checkpoint: finishProcess drops it, with every other
 * SIGCHLD the rebuild caused.
 */
export function makeZombie(tracer: Tracer, task: Task, z: ZombieState): void {
  const r = new Remote(tracer, task);
  if ((z.status & 0x7f) === 0) r.runToExit(SYS_exit_group, (z.status >> 8) & 0xff);
  else {
    const sig = z.status & 0x7f;
    // Its action set to the default, so the signal kills (SIGKILL's cannot be changed, nor needs to).
    if (sig !== 9) {
      r.mem.write(r.scratch(), Buffer.alloc(32)); // a zeroed sigaction: SIG_DFL
      r.check('restart:zombie', SYS.rt_sigaction, sig, r.scratch(), 0, 8);
    }
    r.runToExit(0, 0, z.status & 0x7f);
  }
}

/** Copy the chosen pages of a husk into a shell's (already laid out) memory. */
export function copyFromHusk(sh: Shell, husk: number, mem: MemoryCapture, runs = mem.runs): number {
  const from = new RemoteMem(husk);
  const buf = Buffer.allocUnsafe(1 << 20);
  let bytes = 0;
  try {
    for (const run of runs) {
      for (let off = 0; off < run.len; off += buf.length) {
        const n = Math.min(buf.length, run.len - off);
        const at = run.addr + BigInt(off);
        fillPages(sh.remote.mem, sh.state.memory, at, from.read(at, n, buf.subarray(0, n)));
        bytes += n;
      }
    }
  } finally {
    from.close();
  }
  return bytes;
}

/**
 * Per-process state, threads and registers, once memory and files are in
 * place. Threads the process lacks are created; for a live process, threads
 * it has beyond the checkpoint's were ended before (endExtraThreads).
 * `setCreds` is no longer needed (kept for the callers): each thread's
 * credentials are compared and set where they differ (restoreAttrs), the
 * permission having been checked before anything was built.
 */
export function finishProcess(tracer: Tracer, sh: Shell, setCreds: boolean): void {
  const r = sh.remote;
  const p = sh.state;
  // Process-wide state and the leader's own, in one batch.
  const b = new CallBatch(r);
  restoreMm(b, p.mm, !sh.live);
  restoreName(b, p.ids.comm);
  restoreSignals(b, p.signals);
  restoreThreadSyscalls(b, p.threads.find((t) => t.tid === p.ids.pid)!, sh.rseqKept.has(p.ids.pid));
  if (sh.live) drainPending(b, sh.task.tid, true);
  b.run();
  for (const t of p.threads) {
    if (t.tid === p.ids.pid) continue;
    let task = sh.threads.get(t.tid);
    if (!task) {
      task = cloneWithTid(tracer, r, t.tid, THREAD_FLAGS, r.scratch());
      sh.threads.set(t.tid, task);
    }
    const rt = new Remote(tracer, task);
    useGadget(rt, sh.gadget!);
    try {
      if (sh.live && dropRseq(rt, t.rseq)) sh.rseqKept.add(t.tid);
      const tb = new CallBatch(rt);
      restoreThreadSyscalls(tb, t, sh.rseqKept.has(t.tid));
      if (sh.live) drainPending(tb, task.tid, false);
      tb.run();
    } finally {
      rt.mem.close();
    }
  }
  restoreAio(r, p.aio);
  restoreTimers(tracer, r, p, sh.task.tgid, sh.live); // once every thread a timer may signal is there
  restoreAttrs(tracer, sh); // credentials (every thread's) among them, last: they may drop privileges
  // A SIGCHLD an injected call took since the freeze (on whichever thread)
  // is about children the program no longer ever had, or saw die before the
  // checkpoint: extras killed in a rollback, zombies made again. Any injected call after their deaths may
  // have taken it, so it is dropped only now; one still queued in the
  // kernel was drained above, and the checkpoint's own are queued next.
  tracer.dropHeld(sh.threads.values(), SIGCHLD);
  // Pending signals last, each thread's mask already in place.
  const host = (t: { tid: number }) => sh.threads.get(t.tid)!.tid;
  for (const t of p.threads) setSigmask(host(t), BigInt('0x' + t.sigmask));
  for (const t of p.threads) requeuePending(r, t.tid, p.ids.pid, t.pending, false);
  requeuePending(r, p.ids.pid, p.ids.pid, p.sharedPending, true);
  // The gadget goes last; the step trap stops the task at that syscall's
  // exit, so it never runs another instruction there.
  r.check('restart:memory', SYS.munmap, sh.gadget!, GADGET_SIZE);
  restoreSeccomp(tracer, p, sh.threads); // the last injected calls: a filter may forbid any other
  for (const t of p.threads) {
    sh.threads.get(t.tid)!.inFlight = undefined; // a call it had in flight is over: it is at the checkpoint now
    restoreThreadRegs(host(t), t);
  }
}

/**
 * Copy scattered pages that the live process changed back from its husk:
 * up to 1024 ranges per process_vm_readv / process_vm_writev pair. Only for
 * pages the husk holds alone (the live process took its own copy when it
 * wrote), so pinning them does not unshare anything.
 */
export function copyChangedFromHusk(sh: Shell, husk: number, runs: { addr: bigint; len: number }[]): number {
  const MAX_IOV = 1024, MAX_BYTES = 16 << 20;
  const buf = Buffer.allocUnsafe(MAX_BYTES);
  let bytes = 0;
  for (let i = 0; i < runs.length; ) {
    const batch: { addr: bigint; len: number }[] = [];
    let size = 0;
    while (i < runs.length && batch.length < MAX_IOV && size + runs[i].len <= MAX_BYTES) {
      batch.push(runs[i]);
      size += runs[i++].len;
    }
    if (!batch.length) { // one run larger than the buffer
      bytes += copyFromHusk(sh, husk, { vmas: [], runs: [] }, [runs[i++]]);
      continue;
    }
    const data = buf.subarray(0, size);
    if (sys.vmMany(true, husk, data, batch) !== size || sys.vmMany(false, sh.task.tid, data, batch) !== size) {
      bytes += copyFromHusk(sh, husk, { vmas: [], runs: [] }, batch); // read-only pages and the like
      continue;
    }
    bytes += size;
  }
  return bytes;
}

/**
 * A husk's port: the restore gadget (syscall instruction, batch loop, room
 * for iovecs), mapped once in the husk where the checkpoint has nothing,
 * and kept. A husk never runs on its own, and the checkpoint's layout is
 * recorded apart from it (its VmaStates), so the extra mapping shows
 * nowhere: not in write-back, restore, rollback or query.
 */
function openPort(tracer: Tracer, husk: number, vmas: ProcessState['memory'], ports: Map<number, bigint>): Remote {
  const task = tracer.tasks.get(husk);
  if (!task) throw new CkptError(errno('ESRCH'), 'restart:husk', `husk ${husk} is gone`);
  const port = ports.get(husk);
  const r = new Remote(tracer, task, port);
  try {
    if (port) useGadget(r, port);
    else {
      const gadget = pickGadget(readMaps(husk), vmas);
      installGadget(r, gadget);
      ports.set(husk, gadget);
    }
  } catch (e) {
    r.finish();
    throw e;
  }
  return r;
}

/**
 * process_vm_readv or _writev of `runs` by the task of `r`, the same
 * addresses on both sides, the iovecs in its gadget: up to GADGET_CALLS
 * calls of GADGET_IOVS iovecs per resume, started by `begin` and waited
 * for by `end`. A call that comes up short has its part copied by the
 * supervisor instead (`fallback`).
 */
class VmCopy {
  private parts: { addr: bigint; len: number }[][] = [];
  private want: number[] = [];
  constructor(private readonly r: Remote, private readonly nr: number, private readonly peer: number, private readonly gadget: bigint, private readonly fallback: (part: { addr: bigint; len: number }[]) => number) {}

  begin(runs: { addr: bigint; len: number }[]): void {
    if (!runs.length) return;
    const iov = Buffer.alloc(16 * runs.length);
    const calls: (number | bigint)[][] = [];
    for (let j = 0; j < runs.length; j += GADGET_IOVS) {
      const part = runs.slice(j, j + GADGET_IOVS);
      part.forEach((x, k) => {
        iov.writeBigUInt64LE(x.addr, 16 * (j + k));
        iov.writeBigUInt64LE(BigInt(x.len), 16 * (j + k) + 8);
      });
      const at = this.gadget + GADGET_IOV + BigInt(16 * j);
      calls.push([this.nr, this.peer, at, part.length, at, part.length, 0]);
      this.parts.push(part);
      this.want.push(part.reduce((n, x) => n + x.len, 0));
    }
    this.r.mem.write(this.gadget + GADGET_IOV, iov);
    this.r.beginBatch(calls);
  }

  end(): number {
    if (!this.parts.length) return 0;
    const got = this.r.endBatch();
    const bytes = this.parts.reduce((n, part, k) => n + (got[k] === BigInt(this.want[k]) ? this.want[k] : this.fallback(part)), 0);
    this.parts = [];
    this.want = [];
    return bytes;
  }
}

/**
 * Put the pages of `runs` (in writable mappings) back into live process
 * `sh` from its husk, split in two halves copied at once on two CPUs: the
 * process reads one (process_vm_readv from the husk), the husk writes the
 * other (process_vm_writev into the process, reading its own memory, so
 * nothing of it is pinned). Either way is one copy with no buffer in the
 * supervisor; on this 2-CPU machine the two together take about 60% of
 * either alone. Returns the bytes put back.
 */
export function putBackFromHusk(sh: Shell, husk: number, runs: { addr: bigint; len: number }[], ports: Map<number, bigint>): number {
  if (!runs.length) return 0;
  if (!sh.gadget) return copyChangedFromHusk(sh, husk, runs);
  const hr = openPort(sh.remote.tracer, husk, sh.state.memory, ports);
  const fallback = (part: { addr: bigint; len: number }[]) => copyChangedFromHusk(sh, husk, part);
  const pull = new VmCopy(sh.remote, SYS_process_vm_readv, viewPid(sh.task.tgid, husk) || husk, sh.gadget, fallback);
  const push = new VmCopy(hr, SYS_process_vm_writev, viewPid(husk, sh.task.tid) || sh.task.tid, ports.get(husk)!, fallback);
  const per = GADGET_CALLS * GADGET_IOVS;
  let bytes = 0;
  try {
    for (let i = 0; i < runs.length; i += 2 * per) {
      const round = runs.slice(i, i + 2 * per);
      const half = Math.ceil(round.length / 2);
      pull.begin(round.slice(0, half));
      try {
        push.begin(round.slice(half));
      } finally {
        bytes += pull.end(); // every started batch is waited for
      }
      bytes += push.end();
    }
  } finally {
    hr.finish();
  }
  return bytes;
}

/** Let every rebuilt thread run. */
export function runShells(tracer: Tracer, shells: Iterable<Shell>): void {
  for (const sh of shells) {
    sh.remote.mem.close();
    // Stopped by job control at the checkpoint: SIGSTOP is queued first, so
    // it is taken on the way out of the kernel, before a single instruction
    // of the program runs. SIGSTOP, whatever stopped it: the kernel drops
    // SIGTSTP, SIGTTIN and SIGTTOU in an orphaned process group. (Its
    // parent's wait() sees a stop reported again, by SIGSTOP.)
    if (sh.state.stopSignal) sys.tgkill(sh.task.tgid, sh.task.tid, SIGSTOP);
    for (const t of sh.threads.values()) if (tracer.tasks.has(t.tid)) tracer.resume(t);
  }
}
