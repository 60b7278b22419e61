/**
 * Sequential, synchronous byte streams over a file descriptor: the image goes
 * to or comes from whatever the caller gave (file, pipe, socket), never seeks,
 * and copes with descriptors that are non-blocking.
 */
import fs from 'node:fs';
import { sys } from './libc.js';
import { CkptError, errno } from './errors.js';

const POLLIN = 1, POLLOUT = 4;
const isAgain = (e: unknown) => (e as NodeJS.ErrnoException).code === 'EAGAIN';

export interface Sink {
  write(buf: Buffer): void;
  flush(): void;
  readonly bytes: number;
}

export interface Source {
  /** Exactly n bytes, or throws EBADMSG (truncated) at end of stream. */
  read(n: number, into?: Buffer): Buffer;
  readonly bytes: number;
}

export class FdSink implements Sink {
  private buf = Buffer.alloc(1 << 20);
  private used = 0;
  bytes = 0;
  constructor(private readonly fd: number) {}

  write(data: Buffer): void {
    this.bytes += data.length;
    if (this.used + data.length <= this.buf.length) {
      data.copy(this.buf, this.used);
      this.used += data.length;
      return;
    }
    this.flush();
    if (data.length >= this.buf.length) this.writeAll(data);
    else {
      data.copy(this.buf, 0);
      this.used = data.length;
    }
  }

  flush(): void {
    if (this.used) this.writeAll(this.buf.subarray(0, this.used));
    this.used = 0;
  }

  private writeAll(data: Buffer): void {
    let off = 0;
    while (off < data.length) {
      try {
        off += fs.writeSync(this.fd, data, off, data.length - off, null);
      } catch (e) {
        if (isAgain(e)) sys.pollOne(this.fd, POLLOUT, -1);
        else throw e;
      }
    }
  }
}

export class FdSource implements Source {
  // Small on purpose: it serves record headers; payloads are read straight
  // into their own buffer, so page data is not copied twice.
  private buf = Buffer.alloc(64 << 10);
  private start = 0;
  private end = 0;
  bytes = 0;
  constructor(private readonly fd: number) {}

  private fill(into: Buffer, off: number, len: number): number {
    for (;;) {
      try {
        return fs.readSync(this.fd, into, off, len, null);
      } catch (e) {
        if (isAgain(e)) sys.pollOne(this.fd, POLLIN, -1);
        else throw e;
      }
    }
  }

  read(n: number, into?: Buffer): Buffer {
    const out = into ?? Buffer.allocUnsafe(n);
    let got = Math.min(n, this.end - this.start);
    this.buf.copy(out, 0, this.start, this.start + got);
    this.start += got;
    while (got < n) {
      const want = n - got;
      if (want >= this.buf.length) {
        const r = this.fill(out, got, want); // big reads go straight to the target
        if (r === 0) throw truncated(this.bytes + got);
        got += r;
      } else {
        const r = this.fill(this.buf, 0, this.buf.length);
        if (r === 0) throw truncated(this.bytes + got);
        this.start = 0;
        this.end = r;
        const take = Math.min(r, want);
        this.buf.copy(out, got, 0, take);
        this.start = take;
        got += take;
      }
    }
    this.bytes += n;
    return out;
  }
}

function truncated(at: number): CkptError {
  return new CkptError(errno('EBADMSG'), 'image', `truncated at byte ${at}`);
}

/** An in-memory source, for tests and for decoding a buffer. */
export class BufferSource implements Source {
  bytes = 0;
  constructor(private readonly data: Buffer) {}
  read(n: number, into?: Buffer): Buffer {
    if (this.bytes + n > this.data.length) throw truncated(this.data.length);
    const out = into ?? Buffer.allocUnsafe(n);
    this.data.copy(out, 0, this.bytes, this.bytes + n);
    this.bytes += n;
    return out;
  }
}

export class BufferSink implements Sink {
  private parts: Buffer[] = [];
  bytes = 0;
  write(buf: Buffer): void {
    this.parts.push(Buffer.from(buf));
    this.bytes += buf.length;
  }
  flush(): void {}
  result(): Buffer {
    return Buffer.concat(this.parts);
  }
}
