/**
 * The seccomp filter of a supervised tree: trap the ckpt syscall numbers to
 * the tracer (SECCOMP_RET_TRACE) and allow everything else, including other
 * architectures' syscalls, which must never be killed. A few ordinary calls are
 * trapped too, and only with the arguments that matter to us: madvise with
 * MADV_DONTFORK or MADV_WIPEONFORK (rare: set once on a region by the few
 * programs that use them), so that the stop of a checkpoint only looks for
 * memory fork does not copy in processes that ever asked for it; madvise
 * with advice that smaps shows as a VMA flag, and the lock calls, so that
 * only the rollbacks of processes that ever used them read smaps. Likewise
 * prctl PR_SET_PDEATHSIG, PR_SET_TIMERSLACK, PR_SET_CHILD_SUBREAPER and PR_SET_MDWE
 * (per-thread or uninherited values that only an injected call can read):
 * the stop asks for them only in processes that ever set one. Strict mode
 * (prctl PR_SET_SECCOMP, seccomp SECCOMP_SET_MODE_STRICT) is trapped to be
 * made a filter (syscalls/strict.ts). And alarm
 * and setitimer (set once, or now and then, by the programs that use
 * interval timers), so that only the processes that ever armed one have
 * them read during a stop. And the SysV semaphore and message queue calls,
 * so that a checkpoint knows which of those objects its tree uses and who
 * holds semaphore undo adjustments (syscalls/resources/sysvipc.ts).
 */
const BPF_LD_W_ABS = 0x20;
const BPF_JEQ_K = 0x15;
const BPF_JGE_K = 0x35;
const BPF_RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_RET_TRACE = 0x7ff00000;
const SYS_madvise = 28, SYS_prctl = 157, SYS_alarm = 37, SYS_setitimer = 38, SYS_seccomp = 317;
export const MADV_DONTFORK = 10, MADV_WIPEONFORK = 18;
export const PR_SET_PDEATHSIG = 1, PR_SET_TIMERSLACK = 29, PR_SET_CHILD_SUBREAPER = 36, PR_SET_SECCOMP = 22, PR_SET_MDWE = 65;
/** seccomp(2)'s operation that asks for strict mode (see syscalls/strict.ts). */
const SECCOMP_SET_MODE_STRICT = 0;
/** struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first). */
const DATA_NR = 0, DATA_ARCH = 4, DATA_ARG0 = 16, DATA_ARG2 = 32;

export type Insn = [code: number, jt: number, jf: number, k: number];

/** madvise advice that leaves VMA state a rollback must compare (see Tracer.vmAdvice). */
export const MADV_VM_STATE = [1 /* RANDOM */, 2 /* SEQUENTIAL */, 12 /* MERGEABLE */, 14 /* HUGEPAGE */, 15 /* NOHUGEPAGE */, 16 /* DONTDUMP */, 102 /* GUARD_INSTALL */, 103 /* GUARD_REMOVE */];
/** mlock, mlockall, munlockall, mlock2: always trapped (rare, and a fork does not pass the locks on). */
export const SYS_LOCKS = [149, 151, 152, 325];
/** semget, semop, semctl, msgget, msgsnd, msgrcv, msgctl, semtimedop: noted (which objects a tree uses; SEM_UNDO). */
export const SYS_SYSV = [64, 65, 66, 68, 69, 70, 71, 220];

/** A jump to a label (TRACE, ALLOW, RANGE: the ckpt numbers' check, next, or one of the program's), or a label. */
type Step = Insn | ['JEQ', number, string, string] | ['LABEL', string];

/** Trap [first, last], the noted madvise and prctl calls, the lock calls, alarm and setitimer on x86-64; the result is a struct sock_filter array. */
export function buildTrapFilter(first: number, last: number): Buffer {
  const advice = [MADV_DONTFORK, MADV_WIPEONFORK, ...MADV_VM_STATE];
  const options = [PR_SET_PDEATHSIG, PR_SET_TIMERSLACK, PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP, PR_SET_MDWE];
  // Each value tested in turn: equal -> `yes`, else the next test; the last one's else -> `no`.
  const anyOf = (ks: number[], yes: string, no: string): Step[] => ks.map((k, i) => ['JEQ', k, yes, i === ks.length - 1 ? no : 'next']);
  const steps: Step[] = [
    [BPF_LD_W_ABS, 0, 0, DATA_ARCH],
    ['JEQ', AUDIT_ARCH_X86_64, 'next', 'ALLOW'], // other arch -> allow
    [BPF_LD_W_ABS, 0, 0, DATA_NR],
    ...anyOf([...SYS_LOCKS, ...SYS_SYSV, SYS_alarm, SYS_setitimer], 'TRACE', 'next'),
    ['JEQ', SYS_seccomp, 'next', 'PRCTL'],
    [BPF_LD_W_ABS, 0, 0, DATA_ARG0], // the operation
    ['JEQ', SECCOMP_SET_MODE_STRICT, 'TRACE', 'ALLOW'],
    ['LABEL', 'PRCTL'],
    ['JEQ', SYS_prctl, 'next', 'MADVISE'],
    [BPF_LD_W_ABS, 0, 0, DATA_ARG0], // the option (an int: the low word)
    ...anyOf(options, 'TRACE', 'ALLOW'),
    ['LABEL', 'MADVISE'],
    ['JEQ', SYS_madvise, 'next', 'RANGE'],
    [BPF_LD_W_ABS, 0, 0, DATA_ARG2], // the advice (an int: the low word)
    ...anyOf(advice, 'TRACE', 'ALLOW'),
    ['LABEL', 'RANGE'],
    [BPF_JGE_K, 0, 2, first], // nr < first -> allow
    [BPF_JGE_K, 1, 0, last + 1], // nr > last -> allow
    ['LABEL', 'TRACE'],
    [BPF_RET_K, 0, 0, SECCOMP_RET_TRACE],
    ['LABEL', 'ALLOW'],
    [BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW],
  ];
  // Jumps are relative: lay the program out, then each jump is the distance to its label.
  const labels = new Map<string, number>();
  let pc = 0;
  for (const x of steps) x[0] === 'LABEL' ? labels.set(x[1], pc) : pc++;
  const code = steps.filter((x): x is Exclude<Step, ['LABEL', string]> => x[0] !== 'LABEL');
  const at = (label: string, pc: number) => (label === 'next' ? 0 : labels.get(label)! - pc - 1);
  const prog: Insn[] = code.map((x, pc) => (x[0] === 'JEQ' ? [BPF_JEQ_K, at(x[2], pc), at(x[3], pc), x[1]] : (x as Insn)));
  return encodeFilter(prog);
}

/** Instructions as the kernel takes them: a struct sock_filter array. */
export function encodeFilter(prog: Insn[]): Buffer {
  const buf = Buffer.alloc(prog.length * 8);
  prog.forEach(([code, jt, jf, k], i) => {
    buf.writeUInt16LE(code, i * 8);
    buf.writeUInt8(jt, i * 8 + 2);
    buf.writeUInt8(jf, i * 8 + 3);
    buf.writeUInt32LE(k >>> 0, i * 8 + 4);
  });
  return buf;
}

/** Run a classic-BPF seccomp program on (arch, nr): for unit tests. */
export function evalFilter(filter: Buffer, arch: number, nr: number, args: number[] = []): number {
  let acc = 0;
  for (let pc = 0; pc < filter.length / 8; ) {
    const code = filter.readUInt16LE(pc * 8);
    const jt = filter.readUInt8(pc * 8 + 2);
    const jf = filter.readUInt8(pc * 8 + 3);
    const k = filter.readUInt32LE(pc * 8 + 4);
    switch (code) {
      case BPF_LD_W_ABS: acc = k === DATA_ARCH ? arch : k === DATA_NR ? nr : k >= 16 && k % 8 === 0 ? (args[(k - 16) / 8] ?? 0) >>> 0 : 0; pc++; break;
      case BPF_JEQ_K: pc += 1 + (acc === k ? jt : jf); break;
      case BPF_JGE_K: pc += 1 + (acc >>> 0 >= k ? jt : jf); break;
      case BPF_RET_K: return k;
      default: throw new Error(`unknown BPF op ${code}`);
    }
  }
  throw new Error('filter fell off its end');
}
