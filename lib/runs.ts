/**
 * Sets of address ranges, as sorted, disjoint, non-adjacent [start, end)
 * pairs of plain numbers (user addresses are below 2^47, exact in a double).
 * Dirty-page bookkeeping works on a few thousand of them per rollback, so
 * every operation is one linear merge.
 */
export type Runs = [number, number][];

/** Sort and merge (overlapping or touching ranges become one). */
export function normalize(list: Runs): Runs {
  const sorted = list.filter(([s, e]) => e > s).sort((a, b) => a[0] - b[0]);
  const out: Runs = [];
  for (const [s, e] of sorted) {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

export function union(a: Runs, b: Runs): Runs {
  if (!a.length) return b.map(([s, e]) => [s, e]);
  if (!b.length) return a.map(([s, e]) => [s, e]);
  return normalize([...a, ...b]);
}

export function intersect(a: Runs, b: Runs): Runs {
  const out: Runs = [];
  for (let i = 0, j = 0; i < a.length && j < b.length; ) {
    const s = Math.max(a[i][0], b[j][0]), e = Math.min(a[i][1], b[j][1]);
    if (s < e) out.push([s, e]);
    if (a[i][1] < b[j][1]) i++;
    else j++;
  }
  return out;
}

/** a without b. */
export function subtract(a: Runs, b: Runs): Runs {
  const out: Runs = [];
  let j = 0;
  for (const [s0, e] of a) {
    let s = s0;
    while (j < b.length && b[j][1] <= s) j++;
    for (let k = j; k < b.length && b[k][0] < e; k++) {
      if (b[k][0] > s) out.push([s, b[k][0]]);
      s = Math.max(s, b[k][1]);
    }
    if (s < e) out.push([s, e]);
  }
  return out;
}

export const runBytes = (a: Runs): number => a.reduce((n, [s, e]) => n + e - s, 0);

/** As { addr, len } ranges (what the memory copy helpers take). */
export const asRanges = (a: Runs): { addr: bigint; len: number }[] => a.map(([s, e]) => ({ addr: BigInt(s), len: e - s }));
