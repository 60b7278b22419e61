import os from 'node:os';

const errnoNames = new Map<number, string>(
  Object.entries(os.constants.errno).map(([name, num]) => [num, name]),
);

/** errno value by name, e.g. errno('ESRCH') === 3. */
export function errno(name: keyof typeof os.constants.errno): number {
  return os.constants.errno[name];
}

export function errnoName(num: number): string {
  return errnoNames.get(num) ?? `errno ${num}`;
}

/**
 * An error that carries the errno the program should see, plus where it came
 * from. Handlers throw it; the syscall table turns it into -errno and one log
 * line (task, resource, reason).
 */
export class CkptError extends Error {
  constructor(
    readonly errno: number,
    /** what was being done: a syscall name, "checkpoint", "restart:memory" ... */
    readonly op: string,
    /** the resource and the reason, for the log line */
    readonly detail: string,
  ) {
    super(`${op}: ${errnoName(errno)}: ${detail}`);
    this.name = 'CkptError';
  }
}

/** Wrap anything thrown into a CkptError (unknown failures become EIO). */
export function asCkptError(e: unknown, op: string): CkptError {
  if (e instanceof CkptError) return e;
  const err = e as NodeJS.ErrnoException;
  if (err && typeof err.errno === 'number' && typeof err.code === 'string') {
    // Node fs errors carry a negative errno.
    return new CkptError(Math.abs(err.errno), op, err.message);
  }
  return new CkptError(errno('EIO'), op, String(err?.stack ?? err));
}
