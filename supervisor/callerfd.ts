/** The caller's descriptor, duplicated into the supervisor (same open file). */
import fs from 'node:fs';
import { sys, errnoNow } from '../lib/libc.js';
import { CkptError, errno } from '../lib/errors.js';

const F_GETFL = 3, O_ACCMODE = 3, O_RDONLY = 0, O_WRONLY = 1;

export function takeCallerFd(pid: number, fd: number, mode: 'read' | 'write', op: string): number {
  if (fd < 0) throw new CkptError(errno('EBADF'), op, `task ${pid}: fd ${fd} is not a descriptor`);
  const mine = sys.takeFd(pid, fd);
  if (mine < 0) throw new CkptError(errno('EBADF'), op, `task ${pid}: fd ${fd} is not open (errno ${errnoNow()})`);
  const acc = sys.fcntl(mine, F_GETFL) & O_ACCMODE;
  if ((mode === 'write' && acc === O_RDONLY) || (mode === 'read' && acc === O_WRONLY)) {
    fs.closeSync(mine);
    throw new CkptError(errno('EBADF'), op, `task ${pid}: fd ${fd} is not open for ${mode === 'write' ? 'writing' : 'reading'}`);
  }
  return mine;
}
