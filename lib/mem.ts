/**
 * Tracee memory through /proc/PID/mem: works on any mapping we may ptrace,
 * including read-only ones (FOLL_FORCE), and, unlike process_vm_readv, does
 * not break copy-on-write sharing when reading a snapshot.
 */
import fs from 'node:fs';
import { CkptError, errno } from './errors.js';

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
  close(): void {
    fs.closeSync(this.fd);
  }
}
