/** ptrace constants, wait-status decoding and the register set, no policy. */
import { sys, errnoNow, addressOf } from './libc.js';
import { CkptError } from './errors.js';

export const PT = {
  PEEKDATA: 2, POKEDATA: 5, CONT: 7, KILL: 8, SINGLESTEP: 9, GETREGS: 12, SETREGS: 13,
  DETACH: 17, SYSCALL: 24, SETOPTIONS: 0x4200, GETEVENTMSG: 0x4201, GETSIGINFO: 0x4202,
  GETREGSET: 0x4204, SETREGSET: 0x4205, SEIZE: 0x4206, INTERRUPT: 0x4207, LISTEN: 0x4208,
  PEEKSIGINFO: 0x4209, GETSIGMASK: 0x420a, SETSIGMASK: 0x420b,
} as const;

export const PTRACE_O = {
  TRACESYSGOOD: 1, TRACEFORK: 2, TRACEVFORK: 4, TRACECLONE: 8, TRACEEXEC: 0x10,
  TRACEVFORKDONE: 0x20, TRACEEXIT: 0x40, TRACESECCOMP: 0x80, EXITKILL: 0x100000,
} as const;

export const PTRACE_EVENT = {
  FORK: 1, VFORK: 2, CLONE: 3, EXEC: 4, VFORK_DONE: 5, EXIT: 6, SECCOMP: 7, STOP: 128,
} as const;

export const NT_PRSTATUS = 1;
export const NT_X86_XSTATE = 0x202;

export const WALL = 0x40000000;
export const WNOHANG = 1;

export type WaitEvent =
  | { kind: 'exited'; pid: number; code: number }
  | { kind: 'killed'; pid: number; signal: number; core: boolean }
  /** A ptrace stop. `event` is a PTRACE_EVENT_* (0 for a plain signal stop). */
  | { kind: 'stopped'; pid: number; signal: number; event: number; syscallStop: boolean };

export function decodeWaitStatus(pid: number, status: number): WaitEvent {
  const low = status & 0x7f;
  if (low === 0) return { kind: 'exited', pid, code: (status >> 8) & 0xff };
  if (low !== 0x7f) return { kind: 'killed', pid, signal: low, core: (status & 0x80) !== 0 };
  const sig = (status >> 8) & 0xff;
  const event = (status >> 16) & 0xff;
  // TRACESYSGOOD marks syscall stops with 0x80 in the signal number.
  if (sig === (0x80 | 5)) return { kind: 'stopped', pid, signal: 5, event: 0, syscallStop: true };
  return { kind: 'stopped', pid, signal: sig, event, syscallStop: false };
}

/** user_regs_struct field order on x86-64 (27 x u64 = 216 bytes). */
const REG_NAMES = [
  'r15', 'r14', 'r13', 'r12', 'rbp', 'rbx', 'r11', 'r10', 'r9', 'r8', 'rax', 'rcx', 'rdx',
  'rsi', 'rdi', 'orig_rax', 'rip', 'cs', 'eflags', 'rsp', 'ss', 'fs_base', 'gs_base',
  'ds', 'es', 'fs', 'gs',
] as const;
export type RegName = (typeof REG_NAMES)[number];
export const REGS_SIZE = REG_NAMES.length * 8;

/** The general registers of one thread, kept as the raw NT_PRSTATUS bytes. */
export class Regs {
  constructor(readonly buf: Buffer = Buffer.alloc(REGS_SIZE)) {}
  get(name: RegName): bigint {
    return this.buf.readBigUInt64LE(REG_NAMES.indexOf(name) * 8);
  }
  /** Signed view, for rax / orig_rax which hold -errno and -1. */
  getSigned(name: RegName): bigint {
    return this.buf.readBigInt64LE(REG_NAMES.indexOf(name) * 8);
  }
  set(name: RegName, v: bigint | number): void {
    this.buf.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)), REG_NAMES.indexOf(name) * 8);
  }
  clone(): Regs {
    return new Regs(Buffer.from(this.buf));
  }
}

/** ptrace a request that must succeed; failure throws with errno and context. */
export function ptraceOrThrow(req: number, pid: number, addr: number | bigint = 0, data: number | bigint = 0): number {
  const r = sys.ptrace(req, pid, addr, data);
  if (r === -1) throw new CkptError(errnoNow(), `ptrace(${req})`, `task ${pid}`);
  return r;
}

function regset(req: number, pid: number, type: number, buf: Buffer): number {
  // struct iovec { void *base; size_t len; }
  const iov = Buffer.alloc(16);
  iov.writeBigUInt64LE(addressOf(buf), 0);
  iov.writeBigUInt64LE(BigInt(buf.length), 8);
  if (sys.ptraceBuf(req, pid, type, iov) === -1) {
    throw new CkptError(errnoNow(), req === PT.GETREGSET ? 'PTRACE_GETREGSET' : 'PTRACE_SETREGSET', `task ${pid} regset ${type}`);
  }
  return Number(iov.readBigUInt64LE(8));
}

export function getRegs(pid: number): Regs {
  const buf = Buffer.alloc(REGS_SIZE);
  regset(PT.GETREGSET, pid, NT_PRSTATUS, buf);
  return new Regs(buf);
}

export function setRegs(pid: number, regs: Regs): void {
  regset(PT.SETREGSET, pid, NT_PRSTATUS, regs.buf);
}

/**
 * The XSAVE area (FPU, SSE, AVX ...). The kernel tells its real size, the
 * same for every task of this machine: asked with a large buffer once, then
 * with one of that size (a 16 KiB request costs a 16 KiB zeroed kernel
 * buffer each time, a quarter of a thread's capture).
 */
const xstateSize = { bytes: 0 };
export function getXState(pid: number): Buffer {
  const buf = Buffer.alloc(xstateSize.bytes || 16384);
  const n = regset(PT.GETREGSET, pid, NT_X86_XSTATE, buf);
  if (!xstateSize.bytes) {
    xstateSize.bytes = n;
    return Buffer.from(buf.subarray(0, n));
  }
  return n === buf.length ? buf : buf.subarray(0, n);
}

export function setXState(pid: number, data: Buffer): void {
  regset(PT.SETREGSET, pid, NT_X86_XSTATE, Buffer.from(data));
}

export function getSigmask(pid: number): bigint {
  const b = Buffer.alloc(8);
  if (sys.ptraceBuf(PT.GETSIGMASK, pid, 8, b) === -1) throw new CkptError(errnoNow(), 'PTRACE_GETSIGMASK', `task ${pid}`);
  return b.readBigUInt64LE(0);
}

export function setSigmask(pid: number, mask: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(mask, 0);
  if (sys.ptraceBuf(PT.SETSIGMASK, pid, 8, b) === -1) throw new CkptError(errnoNow(), 'PTRACE_SETSIGMASK', `task ${pid}`);
}

export function getEventMsg(pid: number): number {
  const b = Buffer.alloc(8);
  if (sys.ptraceBuf(PT.GETEVENTMSG, pid, 0, b) === -1) throw new CkptError(errnoNow(), 'PTRACE_GETEVENTMSG', `task ${pid}`);
  return Number(b.readBigUInt64LE(0));
}
