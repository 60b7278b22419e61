/**
 * checkpoint(pid, fd, flags): the orchestrator. The order of the stages lives
 * here and nowhere else: check the arguments, freeze the subtree, capture
 * everything that may refuse (nothing written yet), write the image, thaw
 * (or kill).
 */
import fs from 'node:fs';
import os from 'node:os';
import { CkptError, errno } from '../lib/errors.js';
import { sys } from '../lib/libc.js';
import { FORMAT_VERSION, ARCH, PAGE_SIZE } from '../lib/image.js';
import type { ImagePlan } from '../lib/imagejob.js';
import type { IoOutcome } from '../supervisor/io.js';
import { readStatus, readStat, type MapEntry } from '../lib/proc.js';
import { log, Phases } from '../lib/log.js';
import { Freeze, subtree } from '../supervisor/freeze.js';
import { hostPid, nsPids } from '../supervisor/pidns.js';
import { Remote, callEach } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import { InFlight, runHere, unwrap, type HandlerResult, type SyscallCtx, type Supervisor } from './context.js';
import type { ProcessState, TreeState, ZombieState } from './state.js';
import { markInherited, ownRuns } from './resources/cowshare.js';
import { ownNamespaces, refuseOwnNamespaces } from './resources/namespaces.js';
import { refuseSharedMm, captureMemory, vdsoInfo, checkMappings, copyUnforked, lockedRanges, addLocks, refuseFutureLocks, type VmaState, type HeldRun } from './resources/memory.js';
import { HUSK_CLONE, adoptHusks, finishHusk, destroyHusk, destroyHusks, reapChild, type MemCheckpoint } from './memckpt.js';
import { openUffd, newHuskPageCache } from './resources/dirty.js';
import { captureThread, captureAltstacks, AltstackQuery, findTidAddress, peekPending, type ThreadState } from './resources/thread.js';
import { captureSignals } from './resources/signals.js';
import { captureFiles, OutsideHolders } from './resources/files.js';
import { captureAio, userThreads } from './resources/aio.js';
import { ShmCapture, nonZeroRuns } from './resources/shm.js';
import { captureIds, captureMm, parseCreds } from './resources/process.js';
import { captureThreadAttrs, queryUninherited, captureProcAttrs } from './resources/attrs.js';
import { captureSeccomp, SeccompSuspension } from './resources/seccomp.js';
import { captureTimers, listTimers } from './resources/timers.js';
import { captureSysv, semUndoOf, settleSyscallExits, detachInHusk, dropWithSubtree } from './resources/sysvipc.js';
import { TcpCapture } from './resources/tcp.js';

const KNOWN_FLAGS = BigInt(CKPT.DEFER | CKPT.KEEP | CKPT.KILL | CKPT.HANDLE);
const CAP_SYS_PTRACE = 19n;

export const int32 = (v: bigint) => Number(BigInt.asIntN(32, v));

export function checkpoint(ctx: SyscallCtx): HandlerResult {
  const { tracer, caller } = ctx;
  const pidArg = int32(ctx.args[0]);
  const fdArg = int32(ctx.args[1]);
  const flags = ctx.args[2];
  if (flags & ~KNOWN_FLAGS) throw new CkptError(errno('EINVAL'), 'checkpoint', `unknown flag bits 0x${(flags & ~KNOWN_FLAGS).toString(16)}`);
  const f = Number(flags);
  if (f & CKPT.DEFER && fdArg !== -1) throw new CkptError(errno('EINVAL'), 'checkpoint', `CKPT_DEFER with fd ${fdArg} (must be -1)`);
  if (f & CKPT.HANDLE && !(f & (CKPT.DEFER | CKPT.KEEP))) throw new CkptError(errno('EINVAL'), 'checkpoint', 'CKPT_HANDLE needs CKPT_DEFER or CKPT_KEEP');
  if (f & CKPT.DEFER && f & CKPT.KEEP) throw new CkptError(errno('EINVAL'), 'checkpoint', 'CKPT_DEFER and CKPT_KEEP together');

  const pid = pidArg === 0 ? caller.tgid : pidArg > 0 ? hostPid(tracer, caller.tgid, pidArg) ?? -1 : -1;
  const root = tracer.tasks.get(pid);
  if (pidArg < 0 || !root || root.tgid !== pid) throw new CkptError(errno('ESRCH'), 'checkpoint', `pid ${pidArg} is not a process of this supervised tree`);
  let procs = subtree(tracer, pid);
  checkPermission(caller.tgid, procs);
  if (f & CKPT.DEFER) return checkpointInMemory(ctx, pid, procs, f, -1, true);
  // To a file too, the subtree is stopped only as long as for CKPT_DEFER:
  // the image is written from husks while it runs again (or, with
  // CKPT_KILL, once it is dead), by an I/O worker while the loop goes on.
  return checkpointInMemory(ctx, pid, procs, f, takeCallerFd(caller.tgid, fdArg, 'write', 'checkpoint'), !!(f & CKPT.KEEP));
}

export interface HuskOptions {
  /** Should a dirty-page tracker be started in this (host) process? */
  track: (pid: number) => boolean;
  /** The TCP sockets' capture (it knows whether the subtree is killed after: tcp.ts). */
  tcp?: TcpCapture;
}

/**
 * Capture a frozen subtree: processes (parents first), zombies, files.
 * Memory is not read: each process gets a husk instead (returned), and its
 * memory is described from the husk once the subtree runs again.
 */
export function captureTree(tracer: Tracer, root: number, procs: number[], caller: Task, outside: number[], others: OutsideHolders, husks: HuskOptions, ph = new Phases()): { tree: TreeState; husks: Map<number, number>; held: Map<number, { vmas: VmaState[]; runs: HeldRun[] }>; shm: ShmCapture; hostOf: (pid: number) => number; uffds: Map<number, number>; locks: Map<number, MapEntry[]> } {
  const shm = new ShmCapture();
  const made = new Map<number, number>();
  const held = new Map<number, { vmas: VmaState[]; runs: HeldRun[] }>();
  const uffds = new Map<number, number>();
  const task = (tid: number) => {
    const t = tracer.tasks.get(tid);
    if (!t || t.stop === 'running') throw new CkptError(errno('EAGAIN'), 'checkpoint', `task ${tid} is not frozen`);
    return t;
  };
  const rs: Remote[] = [];
  const seccomp = new SeccompSuspension();
  refuseSharedMm(procs);
  try {
    settleSyscallExits(tracer, procs); // a SEM_UNDO semop caught at its exit stop: its adjustments noted now
    // Registers and pending signals first, before any injected syscall
    // touches them (a task resumed for one may take a signal on its way back).
    const threads = procs.map((pid) => userThreads(pid).map((tid) => captureThread(tid, tid === caller.tid, undefined, tid !== caller.tid && tracer.tasks.get(tid)?.inFlight !== undefined)));
    const sharedPending = procs.map((pid) => peekPending(pid, true));
    for (const t of threads.flat()) t.seccomp = captureSeccomp(t.tid, seccomp); // their filters suspended until the end of the capture
    ph.mark('threads');
    // Then one round of injected calls: a husk clone in each leader and, in
    // every other thread, sigaltstack (a husk inherits only the leader's).
    // While they run (a clone copies page tables: the longest part of the
    // stop), everything that is only read from /proc is read.
    const leaders = procs.map((pid) => new Remote(tracer, task(pid)));
    rs.push(...leaders);
    const others1 = threads.flatMap((ts, i) => ts.filter((t) => t.tid !== procs[i]));
    for (const t of others1) rs.push(new Remote(tracer, task(t.tid)));
    const alt = new AltstackQuery(rs.slice(leaders.length));
    let read: ReturnType<typeof readProcs> | undefined;
    let res: bigint[];
    try {
      res = callEach(rs, (_, i) => (i < leaders.length ? HUSK_CLONE : alt.call(i - leaders.length)), () => {
        read = readProcs(tracer, procs, threads, sharedPending, outside, others, shm, husks.tcp);
      });
      alt.answers(res.slice(leaders.length)).forEach((a, i) => (others1[i].altstack = a));
    } catch (e) {
      for (const r of leaders) for (const h of r.newChildren) destroyHusk(tracer, r.task.tgid, h);
      throw e;
    } finally {
      alt.putBack(); // after the answers are read: they are in those bytes
    }
    ph.mark('husks+proc');
    adoptHusks(tracer, leaders, res.slice(0, leaders.length)).forEach((h, i) => made.set(procs[i], h));
    read!.processes.forEach((p, i) => (p.timers = captureTimers(tracer, procs[i], leaders[i], read!.timers[i], threads[i]))); // fork does not copy them: now (a refusal drops the husks)
    const { processes, files, zombies, maps } = read!;
    queryUninherited(tracer, leaders, rs.slice(leaders.length, leaders.length + others1.length), processes, others1); // what a husk does not inherit
    for (const r of leaders) {
      if (!husks.track(r.task.tgid)) continue;
      const fd = openUffd(r);
      if (fd >= 0) uffds.set(r.task.tgid, fd);
    }
    // What fork does not copy, in the processes that ever asked for it
    // (MADV_DONTFORK, MADV_WIPEONFORK), is copied now too.
    procs.forEach((pid, i) => {
      if (tracer.forkAdvice.has(pid)) held.set(pid, copyUnforked(pid, maps[i], made.get(pid)!));
    });
    const tree: TreeState = { root, processes, zombies, files: files.table, shm: shm.objects, sysvipc: read!.sysvipc };
    const ns = toNamespace(tree);
    ph.mark('tree');
    const rekey = <V>(m: Map<number, V>) => new Map([...m].map(([k, v]) => [ns.toNs(k), v]));
    const locks = rekey(new Map(procs.map((p, i) => [p, lockedRanges(maps[i] ?? [])])));
    return { tree, husks: rekey(made), held: rekey(held), shm, hostOf: ns.toHost, uffds: rekey(uffds), locks };
  } catch (e) {
    destroyHusks(tracer, made);
    for (const fd of uffds.values()) fs.closeSync(fd);
    throw e;
  } finally {
    for (const r of rs) r.finish();
    seccomp.end(); // the program's filters in force again before the thaw
  }
}

/**
 * What a frozen subtree shows in /proc: ids, credentials, descriptors,
 * zombies, and the mappings (shared memory is copied now: fork cannot
 * keep it). Nothing here
 * needs the tasks themselves, so it runs while injected calls do. The
 * process-wide state a husk shares (mm, handlers, the leader's alternate
 * stack, tid addresses) is read from the husk after the thaw.
 */
function readProcs(tracer: Tracer, procs: number[], threads: ThreadState[][], sharedPending: (string[] | undefined)[], outside: number[], others: OutsideHolders, shm: ShmCapture, tcp?: TcpCapture) {
  const statuses = procs.map((pid) => readStatus(pid));
  const files = captureFiles(procs, outside, (p) => statuses[procs.indexOf(p)], shm, others, tcp);
  const processes: ProcessState[] = procs.map((pid, i) => ({
    ids: captureIds(pid),
    creds: parseCreds(statuses[i]),
    mm: undefined as unknown as ProcessState['mm'], // set by captureProcessWide
    memory: [], // for a husk: described from it after the thaw
    files: files.perProc.get(pid)!,
    signals: {},
    sharedPending: sharedPending[i],
    stopSignal: tracer.groupStopOf(pid),
    threads: threads[i],
  }));
  threads.forEach((ts, i) => ts.forEach((t) => (t.attrs = captureThreadAttrs(t.tid, tracer.prctlNoted.has(procs[i]), t.tid === procs[i] ? statuses[i] : undefined))));
  for (const pid of procs) refuseFutureLocks(pid, tracer.lockFuture.has(pid));
  const maps = procs.map((pid, i) => checkMappings(pid, shm, statuses[i]));
  processes.forEach((p, i) => (p.aio = captureAio(procs[i], maps[i]))); // AIO rings are shared with the kernel: read now
  const sysvipc = captureSysv(tracer, procs, maps, shm); // its segments' bytes are copied with the rest
  processes.forEach((p, i) => (p.semUndo = semUndoOf(tracer, procs[i], sysvipc)));
  shm.copy(); // every shared mapping and descriptor checked: now the bytes
  return { statuses, files, processes, zombies: findZombies(tracer, procs), maps, timers: procs.map(listTimers), sysvipc };
}

/**
 * Process-wide state through `r`: the process itself, or its husk (a copy
 * of the leader made while the subtree was stopped: the same mm fields,
 * handlers, alternate stack, memory).
 */
export function captureProcessWide(r: Remote, state: ProcessState, status: Map<string, string>, selfTid: (tid: number) => number): void {
  state.mm = captureMm(r, r.task.tgid);
  state.signals = captureSignals(r, status);
  state.attrs = captureProcAttrs(r, state, status);
  const fsBaseOf = (t: ThreadState) => BigInt(Buffer.from(t.regs, 'base64').readBigUInt64LE(21 * 8));
  for (const t of state.threads) {
    t.tidAddress = findTidAddress(r.mem, selfTid(t.tid), fsBaseOf(t));
    if (t.tid === state.ids.pid) t.altstack = captureAltstacks([r])[0];
  }
  // A thread caught as it is born may not have its id in its descriptor
  // yet: where every other thread has it at the same offset from its
  // thread pointer (glibc's layout), it has it there too. Without it, a
  // pthread_join of that thread would wait forever after a restart.
  const offsets = new Set(state.threads.filter((t) => t.tidAddress).map((t) => BigInt(t.tidAddress!) - fsBaseOf(t)));
  if (offsets.size === 1) {
    const [off] = offsets;
    for (const t of state.threads) if (!t.tidAddress && fsBaseOf(t) !== 0n) t.tidAddress = '0x' + (fsBaseOf(t) + off).toString(16);
  }
}

/**
 * A subtree whose root lives in a pid namespace below ours has its ids
 * recorded as seen in that namespace: what the program itself sees, and
 * gets back at a restart made from inside it. Rooted at the namespace's
 * init (pid 1), it is a container: a restart makes a new namespace, so it
 * gets every one of them.
 */
function toNamespace(tree: TreeState): { toNs: (h: number) => number; toHost: (n: number) => number } {
  const rootNs = nsPids(tree.root);
  if (rootNs.length < 2) return { toNs: (h) => h, toHost: (n) => n };
  const level = rootNs.length - 1;
  const seen = new Map<number, number>();
  const toNs = (h: number) => {
    if (h <= 0) return 0;
    let n = seen.get(h);
    if (n === undefined) seen.set(h, (n = nsPids(h)[level] ?? 0)); // 0: not visible in the namespace
    return n;
  };
  const back = new Map<number, number>();
  for (const h of [...tree.processes.flatMap((p) => p.threads.map((t) => t.tid)), ...tree.zombies.map((z) => z.pid)]) back.set(toNs(h), h);
  for (const p of tree.processes) {
    p.ids = { ...p.ids, pid: toNs(p.ids.pid), ppid: toNs(p.ids.ppid), pgid: toNs(p.ids.pgid), sid: toNs(p.ids.sid) };
    for (const t of p.threads) t.tid = toNs(t.tid);
  }
  for (const z of tree.zombies) Object.assign(z, { pid: toNs(z.pid), ppid: toNs(z.ppid), pgid: toNs(z.pgid), sid: toNs(z.sid) });
  tree.root = toNs(tree.root);
  tree.nsView = true;
  if (tree.root === 1) tree.pidns = true;
  return { toNs, toHost: (n) => back.get(n) ?? n };
}

/** Children of the subtree that exited and were not reaped. */
function findZombies(tracer: Tracer, procs: number[]): ZombieState[] {
  const inside = new Set(procs);
  const out: ZombieState[] = [];
  for (const pid of tracer.exited) {
    try {
      const st = readStat(pid);
      if (st.field(3) !== 'Z') continue;
      if (inside.has(Number(st.field(4)))) {
        out.push({ pid, ppid: Number(st.field(4)), pgid: Number(st.field(5)), sid: Number(st.field(6)), status: Number(st.field(52)) });
      }
    } catch {
      tracer.exited.delete(pid); // reaped: no longer a candidate
    }
  }
  return out;
}

/**
 * Freeze the subtree; children forked meanwhile are frozen too and taken in
 * (and only they still need the permission check).
 */
function freezeSubtree(freeze: Freeze, tracer: Tracer, caller: Task, pid: number, checked: number[]): number[] {
  freeze.add(checked);
  const procs = subtree(tracer, pid);
  freeze.add(procs);
  const seen = new Set(checked);
  checkPermission(caller.tgid, procs.filter((p) => !seen.has(p)));
  return procs;
}

/** ABI: a caller may checkpoint a task only if it could ptrace it. */
export function checkPermission(callerPid: number, procs: number[]): void {
  if (!procs.length) return;
  const cs = readStatus(callerPid);
  const capEff = BigInt('0x' + (cs.get('CapEff') ?? '0'));
  if (capEff & (1n << CAP_SYS_PTRACE)) return;
  const ruid = parseCreds(cs).uid[0];
  for (const p of procs) {
    const uids = parseCreds(readStatus(p)).uid;
    if (uids.some((u) => u !== ruid)) throw new CkptError(errno('EPERM'), 'checkpoint', `task ${p}: uid ${uids.join('/')} differs from the caller's ${ruid} and the caller lacks CAP_SYS_PTRACE`);
  }
}

/**
 * A checkpoint of the launcher (the stopped shell about to exec the
 * program) into /dev/null, before the program runs: the capture path runs
 * once, so the program's first checkpoint does not find it cold. Nothing is
 * kept, no crid is taken, the launcher is left as it was.
 */
export function warmUp(sv: Supervisor, launcher: Task): void {
  runHere(checkpointInMemory({ sv, tracer: sv.tracer, caller: launcher, args: [] }, launcher.tgid, [launcher.tgid], 0, fs.openSync('/dev/null', 'w'), false, 0));
}

/** What the supervised processes outside the subtree hold: read before the freeze. */
function outsideHolders(tracer: Tracer, procs: number[]): OutsideHolders {
  const inside = new Set(procs);
  return new OutsideHolders(tracer.processes().filter((p) => !inside.has(p)));
}

/**
 * Every checkpoint: the subtree is stopped only to capture what is not
 * memory and to make one husk per process; it runs again before the husks'
 * memory is even described (CKPT_KILL: it stays stopped until it dies).
 * Then, by flags:
 * - CKPT_DEFER: kept in memory, nothing written;
 * - CKPT_KEEP: kept, and the image written from the husks;
 * - neither: the image written from the husks, which then go;
 * - CKPT_KILL: the image written (all but its trailer) while the subtree
 *   is still stopped, so that a failed write leaves it running as it was;
 *   then it is killed and reaped, so that a restart reading the stream
 *   finds its pids free by the time the image is complete; the trailer last.
 * Image bytes move as a call in flight (supervisor/io.ts). `out`: the
 * image's descriptor (the supervisor's, closed here), or -1. `crid`: 0 for
 * the warm-up, which takes none.
 */
function checkpointInMemory(ctx: SyscallCtx, pid: number, procs0: number[], f: number, out: number, keep: boolean, crid?: number): HandlerResult {
  const { tracer, caller, sv } = ctx;
  const kill = (f & CKPT.KILL) !== 0;
  let closeOut = out >= 0; // until a job in flight owns it
  try {
    sv.store.reapHandles();
    if (keep && sv.store.all.size >= sv.store.max) throw new CkptError(errno('EAGAIN'), 'checkpoint', `${sv.store.all.size} in-memory checkpoints already live (--max-checkpoints ${sv.store.max})`);
    // Tracking is for rollback: not after CKPT_KILL. Who is tracked already
    // is looked up now, not in the freeze window (it reads /proc).
    const track = keep && sv.options.trackDirty && !kill;
    const tracked = new Set(track ? procs0.filter((p) => sv.store.tracker(p)) : []);
    const others = outsideHolders(tracer, procs0);
    const freeze = new Freeze(tracer);
    const tcp = new TcpCapture(kill);
    freeze.onThaw = () => tcp.release(); // the subtree runs on: its connections as they were
    const t0 = performance.now();
    const ph = new Phases();
    let procs = procs0;
    let cap;
    try {
      procs = freezeSubtree(freeze, tracer, caller, pid, procs);
      ph.mark('freeze');
      cap = captureTree(tracer, pid, procs, caller, sv.options.outsideFds, others, { track: (p) => track && !tracked.has(p), tcp }, ph);
    } catch (e) {
      freeze.thaw();
      throw e;
    }
    if (!kill) freeze.thaw();
    ph.mark('thaw');
    const stopMs = performance.now() - t0;
    log.syscall('checkpoint of %d: stopped %s', pid, ph);
    const c: MemCheckpoint = {
      crid: crid ?? sv.newCrid(), created: new Date().toISOString(), stopMs, tree: cap.tree, husks: cap.husks,
      memory: new Map(), privateBytes: 0, writtenBack: false, uid: parseCreds(readStatus(caller.tgid)).uid[0],
      shmData: cap.shm.data,
      hostOf: cap.hostOf,
      held: new Map(),
      dirty: new Map(),
      huskPages: newHuskPageCache(),
      huskPorts: new Map(),
    };
    let plan: ImagePlan | undefined;
    try {
      const ours = ownNamespaces();
      for (const p of c.tree.processes) {
        const husk = c.husks.get(p.ids.pid)!;
        refuseOwnNamespaces(husk, c.hostOf(p.ids.pid), ours);
        finishHusk(tracer, husk, (r) => captureProcessWide(r, p, readStatus(husk), (tid) => tid)); // ids already as seen inside
        const mem = captureMemory(husk, undefined, c.hostOf(p.ids.pid)); // a refusal names the process, not its husk
        detachInHusk(tracer, husk, mem.vmas); // described: the husk lets its SysV segments go
        const held = cap.held.get(p.ids.pid);
        p.memory = [...mem.vmas, ...(held?.vmas ?? [])].sort((a, b) => (BigInt(a.start) < BigInt(b.start) ? -1 : 1));
        addLocks(p.ids.pid, p.memory, cap.locks.get(p.ids.pid)); // the husk has none: seen in the process during the stop
        c.memory.set(p.ids.pid, mem);
        if (held?.runs.length) c.held.set(p.ids.pid, held.runs);
      }
      markInherited(c.tree.processes, c.husks, c.memory); // pages children share with their parents stay shared at a restart
      if (out >= 0) plan = imagePlan(c);
    } catch (e) {
      destroyHusks(tracer, c.husks, c.hostOf); // nothing is kept
      for (const fd of cap.uffds.values()) fs.closeSync(fd);
      if (kill) freeze.thaw();
      throw e;
    }
    if (!keep) {
      closeOut = false;
      const done = (o: IoOutcome<unknown>): number => {
        fs.closeSync(out);
        destroyHusks(tracer, c.husks, c.hostOf);
        unwrap(o);
        log.syscall('checkpoint %d of %d to a file: stopped %s ms, image %s ms', c.crid, pid, stopMs.toFixed(2), (performance.now() - t0 - stopMs).toFixed(2));
        return c.crid;
      };
      if (!kill) return new InFlight({ kind: 'write', fd: out, plan: plan! }, done);
      return new InFlight({ kind: 'write', fd: out, plan: plan!, holdTrailer: true }, (o) => {
        if (!o.ok) {
          freeze.thaw(); // the subtree goes on as it was
          return done(o);
        }
        freeze.tasks.length = 0; // they die: nothing to resume
        // Every page is written: the husks go first (a namespace's init,
        // killed, waits for every process of its namespace, husks too).
        destroyHusks(tracer, c.husks, c.hostOf);
        c.husks.clear();
        dropWithSubtree(c.tree, pid); // its SysV objects go with it
        killSubtree(tracer, procs);
        tcp.commit();
        return new InFlight({ kind: 'raw', fd: out, data: o.value.trailer! }, done);
      });
    }
    c.privateBytes = Buffer.byteLength(JSON.stringify(c.tree)) + cap.shm.bytes() + [...c.held.values()].flat().reduce((n, r) => n + r.data.length, 0);
    sv.store.add(c);
    // Protecting every page costs ~35 ms per GiB the first time: after the caller has its answer.
    if (track) sv.later(() => sv.store.track(c, cap.uffds));
    if (kill) {
      freeze.tasks.length = 0;
      dropWithSubtree(c.tree, pid);
      killSubtree(tracer, procs); // DEFER|KILL: nothing to write, memory is kept
      tcp.commit();
    }
    log.syscall('checkpoint %d of %d in memory: stopped %s ms, %d husks', c.crid, pid, stopMs.toFixed(2), c.husks.size);
    const answer = () => (f & CKPT.HANDLE ? makeHandle(ctx, c) : c.crid);
    if (out < 0) return answer();
    closeOut = false;
    sv.store.hold(c);
    return new InFlight({ kind: 'write', fd: out, plan: plan! }, (o) => {
      fs.closeSync(out);
      sv.store.unhold(c);
      if (!o.ok) {
        sv.store.release(c);
        throw o.error;
      }
      c.writtenBack = true;
      return answer();
    });
  } finally {
    if (closeOut) fs.closeSync(out);
  }
}

/**
 * CKPT_KILL: the subtree dies, and is reaped, before its image is complete:
 * a restart that reads the stream (in this tree or another supervisor's)
 * then finds every pid free. Processes whose parent died with them come to
 * us (the subreaper) or to their namespace's init; the root's parent lives
 * outside the subtree and is made to reap it (a restart makes the root the
 * restarter's child anyway).
 */
function killSubtree(tracer: Tracer, procs: number[]): void {
  const ppid = (p: number) => {
    try {
      return Number(readStat(p).field(4));
    } catch {
      return 0;
    }
  };
  const rootParent = ppid(procs[0]);
  for (const p of procs) sys.kill(p, 9);
  // Children first: a killed namespace init waits for the rest of its namespace.
  for (const p of [...procs].reverse()) tracer.waitGone(p);
  reapChild(tracer, rootParent, procs[0]);
  for (const p of procs.slice(1)) reapChild(tracer, ppid(p), p);
}

/** The image of an in-memory checkpoint, its pages to be read from the husks (sharing kept). */
export function imagePlan(c: MemCheckpoint): ImagePlan {
  const husk0 = c.husks.get(c.tree.root)!;
  return {
    header: { version: FORMAT_VERSION, arch: ARCH, pageSize: PAGE_SIZE, crid: c.crid, kernel: os.release(), created: c.created, vdso: vdsoInfo(husk0) },
    tree: JSON.stringify(c.tree),
    shm: [...c.shmData].flatMap(([key, runs]) => [...nonZeroRuns(runs)].map((r) => ({ key, offset: r.offset, data: r.data }))),
    procs: c.tree.processes.map((p) => ({ pid: p.ids.pid, memPid: c.husks.get(p.ids.pid)!, runs: ownRuns(p.memory, c.memory.get(p.ids.pid)!.runs), held: c.held.get(p.ids.pid) ?? [] })),
  };
}

/**
 * A handle: the write end of a pipe made in the caller (so no permission
 * over the supervisor is needed); the supervisor keeps the read end, and
 * sees the last copy of the handle closed as a hang-up on it.
 */
function makeHandle(ctx: SyscallCtx, c: MemCheckpoint): number {
  const r = new Remote(ctx.tracer, ctx.caller);
  try {
    const s = r.scratch();
    r.check('checkpoint:handle', SYS_pipe2, s, O_CLOEXEC);
    const b = r.mem.read(s, 8);
    const [rd, wr] = [b.readInt32LE(0), b.readInt32LE(4)];
    const mine = sys.takeFd(ctx.caller.tgid, rd);
    r.call(SYS_close, rd);
    let fd = BigInt(wr);
    if (wr < 3) {
      fd = r.check('checkpoint:handle', SYS_fcntl, wr, F_DUPFD_CLOEXEC, 3);
      r.call(SYS_close, wr);
    }
    if (mine < 0) throw new CkptError(errno('EMFILE'), 'checkpoint:handle', 'cannot take the handle pipe');
    sys.fcntl(mine, 4 /* F_SETFL */, 0o4000 /* O_NONBLOCK */);
    c.handleFd = mine;
    c.handleIno = fs.fstatSync(mine).ino;
    return Number(fd);
  } finally {
    r.finish();
  }
}

const SYS_pipe2 = 293, SYS_close = 3, SYS_fcntl = 72, O_CLOEXEC = 0o2000000, F_DUPFD_CLOEXEC = 1030;
