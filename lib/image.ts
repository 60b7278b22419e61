/**
 * The image codec: one sequential stream.
 *
 *   "CKPTIMG\0" | u32 header length | header JSON | u32 crc32(all before)
 *   records: u32 type | u32 reserved(0) | u64 length | payload | u32 crc32(frame+payload)
 *   TREE (JSON: every process, file and pipe of the subtree), then for each
 *   process MEMORY (JSON { pid }) followed by its PAGES (u64 address + data),
 *   last TRAILER, JSON { records, pageBytes, chain } counting what came
 *   before; chain binds the records' order: starting from the header's CRC,
 *   each record's CRC is folded in (chain = crc32(record crc, chain)), so a
 *   record swapped, repeated, dropped or taken from another image (each
 *   sound by its own CRC) no longer gives the trailer's chain.
 *   All metadata comes before any page, so a restart can create every
 *   process before it fills the first one.
 *
 * A corrupt header (bad magic or checksum) is EBADMSG; a sound header from a
 * system we cannot serve (format version, architecture, page size) is
 * ENOEXEC. The decoder never trusts a length: each is bounded before any
 * allocation, and anything inconsistent is EBADMSG.
 */
import zlib from 'node:zlib';
import { CkptError, errno } from './errors.js';
import type { Sink, Source } from './stream.js';

export const MAGIC = Buffer.from('CKPTIMG\0', 'latin1');
/** 2: the trailer's chain over every record's CRC. */
export const FORMAT_VERSION = 2;
export const ARCH = 'x86_64';
export const PAGE_SIZE = 4096;
const MAX_HEADER = 1 << 20;
const MAX_JSON = 64 << 20;
/** Page runs are written in pieces of at most this many bytes. */
export const PAGE_RUN_MAX = 1 << 20;
const MAX_PAYLOAD = PAGE_RUN_MAX + 8;

export const REC = {
  TREE: 1,
  PAGES: 2,
  MEMORY: 3,
  /** Contents of a shared memory object: u64 offset, u16 key length, key, data. */
  SHM: 4,
  TRAILER: 0x7fff,
} as const;
export const REC_NAMES: Record<number, string> = Object.fromEntries(Object.entries(REC).map(([k, v]) => [v, k]));

export interface ImageHeader {
  version: number;
  arch: string;
  pageSize: number;
  crid: number;
  kernel: string;
  created: string;
  /** [vvar]/[vvar_vclock]/[vdso] sizes and a hash of the vDSO text. */
  vdso: { layout: { name: string; size: number }[]; hash: string };
}

const bad = (detail: string) => new CkptError(errno('EBADMSG'), 'image', detail);
const foreign = (detail: string) => new CkptError(errno('ENOEXEC'), 'image', detail);

/** The header bytes: magic, length, JSON, and a CRC over all of it. */
export function encodeHeader(h: object): Buffer {
  const json = Buffer.from(JSON.stringify(h));
  const len = Buffer.alloc(4);
  len.writeUInt32LE(json.length);
  const body = Buffer.concat([MAGIC, len, json]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32LE(zlib.crc32(body));
  return Buffer.concat([body, crc]);
}

/** The order binding: the chain so far with one more record's CRC folded in. */
function fold(chain: number, crc: number): number {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(crc);
  return zlib.crc32(b, chain);
}

export class ImageWriter {
  private records = 0;
  private pageBytes = 0;
  private chain = 0;
  constructor(readonly sink: Sink) {}

  header(h: ImageHeader): void {
    const head = encodeHeader(h);
    this.chain = head.readUInt32LE(head.length - 4);
    this.sink.write(head);
  }

  /** One record; the payload may be given in parts (no copy of page data). */
  record(type: number, ...parts: Buffer[]): void {
    const frame = Buffer.alloc(16);
    frame.writeUInt32LE(type, 0);
    frame.writeBigUInt64LE(BigInt(parts.reduce((n, p) => n + p.length, 0)), 8);
    let crc = zlib.crc32(frame);
    this.sink.write(frame);
    for (const p of parts) {
      crc = zlib.crc32(p, crc);
      this.sink.write(p);
    }
    const tail = Buffer.alloc(4);
    tail.writeUInt32LE(crc);
    this.sink.write(tail);
    this.records++;
    this.chain = fold(this.chain, crc);
  }

  json(type: number, value: unknown): void {
    this.record(type, Buffer.from(JSON.stringify(value)));
  }

  /** Page contents starting at addr (a multiple of the page size). */
  pages(addr: bigint, data: Buffer): void {
    for (let off = 0; off < data.length; off += PAGE_RUN_MAX) {
      const a = Buffer.alloc(8);
      a.writeBigUInt64LE(addr + BigInt(off));
      const piece = data.subarray(off, Math.min(data.length, off + PAGE_RUN_MAX));
      this.record(REC.PAGES, a, piece);
      this.pageBytes += piece.length;
    }
  }

  /** Contents of shared object `key` at `offset`, in pieces like pages. */
  shm(key: string, offset: number, data: Buffer): void {
    const k = Buffer.from(key);
    for (let off = 0; off < data.length; off += PAGE_RUN_MAX) {
      const head = Buffer.alloc(10);
      head.writeBigUInt64LE(BigInt(offset + off), 0);
      head.writeUInt16LE(k.length, 8);
      this.record(REC.SHM, head, k, data.subarray(off, Math.min(data.length, off + PAGE_RUN_MAX)));
    }
  }

  trailer(): void {
    this.json(REC.TRAILER, { records: this.records, pageBytes: this.pageBytes, chain: this.chain });
    this.sink.flush();
  }
}

export interface ImageRecord {
  type: number;
  payload: Buffer;
}

export class ImageReader {
  private records = 0;
  private pageBytes = 0;
  private chain = 0;
  done = false;
  constructor(readonly source: Source) {}

  header(): ImageHeader {
    const start = this.source.read(12);
    if (!start.subarray(0, 8).equals(MAGIC)) throw bad('not a ckpt image (bad magic)');
    const len = start.readUInt32LE(8);
    if (len > MAX_HEADER) throw bad(`header length ${len} out of bounds`);
    const json = this.source.read(len);
    const crc = this.source.read(4).readUInt32LE(0);
    if (zlib.crc32(json, zlib.crc32(start)) !== crc) throw bad('header checksum mismatch');
    this.chain = crc;
    let h: ImageHeader;
    try {
      h = JSON.parse(json.toString('utf8'));
    } catch {
      throw bad('header is not valid JSON');
    }
    if (h.version !== FORMAT_VERSION) throw foreign(`format version ${h.version}, this supervisor reads ${FORMAT_VERSION}`);
    if (h.arch !== ARCH) throw foreign(`architecture ${h.arch}, this is ${ARCH}`);
    if (h.pageSize !== PAGE_SIZE) throw foreign(`page size ${h.pageSize}, this is ${PAGE_SIZE}`);
    if (!h.vdso || !Array.isArray(h.vdso.layout)) throw bad('header lacks the vDSO layout');
    return h;
  }

  /** The next record, checksum verified. After the trailer: null. */
  next(): ImageRecord | null {
    if (this.done) return null;
    const frame = this.source.read(16);
    const type = frame.readUInt32LE(0);
    const len = frame.readBigUInt64LE(8);
    const limit = type === REC.PAGES || type === REC.SHM ? MAX_PAYLOAD + 256 : MAX_JSON;
    if (!(type in REC_NAMES)) throw bad(`unknown record type ${type} at byte ${this.source.bytes - 16}`);
    if (frame.readUInt32LE(4) !== 0) throw bad(`reserved field set in record at byte ${this.source.bytes - 16}`);
    if (len > BigInt(limit)) throw bad(`record length ${len} out of bounds for ${REC_NAMES[type]}`);
    const payload = this.source.read(Number(len));
    const crc = this.source.read(4).readUInt32LE(0);
    if (zlib.crc32(payload, zlib.crc32(frame)) !== crc) throw bad(`checksum mismatch in ${REC_NAMES[type]} record #${this.records}`);
    if (type === REC.TRAILER) {
      const t = parseJson<{ records: number; pageBytes: number; chain: number }>(payload, 'trailer');
      if (t.records !== this.records || t.pageBytes !== this.pageBytes) {
        throw bad(`trailer counts ${t.records} records / ${t.pageBytes} page bytes, stream had ${this.records} / ${this.pageBytes}`);
      }
      if (t.chain !== this.chain) throw bad(`records out of order, repeated, missing or from another image (trailer chain ${t.chain}, stream ${this.chain})`);
      this.done = true;
      return null;
    }
    if (type === REC.PAGES) {
      if (len < 8n || (len - 8n) % BigInt(PAGE_SIZE) !== 0n) throw bad(`page record of ${len} bytes is not whole pages`);
      this.pageBytes += Number(len) - 8;
    }
    this.records++;
    this.chain = fold(this.chain, crc);
    return { type, payload };
  }

  /** The next record, which must be of `type`. */
  expect(type: number): ImageRecord {
    const r = this.next();
    if (!r) throw bad(`expected a ${REC_NAMES[type]} record, found the end`);
    if (r.type !== type) throw bad(`expected a ${REC_NAMES[type]} record, found ${REC_NAMES[r.type]}`);
    return r;
  }
}

export function parseJson<T>(payload: Buffer, what: string): T {
  try {
    return JSON.parse(payload.toString('utf8')) as T;
  } catch {
    throw bad(`${what} record is not valid JSON`);
  }
}

/** Split a SHM payload into its object key, offset and data. */
export function splitShm(payload: Buffer): { key: string; offset: number; data: Buffer } {
  if (payload.length < 10) throw bad('short SHM record');
  const klen = payload.readUInt16LE(8);
  if (10 + klen > payload.length || klen > 200) throw bad('SHM record key out of bounds');
  return { offset: Number(payload.readBigUInt64LE(0)), key: payload.subarray(10, 10 + klen).toString(), data: payload.subarray(10 + klen) };
}

/** Split a PAGES payload into its address and its data. */
export function splitPages(payload: Buffer): { addr: bigint; data: Buffer } {
  return { addr: payload.readBigUInt64LE(0), data: payload.subarray(8) };
}

/** Is an image's vDSO this kernel's? (ENOEXEC if not: its code would call into the wrong place.) */
export function checkVdso(image: ImageHeader['vdso'], here: ImageHeader['vdso']): void {
  // A program that unmapped some of them (its vDSO, say) gets none of those
  // back: only the ones it kept must be this kernel's, and the code hash
  // only matters if it kept the vDSO itself.
  const have = new Map(here.layout.map((l) => [l.name, l.size]));
  const ok = image.layout.every((l) => have.get(l.name) === l.size) && (!image.layout.some((l) => l.name === '[vdso]') || image.hash === here.hash);
  if (!ok) {
    throw new CkptError(errno('ENOEXEC'), 'restart', `vDSO layout differs: image ${JSON.stringify(image.layout)} ${image.hash}, here ${JSON.stringify(here.layout)} ${here.hash}`);
  }
}
