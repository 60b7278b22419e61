import { CkptError, errno } from '../lib/errors.js';
import type { SyscallCtx } from './context.js';
export function checkpoint(_ctx: SyscallCtx): number { throw new CkptError(errno('ENOSYS'), 'checkpoint', 'wip'); }
