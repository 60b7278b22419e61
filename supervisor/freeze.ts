/**
 * Freeze and thaw a set of processes. Freezing interrupts every thread and
 * waits for each stop; new threads or children can appear while we do it
 * (clone races), so it repeats until a pass finds nothing new. The stop each
 * task reported is parked on it; thawing resumes each task the way it would
 * have been (delivering a signal that arrived meanwhile), at once, or hands
 * the stop to the event loop when it needs more (a ckpt call made meanwhile).
 */
import { sys } from '../lib/libc.js';
import { PT, PTRACE_EVENT } from '../lib/ptrace.js';
import { listTids, readStat } from '../lib/proc.js';
import type { Task, Tracer } from './tracer.js';

export class Freeze {
  /** Tasks this freeze stopped (the caller, already stopped, is not one). */
  readonly tasks: Task[] = [];
  constructor(private readonly tracer: Tracer) {}

  /** Stop every thread of `tgids` and of any child they fork meanwhile. */
  add(tgids: number[]): number[] {
    const procs = new Set(tgids);
    for (let changed = true; changed; ) {
      changed = false;
      const asked: Task[] = [];
      for (const tgid of procs) {
        let tids: number[];
        try {
          tids = listTids(tgid);
        } catch {
          procs.delete(tgid); // gone
          continue;
        }
        for (const tid of tids) {
          const t = this.tracer.tasks.get(tid) ?? this.tracer.add(tid, tgid);
          if (t.stop !== 'running') continue;
          sys.ptrace(PT.INTERRUPT, tid, 0, 0);
          asked.push(t);
        }
      }
      for (const t of asked) {
        const ev = this.tracer.wait(t.tid);
        if (!ev || ev.kind !== 'stopped') continue;
        t.parked = ev;
        this.tasks.push(t);
        if (ev.event === PTRACE_EVENT.FORK || ev.event === PTRACE_EVENT.VFORK || ev.event === PTRACE_EVENT.CLONE) {
          changed = true; // a new task: freeze it too on the next pass
          if (ev.event !== PTRACE_EVENT.CLONE) procs.add(childOf(t.tid));
        }
      }
    }
    return [...procs];
  }

  /** Let every frozen task go on as it would have. */
  thaw(): void {
    for (const t of this.tasks.splice(0)) {
      if (!this.tracer.tasks.has(t.tid) || !t.parked) continue;
      this.tracer.release(t.parked);
    }
  }
}

function childOf(tid: number): number {
  const b = Buffer.alloc(8);
  sys.ptraceBuf(PT.GETEVENTMSG, tid, 0, b);
  return Number(b.readBigUInt64LE(0));
}

/** The processes of the subtree rooted at `root` (root first), among the tracees. */
export function subtree(tracer: Tracer, root: number): number[] {
  const parent = new Map<number, number>();
  for (const p of tracer.processes()) {
    try {
      parent.set(p, Number(readStat(p).field(4)));
    } catch { /* exited */ }
  }
  const out = [root];
  for (let i = 0; i < out.length; i++) {
    for (const [p, pp] of parent) if (pp === out[i] && !out.includes(p)) out.push(p);
  }
  return out;
}
