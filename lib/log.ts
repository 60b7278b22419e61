import createDebug from 'debug';

/** Namespaced loggers: DEBUG=ckpt:* shows everything. */
export const log = {
  trace: createDebug('ckpt:trace'),
  syscall: createDebug('ckpt:syscall'),
  remote: createDebug('ckpt:remote'),
  image: createDebug('ckpt:image'),
  restore: createDebug('ckpt:restore'),
};

/**
 * Errors the ABI promises a log line for go to stderr whatever DEBUG says:
 * one line naming the task, the resource and the reason.
 */
export function logError(line: string): void {
  process.stderr.write(`ckpt-supervise: ${line}\n`);
}

/** Where the time of one operation went, for the debug log: "freeze 0.4, memory 3.1, ...". */
export class Phases {
  private last = performance.now();
  private readonly start = this.last;
  private readonly parts: string[] = [];
  mark(name: string): void {
    const now = performance.now();
    this.parts.push(`${name} ${(now - this.last).toFixed(2)}`);
    this.last = now;
  }
  get totalMs(): number {
    return performance.now() - this.start;
  }
  toString(): string {
    return `${this.totalMs.toFixed(2)} ms (${this.parts.join(', ')})`;
  }
}
