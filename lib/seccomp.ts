/**
 * The seccomp filter of a supervised tree: trap the ckpt syscall numbers to
 * the tracer (SECCOMP_RET_TRACE) and allow everything else, including other
 * architectures' syscalls, which must never be killed.
 */
const BPF_LD_W_ABS = 0x20;
const BPF_JEQ_K = 0x15;
const BPF_JGE_K = 0x35;
const BPF_RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_RET_TRACE = 0x7ff00000;

type Insn = [code: number, jt: number, jf: number, k: number];

/** Trap [first, last] on x86-64; the result is a struct sock_filter array. */
export function buildTrapFilter(first: number, last: number): Buffer {
  const prog: Insn[] = [
    [BPF_LD_W_ABS, 0, 0, 4], // seccomp_data.arch
    [BPF_JEQ_K, 0, 4, AUDIT_ARCH_X86_64], // other arch -> allow
    [BPF_LD_W_ABS, 0, 0, 0], // seccomp_data.nr
    [BPF_JGE_K, 0, 2, first], // nr < first -> allow
    [BPF_JGE_K, 1, 0, last + 1], // nr > last -> allow
    [BPF_RET_K, 0, 0, SECCOMP_RET_TRACE],
    [BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW],
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
export function evalFilter(filter: Buffer, arch: number, nr: number): number {
  let acc = 0;
  for (let pc = 0; pc < filter.length / 8; ) {
    const code = filter.readUInt16LE(pc * 8);
    const jt = filter.readUInt8(pc * 8 + 2);
    const jf = filter.readUInt8(pc * 8 + 3);
    const k = filter.readUInt32LE(pc * 8 + 4);
    switch (code) {
      case BPF_LD_W_ABS: acc = k === 4 ? arch : k === 0 ? nr : 0; pc++; break;
      case BPF_JEQ_K: pc += 1 + (acc === k ? jt : jf); break;
      case BPF_JGE_K: pc += 1 + (acc >>> 0 >= k ? jt : jf); break;
      case BPF_RET_K: return k;
      default: throw new Error(`unknown BPF op ${code}`);
    }
  }
  throw new Error('filter fell off its end');
}
