/**
 * Rollback: restart(crid) while the checkpointed subtree still lives. The
 * processes are brought back to the checkpoint in place, with their pids
 * and the root's parent unchanged: processes created since are killed,
 * processes that exited since are made again, threads likewise; memory is
 * put back from the husks, copying only the pages that changed: those the
 * dirty tracker reports written (dirty.ts), or, where it cannot vouch,
 * those whose frame is no longer the husk's (copy-on-write); signals queued
 * since are dropped and the checkpoint's queued again.
 *
 * Everything that can be checked is checked before anything changes; after
 * that point a failure kills the subtree rather than leave it half-restored.
 */
import { CkptError, errno } from '../lib/errors.js';
import { sys, SYS } from '../lib/libc.js';
import { readMaps, readSmaps, readStat, listTids, type MapEntry } from '../lib/proc.js';
import { normalize, union, intersect, subtract, asRanges, runBytes, type Runs } from '../lib/runs.js';
import { frameDiff, huskOwn, withPagemap, type DirtyTracker } from './resources/dirty.js';
import { log, Phases } from '../lib/log.js';
import { Freeze, subtree } from '../supervisor/freeze.js';
import { viewPid, pidsInUse } from '../supervisor/pidns.js';
import { Remote, CallBatch } from '../supervisor/remote.js';
import type { Tracer } from '../supervisor/tracer.js';
import { NO_RETURN, type HandlerResult, type SyscallCtx } from './context.js';
import type { ProcessState } from './state.js';
import { checkMappedFilesThere, fillPages, pickGadget, installGadget, GADGET_SIZE, mapVmas, placeSpecials, vmaStart, vmaEnd, needsVmFlags, sameVmFlags, type VmaState, type MemoryCapture } from './resources/memory.js';
import { restoreFiles, checkPathsThere } from './resources/files.js';
import { checkPeerCreds } from './resources/unixsock.js';
import { TtyRestore } from './resources/tty.js';
import { checkNetRights, checkNetPortsFree, firstHolder } from './resources/netdgram.js';
import { dropRseq } from './resources/thread.js';
import { checkLocksFree } from './resources/locks.js';
import { ShmRestore } from './resources/shm.js';
import { makeShells, makeZombies, setGroups, makeZombie, finishProcess, runShells, copyFromHusk, copyChangedFromHusk, openShell, putBackFromHusk, type Shell } from './rebuild.js';
import { dropAio } from './resources/aio.js';
import { checkNotifyPaths } from './resources/notify.js';
import type { MemCheckpoint } from './memckpt.js';
import { checkRollbackAttrs } from './resources/attrs.js';
import { checkSeccompRollback } from './resources/seccomp.js';
import { tablesToRemake } from './resources/fdkinds.js';
import { SysvRestore, type SysvRollback } from './resources/sysvipc.js';
import { checkTcpRollback, unlockTcpRollback } from './resources/tcp.js';

const SIGKILL = 9, WALL = 0x40000000, MADV_DONTNEED = 4, SYS_exit = 60;
const SPECIAL = ['[vvar]', '[vvar_vclock]', '[vdso]'];

/** Is host pid `pid` the very process the checkpoint was taken from (not a reuse of its pid)? */
function sameProcess(pid: number, p: ProcessState): boolean {
  try {
    const st = readStat(pid);
    return st.field(22) === p.ids.starttime && st.field(3) !== 'Z';
  } catch {
    return false;
  }
}

/** The checkpoint's root still runs: restart means rollback. */
export function treeAlive(c: MemCheckpoint): boolean {
  const host = c.hostOf(c.tree.root);
  return (!c.tree.pidns || host !== c.tree.root) && sameProcess(host, c.tree.processes[0]);
}


export function rollback(ctx: SyscallCtx, c: MemCheckpoint): HandlerResult {
  const { tracer, caller } = ctx;
  const tree = c.tree;
  // The tree's pids are the host's, or, for a tree in a pid namespace below
  // ours, the namespace's: `host` and `ns` go between the two.
  const host = (pid: number) => c.hostOf(pid);
  const root = host(tree.root);
  const ns = tree.nsView ? (h: number) => viewPid(root, h) : (h: number) => h;
  const ph = new Phases();
  const freeze = new Freeze(tracer);
  let procs: number[];
  try {
    freeze.add(subtree(tracer, root));
    procs = subtree(tracer, root);
    freeze.add(procs);
  } catch (e) {
    freeze.thaw(); // a process in vfork, say: the subtree runs on as it was
    throw e;
  }

  // ---- checks: nothing has changed yet
  const alive = tree.processes.filter((p) => sameProcess(host(p.ids.pid), p));
  let remake: Set<number>;
  try {
    // A process whose parent exited since went to a reaper outside the
    // subtree: it was not frozen, and a live process cannot be given its
    // parent back.
    const gone = alive.find((p) => p.ids.pid !== tree.root && !procs.includes(host(p.ids.pid)));
    if (gone) throw new CkptError(errno('EOPNOTSUPP'), 'restart', `task ${host(gone.ids.pid)}: its parent ${gone.ids.ppid} exited since the checkpoint, so it left the subtree: a rollback cannot give it its parent back`);
    remake = tablesToRemake(tree, alive, host, caller.tgid); // sharers whose table is no longer the checkpoint's: made again
  } catch (e) {
    freeze.thaw();
    throw e;
  }
  const kept = alive.filter((p) => !remake.has(p.ids.pid));
  const keptPids = new Set(kept.map((p) => host(p.ids.pid)));
  const extra = procs.filter((p) => !keptPids.has(p));
  // A pid to make again must be free (or held by a process about to go), as the tree names it.
  const inUse = pidsInUse(tracer, root);
  const going = new Set(extra.flatMap((p) => tracer.threadsOf(p).map((t) => ns(t.tid))));
  const busy = (tid: number) => inUse(tid) && !going.has(tid);
  for (const p of tree.processes.filter((p) => !keptPids.has(host(p.ids.pid)))) {
    for (const t of p.threads) {
      if (busy(t.tid)) {
        freeze.thaw();
        throw new CkptError(errno('EBUSY'), 'restart', `pid ${t.tid} of checkpoint ${c.crid} is in use by a process outside its subtree`);
      }
    }
  }
  const callerInside = procs.includes(caller.tgid);
  let seccomp, ttys: TtyRestore;
  let ipc: SysvRollback | undefined;
  try {
    checkPathsThere(tree.files, tree.processes, host, c.crid);
    checkMappedFilesThere(tree.processes, host, c.crid);
    checkLocksFree(tree.files, new Set(procs), tree.processes.map((p) => host(p.ids.pid)));
    ttys = new TtyRestore(tree, { host, kept: keptPids, all: procs }); // ptys still open are used again
    checkNetRights(tree.files.descs, firstHolder(tree.processes), (pid) => (keptPids.has(host(pid)) ? host(pid) : undefined));
    checkNetPortsFree(tree.files.descs, procs);
    checkNotifyPaths(tree.files.descs);
    checkPeerCreds(tree.files, (pid) => (keptPids.has(host(pid)) ? host(pid) : undefined));
    ipc = SysvRestore.checkRollback(tracer, tree.sysvipc, procs);
    seccomp = checkSeccompRollback(tree.processes, (tid) => (keptPids.has(tracer.tasks.get(host(tid))?.tgid ?? -1) ? tracer.tasks.get(host(tid)) : undefined), c.crid);
  } catch (e) {
    freeze.thaw();
    throw e;
  }
  checkRollbackAttrs(tracer, kept, host, caller.tgid, () => {
    ttys.close();
    freeze.thaw();
  });
  try {
    checkTcpRollback(tree.files.descs, procs, c.crid); // last: it holds outside peers' packets until the restore
  } catch (e) {
    ttys.close();
    freeze.thaw();
    throw e;
  }
  ph.mark('freeze');

  const shells = new Map<number, Shell>();
  const shm = new ShmRestore(tree.shm);
  try {
    shm.fill(c.shmData);
    // Processes born since the checkpoint go (and are reaped).
    for (const p of extra) sys.kill(p, SIGKILL);
    for (const p of extra) tracer.waitGone(p);
    for (const p of kept) {
      const task = tracer.tasks.get(host(p.ids.pid))!;
      const sh = openShell(tracer, p, task, true);
      shells.set(p.ids.pid, sh);
      endExtraThreads(tracer, sh, ns);
    }
    for (const x of extra) reapExtra(tracer, shells, x, ns);
    const made: number[] = [];
    makeShells(tracer, tree, shells, undefined, made, { onSession: (r, pid, live) => ttys.session(r, pid, live) });
    const zombies = makeZombies(tracer, tree, shells, made, (pid) => {
      try {
        return readStat(host(pid)).field(3) === 'Z';
      } catch {
        return false;
      }
    });
    setGroups(tracer, tree, shells, zombies);
    for (const { z, task } of zombies) makeZombie(tracer, task, z);
    // SysV objects as at the checkpoint once the processes born since are gone, before any process attaches a segment again.
    ipc?.apply(shm, tracer, [...shells.values()].map((sh) => ({ tgid: sh.task.tgid, r: sh.remote, undo: sh.state.semUndo })));
    ph.mark('processes');
    let copied = 0;
    const remapped = new Set<number>(); // processes with mappings the tracker does not cover yet
    for (const sh of shells.values()) {
      if (sh.live) dropAio(sh.remote); // the contexts it has now go: the checkpoint's are made again (finishProcess)
      const husk = c.husks.get(sh.state.ids.pid)!;
      const mem = c.memory.get(sh.state.ids.pid)!;
      copied += sh.live ? rollbackMemory(sh, husk, mem, shm, c, ctx.sv.store.tracker(sh.task.tid), remapped, ph) : freshMemory(sh, husk, mem, shm);
      // What the husk cannot hold (MADV_DONTFORK) was mapped anew: fill it from the copy.
      for (const r of c.held.get(sh.state.ids.pid) ?? []) fillPages(sh.remote.mem, sh.state.memory, r.addr, r.data);
    }
    ph.mark('memory');
    restoreFiles({
      remote: (pid) => shells.get(pid)!.remote,
      host: (pid) => shells.get(pid)!.task.tid,
      table: tree.files,
      perProc: new Map(tree.processes.map((p) => [p.ids.pid, p.files])),
      order: tree.processes.map((p) => p.ids.pid),
      live: new Set(kept.map((p) => p.ids.pid)),
      shm,
      ttys,
    });
    ph.mark('files');
    for (const sh of shells.values()) finishProcess(tracer, sh, false);
    ipc?.finish(tracer, [...shells.values()].map((sh) => sh.task.tgid));
    ph.mark('threads');
    ctx.sv.store.rolledBack(c, remapped); // protect again what the copies wrote, before anything runs
    ph.mark('protect');
    log.syscall('rollback of checkpoint %d: %d kept, %d made, %d killed, %d bytes copied, %s', c.crid, kept.length, made.length, extra.length, copied, ph);
  } catch (e) {
    // Past the checks: never leave the subtree half-restored.
    unlockTcpRollback(tree.files.descs);
    for (const sh of shells.values()) sh.remote.mem.close();
    for (const p of subtree(tracer, root)) sys.kill(p, SIGKILL);
    sys.kill(root, SIGKILL);
    freeze.tasks.length = 0;
    throw e;
  } finally {
    shm.close();
    ttys.close();
  }
  freeze.tasks.length = 0; // resumed below with their checkpointed registers
  seccomp.end([...shells.values()].flatMap((sh) => [...sh.threads.values()].map((t) => t.tid))); // filters in force again, in clones of suspended tasks too
  runShells(tracer, shells.values());
  return callerInside ? NO_RETURN : viewPid(caller.tgid, root);
}


/** Threads born since the checkpoint end (exit, not a signal: that would end the process). */
function endExtraThreads(tracer: Tracer, sh: Shell, ns: (h: number) => number): void {
  const want = new Set(sh.state.threads.map((t) => t.tid));
  for (const tid of listTids(sh.task.tgid)) {
    const task = tracer.tasks.get(tid);
    if (!task) continue;
    if (want.has(ns(tid))) {
      sh.threads.set(ns(tid), task);
      continue;
    }
    new Remote(tracer, task).runToExit(SYS_exit, 0);
  }
}

/** A killed extra child is reaped in its parent, so the program never sees it. */
function reapExtra(tracer: Tracer, shells: Map<number, Shell>, pid: number, ns: (h: number) => number): void {
  let ppid: number, seen: number;
  try {
    ppid = Number(readStat(pid).field(4));
    seen = ns(pid);
  } catch {
    return;
  }
  const parent = [...shells.values()].find((sh) => sh.task.tgid === ppid);
  if (parent) parent.remote.call(SYS.wait4, seen, 0, WALL, 0);
  else tracer.wait(pid); // its parent died too: it is ours (subreaper)
}

/** A process made again during a rollback: full layout, all pages from its husk. */
function freshMemory(sh: Shell, husk: number, mem: MemoryCapture, shm: ShmRestore): number {
  const current = readMaps(sh.task.tid);
  sh.gadget = pickGadget(current, sh.state.memory);
  const r = sh.remote;
  installGadget(r, sh.gadget);
  // [vsyscall] cannot be unmapped (EINVAL) and is the same in every process.
  const keep = [sh.gadget, ...current.filter((m) => SPECIAL.includes(m.path) || m.path === '[vsyscall]').map((m) => m.start)];
  for (const m of current) if (!keep.includes(m.start)) r.check('restart:memory', SYS.munmap, m.start, m.end - m.start);
  placeSpecials(r, current, sh.state.memory, sh.task.tid);
  mapVmas(r, sh.state.memory.filter((v) => v.kind !== 'special'), shm);
  return copyFromHusk(sh, husk, mem);
}

const protOf = (perms: string) => (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);

/** Can current mapping `m` stand for (part of) checkpoint VMA `v` as it is? */
function compatible(m: MapEntry, v: VmaState): boolean {
  if (v.kind === 'shm' || v.dontfork || protOf(m.perms) !== v.prot || (m.perms[3] === 's') !== v.shared) return false;
  if (m.flags && !sameVmFlags(m.flags, v)) return false; // advice changed since (or guards): mapped again with the checkpoint's
  const file = m.path.startsWith('/') && m.path !== '/dev/zero';
  if (v.kind === 'anon') return !file && (m.path || undefined) === (v.name ?? undefined); // a name given or changed since: mapped again, named as at the checkpoint
  // The same file, at the same offset for the same address.
  return file && m.path === v.path && m.offset - m.start === BigInt(v.offset!) - vmaStart(v);
}

/** A part of a checkpoint VMA. */
interface Piece { v: VmaState; start: bigint; end: bigint }

/**
 * Split the checkpoint's VMAs by what the live process has there now: the
 * parts still mapped compatibly are kept (their pages get diffed), the rest
 * must be mapped again (and filled whole). Kernel merging or splitting of
 * neighbours since the checkpoint does not matter.
 */
function splitByCurrent(current: MapEntry[], vmas: VmaState[]): { kept: Piece[]; fresh: Piece[] } {
  const kept: Piece[] = [], fresh: Piece[] = [];
  for (const v of vmas) {
    let at = vmaStart(v);
    for (const m of current) {
      if (m.end <= vmaStart(v) || m.start >= vmaEnd(v)) continue;
      const s = m.start > at ? m.start : at, e = m.end < vmaEnd(v) ? m.end : vmaEnd(v);
      if (s > at) fresh.push({ v, start: at, end: s });
      (compatible(m, v) ? kept : fresh).push({ v, start: s, end: e });
      at = e;
    }
    if (at < vmaEnd(v)) fresh.push({ v, start: at, end: vmaEnd(v) });
  }
  return { kept, fresh };
}

/** The part [start, end) of a VMA, as a VMA of its own (file offset moved along). */
function pieceVma(p: Piece): VmaState {
  const hex = (x: bigint) => '0x' + x.toString(16);
  const offset = p.v.kind === 'file' || p.v.kind === 'shm' || p.v.kind === 'sysv' ? hex(BigInt(p.v.offset!) + (p.start - vmaStart(p.v))) : p.v.offset;
  return { ...p.v, start: hex(p.start), end: hex(p.end), offset };
}

type Run = { addr: bigint; len: number };

/** The runs of `runs` that fall in the pieces, clipped to them. */
function clip(runs: Run[], pieces: Piece[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const re = r.addr + BigInt(r.len);
    for (const p of pieces) {
      const s = r.addr > p.start ? r.addr : p.start, e = re < p.end ? re : p.end;
      if (s < e) out.push({ addr: s, len: Number(e - s) });
    }
  }
  return out;
}

/**
 * A live process's memory back to its husk's. In the parts still mapped as
 * at the checkpoint, only pages that changed are put back: those the dirty
 * tracker reports (see dirty.ts), or, where it cannot vouch, those whose
 * frame differs from the husk's; pages the checkpoint did not have are
 * dropped. Everything else is unmapped, and the checkpoint's other parts
 * are mapped again and filled whole. Returns the bytes copied.
 */
function rollbackMemory(sh: Shell, husk: number, mem: MemoryCapture, shm: ShmRestore, c: MemCheckpoint, tracker: DirtyTracker | undefined, remapped: Set<number>, ph: Phases): number {
  const pid = sh.task.tid;
  const r = sh.remote;
  const all = needsVmFlags(r.tracer.vmAdvice.has(sh.task.tgid), sh.state.memory) ? readSmaps(pid) : readMaps(pid); // VmFlags only where they may differ
  const current = all.filter((m) => !SPECIAL.includes(m.path) && m.path !== '[vsyscall]');
  sh.gadget = pickGadget(all, sh.state.memory);
  installGadget(r, sh.gadget);
  placeSpecials(r, all, sh.state.memory, pid);
  const { kept, fresh } = splitByCurrent(current, sh.state.memory.filter((v) => v.kind !== 'special'));
  log.restore('rollback %d: %d parts kept, %d mapped again', pid, kept.length, fresh.length);
  // The kernel writes a thread's rseq area on every return to user space: if
  // the leader's lies in a part about to be unmapped, it would get SIGSEGV
  // between the munmap and the mmap. Unregistered now, registered at the end.
  const rseq = sh.rseqKept.has(sh.state.ids.pid) ? BigInt(sh.state.threads.find((t) => t.tid === sh.state.ids.pid)?.rseq?.addr ?? 0) : 0n;
  if (rseq && !kept.some((p) => p.start <= rseq && rseq < p.end)) {
    dropRseq(r);
    sh.rseqKept.delete(sh.state.ids.pid);
  }
  // Unmap what lies outside the kept parts (munmap splits mappings as needed).
  const keepRanges = [...kept.map((p) => [p.start, p.end]), [sh.gadget, sh.gadget + GADGET_SIZE]].sort((x, y) => (x[0] < y[0] ? -1 : 1));
  const unmaps = new CallBatch(r);
  for (const m of current) {
    let at = m.start;
    for (const [ks, ke] of keepRanges) {
      if (ke <= at || ks >= m.end) continue;
      if (ks > at) unmaps.add('restart:memory munmap', SYS.munmap, at, ks - at);
      at = ke;
    }
    if (at < m.end) unmaps.add('restart:memory munmap', SYS.munmap, at, m.end - at);
  }
  unmaps.run();
  mapVmas(r, fresh.map(pieceVma), shm); // shared memory is always mapped anew, from its checkpoint contents
  let bytes = copyFromHusk(sh, husk, mem, clip(mem.runs, fresh));
  ph.mark('layout');

  const pieces = kept.filter((p) => !p.v.shared).map((p) => ({ range: [Number(p.start), Number(p.end)] as [number, number], anon: p.v.kind === 'anon', writable: (p.v.prot & 2) !== 0, v: p.v }));
  const dirty = tracker ? c.dirty.get(pid) : undefined;
  let copy: Runs = [], drop: Runs = [];
  const keptRuns: Runs = pieces.map((p) => p.range);
  let untracked = keptRuns;
  if (tracker && dirty) {
    const cand = tracker.candidates(keptRuns);
    ph.mark('scan');
    untracked = intersect(cand.untracked, keptRuns);
    const changed = subtract(intersect(union(dirty, cand.written), keptRuns), untracked);
    const own = normalize(pieces.flatMap((p) => intersect(huskOwn(husk, Number(vmaStart(p.v)), Number(vmaEnd(p.v)), p.anon, c.huskPages), [p.range])));
    copy = union(intersect(changed, own), intersect(cand.absent, own));
    drop = subtract(changed, own);
    ph.mark('sets');
    log.restore('rollback %d: tracked: %d written, %d absent, %d untracked, %d dirty before', pid, runBytes(cand.written), runBytes(cand.absent), runBytes(untracked), runBytes(dirty));
  }
  if (fresh.length || untracked.length) remapped.add(pid);
  // Where tracking cannot vouch (or there is none): compare page frames.
  if (untracked.length) {
    withPagemap(pid, (live) => {
      for (const p of pieces) {
        for (const [s, e] of intersect(untracked, [p.range])) {
          const d = frameDiff(live, husk, s, e, p.anon, c.huskPages);
          copy = union(copy, d.copy);
          drop = union(drop, d.drop);
        }
      }
    });
  }
  ph.mark('diff');
  const drops = new CallBatch(r);
  for (const [s, e] of drop) drops.add('restart:memory madvise', SYS.madvise, s, e - s, MADV_DONTNEED);
  drops.run();
  ph.mark('drop');
  const writable = normalize(pieces.filter((p) => p.writable).map((p) => p.range));
  bytes += putBackFromHusk(sh, husk, asRanges(intersect(copy, writable)), c.huskPorts);
  ph.mark('put back');
  bytes += copyChangedFromHusk(sh, husk, asRanges(subtract(copy, writable)));
  ph.mark('read-only');
  return bytes;
}

