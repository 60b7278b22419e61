/**
 * restart(crid, fd, flags): the orchestrator. From an image: read and check
 * the header, then for the process: make a shell with the original pid as a
 * child of the caller, turn it into the checkpointed process stage by stage,
 * check the trailer, and only then let it run. On any failure the shell is
 * killed and reaped, so no process is left behind.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { sys, SYS, errnoNow } from '../lib/libc.js';
import { ImageReader, REC, parseJson, splitPages } from '../lib/image.js';
import { FdSource } from '../lib/stream.js';
import { readMaps, readStatus } from '../lib/proc.js';
import { Remote } from '../supervisor/remote.js';
import { takeCallerFd } from '../supervisor/callerfd.js';
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CKPT } from './abi.js';
import type { SyscallCtx } from './context.js';
import { validateProcess, type ProcessState } from './state.js';
import { int32 } from './checkpoint.js';
import { checkVdso, vdsoInfo, pickGadget, restoreLayout, fillPages } from './resources/memory.js';
import { unregisterRseq, restoreThreadSyscalls, restoreThreadRegs } from './resources/thread.js';
import { restoreSignals } from './resources/signals.js';
import { restoreFiles } from './resources/files.js';
import { restoreMm, restoreName, checkCreds, restoreCreds, parseCreds } from './resources/process.js';

const SIGCHLD = 17, SIGKILL = 9, WALL = 0x40000000;

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
    const state = validateProcess(parseJson<ProcessState>(reader.expect(REC.PROCESS).payload, 'PROCESS'));
    const pid = state.ids.pid;
    if (sys.kill(pid, 0) === 0 || errnoNow() === errno('EPERM')) {
      throw new CkptError(errno('EBUSY'), 'restart', `pid ${pid} of the image is in use`);
    }
    const setCreds = checkCreds(state.creds, parseCreds(readStatus(caller.tgid)), pid);
    const shell = createShell(tracer, caller, pid);
    try {
      buildProcess(tracer, shell, state, reader, setCreds);
      const more = reader.next();
      if (more) throw new CkptError(errno('EOPNOTSUPP'), 'restart', `image holds more than one process (record ${more.type}); process trees are not supported yet`);
    } catch (e) {
      destroyShell(tracer, caller, shell);
      throw e;
    }
    tracer.resume(shell);
    return pid;
  } finally {
    fs.closeSync(src);
  }
}

/** A child of the caller with the wanted pid: clone3 with set_tid, injected. */
function createShell(tracer: Tracer, caller: Task, pid: number): Task {
  const r = new Remote(tracer, caller);
  let child: number;
  try {
    const s = r.scratch();
    const args = Buffer.alloc(88); // struct clone_args
    args.writeBigUInt64LE(BigInt(SIGCHLD), 32); // exit_signal
    args.writeBigUInt64LE(s + 128n, 64); // set_tid
    args.writeBigUInt64LE(1n, 72); // set_tid_size
    r.mem.write(s, args);
    const tid = Buffer.alloc(8);
    tid.writeBigInt64LE(BigInt(pid));
    r.mem.write(s + 128n, tid);
    const res = r.call(SYS.clone3, s, args.length);
    if (res < 0n) {
      const e = Number(-res);
      if (e === errno('EEXIST')) throw new CkptError(errno('EBUSY'), 'restart', `pid ${pid} of the image is in use`);
      throw new CkptError(e, 'restart', `task ${caller.tid}: clone3 with set_tid ${pid} failed`);
    }
    child = Number(res);
  } finally {
    r.finish();
  }
  const t = tracer.add(child, child);
  for (;;) {
    const ev = tracer.wait(child);
    if (!ev || ev.kind !== 'stopped') throw new CkptError(errno('ESRCH'), 'restart', `new task ${child} died before it could be rebuilt`);
    if (ev.event !== 0 || ev.signal === 19 || ev.signal === 5) break;
    t.heldSignals.push(ev.signal);
    sys.ptrace(7, child, 0, 0);
  }
  t.heldSignals.length = 0;
  return t;
}

/** Turn a stopped shell into the process of `state`, reading its pages from the image. */
function buildProcess(tracer: Tracer, shell: Task, state: ProcessState, reader: ImageReader, setCreds: boolean): void {
  const r = new Remote(tracer, shell);
  try {
    unregisterRseq(r);
    const current = readMaps(shell.tid);
    const gadget = pickGadget(current, state.memory);
    restoreLayout(r, current, state.memory, gadget);
    for (;;) {
      const rec = reader.next();
      if (!rec) throw new CkptError(errno('EBADMSG'), 'image', 'stream ended inside a process');
      if (rec.type === REC.PROCESS_END) break;
      if (rec.type !== REC.PAGES) throw new CkptError(errno('EBADMSG'), 'image', `unexpected record ${rec.type} among pages`);
      const { addr, data } = splitPages(rec.payload);
      fillPages(r.mem, state.memory, addr, data);
    }
    restoreMm(r, state.mm);
    restoreName(r, state.ids.comm);
    restoreFiles(r, state.files);
    restoreSignals(r, state.signals);
    restoreThreadSyscalls(r, state.threads[0]);
    if (setCreds) restoreCreds(r, state.creds);
    // The gadget goes last; the step trap stops the task at that syscall's
    // exit, so it never runs another instruction there.
    r.check('restart:memory', SYS.munmap, gadget, 4096);
    restoreThreadRegs(shell.tid, state.threads[0]);
  } finally {
    r.mem.close();
  }
}

/** Kill a half-built shell and reap it in the caller, leaving no trace. */
function destroyShell(tracer: Tracer, caller: Task, shell: Task): void {
  sys.kill(shell.tid, SIGKILL);
  for (;;) {
    const ev = tracer.wait(shell.tid);
    if (!ev || ev.kind !== 'stopped') break;
    sys.ptrace(7, shell.tid, 0, 0);
  }
  const r = new Remote(tracer, caller);
  try {
    r.call(SYS.wait4, shell.tid, 0, WALL, 0);
  } finally {
    r.finish();
  }
  // The SIGCHLD for that child is ours, not the program's.
  caller.heldSignals = caller.heldSignals.filter((s) => s !== SIGCHLD);
}
