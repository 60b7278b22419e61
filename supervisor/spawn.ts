/**
 * Start the root of a supervised tree. posix_spawn through FFI, never
 * child_process: libuv's SIGCHLD handler would waitpid our tracees and steal
 * their ptrace stops.
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { sys, errnoNow } from '../lib/libc.js';
import { CkptError } from '../lib/errors.js';
import { PT, PTRACE_O } from '../lib/ptrace.js';

const F_GETFD = 1, F_SETFD = 2, SIGCONT = 18;
export const TRACE_OPTIONS =
  PTRACE_O.TRACESECCOMP | PTRACE_O.TRACEFORK | PTRACE_O.TRACEVFORK | PTRACE_O.TRACECLONE |
  PTRACE_O.TRACEEXEC | PTRACE_O.TRACESYSGOOD | PTRACE_O.EXITKILL;

const sleep = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

function procState(pid: number): string {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2, s.lastIndexOf(')') + 3);
  } catch {
    return 'X';
  }
}

/** Spawn `prog args` under the launcher, seize it while stopped, and let it run. */
export function launch(prog: string, args: string[]): number {
  for (let fd = 0; fd <= 2; fd++) {
    const f = sys.fcntl(fd, F_GETFD);
    if (f >= 0) sys.fcntl(fd, F_SETFD, f & ~1);
  }
  const launcher = fileURLToPath(new URL('./launcher.js', import.meta.url));
  const env = Object.entries(process.env).map(([k, v]) => `${k}=${v}`);
  const pid = sys.posixSpawn(process.execPath, [process.execPath, launcher, prog, ...args], env);
  // The launcher is our child but not yet a tracee: watch /proc until it stops.
  for (let i = 0; ; i++) {
    const st = procState(pid);
    if (st === 'T') break;
    if (st === 'Z' || st === 'X' || i > 30000) throw new CkptError(10, 'launch', `launcher ${pid} did not stop (state ${st})`);
    sleep(1);
  }
  if (sys.ptrace(PT.SEIZE, pid, 0, TRACE_OPTIONS) === -1) {
    const e = errnoNow();
    sys.kill(pid, 9);
    throw new CkptError(e, 'PTRACE_SEIZE', `launcher ${pid}`);
  }
  sys.kill(pid, SIGCONT);
  return pid;
}
