/**
 * A program's own seccomp filters: every thread's chain, oldest first, read
 * with PTRACE_SECCOMP_GET_FILTER (and the LOG flag with
 * PTRACE_SECCOMP_GET_METADATA), and installed again (seccomp(2)
 * SECCOMP_SET_MODE_FILTER, NO_NEW_PRIVS set) before the program runs a
 * single instruction.
 *
 * - The oldest filter of every tracee is the supervisor's own (the launcher
 *   installs it before the program's exec; every process of the tree and
 *   every shell a restart makes inherits it): it is recognised and never
 *   recorded, so it is never installed twice.
 * - The kernel runs an injected call through the thread's filters like any
 *   other (even one set at a seccomp stop is checked again): a sandbox
 *   that allows only what the program needs refuses sigaltstack, clone,
 *   pidfd_getfd... So while the supervisor works on a frozen thread that
 *   has filters of its own (capture, rollback), the thread's filters are
 *   suspended (PTRACE_O_SUSPEND_SECCOMP, as CRIU does), and always put
 *   back in force before anything of the tree runs again (SeccompSuspension).
 *   Tasks cloned from a suspended one inherit the suspension (husks, and
 *   tasks a rollback makes again): those of the program get it cleared too.
 * - Installing is the last injected call into a thread of a fresh shell
 *   (not suspended: its filters are not there yet), so that no filter can
 *   block the rest of the rebuild (munmap, rt_sigqueueinfo...). The
 *   filter program is written on the thread's own stack (and put back by
 *   ptrace, not by a call), and the call is made on a syscall instruction
 *   of [vdso], so nothing needs undoing afterwards.
 * - Threads of a process share the part of their chains they have in
 *   common (installed once by the leader with SECCOMP_FILTER_FLAG_TSYNC,
 *   so a later TSYNC by the program still finds every thread below it);
 *   each thread then gets the filters of its own on top.
 * - A rollback installs nothing where a thread's chain is the
 *   checkpoint's. Filters cannot be removed from a live thread: one that
 *   has filters the checkpoint did not have makes the rollback fail with
 *   EOPNOTSUPP before anything is changed (the program runs on, still
 *   sandboxed as it is).
 * - Refused at checkpoint (EOPNOTSUPP): a filter that can return
 *   SECCOMP_RET_USER_NOTIF (its listener cannot be made again), one whose
 *   action is computed (RET A: cannot be vetted), and SECCOMP_MODE_STRICT
 *   (never seen under the supervisor: strict mode cannot be entered from
 *   filter mode, the kernel answers EINVAL; were it there, no call could
 *   be injected into that thread).
 * - A restart made by a caller that is itself sandboxed gives the restored
 *   threads the caller's filters too (a child cannot shed them): the
 *   checkpoint's are installed on top, so the program is never less
 *   sandboxed than it was.
 */
import { z, int, base64, type Same } from '../../lib/schema.js';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, errnoNow } from '../../lib/libc.js';
import { readStatus } from '../../lib/proc.js';
import { buildTrapFilter } from '../../lib/seccomp.js';
import { NR_FIRST, NR_LAST } from '../abi.js';
import { Remote } from '../../supervisor/remote.js';
import type { Tracer, Task } from '../../supervisor/tracer.js';
import type { ProcessState } from '../state.js';
import { PT } from '../../lib/ptrace.js';
import { TRACE_OPTIONS } from '../../supervisor/spawn.js';
import { log } from '../../lib/log.js';

const PTRACE_SECCOMP_GET_FILTER = 0x420c, PTRACE_SECCOMP_GET_METADATA = 0x420d;
const SECCOMP_SET_MODE_FILTER = 1, SECCOMP_FILTER_FLAG_TSYNC = 1, SECCOMP_FILTER_FLAG_LOG = 2;
const SECCOMP_RET_ACTION_FULL = 0xffff0000, SECCOMP_RET_USER_NOTIF = 0x7fc00000;
const BPF_RET_K = 0x06, BPF_RET_A = 0x16;
const SYS_seccomp = 317, PR_SET_NO_NEW_PRIVS = 38;
const ENOENT = errno('ENOENT'), EINVAL = errno('EINVAL');

/** One filter: its classic-BPF program (struct sock_filter[], base64) and the flags it was installed with that stay with it. */
export interface SeccompFilter {
  prog: string;
  /** SECCOMP_FILTER_FLAG_LOG or 0. */
  flags: number;
}

/** In the TREE record: a program of at most BPF_MAXINSNS (4096) instructions of 8 bytes. */
export const seccompFilterSchema = z.strictObject({ prog: base64(4096 * 8), flags: int(0, 2) });
const sameFilter: Same<z.infer<typeof seccompFilterSchema>, SeccompFilter> = true;
void sameFilter;

const supervisorFilter = () => buildTrapFilter(NR_FIRST, NR_LAST).toString('base64');

const unsupported = (tid: number, why: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:seccomp', `task ${tid}: ${why}`);

/**
 * The filters of stopped thread `tid`, oldest first, the supervisor's own
 * left out; undefined when it has none of its own (one ptrace call: the
 * common case costs about a microsecond in the stop).
 */
export function readFilters(tid: number): SeccompFilter[] | undefined {
  const n1 = sys.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 1, 0);
  if (n1 === -1) {
    const e = errnoNow();
    if (e === ENOENT) return undefined; // one filter: the supervisor's
    if (e === EINVAL) throw unsupported(tid, 'seccomp is not in filter mode (strict mode: no call can be injected into it)');
    // No CAP_SYS_ADMIN here: whether the program has filters can still be told, not what they are.
    const count = Number(readStatus(tid).get('Seccomp_filters') ?? '1');
    if (count <= 1) return undefined;
    throw unsupported(tid, `${count - 1} seccomp filters of its own cannot be read back (PTRACE_SECCOMP_GET_FILTER: errno ${e})`);
  }
  const out: SeccompFilter[] = [];
  for (let i = 0; ; i++) { // index 0 is the oldest
    const len = sys.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i, 0);
    if (len === -1) {
      if (errnoNow() === ENOENT) break;
      throw new CkptError(errnoNow(), 'checkpoint:seccomp', `task ${tid}: PTRACE_SECCOMP_GET_FILTER ${i}`);
    }
    const prog = Buffer.alloc(len * 8);
    if (sys.ptraceBuf(PTRACE_SECCOMP_GET_FILTER, tid, i, prog) !== len) throw new CkptError(errnoNow(), 'checkpoint:seccomp', `task ${tid}: filter ${i} changed while read`);
    const md = Buffer.alloc(16);
    md.writeBigUInt64LE(BigInt(i), 0);
    if (sys.ptraceBuf(PTRACE_SECCOMP_GET_METADATA, tid, md.length, md) === -1) throw new CkptError(errnoNow(), 'checkpoint:seccomp', `task ${tid}: PTRACE_SECCOMP_GET_METADATA ${i}`);
    out.push({ prog: prog.toString('base64'), flags: Number(md.readBigUInt64LE(8)) & SECCOMP_FILTER_FLAG_LOG });
  }
  if (out[0]?.prog !== supervisorFilter()) throw unsupported(tid, 'its oldest seccomp filter is not the supervisor\'s');
  return out.slice(1);
}

const PTRACE_O_SUSPEND_SECCOMP = 0x200000;

/**
 * The threads whose filters are suspended while the supervisor works on
 * them. `end` puts every filter back in force: it must run before any of
 * them (or of the tasks cloned from them) is resumed. Without
 * CAP_SYS_ADMIN nothing is suspended (a filter may then refuse an injected
 * call: that call fails with the filter's errno).
 */
export class SeccompSuspension {
  private readonly tids = new Set<number>();

  suspend(tid: number): void {
    if (sys.ptrace(PT.SETOPTIONS, tid, 0, TRACE_OPTIONS | PTRACE_O_SUSPEND_SECCOMP) === -1) {
      log.restore('task %d: seccomp filters not suspended (errno %d): injected calls go through them', tid, errnoNow());
      return;
    }
    this.tids.add(tid);
  }

  get active(): boolean {
    return this.tids.size > 0;
  }

  /** Filters in force again in the suspended threads and in `also` (tasks that may have inherited the suspension). */
  end(also: Iterable<number> = []): void {
    const all = new Set([...this.tids, ...(this.tids.size ? also : [])]);
    this.tids.clear();
    for (const tid of all) sys.ptrace(PT.SETOPTIONS, tid, 0, TRACE_OPTIONS); // a task gone needs nothing
  }
}

/**
 * A thread's filters for the TREE record, refusing those that cannot be
 * made again; a thread that has some is suspended in `susp` for the rest
 * of the capture.
 */
export function captureSeccomp(tid: number, susp: SeccompSuspension): SeccompFilter[] | undefined {
  const fs = readFilters(tid);
  for (const [i, f] of (fs ?? []).entries()) {
    const prog = Buffer.from(f.prog, 'base64');
    for (let pc = 0; pc < prog.length; pc += 8) {
      const code = prog.readUInt16LE(pc), k = prog.readUInt32LE(pc + 4);
      if (code === BPF_RET_A) throw unsupported(tid, `seccomp filter ${i + 1} returns a computed action (cannot tell whether it notifies a listener)`);
      if (code === BPF_RET_K && ((k & SECCOMP_RET_ACTION_FULL) >>> 0) === SECCOMP_RET_USER_NOTIF) throw unsupported(tid, `seccomp filter ${i + 1} notifies a user-space listener (SECCOMP_RET_USER_NOTIF): the listener cannot be made again`);
    }
  }
  if (!fs?.length) return undefined;
  susp.suspend(tid);
  return fs;
}

const same = (a: SeccompFilter, b: SeccompFilter) => a.prog === b.prog && a.flags === b.flags;
const isPrefix = (p: SeccompFilter[], of: SeccompFilter[]) => p.length <= of.length && p.every((f, i) => same(f, of[i]));
const describe = (fs: SeccompFilter[]) => `${fs.length} filter${fs.length === 1 ? '' : 's'}`;

/**
 * Rollback, before anything changes: every thread that stays must have no
 * filter the checkpoint lacks, and every thread or process to be made
 * again inherits the chain of the task it is cloned from (its leader; a
 * process, its parent's leader), which must be part of its own. Then the
 * filters of the live threads are suspended for the rollback: the
 * returned suspension must be ended before anything runs.
 */
export function checkSeccompRollback(processes: ProcessState[], liveTask: (tid: number) => Task | undefined, crid: number): SeccompSuspension {
  const current = new Map<number, SeccompFilter[]>();
  const chainOf = (tid: number) => {
    let c = current.get(tid);
    if (!c) current.set(tid, (c = readFilters(liveTask(tid)!.tid) ?? []));
    return c;
  };
  const byPid = new Map(processes.map((p) => [p.ids.pid, p]));
  // The chain a task gets: its own if it lives, else its creator's as that one will be then.
  const base = (p: ProcessState, tid: number): SeccompFilter[] => {
    if (liveTask(tid)) return chainOf(tid);
    if (tid !== p.ids.pid) return base(p, p.ids.pid);
    const parent = byPid.get(p.ids.ppid);
    return parent ? base(parent, parent.ids.pid) : [];
  };
  for (const p of processes) {
    for (const t of p.threads) {
      const want = t.seccomp ?? [];
      const has = base(p, t.tid);
      if (!isPrefix(has, want)) throw new CkptError(errno('EOPNOTSUPP'), 'restart:seccomp', `task ${liveTask(t.tid)?.tid ?? t.tid}: would have ${describe(has)} where checkpoint ${crid} had ${describe(want)}; seccomp filters cannot be removed from a live process`);
    }
  }
  const susp = new SeccompSuspension();
  for (const p of processes) for (const t of p.threads) if (current.get(t.tid)?.length) susp.suspend(liveTask(t.tid)!.tid);
  return susp;
}

/**
 * Install what each thread lacks of its checkpointed chain, as the very
 * last injected calls into the process (after the gadget is gone). `threads`:
 * the host tasks by checkpoint tid, the leader's under the process's pid.
 */
export function restoreSeccomp(tracer: Tracer, p: ProcessState, threads: Map<number, Task>): void {
  if (!p.threads.some((t) => t.seccomp?.length)) return;
  const plan = p.threads.map((t) => {
    const task = threads.get(t.tid)!;
    const want = t.seccomp ?? [];
    const has = readFilters(task.tid) ?? [];
    // Where a sandboxed caller's filters came along (a restart only: a
    // rollback refused this before), the checkpoint's go on top of them.
    let common = 0;
    while (common < has.length && common < want.length && same(has[common], want[common])) common++;
    const missing = common === has.length ? want.slice(common) : want;
    return { t, task, has, missing, regs: t.regs };
  });
  const leader = plan.find((x) => x.t.tid === p.ids.pid)!;
  // The part every thread lacks alike, from the same starting chain: once, by the leader, for all (TSYNC).
  let shared: SeccompFilter[] = [];
  if (plan.length > 1 && plan.every((x) => x.has.length === leader.has.length && isPrefix(x.has, leader.has))) {
    shared = leader.missing.slice();
    for (const x of plan) {
      let n = 0;
      while (n < shared.length && n < x.missing.length && same(shared[n], x.missing[n])) n++;
      shared.length = n;
    }
  }
  if (shared.length) {
    const res = install(tracer, leader.task, leader.regs, shared, SECCOMP_FILTER_FLAG_TSYNC);
    // TSYNC answers the id of a thread it could not bring along (a live
    // thread whose equal chain is made of other filter objects), and then
    // installs nothing: each thread installs its own instead.
    if (res === 0n) for (const x of plan) x.missing = x.missing.slice(shared.length);
  }
  for (const x of plan) if (x.missing.length) install(tracer, x.task, x.regs, x.missing, 0);
}

/**
 * seccomp(SECCOMP_SET_MODE_FILTER) of each filter in order, in `task`, the
 * programs written below its checkpointed stack pointer (`regs`) and the
 * bytes there put back afterwards. NO_NEW_PRIVS first if the thread lacks
 * it (under the supervisor every task has it from the launcher). Returns
 * the last call's result (TSYNC: 0 or the tid that could not follow).
 */
function install(tracer: Tracer, task: Task, regs: string, filters: SeccompFilter[], extra: number): bigint {
  const progs = filters.map((f) => Buffer.from(f.prog, 'base64'));
  const size = progs.reduce((n, b) => n + 16 + ((b.length + 15) & ~15), 0);
  const rsp = Buffer.from(regs, 'base64').readBigUInt64LE(19 * 8);
  const at = (rsp - 128n - BigInt(size) - 64n) & ~15n; // below the red zone
  const r = new Remote(tracer, task);
  let old: Buffer | undefined;
  try {
    old = r.mem.read(at, size);
    const where: bigint[] = [];
    let off = at;
    for (const b of progs) {
      const fprog = Buffer.alloc(16);
      fprog.writeUInt16LE(b.length / 8, 0);
      fprog.writeBigUInt64LE(off + 16n, 8);
      r.mem.write(off, fprog);
      r.mem.write(off + 16n, b);
      where.push(off);
      off += BigInt(16 + ((b.length + 15) & ~15));
    }
    if (readStatus(task.tid).get('NoNewPrivs') !== '1') r.check('restart:seccomp', 157 /* prctl */, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    let res = 0n;
    filters.forEach((f, i) => {
      res = r.check('restart:seccomp', SYS_seccomp, SECCOMP_SET_MODE_FILTER, f.flags | extra, where[i]);
    });
    return res;
  } finally {
    if (old) r.mem.write(at, old);
    r.mem.close(); // the registers are set from the checkpoint next
  }
}
