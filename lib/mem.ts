/**
 * Tracee memory. Through /proc/PID/mem by default: it works on any mapping
 * we may ptrace, including read-only and PROT_NONE ones (FOLL_FORCE), and,
 * unlike process_vm_readv, does not break copy-on-write sharing when reading
 * a snapshot. `fast` transfers use process_vm_readv/writev (about twice the
 * rate here) where the mapping allows it, and fall back to /proc/PID/mem.
 */
import fs from 'node:fs';
import { CkptError, errno } from './errors.js';
import { sys } from './libc.js';

export class RemoteMem {
  private fd: number;
  constructor(readonly pid: number, write = false) {
    try {
      this.fd = fs.openSync(`/proc/${pid}/mem`, write ? 'r+' : 'r');
    } catch (e) {
      throw new CkptError(errno('ESRCH'), 'mem', `task ${pid}: cannot open /proc/${pid}/mem: ${(e as Error).message}`);
    }
  }
  read(addr: bigint | number, len: number, into?: Buffer): Buffer {
    const buf = into ?? Buffer.alloc(len);
    let done = 0;
    while (done < len) {
      const n = fs.readSync(this.fd, buf, done, len - done, Number(addr) + done);
      if (n <= 0) throw new CkptError(errno('EIO'), 'mem', `task ${this.pid}: short read at 0x${(Number(addr) + done).toString(16)}`);
      done += n;
    }
    return buf;
  }
  write(addr: bigint | number, data: Buffer): void {
    let done = 0;
    while (done < data.length) {
      const n = fs.writeSync(this.fd, data, done, data.length - done, Number(addr) + done);
      if (n <= 0) throw new CkptError(errno('EIO'), 'mem', `task ${this.pid}: short write at 0x${(Number(addr) + done).toString(16)}`);
      done += n;
    }
  }
  /** Read with process_vm_readv (never on a snapshot whose sharing matters). */
  readFast(addr: bigint, len: number, into: Buffer): Buffer {
    const buf = into.subarray(0, len);
    return sys.vmRead(this.pid, buf, addr) === len ? buf : this.read(addr, len, buf);
  }
  /** Write with process_vm_writev where the pages are writable, else /proc/PID/mem. */
  writeFast(addr: bigint, data: Buffer): void {
    if (sys.vmWrite(this.pid, data, addr) !== data.length) this.write(addr, data);
  }
  close(): void {
    fs.closeSync(this.fd);
  }
}
