/**
 * Descriptor kinds and tree-wide descriptor checks that files.ts leaves to
 * this module:
 *
 * - Descriptor tables shared by processes (clone CLONE_FILES without
 *   CLONE_THREAD): found with kcmp(KCMP_FILES). Kept when the sharers are a
 *   parent and its descendants (each one's parent shares the table too): the
 *   table is captured once, from its owner (the group's first process in
 *   tree order), and every other member records `files.filesOf` = the owner
 *   and no descriptors; a restart makes each member with clone CLONE_FILES
 *   from its parent, the owner's restore fills the one table and the
 *   others' restore leaves descriptors alone. Refused: a table shared with a
 *   process outside the subtree, or by processes not parent and child (a
 *   sibling made with CLONE_PARENT | CLONE_FILES...): no clone rebuilds it.
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
import { kcmp, sharingGroups, KCMP } from '../../lib/kcmp.js';
import { CkptError, errno } from '../../lib/errors.js';
import { SYS } from '../../lib/libc.js';
import type { FdInfo } from '../../lib/proc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { nsPids } from '../../supervisor/pidns.js';
import fs from 'node:fs';

const SYS_pidfd_open = 434, SYS_mkdir = 83, SYS_rmdir = 84, SYS_chmod = 90, SYS_chdir = 80, SYS_openat = 257, SYS_mknod = 133, SYS_unlink = 87, SYS_fchown = 93, SYS_fchmod = 91;
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

const CLONE_FILES = 0x400;
const kcmpFiles = (a: number, b: number) => kcmp(a, b, KCMP.FILES);

/**
 * Processes of a frozen tree (host pids, parents first; threads of one
 * process are one entry) that share a descriptor table: each sharer to the
 * owner of its table, the group's first process. `others`: the supervised
 * processes outside the subtree (sharing with one is refused); `ppid`: a
 * process's parent. kcmp orders the tables, so a sort puts sharers side by
 * side. A shape no clone CLONE_FILES from the parent can rebuild is refused.
 */
export function sharedTables(procs: number[], others: number[], ppid: (pid: number) => number): Map<number, number> {
  const out = new Map<number, number>();
  const inside = new Set(procs);
  const rank = new Map(procs.map((p, i) => [p, i]));
  for (const group of sharingGroups([...procs, ...others.filter((p) => !inside.has(p))], KCMP.FILES)) {
    const out1 = group.find((p) => !inside.has(p)), in1 = group.find((p) => inside.has(p));
    if (in1 === undefined) continue; // among processes outside: not ours
    if (out1 !== undefined) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${in1}: shares its descriptor table with process ${out1} outside the subtree (clone CLONE_FILES without CLONE_THREAD)`);
    group.sort((a, b) => rank.get(a)! - rank.get(b)!);
    const members = new Set(group);
    for (const p of group.slice(1)) {
      if (!members.has(ppid(p))) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${p}: shares its descriptor table with process ${group[0]} but its parent ${ppid(p)} does not (clone CLONE_FILES of a process that is not its parent): not supported`);
      out.set(p, group[0]);
    }
  }
  return out;
}

/** The clone flags that give a process made by its parent the table it had: its parent's, if it shared it. */
export const tableFlags = (files: { filesOf?: number }) => (files.filesOf !== undefined ? CLONE_FILES : 0);

/**
 * What a TREE record says about shared tables, checked (validateTree): a
 * sharer names a process before it that owns its table (shares no other's),
 * its parent uses that table too, and it lists no descriptors of its own.
 * Returns the problems, by process index.
 */
export function sharedTableIssues(ps: { ids: { pid: number; ppid: number }; files: { filesOf?: number; fds: unknown[] } }[]): { at: number; message: string }[] {
  const out: { at: number; message: string }[] = [];
  const index = new Map<number, number>();
  ps.forEach((p, i) => {
    index.set(p.ids.pid, i);
    const o = p.files.filesOf;
    if (o === undefined) return;
    const oi = index.get(o);
    const parent = ps[index.get(p.ids.ppid) ?? -1];
    if (oi === undefined || oi >= i) out.push({ at: i, message: `process ${p.ids.pid} uses the descriptor table of ${o}, not a process before it` });
    else if (ps[oi].files.filesOf !== undefined) out.push({ at: i, message: `process ${p.ids.pid} uses the descriptor table of ${o}, which uses another's` });
    else if (!parent || (parent.ids.pid !== o && parent.files.filesOf !== o)) out.push({ at: i, message: `process ${p.ids.pid} uses the descriptor table of ${o}, which its parent does not use` });
    else if (p.files.fds.length) out.push({ at: i, message: `process ${p.ids.pid} uses the descriptor table of ${o} and lists descriptors of its own` });
  });
  return out;
}

/**
 * Rollback, before anything changes: the kept processes (of `kept`, tree
 * pids; `host` gives the live pid) that no longer use the table the
 * checkpoint had them share, because one of them called
 * unshare(CLONE_FILES) or exec'd, or because the owner exited since. Such
 * a sharer is made again (killed, and cloned with CLONE_FILES by its
 * parent, as a process that exited since is), so that it shares its
 * parent's table again; its kept descendants with it (made again by it,
 * they keep their parent). Returned: the tree pids of those, to leave out
 * of the kept. Refused (EOPNOTSUPP, the tree untouched) when one of them
 * cannot simply be made again: it is the caller, or the parent of a zombie
 * of the checkpoint or of a kept process outside the tree's record (they
 * would lose their parent).
 */
export function tablesToRemake(tree: { zombies: { pid: number; ppid: number }[] }, kept: { ids: { pid: number; ppid: number }; files: { filesOf?: number } }[], host: (pid: number) => number, caller: number): Set<number> {
  const keptPids = new Set(kept.map((p) => p.ids.pid));
  const remake = new Set<number>();
  for (const p of kept) {
    const o = p.files.filesOf;
    if (o === undefined) continue;
    if (!keptPids.has(o) || kcmpFiles(host(p.ids.pid), host(o)) !== 0) remake.add(p.ids.pid);
  }
  for (const p of kept) if (remake.has(p.ids.ppid)) remake.add(p.ids.pid); // parents first: the closure in one pass
  const cause = new Map([...remake].map((pid) => [pid, kept.find((k) => k.ids.pid === pid)!]));
  const keptHosts = new Set([...keptPids].filter((p) => !remake.has(p)).map(host));
  for (const pid of remake) {
    const h = host(pid);
    const why = h === caller ? 'it is the caller'
      : tree.zombies.some((z) => z.ppid === pid) ? `it is the parent of zombie ${tree.zombies.find((z) => z.ppid === pid)!.pid} of the checkpoint`
      : childrenOf(h).find((c) => keptHosts.has(c)) !== undefined ? `it is the parent of process ${childrenOf(h).find((c) => keptHosts.has(c))}, kept`
      : '';
    const p = cause.get(pid)!;
    const what = remake.has(p.ids.ppid) ? `its parent ${host(p.ids.ppid)} is made again (it left a descriptor table shared at the checkpoint)` : `it no longer shares the descriptor table of process ${host(p.files.filesOf!)} as at the checkpoint (unshare(CLONE_FILES), exec, or that process exited)`;
    if (why) throw new CkptError(errno('EOPNOTSUPP'), 'restart:files', `task ${h}: ${what}, and it cannot be made again: ${why}`);
  }
  return remake;
}

/** The children of host process `pid` (every thread's). */
function childrenOf(pid: number): number[] {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).flatMap((t) => readOr(`/proc/${pid}/task/${t}/children`).trim().split(/\s+/).filter(Boolean).map(Number));
  } catch {
    return [];
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

/** A device node removed while open (one statelessDevice allows): its path, st_mode (type and permissions), device, owner. */
export interface DeletedDevice { path: string; mode: number; rdev: number; uid: number; gid: number }

const S_IFMT = 0o170000, S_IFCHR = 0o020000;

/**
 * A removed device node made again by the process itself (mknod: it needs
 * CAP_MKNOD, as making one does), under a temporary name next to where it
 * was (else in /tmp), opened with `flags`, removed; then its mode and owner
 * as they were. Only the devices a checkpoint keeps by path (no state of
 * their own) are made so: an image naming another is corrupt.
 */
export function makeDeletedDevice(r: Remote, d: DeletedDevice, flags: number): bigint {
  const dev = `${d.rdev >> 8}:${d.rdev & 0xff}`;
  if ((d.mode & S_IFMT) !== S_IFCHR || !statelessDevice({ rdev: d.rdev } as fs.Stats)) throw new CkptError(errno('EBADMSG'), 'image', `task ${r.task.tid}: deleted device ${d.path}: not one a checkpoint keeps (mode 0${d.mode.toString(8)}, device ${dev})`);
  const { res: [, op, rm], dir } = makeAside(r, d.path, `the deleted device ${d.path} (${dev})`, (b, p) => {
    b.add(undefined, SYS_mknod, p, S_IFCHR | 0o600, d.rdev);
    b.add(undefined, SYS_openat, AT_FDCWD, p, (flags | O_CLOEXEC) & ~0o100 & ~0o1000, 0);
    b.add(undefined, SYS_unlink, p);
  });
  if (op < 0n || rm < 0n) {
    if (op >= 0n) r.call(SYS.close, op);
    throw new CkptError(Number(-(op < 0n ? op : rm)), 'restart:files', `task ${r.task.tid}: the deleted device ${d.path} made again in ${dir}`);
  }
  const fix = new CallBatch(r);
  fix.add(`restart:files fchown of the deleted device ${d.path} to ${d.uid}:${d.gid}`, SYS_fchown, op, d.uid, d.gid);
  fix.add(`restart:files fchmod of the deleted device ${d.path}`, SYS_fchmod, op, d.mode & 0o7777);
  fix.run();
  return op;
}

/**
 * A removed thing made again by the process itself under a temporary name
 * next to where it was (else in /tmp): `calls` adds the call that makes it
 * (first), then those that use and remove it. Their results, and where;
 * one that cannot be made in either place fails with the first reason.
 */
function makeAside(r: Remote, path: string, what: string, calls: (b: CallBatch, at: bigint) => void): { res: bigint[]; dir: string } {
  let why: CkptError | undefined;
  const parent = path.slice(0, path.lastIndexOf('/')) || '/';
  for (const dir of [parent, '/tmp']) {
    const tmp = `${dir === '/' ? '' : dir}/.ckpt-deleted-${r.task.tid}-${Math.random().toString(36).slice(2, 10)}`;
    const b = new CallBatch(r);
    calls(b, b.put(Buffer.from(tmp + '\0')));
    const res = b.run();
    if (res[0] >= 0n) return { res, dir };
    why ??= new CkptError(Number(-res[0]), 'restart:files', `task ${r.task.tid}: cannot make ${what} again in ${dir}`);
  }
  throw why!;
}

/** A directory that was removed: its path (without " (deleted)") and mode. */
export interface DeletedDir { path: string; mode: number }

/**
 * A deleted directory made again, empty, by the process itself: made under
 * a temporary name next to where it was (else in /tmp), opened (or made the
 * cwd), removed. Returns the descriptor, or -1n for a cwd.
 */
export function makeDeletedDir(r: Remote, d: DeletedDir, how: { open: number } | 'cwd'): bigint {
  const { res: [, ch, op, rm], dir } = makeAside(r, d.path, `the deleted directory ${d.path}`, (b, p) => {
    b.add(undefined, SYS_mkdir, p, 0o700);
    b.add(undefined, SYS_chmod, p, d.mode & 0o7777); // as it was, whatever the umask
    if (how === 'cwd') b.add(undefined, SYS_chdir, p);
    else b.add(undefined, SYS_openat, AT_FDCWD, p, (how.open | O_DIRECTORY | O_CLOEXEC) & ~0o100, 0);
    b.add(undefined, SYS_rmdir, p);
  });
  if (ch < 0n || op < 0n || rm < 0n) {
    const e = [ch, op, rm].find((x) => x < 0n)!;
    throw new CkptError(Number(-e), 'restart:files', `task ${r.task.tid}: the deleted directory ${d.path} made again in ${dir}`);
  }
  return how === 'cwd' ? -1n : op;
}
