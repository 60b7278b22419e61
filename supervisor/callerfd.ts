/** A tracee's descriptor, duplicated into the supervisor (the same open file). */
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

/**
 * Use descriptor `fd` of process `pid` through such a duplicate, closed
 * afterwards, whatever `use` does. `what` names the descriptor in the error.
 */
export function withTraceeFd<T>(pid: number, fd: number | bigint, op: string, use: (mine: number) => T, what = 'fd'): T {
  const mine = sys.takeFd(pid, Number(fd));
  if (mine < 0) throw new CkptError(errno('EBADF'), op, `task ${pid}: ${what} ${fd} is not open`);
  try {
    return use(mine);
  } finally {
    fs.closeSync(mine);
  }
}
