/**
 * Sets of address ranges, as sorted, disjoint, non-adjacent [start, end)
 * pairs of plain numbers (user addresses are below 2^47, exact in a double).
 * Dirty-page bookkeeping works on a few thousand of them per rollback, so
 * every operation is one linear merge.
 */
export type Runs = [number, number][];

/** Sort and merge (overlapping or touching ranges become one). */
export function normalize(list: Runs): Runs {
  let sorted = true;
  for (let i = 1; i < list.length && sorted; i++) sorted = list[i - 1][0] <= list[i][0];
  const ordered = sorted ? list : [...list].sort((a, b) => a[0] - b[0]);
  const out: Runs = [];
  for (const [s, e] of ordered) {
    if (e <= s) continue;
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** Both sets: one merge of two sorted lists. */
export function union(a: Runs, b: Runs): Runs {
  const out: Runs = [];
  const push = ([s, e]: [number, number]) => {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  };
  let i = 0, j = 0;
  while (i < a.length || j < b.length) push(j >= b.length || (i < a.length && a[i][0] <= b[j][0]) ? a[i++] : b[j++]);
  return out;
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
