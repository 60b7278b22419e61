/** What a syscall handler works with: no module globals, all state is here. */
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CheckpointStore } from './memckpt.js';
import { log } from '../lib/log.js';

export interface SupervisorOptions {
  /** Cap on live in-memory checkpoints (EAGAIN past it). */
  maxCheckpoints: number;
  /** Track written pages for fast undo (else rollback compares page frames). */
  trackDirty: boolean;
  /** The supervisor's own inherited descriptors: what "outside the tree" means. */
  outsideFds: number[];
}

/** One supervisor's state: the tracer and everything the syscalls keep. */
export class Supervisor {
  private lastCrid = 0;
  readonly store: CheckpointStore;
  constructor(readonly tracer: Tracer, readonly options: SupervisorOptions) {
    this.store = new CheckpointStore(tracer, options.maxCheckpoints);
  }
  newCrid(): number {
    return ++this.lastCrid;
  }

  private readonly deferred: (() => void)[] = [];
  /**
   * Work for right after the current call is answered: the caller (and the
   * whole tree) runs meanwhile, and it is done before the next call is served.
   */
  later(work: () => void): void {
    this.deferred.push(work);
  }
  runLater(): void {
    for (let work; (work = this.deferred.shift()); ) {
      try {
        work();
      } catch (e) {
        log.syscall('deferred work failed: %s', (e as Error).message);
      }
    }
  }
}

export interface SyscallCtx {
  sv: Supervisor;
  tracer: Tracer;
  caller: Task;
  args: bigint[];
}

/** A handler's outcome: the value for rax, or "the caller was already resumed elsewhere". */
export const NO_RETURN = Symbol('no-return');
export type HandlerResult = bigint | number | typeof NO_RETURN;
export type Handler = (ctx: SyscallCtx) => HandlerResult;
