/**
 * SECCOMP_MODE_STRICT under the supervisor. The kernel refuses strict mode
 * (EINVAL) to a thread already in filter mode, and every tracee is: the
 * supervisor's own filter traps the ckpt numbers. So the seccomp filter also
 * traps prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) and
 * seccomp(SECCOMP_SET_MODE_STRICT), and the call is turned, at its seccomp
 * stop, into the installation of the filter strict mode amounts to: read,
 * write, exit and rt_sigreturn allowed, anything else (and any other
 * architecture) ends the thread. The program's call then returns 0 and the
 * thread is as confined as strict mode would make it; the filter is kept by
 * checkpoints like any of the program's own (resources/seccomp.ts). What
 * differs: PR_GET_SECCOMP answers 2 (filter), and a forbidden call kills
 * with SIGSYS rather than SIGKILL.
 */
import { getRegs, setRegs } from '../lib/ptrace.js';
import { RemoteMem } from '../lib/mem.js';
import type { SyscallCtx } from './context.js';
import { notePrctl } from './resources/attrs.js';
import { encodeFilter, type Insn } from '../lib/seccomp.js';

const PR_SET_SECCOMP = 22, SECCOMP_MODE_STRICT = 1, SECCOMP_SET_MODE_STRICT = 0, SECCOMP_SET_MODE_FILTER = 1;
const SYS_seccomp = 317, SYS_prctl = 157;
const STRICT_ALLOWED = [0 /* read */, 1 /* write */, 60 /* exit */, 15 /* rt_sigreturn */];
const BPF_LD_W_ABS = 0x20, BPF_JEQ_K = 0x15, BPF_RET_K = 0x06;
const AUDIT_ARCH_X86_64 = 0xc000003e, SECCOMP_RET_KILL_THREAD = 0, SECCOMP_RET_ALLOW = 0x7fff0000;

/** The classic-BPF program of strict mode. */
export function strictProgram(): Buffer {
  const n = STRICT_ALLOWED.length;
  const prog: Insn[] = [
    [BPF_LD_W_ABS, 0, 0, 4], // arch
    [BPF_JEQ_K, 0, n + 1, AUDIT_ARCH_X86_64], // other arch -> kill
    [BPF_LD_W_ABS, 0, 0, 0], // nr
    ...STRICT_ALLOWED.map((nr, i): Insn => [BPF_JEQ_K, n - i, 0, nr]), // -> allow
    [BPF_RET_K, 0, 0, SECCOMP_RET_KILL_THREAD],
    [BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW],
  ];
  return encodeFilter(prog);
}

/** At the seccomp stop of prctl or seccomp: strict mode asked for is made a filter; anything else runs as asked. */
export function noteSeccompMode(ctx: SyscallCtx): void {
  const [a0, a1] = ctx.args.map((a) => Number(a & 0xffffffffn));
  const regs = getRegs(ctx.caller.tid);
  const nr = Number(regs.getSigned('orig_rax'));
  if (nr === SYS_prctl) {
    if (a0 !== PR_SET_SECCOMP) return notePrctl(ctx);
    if (a1 !== SECCOMP_MODE_STRICT) return;
  } else if (nr !== SYS_seccomp || a0 !== SECCOMP_SET_MODE_STRICT) return;
  // struct sock_fprog and its program, below the red zone of the stopped thread's stack.
  const prog = strictProgram();
  const at = ((regs.get('rsp') - 128n - BigInt(prog.length) - 16n) & ~15n);
  const fprog = Buffer.alloc(16);
  fprog.writeUInt16LE(prog.length / 8, 0);
  fprog.writeBigUInt64LE(at + 16n, 8);
  const mem = new RemoteMem(ctx.caller.tid, true);
  try {
    mem.write(at, Buffer.concat([fprog, prog]));
  } finally {
    mem.close();
  }
  regs.set('orig_rax', BigInt(SYS_seccomp));
  regs.set('rdi', BigInt(SECCOMP_SET_MODE_FILTER));
  regs.set('rsi', 0n);
  regs.set('rdx', at);
  setRegs(ctx.caller.tid, regs);
}
