/**
 * The seccomp filter of a supervised tree: trap the ckpt syscall numbers to
 * the tracer (SECCOMP_RET_TRACE) and allow everything else, including other
 * architectures' syscalls, which must never be killed. One ordinary call is
 * trapped too, and only with the arguments that matter to us: madvise with
 * MADV_DONTFORK or MADV_WIPEONFORK (rare: set once on a region by the few
 * programs that use them), so that the stop of a checkpoint only looks for
 * memory fork does not copy in processes that ever asked for it. Likewise
 * prctl PR_SET_PDEATHSIG, PR_SET_TIMERSLACK and PR_SET_CHILD_SUBREAPER
 * (per-thread or uninherited values that only an injected call can read):
 * the stop asks for them only in processes that ever set one.
 */
const BPF_LD_W_ABS = 0x20;
const BPF_JEQ_K = 0x15;
const BPF_JGE_K = 0x35;
const BPF_RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_RET_TRACE = 0x7ff00000;
const SYS_madvise = 28, SYS_prctl = 157;
export const MADV_DONTFORK = 10, MADV_WIPEONFORK = 18;
export const PR_SET_PDEATHSIG = 1, PR_SET_TIMERSLACK = 29, PR_SET_CHILD_SUBREAPER = 36;
/** struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first). */
const DATA_NR = 0, DATA_ARCH = 4, DATA_ARG0 = 16, DATA_ARG2 = 32;

type Insn = [code: number, jt: number, jf: number, k: number];

/** Trap [first, last], the fork-advice madvise calls and the noted prctl options on x86-64; the result is a struct sock_filter array. */
export function buildTrapFilter(first: number, last: number): Buffer {
  const prog: Insn[] = [
    /* 0 */ [BPF_LD_W_ABS, 0, 0, DATA_ARCH],
    /* 1 */ [BPF_JEQ_K, 0, 13, AUDIT_ARCH_X86_64], // other arch -> allow
    /* 2 */ [BPF_LD_W_ABS, 0, 0, DATA_NR],
    /* 3 */ [BPF_JEQ_K, 0, 3, SYS_madvise], // else -> 7
    /* 4 */ [BPF_LD_W_ABS, 0, 0, DATA_ARG2], // the advice (an int: the low word)
    /* 5 */ [BPF_JEQ_K, 8, 0, MADV_DONTFORK], // -> trace
    /* 6 */ [BPF_JEQ_K, 7, 8, MADV_WIPEONFORK], // -> trace, else allow
    /* 7 */ [BPF_JEQ_K, 0, 4, SYS_prctl], // else -> 12
    /* 8 */ [BPF_LD_W_ABS, 0, 0, DATA_ARG0], // the option (an int)
    /* 9 */ [BPF_JEQ_K, 4, 0, PR_SET_PDEATHSIG], // -> trace
    /* 10 */ [BPF_JEQ_K, 3, 0, PR_SET_TIMERSLACK], // -> trace
    /* 11 */ [BPF_JEQ_K, 2, 3, PR_SET_CHILD_SUBREAPER], // -> trace, else allow
    /* 12 */ [BPF_JGE_K, 0, 2, first], // nr < first -> allow
    /* 13 */ [BPF_JGE_K, 1, 0, last + 1], // nr > last -> allow
    /* 14 */ [BPF_RET_K, 0, 0, SECCOMP_RET_TRACE],
    /* 15 */ [BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW],
  ];
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
