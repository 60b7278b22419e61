/**
 * Copy-on-write sharing between a parent and its children, kept across a
 * restart.
 *
 * After fork a parent and its child map the very same page frames until
 * one of them writes. A restart that wrote each process's pages into its
 * own fresh mappings would double the memory of every preforked server.
 * So the capture notes, per private mapping of a child, the pages whose
 * frame is its parent's at the same address (`inherit` runs; only root
 * sees frame numbers in pagemap, so without it nothing is noted and each
 * process gets its own copy, as before); the image leaves those pages out
 * of the child's data. The restore fills the parent first and makes the
 * child a fork of it afterwards (rebuild.ts makeShells, `ready`): the child
 * keeps the inherited mapping as fork left it, drops (MADV_DONTNEED) every
 * page of it that is not inherited, and writes its own pages over it.
 * Same frame means same bytes, so whatever the parent wrote into the frame
 * since the fork is what the child must read too.
 *
 * A mapping is inherited only when fork gives the child exactly what it
 * had: the parent has the same range, protection, kind, file and offset,
 * and the same advice; none of the two is locked (mlock is not inherited),
 * MADV_DONTFORK, MADV_WIPEONFORK, droppable or guarded.
 *
 * A rollback ignores all this: it works on the live processes and their
 * husks, with every page of each.
 */
import { CkptError, errno } from '../../lib/errors.js';
import { SYS } from '../../lib/libc.js';
import { normalize, intersect, subtract, type Runs } from '../../lib/runs.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import type { MapEntry } from '../../lib/proc.js';
import { Pagemap } from './dirty.js';
import { vmaStart, vmaEnd, type VmaState, type MemoryCapture } from './memory.js';
import type { ProcessState } from '../state.js';

const PAGE = 4096, MADV_DONTNEED = 4;
const hex = (n: number) => '0x' + n.toString(16);
const asRuns = (runs: { addr: bigint; len: number }[]): Runs => normalize(runs.map((r) => [Number(r.addr), Number(r.addr) + r.len]));
const inheritRuns = (v: VmaState): Runs => (v.inherit ?? []).map(([s, e]) => [Number(s), Number(e)]);

/** Would fork give a child of a process with mapping `parent` exactly the child's mapping `v`? */
function forkGives(parent: VmaState, v: VmaState): boolean {
  const plain = (x: VmaState) => !x.shared && (x.kind === 'anon' || x.kind === 'file') && !x.dontfork && !x.wipeonfork && !x.droppable && !x.guards && !x.advice?.some((a) => a === 'lo' || a === 'lf');
  return plain(parent) && plain(v) && parent.start === v.start && parent.end === v.end && parent.prot === v.prot && parent.kind === v.kind &&
    parent.path === v.path && parent.offset === v.offset && !!parent.growsdown === !!v.growsdown &&
    [...(parent.advice ?? [])].sort().join() === [...(v.advice ?? [])].sort().join();
}

/**
 * Note in each child's mappings (`inherit`) the pages it shares with its
 * parent, read from the two husks' page frames (the husks share exactly
 * what the processes shared at the checkpoint). Only pages the child would
 * otherwise carry in the image are noted. Runs after the thaw: it costs
 * the subtree nothing.
 */
export function markInherited(processes: ProcessState[], husks: Map<number, number>, memory: Map<number, MemoryCapture>): void {
  const byPid = new Map(processes.map((p) => [p.ids.pid, p]));
  for (const p of processes) {
    const parent = byPid.get(p.ids.ppid);
    if (!parent || parent === p) continue;
    const pairs = p.memory.map((v) => ({ v, pv: parent.memory.find((x) => x.start === v.start) })).filter((x) => x.pv && forkGives(x.pv, x.v));
    if (!pairs.length) continue;
    const own = asRuns(memory.get(p.ids.pid)!.runs);
    const mine = new Pagemap(husks.get(p.ids.pid)!), theirs = new Pagemap(husks.get(parent.ids.pid)!);
    try {
      for (const { v } of pairs) {
        const s = Number(vmaStart(v)), e = Number(vmaEnd(v));
        const cand = intersect(own, [[s, e]]);
        if (!cand.length) continue;
        const same: Runs = [];
        for (const [cs, ce] of cand) {
          const a = mine.words(cs, ce), b = theirs.words(cs, ce);
          let run = -1;
          for (let i = 0; i <= (ce - cs) / PAGE; i++) {
            // An entry is two words: the frame number's low 32 bits, then
            // flags (bit 31 present) over the frame's high bits (0-22).
            const lo = a[2 * i], hi = a[2 * i + 1];
            const match = i < (ce - cs) / PAGE && (hi & 0x80000000) !== 0 && (lo !== 0 || (hi & 0x7fffff) !== 0) && lo === b[2 * i] && ((hi ^ b[2 * i + 1]) & 0x807fffff) === 0;
            if (match && run < 0) run = i;
            if (!match && run >= 0) {
              same.push([cs + run * PAGE, cs + i * PAGE]);
              run = -1;
            }
          }
        }
        if (!same.length) continue;
        v.inherit = same.map(([a, b]) => [hex(a), hex(b)]);
        v.pages -= same.reduce((n, [a, b]) => n + (b - a) / PAGE, 0);
      }
    } finally {
      mine.close();
      theirs.close();
    }
  }
}

/** The runs of `runs` a process carries itself: without the pages it inherits from its parent. */
export function ownRuns(vmas: VmaState[], runs: { addr: bigint; len: number }[]): { addr: bigint; len: number }[] {
  const inherited = normalize(vmas.flatMap(inheritRuns));
  if (!inherited.length) return runs;
  // Run by run: a run never spans two mappings (fillPages checks it lies in one), so none is merged with its neighbour.
  return runs.flatMap((r) => subtract([[Number(r.addr), Number(r.addr) + r.len]], inherited).map(([s, e]) => ({ addr: BigInt(s), len: e - s })));
}

/** Does process `p` need its parent's memory in place before it is made (it inherits pages)? */
export const inheritsMemory = (p: ProcessState): boolean => p.memory.some((v) => v.inherit?.length);

/** The mappings a fresh shell keeps as fork left them (its parent was filled first). */
export const inheritedVmas = (vmas: VmaState[]): VmaState[] => vmas.filter((v) => v.inherit?.length);

/**
 * In a shell made by fork of its filled parent: check that every inherited
 * mapping is there, then drop each page of it the child does not share, so
 * that it reads as the checkpoint had it (zeros, or the file's page) until
 * its own pages are written in.
 */
export function keepInherited(r: Remote, current: MapEntry[], vmas: VmaState[]): void {
  const b = new CallBatch(r);
  let n = 0;
  for (const v of vmas) {
    const s = vmaStart(v), e = vmaEnd(v);
    const covered = normalize(current.filter((m) => m.start < e && m.end > s && m.perms[3] === 'p').map((m) => [Number(m.start), Number(m.end)]));
    if (subtract([[Number(s), Number(e)]], covered).length) throw new CkptError(errno('EIO'), 'restart:memory', `task ${r.task.tid}: mapping ${v.start}-${v.end} was to come from its parent, which lacks it`);
    for (const [ds, de] of subtract([[Number(s), Number(e)]], inheritRuns(v))) {
      b.add('restart:memory madvise(DONTNEED)', SYS.madvise, ds, de - ds, MADV_DONTNEED);
      if (++n % 100 === 0) b.run(); // a batch holds 128 calls
    }
  }
  b.run();
}

/** What is wrong with the `inherit` runs of mapping `v` of a child of `parent`, or undefined. */
export function inheritIssue(v: VmaState, parent: ProcessState | undefined): string | undefined {
  if (!v.inherit) return undefined;
  const pv = parent?.memory.find((x) => x.start === v.start);
  if (!pv || !forkGives(pv, v)) return `mapping ${v.start}-${v.end} inherits pages from a parent that has no such mapping`;
  let at = Number(vmaStart(v));
  for (const [s, e] of inheritRuns(v)) {
    if (s < at || e <= s || e > Number(vmaEnd(v))) return `inherited pages ${hex(s)}-${hex(e)} are not in order inside ${v.start}-${v.end}`;
    at = e;
  }
  return undefined;
}
