/**
 * Signal dispositions of a process. Only signals that are caught or ignored
 * (SigCgt/SigIgn in /proc/PID/status) are queried, each with one injected
 * rt_sigaction; everything else is the default.
 */
import { readStatus } from '../../lib/proc.js';
import { SYS } from '../../lib/libc.js';
import type { Remote, CallBatch } from '../../supervisor/remote.js';
import { z, hex64, hexAddr, type Same } from '../../lib/schema.js';

export interface SigAction {
  handler: string; // hex; 0 = SIG_DFL, 1 = SIG_IGN
  flags: string;
  restorer: string;
  mask: string;
}
/** By signal number. */
export type SignalState = Record<string, SigAction>;

export const sigActionSchema = z.strictObject({ handler: hexAddr, flags: hex64, restorer: hexAddr, mask: hex64 });
/** Signal numbers 1..64 but SIGKILL and SIGSTOP, whose actions cannot change. */
export const signalStateSchema = z.record(
  z.string().regex(/^[1-9][0-9]?$/).refine((k) => Number(k) <= 64 && k !== '9' && k !== '19', 'no signal whose action can be set'),
  sigActionSchema,
);
const sameSignals: Same<z.infer<typeof signalStateSchema>, SignalState> = true;
void sameSignals;

const SIGKILL = 9, SIGSTOP = 19;
const KSIGACTION = 32; // struct kernel_sigaction: handler, flags, restorer, mask

/** Signals with a non-default disposition, from a /proc status map. */
export function nonDefaultSignals(status: Map<string, string>): number[] {
  const mask = BigInt('0x' + (status.get('SigCgt') ?? '0')) | BigInt('0x' + (status.get('SigIgn') ?? '0'));
  const out: number[] = [];
  for (let s = 1; s <= 64; s++) if (mask & (1n << BigInt(s - 1))) out.push(s);
  return out;
}

export function captureSignals(r: Remote, status: Map<string, string>): SignalState {
  const out: SignalState = {};
  const sigs = nonDefaultSignals(status);
  if (!sigs.length) return out;
  const buf = r.scratch();
  for (const sig of sigs) {
    r.check('checkpoint:signals', SYS.rt_sigaction, sig, 0, buf, 8);
    const b = r.mem.read(buf, KSIGACTION);
    out[sig] = {
      handler: b.readBigUInt64LE(0).toString(16),
      flags: b.readBigUInt64LE(8).toString(16),
      restorer: b.readBigUInt64LE(16).toString(16),
      mask: b.readBigUInt64LE(24).toString(16),
    };
  }
  return out;
}

/** Set every disposition the shell has or the image wants; defaults for the rest. */
export function restoreSignals(b: CallBatch, state: SignalState): void {
  const shellSigs = nonDefaultSignals(readStatus(b.r.task.tid));
  const sigs = [...new Set([...shellSigs, ...Object.keys(state).map(Number)])].filter((s) => s !== SIGKILL && s !== SIGSTOP).sort((a, b) => a - b);
  // One struct per signal side by side in scratch (up to 64 x 32 bytes).
  const acts = Buffer.alloc(KSIGACTION * sigs.length);
  sigs.forEach((sig, i) => {
    const a = state[sig];
    if (!a) return; // zeroes: SIG_DFL
    acts.writeBigUInt64LE(BigInt('0x' + a.handler), i * KSIGACTION);
    acts.writeBigUInt64LE(BigInt('0x' + a.flags), i * KSIGACTION + 8);
    acts.writeBigUInt64LE(BigInt('0x' + a.restorer), i * KSIGACTION + 16);
    acts.writeBigUInt64LE(BigInt('0x' + a.mask), i * KSIGACTION + 24);
  });
  if (!sigs.length) return;
  const at = b.put(acts);
  sigs.forEach((sig, i) => b.add(`restart:signals rt_sigaction(${sig})`, SYS.rt_sigaction, sig, at + BigInt(i * KSIGACTION), 0, 8));
}
