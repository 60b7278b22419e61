/**
 * kcmp(2): whether two processes share one kernel object (a file, an
 * address space, a descriptor table), and groups of sharers.
 */
import { sys } from './libc.js';

export const KCMP = { FILE: 0, VM: 1, FILES: 2 } as const;
const SYS_kcmp = 312;

/** 0 same, 1 / 2 ordered, -1 a task gone (errno set). */
export const kcmp = (a: number, b: number, type: number, i1 = 0, i2 = 0): number => sys.syscall(SYS_kcmp, a, b, type, i1, i2);

/**
 * The processes of `pids` that share one object of `type` with another of
 * them, group by group: kcmp orders the objects, so a sort puts sharers side
 * by side (n log n calls, not n squared).
 */
export function sharingGroups(pids: number[], type: number): number[][] {
  if (pids.length < 2) return [];
  const cmp = (a: number, b: number) => {
    const r = kcmp(a, b, type);
    return r === 1 ? -1 : r === 2 ? 1 : 0; // -1 (a task gone): keep the order
  };
  const sorted = [...pids].sort(cmp);
  const out: number[][] = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && kcmp(sorted[i], sorted[j], type) === 0) j++;
    if (j - i > 1) out.push(sorted.slice(i, j));
    i = j;
  }
  return out;
}
