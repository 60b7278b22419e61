/**
 * restart(crid, fd, flags): the orchestrator. From an image:
 *   1. read and check the header and the TREE record;
 *   2. shells: every process with its original pid and parent, sessions
 *      and process groups; zombies exit with their status;
 *   3. memory: each process's address space, page data from the stream,
 *      whose trailer is checked before anything may run;
 *   4. files across the tree; 5. per process: mm, name, signals, threads,
 *      credentials; last the gadget goes and the registers are set;
 *   6. everything runs.
 * On any failure every shell is killed and reaped: no process is left.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { sys, SYS, errnoNow } from '../lib/libc.js';
import { ImageReader, REC, parseJson, splitPages } from '../lib/image.js';
import { FdSource } from '../lib/stream.js';
import { readMaps, readStatus, readStat } from '../lib/proc.js';
import { RemoteMem } from '../lib/mem.js';
import { Remote } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import { cloneWithTid, destroyShells, THREAD_FLAGS } from '../supervisor/shells.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import type { SyscallCtx } from './context.js';
import { validateTree, type ProcessState, type TreeState, type ZombieState } from './state.js';
import { int32 } from './checkpoint.js';
import { checkVdso, vdsoInfo, pickGadget, restoreLayout, fillPages } from './resources/memory.js';
import { unregisterRseq, restoreThreadSyscalls, restoreThreadRegs } from './resources/thread.js';
import { restoreSignals } from './resources/signals.js';
import { restoreFiles } from './resources/files.js';
import { restoreMm, restoreName, checkCreds, restoreCreds, parseCreds } from './resources/process.js';

/** One process being rebuilt. */
interface Shell {
  state: ProcessState;
  task: Task;
  remote: Remote;
  gadget?: bigint;
  threads: Map<number, Task>;
}

export function restart(ctx: SyscallCtx): number {
  const { tracer, caller } = ctx;
  const crid = BigInt.asIntN(64, ctx.args[0]);
  const fdArg = int32(ctx.args[1]);
  const flags = ctx.args[2];
  if (flags & ~BigInt(CKPT.HANDLE)) throw new CkptError(errno('EINVAL'), 'restart', `flags 0x${flags.toString(16)}: only CKPT_HANDLE is accepted`);
  if (flags || crid !== 0n) {
    if (crid < 0n || fdArg !== -1) throw new CkptError(errno('EINVAL'), 'restart', `crid ${crid} with fd ${fdArg}: an in-memory restart takes fd -1`);
    throw new CkptError(errno('ENOENT'), 'restart', `no in-memory checkpoint ${crid}`);
  }
  const src = takeCallerFd(caller.tgid, fdArg, 'read', 'restart');
  try {
    const reader = new ImageReader(new FdSource(src));
    const header = reader.header();
    checkVdso(header.vdso, vdsoInfo(caller.tgid));
    const tree = validateTree(parseJson<TreeState>(reader.expect(REC.TREE).payload, 'TREE'));
    return restoreTree(tracer, caller, tree, reader);
  } finally {
    fs.closeSync(src);
  }
}

function restoreTree(tracer: Tracer, caller: Task, tree: TreeState, reader: ImageReader): number {
  const callerCreds = parseCreds(readStatus(caller.tgid));
  const setCreds = new Map(tree.processes.map((p) => [p.ids.pid, checkCreds(p.creds, callerCreds, p.ids.pid)]));
  for (const id of allIds(tree)) {
    if (sys.kill(id, 0) === 0 || errnoNow() === errno('EPERM')) throw new CkptError(errno('EBUSY'), 'restart', `pid ${id} of the image is in use`);
  }
  const shells = new Map<number, Shell>();
  const made: number[] = [];
  try {
    makeShells(tracer, caller, tree, shells, made);
    fillMemory(tree, shells, reader);
    const remote = (pid: number) => shells.get(pid)!.remote;
    restoreFiles({ remote, table: tree.files, perProc: new Map(tree.processes.map((p) => [p.ids.pid, p.files])), order: tree.processes.map((p) => p.ids.pid) });
    for (const sh of shells.values()) finishProcess(tracer, sh, setCreds.get(sh.state.ids.pid)!);
  } catch (e) {
    for (const sh of shells.values()) sh.remote.mem.close();
    destroyShells(tracer, caller, made.length ? tree.root : undefined, made.slice().reverse());
    throw e;
  }
  for (const sh of shells.values()) {
    sh.remote.mem.close();
    for (const t of sh.threads.values()) tracer.resume(t);
  }
  return tree.root;
}

function allIds(tree: TreeState): number[] {
  return [...tree.processes.flatMap((p) => p.threads.map((t) => t.tid)), ...tree.zombies.map((z) => z.pid)];
}

/**
 * Every process as a child of its parent (the root of the caller), with its
 * pid; sessions set as each is born (children inherit them), then process
 * groups (leaders first), then the zombies die with their status.
 */
function makeShells(tracer: Tracer, caller: Task, tree: TreeState, shells: Map<number, Shell>, made: number[]): void {
  const callerRemote = new Remote(tracer, caller);
  try {
    const rootTask = cloneWithTid(tracer, callerRemote, tree.root, 0, callerRemote.scratch());
    made.push(tree.root);
    addShell(tracer, shells, tree.processes[0], rootTask);
  } finally {
    callerRemote.finish();
  }
  const zombies: { z: ZombieState; task: Task }[] = [];
  const ids = new Set(allIds(tree));
  for (const p of tree.processes) {
    const sh = shells.get(p.ids.pid)!;
    if (p.ids.sid === p.ids.pid) sh.remote.check('restart:session', SYS_setsid);
    for (const c of tree.processes.filter((c) => c.ids.ppid === p.ids.pid)) {
      const t = cloneWithTid(tracer, sh.remote, c.ids.pid, 0, sh.remote.scratch());
      made.push(c.ids.pid);
      addShell(tracer, shells, c, t);
    }
    for (const z of tree.zombies.filter((z) => z.ppid === p.ids.pid)) {
      zombies.push({ z, task: cloneWithTid(tracer, sh.remote, z.pid, 0, sh.remote.scratch()) });
      made.push(z.pid);
    }
  }
  const groups = [...tree.processes.map((p) => ({ pid: p.ids.pid, pgid: p.ids.pgid, r: shells.get(p.ids.pid)!.remote })),
    ...zombies.map(({ z, task }) => ({ pid: z.pid, pgid: z.pgid, r: undefined as Remote | undefined, task }))];
  groups.sort((a, b) => Number(b.pid === b.pgid) - Number(a.pid === a.pgid));
  for (const g of groups) {
    // A group outside the tree stays the one inherited from the caller; a
    // session leader already leads its group (and may not call setpgid).
    if (!ids.has(g.pgid) || Number(readStat(g.pid).field(5)) === g.pgid) continue;
    const r = g.r ?? new Remote(tracer, (g as { task: Task }).task);
    try {
      r.check('restart:pgid', SYS_setpgid, 0, g.pgid);
    } finally {
      if (!g.r) r.finish();
    }
  }
  for (const { z, task } of zombies) makeZombie(tracer, task, z, shells.get(z.ppid)!.task);
}

const SYS_setsid = 112, SYS_setpgid = 109, SYS_exit_group = 231, SIGCHLD = 17;

function addShell(tracer: Tracer, shells: Map<number, Shell>, state: ProcessState, task: Task): void {
  const remote = new Remote(tracer, task);
  unregisterRseq(remote);
  shells.set(state.ids.pid, { state, task, remote, threads: new Map([[task.tid, task]]) });
}

/**
 * Let a zombie shell die as the checkpointed child did. Its parent saw that
 * SIGCHLD before the checkpoint: it must not see it twice.
 */
function makeZombie(tracer: Tracer, task: Task, z: ZombieState, parent: Task): void {
  const r = new Remote(tracer, task);
  if ((z.status & 0x7f) === 0) r.runToExit(SYS_exit_group, (z.status >> 8) & 0xff);
  else {
    r.check('restart:zombie', SYS.rt_sigaction, z.status & 0x7f, r.scratch(), 0, 8); // scratch is zeroed: SIG_DFL
    r.runToExit(0, 0, z.status & 0x7f);
  }
  parent.heldSignals = parent.heldSignals.filter((s) => s !== SIGCHLD);
}

/** Address spaces, in the order the image streams them; then its trailer. */
function fillMemory(tree: TreeState, shells: Map<number, Shell>, reader: ImageReader): void {
  let cur: Shell | undefined;
  let mem: RemoteMem | undefined;
  const filled = new Set<number>();
  for (let rec = reader.next(); rec; rec = reader.next()) {
    if (rec.type === REC.MEMORY) {
      const { pid } = parseJson<{ pid: number }>(rec.payload, 'MEMORY');
      cur = shells.get(pid);
      if (!cur || filled.has(pid)) throw new CkptError(errno('EBADMSG'), 'image', `memory of unknown or repeated process ${pid}`);
      filled.add(pid);
      const current = readMaps(cur.task.tid);
      cur.gadget = pickGadget(current, cur.state.memory);
      restoreLayout(cur.remote, current, cur.state.memory, cur.gadget);
      mem = cur.remote.mem;
    } else if (rec.type === REC.PAGES) {
      if (!cur || !mem) throw new CkptError(errno('EBADMSG'), 'image', 'page data before any MEMORY record');
      const { addr, data } = splitPages(rec.payload);
      fillPages(mem, cur.state.memory, addr, data);
    } else throw new CkptError(errno('EBADMSG'), 'image', `unexpected ${rec.type} record among the pages`);
  }
  const missing = tree.processes.find((p) => !filled.has(p.ids.pid));
  if (missing) throw new CkptError(errno('EBADMSG'), 'image', `no memory for process ${missing.ids.pid}`);
}

/** Per-process state, the threads, and last the registers. */
function finishProcess(tracer: Tracer, sh: Shell, setCreds: boolean): void {
  const r = sh.remote;
  const p = sh.state;
  restoreMm(r, p.mm);
  restoreName(r, p.ids.comm);
  restoreSignals(r, p.signals);
  for (const t of p.threads) {
    if (t.tid === p.ids.pid) continue;
    const task = cloneWithTid(tracer, r, t.tid, THREAD_FLAGS, r.scratch());
    sh.threads.set(t.tid, task);
    const rt = new Remote(tracer, task);
    rt.setScratch(r.scratch());
    try {
      restoreThreadSyscalls(rt, t);
    } finally {
      rt.mem.close();
    }
  }
  restoreThreadSyscalls(r, p.threads.find((t) => t.tid === p.ids.pid)!);
  if (setCreds) restoreCreds(r, p.creds);
  // The gadget goes last; the step trap stops the task at that syscall's
  // exit, so it never runs another instruction there.
  r.check('restart:memory', SYS.munmap, sh.gadget!, 4096);
  for (const t of p.threads) restoreThreadRegs(t.tid, t);
}
