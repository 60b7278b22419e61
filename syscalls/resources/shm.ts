/**
 * Shared memory objects: MAP_SHARED anonymous memory and memfds (mapped, or
 * held as descriptors). fork does not snapshot them, so their contents are
 * always read during the stop (through /proc/PID/map_files or the fd), once
 * per object however many processes share it. At restart each object is
 * made again as a memfd in the supervisor, filled, and handed to every
 * process that maps or holds it, so they share it as before.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, SYS, errnoNow, addressOf as sysAddr } from '../../lib/libc.js';
import type { MapEntry } from '../../lib/proc.js';
import type { Remote } from '../../supervisor/remote.js';
import { viewPid } from '../../supervisor/pidns.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { openIn } from './memory.js';
import { z, int, type Same } from '../../lib/schema.js';

const O_RDWR = 2, O_CLOEXEC = 0o2000000;

export interface ShmObject {
  /** "dev:ino" of the shmem inode: how mappings and descriptors name it. */
  key: string;
  name: string;
  size: number;
  /** A memfd's permission bits (0..0o7777) and seals (F_GET_SEALS: 0..0x3f), set again once it is filled and handed out. */
  mode?: number;
  seals?: number;
}

export const shmObjectSchema = z.strictObject({
  key: z.string().min(1).max(64),
  name: z.string().max(4096),
  size: int(0, 2 ** 46),
  mode: int(0, 0o7777).optional(),
  seals: int(0, 0x3f).optional(),
});
const sameShm: Same<z.infer<typeof shmObjectSchema>, ShmObject> = true;
void sameShm;

/** Contents: the non-zero pages, by offset. */
export type ShmData = Map<string, { offset: number; data: Buffer }[]>;

const SYS_memfd_create = 319, MFD_CLOEXEC = 1, MFD_ALLOW_SEALING = 2, MFD_EXEC = 0x10;
const F_ADD_SEALS = 1033, F_GET_SEALS = 1034, F_SEAL_EXEC = 0x20;

/** Is this mapping (or fd target) a shmem object we keep (anonymous shared, memfd)? */
export function isShm(path: string): boolean {
  return path === '/dev/zero (deleted)' || (path.startsWith('/memfd:') && path.endsWith(' (deleted)'));
}

export const shmKeyOfMap = (m: MapEntry) => {
  const [maj, min] = m.dev.split(':').map((x) => parseInt(x, 16));
  return `${(maj << 8) | min}:${m.inode}`;
};

const SEEK_DATA = 3, SEEK_HOLE = 4;
/** Read at most this much in one buffer: runs are views into these buffers. */
const CHUNK = 8 << 20;
const ZERO_PAGE = Buffer.alloc(4096);

/**
 * The parts of an open object that hold data (tmpfs and most file systems
 * tell with SEEK_DATA/SEEK_HOLE), so that a large object with few pages
 * written costs only those pages. Our own descriptor: its offset is ours.
 */
function dataExtents(fd: number, size: number): [number, number][] {
  const out: [number, number][] = [];
  for (let at = 0; at < size; ) {
    const s = sys.syscall(SYS.lseek, fd, at, SEEK_DATA);
    if (s < 0) {
      if (errnoNow() === errno('ENXIO')) break; // no data after `at`
      return [[0, size]]; // cannot tell: all of it
    }
    const e = sys.syscall(SYS.lseek, fd, s, SEEK_HOLE);
    const end = e < 0 ? size : Math.min(e, size);
    if (end > s) out.push([s, end]);
    at = end;
  }
  return out;
}

/**
 * Read an object's data from any path that opens it. This runs while the
 * subtree is stopped, so each byte is copied once, straight into buffers
 * that are kept (a run that grew by concatenation copied the whole run
 * again for every page: quadratic). Zero pages among the data are left out
 * only when an image is written (nonZeroRuns), after the thaw.
 */
function readObject(path: string, memfd: boolean): { size: number; runs: { offset: number; data: Buffer }[]; mode?: number; seals?: number } {
  const fd = fs.openSync(path, 'r');
  try {
    const st = fs.fstatSync(fd);
    const size = st.size;
    const seals = memfd ? sys.fcntl(fd, F_GET_SEALS) : -1;
    const runs: { offset: number; data: Buffer }[] = [];
    for (const [s, e] of dataExtents(fd, size)) {
      for (let off = s; off < e; off += CHUNK) {
        const want = Math.min(CHUNK, e - off);
        const buf = Buffer.allocUnsafe(want);
        let n = 0;
        while (n < want) {
          const k = fs.readSync(fd, buf, n, want - n, off + n);
          if (k <= 0) break; // shrunk meanwhile (only a descriptor's holder could): no more data
          n += k;
        }
        if (n) runs.push({ offset: off, data: buf.subarray(0, n) });
        if (n < want) break;
      }
    }
    return memfd ? { size, runs, mode: st.mode & 0o7777, seals: seals >= 0 ? seals : undefined } : { size, runs };
  } finally {
    fs.closeSync(fd);
  }
}

/** The runs without their zero pages (views, nothing copied): what an image carries. */
export function* nonZeroRuns(runs: { offset: number; data: Buffer }[]): Generator<{ offset: number; data: Buffer }> {
  for (const r of runs) {
    let start = -1;
    for (let p = 0; p < r.data.length; p += 4096) {
      const q = Math.min(p + 4096, r.data.length);
      // A data page is told from a zero page at its first non-zero byte.
      const zero = r.data.subarray(p, q).equals(ZERO_PAGE.subarray(0, q - p));
      if (!zero && start < 0) start = p;
      if (zero && start >= 0) {
        yield { offset: r.offset + start, data: r.data.subarray(start, p) };
        start = -1;
      }
    }
    if (start >= 0) yield { offset: r.offset + start, data: r.data.subarray(start) };
  }
}

/**
 * The shared objects of a capture. Objects are noted as they are met
 * (mappings, descriptors) and read only by copy(), once every mapping and
 * descriptor of the subtree has been checked: a refusal comes before any
 * byte is copied.
 */
export class ShmCapture {
  readonly objects: ShmObject[] = [];
  readonly data: ShmData = new Map();
  private pending = new Map<string, { name: string; path: string }>();

  /** Note an object met through `path` (/proc/PID/map_files/... or /proc/PID/fd/N). */
  add(key: string, name: string, path: string): void {
    if (this.data.has(key) || this.pending.has(key)) return;
    this.pending.set(key, { name, path });
  }

  addMapping(pid: number, m: MapEntry): string {
    const key = shmKeyOfMap(m);
    this.add(key, m.path.replace(/ \(deleted\)$/, ''), `/proc/${pid}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`);
    return key;
  }

  /** Read every object noted (the subtree is still stopped). */
  copy(): void {
    for (const [key, { name, path }] of this.pending) {
      const { size, runs, mode, seals } = readObject(path, isMemfd(name));
      this.objects.push({ key, name, size, mode, seals });
      this.data.set(key, runs);
    }
    this.pending.clear();
  }

  bytes(): number {
    let n = 0;
    for (const runs of this.data.values()) for (const r of runs) n += r.data.length;
    return n;
  }
}

const isMemfd = (name: string) => name.startsWith('/memfd:');

/** The objects made again, as memfds of the supervisor. */
export class ShmRestore {
  private fds = new Map<string, number>();
  private sizes: Map<string, number>;
  constructor(private readonly objects: ShmObject[]) {
    this.sizes = new Map(objects.map((o) => [o.key, o.size]));
    for (const o of objects) {
      const name = Buffer.from(o.name.replace(/^\/memfd:/, '').slice(0, 200) + '\0');
      // A memfd that had seals gets them once filled (seal()), so it must allow them now.
      const flags = MFD_CLOEXEC | (o.seals !== undefined ? MFD_ALLOW_SEALING : 0) | ((o.mode ?? 0) & 0o111 ? MFD_EXEC : 0);
      let fd = sys.syscall(SYS_memfd_create, sysAddr(name), flags);
      if (fd < 0 && flags & MFD_EXEC) fd = sys.syscall(SYS_memfd_create, sysAddr(name), flags & ~MFD_EXEC); // before Linux 6.3
      if (fd < 0) throw new CkptError(errno('ENOMEM'), 'restart:shm', `cannot create a memfd for ${o.name}`);
      fs.ftruncateSync(fd, o.size);
      this.fds.set(o.key, fd);
    }
  }
  write(key: string, offset: number, data: Buffer): void {
    const fd = this.fds.get(key);
    if (fd === undefined) throw new CkptError(errno('EBADMSG'), 'image', `data for unknown shared object ${key}`);
    const size = this.sizes.get(key)!;
    if (offset % 4096 !== 0 || offset + data.length > size) throw new CkptError(errno('EBADMSG'), 'image', `data for shared object ${key} at ${offset}+${data.length}, outside its ${size} bytes`);
    let done = 0;
    while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, offset + done);
  }
  fill(data: ShmData): void {
    for (const [key, runs] of data) for (const r of runs) this.write(key, r.offset, r.data);
  }
  /** Copy the object's contents into descriptor `fd` of process `host` (a file made to hold them). */
  copyTo(key: string, host: number, fd: bigint): void {
    withTraceeFd(host, fd, 'restart:files', (mine) => {
      this.copyInto(key, mine);
      fs.ftruncateSync(mine, this.sizes.get(key)!); // holes at the end stay holes
    });
  }

  /** Copy the object's data into the supervisor's descriptor `dst` (same offsets; holes are skipped). */
  copyInto(key: string, dst: number): void {
    const src = this.fds.get(key);
    if (src === undefined) throw new CkptError(errno('EBADMSG'), 'image', `unknown shared object ${key}`);
    const size = fs.fstatSync(src).size;
    const buf = Buffer.allocUnsafe(1 << 20);
    // Only the data: what was never written (a sparse file's holes) stays a hole.
    for (let at = 0; at < size; ) {
      const data = sys.syscall(SYS.lseek, src, at, SEEK_DATA);
      if (data < 0) break; // ENXIO: nothing but a hole is left
      const hole = Math.min(size, Math.max(data + 1, sys.syscall(SYS.lseek, src, data, SEEK_HOLE)));
      for (let off = data; off < hole; ) {
        const n = fs.readSync(src, buf, 0, Math.min(buf.length, hole - off), off);
        if (n <= 0) break;
        for (let done = 0; done < n; ) done += fs.writeSync(dst, buf, done, n - done, off + done);
        off += n;
      }
      at = hole;
    }
  }

  /** The object as a descriptor of tracee `r` (>= minFd), from the supervisor's. */
  fdIn(r: Remote, key: string, minFd = 0): bigint {
    const mine = this.fds.get(key);
    if (mine === undefined) throw new CkptError(errno('EBADMSG'), 'image', `unknown shared object ${key}`);
    this.sealOnce(key);
    // takeFd hands the object over a socket where the tracee may not take
    // it (a live process of another uid, rolled back).
    if (viewPid(r.task.tgid, process.pid)) return r.takeFd(process.pid, mine, minFd);
    try {
      // In a pid namespace that cannot name the supervisor: open the same
      // object again through its /proc entry (procfs as mounted here is ours).
      return r.raise(openIn(r, `/proc/${process.pid}/fd/${mine}`, O_RDWR | O_CLOEXEC, 'restart:shm'), minFd);
    } catch (e) {
      if (!(e instanceof CkptError) || e.errno !== errno('EPERM')) throw e;
      return r.receiveFd(mine, minFd);
    }
  }
  /**
   * A memfd's seals, once its contents are written and before it is first
   * handed out: a write seal forbids writing it, and any shared mapping
   * made before (even a read-only one) would forbid the seal.
   */
  private sealOnce(key: string): void {
    if (this.sealed.has(key)) return;
    this.sealed.add(key);
    const o = this.objects.find((x) => x.key === key);
    if (!o?.seals) return;
    if (!Number.isInteger(o.seals) || o.seals < 0 || o.seals > 0xffff) throw new CkptError(errno('EBADMSG'), 'image', `shared object ${o.name}: seals ${o.seals}`);
    const fd = this.fds.get(key)!;
    // F_SEAL_EXEC freezes the execute bits: those are set before it (the rest of the mode comes in seal()).
    if (o.seals & F_SEAL_EXEC && o.mode !== undefined) fs.fchmodSync(fd, 0o666 | (o.mode & 0o111));
    if (sys.fcntl(fd, F_ADD_SEALS, o.seals) < 0) throw new CkptError(errnoNow(), 'restart:shm', `cannot seal ${o.name} again (seals 0x${o.seals.toString(16)})`);
  }
  private readonly sealed = new Set<string>();

  /**
   * Memfds' modes, once every descriptor of them is opened (a mode may
   * forbid that to the process itself); seals of any not handed out yet.
   */
  seal(): void {
    for (const o of this.objects) {
      const fd = this.fds.get(o.key);
      if (fd === undefined) continue;
      this.sealOnce(o.key);
      if (o.mode === undefined) continue;
      if (!Number.isInteger(o.mode) || o.mode < 0 || o.mode > 0o7777) throw new CkptError(errno('EBADMSG'), 'image', `shared object ${o.name}: mode ${o.mode}`);
      fs.fchmodSync(fd, o.mode);
    }
  }
  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }
}

