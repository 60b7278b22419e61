/**
 * Descriptor kinds and tree-wide descriptor checks that files.ts leaves to
 * this module:
 *
 * - Descriptor tables shared by two processes (clone CLONE_FILES without
 *   CLONE_THREAD): found with kcmp(KCMP_FILES) and refused (a restart makes
 *   every process its own table, so what one closed would stay open in the
 *   other).
 * - pidfds: kept when they name a process of the tree (or a zombie of it, or
 *   a thread leader with PIDFD_THREAD): made again with pidfd_open, injected
 *   once every process is back. A pidfd naming a process outside the subtree
 *   is refused: the image may be restarted when that process is gone and its
 *   pid reused, and a pidfd must never come back naming another process.
 * - Deleted directories (a cwd or a descriptor): a directory can only be
 *   removed empty, so one made again empty (mkdir, open or chdir, rmdir),
 *   with its mode, is the same to the program.
 * - Descriptors in flight (SCM_RIGHTS messages queued on a unix socket,
 *   fdinfo "scm_fds"): refused, naming the socket.
 * - Any other kind: refused with its kind named (perf_event, bpf-*,
 *   userfaultfd, namespaces...; io_uring with its reason, aio.ts).
 *   inotify and fanotify groups are kept by notify.ts.
 */
import { CkptError, errno } from '../../lib/errors.js';
import { sys } from '../../lib/libc.js';
import type { FdInfo } from '../../lib/proc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { nsPids } from '../../supervisor/pidns.js';
import fs from 'node:fs';

const SYS_kcmp = 312, KCMP_FILES = 2, SYS_pidfd_open = 434, SYS_mkdir = 83, SYS_rmdir = 84, SYS_chmod = 90, SYS_chdir = 80, SYS_openat = 257;
const O_NONBLOCK = 0o4000, O_EXCL = 0o200, O_CLOEXEC = 0o2000000, O_DIRECTORY = 0o200000, AT_FDCWD = -100;

const unsupported = (pid: number, fd: number | string, what: string) =>
  new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: ${typeof fd === 'number' ? `fd ${fd}` : fd} (${what})`);

/** What kind of descriptor a /proc fd link names, for a refusal: "anon_inode:inotify" -> "inotify". */
export function kindOf(target: string, st?: fs.Stats): string {
  if (target.startsWith('/') && st) {
    const type = st.isBlockDevice() ? 'block device' : st.isCharacterDevice() ? 'character device' : st.isSymbolicLink() ? 'symbolic link (O_PATH)' : st.isSocket() ? 'socket file (O_PATH)' : st.isDirectory() ? 'directory' : st.isFIFO() ? 'FIFO' : 'file';
    return `${type}${st.isBlockDevice() || st.isCharacterDevice() ? ` ${st.rdev >> 8}:${st.rdev & 0xff}` : ''}`;
  }
  const m = /^anon_inode:\[?([^\]]+)\]?$/.exec(target) ?? /^([a-z_]+):\[/.exec(target);
  return m ? (/^anon_inode:/.test(target) ? m[1] : `namespace or ${m[1]} file`) : target;
}

/** The refusal of a kind of descriptor nothing keeps yet. */
export const unknownKind = (pid: number, fd: number, target: string, st?: fs.Stats) =>
  unsupported(pid, fd, `${target}: a descriptor of kind ${kindOf(target, st)}, not supported yet`);

/**
 * Character devices whose open files hold no state a new open would not
 * have: the memory devices (null, zero, full, random, urandom, kmsg...),
 * terminals and the slave ends of ptys, and /dev/tty. Any other (a pty
 * master, tun, fuse, kvm, userfaultfd, sound, input...) would come back as
 * a fresh open of something else: refused.
 */
export function statelessDevice(st: fs.Stats): boolean {
  const major = st.rdev >> 8, minor = st.rdev & 0xff;
  return major === 1 || major === 4 || (major === 5 && minor !== 2) || (major >= 136 && major <= 143);
}

/**
 * Refuse processes of the tree that share one descriptor table (threads of
 * one process are one entry of `procs`). kcmp orders the tables, so a sort
 * puts sharers side by side.
 */
export function refuseSharedTables(procs: number[]): void {
  const cmp = (a: number, b: number) => {
    const r = sys.syscall(SYS_kcmp, a, b, KCMP_FILES, 0, 0);
    return r === 1 ? -1 : r === 2 ? 1 : 0; // -1 (a task gone): keep the order
  };
  const sorted = [...procs].sort(cmp);
  for (let i = 1; i < sorted.length; i++) {
    if (sys.syscall(SYS_kcmp, sorted[i - 1], sorted[i], KCMP_FILES, 0, 0) === 0) {
      throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${sorted[i]}: shares its descriptor table with process ${sorted[i - 1]} (clone CLONE_FILES without CLONE_THREAD): not supported`);
    }
  }
}

/** A unix socket with descriptors queued in SCM_RIGHTS messages: refused. */
export function refuseInFlight(pid: number, fd: number, target: string, info: FdInfo): void {
  const n = Number(info.extra.get('scm_fds') ?? 0);
  if (n > 0) throw unsupported(pid, fd, `${target}: ${n} descriptors in flight in SCM_RIGHTS messages queued on this unix socket`);
}

/** A pidfd as kept: the pid as the tree sees it (its namespace), PIDFD_NONBLOCK / PIDFD_THREAD in flags. */
export interface PidfdState { pid: number }

/**
 * The pidfd at fd of pid. `inTree` tells whether a host pid is a process of
 * the tree or a zombie of it; `level` is the depth of the tree's pid
 * namespace (the pids recorded are those seen there).
 */
export function capturePidfd(pid: number, fd: number, info: FdInfo, inTree: (hostPid: number) => boolean, level: number): PidfdState {
  const target = Number(info.extra.get('Pid') ?? -1);
  if (target <= 0) throw unsupported(pid, fd, `a pidfd of a process that has exited and been reaped`);
  if (!inTree(target)) {
    // A thread other than a leader: made after the descriptors, too late for pidfd_open.
    const tgid = /^Tgid:\s*(\d+)/m.exec(readOr(`/proc/${target}/status`))?.[1];
    if (tgid && tgid !== String(target) && inTree(Number(tgid))) throw unsupported(pid, fd, `a pidfd of thread ${target} of process ${tgid}: only pidfds of processes are kept`);
    throw unsupported(pid, fd, `a pidfd of process ${target}, outside the subtree: it could name another process after a restart`);
  }
  const ns = (info.extra.get('NSpid') ?? String(target)).trim().split(/\s+/).map(Number);
  const seen = ns[level];
  if (!seen) throw unsupported(pid, fd, `a pidfd of process ${target}, not visible in the tree's pid namespace`);
  return { pid: seen };
}

function readOr(path: string): string {
  try {
    return fs.readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** The pidfd made again in `r` (every process and zombie of the tree exists by then). */
export function makePidfd(r: Remote, p: PidfdState, flags: number): bigint {
  return r.check(`restart:files pidfd of ${p.pid}`, SYS_pidfd_open, p.pid, flags & (O_NONBLOCK | O_EXCL));
}

/** Is host pid `h` a process of `procs` (a leader) or a zombie child of one? */
export function treeMember(procs: Set<number>): (h: number) => boolean {
  return (h) => {
    if (procs.has(h)) return true;
    try {
      const s = fs.readFileSync(`/proc/${h}/stat`, 'utf8');
      const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
      return f[0] === 'Z' && procs.has(Number(f[1]));
    } catch {
      return false;
    }
  };
}

/** The depth of the pid namespace the tree's ids are recorded in (that of its root). */
export const nsLevel = (root: number) => nsPids(root).length - 1;

/** A directory that was removed: its path (without " (deleted)") and mode. */
export interface DeletedDir { path: string; mode: number }

/**
 * A deleted directory made again, empty, by the process itself: made under
 * a temporary name next to where it was (else in /tmp), opened (or made the
 * cwd), removed. Returns the descriptor, or -1n for a cwd.
 */
export function makeDeletedDir(r: Remote, d: DeletedDir, how: { open: number } | 'cwd'): bigint {
  let why: CkptError | undefined;
  const parent = d.path.slice(0, d.path.lastIndexOf('/')) || '/';
  for (const dir of [parent, '/tmp']) {
    const tmp = `${dir === '/' ? '' : dir}/.ckpt-deleted-${r.task.tid}-${Math.random().toString(36).slice(2, 10)}`;
    const b = new CallBatch(r);
    const p = b.put(Buffer.from(tmp + '\0'));
    b.add(undefined, SYS_mkdir, p, 0o700);
    b.add(undefined, SYS_chmod, p, d.mode & 0o7777); // as it was, whatever the umask
    if (how === 'cwd') b.add(undefined, SYS_chdir, p);
    else b.add(undefined, SYS_openat, AT_FDCWD, p, (how.open | O_DIRECTORY | O_CLOEXEC) & ~0o100, 0);
    b.add(undefined, SYS_rmdir, p);
    const [mk, ch, op, rm] = b.run();
    if (mk < 0n) {
      why ??= new CkptError(Number(-mk), 'restart:files', `task ${r.task.tid}: cannot make the deleted directory ${d.path} again in ${dir}`);
      continue;
    }
    if (ch < 0n || op < 0n || rm < 0n) {
      const e = [ch, op, rm].find((x) => x < 0n)!;
      throw new CkptError(Number(-e), 'restart:files', `task ${r.task.tid}: the deleted directory ${d.path} made again in ${dir}`);
    }
    return how === 'cwd' ? -1n : op;
  }
  throw why!;
}
