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
import { sys } from '../../lib/libc.js';
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
}

export const shmObjectSchema = z.strictObject({
  key: z.string().min(1).max(64),
  name: z.string().max(4096),
  size: int(0, 2 ** 46),
});
const sameShm: Same<z.infer<typeof shmObjectSchema>, ShmObject> = true;
void sameShm;

/** Contents: the non-zero pages, by offset. */
export type ShmData = Map<string, { offset: number; data: Buffer }[]>;

const SYS_memfd_create = 319, MFD_CLOEXEC = 1;

/** Is this mapping (or fd target) a shmem object we keep (anonymous shared, memfd)? */
export function isShm(path: string): boolean {
  return path === '/dev/zero (deleted)' || (path.startsWith('/memfd:') && path.endsWith(' (deleted)'));
}

export const shmKeyOfMap = (m: MapEntry) => {
  const [maj, min] = m.dev.split(':').map((x) => parseInt(x, 16));
  return `${(maj << 8) | min}:${m.inode}`;
};

/** Read an object's non-zero pages from any path that opens it. */
function readObject(path: string): { size: number; runs: { offset: number; data: Buffer }[] } {
  const fd = fs.openSync(path, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const runs: { offset: number; data: Buffer }[] = [];
    const buf = Buffer.alloc(1 << 20);
    const zero = Buffer.alloc(4096);
    for (let off = 0; off < size; off += buf.length) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - off), off);
      for (let p = 0; p < n; p += 4096) {
        const page = buf.subarray(p, Math.min(p + 4096, n));
        if (page.equals(zero.subarray(0, page.length))) continue;
        const last = runs[runs.length - 1];
        if (last && last.offset + last.data.length === off + p) last.data = Buffer.concat([last.data, page]);
        else runs.push({ offset: off + p, data: Buffer.from(page) });
      }
    }
    return { size, runs };
  } finally {
    fs.closeSync(fd);
  }
}

export class ShmCapture {
  readonly objects: ShmObject[] = [];
  readonly data: ShmData = new Map();

  /** Note an object met through `path` (/proc/PID/map_files/... or /proc/PID/fd/N). */
  add(key: string, name: string, path: string): void {
    if (this.data.has(key)) return;
    const { size, runs } = readObject(path);
    this.objects.push({ key, name, size });
    this.data.set(key, runs);
  }

  addMapping(pid: number, m: MapEntry): string {
    const key = shmKeyOfMap(m);
    this.add(key, m.path.replace(/ \(deleted\)$/, ''), `/proc/${pid}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`);
    return key;
  }

  bytes(): number {
    let n = 0;
    for (const runs of this.data.values()) for (const r of runs) n += r.data.length;
    return n;
  }
}

/** The objects made again, as memfds of the supervisor. */
export class ShmRestore {
  private fds = new Map<string, number>();
  private sizes: Map<string, number>;
  constructor(objects: ShmObject[]) {
    this.sizes = new Map(objects.map((o) => [o.key, o.size]));
    for (const o of objects) {
      const name = Buffer.from(o.name.replace(/^\/memfd:/, '').slice(0, 200) + '\0');
      const fd = sys.syscall(SYS_memfd_create, sysAddr(name), MFD_CLOEXEC);
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
    const src = this.fds.get(key);
    if (src === undefined) throw new CkptError(errno('EBADMSG'), 'image', `unknown shared object ${key}`);
    withTraceeFd(host, fd, 'restart:files', (mine) => {
      const size = fs.fstatSync(src).size;
      const buf = Buffer.allocUnsafe(1 << 20);
      for (let off = 0; off < size; ) {
        const n = fs.readSync(src, buf, 0, Math.min(buf.length, size - off), off);
        if (n <= 0) break;
        for (let done = 0; done < n; ) done += fs.writeSync(mine, buf, done, n - done, off + done);
        off += n;
      }
      fs.ftruncateSync(mine, size); // holes at the end stay holes
    });
  }

  /** The object as a descriptor of tracee `r` (>= minFd), from the supervisor's. */
  fdIn(r: Remote, key: string, minFd = 0): bigint {
    const mine = this.fds.get(key);
    if (mine === undefined) throw new CkptError(errno('EBADMSG'), 'image', `unknown shared object ${key}`);
    if (viewPid(r.task.tgid, process.pid)) return r.takeFd(process.pid, mine, minFd);
    // In a pid namespace that cannot name the supervisor: open the same
    // object again through its /proc entry (procfs as mounted here is ours).
    return r.raise(openIn(r, `/proc/${process.pid}/fd/${mine}`, O_RDWR | O_CLOEXEC, 'restart:shm'), minFd);
  }
  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }
}

import { addressOf as sysAddr } from '../../lib/libc.js';
