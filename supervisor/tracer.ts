/**
 * The tracee registry and the one event loop. `wait` is the only waitpid
 * call in the code base: every other part that needs a particular task to
 * stop asks the tracer, so no stop is ever stolen or lost.
 */
import fs from 'node:fs';
import { sys, errnoNow } from '../lib/libc.js';
import { errno, CkptError } from '../lib/errors.js';
import { PT, PTRACE_EVENT, WALL, WNOHANG, decodeWaitStatus, getEventMsg, getRegs, setRegs, type WaitEvent } from '../lib/ptrace.js';
import { log, logError } from '../lib/log.js';

const SIGTRAP = 5, SIGSTOP = 19, SIGTSTP = 20, SIGTTIN = 21, SIGTTOU = 22;
const STOP_SIGNALS = new Set([SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU]);

export interface Task {
  tid: number;
  tgid: number;
  /** Where a stopped task is parked, which decides how it can be resumed or used. */
  stop: 'running' | 'seccomp' | 'stopped';
  /** The stop event the loop has not dispatched yet (a frozen task's). */
  parked?: WaitEvent;
  /** Signals that arrived while we held the task; delivered when it runs again. */
  heldSignals: number[];
  /** A husk (the copy-on-write snapshot of an in-memory checkpoint): never resumed. */
  husk?: boolean;
  /** In a group-stop (job control) since this stop signal; undefined once it runs again. */
  groupStop?: number;
  /** The fork/clone event it is stopped at was taken in already (by a freeze). */
  forkNoted?: boolean;
  /**
   * Its ckpt call is in flight (supervisor/io.ts): it sits in that call's
   * seccomp stop. A checkpoint meanwhile records the call as to be made
   * again; a rollback or restore of the task clears this, and the call's
   * late answer then goes nowhere.
   */
  inFlight?: object;
  /**
   * vfork: the child this task made with vfork (it waits, unstoppable, until
   * the child execs or exits), or for the child, the parent. The two share
   * one address space meanwhile; a freeze checks whether they still do.
   */
  vforkChild?: number;
  vforkParent?: number;
  /** Run at its next syscall-exit stop (it was resumed with PTRACE_SYSCALL from a noted call's seccomp stop, to see the call's result). */
  atSyscallExit?: () => void;
}

export type SeccompHandler = (tracer: Tracer, task: Task) => void;

/** Jobs of calls in flight, as the loop sees them (supervisor/io.ts). */
export interface InFlightJobs {
  busy(): boolean;
  /** Sleep until a job finishes or `ms` pass. */
  sleep(ms: number): void;
  /** Finish the jobs that are done (their continuations run here); how many. */
  pump(): number;
}

export class Tracer {
  readonly tasks = new Map<number, Task>();
  /** Stops already collected (during a freeze or remote call) still to dispatch. */
  private readonly pending: WaitEvent[] = [];
  /** Processes that exited while traced: candidates for zombies of the tree. */
  readonly exited = new Set<number>();
  /** When `exited` is this large, the ones reaped since are dropped (checkpoints drop them too, but a tree may never take one). */
  private exitedPruneAt = 1024;
  /** execve count by process: an mm-bound resource (a userfaultfd) is stale once it changes. */
  private readonly execs = new Map<number, number>();
  /**
   * Processes that may hold memory fork does not copy: they called madvise
   * with MADV_DONTFORK or MADV_WIPEONFORK (the seccomp filter traps exactly
   * those), were forked from one that did (a child keeps WIPEONFORK
   * regions), or were restored with such regions. Only their checkpoints
   * look for that memory during the stop. An exec clears the mark.
   */
  readonly forkAdvice = new Set<number>();
  /**
   * Processes that may hold madvise or mlock state a rollback must compare
   * (MADV_DONTDUMP, HUGEPAGE, NOHUGEPAGE, RANDOM, SEQUENTIAL, MERGEABLE,
   * mlock, mlock2, mlockall: trapped by the filter), inherited and cleared as
   * forkAdvice is. Only their rollbacks read smaps.
   */
  readonly vmAdvice = new Set<number>();
  /** Processes that called mlockall(MCL_FUTURE) (and not munlockall since): refused by a checkpoint. */
  readonly lockFuture = new Set<number>();
  /**
   * Processes that ever set pdeathsig, timer slack or the child-subreaper
   * flag (prctl, trapped by the filter), were forked from one that did (the
   * slack is inherited), or were restored with such values: only their
   * checkpoints ask each thread for them during the stop (attrs.ts).
   */
  readonly prctlNoted = new Set<number>();
  /**
   * Processes that may have an interval timer armed (setitimer, alarm: the
   * filter traps both), or were restored with one: only theirs are read in
   * a stop. Kept across exec (so are the timers), not inherited by fork.
   */
  readonly itimers = new Set<number>();
  /**
   * SysV semaphore sets and message queues each process used (ids passed to
   * semop, semctl, msgsnd, msgrcv, msgctl; keys passed to semget, msgget:
   * the filter traps them), inherited by fork; and its semaphore undo
   * adjustments (semadj by set id and semaphore, which /proc does not show:
   * followed from each SEM_UNDO semop that succeeded), not inherited. See
   * syscalls/resources/sysvipc.ts.
   */
  readonly sysvUsed = new Map<number, { used: Set<string>; undo: Map<number, Map<number, number>>; unknown?: Set<number> }>();
  /** Injected runs so far (each a resume and a wait): what stop and restart times are made of. */
  roundTrips = 0;
  rootPid = 0;
  /** Calls in flight: while any runs, the loop polls instead of blocking in waitpid. */
  io?: InFlightJobs;
  rootStatus: { code: number } | { signal: number } | null = null;

  constructor(private readonly onSeccomp: SeccompHandler) {}

  execGen(tgid: number): number {
    return this.execs.get(tgid) ?? 0;
  }

  /** Register a tracee we learnt about (fork event, auto-attach, launch). */
  add(tid: number, tgid?: number): Task {
    let t = this.tasks.get(tid);
    if (!t) {
      t = { tid, tgid: tgid ?? readTgid(tid) ?? tid, stop: 'running', heldSignals: [] };
      this.tasks.set(tid, t);
    }
    return t;
  }

  /** All traced thread ids of process tgid. */
  threadsOf(tgid: number): Task[] {
    return [...this.tasks.values()].filter((t) => t.tgid === tgid);
  }

  /** The program's processes (husks are ours, not the program's). */
  processes(): number[] {
    return [...new Set([...this.tasks.values()].filter((t) => !t.husk).map((t) => t.tgid))];
  }

  /**
   * THE waitpid site. `pid` -1 waits for any tracee. Deaths are recorded here,
   * whoever asked, so the registry can never miss one.
   */
  wait(pid = -1, nohang = false): WaitEvent | null {
    for (;;) {
      const [r, status] = sys.waitpid(pid, WALL | (nohang ? WNOHANG : 0));
      if (r === 0) return null; // WNOHANG: nothing yet
      if (r === -1) {
        const e = errnoNow();
        if (e === errno('EINTR')) continue;
        return null; // ECHILD: nothing left to wait for
      }
      const ev = decodeWaitStatus(r, status);
      if (ev.kind !== 'stopped') this.forget(ev);
      else {
        const t = this.tasks.get(r) ?? this.add(r);
        t.stop = ev.event === PTRACE_EVENT.SECCOMP ? 'seccomp' : 'stopped';
      }
      return ev;
    }
  }

  /**
   * After SIGKILL to process `tgid`: wait until every thread of it is gone.
   * Its other threads first: a killed leader is not reported (even to
   * waitpid on its own pid) until they have been reaped, so waiting for it
   * first would wait forever. Stops still reported on the way are let go.
   */
  waitGone(tgid: number): void {
    const tids = this.threadsOf(tgid).map((t) => t.tid).sort((a, b) => (a === tgid ? 1 : b === tgid ? -1 : 0));
    if (!tids.includes(tgid)) tids.push(tgid);
    for (const tid of tids) while (this.wait(tid)?.kind === 'stopped') sys.ptrace(PT.CONT, tid, 0, 0);
  }

  private forget(ev: Extract<WaitEvent, { kind: 'exited' | 'killed' }>): void {
    const t = this.tasks.get(ev.pid);
    this.tasks.delete(ev.pid);
    if (!t || t.tgid === ev.pid) {
      this.exited.add(ev.pid);
      this.forkAdvice.delete(ev.pid);
      this.vmAdvice.delete(ev.pid);
      this.lockFuture.delete(ev.pid);
      this.prctlNoted.delete(ev.pid);
      this.itimers.delete(ev.pid);
      this.sysvUsed.delete(ev.pid);
      this.execs.delete(ev.pid); // a later process with this pid starts again at 0
      if (this.exited.size >= this.exitedPruneAt) {
        for (const pid of this.exited) if (!fs.existsSync(`/proc/${pid}`)) this.exited.delete(pid);
        this.exitedPruneAt = Math.max(1024, 2 * this.exited.size);
      }
    }
    if (ev.pid === this.rootPid) {
      this.rootStatus = ev.kind === 'exited' ? { code: ev.code } : { signal: ev.signal };
    }
    log.trace('%d %s %o', ev.pid, ev.kind, t ? '' : '(unregistered)');
  }

  /**
   * Let a frozen task go on from the stop it was frozen in: plain stops
   * (our interrupt, a signal, a group-stop) are resumed at once; stops that
   * need the loop's attention (a ckpt call, a fork event) are queued for it,
   * since we may be inside a handler right now.
   */
  release(ev: WaitEvent): void {
    if (ev.kind === 'stopped' && (ev.event === PTRACE_EVENT.STOP || (ev.event === 0 && !ev.syscallStop))) {
      this.dispatch(ev);
    } else this.pending.push(ev);
  }

  /**
   * Forget a signal held for these tasks: a SIGCHLD about a child the
   * program never had (a failed shell, a rolled-back extra, a zombie remade).
   */
  dropHeld(tasks: Iterable<Task>, sig: number): void {
    for (const t of tasks) t.heldSignals = t.heldSignals.filter((s) => s !== sig);
  }

  /**
   * Read what an event stop says, unless the task was killed since it was
   * reported (ESRCH: it is no longer in the stop; its exit comes next, and
   * a child it made reports its own first stop). false then.
   */
  private ifAlive(read: () => unknown): boolean {
    try {
      read();
      return true;
    } catch (e) {
      if (e instanceof CkptError && e.errno === errno('ESRCH')) return false;
      throw e;
    }
  }

  /** A fork, vfork or clone event of `task`: its new task joins the registry. Returns its id. */
  noteFork(task: Task, event: number): number {
    const pid = getEventMsg(task.tid);
    const child = this.add(pid, event === PTRACE_EVENT.CLONE ? undefined : pid);
    if (event === PTRACE_EVENT.VFORK) {
      task.vforkChild = pid;
      child.vforkParent = task.tid;
    }
    if (child.tgid !== task.tgid && this.forkAdvice.has(task.tgid)) this.forkAdvice.add(child.tgid);
    if (child.tgid !== task.tgid && this.vmAdvice.has(task.tgid)) this.vmAdvice.add(child.tgid);
    if (child.tgid !== task.tgid && this.prctlNoted.has(task.tgid)) this.prctlNoted.add(child.tgid);
    const ipc = this.sysvUsed.get(task.tgid); // a child has no undo list of its own yet
    if (child.tgid !== task.tgid && ipc) this.sysvUsed.set(child.tgid, { used: new Set(ipc.used), undo: new Map() });
    task.forkNoted = true;
    return pid;
  }

  /** An exec event of `task`: a new program, in a new address space, its only thread. */
  noteExec(task: Task): void {
    // execve by a non-leader thread: the other threads are gone and the
    // thread now runs under the leader's id.
    const former = getEventMsg(task.tid);
    this.execs.set(task.tgid, this.execGen(task.tgid) + 1);
    this.forkAdvice.delete(task.tgid); // a new address space
    this.vmAdvice.delete(task.tgid);
    this.lockFuture.delete(task.tgid);
    for (const t of this.threadsOf(task.tgid)) if (t.tid !== task.tid) this.tasks.delete(t.tid);
    if (former !== task.tid) this.tasks.delete(former);
  }

  /**
   * Move a task stopped at a fork, clone or exec event past it, to a stop from
   * which calls can be injected: at the event the kernel is still inside
   * the fork (or the execve), whose own result would overwrite an injected
   * call's number. Interrupted, then let go, the task finishes the call and traps at once,
   * before an instruction of its own. Returns the stop it is in now (or
   * its death).
   */
  pastEvent(task: Task): WaitEvent | null {
    sys.ptrace(PT.INTERRUPT, task.tid, 0, 0);
    if (sys.ptrace(PT.CONT, task.tid, 0, 0) === -1) return null;
    task.stop = 'running';
    return this.wait(task.tid);
  }

  /** Resume a stopped task, first re-sending any signal we held back. */
  resume(task: Task, sig = 0, req: number = PT.CONT): void {
    for (const s of task.heldSignals.splice(0)) sys.tgkill(task.tgid, task.tid, s);
    task.stop = 'running';
    task.groupStop = undefined;
    task.parked = undefined;
    task.forkNoted = undefined;
    sys.ptrace(req, task.tid, 0, sig); // ESRCH: it died meanwhile, the loop will see it
  }

  /**
   * The stop signal of task `tid` if it is in a group-stop (job control):
   * known from its last dispatched stop, or from the stop a freeze
   * collected before the loop saw it.
   */
  groupStopOf(tid: number): number | undefined {
    const t = this.tasks.get(tid);
    const p = t?.parked;
    if (p?.kind === 'stopped' && p.event === PTRACE_EVENT.STOP && STOP_SIGNALS.has(p.signal)) return p.signal;
    return t?.groupStop;
  }

  /**
   * A group-stop: LISTEN keeps the task stopped, as without a tracer, yet
   * lets SIGCONT and our PTRACE_INTERRUPT through. LISTEN applies only to a
   * stop as the kernel reported it; a task moved since (the injected calls
   * of a checkpoint) is made to report it again first: interrupted and let
   * go, it traps at once, before an instruction of its own. Without that it
   * stayed in a ptrace stop for good: SIGCONT could not wake it, and the
   * next freeze waited for it forever.
   */
  private listen(task: Task, sig: number): void {
    task.stop = 'running';
    task.groupStop = sig;
    if (sys.ptrace(PT.LISTEN, task.tid, 0, 0) === 0) return;
    sys.ptrace(PT.INTERRUPT, task.tid, 0, 0);
    if (sys.ptrace(PT.CONT, task.tid, 0, 0) === -1) return; // gone
    const ev = this.wait(task.tid);
    if (!ev || ev.kind !== 'stopped') return;
    if (ev.event === PTRACE_EVENT.STOP && STOP_SIGNALS.has(ev.signal)) {
      task.stop = 'running';
      sys.ptrace(PT.LISTEN, task.tid, 0, 0);
    } else {
      task.groupStop = undefined; // the group-stop ended meanwhile
      this.pending.push(ev); // the loop takes it from here
    }
  }

  /** Answer a trapped call with -EIO after an internal error (if the task still exists). */
  private failCall(task: Task): void {
    try {
      const regs = getRegs(task.tid);
      regs.set('rax', -errno('EIO'));
      regs.set('orig_rax', -1n);
      setRegs(task.tid, regs);
      this.resume(task);
    } catch { /* gone */ }
  }

  /** Run until every tracee is gone; returns the exit status for the shell. */
  run(): number {
    // Until the program's processes are all gone: husks (kept checkpoints)
    // do not keep the supervisor alive; they die with it (PTRACE_O_EXITKILL).
    // Nor while a call is in flight: the image of a CKPT_KILL of the whole
    // tree still has its trailer to write once the tree is gone.
    while (this.processes().length || this.io?.busy()) {
      const ev = this.pending.shift() ?? this.next();
      if (ev === null && !this.io?.busy()) break;
      if (ev) this.dispatch(ev);
    }
    // We are the subreaper of the tree: what is left of it (husks, zombies
    // of killed processes) is reaped before we go, so no pid stays taken.
    // Every child of ours too, registered or not: one stopped and forgotten
    // (a husk that fell out of the registry) would never change state, and
    // the wait below would block for good.
    for (const t of this.tasks.values()) sys.kill(t.tid, 9);
    for (const pid of childrenOf(process.pid)) sys.kill(pid, 9);
    while (this.wait(-1)) { /* until ECHILD */ }
    const st = this.rootStatus;
    if (!st) return 1;
    return 'code' in st ? st.code : 128 + st.signal;
  }

  /**
   * The next event to dispatch. With no call in flight: block in waitpid.
   * With one: never block there (the call's worker may be waiting for a
   * tracee that needs a stop served); poll waitpid, finish what the workers
   * are done with, and sleep on their doorbell for at most 1 ms in between.
   * undefined: nothing to dispatch (yet); null: no tracee left.
   */
  private next(): WaitEvent | null | undefined {
    if (!this.io?.busy()) {
      const ev = this.wait(-1, true);
      if (ev !== null) return ev;
      // Nothing to report now: before blocking, forget tasks that are gone
      // without our seeing their exit (reaped by a parent's wait4 first).
      // One left behind would keep the loop waiting for good once the
      // program's last process is gone. Paid only when the tree is idle.
      if (this.pruneDead() && !this.processes().length) return undefined;
      return this.wait(-1);
    }
    const ev = this.wait(-1, true);
    if (ev) return ev;
    if (!this.io.pump()) this.io.sleep(1);
    return undefined;
  }

  /** Drop registered tasks that no longer exist; whether any was dropped. */
  private pruneDead(): boolean {
    let dropped = false;
    for (const t of [...this.tasks.values()]) {
      if (sys.tgkill(t.tgid, t.tid, 0) === -1 && errnoNow() === errno('ESRCH')) {
        this.tasks.delete(t.tid);
        dropped = true;
      }
    }
    return dropped;
  }

  /**
   * Dispatch events until `done()` holds or `ms` pass, without blocking:
   * for embedding the tracer (tests, tools) rather than handing it the thread.
   */
  runUntil(done: () => boolean, ms: number): boolean {
    const end = Date.now() + ms;
    const nap = new Int32Array(new SharedArrayBuffer(4));
    while (!done()) {
      if (Date.now() > end) return false;
      const ev = this.pending.shift() ?? this.wait(-1, true);
      if (ev) this.dispatch(ev);
      else if (!this.io?.pump()) Atomics.wait(nap, 0, 0, 1);
    }
    return true;
  }

  private dispatch(ev: WaitEvent): void {
    if (ev.kind !== 'stopped') return;
    const task = this.tasks.get(ev.pid);
    if (!task || task.husk) return; // a husk stays stopped for good
    switch (ev.event) {
      case PTRACE_EVENT.SECCOMP:
        task.stop = 'seccomp';
        try {
          this.onSeccomp(this, task);
        } catch (e) {
          // A bug of ours must not take the tree down: log it, fail the call.
          logError(`task ${task.tid}: internal error serving a ckpt call: ${(e as Error).stack ?? e}`);
          this.failCall(task);
        }
        return;
      case PTRACE_EVENT.FORK:
      case PTRACE_EVENT.VFORK:
      case PTRACE_EVENT.CLONE:
        if (!task.forkNoted && !this.ifAlive(() => this.noteFork(task, ev.event))) return;
        this.resume(task);
        return;
      case PTRACE_EVENT.EXEC:
        if (!this.ifAlive(() => this.noteExec(task))) return;
        this.resume(task);
        return;
      case PTRACE_EVENT.STOP:
        if (STOP_SIGNALS.has(ev.signal)) this.listen(task, ev.signal);
        else this.resume(task);
        return;
      default:
        if (ev.syscallStop && task.atSyscallExit) {
          const then = task.atSyscallExit;
          task.atSyscallExit = undefined;
          then();
        }
        if (ev.syscallStop || (ev.signal === SIGTRAP && ev.event !== 0)) this.resume(task);
        else this.resume(task, ev.signal); // a real signal: deliver it
    }
  }
}

export function readTgid(tid: number): number | undefined {
  try {
    const m = /^Tgid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${tid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** The processes whose parent is `pid` (from /proc: its children file lists only one thread's). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) out.push(Number(name));
    } catch { /* gone */ }
  }
  return out;
}
