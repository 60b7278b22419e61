/**
 * Pid namespaces: the supervisor sees host pids (its own namespace); a
 * program under `--pidns` passes and expects pids of its own namespace.
 * NSpid in /proc/PID/status lists a task's pid from the outermost visible
 * namespace (ours) inward.
 */
import fs from 'node:fs';
import type { Tracer } from './tracer.js';
import { sys, errnoNow } from '../lib/libc.js';
import { errno } from '../lib/errors.js';

export function nsPids(pid: number): number[] {
  try {
    const m = /^NSpid:\s+(.*)$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? m[1].trim().split(/\s+/).map(Number) : [pid];
  } catch {
    return [pid];
  }
}

/** How deep `pid` is in namespaces below ours (0: ours). */
export const depthOf = (pid: number) => nsPids(pid).length - 1;

/** `pid` as `viewer` names it, to the host pid; undefined if no traced task has it. */
export function hostPid(tracer: Tracer, viewer: number, pid: number): number | undefined {
  const d = depthOf(viewer);
  if (d === 0) return pid;
  for (const t of tracer.tasks.values()) {
    const n = nsPids(t.tid);
    if (n.length > d && n[d] === pid) return t.tid;
  }
  return undefined;
}

/** The host pid `host` as `viewer` sees it (0 when it cannot see it). */
export function viewPid(viewer: number, host: number): number {
  const d = depthOf(viewer);
  const n = nsPids(host);
  return n.length > d ? n[d] : 0;
}

/**
 * Which pids, as `viewer` names them, are taken: on our level, any process
 * (kill 0); in a namespace below ours, its tasks (all traced, and all seen
 * here: husks too).
 */
export function pidsInUse(tracer: Tracer, viewer: number): (pid: number) => boolean {
  const d = depthOf(viewer);
  if (d === 0) return (pid) => sys.kill(pid, 0) === 0 || errnoNow() === errno('EPERM');
  const used = new Set<number>();
  for (const t of tracer.tasks.values()) {
    const n = nsPids(t.tid);
    if (n.length === d + 1) used.add(n[d]);
  }
  return (pid) => used.has(pid);
}
