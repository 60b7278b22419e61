/** What a syscall handler works with: no module globals, all state is here. */
import type { Tracer, Task } from '../supervisor/tracer.js';
import { CheckpointStore } from './memckpt.js';
import { log } from '../lib/log.js';
import { IoPool, type IoJob, type IoOutcome, type IoValue } from '../supervisor/io.js';
import { runJob } from '../lib/imagejob.js';
import { asCkptError } from '../lib/errors.js';

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
  /** Workers for the image bytes of calls in flight (see supervisor/io.ts). */
  readonly io = new IoPool();
  constructor(readonly tracer: Tracer, readonly options: SupervisorOptions) {
    this.store = new CheckpointStore(tracer, options.maxCheckpoints);
    tracer.io = this.io;
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
export type HandlerResult = bigint | number | typeof NO_RETURN | InFlight;

/**
 * A call in flight (supervisor/io.ts): `job` runs on an I/O worker while
 * the loop serves every tracee and the caller stays stopped; `then` gets
 * the job's outcome on the main thread and finishes the call (it may throw,
 * or start another job). Whatever must be undone on failure is undone in
 * `then`, which is called exactly once.
 */
export class InFlight<J extends IoJob = IoJob> {
  constructor(
    readonly job: J,
    readonly then: (o: IoOutcome<IoValue<J>>) => HandlerResult,
  ) {}
}

/**
 * Finish a call on this thread, its jobs done here too: only where no
 * descriptor can block and no tracee needs the loop (the warm-up, into
 * /dev/null, before the program runs).
 */
export function runHere(r: HandlerResult): HandlerResult {
  while (r instanceof InFlight) {
    let o: IoOutcome<never>;
    try {
      o = { ok: true, value: runJob(r.job) as never };
    } catch (e) {
      o = { ok: false, error: asCkptError(e, 'image') };
    }
    r = r.then(o);
  }
  return r;
}

/** The value of a job's outcome, or its error thrown. */
export function unwrap<T>(o: IoOutcome<T>): T {
  if (!o.ok) throw o.error;
  return o.value;
}
export type Handler = (ctx: SyscallCtx) => HandlerResult;
