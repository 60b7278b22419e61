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
import { ImageWriter, REC, FORMAT_VERSION, ARCH, PAGE_SIZE } from '../lib/image.js';
import { FdSink } from '../lib/stream.js';
import { readStatus, listTids, readStat } from '../lib/proc.js';
import { log, Phases } from '../lib/log.js';
import { Freeze, subtree } from '../supervisor/freeze.js';
import { hostPid, nsPids } from '../supervisor/pidns.js';
import { Remote, callEach } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import type { SyscallCtx, Supervisor } from './context.js';
import type { ProcessState, TreeState, ZombieState } from './state.js';
import { captureMemory, writePages, vdsoInfo, checkMappings, copyUnforked, type MemoryCapture, type VmaState, type HeldRun } from './resources/memory.js';
import { HUSK_CLONE, adoptHusks, finishHusk, destroyHusk, destroyHusks, type MemCheckpoint } from './memckpt.js';
import { openUffd, newHuskPageCache } from './resources/dirty.js';
import { captureThread, captureAltstacks, AltstackQuery, findTidAddress, peekPending, type ThreadState } from './resources/thread.js';
import { captureSignals } from './resources/signals.js';
import { captureFiles, OutsideHolders } from './resources/files.js';
import { ShmCapture, type ShmData } from './resources/shm.js';
import { captureIds, captureMm, parseCreds } from './resources/process.js';
import { captureSeccomp, SeccompSuspension } from './resources/seccomp.js';
import { captureTimers, listTimers } from './resources/timers.js';

const KNOWN_FLAGS = BigInt(CKPT.DEFER | CKPT.KEEP | CKPT.KILL | CKPT.HANDLE);
const CAP_SYS_PTRACE = 19n;

export const int32 = (v: bigint) => Number(BigInt.asIntN(32, v));

export function checkpoint(ctx: SyscallCtx): number {
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
  if (f & CKPT.KEEP) return checkpointInMemory(ctx, pid, procs, f, takeCallerFd(caller.tgid, fdArg, 'write', 'checkpoint'), true);
  // To a file, the subtree is stopped only as long as for CKPT_DEFER: the
  // image is written from husks while it runs again.
  if (!(f & CKPT.KILL)) return checkpointInMemory(ctx, pid, procs, f, takeCallerFd(caller.tgid, fdArg, 'write', 'checkpoint'), false);
  const out = takeCallerFd(caller.tgid, fdArg, 'write', 'checkpoint');
  const crid = ctx.sv.newCrid();
  const others = outsideHolders(tracer, procs);
  const freeze = new Freeze(tracer);
  try {
    const t0 = performance.now();
    procs = freezeSubtree(freeze, tracer, caller, pid, procs);
    const t1 = performance.now();
    const { tree, memory, shm, hostOf } = captureTree(tracer, pid, procs, caller, ctx.sv.options.outsideFds, others, false);
    const t2 = performance.now();
    const w = new ImageWriter(new FdSink(out));
    w.header({ version: FORMAT_VERSION, arch: ARCH, pageSize: PAGE_SIZE, crid, kernel: os.release(), created: new Date().toISOString(), vdso: vdsoInfo(pid) });
    w.json(REC.TREE, tree);
    writeShm(w, shm.data);
    for (const p of tree.processes) {
      w.json(REC.MEMORY, { pid: p.ids.pid });
      writePages(hostOf(p.ids.pid), memory.get(p.ids.pid)!, w, true);
    }
    w.trailer();
    log.syscall('checkpoint %d: %d processes; freeze %s ms, capture %s ms, image %s ms', pid, procs.length, (t1 - t0).toFixed(2), (t2 - t1).toFixed(2), (performance.now() - t2).toFixed(2));
  } catch (e) {
    freeze.thaw();
    throw e;
  } finally {
    fs.closeSync(out);
  }
  if (f & CKPT.KILL) {
    for (const p of procs) sys.kill(p, 9);
    freeze.tasks.length = 0; // they die; nothing to resume
  } else freeze.thaw();
  return crid;
}

export interface HuskOptions {
  /** Should a dirty-page tracker be started in this (host) process? */
  track: (pid: number) => boolean;
}

/**
 * Capture a frozen subtree: processes (parents first), zombies, files. With
 * `husks`, memory is not read: each process gets a husk instead (returned),
 * and its memory is described from the husk once the subtree runs again.
 */
export function captureTree(tracer: Tracer, root: number, procs: number[], caller: Task, outside: number[], others: OutsideHolders, husks: HuskOptions | false, ph = new Phases()): { tree: TreeState; memory: Map<number, MemoryCapture>; husks: Map<number, number>; held: Map<number, { vmas: VmaState[]; runs: HeldRun[] }>; shm: ShmCapture; hostOf: (pid: number) => number; uffds: Map<number, number> } {
  const shm = new ShmCapture();
  const memory = new Map<number, MemoryCapture>();
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
  try {
    // Registers and pending signals first, before any injected syscall
    // touches them (a task resumed for one may take a signal on its way back).
    const threads = procs.map((pid) => listTids(pid).map((tid) => captureThread(tid, tid === caller.tid)));
    const sharedPending = procs.map((pid) => peekPending(pid, true));
    for (const t of threads.flat()) t.seccomp = captureSeccomp(t.tid, seccomp); // their filters suspended until the end of the capture
    ph.mark('threads');
    // Then one round of injected calls: a husk clone in each leader and, in
    // every other thread, sigaltstack (a husk inherits only the leader's).
    // While they run (a clone copies page tables: the longest part of the
    // stop), everything that is only read from /proc is read.
    const leaders = husks ? procs.map((pid) => new Remote(tracer, task(pid))) : [];
    rs.push(...leaders);
    const others1 = threads.flatMap((ts, i) => ts.filter((t) => t.tid !== procs[i]));
    for (const t of others1) rs.push(new Remote(tracer, task(t.tid)));
    const alt = new AltstackQuery(rs.slice(leaders.length));
    let read: ReturnType<typeof readProcs> | undefined;
    let res: bigint[];
    try {
      res = callEach(rs, (_, i) => (i < leaders.length ? HUSK_CLONE : alt.call(i - leaders.length)), () => {
        read = readProcs(tracer, procs, threads, sharedPending, outside, others, shm, !!husks);
      });
      alt.answers(res.slice(leaders.length)).forEach((a, i) => (others1[i].altstack = a));
    } catch (e) {
      for (const r of leaders) for (const h of r.newChildren) destroyHusk(tracer, r.task.tgid, h);
      throw e;
    } finally {
      alt.putBack(); // after the answers are read: they are in those bytes
    }
    ph.mark('husks+proc');
    if (husks) adoptHusks(tracer, leaders, res.slice(0, leaders.length)).forEach((h, i) => made.set(procs[i], h));
    read!.processes.forEach((p, i) => (p.timers = captureTimers(tracer, procs[i], leaders[i], read!.timers[i], threads[i]))); // fork does not copy them: now (a refusal drops the husks)
    const { processes, files, zombies, maps } = read!;
    if (husks) {
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
    } else {
      // A direct checkpoint: the process-wide state and the memory now.
      processes.forEach((p, i) => {
        const r = new Remote(tracer, task(procs[i]));
        try {
          captureProcessWide(r, p, read!.statuses[i], (tid) => nsPids(tid).at(-1)!); // glibc keeps the tid as the thread sees it
        } finally {
          r.finish();
        }
        const mem = captureMemory(procs[i], shm);
        p.memory = mem.vmas;
        memory.set(procs[i], mem);
      });
    }
    const tree: TreeState = { root, processes, zombies, files: files.table, shm: shm.objects };
    const ns = toNamespace(tree);
    ph.mark('tree');
    const rekey = <V>(m: Map<number, V>) => new Map([...m].map(([k, v]) => [ns.toNs(k), v]));
    return { tree, memory: rekey(memory), husks: rekey(made), held: rekey(held), shm, hostOf: ns.toHost, uffds: rekey(uffds) };
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
 * What a frozen subtree shows in /proc: ids,
 * credentials, descriptors, zombies, and, with husks to be made, the
 * mappings (shared memory is copied now: fork cannot keep it). Nothing here
 * needs the tasks themselves, so it runs while injected calls do. The
 * process-wide state a husk shares (mm, handlers, the leader's alternate
 * stack, tid addresses) is read from the husk after the thaw.
 */
function readProcs(tracer: Tracer, procs: number[], threads: ThreadState[][], sharedPending: (string[] | undefined)[], outside: number[], others: OutsideHolders, shm: ShmCapture, husks: boolean) {
  const statuses = procs.map((pid) => readStatus(pid));
  const files = captureFiles(procs, outside, (p) => statuses[procs.indexOf(p)], shm, others);
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
  const maps = husks ? procs.map((pid) => checkMappings(pid, shm)) : [];
  return { statuses, files, processes, zombies: findZombies(tracer, procs), maps, timers: procs.map(listTimers) };
}

/**
 * Process-wide state through `r`: the process itself, or its husk (a copy
 * of the leader made while the subtree was stopped: the same mm fields,
 * handlers, alternate stack, memory).
 */
export function captureProcessWide(r: Remote, state: ProcessState, status: Map<string, string>, selfTid: (tid: number) => number): void {
  state.mm = captureMm(r, r.task.tgid);
  state.signals = captureSignals(r, status);
  for (const t of state.threads) {
    const fsBase = BigInt(Buffer.from(t.regs, 'base64').readBigUInt64LE(21 * 8));
    t.tidAddress = findTidAddress(r.mem, selfTid(t.tid), fsBase);
    if (t.tid === state.ids.pid) t.altstack = captureAltstacks([r])[0];
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
  checkpointInMemory({ sv, tracer: sv.tracer, caller: launcher, args: [] }, launcher.tgid, [launcher.tgid], 0, fs.openSync('/dev/null', 'w'), false, 0);
}

/** What the supervised processes outside the subtree hold: read before the freeze. */
function outsideHolders(tracer: Tracer, procs: number[]): OutsideHolders {
  const inside = new Set(procs);
  return new OutsideHolders(tracer.processes().filter((p) => !inside.has(p)));
}

/**
 * CKPT_DEFER / CKPT_KEEP: the subtree is stopped only to capture what is not
 * memory and to make one husk per process; it runs again before the husks'
 * memory is even described. KEEP then writes the image from the husks.
 * Without `keep` (a plain checkpoint to a file) the image is written the
 * same way and the husks go: nothing is kept. `out`: the image's
 * descriptor (the supervisor's, closed here), or -1. `crid`: 0 for the
 * warm-up, which takes none.
 */
function checkpointInMemory(ctx: SyscallCtx, pid: number, procs0: number[], f: number, out: number, keep: boolean, crid?: number): number {
  const { tracer, caller, sv } = ctx;
  try {
    sv.store.reapHandles();
    if (keep && sv.store.all.size >= sv.store.max) throw new CkptError(errno('EAGAIN'), 'checkpoint', `${sv.store.all.size} in-memory checkpoints already live (--max-checkpoints ${sv.store.max})`);
    // Tracking is for rollback: not after CKPT_KILL. Who is tracked already
    // is looked up now, not in the freeze window (it reads /proc).
    const track = keep && sv.options.trackDirty && !(f & CKPT.KILL);
    const tracked = new Set(track ? procs0.filter((p) => sv.store.tracker(p)) : []);
    const others = outsideHolders(tracer, procs0);
    const freeze = new Freeze(tracer);
    const t0 = performance.now();
    const ph = new Phases();
    let procs = procs0;
    let cap;
    try {
      procs = freezeSubtree(freeze, tracer, caller, pid, procs);
      ph.mark('freeze');
      cap = captureTree(tracer, pid, procs, caller, sv.options.outsideFds, others, { track: (p) => track && !tracked.has(p) }, ph);
    } catch (e) {
      freeze.thaw();
      throw e;
    }
    if (f & CKPT.KILL) {
      for (const p of procs) sys.kill(p, 9);
      freeze.tasks.length = 0;
    } else freeze.thaw();
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
    try {
      for (const p of c.tree.processes) {
        const husk = c.husks.get(p.ids.pid)!;
        finishHusk(tracer, husk, (r) => captureProcessWide(r, p, readStatus(husk), (tid) => tid)); // ids already as seen inside
        const mem = captureMemory(husk);
        const held = cap.held.get(p.ids.pid);
        p.memory = [...mem.vmas, ...(held?.vmas ?? [])].sort((a, b) => (BigInt(a.start) < BigInt(b.start) ? -1 : 1));
        c.memory.set(p.ids.pid, mem);
        if (held?.runs.length) c.held.set(p.ids.pid, held.runs);
      }
    } catch (e) {
      destroyHusks(tracer, c.husks, c.hostOf); // nothing is kept
      for (const fd of cap.uffds.values()) fs.closeSync(fd);
      throw e;
    }
    if (!keep) {
      try {
        writeImage(c, out);
      } finally {
        destroyHusks(tracer, c.husks, c.hostOf);
      }
      log.syscall('checkpoint %d of %d to a file: stopped %s ms, image %s ms', c.crid, pid, stopMs.toFixed(2), (performance.now() - t0 - stopMs).toFixed(2));
      return c.crid;
    }
    c.privateBytes = Buffer.byteLength(JSON.stringify(c.tree)) + cap.shm.bytes() + [...c.held.values()].flat().reduce((n, r) => n + r.data.length, 0);
    sv.store.add(c);
    // Protecting every page costs ~35 ms per GiB the first time: after the caller has its answer.
    // (After CKPT_KILL there is nothing to track: no userfaultfd was made.)
    if (!(f & CKPT.KILL)) sv.later(() => sv.store.track(c, cap.uffds));
    log.syscall('checkpoint %d of %d in memory: stopped %s ms, %d husks', c.crid, pid, stopMs.toFixed(2), c.husks.size);
    if (out >= 0) {
      try {
        writeImage(c, out);
      } catch (e) {
        sv.store.release(c);
        throw e;
      }
      c.writtenBack = true;
    }
    if (f & CKPT.HANDLE) return makeHandle(ctx, c);
    return c.crid;
  } finally {
    if (out >= 0) fs.closeSync(out);
  }
}

/** The image of an in-memory checkpoint, its pages read from the husks (sharing kept). */
export function writeImage(c: MemCheckpoint, out: number): void {
  const w = new ImageWriter(new FdSink(out));
  const husk0 = c.husks.get(c.tree.root)!;
  w.header({ version: FORMAT_VERSION, arch: ARCH, pageSize: PAGE_SIZE, crid: c.crid, kernel: os.release(), created: c.created, vdso: vdsoInfo(husk0) });
  w.json(REC.TREE, c.tree);
  writeShm(w, c.shmData);
  for (const p of c.tree.processes) {
    w.json(REC.MEMORY, { pid: p.ids.pid });
    writePages(c.husks.get(p.ids.pid)!, c.memory.get(p.ids.pid)!, w, false);
    for (const r of c.held.get(p.ids.pid) ?? []) w.pages(r.addr, r.data);
  }
  w.trailer();
}

function writeShm(w: ImageWriter, data: ShmData): void {
  for (const [key, runs] of data) for (const r of runs) w.shm(key, r.offset, r.data);
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
