/**
 * The seccomp filter of a supervised tree: trap the ckpt syscall numbers to
 * the tracer (SECCOMP_RET_TRACE) and allow everything else, including other
 * architectures' syscalls, which must never be killed. A few ordinary calls are
 * trapped too, and only with the arguments that matter to us: madvise with
 * MADV_DONTFORK or MADV_WIPEONFORK (rare: set once on a region by the few
 * programs that use them), so that the stop of a checkpoint only looks for
 * memory fork does not copy in processes that ever asked for it. And
 * alarm and setitimer (set once, or now and then, by the programs that use
 * interval timers), so that only the processes that ever armed one have
 * them read during a stop.
 */
const BPF_LD_W_ABS = 0x20;
const BPF_JEQ_K = 0x15;
const BPF_JGE_K = 0x35;
const BPF_RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_RET_TRACE = 0x7ff00000;
const SYS_madvise = 28, SYS_alarm = 37, SYS_setitimer = 38;
export const MADV_DONTFORK = 10, MADV_WIPEONFORK = 18;
/** struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first). */
const DATA_NR = 0, DATA_ARCH = 4, DATA_ARG2 = 32;

type Insn = [code: number, jt: number, jf: number, k: number];

/** Trap [first, last], alarm, setitimer and the fork-advice madvise calls on x86-64; the result is a struct sock_filter array. */
export function buildTrapFilter(first: number, last: number): Buffer {
  const prog: Insn[] = [
    /* 0 */ [BPF_LD_W_ABS, 0, 0, DATA_ARCH],
    /* 1 */ [BPF_JEQ_K, 0, 10, AUDIT_ARCH_X86_64], // other arch -> allow
    /* 2 */ [BPF_LD_W_ABS, 0, 0, DATA_NR],
    /* 3 */ [BPF_JEQ_K, 7, 0, SYS_alarm], // -> trace
    /* 4 */ [BPF_JEQ_K, 6, 0, SYS_setitimer], // -> trace
    /* 5 */ [BPF_JEQ_K, 0, 3, SYS_madvise], // else -> 9
    /* 6 */ [BPF_LD_W_ABS, 0, 0, DATA_ARG2], // the advice (an int: the low word)
    /* 7 */ [BPF_JEQ_K, 3, 0, MADV_DONTFORK], // -> trace
    /* 8 */ [BPF_JEQ_K, 2, 3, MADV_WIPEONFORK], // -> trace, else allow
    /* 9 */ [BPF_JGE_K, 0, 2, first], // nr < first -> allow
    /* 10 */ [BPF_JGE_K, 1, 0, last + 1], // nr > last -> allow
    /* 11 */ [BPF_RET_K, 0, 0, SECCOMP_RET_TRACE],
    /* 12 */ [BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW],
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
