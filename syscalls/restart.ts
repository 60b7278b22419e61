import { CkptError, errno } from '../lib/errors.js';
import type { SyscallCtx } from './context.js';
export function restart(_ctx: SyscallCtx): number { throw new CkptError(errno('ENOSYS'), 'restart', 'wip'); }
