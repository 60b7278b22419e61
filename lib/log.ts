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
