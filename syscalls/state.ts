/** The state of one process as the image carries it (the PROCESS record). */
import type { ProcessIds, Creds, MmState } from './resources/process.js';
import type { VmaState } from './resources/memory.js';
import type { FilesState } from './resources/files.js';
import type { SignalState } from './resources/signals.js';
import type { ThreadState } from './resources/thread.js';
import { CkptError, errno } from '../lib/errors.js';

export interface ProcessState {
  ids: ProcessIds;
  creds: Creds;
  mm: MmState;
  memory: VmaState[];
  files: FilesState;
  signals: SignalState;
  threads: ThreadState[];
}

/** Shape check of a decoded PROCESS record: the checksum says it is what was written, not that a writer was sane. */
export function validateProcess(p: ProcessState): ProcessState {
  const ok =
    p && typeof p === 'object' && p.ids && Number.isInteger(p.ids.pid) && p.ids.pid > 0 &&
    Array.isArray(p.memory) && Array.isArray(p.threads) && p.threads.length >= 1 &&
    p.files && Array.isArray(p.files.fds) && p.mm && typeof p.mm.exe === 'string' && p.creds && Array.isArray(p.creds.uid);
  if (!ok) throw new CkptError(errno('EBADMSG'), 'image', 'PROCESS record lacks required fields');
  return p;
}
