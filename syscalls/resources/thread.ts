/**
 * A thread's own state: general registers, the XSAVE area (FPU/SSE/AVX),
 * signal mask, rseq registration and robust futex list.
 */
import { CkptError, errno } from '../../lib/errors.js';
import { getRegs, setRegs, getXState, setXState, getSigmask, setSigmask, Regs, REGS_SIZE } from '../../lib/ptrace.js';
import { sys, SYS, addressOf } from '../../lib/libc.js';
import { callEach, type Remote, type CallBatch } from '../../supervisor/remote.js';
import type { RemoteMem } from '../../lib/mem.js';
import { threadAttrsSchema, type ThreadAttrs } from './attrs.js';
import { seccompFilterSchema, type SeccompFilter } from './seccomp.js';
import { z, int, u32, pid, addr, hex64, base64, siginfo, hexBelow, MANY, type Same } from '../../lib/schema.js';

const PTRACE_GET_RSEQ_CONFIGURATION = 0x420f, PTRACE_PEEKSIGINFO = 0x4209, PTRACE_PEEKSIGINFO_SHARED = 1;
const SIGINFO = 128, SYS_rt_tgsigqueueinfo = 297, SYS_rt_sigqueueinfo = 129;

/** Pending signals of a stopped thread (or, `shared`, of its process), without dequeuing them. */
export function peekPending(tid: number, shared: boolean): string[] | undefined {
  const out: string[] = [];
  const buf = Buffer.alloc(SIGINFO * 32);
  const args = Buffer.alloc(16);
  for (let off = 0; ; off += 32) {
    args.writeBigUInt64LE(BigInt(off), 0);
    args.writeUInt32LE(shared ? PTRACE_PEEKSIGINFO_SHARED : 0, 8);
    args.writeInt32LE(32, 12);
    const n = sys.ptraceBuf(PTRACE_PEEKSIGINFO, tid, addressOf(args), buf);
    if (n <= 0) break;
    for (let i = 0; i < n; i++) out.push(buf.subarray(i * SIGINFO, (i + 1) * SIGINFO).toString('base64'));
    if (n < 32) break;
  }
  return out.length ? out : undefined;
}

/**
 * Queue pending signals again, from inside the process itself (which may
 * send itself any siginfo). Done last, with the mask already in place, so
 * blocked ones stay pending as they were.
 */
export function requeuePending(r: Remote, tid: number, tgid: number, infos: string[] | undefined, shared: boolean): void {
  for (const i of infos ?? []) {
    const info = Buffer.from(i, 'base64');
    if (info.length !== SIGINFO) throw new CkptError(errno('EBADMSG'), 'restart:signals', `task ${tid}: siginfo of ${info.length} bytes`);
    r.mem.write(r.scratch(), info);
    const sig = info.readInt32LE(0);
    if (shared) r.check('restart:signals', SYS_rt_sigqueueinfo, tgid, sig, r.scratch());
    else r.check('restart:signals', SYS_rt_tgsigqueueinfo, tgid, tid, sig, r.scratch());
  }
}
/**
 * A live process rolled back: the signals queued for it since the
 * checkpoint go, so that the checkpoint's own are queued again without
 * doubling. Added to `b` (a batch of the thread `tid`): one zero-timeout
 * rt_sigtimedwait per queued siginfo (a thread's own queue is taken
 * before the process's, so the leader's batch drains the shared queue
 * after its own).
 */
export function drainPending(b: CallBatch, tid: number, shared: boolean): void {
  const n = (peekPending(tid, false)?.length ?? 0) + (shared ? peekPending(tid, true)?.length ?? 0 : 0);
  if (!n) return;
  const all = b.put(Buffer.alloc(8, 0xff)); // the kernel leaves out SIGKILL and SIGSTOP
  const now = b.put(Buffer.alloc(16)); // a zero timeout
  for (let i = 0; i < n; i++) b.add(undefined, SYS_rt_sigtimedwait, all, 0, now, 8);
}
const SYS_rt_sigtimedwait = 128;
const RSEQ_FLAG_UNREGISTER = 1;
const SYS_rseq = 334, SYS_get_robust_list = 274;

export interface ThreadState {
  tid: number;
  regs: string; // base64 NT_PRSTATUS
  xstate: string; // base64 NT_X86_XSTATE
  sigmask: string; // hex
  rseq?: { addr: string; size: number; sig: number };
  robustList?: { head: string; len: number };
  /** clear_child_tid (set_tid_address): where the kernel zeroes the tid at exit. */
  tidAddress?: string;
  /** Signals pending for this thread only, as siginfo (base64, 128 bytes each). */
  pending?: string[];
  /** sigaltstack: base, flags, size (SS_DISABLE = 2 when none). */
  altstack?: { sp: string; flags: number; size: string };
  /** The program's own seccomp filters, oldest first (the supervisor's left out): see seccomp.ts. */
  seccomp?: SeccompFilter[];
  /** Scheduling, affinity, name, timer slack, pdeathsig, capabilities (attrs.ts). */
  attrs?: ThreadAttrs;
}

const SS_ONSTACK = 1, SS_DISABLE = 2, SS_AUTODISARM = 1 << 31;
export const threadSchema = z.strictObject({
  tid: pid,
  regs: base64(REGS_SIZE, REGS_SIZE),
  xstate: base64(1 << 16),
  sigmask: hex64,
  rseq: z.strictObject({ addr, size: int(0, 4096), sig: u32 }).optional(),
  robustList: z.strictObject({ head: addr, len: int(0, 4096) }).optional(),
  tidAddress: addr.optional(),
  pending: z.array(siginfo).max(MANY).optional(),
  altstack: z.strictObject({
    sp: addr,
    flags: int(-(2 ** 31), 2 ** 31 - 1).refine((f) => (f & ~(SS_ONSTACK | SS_DISABLE | SS_AUTODISARM)) === 0, 'unknown sigaltstack flags'),
    size: hexBelow(1n << 47n),
  }).optional(),
  seccomp: z.array(seccompFilterSchema).max(512).optional(),
  attrs: threadAttrsSchema.optional(),
});
const sameThread: Same<z.infer<typeof threadSchema>, ThreadState> = true;
void sameThread;

export function rseqConfig(tid: number): ThreadState['rseq'] {
  const b = Buffer.alloc(32);
  if (sys.ptraceBuf(PTRACE_GET_RSEQ_CONFIGURATION, tid, b.length, b) === -1) return undefined;
  const addr = b.readBigUInt64LE(0);
  if (addr === 0n) return undefined;
  return { addr: '0x' + addr.toString(16), size: b.readUInt32LE(8), sig: b.readUInt32LE(12) };
}

function robustList(tid: number): ThreadState['robustList'] {
  const head = Buffer.alloc(8), len = Buffer.alloc(8);
  if (sys.syscall(SYS_get_robust_list, tid, addressOf(head), addressOf(len)) !== 0) return undefined;
  const h = head.readBigUInt64LE(0);
  return h === 0n ? undefined : { head: '0x' + h.toString(16), len: Number(len.readBigUInt64LE(0)) };
}

/**
 * Capture a stopped thread. `inCheckpointCall`: this thread is the caller of
 * checkpoint, so after a restart it must see that call return 0.
 * `callInFlight`: it is inside a ckpt call of its own that is in flight.
 */
const ERESTART_RESTARTBLOCK = -516n;

export function captureThread(tid: number, inCheckpointCall: boolean, regsNow?: Regs, callInFlight = false): ThreadState {
  const regs = regsNow ?? getRegs(tid);
  if (inCheckpointCall) {
    regs.set('rax', 0);
    regs.set('orig_rax', -1n);
  } else if (callInFlight) {
    // Another thread inside a ckpt call in flight (its seccomp stop): it
    // comes back about to make that call again, as after a signal with
    // SA_RESTART.
    regs.set('rax', regs.get('orig_rax'));
    regs.set('rip', regs.get('rip') - 2n);
    regs.set('orig_rax', -1n);
  } else if (regs.getSigned('rax') === ERESTART_RESTARTBLOCK && regs.getSigned('orig_rax') >= 0n) {
    // A call the kernel would go on with through restart_syscall (poll,
    // nanosleep, clock_nanosleep, futex waits with a timeout...): its
    // restart block is kernel state a new thread lacks, and restart_syscall
    // there gives EINTR, which a program that blocked every signal never
    // expects (GNU tail -f, script). No handler ran, so the kernel would
    // have restarted it: it is made again with the same arguments (they are
    // still in their registers). A relative timeout starts afresh (the time
    // already waited is not known); an absolute one is exact.
    regs.set('rax', regs.get('orig_rax'));
    regs.set('rip', regs.get('rip') - 2n);
    regs.set('orig_rax', -1n);
  }
  return {
    tid,
    regs: regs.buf.toString('base64'),
    xstate: getXState(tid).toString('base64'),
    sigmask: getSigmask(tid).toString(16),
    rseq: rseqConfig(tid),
    robustList: robustList(tid),
    pending: peekPending(tid, false),
  };
}

const SYS_sigaltstack = 131, SYS_set_tid_address = 218;
/** offsetof(struct pthread, tid) in glibc 2.3x on x86-64: tried first. */
const GLIBC_TID_OFFSET = 0x2d0n;

/**
 * clear_child_tid cannot be read back through ptrace. glibc points it at
 * its thread descriptor's tid field, which lives at fs_base: find the word
 * there that holds this thread's id. Without it pthread_join would hang.
 */
export function findTidAddress(mem: RemoteMem, tid: number, fsBase: bigint): ThreadState['tidAddress'] {
  if (fsBase === 0n) return undefined;
  try {
    const tcb = mem.read(fsBase, 0x1000);
    const at = (off: number) => tcb.readInt32LE(off) === tid;
    if (at(Number(GLIBC_TID_OFFSET))) return '0x' + (fsBase + GLIBC_TID_OFFSET).toString(16);
    for (let off = 16; off < tcb.length; off += 4) if (at(off)) return '0x' + (fsBase + BigInt(off)).toString(16);
  } catch { /* no readable TCB there */ }
  return undefined;
}

/** sigaltstack(NULL, &old) in each stopped thread, their round trips overlapping. */
export function captureAltstacks(rs: Remote[]): ThreadState['altstack'][] {
  const q = new AltstackQuery(rs);
  try {
    return q.answers(callEach(rs, (_, i) => q.call(i)));
  } finally {
    q.putBack();
  }
}

/**
 * The alternate signal stacks of several stopped threads: one sigaltstack
 * each, answered into a few bytes of the thread's own stack rather than a
 * mapped scratch page. `call` gives each thread's call, for a round of
 * injected calls the caller runs (with others: see callEach); `answers`
 * reads the results; `putBack` restores those stack bytes, always.
 */
export class AltstackQuery {
  private readonly slots;
  constructor(private readonly rs: Remote[]) {
    this.slots = rs.map((r) => r.stackScratch(24));
  }

  call(i: number): [number, ...(bigint | number)[]] {
    return [SYS_sigaltstack, 0, this.slots[i]?.addr ?? this.rs[i].scratch()];
  }

  answers(res: bigint[]): ThreadState['altstack'][] {
    return this.rs.map((r, i) => {
      if (res[i] < 0n) throw new CkptError(Number(-res[i]), 'checkpoint:sigaltstack', `task ${r.task.tid}: sigaltstack failed`);
      const b = r.mem.read(this.slots[i]?.addr ?? r.scratch(), 24);
      return { sp: '0x' + b.readBigUInt64LE(0).toString(16), flags: b.readInt32LE(8), size: '0x' + b.readBigUInt64LE(16).toString(16) };
    });
  }

  putBack(): void {
    for (const s of this.slots) s?.putBack();
  }
}

/**
 * Before the task's memory changes: drop its rseq area (a fresh shell's is
 * the caller's), unless it already is `want` (a live thread rolled back that
 * kept it): then nothing is done, and true says there is nothing to register.
 */
export function dropRseq(r: Remote, want?: ThreadState['rseq']): boolean {
  const cur = rseqConfig(r.task.tid);
  if (cur && want && cur.addr === want.addr && cur.size === want.size && cur.sig === want.sig) return true;
  if (cur) r.check('restart:rseq', SYS_rseq, BigInt(cur.addr), cur.size, RSEQ_FLAG_UNREGISTER, cur.sig);
  return false;
}

/** The parts that need injected syscalls (while the gadget is still there); `rseqKept`: see dropRseq. */
export function restoreThreadSyscalls(b: CallBatch, t: ThreadState, rseqKept = false): void {
  // The shell inherited the caller's alternate stack: replace it (or disable).
  const alt = t.altstack ?? { sp: '0x0', flags: 2, size: '0x0' };
  const ss = Buffer.alloc(24);
  ss.writeBigUInt64LE(BigInt(alt.sp), 0);
  ss.writeInt32LE(alt.flags & 2, 8); // SS_ONSTACK is a status, not a setting
  ss.writeBigUInt64LE(BigInt(alt.size), 16);
  b.add('restart:sigaltstack', SYS_sigaltstack, b.put(ss), 0);
  if (t.tidAddress) b.add('restart:tid_address', SYS_set_tid_address, BigInt(t.tidAddress));
  if (t.robustList) b.add('restart:robust_list', SYS.set_robust_list, BigInt(t.robustList.head), t.robustList.len);
  if (t.rseq && !rseqKept) b.add('restart:rseq', SYS_rseq, BigInt(t.rseq.addr), t.rseq.size, 0, t.rseq.sig);
}

/** The final register state, set once no more syscalls will be injected. */
export function restoreThreadRegs(tid: number, t: ThreadState): void {
  const regs = new Regs(Buffer.from(t.regs, 'base64'));
  if (regs.buf.length !== REGS_SIZE) throw new CkptError(errno('EBADMSG'), 'restart:registers', `task ${tid}: register set of ${regs.buf.length} bytes`);
  try {
    setXState(tid, Buffer.from(t.xstate, 'base64'));
  } catch (e) {
    throw new CkptError(errno('ENOEXEC'), 'restart:registers', `task ${tid}: this CPU refuses the image's FPU/vector state: ${(e as Error).message}`);
  }
  setSigmask(tid, BigInt('0x' + t.sigmask));
  setRegs(tid, regs);
}
