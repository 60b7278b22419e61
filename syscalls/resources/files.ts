/**
 * Descriptors, cwd and umask. Files are reopened by path at their offsets
 * and flags (their contents are not part of the checkpoint). A descriptor
 * that is the same open file as one the supervisor got from its own parent
 * (stdin, stdout, stderr) refers to something outside the tree: at restart
 * it is connected to the caller's descriptor of the same number.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { listFds, readFdinfo } from '../../lib/proc.js';
import { sys, SYS } from '../../lib/libc.js';
import type { Remote } from '../../supervisor/remote.js';
import { logError } from '../../lib/log.js';
import { openIn } from './memory.js';

const O_CLOEXEC = 0o2000000, O_CREAT = 0o100, O_EXCL = 0o200, O_TRUNC = 0o1000, O_NOCTTY = 0o400;
const F_SETFD = 2, SEEK_SET = 0;
const SYS_kcmp = 312, KCMP_FILE = 0;

export type FdState =
  | { fd: number; kind: 'outside'; cloexec: boolean }
  | { fd: number; kind: 'path'; path: string; flags: number; pos: string; cloexec: boolean }
  | { fd: number; kind: 'dup'; of: number; cloexec: boolean };

export interface FilesState {
  fds: FdState[];
  cwd: string;
  umask: number;
}

/**
 * The descriptors the supervisor was given by its own parent: read once at
 * start-up, before it opens anything of its own that a tracee could share.
 */
export function inheritedFds(): number[] {
  return listFds(process.pid);
}

/** Is `fd` of `pid` the very open file the supervisor holds as one of `outside`? */
function isOutside(pid: number, fd: number, outside: number[]): boolean {
  return outside.some((s) => sys.syscall(SYS_kcmp, process.pid, pid, KCMP_FILE, s, fd) === 0);
}

export function captureFiles(pid: number, outside: number[], status: Map<string, string>): FilesState {
  const fds: FdState[] = [];
  const seen: { fd: number; key: string }[] = [];
  for (const fd of listFds(pid)) {
    const link = `/proc/${pid}/fd/${fd}`;
    let target: string, st: fs.Stats;
    try {
      target = fs.readlinkSync(link);
      st = fs.statSync(link);
    } catch {
      continue; // closed meanwhile
    }
    const info = readFdinfo(pid, fd);
    const cloexec = (info.flags & O_CLOEXEC) !== 0;
    const key = `${st.dev}:${st.ino}`;
    // The same open file description under two numbers stays one.
    const twin = seen.find((s) => s.key === key && sys.syscall(SYS_kcmp, pid, pid, KCMP_FILE, s.fd, fd) === 0);
    seen.push({ fd, key });
    if (twin) fds.push({ fd, kind: 'dup', of: twin.fd, cloexec });
    else if (isOutside(pid, fd, outside)) fds.push({ fd, kind: 'outside', cloexec });
    else if ((st.isFile() || st.isDirectory() || st.isCharacterDevice()) && target.startsWith('/') && !target.endsWith(' (deleted)')) {
      fds.push({ fd, kind: 'path', path: target, flags: info.flags & ~O_CLOEXEC, pos: info.pos.toString(), cloexec });
    } else {
      throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (${target}) is of a kind not supported yet`);
    }
  }
  return {
    fds,
    cwd: fs.readlinkSync(`/proc/${pid}/cwd`),
    umask: parseInt(status.get('Umask') ?? '022', 8),
  };
}

export function restoreFiles(r: Remote, state: FilesState): void {
  const tid = r.task.tid;
  // The shell holds copies of the caller's descriptors: keep those that stand
  // for "outside" ones, close all the others.
  const keep = new Set(state.fds.filter((f) => f.kind === 'outside').map((f) => f.fd));
  for (const fd of listFds(tid)) if (!keep.has(fd)) r.call(SYS.close, fd);
  const absent = new Set([...keep].filter((fd) => !fs.existsSync(`/proc/${tid}/fd/${fd}`)));
  for (const fd of absent) {
    // Stray inherited descriptors are common (a shell's, a test runner's);
    // a missing one is left closed rather than failing the whole restart.
    logError(`task ${tid}: restart: fd ${fd} referred to something outside the tree and the caller has no fd ${fd}: left closed`);
  }
  for (const f of state.fds) {
    if (absent.has(f.fd) || (f.kind === 'dup' && absent.has(f.of))) continue;
    if (f.kind === 'path') {
      const tmp = openIn(r, f.path, f.flags & ~(O_CREAT | O_EXCL | O_TRUNC) | O_NOCTTY, 'restart:files');
      if (tmp !== BigInt(f.fd)) {
        r.check('restart:files', SYS.dup3, tmp, f.fd, f.cloexec ? O_CLOEXEC : 0);
        r.call(SYS.close, tmp);
      }
      const pos = BigInt(f.pos);
      if (pos) r.check('restart:files', SYS.lseek, f.fd, pos, SEEK_SET);
    } else if (f.kind === 'dup') {
      r.check('restart:files', SYS.dup3, f.of, f.fd, f.cloexec ? O_CLOEXEC : 0);
      continue;
    }
    r.check('restart:files', SYS.fcntl, f.fd, F_SETFD, f.cloexec ? 1 : 0);
  }
  const scratch = r.scratch();
  r.mem.write(scratch, Buffer.from(state.cwd + '\0'));
  const rc = r.call(SYS.chdir, scratch);
  if (rc < 0n) throw new CkptError(Number(-rc), 'restart:files', `task ${tid}: cannot chdir to ${state.cwd}`);
  r.call(SYS.umask, state.umask);
}
