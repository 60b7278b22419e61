/**
 * Start the root of a supervised tree.
 *
 * posix_spawn through FFI, never child_process: libuv's SIGCHLD handler
 * would waitpid our tracees and steal their ptrace stops. What is spawned is
 * a tiny shell that stops itself and then execs the program; while it is
 * stopped we seize it and inject, with remote syscalls, what the program must
 * inherit: NO_NEW_PRIVS, the seccomp filter, and default dispositions for the
 * signals Node ignores (ignored signals survive execve).
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { sys, errnoNow, SYS } from '../lib/libc.js';
import { CkptError, errno } from '../lib/errors.js';
import { PT, PTRACE_O } from '../lib/ptrace.js';
import { buildTrapFilter } from '../lib/seccomp.js';
import { NR_FIRST, NR_LAST } from '../syscalls/abi.js';
import { Remote } from './remote.js';
import type { Tracer, Task } from './tracer.js';

const F_GETFD = 1, F_SETFD = 2, SIGCONT = 18;
const PR_SET_NO_NEW_PRIVS = 38, PR_SET_SECCOMP = 22, SECCOMP_MODE_FILTER = 2;
/** Node sets these to SIG_IGN for itself; the program must not inherit that. */
const NODE_IGNORED = [13 /* SIGPIPE */, 25 /* SIGXFSZ */];

export const TRACE_OPTIONS =
  PTRACE_O.TRACESECCOMP | PTRACE_O.TRACEFORK | PTRACE_O.TRACEVFORK | PTRACE_O.TRACECLONE |
  PTRACE_O.TRACEEXEC | PTRACE_O.TRACESYSGOOD | PTRACE_O.EXITKILL;

const STOP_THEN_EXEC = 'kill -STOP $$; exec "$0" "$@"';
/** With a pid namespace: the shell stays, and its child (pid 1 there) is ckpt-init. */
const STOP_THEN_INIT = 'kill -STOP $$; "$0" "$@"';
const CLONE_NEWPID = 0x20000000, SYS_unshare = 272;

const sleep = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

function procState(pid: number): string {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return s[s.lastIndexOf(')') + 2];
  } catch {
    return 'X';
  }
}

/**
 * Spawn `prog args` as a tracee carrying the ckpt seccomp filter; returns
 * its pid. `pidns`: run it in a new pid namespace under ckpt-init (pid 1).
 */
export function launch(tracer: Tracer, prog: string, args: string[], pidns = false, beforeRun?: (launcher: Task) => void): number {
  for (let fd = 0; fd <= 2; fd++) {
    const f = sys.fcntl(fd, F_GETFD);
    if (f >= 0) sys.fcntl(fd, F_SETFD, f & ~1); // Node marks its stdio close-on-exec
  }
  const env = Object.entries(process.env).map(([k, v]) => `${k}=${v}`);
  const init = fileURLToPath(new URL('./ckpt-init', import.meta.url));
  const argv = pidns ? ['sh', '-c', STOP_THEN_INIT, init, prog, ...args] : ['sh', '-c', STOP_THEN_EXEC, prog, ...args];
  const pid = sys.posixSpawn('/bin/sh', argv, env);
  // Not a tracee yet, so not for the tracer's waitpid: watch /proc until it stops.
  for (let i = 0; procState(pid) !== 'T'; i++) {
    if ('ZX'.includes(procState(pid)) || i > 10000) throw new CkptError(errno('ECHILD'), 'launch', `shell ${pid} did not stop`);
    sleep(1);
  }
  if (sys.ptrace(PT.SEIZE, pid, 0, TRACE_OPTIONS) === -1) {
    const e = errnoNow();
    sys.kill(pid, 9);
    throw new CkptError(e, 'PTRACE_SEIZE', `shell ${pid}`);
  }
  const task = tracer.add(pid, pid);
  tracer.rootPid = pid;
  const ev = tracer.wait(pid); // seizing a stopped task makes it trap at once
  if (!ev || ev.kind !== 'stopped') throw new CkptError(errno('ECHILD'), 'launch', `shell ${pid} died`);
  const r = new Remote(tracer, task);
  try {
    const sigDefault = r.scratch(); // a zeroed struct sigaction is SIG_DFL
    r.mem.write(sigDefault, Buffer.alloc(32));
    for (const sig of NODE_IGNORED) r.check('launch', SYS.rt_sigaction, sig, sigDefault, 0, 8);
    r.check('launch', SYS.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    const filter = buildTrapFilter(NR_FIRST, NR_LAST);
    const fprog = Buffer.alloc(16);
    fprog.writeUInt16LE(filter.length / 8, 0);
    fprog.writeBigUInt64LE(r.scratch() + 64n, 8);
    r.mem.write(r.scratch(), fprog);
    r.mem.write(r.scratch() + 64n, filter);
    r.check('launch', SYS.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, r.scratch(), 0, 0);
  } finally {
    r.finish();
  }
  // Before the launcher's next child would be a new namespace's pid 1.
  beforeRun?.(task);
  if (pidns) {
    const u = new Remote(tracer, task);
    try {
      u.check('launch:pidns', SYS_unshare, CLONE_NEWPID);
    } finally {
      u.finish();
    }
  }
  sys.kill(pid, SIGCONT);
  tracer.resume(task);
  return pid;
}
