/**
 * restart(crid, fd, flags): the orchestrator of a restore.
 *
 * From an image (crid 0, fd) or from an in-memory checkpoint whose subtree
 * no longer exists: every process is rebuilt in a fresh shell with its
 * original pid as a child of its parent (the root of the caller):
 *   1. shells, sessions, process groups, zombies;
 *   2. memory: layout, then pages (from the image stream, whose trailer is
 *      checked before anything may run, or from the husks);
 *   3. files across the tree; 4. per process: mm, name, signals, threads,
 *      credentials, registers; 5. everything runs.
 * On any failure every shell is killed and reaped: no process is left.
 * A checkpoint whose subtree still lives is rolled back instead (rollback.ts).
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { REC, parseJson, splitPages, splitShm } from '../lib/image.js';
import { RecordQueue, asBuffer } from '../lib/imagejob.js';
import { readMaps, readStatus } from '../lib/proc.js';
import { Remote } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import { destroyShells } from '../supervisor/shells.js';
import { viewPid, pidsInUse } from '../supervisor/pidns.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import { InFlight, unwrap, type HandlerResult, type SyscallCtx } from './context.js';
import { validateTree, parseMemoryRecord, type TreeState, type ProcessState } from './state.js';
import { inheritsMemory, inheritedVmas, keepInherited, ownRuns } from './resources/cowshare.js';
import { int32 } from './checkpoint.js';
import { vdsoInfo, pickGadget, restoreLayout, fillPages } from './resources/memory.js';
import { restoreFiles } from './resources/files.js';
import { TtyRestore } from './resources/tty.js';
import { ShmRestore } from './resources/shm.js';
import { checkCreds, parseCreds } from './resources/process.js';
import { checkAttrs } from './resources/attrs.js';
import { makeShells, makeZombies, setGroups, makeZombie, finishProcess, runShells, copyFromHusk, allIds, type Shell } from './rebuild.js';
import { usableCheckpoint, type MemCheckpoint } from './memckpt.js';
import { rollback, treeAlive } from './rollback.js';
import { SysvRestore } from './resources/sysvipc.js';

export function restart(ctx: SyscallCtx): HandlerResult {
  const { tracer, caller } = ctx;
  const crid = BigInt.asIntN(64, ctx.args[0]);
  const fdArg = int32(ctx.args[1]);
  const flags = ctx.args[2];
  if (flags & ~BigInt(CKPT.HANDLE)) throw new CkptError(errno('EINVAL'), 'restart', `flags 0x${flags.toString(16)}: only CKPT_HANDLE is accepted`);
  if (flags || crid !== 0n) {
    if (crid < 0n || fdArg !== -1) throw new CkptError(errno('EINVAL'), 'restart', `crid ${crid} with fd ${fdArg}: an in-memory restart takes fd -1`);
    const c = usableCheckpoint(ctx, Number(crid), flags !== 0n);
    if (treeAlive(c)) return rollback(ctx, c);
    return restoreTree(tracer, caller, c.tree, (shells, shm, filled) => {
      shm.fill(c.shmData);
      fillFromHusks(c, shells, shm, filled);
    });
  }
  // The whole image is read, and its trailer checked, in flight
  // (supervisor/io.ts) before any process is made: its writer may be a
  // tracee, and with CKPT_KILL the pids it needs are free only once the
  // image is complete.
  const src = takeCallerFd(caller.tgid, fdArg, 'read', 'restart');
  return new InFlight({ kind: 'read', fd: src, vdso: vdsoInfo(caller.tgid) }, (o) => {
    fs.closeSync(src);
    const img = unwrap(o);
    const records = new RecordQueue(img.records.map((r) => ({ type: r.type, payload: asBuffer(r.payload) })));
    const tree = validateTree(parseJson<TreeState>(records.expect(REC.TREE).payload, 'TREE'));
    return restoreTree(tracer, caller, tree, (shells, shm, filled) => fillFromImage(tree, shells, records, shm, filled));
  });
}

/**
 * Rebuild `tree` as new processes under the caller; `fill` lays out and
 * fills memory, process by process in tree order, and says `filled(pid)`
 * after each: a child that shares pages with its parent is made then, as a
 * fork of it (cowshare.ts).
 */
export function restoreTree(tracer: Tracer, caller: Task, tree: TreeState, fill: (shells: Map<number, Shell>, shm: ShmRestore, filled: (pid: number) => void) => void): number {
  const callerCreds = parseCreds(readStatus(caller.tgid));
  const setCreds = new Map(tree.processes.map((p) => [p.ids.pid, checkCreds(p.creds, callerCreds, p.ids.pid)]));
  for (const p of tree.processes) checkAttrs(p, caller.tgid, false);
  // In a new pid namespace every pid is free; elsewhere each must be, in the caller's.
  const inUse = pidsInUse(tracer, caller.tgid);
  for (const id of tree.pidns ? [] : allIds(tree)) {
    if (inUse(id)) throw new CkptError(errno('EBUSY'), 'restart', `pid ${id} of the image is in use`);
  }
  const shells = new Map<number, Shell>();
  const made: number[] = [];
  const shm = new ShmRestore(tree.shm);
  const ttys = new TtyRestore(tree);
  let ipc: SysvRestore | undefined;
  try {
    ipc = SysvRestore.restore(tree.sysvipc, caller.tgid, callerCreds); // before any process: EPERM, EBUSY
    const done = new Set<number>();
    const opts = { ready: (p: ProcessState) => !inheritsMemory(p) || done.has(p.ids.ppid), onSession: (r: Remote, pid: number, live: boolean) => ttys.session(r, pid, live) };
    const callerRemote = new Remote(tracer, caller);
    try {
      makeShells(tracer, tree, shells, callerRemote, made, opts);
    } finally {
      callerRemote.finish();
    }
    fill(shells, shm, (pid) => {
      done.add(pid);
      if (tree.processes.some((c) => c.ids.ppid === pid && !shells.has(c.ids.pid))) makeShells(tracer, tree, shells, undefined, made, opts);
    });
    // Zombies after the memory: one may be the child of a process made late.
    const zombies = makeZombies(tracer, tree, shells, made, () => false);
    setGroups(tracer, tree, shells, zombies);
    for (const { z, task } of zombies) makeZombie(tracer, task, z);
    ipc?.fill(shm, tracer, [...shells.values()].map((sh) => ({ tgid: sh.task.tgid, r: sh.remote, undo: sh.state.semUndo })));
    restoreFiles({ remote: (pid) => shells.get(pid)!.remote, host: (pid) => shells.get(pid)!.task.tid, table: tree.files, perProc: new Map(tree.processes.map((p) => [p.ids.pid, p.files])), order: tree.processes.map((p) => p.ids.pid), shm, ttys });
    for (const sh of shells.values()) finishProcess(tracer, sh, setCreds.get(sh.state.ids.pid)!);
    ipc?.finish(tracer, [...shells.values()].map((sh) => sh.task.tgid));
  } catch (e) {
    ipc?.undo();
    for (const sh of shells.values()) sh.remote.mem.close();
    destroyShells(tracer, caller, made.length ? viewPid(caller.tgid, made[0]) : undefined, made.slice().reverse());
    throw e;
  } finally {
    shm.close();
    ttys.close();
  }
  runShells(tracer, shells.values());
  return viewPid(caller.tgid, shells.get(tree.root)!.task.tid);
}

/** Lay out a fresh shell's address space as the checkpoint's (mappings it inherits from its parent kept). */
function layout(sh: Shell, shm: ShmRestore): void {
  const current = readMaps(sh.task.tid);
  sh.gadget = pickGadget(current, sh.state.memory);
  const inherited = inheritedVmas(sh.state.memory);
  restoreLayout(sh.remote, current, sh.state.memory, sh.gadget, shm, inherited);
  if (inherited.length) keepInherited(sh.remote, current, inherited);
}

/** Address spaces, in the order the image streams them; then its trailer. */
function fillFromImage(tree: TreeState, shells: Map<number, Shell>, reader: RecordQueue, shm: ShmRestore, done: (pid: number) => void): void {
  let cur: Shell | undefined;
  const filled = new Set<number>();
  for (let rec = reader.next(); rec; rec = reader.next()) {
    if (rec.type === REC.MEMORY) {
      const { pid } = parseMemoryRecord(parseJson(rec.payload, 'MEMORY'));
      if (cur) done(cur.state.ids.pid);
      if (!filled.has(pid) && tree.processes.some((p) => p.ids.pid === pid) && !shells.has(pid)) throw new CkptError(errno('EBADMSG'), 'image', `memory of process ${pid} before its parent's, whose pages it shares`);
      cur = shells.get(pid);
      if (!cur || filled.has(pid)) throw new CkptError(errno('EBADMSG'), 'image', `memory of unknown or repeated process ${pid}`);
      filled.add(pid);
      layout(cur, shm);
    } else if (rec.type === REC.SHM) {
      if (cur) throw new CkptError(errno('EBADMSG'), 'image', 'shared memory data after process memory');
      const { key, offset, data } = splitShm(rec.payload);
      shm.write(key, offset, data);
    } else if (rec.type === REC.PAGES) {
      if (!cur) throw new CkptError(errno('EBADMSG'), 'image', 'page data before any MEMORY record');
      const { addr, data } = splitPages(rec.payload);
      fillPages(cur.remote.mem, cur.state.memory, addr, data);
    } else throw new CkptError(errno('EBADMSG'), 'image', `unexpected ${rec.type} record among the pages`);
  }
  if (cur) done(cur.state.ids.pid);
  const missing = tree.processes.find((p) => !filled.has(p.ids.pid));
  if (missing) throw new CkptError(errno('EBADMSG'), 'image', `no memory for process ${missing.ids.pid}`);
}

/** Address spaces from the husks of an in-memory checkpoint. */
function fillFromHusks(c: MemCheckpoint, shells: Map<number, Shell>, shm: ShmRestore, done: (pid: number) => void): void {
  for (const p of c.tree.processes) {
    const sh = shells.get(p.ids.pid)!;
    layout(sh, shm);
    const mem = c.memory.get(p.ids.pid)!;
    copyFromHusk(sh, c.husks.get(p.ids.pid)!, mem, ownRuns(p.memory, mem.runs));
    for (const r of c.held.get(p.ids.pid) ?? []) fillPages(sh.remote.mem, sh.state.memory, r.addr, r.data);
    done(p.ids.pid);
  }
}
