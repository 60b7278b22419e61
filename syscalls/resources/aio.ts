/**
 * Asynchronous I/O: AIO contexts (io_setup) kept, io_uring refused.
 *
 * An AIO context is its ring, mapped as "/[aio] (deleted)"; the context id
 * the program holds is the ring's address. Its header (nr, head, tail) and
 * its completed events are copied while the process is stopped (the ring is
 * a shared mapping: a husk would only see it change). It is made again as
 * CRIU does: io_setup with a request count that gives a ring of the same
 * size, requests written to /dev/null (they complete at once) until the
 * kernel's tail is where it was, head set as it was, the events copied in,
 * and the ring moved to its old address with mremap (the kernel follows a
 * moved ring: the id is the address again). A rollback first destroys the
 * contexts the process has now (io_destroy), then does the same.
 *
 * Requests submitted and not yet completed at the checkpoint are not seen
 * (the kernel shows no count of them) and would not complete after a
 * restart. Requests on regular files, pipes and most devices complete
 * within io_submit; only those still waiting (IOCB_CMD_POLL, O_DIRECT on
 * some file systems, slow devices) are concerned.
 *
 * io_uring instances are refused, their descriptors and their mappings
 * alike: their rings, registered files and buffers and requests in flight
 * are not kept. The kernel threads io_uring adds to a process (an SQPOLL
 * ring's poller "iou-sqp-N", io-wq workers "iou-wrk-N") are listed among
 * its threads but are none of its own: no registers, not traceable. A
 * poller belongs to a live SQPOLL ring, refused by that (even when the ring
 * went to a process outside the subtree); a worker alone holds no state of
 * the program (it lingers a few seconds after its ring is gone) and is left
 * out of the threads.
 */
import { CkptError, errno } from '../../lib/errors.js';
import type { MapEntry } from '../../lib/proc.js';
import { readMaps, listTids, ioWorker } from '../../lib/proc.js';
import { RemoteMem } from '../../lib/mem.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { z, int, u32, pageAddr, base64, type Same } from '../../lib/schema.js';

const SYS_mmap = 9, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20, MAP_FIXED_NOREPLACE = 0x100000;
const SYS_io_setup = 206, SYS_io_destroy = 207, SYS_io_submit = 209, SYS_openat = 257, SYS_close = 3, SYS_mremap = 25;
const AT_FDCWD = -100, O_WRONLY = 1, O_CLOEXEC = 0o2000000, MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2;
const AIO_RING_MAGIC = 0xa10a10a1, HEADER = 32, EVENT = 32, IOCB_CMD_PWRITE = 1;
/** A ring of io_setup's largest (aio-max-nr events, doubled by the kernel) is below this. */
const RING_MAX = 16 << 20;

/** One AIO context: ring address (the context id) and length, its header's nr, head and tail, and its events (base64). */
export interface AioRing { addr: string; len: number; nr: number; head: number; tail: number; events: string }

export const aioSchema = z.array(z.strictObject({ addr: pageAddr, len: int(4096, RING_MAX), nr: u32, head: u32, tail: u32, events: base64(RING_MAX) })
  .superRefine((a, ctx) => {
    if (a.len % 4096 || a.nr !== (a.len - HEADER) / EVENT || a.head >= a.nr || a.tail >= a.nr) ctx.addIssue({ code: 'custom', message: `AIO ring ${a.addr}: nr ${a.nr}, head ${a.head}, tail ${a.tail} do not fit a ring of ${a.len} bytes` });
  })).max(1024);
const sameAio: Same<z.infer<typeof aioSchema>[number], AioRing> = true;
void sameAio;

const unsupported = (pid: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:aio', `task ${pid}: ${what}`);

/** Is this mapping an AIO ring (kept here, not by memory.ts)? */
export const isAioRing = (m: MapEntry) => m.path === '/[aio] (deleted)' && m.perms[3] === 's';

/** An io_uring mapping (its descriptor may be closed): refused, named. */
export function refuseUringMapping(m: MapEntry, pid: number): void {
  if (m.path === 'anon_inode:[io_uring]') throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:memory', `task ${pid}: mapping 0x${m.start.toString(16)}-0x${m.end.toString(16)} of an io_uring instance (io_uring is not kept: its rings, registered files and buffers and requests in flight)`);
}

/**
 * The threads of process `pid` to capture: its own, in order, without the
 * io_uring kernel threads; an SQPOLL poller is refused, named.
 */
export function userThreads(pid: number): number[] {
  return listTids(pid).filter((tid) => {
    const io = ioWorker(pid, tid);
    if (io?.startsWith('iou-sqp')) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:threads', `task ${pid}: thread ${tid} (${io}) is the kernel poller of an io_uring instance set up with IORING_SETUP_SQPOLL (io_uring is not kept: its rings, registered files and buffers and requests in flight)`);
    return io === undefined;
  });
}

/** An io_uring descriptor: refused, named (nothing for any other kind). */
export function refuseUring(pid: number, fd: number, target: string): void {
  if (target === 'anon_inode:[io_uring]') throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd} (an io_uring instance: io_uring is not kept: its rings, registered files and buffers and requests in flight)`);
}

/** The AIO rings of a stopped process (`maps`: its mappings), read now: they are shared with the kernel. */
export function captureAio(pid: number, maps: MapEntry[]): AioRing[] | undefined {
  const rings = maps.filter(isAioRing);
  if (!rings.length) return undefined;
  const mem = new RemoteMem(pid);
  try {
    return rings.map((m) => {
      const len = Number(m.end - m.start);
      const b = mem.read(m.start, len);
      const [nr, head, tail, magic, compat, incompat, hlen] = [4, 8, 12, 16, 20, 24, 28].map((o) => b.readUInt32LE(o));
      if (magic !== AIO_RING_MAGIC || compat !== 1 || incompat !== 0 || hlen !== HEADER || nr !== (len - HEADER) / EVENT || head >= nr || tail >= nr) {
        throw unsupported(pid, `AIO ring 0x${m.start.toString(16)} of ${len} bytes with a header not as io_setup makes it (magic 0x${magic.toString(16)}, nr ${nr}, head ${head}, tail ${tail})`);
      }
      return { addr: '0x' + m.start.toString(16), len, nr, head, tail, events: Buffer.from(b.subarray(HEADER)).toString('base64') };
    });
  } finally {
    mem.close();
  }
}

/** Rollback: the contexts the live process has now go first (io_destroy also unmaps their rings). */
export function dropAio(r: Remote): void {
  const b = new CallBatch(r);
  for (const m of readMaps(r.task.tgid).filter(isAioRing)) b.add('restart:aio io_destroy', SYS_io_destroy, m.start);
  b.run();
}

/** The process's AIO contexts made again, each at its old address (which nothing else maps). */
export function restoreAio(r: Remote, rings: AioRing[] | undefined): void {
  for (const a of rings ?? []) restoreRing(r, a);
}

function restoreRing(r: Remote, a: AioRing): void {
  const what = `restart:aio ring ${a.addr}`;
  const pid = r.task.tid;
  // The kernel makes room for twice the requests asked (plus two): the
  // inverse gives a ring of the same size on this machine.
  const b = new CallBatch(r);
  const ctxAt = b.put(Buffer.alloc(8));
  const devnull = b.put(Buffer.from('/dev/null\0'));
  // The old place held by a placeholder meanwhile, so that the new ring
  // cannot land on part of it (mremap cannot move a range onto itself).
  b.add(what, SYS_mmap, BigInt(a.addr), a.len, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  b.add(what, SYS_io_setup, Math.max(1, Math.floor((a.nr - 2) / 2)), ctxAt);
  b.add(what, SYS_openat, AT_FDCWD, devnull, O_WRONLY | O_CLOEXEC, 0);
  const [, , nul] = b.run();
  const ctx = r.mem.read(ctxAt, 8).readBigUInt64LE(0);
  try {
    const nr = r.mem.read(ctx + 4n, 4).readUInt32LE(0);
    if (nr !== a.nr) throw new CkptError(errno('ENOEXEC'), what, `task ${pid}: io_setup made a ring of ${nr} events, not ${a.nr} as at the checkpoint`);
    // The kernel's own tail moves only as requests complete: as many as it
    // takes (a full turn first if the tail was behind the head), in chunks
    // the ring has room for, head moved along so that room is freed.
    const count = a.tail < a.head ? a.nr + a.tail : a.tail;
    const PER = Math.min(a.nr - 1, 256);
    const iocb = Buffer.alloc(64);
    iocb.writeUInt16LE(IOCB_CMD_PWRITE, 16); // aio_lio_opcode
    iocb.writeUInt32LE(Number(nul), 20); // aio_fildes
    iocb.writeBigUInt64LE(ctxAt, 24); // aio_buf: any byte
    iocb.writeBigUInt64LE(1n, 32); // aio_nbytes
    let done = 0;
    while (done < count) {
      const sb = new CallBatch(r);
      const cb = sb.put(iocb);
      const n = Math.min(PER, count - done);
      const ptrs = Buffer.alloc(8 * n);
      for (let i = 0; i < n; i++) ptrs.writeBigUInt64LE(cb, 8 * i);
      sb.add(what, SYS_io_submit, ctx, n, sb.put(ptrs));
      const [got] = sb.run();
      if (got <= 0n) throw new CkptError(errno('EIO'), what, `task ${pid}: io_submit of requests to move the ring's tail gave ${got}`);
      done += Number(got);
      const head = Buffer.alloc(4);
      head.writeUInt32LE(Math.min(done, a.head));
      r.mem.write(ctx + 8n, head);
    }
    const head = Buffer.alloc(4);
    head.writeUInt32LE(a.head);
    r.mem.write(ctx + 8n, head);
    r.mem.write(ctx + BigInt(HEADER), Buffer.from(a.events, 'base64'));
    r.check(what, SYS_mremap, ctx, a.len, a.len, MREMAP_MAYMOVE | MREMAP_FIXED, BigInt(a.addr));
  } finally {
    r.call(SYS_close, nul);
  }
}
