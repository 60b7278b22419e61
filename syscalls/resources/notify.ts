/**
 * Notification groups: inotify and fanotify descriptors, kept as
 * /proc/PID/fdinfo describes them and made again with their own calls.
 *
 * - inotify: every watch ("inotify wd:.. ino:.. sdev:.. mask:.. f_handle:..")
 *   with its number and mask (IN_ONESHOT and IN_EXCL_UNLINK show in it;
 *   IN_MASK_ADD only ever changed the mask, which is what is kept). The
 *   watched inode is found by its file handle (open_by_handle_at, done by
 *   the supervisor at the checkpoint), so a file renamed since the watch was
 *   added is watched under its name of now. The watches are added again in
 *   the order of their numbers, each after INOTIFY_IOC_SETNEXTWD, so every
 *   one gets its number back; then the restored group's fdinfo is checked:
 *   each number must watch the inode it watched (a path that names another
 *   file by now fails the restart). A watched file that was deleted but is
 *   still open in the tree (a deleted file kept by files.ts) is watched
 *   again through that descriptor (/proc/self/fd/N): the same inode again
 *   to the program. A deleted watched file held open by nobody in the tree
 *   is refused.
 * - fanotify: the group's init flags and event_f_flags ("fanotify
 *   flags:.. event-flags:.."), and every mark: inode marks (by file handle,
 *   as above), mount marks (by mount id: its mount point) and filesystem
 *   marks (by device: a mount of it), each with its mask, ignore mask and
 *   mark flags (FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE,
 *   FAN_MARK_IGNORE). A mark asking for permission events is refused: a
 *   process may be blocked waiting for the group's answer, and the kernel
 *   shows neither those waiting nor those read but not answered.
 *
 * Events queued and not read yet at the checkpoint are not kept (neither
 * group shows them): the program reads only events that happen after.
 */
import fs from 'node:fs';
import { CkptError, errno, errnoName } from '../../lib/errors.js';
import { sys, addressOf, errnoNow } from '../../lib/libc.js';
import type { FdInfo } from '../../lib/proc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { z, int, u32, path, MANY, type Same } from '../../lib/schema.js';

const SYS_ioctl = 16, SYS_inotify_add_watch = 254, SYS_inotify_init1 = 294, SYS_fanotify_init = 300, SYS_fanotify_mark = 301, SYS_open_by_handle_at = 304;
const INOTIFY_IOC_SETNEXTWD = 0x40044900;
const IN_DONT_FOLLOW = 0x02000000, IN_CLOEXEC = 0o2000000;
const FAN_MARK_ADD = 1, FAN_MARK_DONT_FOLLOW = 4, FAN_MARK_MOUNT = 0x10, FAN_MARK_IGNORED_MASK = 0x20, FAN_MARK_IGNORED_SURV_MODIFY = 0x40, FAN_MARK_FILESYSTEM = 0x100, FAN_MARK_EVICTABLE = 0x200, FAN_MARK_IGNORE = 0x400;
/** FAN_OPEN_PERM, FAN_ACCESS_PERM, FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS: a process waits for the group's answer. */
const FAN_PERM_EVENTS = 0x10000 | 0x20000 | 0x40000 | 0x100000;
/** Mark flags fdinfo shows ("mflags"), and those a mark is added with again. */
const MARK_FLAGS = FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE | FAN_MARK_IGNORE;
const O_PATH = 0o10000000, O_CLOEXEC = 0o2000000, AT_FDCWD = -100;

/**
 * One inotify watch: its number, mask as fdinfo shows it, the inode (device
 * as stat() gives it, inode number) and where it is found again: a path
 * (`dontFollow`: the watch is on a symbolic link itself), or `desc`, a
 * deleted file's description in the tree (found after the descriptors).
 */
export interface InotifyWatch { wd: number; mask: number; dev: number; ino: number; path?: string; dontFollow?: boolean; desc?: number }
/** One fanotify mark; `path` names the inode, a path on the mount, or one on the filesystem. */
export interface FanotifyMark { on: 'inode' | 'mount' | 'fs'; path: string; mflags: number; mask: number; ignored: number; dev?: number; ino?: number; dontFollow?: boolean }

export type NotifyState =
  | { kind: 'inotify'; watches: InotifyWatch[] }
  | { kind: 'fanotify'; flags: number; eventFlags: number; marks: FanotifyMark[] };

const inoNum = int(0, Number.MAX_SAFE_INTEGER);
const watchSchema = z.strictObject({ wd: int(1, 2 ** 31 - 1), mask: u32, dev: u32, ino: inoNum, path: path.optional(), dontFollow: z.boolean().optional(), desc: int(0, MANY).optional() });
const markSchema = z.strictObject({ on: z.enum(['inode', 'mount', 'fs']), path, mflags: int(0, MARK_FLAGS), mask: u32, ignored: u32, dev: u32.optional(), ino: inoNum.optional(), dontFollow: z.boolean().optional() });
export const notifySchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('inotify'), watches: z.array(watchSchema).max(MANY) }),
  z.strictObject({ kind: z.literal('fanotify'), flags: u32, eventFlags: int(0, 0o77777777), marks: z.array(markSchema).max(MANY) }),
]);
type NtOf<K> = Extract<NotifyState, { kind: K }>;
type NtSchemaOf<K> = Extract<z.infer<typeof notifySchema>, { kind: K }>;
const sameNotify: [Same<NtSchemaOf<'inotify'>, NtOf<'inotify'>>, Same<NtSchemaOf<'fanotify'>, NtOf<'fanotify'>>, Same<z.infer<typeof watchSchema>, InotifyWatch>, Same<z.infer<typeof markSchema>, FanotifyMark>] = [true, true, true, true];
void sameNotify;

const unsupported = (pid: number, fd: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:notify', `task ${pid}: fd ${fd} (${what})`);

/** The kernel's dev_t (MAJOR << 20 | MINOR), as fdinfo prints it, in stat()'s encoding. */
const userDev = (k: number) => {
  const maj = Math.floor(k / 2 ** 20), min = k % 2 ** 20;
  return (min & 0xff) | (maj << 8) | ((min & ~0xff) << 12);
};

interface Mount { id: number; dev: number; root: string; point: string }

/** mountinfo paths escape space, tab, newline and backslash as \ooo. */
const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

function mountsOf(pid: number): Mount[] {
  return fs.readFileSync(`/proc/${pid}/mountinfo`, 'utf8').split('\n').filter(Boolean).map((l) => {
    const f = l.split(' ');
    const [maj, min] = f[2].split(':').map(Number);
    return { id: Number(f[0]), dev: (min & 0xff) | (maj << 8) | ((min & ~0xff) << 12), root: unescape(f[3]), point: unescape(f[4]) };
  });
}

/** "key:value" fields of one fdinfo mark line. */
function fields(line: string): Map<string, string> {
  return new Map([...line.matchAll(/([a-z_-]+):([0-9a-fA-F]+)/g)].map((m) => [m[1], m[2]]));
}

const hex = (kv: Map<string, string>, k: string) => parseInt(kv.get(k) ?? '0', 16);

/**
 * The inode a mark line names, found by its file handle through a mount of
 * its filesystem: its path now (checked to lead to that very inode), or
 * 'deleted' when it has no name left.
 */
function resolveHandle(pid: number, fd: number, mounts: Mount[], kv: Map<string, string>): { path: string; symlink: boolean; dev: number; ino: number } | { deleted: true; dev: number; ino: number } {
  const dev = userDev(hex(kv, 'sdev')), ino = hex(kv, 'ino');
  const what = `the watched inode ${ino} of device ${dev >> 8}:${dev & 0xff}`;
  const m = mounts.find((x) => x.dev === dev && x.root === '/') ?? mounts.find((x) => x.dev === dev);
  if (!m) throw unsupported(pid, fd, `${what} is on a filesystem not mounted where the process sees it`);
  const bytes = hex(kv, 'fhandle-bytes');
  const handle = Buffer.alloc(8 + bytes);
  handle.writeUInt32LE(bytes, 0);
  handle.writeInt32LE(hex(kv, 'fhandle-type'), 4);
  Buffer.from(kv.get('f_handle') ?? '', 'hex').copy(handle, 8);
  let mfd: number;
  try {
    mfd = fs.openSync(`/proc/${pid}/root${m.point}`, O_CLOEXEC); // not O_PATH: open_by_handle_at refuses one (EBADF)
  } catch (e) {
    throw unsupported(pid, fd, `${what}: its mount ${m.point} cannot be opened (${(e as Error).message})`);
  }
  try {
    const f = sys.syscall(SYS_open_by_handle_at, mfd, addressOf(handle), O_PATH | O_CLOEXEC);
    if (f < 0) throw unsupported(pid, fd, `${what} cannot be opened by its file handle: ${errnoName(errnoNow())}`);
    try {
      const st = fs.fstatSync(f);
      const link = fs.readlinkSync(`/proc/self/fd/${f}`);
      if (st.nlink === 0) return { deleted: true, dev, ino };
      // A handle may give a dentry cut off from the tree (its path would be wrong): the path must lead back to the inode.
      let back: fs.Stats | undefined;
      try {
        back = fs.lstatSync(link);
      } catch { /* below */ }
      if (!back || back.ino !== st.ino || back.dev !== st.dev) throw unsupported(pid, fd, `${what} has no path that leads to it (found as ${link})`);
      return { path: link, symlink: st.isSymbolicLink(), dev, ino };
    } finally {
      fs.closeSync(f);
    }
  } finally {
    fs.closeSync(mfd);
  }
}

/** The notification group at fd `fd` of `pid` (its /proc link says which kind), or undefined if it is none. */
export function captureNotify(pid: number, fd: number, target: string, info: FdInfo): NotifyState | undefined {
  if (target === 'anon_inode:inotify') {
    const mounts = mountsOf(pid);
    const watches: InotifyWatch[] = [];
    for (const m of info.text.matchAll(/^inotify (.*)$/gm)) {
      const kv = fields(m[1]);
      const at = resolveHandle(pid, fd, mounts, kv);
      const w: InotifyWatch = { wd: hex(kv, 'wd'), mask: hex(kv, 'mask') >>> 0, dev: at.dev, ino: at.ino };
      if ('path' in at) {
        w.path = at.path;
        if (at.symlink) w.dontFollow = true;
      }
      watches.push(w);
    }
    return { kind: 'inotify', watches: watches.sort((a, b) => a.wd - b.wd) };
  }
  if (target === 'anon_inode:[fanotify]') {
    const head = /^fanotify flags:([0-9a-f]+) event-flags:([0-9a-f]+)/m.exec(info.text);
    if (!head) throw unsupported(pid, fd, 'a fanotify group whose fdinfo cannot be read');
    const mounts = mountsOf(pid);
    const marks: FanotifyMark[] = [];
    for (const m of info.text.matchAll(/^fanotify (?!flags:)(.*)$/gm)) {
      const kv = fields(m[1]);
      const mark = { mflags: hex(kv, 'mflags') & MARK_FLAGS, mask: hex(kv, 'mask') >>> 0, ignored: hex(kv, 'ignored_mask') >>> 0 };
      if (mark.mask & FAN_PERM_EVENTS) throw unsupported(pid, fd, `a fanotify mark asking for permission events (mask 0x${mark.mask.toString(16)}): a process may be blocked waiting for an answer, which is not kept`);
      if (kv.has('mnt_id')) {
        const mnt = mounts.find((x) => x.id === hex(kv, 'mnt_id'));
        if (!mnt) throw unsupported(pid, fd, `a fanotify mark on mount ${hex(kv, 'mnt_id')}, not mounted where the process sees it`);
        marks.push({ on: 'mount', path: mnt.point, ...mark });
      } else if (kv.has('ino')) {
        const at = resolveHandle(pid, fd, mounts, kv);
        if (!('path' in at)) throw unsupported(pid, fd, `a fanotify mark on the deleted inode ${at.ino}`);
        marks.push({ on: 'inode', path: at.path, ...mark, dev: at.dev, ino: at.ino, ...(at.symlink ? { dontFollow: true } : {}) });
      } else if (kv.has('sdev')) {
        const dev = userDev(hex(kv, 'sdev'));
        const mnt = mounts.find((x) => x.dev === dev && x.root === '/') ?? mounts.find((x) => x.dev === dev);
        if (!mnt) throw unsupported(pid, fd, `a fanotify mark on filesystem ${dev >> 8}:${dev & 0xff}, not mounted where the process sees it`);
        marks.push({ on: 'fs', path: mnt.point, ...mark });
      } else throw unsupported(pid, fd, `a fanotify mark of a kind not kept: ${m[1]}`);
    }
    return { kind: 'fanotify', flags: parseInt(head[1], 16), eventFlags: parseInt(head[2], 16), marks };
  }
  return undefined;
}

/**
 * Watches on deleted files: the description of that very inode among the
 * tree's (`seen`: each description's first holder and its "dev:ino").
 * None: refused (nothing could name the inode again).
 */
export function findWatchedGhosts(descs: { id: number; kind: string; nt?: NotifyState }[], seen: { key: string; pid: number; fd: number; desc: number }[]): void {
  for (const d of descs) {
    if (d.kind !== 'notify' || d.nt?.kind !== 'inotify') continue;
    for (const w of d.nt.watches) {
      if (w.path !== undefined) continue;
      const holder = seen.find((s) => s.key === `${w.dev}:${w.ino}` && descs[s.desc]?.kind === 'ghost');
      if (!holder) {
        const at = seen.find((s) => s.desc === d.id)!;
        throw unsupported(at.pid, at.fd, `inotify watch ${w.wd} on the deleted inode ${w.ino}, which no process of the subtree holds open`);
      }
      w.desc = holder.desc;
    }
  }
}

/** Make the group in `r` (its marks come with addMarks, once every descriptor is back); its descriptor there. */
export function makeNotify(r: Remote, n: NotifyState): bigint {
  if (n.kind === 'inotify') return r.check('restart:notify inotify_init1', SYS_inotify_init1, IN_CLOEXEC);
  if (n.kind !== 'fanotify') throw new CkptError(errno('EBADMSG'), 'image', `a notification group of unknown kind ${(n as { kind: unknown }).kind}`);
  return r.check('restart:notify fanotify_init', SYS_fanotify_init, n.flags, n.eventFlags);
}

/**
 * The watches or marks of the group at `fd` of `r`. `fileOf(desc)`: a
 * descriptor of this process holding a deleted file's description, for a
 * watch on it (`done` is told when it is no longer needed).
 */
export function addMarks(r: Remote, fd: number, n: NotifyState, fileOf: (desc: number) => bigint, done: (f: bigint) => void): void {
  if (n.kind === 'inotify') return addWatches(r, fd, n.watches, fileOf, done);
  let b = new CallBatch(r);
  let room = 3500;
  for (const m of n.marks) {
    const p = Buffer.from(m.path + '\0');
    if (p.length > room) {
      b.run();
      b = new CallBatch(r);
      room = 3500;
    }
    room -= p.length + 16;
    const at = b.put(p);
    const type = (m.on === 'mount' ? FAN_MARK_MOUNT : m.on === 'fs' ? FAN_MARK_FILESYSTEM : 0) | (m.dontFollow ? FAN_MARK_DONT_FOLLOW : 0) | (m.mflags & FAN_MARK_EVICTABLE);
    const what = `restart:notify fanotify mark on ${m.on} ${m.path}`;
    if (m.mask) b.add(what, SYS_fanotify_mark, fd, FAN_MARK_ADD | type, m.mask, AT_FDCWD, at);
    if (m.ignored) b.add(`${what} (ignore mask)`, SYS_fanotify_mark, fd, FAN_MARK_ADD | type | (m.mflags & FAN_MARK_IGNORE ? FAN_MARK_IGNORE : FAN_MARK_IGNORED_MASK) | (m.mflags & FAN_MARK_IGNORED_SURV_MODIFY), m.ignored, AT_FDCWD, at);
  }
  b.run();
  checkInodes(r, fd, n.marks.filter((m) => m.on === 'inode').map((m) => ({ ino: m.ino!, dev: m.dev!, what: `fanotify mark on ${m.path}` })), /^fanotify ino:([0-9a-f]+) sdev:([0-9a-f]+)/gm, () => 0);
}

function addWatches(r: Remote, fd: number, watches: InotifyWatch[], fileOf: (desc: number) => bigint, done: (f: bigint) => void): void {
  const taken: bigint[] = [];
  let b = new CallBatch(r);
  let room = 3500, expect: InotifyWatch[] = [];
  const flush = () => {
    const res = b.run();
    // Pairs of (SETNEXTWD, add_watch): each add must give its number back.
    expect.forEach((w, i) => {
      const got = res[2 * i + 1];
      // A path this process may not read (EACCES): a watch it could not have made itself, EPERM.
      if (got !== BigInt(w.wd)) throw new CkptError(got === -BigInt(errno('EACCES')) ? errno('EPERM') : got < 0n ? Number(-got) : errno('EBUSY'), 'restart:notify', `task ${r.task.tid}: inotify watch ${w.wd} on ${w.path ?? `deleted inode ${w.ino}`}: ${got < 0n ? errnoName(Number(-got)) : `came back as watch ${got}`}`);
    });
    b = new CallBatch(r);
    room = 3500;
    expect = [];
  };
  for (const w of [...watches].sort((x, y) => x.wd - y.wd)) {
    let name = w.path;
    if (name === undefined) {
      if (w.desc === undefined) throw new CkptError(errno('EBADMSG'), 'image', `inotify watch ${w.wd} has neither a path nor a description`);
      const f = fileOf(w.desc);
      taken.push(f);
      name = `/proc/self/fd/${f}`;
    }
    const p = Buffer.from(name + '\0');
    if (p.length + 16 > room || expect.length >= 60) flush();
    room -= p.length + 16;
    b.add(undefined, SYS_ioctl, fd, INOTIFY_IOC_SETNEXTWD, w.wd);
    b.add(undefined, SYS_inotify_add_watch, fd, b.put(p), (w.mask | (w.dontFollow ? IN_DONT_FOLLOW : 0)) >>> 0);
    expect.push(w);
  }
  flush();
  for (const f of taken) done(f);
  checkInodes(r, fd, watches.filter((w) => w.desc === undefined).map((w) => ({ ino: w.ino, dev: w.dev, what: `inotify watch ${w.wd} on ${w.path ?? 'a deleted file'}`, wd: w.wd })), /^inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+)/gm, (m) => parseInt(m[1], 16));
}

/**
 * Each mark must be on the inode it was on at the checkpoint: a path that
 * names another file by now (replaced, or a different file system mounted
 * there) fails the restart rather than watch something else.
 */
function checkInodes(r: Remote, fd: number, want: { ino: number; dev: number; what: string; wd?: number }[], line: RegExp, wdOf: (m: RegExpMatchArray) => number): void {
  if (!want.length) return;
  const text = fs.readFileSync(`/proc/${r.task.tgid}/fdinfo/${fd}`, 'utf8');
  const have = [...text.matchAll(line)].map((m) => {
    const wd = wdOf(m), off = m.length === 4 ? 1 : 0;
    return { wd, ino: parseInt(m[1 + off], 16), dev: userDev(parseInt(m[2 + off], 16)) };
  });
  for (const w of want) {
    if (!have.some((h) => h.ino === w.ino && h.dev === w.dev && (w.wd === undefined || h.wd === w.wd))) {
      throw new CkptError(errno('ESTALE'), 'restart:notify', `task ${r.task.tid}: ${w.what}: that path leads to another file than at the checkpoint (inode ${w.ino})`);
    }
  }
}

/** One line for `ckpt inspect`. */
export function describeNotify(n: NotifyState): string {
  if (n.kind === 'inotify') return `inotify watching ${n.watches.map((w) => `${w.path ?? `deleted file (description ${w.desc})`} as ${w.wd} (mask 0x${w.mask.toString(16)})`).join(', ') || 'nothing'}`;
  return `fanotify (flags 0x${n.flags.toString(16)}, event flags 0${n.eventFlags.toString(8)}) marking ${n.marks.map((m) => `${m.on} ${m.path} (mask 0x${m.mask.toString(16)}, ignored 0x${m.ignored.toString(16)})`).join(', ') || 'nothing'}`;
}

/**
 * Before a rollback changes anything: every watched or marked path must
 * still lead to the inode it did at the checkpoint (a mount or filesystem
 * mark: its path must still be there), else the rollback is refused now
 * rather than fail half-way.
 */
export function checkNotifyPaths(descs: { kind: string; nt?: NotifyState }[]): void {
  for (const d of descs) {
    if (d.kind !== 'notify' || !d.nt) continue;
    const items = d.nt.kind === 'inotify'
      ? d.nt.watches.filter((w) => w.path !== undefined).map((w) => ({ path: w.path!, ino: w.ino, dev: w.dev, what: `inotify watch ${w.wd}` }))
      : d.nt.marks.map((m) => ({ path: m.path, ino: m.ino, dev: m.dev, what: `fanotify ${m.on} mark` }));
    for (const it of items) {
      let st: fs.Stats | undefined;
      try {
        st = fs.lstatSync(it.path);
      } catch { /* below */ }
      if (!st || (it.ino !== undefined && (st.ino !== it.ino || st.dev !== it.dev))) {
        throw new CkptError(errno(st ? 'ESTALE' : 'ENOENT'), 'restart:notify', `${it.what} on ${it.path}: ${st ? 'that path leads to another file than at the checkpoint' : 'no longer there'}`);
      }
    }
  }
}
