/**
 * Freeze and thaw a set of processes. Freezing interrupts every thread and
 * waits for each stop; new threads or children can appear while we do it
 * (clone races), so it repeats until a pass finds nothing new. The stop each
 * task reported is parked on it; thawing resumes each task the way it would
 * have been (delivering a signal that arrived meanwhile), at once, or hands
 * the stop to the event loop when it needs more (a ckpt call made meanwhile).
 */
import { sys } from '../lib/libc.js';
import { kcmp, KCMP } from '../lib/kcmp.js';
import { CkptError, errno } from '../lib/errors.js';
import { PT, PTRACE_EVENT } from '../lib/ptrace.js';
import { listTids, readStat } from '../lib/proc.js';
import type { Task, Tracer } from './tracer.js';

export class Freeze {
  /** Tasks this freeze stopped (the caller, already stopped, is not one). */
  readonly tasks: Task[] = [];
  constructor(private readonly tracer: Tracer) {}

  /**
   * Stop every thread of `tgids` and of any child they fork meanwhile.
   * Returns the processes that are alive and frozen: one that died on the
   * way (a child that exits at once, a zombie whose exit the loop has not
   * seen yet) is left out, and its death recorded, never taken for a task.
   */
  add(tgids: number[]): number[] {
    const procs = new Set(tgids);
    const inVfork = new Map<number, string>(); // task -> why it cannot be frozen
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
          const known = this.tracer.tasks.get(tid);
          const vfork = known && sharingVfork(this.tracer, known);
          if (vfork) {
            // A vfork parent waits in the kernel until its child execs or
            // exits, and no PTRACE_INTERRUPT stops it before: waiting for
            // its stop would hang the loop (and, the child frozen, the tree).
            inVfork.set(tid, vfork);
            if (known.stop === 'running' && known.vforkChild) continue;
          }
          if (known && known.stop !== 'running') continue;
          // A task we do not know that cannot be interrupted is no tracee
          // (a zombie already reported): never register it. A known one
          // that cannot is dying: the wait below collects its exit.
          if (sys.ptrace(PT.INTERRUPT, tid, 0, 0) !== 0 && !known) continue;
          asked.push(known ?? this.tracer.add(tid, tgid));
        }
      }
      for (const t of asked) {
        const ev = this.tracer.wait(t.tid);
        if (!ev || ev.kind !== 'stopped') {
          this.tracer.tasks.delete(t.tid); // ECHILD: not ours after all
          continue;
        }
        t.parked = ev;
        this.tasks.push(t);
        if (ev.event === PTRACE_EVENT.FORK || ev.event === PTRACE_EVENT.VFORK || ev.event === PTRACE_EVENT.CLONE) {
          changed = true; // a new task: freeze it too on the next pass
          const child = this.tracer.noteFork(t, ev.event);
          if (ev.event !== PTRACE_EVENT.CLONE) procs.add(child);
          // A vfork parent waits for its child, unstoppable: it stays at its event.
          if (ev.event !== PTRACE_EVENT.VFORK) {
            const now = this.tracer.pastEvent(t);
            t.parked = now?.kind === 'stopped' ? now : undefined;
            if (!t.parked) this.tasks.pop();
          }
        } else if (ev.event === PTRACE_EVENT.EXEC) {
          // Still inside execve (a child of a shell, just past its vfork):
          // execve's own result would overwrite the first injected call's
          // (a husk's clone came back as 0), so it is moved past the event.
          this.tracer.noteExec(t);
          const now = this.tracer.pastEvent(t);
          t.parked = now?.kind === 'stopped' ? now : undefined;
          if (!t.parked) this.tasks.pop();
        }
      }
    }
    for (const t of this.tasks) {
      const vfork = sharingVfork(this.tracer, t);
      if (vfork) inVfork.set(t.tid, vfork);
    }
    if (inVfork.size) {
      const [tid, why] = [...inVfork][0];
      throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:vfork', `task ${tid}: ${why}; try again once it has`);
    }
    // A vfork parent kept at its event whose child has exec'd or exited since
    // (the child runs while the parent reports the event) is free again, but
    // still inside vfork: its result would overwrite the first injected
    // call's, and the registers saved there (rax -ENOSYS, the value at entry)
    // would be the program's vfork result (ENOSYS). Moved past the event.
    for (const t of [...this.tasks]) {
      if (t.parked?.kind !== 'stopped' || t.parked.event !== PTRACE_EVENT.VFORK) continue;
      const now = this.tracer.pastEvent(t);
      t.parked = now?.kind === 'stopped' ? now : undefined;
      if (!t.parked) this.tasks.splice(this.tasks.indexOf(t), 1);
    }
    const alive = (tgid: number) => this.tracer.tasks.has(tgid) && this.tracer.tasks.get(tgid)!.stop !== 'running';
    return [...procs].filter(alive);
  }

  /** Called by thaw(), before the tasks go on (what a capture held for them is given back). */
  onThaw?: () => void;

  /** Let every frozen task go on as it would have. */
  thaw(): void {
    this.onThaw?.();
    for (const t of this.tasks.splice(0)) {
      if (!this.tracer.tasks.has(t.tid) || !t.parked) continue;
      this.tracer.release(t.parked);
    }
  }
}


/**
 * Why task `t` is in the middle of a vfork (it and its partner still share
 * one address space: kcmp KCMP_VM), or undefined, the marks then cleared.
 */
function sharingVfork(tracer: Tracer, t: Task): string | undefined {
  const other = t.vforkChild ?? t.vforkParent;
  if (other === undefined) return undefined;
  if (tracer.tasks.has(other) && kcmp(t.tgid, other, KCMP.VM) === 0) {
    return t.vforkChild ? `in vfork(): its child ${other} shares its memory until it calls exec or exits` : `a vfork child that has not called exec yet: it shares the memory of its parent ${other}`;
  }
  t.vforkChild = t.vforkParent = undefined;
  return undefined;
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
