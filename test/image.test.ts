// The image codec: round trip, and every kind of damage is refused with the right errno.
import t from 'tap';
import { ImageWriter, ImageReader, REC, MAGIC, FORMAT_VERSION, splitPages, encodeHeader, type ImageHeader } from '../lib/image.js';
import { BufferSink, BufferSource } from '../lib/stream.js';
import { CkptError } from '../lib/errors.js';

const header: ImageHeader = {
  version: FORMAT_VERSION, arch: 'x86_64', pageSize: 4096, crid: 7, kernel: 'test', created: 'now',
  vdso: { layout: [{ name: '[vdso]', size: 8192 }], hash: 'abc' },
};

function sample(): Buffer {
  const w = new ImageWriter(new BufferSink());
  w.header(header);
  w.json(REC.TREE, { pid: 42, name: 'x' });
  const pages = Buffer.alloc(2 * 4096);
  for (let i = 0; i < pages.length; i++) pages[i] = i & 0xff;
  w.pages(0x10000n, pages);
  w.record(REC.MEMORY);
  w.trailer();
  return (w.sink as BufferSink).result();
}

function decode(img: Buffer) {
  const r = new ImageReader(new BufferSource(img));
  const h = r.header();
  const recs = [];
  for (let rec = r.next(); rec; rec = r.next()) recs.push(rec);
  return { h, recs };
}

const errnoOf = (f: () => unknown) => {
  try {
    f();
    return 'ok';
  } catch (e) {
    return e instanceof CkptError ? e.errno : String(e);
  }
};
const EBADMSG = 74, ENOEXEC = 8;

t.test('round trip', async (t) => {
  const { h, recs } = decode(sample());
  t.same(h, header);
  t.same(recs.map((r) => r.type), [REC.TREE, REC.PAGES, REC.MEMORY]);
  t.same(JSON.parse(recs[0].payload.toString()), { pid: 42, name: 'x' });
  const { addr, data } = splitPages(recs[1].payload);
  t.equal(addr, 0x10000n);
  t.equal(data.length, 2 * 4096);
  t.equal(data[4097], 1);
});

t.test('every truncation is EBADMSG', async (t) => {
  const img = sample();
  const bad = [];
  for (let n = 0; n < img.length; n++) if (errnoOf(() => decode(img.subarray(0, n))) !== EBADMSG) bad.push(n);
  t.same(bad, [], 'no prefix decodes or fails otherwise');
});

t.test('every flipped byte is EBADMSG (or ENOEXEC in a sound foreign header)', async (t) => {
  const img = sample();
  const bad = [];
  for (let i = 0; i < img.length; i++) {
    const c = Buffer.from(img);
    c[i] ^= 0x40;
    const e = errnoOf(() => decode(c));
    if (e !== EBADMSG && e !== ENOEXEC) bad.push(`${i}:${e}`);
  }
  t.same(bad, []);
});

const withHeader = encodeHeader;

t.test('foreign images are ENOEXEC', async (t) => {
  t.equal(errnoOf(() => decode(withHeader({ ...header, arch: 'aarch64' }))), ENOEXEC, 'architecture');
  t.equal(errnoOf(() => decode(withHeader({ ...header, version: 99 }))), ENOEXEC, 'format version');
  t.equal(errnoOf(() => decode(withHeader({ ...header, pageSize: 16384 }))), ENOEXEC, 'page size');
});

t.test('lengths are never trusted', async (t) => {
  const huge = Buffer.concat([MAGIC, Buffer.from([0xff, 0xff, 0xff, 0x7f])]);
  t.equal(errnoOf(() => decode(huge)), EBADMSG, 'header length');
  const h = withHeader(header);
  const rec = Buffer.alloc(16);
  rec.writeUInt32LE(REC.TREE, 0);
  rec.writeBigUInt64LE(1n << 40n, 8);
  t.equal(errnoOf(() => decode(Buffer.concat([h, rec]))), EBADMSG, 'record length');
  // In a whole image: the first record (TREE, right after the header) made
  // to claim more than is left, by one byte and by far; the records that
  // follow would otherwise be read as its payload.
  const img = sample();
  t.equal(img.readUInt32LE(h.length), REC.TREE, 'the first record starts right after the header');
  const tree = img.readBigUInt64LE(h.length + 8);
  for (const len of [BigInt(img.length - h.length - 16) + 1n, tree + (1n << 32n), 1n << 62n]) {
    const c = Buffer.from(img);
    c.writeBigUInt64LE(len, h.length + 8);
    t.equal(errnoOf(() => decode(c)), EBADMSG, `a TREE record of ${len} bytes in an image of ${img.length}`);
  }
});

t.test('records after a missing one are caught by the trailer', async (t) => {
  const w = new ImageWriter(new BufferSink());
  w.header(header);
  w.json(REC.TREE, {});
  const withTwo = (w.sink as BufferSink).result();
  const w2 = new ImageWriter(new BufferSink());
  w2.header(header);
  w2.trailer();
  // splice a trailer that counts 0 records after a PROCESS record
  const trailerOnly = (w2.sink as BufferSink).result().subarray(withHeader(header).length);
  t.equal(errnoOf(() => decode(Buffer.concat([withTwo, trailerOnly]))), EBADMSG);
});

/** An image's header and its records as raw bytes (frame, payload, CRC), trailer last. */
function frames(img: Buffer): { head: Buffer; recs: Buffer[] } {
  const headLen = 12 + img.readUInt32LE(8) + 4;
  const recs: Buffer[] = [];
  for (let at = headLen; at < img.length;) {
    const len = 16 + Number(img.readBigUInt64LE(at + 8)) + 4;
    recs.push(img.subarray(at, at + len));
    at += len;
  }
  return { head: img.subarray(0, headLen), recs };
}

/** Records (each sound) put together again, with a trailer whose counts fit them but whose chain is `chain`. */
function spliced(head: Buffer, recs: Buffer[], chain: number): Buffer {
  const pageBytes = recs.filter((r) => r.readUInt32LE(0) === REC.PAGES).reduce((n, r) => n + r.length - 16 - 8 - 4, 0);
  const w = new ImageWriter(new BufferSink());
  w.record(REC.TRAILER, Buffer.from(JSON.stringify({ records: recs.length, pageBytes, chain })));
  return Buffer.concat([head, ...recs, (w.sink as BufferSink).result()]);
}

t.test('whole records swapped, repeated, dropped or taken from another image: EBADMSG, even with the counts fixed', async (t) => {
  const w = new ImageWriter(new BufferSink());
  w.header(header);
  w.json(REC.TREE, { pid: 42 });
  w.record(REC.MEMORY, Buffer.from('{"pid":42}'));
  for (let i = 0; i < 3; i++) w.pages(BigInt(0x10000 + i * 4096), Buffer.alloc(4096, i + 1));
  w.trailer();
  const img = (w.sink as BufferSink).result();
  t.equal(errnoOf(() => decode(img)), 'ok', 'the image itself decodes');
  const { head, recs } = frames(img);
  const trailer = recs.pop()!;
  const chain = JSON.parse(trailer.subarray(16, trailer.length - 4).toString()).chain;
  t.equal(errnoOf(() => decode(spliced(head, recs, chain))), 'ok', 'spliced again unchanged, it decodes');
  const [tree, mem, p0, p1, p2] = recs;
  const message = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      return (e as CkptError).detail;
    }
  };
  const cases: [string, Buffer[]][] = [
    ['two PAGES records swapped', [tree, mem, p1, p0, p2]],
    ['a PAGES record repeated', [tree, mem, p0, p1, p1, p2]],
    ['a PAGES record dropped', [tree, mem, p0, p2]],
    ['the last PAGES record dropped', [tree, mem, p0, p1]],
  ];
  for (const [what, list] of cases) {
    const bad = spliced(head, list, chain);
    t.equal(errnoOf(() => decode(bad)), EBADMSG, what);
    t.match(message(() => decode(bad)), /out of order, repeated, missing/, `${what}: the reason`);
  }
  // The same records after the header of another image (another crid).
  const other = encodeHeader({ ...header, crid: 8 });
  t.equal(errnoOf(() => decode(Buffer.concat([other, ...recs, trailer]))), EBADMSG, 'records under another image\'s header');
});
