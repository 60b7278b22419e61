/**
 * The image's byte work, as jobs that need no ptrace: writing a checkpoint's
 * image from the memory of stopped processes (husks, read through
 * /proc/PID/mem) into a descriptor, and reading a whole image from a
 * descriptor, checksums and trailer verified. They run on an I/O worker
 * thread (supervisor/io.ts), so a descriptor that blocks (a pipe whose
 * reader is a tracee, a FIFO not yet opened, a slow network) never blocks
 * the tracer's loop. Everything here is plain data in, plain data out.
 */
import { ImageReader, ImageWriter, PAGE_RUN_MAX, REC, REC_NAMES, checkVdso, type ImageHeader, type ImageRecord } from './image.js';
import { RemoteMem } from './mem.js';
import { CkptError, errno } from './errors.js';
import { FdSink, FdSource, type Sink, type Source } from './stream.js';

/** A job of the I/O pool (supervisor/io.ts): write an image to a descriptor, or read one whole. */
export type IoJob =
  /** The image; with `holdTrailer`, all but its trailer, whose bytes are returned to be written later. */
  | { kind: 'write'; fd: number; plan: ImagePlan; holdTrailer?: boolean }
  /** Bytes as they are (a held trailer). */
  | { kind: 'raw'; fd: number; data: Uint8Array }
  /** A whole image; `vdso`: this kernel's, which its header must name (ENOEXEC at once otherwise). */
  | { kind: 'read'; fd: number; vdso?: ImageHeader['vdso'] };
export interface Written {
  bytes: number;
  trailer?: Uint8Array;
}
export type IoValue<J extends IoJob> = J extends { kind: 'write' } ? Written : J extends { kind: 'raw' } ? number : LoadedImage;

/** Do a job on this thread (a worker's, or the main one where nothing can block). */
export function runJob(job: IoJob): Written | number | LoadedImage {
  switch (job.kind) {
    case 'write':
      return writePlan(job.plan, new FdSink(job.fd), job.holdTrailer);
    case 'raw': {
      const sink = new FdSink(job.fd);
      sink.write(asBuffer(job.data));
      sink.flush();
      return sink.bytes;
    }
    case 'read':
      return readWhole(new FdSource(job.fd), job.vdso);
  }
}

/** A sink that, once told to hold, keeps what it is given instead of writing it. */
class HoldingSink implements Sink {
  private held: Buffer[] | undefined;
  constructor(private readonly inner: Sink) {}
  get bytes(): number {
    return this.inner.bytes;
  }
  hold(): void {
    this.inner.flush();
    this.held = [];
  }
  write(b: Buffer): void {
    if (this.held) this.held.push(Buffer.from(b));
    else this.inner.write(b);
  }
  flush(): void {
    if (!this.held) this.inner.flush();
  }
  heldBytes(): Buffer {
    return Buffer.concat(this.held ?? []);
  }
}

export interface PageRun {
  addr: bigint;
  len: number;
}

/** What an image is made of, everything but the page contents by value. */
export interface ImagePlan {
  header: ImageHeader;
  /** The TREE record's JSON text. */
  tree: string;
  /** Shared memory contents, copied at the checkpoint. */
  shm: { key: string; offset: number; data: Uint8Array }[];
  /** Per process, in TREE order: whose memory to read (a husk, or the frozen process) and which runs. */
  procs: { pid: number; memPid: number; runs: PageRun[]; held: { addr: bigint; data: Uint8Array }[] }[];
}

/**
 * Write the image `plan` describes. With `holdTrailer` everything but the
 * trailer is written, and the trailer's bytes are returned: a reader takes
 * the image as complete only at its trailer, so CKPT_KILL can kill the
 * subtree in between (after every byte that could fail did not).
 */
export function writePlan(plan: ImagePlan, out: Sink, holdTrailer = false): Written {
  const sink = new HoldingSink(out);
  const w = new ImageWriter(sink);
  w.header(plan.header);
  w.record(REC.TREE, Buffer.from(plan.tree));
  for (const s of plan.shm) w.shm(s.key, s.offset, asBuffer(s.data));
  for (const p of plan.procs) {
    w.json(REC.MEMORY, { pid: p.pid });
    writePages(p.memPid, p.runs, w);
    for (const h of p.held) w.pages(h.addr, asBuffer(h.data));
  }
  if (holdTrailer) sink.hold();
  w.trailer();
  return { bytes: sink.bytes, trailer: holdTrailer ? sink.heldBytes() : undefined };
}

/**
 * Stream the chosen pages into the image, read with pread on
 * /proc/PID/mem: on a husk, process_vm_readv would break the sharing.
 */
export function writePages(memPid: number, runs: PageRun[], w: ImageWriter): number {
  const mem = new RemoteMem(memPid);
  const buf = Buffer.allocUnsafe(PAGE_RUN_MAX);
  let bytes = 0;
  try {
    for (const run of runs) {
      for (let off = 0; off < run.len; off += PAGE_RUN_MAX) {
        const n = Math.min(PAGE_RUN_MAX, run.len - off);
        const at = run.addr + BigInt(off);
        w.pages(at, mem.read(at, n, buf.subarray(0, n)));
        bytes += n;
      }
    }
  } finally {
    mem.close();
  }
  return bytes;
}

/** A whole image, read and verified up to its trailer (nothing past it is read). */
export interface LoadedImage {
  header: ImageHeader;
  records: ImageRecord[];
  bytes: number;
}

export function readWhole(source: Source, vdso?: ImageHeader['vdso']): LoadedImage {
  const reader = new ImageReader(source);
  const header = reader.header();
  if (vdso) checkVdso(header.vdso, vdso); // before reading the rest of an image this system cannot run
  const records: ImageRecord[] = [];
  for (let r = reader.next(); r; r = reader.next()) records.push(r);
  return { header, records, bytes: source.bytes };
}

/** Records of a loaded image, taken in order like an ImageReader's. */
export class RecordQueue {
  private i = 0;
  constructor(private readonly records: ImageRecord[]) {}
  next(): ImageRecord | null {
    return this.records[this.i++] ?? null;
  }
  expect(type: number): ImageRecord {
    const r = this.next();
    if (!r || r.type !== type) throw new CkptError(errno('EBADMSG'), 'image', `expected a ${REC_NAMES[type]} record, found ${r ? REC_NAMES[r.type] : 'the end'}`);
    return r;
  }
}

/** Bytes that crossed a thread boundary come back as Uint8Array. */
export const asBuffer = (u: Uint8Array): Buffer => (Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength));
