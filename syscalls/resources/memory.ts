/**
 * Memory: capture and restore of a process's mappings and page contents.
 *
 * Capture describes every VMA, then streams only the pages that hold data of
 * their own: for anonymous memory the pages present or swapped, for private
 * file mappings the pages the program modified (present and no longer the
 * file's page). Unmodified file pages come back from the file itself.
 */
import { sharingGroups, KCMP } from '../../lib/kcmp.js';
import fs from 'node:fs';
import crypto from 'node:crypto';
import { CkptError, errno, errnoName } from '../../lib/errors.js';
import { readSmaps, readMaps, readPagemapFlags, type MapEntry, PM_PRESENT, PM_SWAP, PM_FILE, PM_GUARD } from '../../lib/proc.js';
import { Pagemap, PAGE as PG } from './dirty.js';
import { RemoteMem } from '../../lib/mem.js';
import type { ImageHeader } from '../../lib/image.js';
import { SYS } from '../../lib/libc.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { isShm, shmKeyOfMap, type ShmCapture, type ShmRestore } from './shm.js';
import { z, int, path, pageAddr, hexBelow, MANY, type Same } from '../../lib/schema.js';
import { isAioRing, refuseUringMapping } from './aio.js';

const PAGE = 4096n;
const PROT_READ = 1, PROT_WRITE = 2, PROT_EXEC = 4;
const MAP_SHARED = 1, MAP_PRIVATE = 2, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20, MAP_GROWSDOWN = 0x100;
const MAP_FIXED_NOREPLACE = 0x100000, MAP_POPULATE = 0x8000, MADV_DONTFORK = 10, MADV_WIPEONFORK = 18;
const MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2;
const O_RDONLY = 0, O_RDWR = 2, O_CLOEXEC = 0o2000000, AT_FDCWD = -100;

/** The kernel's special mappings that move as one group, in address order. */
const SPECIAL = ['[vvar]', '[vvar_vclock]', '[vdso]'];

export interface VmaState {
  start: string; // hex
  end: string;
  prot: number;
  shared: boolean;
  kind: 'anon' | 'file' | 'special' | 'shm' | 'sysv';
  /** kind 'shm': the shared memory object ("dev:ino", see shm.ts). */
  shmKey?: string;
  /** kind 'sysv': the SysV shm segment's id (attached again with shmat; see sysvipc.ts). */
  sysvId?: number;
  name?: string; // "[heap]", "[stack]", "[vdso]" ...
  path?: string;
  offset?: string;
  growsdown?: boolean;
  /** MADV_DONTFORK: a husk cannot hold it, so its pages were copied during the stop. */
  dontfork?: boolean;
  /** MADV_WIPEONFORK: a husk has it empty, so its pages were copied during the stop. */
  wipeonfork?: boolean;
  /**
   * madvise and mlock state, as smaps VmFlags names it: dd (MADV_DONTDUMP),
   * hg / nh (MADV_HUGEPAGE / NOHUGEPAGE), rr / sr (MADV_RANDOM / SEQUENTIAL),
   * mg (MADV_MERGEABLE), lo (mlocked), lf (lo with MLOCK_ONFAULT).
   */
  advice?: string[];
  /** MAP_DROPPABLE (VmFlags dp): mapped so again; its pages are not kept in memory checkpoints (a husk has them dropped). */
  droppable?: boolean;
  /** Guard pages (MADV_GUARD_INSTALL, VmFlags gu; pagemap's guard bit, Linux 6.14), page runs [start, end) in hex. */
  guards?: [string, string][];
  /** A shared file mapping without PROT_WRITE that may be made writable (VmFlags mw): the file is opened for writing again. */
  mayWrite?: boolean;
  /** Identity of a mapped file, checked before it is mapped again. */
  file?: { size: number; mtimeMs: number };
  /**
   * Pages shared copy-on-write with the parent's at the same address at
   * the checkpoint (page runs [start, end) in hex): left out of the image,
   * they come back shared by making the process a fork of its filled
   * parent (cowshare.ts). A rollback ignores them.
   */
  inherit?: [string, string][];
  /** Pages of this VMA the image carries. */
  pages: number;
}

/** One mapping of an image; bounds against the other mappings are checked with the process (state.ts). */
export const vmaSchema = z.strictObject({
  start: pageAddr,
  end: pageAddr,
  prot: int(0, 7),
  shared: z.boolean(),
  kind: z.enum(['anon', 'file', 'special', 'shm', 'sysv']),
  shmKey: z.string().min(1).max(64).optional(),
  sysvId: int(0, 2 ** 31 - 1).optional(),
  name: z.string().max(4096).optional(),
  path: path.optional(),
  offset: hexBelow(1n << 63n).optional(),
  growsdown: z.boolean().optional(),
  dontfork: z.boolean().optional(),
  wipeonfork: z.boolean().optional(),
  advice: z.array(z.enum(['dd', 'hg', 'nh', 'rr', 'sr', 'mg', 'lo', 'lf'])).max(16).optional(),
  droppable: z.boolean().optional(),
  guards: z.array(z.tuple([pageAddr, pageAddr])).max(MANY).optional(),
  inherit: z.array(z.tuple([pageAddr, pageAddr])).max(MANY).optional(),
  mayWrite: z.boolean().optional(),
  file: z.strictObject({ size: int(0, Number.MAX_SAFE_INTEGER), mtimeMs: z.number().min(0).max(1e16) }).optional(),
  pages: int(0, MANY * 64),
}).superRefine((v, ctx) => {
  const len = BigInt(v.end) - BigInt(v.start);
  if (len <= 0n) ctx.addIssue({ code: 'custom', path: ['end'], message: `mapping ends at ${v.end}, not after its start ${v.start}` });
  else if (BigInt(v.pages) * PAGE > len) ctx.addIssue({ code: 'custom', path: ['pages'], message: `${v.pages} pages in a mapping of ${len} bytes` });
  if (v.kind === 'file' && v.path === undefined) ctx.addIssue({ code: 'custom', path: ['path'], message: 'a file mapping without its path' });
  if (v.kind === 'sysv' && (v.sysvId === undefined || v.offset === undefined || BigInt(v.offset) % PAGE !== 0n)) ctx.addIssue({ code: 'custom', path: ['sysvId'], message: 'a SysV shm mapping without its segment or offset' });
  if (v.kind === 'shm' && v.shmKey === undefined) ctx.addIssue({ code: 'custom', path: ['shmKey'], message: 'a shared memory mapping without its object' });
  if (v.kind === 'special' && !SPECIAL.includes(v.name ?? '')) ctx.addIssue({ code: 'custom', path: ['name'], message: `no special mapping ${v.name}` });
});
const vmaSame: Same<z.infer<typeof vmaSchema>, VmaState> = true;
void vmaSame;

const hex = (v: bigint) => '0x' + v.toString(16);
/** A name a program gave anonymous memory (prctl PR_SET_VMA_ANON_NAME), as maps shows it. */
const ANON_NAME = /^\[anon:(.{1,80})\]$/s;
const PR_SET_VMA = 0x53564d41, PR_SET_VMA_ANON_NAME = 0;
export const vmaStart = (v: VmaState) => BigInt(v.start);
export const vmaEnd = (v: VmaState) => BigInt(v.end);

function protOf(perms: string): number {
  return (perms[0] === 'r' ? PROT_READ : 0) | (perms[1] === 'w' ? PROT_WRITE : 0) | (perms[2] === 'x' ? PROT_EXEC : 0);
}

const unsupported = (pid: number, what: string) =>
  new CkptError(errno('EOPNOTSUPP'), 'checkpoint:memory', `task ${pid}: ${what}`);

/** The VmFlags a restore sets again with madvise, and the advice for each. */
const ADVICE: Record<string, number> = { rr: 1, sr: 2, mg: 12, hg: 14, nh: 15, dd: 16 };
const KEPT_FLAGS = [...Object.keys(ADVICE), 'lo', 'lf'];
const MLOCK_ONFAULT = 1;

/** The kept advice among a mapping's VmFlags (undefined: none). */
export function adviceOf(flags: string[] | undefined): string[] | undefined {
  const a = flags?.filter((f) => KEPT_FLAGS.includes(f));
  return a?.length ? a : undefined;
}

/** Does a live mapping carry the checkpoint VMA's advice, no more, no less? */
export function sameAdvice(flags: string[], v: VmaState): boolean {
  const a = adviceOf(flags) ?? [], b = v.advice ?? [];
  return a.length === b.length && a.every((x) => b.includes(x));
}

/** The calls that give a freshly mapped VMA its advice back (madvise, mlock2). */
function adviceCalls(pid: number, v: VmaState): (number | bigint)[][] {
  const len = vmaEnd(v) - vmaStart(v);
  const calls: (number | bigint)[][] = [];
  for (const [gs, ge] of v.guards ?? []) {
    // Clipped to the VMA: a rollback maps a VMA again in parts.
    const s = BigInt(gs) > vmaStart(v) ? BigInt(gs) : vmaStart(v), e = BigInt(ge) < vmaEnd(v) ? BigInt(ge) : vmaEnd(v);
    if (s < e) calls.push([SYS.madvise, s, e - s, MADV_GUARD_INSTALL]);
  }
  for (const f of v.advice ?? []) {
    if (f === 'lf') continue;
    if (f === 'lo') calls.push([SYS.mlock2, vmaStart(v), len, v.advice!.includes('lf') ? MLOCK_ONFAULT : 0]);
    else if (ADVICE[f] !== undefined) calls.push([SYS.madvise, vmaStart(v), len, ADVICE[f]]);
    else throw new CkptError(errno('EBADMSG'), 'restart:memory', `task ${pid}: unknown advice ${JSON.stringify(f)} for ${v.start}-${v.end}`);
  }
  return calls;
}

const MADV_GUARD_INSTALL = 102, MAP_DROPPABLE = 0x08;
const SYS_shmat = 30, SHM_RDONLY = 0o10000, SHM_REMAP = 0o40000, SHM_EXEC = 0o100000;

/** The runs of guard pages among a VMA's pagemap flag bytes. */
function guardRuns(start: bigint, entries: Uint8Array): [string, string][] | undefined {
  const out: [string, string][] = [];
  for (let i = 0; i < entries.length; i++) {
    if (!(entries[i] & PM_GUARD)) continue;
    let j = i;
    while (j < entries.length && entries[j] & PM_GUARD) j++;
    out.push([hex(start + BigInt(i) * PAGE), hex(start + BigInt(j) * PAGE)]);
    i = j;
  }
  return out.length ? out : undefined;
}

/**
 * Must a rollback read the live process's VmFlags (smaps, slower than maps)?
 * Where advice may have been given since (`advised`), or the checkpoint has
 * state only VmFlags tell apart (guard pages, MAP_DROPPABLE).
 */
export function needsVmFlags(advised: boolean, vmas: VmaState[]): boolean {
  return advised || vmas.some((v) => v.guards || v.droppable);
}

/**
 * Can a live mapping with VmFlags `flags` stand for checkpoint VMA `v` as it
 * is, as far as its flags go? Guard pages are never compared page by page:
 * such a part is mapped again, and its guards installed again.
 */
export function sameVmFlags(flags: string[], v: VmaState): boolean {
  return sameAdvice(flags, v) && flags.includes('dp') === !!v.droppable && !flags.includes('gu') && !v.guards;
}

/** Is any memory of the process locked (VmLck of /proc/PID/status)? fork does not pass locks on. */
const hasLocks = (status?: Map<string, string>) => !!status && parseInt(status.get('VmLck') ?? '0', 10) > 0;

/** mlockall(MCL_FUTURE) locks mappings made later; /proc does not show it, so it is not kept. */
export function refuseFutureLocks(pid: number, future: boolean): void {
  if (future) throw unsupported(pid, 'mlockall(MCL_FUTURE) is in force (locks of mappings made later are not kept)');
}

/** The locked mappings among `maps` (read with flags when locks were seen). */
export function lockedRanges(maps: MapEntry[]): MapEntry[] {
  return maps.filter((m) => m.flags?.includes('lo'));
}

/**
 * Put the locks the live process had during the stop on the VMAs described
 * from its husk (same boundaries: fork copies VMAs one by one).
 */
export function addLocks(pid: number, vmas: VmaState[], locked: MapEntry[] | undefined): void {
  for (const l of locked ?? []) {
    const inside = vmas.filter((v) => vmaStart(v) >= l.start && vmaEnd(v) <= l.end);
    const covered = inside.reduce((n, v) => n + (vmaEnd(v) - vmaStart(v)), 0n);
    if (covered !== l.end - l.start) throw unsupported(pid, `locked mapping 0x${l.start.toString(16)}-0x${l.end.toString(16)} does not match the mappings seen after the stop`);
    for (const v of inside) v.advice = [...(v.advice ?? []).filter((f) => f !== 'lo' && f !== 'lf'), ...l.flags!.filter((f) => f === 'lo' || f === 'lf')];
  }
}

/**
 * A SysV shared memory segment (shmat): the kernel names its mapping
 * "/SYSV<key in hex>" on the internal shm mount, its inode number being the
 * segment's id. Not a file of ours, so never taken for a deleted one.
 */
function sysvShm(m: MapEntry): { key: string; id: number } | null {
  const k = /^\/SYSV([0-9a-f]{8})(?: \(deleted\))?$/.exec(m.path);
  return k ? { key: '0x' + k[1], id: m.inode } : null;
}

/** Describe one mapping, or throw EOPNOTSUPP naming what we cannot keep. */
function describe(pid: number, m: MapEntry, shm?: ShmCapture, who = pid): VmaState | null {
  const base = { start: hex(m.start), end: hex(m.end), prot: protOf(m.perms), shared: m.perms[3] === 's', pages: 0 };
  const range = `${base.start}-${base.end}`;
  if (m.path === '[vsyscall]') return null; // fixed by the kernel, same everywhere
  if (SPECIAL.includes(m.path)) return { ...base, kind: 'special', name: m.path };
  if (isAioRing(m)) return null; // an AIO context's ring: aio.ts keeps it
  refuseUringMapping(m, who);
  const sysv = sysvShm(m);
  if (sysv) {
    // Kept by sysvipc.ts (the segment, its bytes); here the attach.
    if (m.flags?.includes('ht')) throw unsupported(who, `mapping ${range} of SysV shm key ${sysv.key} id ${sysv.id}: huge pages (SHM_HUGETLB) are not kept`);
    const mayWrite = !(base.prot & PROT_WRITE) && m.flags?.includes('mw') ? true : undefined;
    return { ...base, kind: 'sysv', sysvId: sysv.id, name: m.path.replace(/ \(deleted\)$/, ''), offset: hex(m.offset), mayWrite };
  }
  if (base.shared && isShm(m.path)) {
    const key = shm ? shm.addMapping(pid, m) : shmKeyOfMap(m);
    return { ...base, kind: 'shm', shmKey: key, name: m.path.replace(/ \(deleted\)$/, ''), offset: hex(m.offset) };
  }
  if (m.flags?.some((f) => f === 'io' || f === 'pf')) throw unsupported(who, `device mapping ${range} ${m.path}`);
  if (m.path === '' || (m.path.startsWith('[') && m.path !== '[vsyscall]')) {
    // Anonymous memory the kernel names: the heap, the stack, a name the
    // program gave (PR_SET_VMA_ANON_NAME, restored by mapVmas). Any other
    // kernel mapping ([uprobes], an architecture's own...) is refused.
    if (m.path !== '' && m.path !== '[heap]' && m.path !== '[stack]' && !ANON_NAME.test(m.path)) throw unsupported(who, `kernel mapping ${range} ${m.path}`);
    if (base.shared) throw unsupported(who, `shared anonymous mapping ${range}`);
    return { ...base, kind: 'anon', name: m.path || undefined, growsdown: m.flags?.includes('gd') };
  }
  if (m.path.endsWith(' (deleted)')) throw unsupported(who, `mapping ${range} of deleted file ${m.path}`);
  if (m.path === '/dev/zero' && !base.shared) return { ...base, kind: 'anon' };
  let st: fs.Stats;
  try {
    st = fs.statSync(m.path);
  } catch {
    throw unsupported(who, `mapping ${range} of ${m.path}, which cannot be found by its path`);
  }
  if (!st.isFile()) throw unsupported(who, `mapping ${range} of ${m.path}, not a regular file`);
  return { ...base, kind: 'file', path: m.path, offset: hex(m.offset), file: { size: st.size, mtimeMs: st.mtimeMs } };
}

/**
 * While the subtree is stopped, before its husks are made: take in the
 * shared mappings (fork does not snapshot them; their contents are copied
 * now) from /proc/PID/maps alone. Private mappings are described, and
 * refused if need be, from the husk once the subtree runs again.
 */
export function checkMappings(pid: number, shm: ShmCapture, status?: Map<string, string>): MapEntry[] {
  // smaps (slower) only where memory is locked: the husk will not show the locks.
  const maps = hasLocks(status) ? readSmaps(pid) : readMaps(pid);
  for (const m of maps) if (m.perms[3] === 's') describe(pid, m, shm);
  return maps;
}

/**
 * Refuse processes of the tree that share one address space (clone with
 * CLONE_VM but not CLONE_THREAD; a vfork is caught earlier, by the freeze):
 * a restart would give each its own.
 */
export function refuseSharedMm(procs: number[]): void {
  const group = sharingGroups(procs, KCMP.VM)[0];
  if (group) throw unsupported(group[1], `shares its address space with process ${group[0]} (clone CLONE_VM without CLONE_THREAD)`);
}

/** A page run with its data, held by the supervisor. */
export interface HeldRun { addr: bigint; data: Buffer }

/**
 * What fork did not copy, taken now while the process is stopped (a husk
 * was just made): MADV_DONTFORK mappings, which the husk lacks (anonymous
 * private ones; anything else is refused), and the pages of
 * MADV_WIPEONFORK mappings, which the husk has empty. A private anonymous
 * mapping with pages in the process but none in the husk can only be the
 * latter: fork copies the page tables of every other one.
 */
export function copyUnforked(pid: number, before: MapEntry[], husk: number): { vmas: VmaState[]; runs: HeldRun[] } {
  const huskMaps = readMaps(husk);
  const inHusk = new Set(huskMaps.map((m) => `${m.start}-${m.end}`));
  const vmas: VmaState[] = [];
  const runs: HeldRun[] = [];
  const mem = new RemoteMem(pid);
  const live = new Pagemap(pid), huskPm = new Pagemap(husk);
  const has = { anyOf: PG.PRESENT | PG.SWAPPED, report: PG.PRESENT };
  const copy = (start: number, end: number) => {
    for (const r of live.scan(start, end, has)) runs.push({ addr: BigInt(r.start), data: Buffer.from(mem.read(BigInt(r.start), r.end - r.start)) });
  };
  try {
    for (const m of before) {
      if (m.path === '[vsyscall]' || isAioRing(m) || inHusk.has(`${m.start}-${m.end}`)) continue;
      const v = describe(pid, m);
      if (!v || v.kind !== 'anon') throw unsupported(pid, `mapping 0x${m.start.toString(16)}-0x${m.end.toString(16)} ${m.path} is not inherited by fork (MADV_DONTFORK) and not anonymous`);
      v.dontfork = true;
      const n = runs.length;
      copy(Number(m.start), Number(m.end));
      v.pages = runs.slice(n).reduce((k, r) => k + r.data.length / 4096, 0);
      vmas.push(v);
    }
    for (const m of huskMaps) {
      if (m.perms[3] !== 'p' || (m.path !== '' && m.path !== '[heap]')) continue;
      const s = Number(m.start), e = Number(m.end);
      // One present page is enough to know: the scan stops at the first.
      if (huskPm.scan(s, e, { ...has, first: true }).length) continue;
      copy(s, e); // nothing if the process has no pages there either
    }
  } finally {
    mem.close();
    live.close();
    huskPm.close();
  }
  return { vmas, runs };
}

export interface MemoryCapture {
  vmas: VmaState[];
  /** Which pages to dump, per VMA (same order as vmas), computed at capture. */
  runs: { addr: bigint; len: number }[];
}

/** Describe the address space and choose the pages to save (the task is frozen). */
/** `who`: the process refusals name (a husk is read for it). */
export function captureMemory(pid: number, shm?: ShmCapture, who = pid): MemoryCapture {
  const vmas: VmaState[] = [];
  const runs: { addr: bigint; len: number }[] = [];
  const pm = fs.openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    for (const m of readSmaps(pid)) {
      const v = describe(pid, m, shm, who);
      if (!v) continue;
      // MAP_DROPPABLE implies wipe-on-fork: a husk has its pages dropped, as the kernel may do at any time.
      if (m.flags?.includes('dp')) v.droppable = true;
      else if (m.flags?.includes('wf')) v.wipeonfork = true;
      if (v.kind !== 'special') v.advice = adviceOf(m.flags);
      // A shared file mapping made through a descriptor open for writing may be mprotect()ed writable later.
      if (v.kind === 'file' && v.shared && !(v.prot & PROT_WRITE) && m.flags?.includes('mw')) v.mayWrite = true;
      vmas.push(v);
      if (v.shared && m.flags?.includes('gu')) throw unsupported(pid, `guard pages (MADV_GUARD_INSTALL) in shared mapping ${v.start}-${v.end}`);
      if (v.kind === 'special' || v.shared) continue;
      const entries = readPagemapFlags(pid, m.start, m.end, pm);
      const anon = v.kind === 'anon';
      if (m.flags?.includes('gu')) v.guards = guardRuns(m.start, entries);
      let runStart = -1;
      const flush = (i: number) => {
        if (runStart < 0) return;
        runs.push({ addr: m.start + BigInt(runStart) * PAGE, len: (i - runStart) * 4096 });
        v.pages += i - runStart;
        runStart = -1;
      };
      for (let i = 0; i < entries.length; i++) {
        const e = entries[i];
        // A guard page reads as a swap entry with the guard bit: no data to read (it faults).
        const keep = e & PM_GUARD ? false : anon ? (e & (PM_PRESENT | PM_SWAP)) !== 0 : (e & (PM_PRESENT | PM_FILE)) === PM_PRESENT || (e & PM_SWAP) !== 0;
        if (keep) {
          if (runStart < 0) runStart = i;
        } else flush(i);
      }
      flush(entries.length);
    }
  } finally {
    fs.closeSync(pm);
  }
  return { vmas, runs };
}

/** The vDSO layout and code hash, recorded in the header and checked at restart. */
export function vdsoInfo(pid: number): ImageHeader['vdso'] {
  const maps = readMaps(pid).filter((m) => SPECIAL.includes(m.path));
  const layout = maps.map((m) => ({ name: m.path, size: Number(m.end - m.start) }));
  const vdso = maps.find((m) => m.path === '[vdso]');
  let hash = '';
  if (vdso) {
    const mem = new RemoteMem(pid);
    try {
      hash = crypto.createHash('sha256').update(mem.read(vdso.start, Number(vdso.end - vdso.start))).digest('hex').slice(0, 32);
    } finally {
      mem.close();
    }
  }
  return { layout, hash };
}

// ---------------------------------------------------------------- restore

const overlaps = (a0: bigint, a1: bigint, b0: bigint, b1: bigint) => a0 < b1 && b0 < a1;

/** An address for the one-page restore gadget, free in both layouts. */
export function pickGadget(current: MapEntry[], image: VmaState[]): bigint {
  const ranges = [...current.map((m) => [m.start, m.end]), ...image.map((v) => [vmaStart(v), vmaEnd(v)])];
  for (let a = 0x100000000n; a < 0x7f0000000000n; a += 0x1000000000n) {
    if (!ranges.some(([s, e]) => overlaps(a, a + GADGET_SIZE, s, e))) return a;
  }
  throw new CkptError(errno('ENOMEM'), 'restart:memory', 'no free address for the restore gadget');
}

const TASK_TOP = 0x7ffffffff000n;

/**
 * Turn a fresh shell's address space into the checkpoint's: the gadget page
 * (syscall instruction + scratch) is mapped first, everything else but the
 * special mappings goes, the special group moves to its old place, and
 * every VMA is mapped again. Page contents follow with fillPages.
 */
export function restoreLayout(r: Remote, current: MapEntry[], vmas: VmaState[], gadget: bigint, shm?: ShmRestore, inherited: VmaState[] = []): void {
  const pid = r.task.tid;
  installGadget(r, gadget);
  const specials = current.filter((m) => SPECIAL.includes(m.path));
  // Mappings inherited from the parent (cowshare.ts) stay as fork left them.
  const keep = [{ start: gadget, end: gadget + GADGET_SIZE }, ...specials.map((m) => ({ start: m.start, end: m.end })), ...inherited.map((v) => ({ start: vmaStart(v), end: vmaEnd(v) }))].sort((a, b) => (a.start < b.start ? -1 : 1));
  let at = 0n;
  for (const k of [...keep, { start: TASK_TOP, end: TASK_TOP }]) {
    if (k.start > at) r.check('restart:memory', SYS.munmap, at, k.start - at);
    at = k.end;
  }
  placeSpecials(r, current, vmas, pid);
  mapVmas(r, vmas.filter((v) => v.kind !== 'special' && !inherited.includes(v)), shm);
}

/**
 * The restore gadget, mapped where neither layout has anything:
 *   +0      a syscall instruction (single injected syscalls)
 *   +16     a loop that runs a table of syscalls and stops on int3 (batches)
 *   +4 KiB  the table: 128 entries of { nr, 6 args, result }
 *   +12 KiB scratch memory (paths, structs)
 *   +16 KiB iovecs: room for 16 calls of 1024 (process_vm_readv or _writev
 *           of scattered pages, made by the task itself; see putBackFromHusk)
 * Pages of it never touched cost nothing.
 */
export const GADGET_IOV = 16384n, GADGET_IOVS = 1024, GADGET_CALLS = 16;
export const GADGET_SIZE = GADGET_IOV + BigInt(16 * GADGET_IOVS * GADGET_CALLS);
const BATCH_CODE = Buffer.from([
  0x4d, 0x85, 0xe4, //       loop: test r12, r12
  0x74, 0x2a, //                   jz done
  0x48, 0x8b, 0x03, //             mov rax, [rbx]
  0x48, 0x8b, 0x7b, 0x08, //       mov rdi, [rbx+8]
  0x48, 0x8b, 0x73, 0x10, //       mov rsi, [rbx+16]
  0x48, 0x8b, 0x53, 0x18, //       mov rdx, [rbx+24]
  0x4c, 0x8b, 0x53, 0x20, //       mov r10, [rbx+32]
  0x4c, 0x8b, 0x43, 0x28, //       mov r8, [rbx+40]
  0x4c, 0x8b, 0x4b, 0x30, //       mov r9, [rbx+48]
  0x0f, 0x05, //                   syscall
  0x48, 0x89, 0x43, 0x38, //       mov [rbx+56], rax
  0x48, 0x83, 0xc3, 0x40, //       add rbx, 64
  0x49, 0xff, 0xcc, //             dec r12
  0xeb, 0xd1, //                   jmp loop
  0xcc, //                   done: int3
]);

export function installGadget(r: Remote, gadget: bigint): void {
  // Code and data apart, never writable and executable at once: a process
  // with memory-deny-write-execute (PR_SET_MDWE) refuses such a mapping.
  // The code is written through /proc/PID/mem, which may write read-only pages.
  r.check('restart:memory', SYS.mmap, gadget, PAGE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  r.check('restart:memory', SYS.mmap, gadget + PAGE, GADGET_SIZE - PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  const code = Buffer.alloc(64, 0xcc);
  code.set([0x0f, 0x05], 0);
  code.set(BATCH_CODE, 16);
  r.mem.write(gadget, code);
  useGadget(r, gadget);
}

/** Make `r` (any thread of the process) inject through the installed gadget. */
export function useGadget(r: Remote, gadget: bigint): void {
  r.useSyscallAt(gadget);
  // Batches run with their stack at the top of the code page (nothing there
  // is pushed: the loop uses none), off any stack of the program's own.
  r.useBatchAt(gadget + 16n, gadget + 4096n, 128, gadget + 4096n - 64n);
  r.setScratch(gadget + 12288n);
}

/**
 * Move [vvar], [vvar_vclock], [vdso] together to the checkpoint's place:
 * glibc keeps pointers into the vDSO and the vDSO finds its data at a fixed
 * distance. Their sizes must match this kernel's (else ENOEXEC).
 */
export function placeSpecials(r: Remote, current: MapEntry[], vmas: VmaState[], pid: number): void {
  const want = vmas.filter((v) => v.kind === 'special');
  // Those the process had unmapped at the checkpoint go (it comes back without them).
  const unwanted = current.filter((m) => SPECIAL.includes(m.path) && !want.some((v) => v.name === m.path));
  for (const m of unwanted) r.check('restart:memory', SYS.munmap, m.start, m.end - m.start);
  const specials = current.filter((m) => SPECIAL.includes(m.path) && !unwanted.includes(m));
  if (want.length !== specials.length || want.some((v, i) => v.name !== specials[i].path || vmaEnd(v) - vmaStart(v) !== specials[i].end - specials[i].start)) {
    throw new CkptError(errno('ENOEXEC'), 'restart:memory', `task ${pid}: vDSO layout of the image does not match this kernel`);
  }
  if (!specials.length || vmaStart(want[0]) === specials[0].start) return;
  const span = (list: { s: bigint; e: bigint }[]) => [list[0].s, list[list.length - 1].e];
  const [c0, c1] = span(specials.map((m) => ({ s: m.start, e: m.end })));
  const [w0, w1] = span(want.map((v) => ({ s: vmaStart(v), e: vmaEnd(v) })));
  let from = specials.map((m) => m.start);
  if (overlaps(c0, c1, w0, w1)) {
    // Hop through a free place first: mremap cannot move onto itself.
    const tmp = pickGadget(current, vmas) + 0x800000000n;
    from = specials.map((m) => move(r, m.start, m.end - m.start, tmp + (m.start - c0)));
  }
  want.forEach((v, i) => move(r, from[i], vmaEnd(v) - vmaStart(v), vmaStart(v)));
}

/** Does nothing answer at path `p` now (removed or renamed since), as opposed to a path the supervisor may not look at? */
export function pathGone(p: string): boolean {
  try {
    fs.statSync(p);
    return false;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' || code === 'ENOTDIR';
  }
}

/**
 * Before a rollback changes anything: every file the checkpoint had mapped
 * must still be there. A mapping of a file gone since cannot still be in
 * place as at the checkpoint (its path in the maps reads "(deleted)" or
 * another name), so the rollback would have to map it again by its path and
 * fail half-way, with the subtree killed: refused here with ENOENT instead
 * (SQLite's WAL index, its -shm file, is removed by the last connection to
 * close the database).
 */
export function checkMappedFilesThere(processes: { ids: { pid: number }; memory: VmaState[] }[], host: (pid: number) => number, crid: number): void {
  for (const p of processes) {
    for (const v of p.memory) {
      if (v.kind === 'file' && v.path && pathGone(v.path)) {
        throw new CkptError(errno('ENOENT'), 'restart:memory', `checkpoint ${crid}: task ${host(p.ids.pid)}: ${v.path}, mapped at ${v.start}-${v.end}, is gone since the checkpoint (removed or renamed), and a rollback would have to map it again`);
      }
    }
  }
}

/** mmap each VMA at its place (MAP_FIXED), files opened in the tracee. */
export function mapVmas(r: Remote, vmas: VmaState[], shm?: ShmRestore): void {
  const pid = r.task.tid;
  const fds = new Map<string, bigint>();
  try {
    // The files first, all opened in one batch (paths side by side in scratch).
    const files = [...new Set(vmas.filter((v) => v.kind === 'file').map((v) => `${v.shared && (v.prot & PROT_WRITE || v.mayWrite) ? O_RDWR : O_RDONLY}:${v.path}`))];
    let at = r.scratch();
    const opens: (number | bigint)[][] = [];
    for (const key of files) {
      const [mode, path] = [Number(key.slice(0, key.indexOf(':'))), key.slice(key.indexOf(':') + 1)];
      const p = Buffer.from(path + '\0');
      if (at + BigInt(p.length) > r.scratch() + 4096n) break; // the rest one by one, below
      r.mem.write(at, p);
      opens.push([SYS.openat, AT_FDCWD, at, mode | O_CLOEXEC, 0]);
      at += BigInt(p.length);
    }
    r.batch(opens).forEach((fd, i) => {
      const mode = Number(files[i].slice(0, files[i].indexOf(':')));
      // Refused before anything is mapped: the caller may no longer open the file as the mapping needs.
      if (fd < 0n) throw new CkptError(Number(-fd) === errno('EACCES') ? errno('EPERM') : Number(-fd), 'restart:memory', `task ${pid}: cannot open ${files[i].slice(files[i].indexOf(':') + 1)} ${mode === O_RDWR ? 'for writing (a shared mapping that may write)' : 'for reading'}: ${errnoName(Number(-fd))}`);
      fds.set(files[i], fd);
    });
    const calls: { call: (number | bigint)[]; what: string }[] = [];
    // SysV attaches: each whole segment once at its place (shmat SHM_REMAP), writable if any part of it may be; each part then gets its own protection.
    const attachWrite = new Map<string, boolean>();
    const originOf = (v: VmaState) => `${v.sysvId}@${vmaStart(v) - BigInt(v.offset!)}`;
    for (const v of vmas) if (v.kind === 'sysv') attachWrite.set(originOf(v), attachWrite.get(originOf(v)) || !!(v.prot & PROT_WRITE) || !!v.mayWrite);
    const attached = new Set<string>();
    for (const v of vmas) {
      const len = vmaEnd(v) - vmaStart(v);
      const what = `task ${pid}: mmap ${v.start}-${v.end} ${v.path ?? v.name ?? ''}`;
      if (v.kind === 'sysv') {
        const o = originOf(v), writable = attachWrite.get(o)!;
        if (!attached.has(o)) {
          attached.add(o);
          calls.push({ call: [SYS_shmat, v.sysvId!, vmaStart(v) - BigInt(v.offset!), SHM_REMAP | (writable ? 0 : SHM_RDONLY) | (v.prot & PROT_EXEC ? SHM_EXEC : 0)], what: `task ${pid}: shmat SysV shm id ${v.sysvId} at ${v.start}` });
        }
        calls.push({ call: [SYS.mprotect, vmaStart(v), len, v.prot], what: `task ${pid}: mprotect SysV shm id ${v.sysvId} ${v.start}-${v.end}` });
        continue;
      }
      if (v.kind === 'shm') {
        if (!shm) throw new CkptError(errno('EBADMSG'), 'restart:memory', `shared object ${v.shmKey} has no contents`);
        const key = `shm:${v.shmKey}`;
        let fd = fds.get(key);
        if (fd === undefined) fds.set(key, (fd = shm.fdIn(r, v.shmKey!)));
        calls.push({ call: [SYS.mmap, vmaStart(v), len, v.prot, MAP_SHARED | MAP_FIXED, fd, BigInt(v.offset!)], what });
        continue;
      }
      if (v.kind === 'anon') {
        // Mostly filled: let the kernel allocate the pages in one go rather
        // than one fault per page while the data is written in.
        const dense = BigInt(v.pages) * PAGE * 2n > len ? MAP_POPULATE : 0;
        const flags = (v.droppable ? MAP_DROPPABLE : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED | (v.growsdown ? MAP_GROWSDOWN : 0) | dense;
        calls.push({ call: [SYS.mmap, vmaStart(v), len, v.prot, flags, -1, 0], what });
        continue;
      }
      const path = v.path!;
      checkFileIdentity(pid, v);
      const mode = v.shared && (v.prot & PROT_WRITE || v.mayWrite) ? O_RDWR : O_RDONLY;
      const key = `${mode}:${path}`;
      let fd = fds.get(key);
      if (fd === undefined) {
        fd = openIn(r, path, mode | O_CLOEXEC, 'restart:memory');
        fds.set(key, fd);
      }
      calls.push({ call: [SYS.mmap, vmaStart(v), len, v.prot, (v.shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED, fd, BigInt(v.offset!)], what });
    }
    // The fork advice goes in the same resume, after the mappings (its result is not checked).
    const advice = vmas.filter((v) => v.dontfork || v.wipeonfork).map((v) => [SYS.madvise, vmaStart(v), vmaEnd(v) - vmaStart(v), v.dontfork ? MADV_DONTFORK : MADV_WIPEONFORK]);
    // Injected, these calls are not seen the way the program's own are: say so here (see Tracer.forkAdvice).
    if (advice.length) r.tracer.forkAdvice.add(r.task.tgid);
    // The other advice and the locks too, checked: a lock the caller's
    // RLIMIT_MEMLOCK does not allow fails the restart (never more than it could get).
    for (const v of vmas) for (const call of adviceCalls(pid, v)) calls.push({ call, what: `task ${pid}: ${call[0] === SYS.mlock2 ? 'mlock2' : `madvise(${call[3]})`} ${hex(BigInt(call[1]))}+${call[2]} in ${v.start}-${v.end}` });
    if (vmas.some((v) => v.advice || v.guards)) r.tracer.vmAdvice.add(r.task.tgid);
    const res = r.batch([...calls.map((c) => c.call), ...advice]);
    calls.forEach((c, i) => {
      const e = Number(-res[i]);
      if (res[i] < 0n && res[i] > -4096n) throw new CkptError(e === errno('EACCES') ? errno('EPERM') : e, 'restart:memory', `${c.what}: ${errnoName(e)}`);
    });
    nameVmas(r, vmas);
  } finally {
    r.batch([...fds.values()].map((fd) => [SYS.close, fd]));
  }
}

/** Give freshly mapped anonymous memory the names the program gave it (PR_SET_VMA_ANON_NAME). */
function nameVmas(r: Remote, vmas: VmaState[]): void {
  const named = vmas.filter((v) => v.kind === 'anon' && ANON_NAME.test(v.name ?? ''));
  for (let i = 0; i < named.length; i += 32) { // 32 names of at most 80 bytes fit the scratch page
    const b = new CallBatch(r);
    for (const v of named.slice(i, i + 32)) {
      const at = b.put(Buffer.from(ANON_NAME.exec(v.name!)![1] + '\0'));
      b.add(`restart:memory task ${r.task.tid}: name ${v.name} of ${v.start}-${v.end}`, SYS.prctl, PR_SET_VMA, PR_SET_VMA_ANON_NAME, vmaStart(v), vmaEnd(v) - vmaStart(v), at);
    }
    b.run();
  }
}

function move(r: Remote, from: bigint, len: bigint, to: bigint): bigint {
  return r.check('restart:memory', SYS.mremap, from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
}

function checkFileIdentity(pid: number, v: VmaState): void {
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(v.path!);
  } catch { /* reported below */ }
  if (!st || st.size !== v.file?.size || st.mtimeMs !== v.file?.mtimeMs) {
    throw new CkptError(errno('ENOEXEC'), 'restart:memory', `task ${pid}: mapped file ${v.path} is missing or changed since the checkpoint`);
  }
}

/** openat() a path inside the tracee (with its own credentials); returns the fd. */
export function openIn(r: Remote, path: string, flags: number, op: string, mode = 0): bigint {
  const scratch = r.scratch();
  const p = Buffer.from(path + '\0');
  if (p.length > 2000) throw new CkptError(errno('ENAMETOOLONG'), op, `path too long: ${path}`);
  r.mem.write(scratch, p);
  const fd = r.call(SYS.openat, AT_FDCWD, scratch, flags, mode);
  if (fd < 0n) {
    const e = Number(-fd);
    const mapped = e === errno('EACCES') ? errno('EPERM') : e;
    throw new CkptError(mapped, op, `task ${r.task.tid}: cannot open ${path}: errno ${e}`);
  }
  return fd;
}

/** Write one PAGES record into the shell, checking it lands inside a restored VMA. */
export function fillPages(mem: RemoteMem, vmas: VmaState[], addr: bigint, data: Buffer): void {
  const end = addr + BigInt(data.length);
  const v = vmas.find((x) => vmaStart(x) <= addr && end <= vmaEnd(x) && x.kind !== 'special' && !x.shared);
  if (!v || addr % PAGE !== 0n) {
    throw new CkptError(errno('EBADMSG'), 'restart:memory', `page data at ${hex(addr)}+${data.length} lies outside every mapping of the image`);
  }
  mem.writeFast(addr, data);
}
