/**
 * checkpoint(pid, fd, flags): the orchestrator. The order of the stages lives
 * here and nowhere else: check the arguments, freeze, capture everything that
 * may fail (nothing written yet), write the image, thaw (or kill).
 */
import fs from 'node:fs';
import os from 'node:os';
import { CkptError, errno } from '../lib/errors.js';
import { sys } from '../lib/libc.js';
import { ImageWriter, REC, FORMAT_VERSION, ARCH, PAGE_SIZE } from '../lib/image.js';
import { FdSink } from '../lib/stream.js';
import { readStatus, listTids } from '../lib/proc.js';
import { Freeze, subtree } from '../supervisor/freeze.js';
import { Remote } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import { log } from '../lib/log.js';
import type { SyscallCtx } from './context.js';
import type { ProcessState } from './state.js';
import { captureMemory, writePages, vdsoInfo, type MemoryCapture } from './resources/memory.js';
import { captureThread, captureAltstack } from './resources/thread.js';
import { captureSignals } from './resources/signals.js';
import { captureFiles } from './resources/files.js';
import { captureIds, captureMm, parseCreds } from './resources/process.js';

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
  if (f & (CKPT.DEFER | CKPT.KEEP)) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint', 'in-memory checkpoints (CKPT_DEFER/CKPT_KEEP) are not available yet');

  const pid = pidArg === 0 ? caller.tgid : pidArg;
  const root = tracer.tasks.get(pid);
  if (pidArg < 0 || !root || root.tgid !== pid) throw new CkptError(errno('ESRCH'), 'checkpoint', `pid ${pidArg} is not a process of this supervised tree`);
  const procs = subtree(tracer, pid);
  checkPermission(caller.tgid, procs);
  const out = takeCallerFd(caller.tgid, fdArg, 'write', 'checkpoint');
  const crid = ctx.sv.newCrid();
  const freeze = new Freeze(tracer);
  try {
    const t0 = performance.now();
    freeze.add(procs);
    const t1 = performance.now();
    const captured = procs.map((p) => captureProcess(tracer, p, caller, procs, ctx.sv.options.outsideFds));
    const tc = performance.now();
    const w = new ImageWriter(new FdSink(out));
    w.header({ version: FORMAT_VERSION, arch: ARCH, pageSize: PAGE_SIZE, crid, kernel: os.release(), created: new Date().toISOString(), vdso: vdsoInfo(pid) });
    for (const c of captured) {
      w.json(REC.PROCESS, c.state);
      writePages(c.state.ids.pid, c.memory, w, true);
      w.record(REC.PROCESS_END);
    }
    w.trailer();
    const t2 = performance.now();
    log.syscall('checkpoint %d: freeze %s ms, capture %s ms, image %s ms', pid, (t1 - t0).toFixed(2), (tc - t1).toFixed(2), (t2 - tc).toFixed(2));
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

/** Capture one frozen process; everything that can refuse does so here. */
function captureProcess(tracer: Tracer, pid: number, caller: Task, procs: number[], outside: number[]): { state: ProcessState; memory: MemoryCapture } {
  const tids = listTids(pid);
  if (tids.length > 1) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:threads', `task ${pid}: has ${tids.length} threads; multi-threaded processes are not supported yet`);
  if (procs.length > 1) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:children', `task ${pid}: the subtree has ${procs.length} processes (${procs.join(', ')}); process trees are not supported yet`);
  const task = tracer.tasks.get(pid)!;
  const status = readStatus(pid);
  const thread = captureThread(pid, pid === caller.tid);
  const r = new Remote(tracer, task);
  let mm, signals;
  try {
    mm = captureMm(r, pid);
    signals = captureSignals(r, status);
    thread.altstack = captureAltstack(r);
  } finally {
    r.finish();
  }
  const memory = captureMemory(pid);
  const state: ProcessState = {
    ids: captureIds(pid),
    creds: parseCreds(status),
    mm,
    memory: memory.vmas,
    files: captureFiles(pid, outside, status),
    signals,
    threads: [thread],
  };
  return { state, memory };
}

/** ABI: a caller may checkpoint a task only if it could ptrace it. */
function checkPermission(callerPid: number, procs: number[]): void {
  const cs = readStatus(callerPid);
  const capEff = BigInt('0x' + (cs.get('CapEff') ?? '0'));
  if (capEff & (1n << CAP_SYS_PTRACE)) return;
  const ruid = parseCreds(cs).uid[0];
  for (const p of procs) {
    const uids = parseCreds(readStatus(p)).uid;
    if (uids.some((u) => u !== ruid)) throw new CkptError(errno('EPERM'), 'checkpoint', `task ${p}: uid ${uids.join('/')} differs from the caller's ${ruid} and the caller lacks CAP_SYS_PTRACE`);
  }
}
