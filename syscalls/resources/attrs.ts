/**
 * Process attributes and security state beside ids and credentials:
 * resource limits, scheduling (policy, priority, nice: per thread), CPU
 * affinity (per thread), oom_score_adj, personality, the prctl flags
 * (THP_DISABLE, CHILD_SUBREAPER, PDEATHSIG, DUMPABLE, timer slack,
 * NO_NEW_PRIVS), securebits (KEEPCAPS among them), membarrier
 * registrations, every thread's name, the root directory (chroot), cgroup
 * membership, and the capability sets (per thread); the I/O priority (per
 * thread), the core dump filter, memory-deny-write-execute (PR_SET_MDWE)
 * and KSM merging of the whole process (PR_SET_MEMORY_MERGE).
 *
 * Who holds what decides when it is read:
 * - a clone does not inherit pdeathsig nor the child-subreaper flag, and a
 *   husk is a clone of the leader: those are asked of the frozen tasks
 *   (injected prctl gets, see queryUninherited), with every thread's timer
 *   slack, but only in processes that ever set one of the three (the
 *   seccomp filter traps those prctl calls: Tracer.prctlNoted); in the
 *   others they are 0, false and the leader's slack (read from the husk);
 * - per-thread values of every thread (sched_getattr; /proc/TID/status for
 *   name, affinity, capabilities, credentials and NNP) are read by the
 *   supervisor itself during the stop, while the husk clones run;
 * - what the husk inherits from the leader (rlimits, oom_score_adj,
 *   personality, mm flags: dumpable, THP, membarrier; creds: securebits;
 *   root; cgroups) is read from the husk after the thaw.
 *
 * Restore runs in the rebuilt process itself, so the kernel applies the
 * caller's (or, in a rollback, the live process's) permissions; the checks
 * before anything is built say EPERM with the attribute named.
 */
import { z, int, u32, path, type Same } from '../../lib/schema.js';
import { credsSchema } from './process.js';
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, SYS, addressOf, errnoNow } from '../../lib/libc.js';
import { readStatus } from '../../lib/proc.js';
import { Remote, CallBatch, callEach } from '../../supervisor/remote.js';
import type { Tracer } from '../../supervisor/tracer.js';
import { restoreCreds, parseCreds, checkCreds, type Creds } from './process.js';
import { useGadget } from './memory.js';
import type { ThreadState } from './thread.js';

const PR_GET_TIMERSLACK = 30, PR_SET_PDEATHSIG = 1, PR_GET_PDEATHSIG = 2, PR_GET_DUMPABLE = 3, PR_SET_DUMPABLE = 4, PR_SET_KEEPCAPS = 8, PR_SET_NAME = 15;
const PR_CAPBSET_DROP = 24, PR_GET_SECUREBITS = 27, PR_SET_SECUREBITS = 28, PR_SET_TIMERSLACK = 29;
const PR_SET_CHILD_SUBREAPER = 36, PR_GET_CHILD_SUBREAPER = 37, PR_SET_NO_NEW_PRIVS = 38, PR_SET_THP_DISABLE = 41;
const PR_SET_MDWE = 65, PR_GET_MDWE = 66, PR_SET_MEMORY_MERGE = 67, PR_GET_MEMORY_MERGE = 68;
const SYS_ioprio_set = 251, SYS_ioprio_get = 252, IOPRIO_WHO_PROCESS = 1;
const PR_CAP_AMBIENT = 47, PR_CAP_AMBIENT_RAISE = 2, PR_CAP_AMBIENT_CLEAR_ALL = 4;
const SECBIT_KEEP_CAPS = 1 << 4;
const SYS_personality = 135, SYS_capset = 126, SYS_chroot = 161;
const SYS_sched_setaffinity = 203, SYS_sched_getaffinity = 204, SYS_sched_setattr = 314, SYS_sched_getattr = 315, SYS_prlimit64 = 302, SYS_membarrier = 324;
const MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9;
const CAP_V3 = 0x20080522, SCHED_ATTR_SIZE = 56, AFFINITY_BYTES = 128, UCLAMP_MAX = 1024, SCHED_FLAG_UTIL_CLAMP = 0x60n;
const CAP_SETPCAP = 8n, CAP_SYS_CHROOT = 18n, CAP_SYS_RESOURCE = 24n;
const O_WRONLY = 1, O_CLOEXEC = 0o2000000, AT_FDCWD = -100;
const INFINITY = (1n << 64n) - 1n;

export const RLIMIT_NAMES = ['CPU', 'FSIZE', 'DATA', 'STACK', 'CORE', 'RSS', 'NPROC', 'NOFILE', 'MEMLOCK', 'AS', 'LOCKS', 'SIGPENDING', 'MSGQUEUE', 'NICE', 'RTPRIO', 'RTTIME'];

/** Capability sets as /proc/PID/status shows them (hex). */
export interface CapSets { eff: string; prm: string; inh: string; bnd: string; amb: string }

/** Per-thread attributes (ThreadState.attrs). */
export interface ThreadAttrs {
  comm: string;
  /** sched_getattr: policy, flags (reset-on-fork...), nice, rt priority; deadline parameters in ns (decimal). */
  sched: { policy: number; flags: string; nice: number; priority: number; runtime: string; deadline: string; period: string; utilMin?: number; utilMax?: number };
  /** sched_getaffinity's mask (hex of its bytes, as the kernel lays them out). */
  affinity: string;
  /** Timer slack in ns (decimal); '' until captureProcAttrs gives it the leader's. */
  timerSlack: string;
  /** Parent-death signal (0: none): not inherited, asked of the frozen thread. */
  pdeathsig: number;
  caps: CapSets;
  noNewPrivs: boolean;
  /** Credentials are per thread (setfsuid, raw setresuid): this thread's. */
  creds: Creds;
  /** ioprio_get(IOPRIO_WHO_PROCESS, tid): class and level (ionice). */
  ioprio?: number;
}

/** Process-wide attributes (ProcessState.attrs). */
export interface ProcAttrs {
  /** Index RLIMIT_*: soft and hard, 'unlimited' or decimal. */
  rlimits: { soft: string; hard: string }[];
  oomScoreAdj: number;
  personality: number;
  thpDisable: boolean;
  /** Not inherited: asked of the frozen leader. */
  subreaper: boolean;
  /** 0 or 1 (2, "root only", cannot be set again and is refused). */
  dumpable: number;
  securebits: number;
  /** membarrier registrations (MEMBARRIER_CMD_GET_REGISTRATIONS). */
  membarrier: number;
  /** The root directory, as the supervisor sees it ('/' unless chrooted). */
  root: string;
  /** /proc/PID/cgroup lines. */
  cgroups: string[];
  /** /proc/PID/coredump_filter. */
  coredumpFilter?: number;
  /** PR_GET_MDWE: memory-deny-write-execute flags (cannot be cleared). */
  mdwe?: number;
  /** PR_GET_MEMORY_MERGE: KSM merges all of the process's memory. */
  ksm?: boolean;
}

const hexBig = (s: string) => BigInt('0x' + (s || '0'));
const limitValue = (s: string) => (s === 'unlimited' ? INFINITY : BigInt(s));

export function readLimits(pid: number): ProcAttrs['rlimits'] {
  // "%-25s %-20s %-20s %-10s": the name may hold spaces, the numbers do not.
  const rows = fs.readFileSync(`/proc/${pid}/limits`, 'utf8').split('\n').slice(1).filter(Boolean);
  return rows.map((l) => {
    const [soft, hard] = l.slice(26).trim().split(/\s+/);
    return { soft, hard };
  });
}

function capsOf(status: Map<string, string>): CapSets {
  return { eff: status.get('CapEff') ?? '0', prm: status.get('CapPrm') ?? '0', inh: status.get('CapInh') ?? '0', bnd: status.get('CapBnd') ?? '0', amb: status.get('CapAmb') ?? '0' };
}

function schedOf(tid: number): ThreadAttrs['sched'] {
  const b = Buffer.alloc(SCHED_ATTR_SIZE);
  if (sys.syscall(SYS_sched_getattr, tid, addressOf(b), SCHED_ATTR_SIZE, 0) !== 0) throw new CkptError(errnoNow(), 'checkpoint:sched', `task ${tid}: sched_getattr failed`);
  const s: ThreadAttrs['sched'] = { policy: b.readUInt32LE(4), flags: b.readBigUInt64LE(8).toString(), nice: b.readInt32LE(16), priority: b.readUInt32LE(20), runtime: b.readBigUInt64LE(24).toString(), deadline: b.readBigUInt64LE(32).toString(), period: b.readBigUInt64LE(40).toString() };
  // Utilization clamps only when asked for (0/1024 is none; a kernel without them says 0/0).
  const min = b.readUInt32LE(48), max = b.readUInt32LE(52);
  if (min !== 0 || (max !== UCLAMP_MAX && max !== 0)) Object.assign(s, { utilMin: min, utilMax: max });
  return s;
}

function schedBuf(s: ThreadAttrs['sched']): Buffer {
  const clamps = s.utilMin !== undefined;
  const b = Buffer.alloc(clamps ? SCHED_ATTR_SIZE : 48); // SCHED_ATTR_SIZE_VER0 when no clamps are asked for
  b.writeUInt32LE(b.length, 0);
  b.writeUInt32LE(s.policy, 4);
  // No KEEP_POLICY/KEEP_PARAMS (both are set); the clamp flags only with clamps.
  b.writeBigUInt64LE((BigInt(s.flags) & ~0x78n) | (clamps ? SCHED_FLAG_UTIL_CLAMP : 0n), 8);
  if (clamps) {
    b.writeUInt32LE(s.utilMin!, 48);
    b.writeUInt32LE(s.utilMax!, 52);
  }
  b.writeInt32LE(s.nice, 16);
  b.writeUInt32LE(s.priority, 20);
  b.writeBigUInt64LE(BigInt(s.runtime), 24);
  b.writeBigUInt64LE(BigInt(s.deadline), 32);
  b.writeBigUInt64LE(BigInt(s.period), 40);
  return b;
}

const sameSched = (a: ThreadAttrs['sched'], b: ThreadAttrs['sched']) =>
  a.policy === b.policy && a.nice === b.nice && a.priority === b.priority && a.flags === b.flags && a.runtime === b.runtime && a.deadline === b.deadline && a.period === b.period && a.utilMin === b.utilMin && a.utilMax === b.utilMax;

function affinityOf(tid: number): string {
  const b = Buffer.alloc(AFFINITY_BYTES);
  const n = sys.syscall(SYS_sched_getaffinity, tid, AFFINITY_BYTES, addressOf(b));
  if (n < 0) throw new CkptError(errnoNow(), 'restart:affinity', `task ${tid}: sched_getaffinity failed`);
  return b.subarray(0, n).toString('hex');
}

/** The Name line of /proc/PID/status, unescaped (the kernel writes \\ and \\n for a backslash and a newline). */
const statusName = (v: string) => v.replace(/\\(\\|n)/g, (_, c: string) => (c === 'n' ? '\n' : '\\'));

/** Cpus_allowed ("ff,ffffffff": 32-bit words, highest first) as sched_getaffinity lays the mask out. */
function affinityFromStatus(v: string): string {
  const words = v.split(',').reverse();
  const b = Buffer.alloc(Math.ceil(words.length / 2) * 8); // whole longs, as the kernel copies them
  words.forEach((w, i) => b.writeUInt32LE(parseInt(w, 16) >>> 0, 4 * i));
  return b.toString('hex');
}
const sameMask = (a: string, b: string) => a.replace(/(00)+$/, '') === b.replace(/(00)+$/, '');

/**
 * A frozen thread's own attributes, read by the supervisor (no injected
 * call): `status` is its /proc status if already read; `noted`: its
 * process ever set a timer slack (see queryUninherited), so each
 * thread's is read here.
 */
export function captureThreadAttrs(tid: number, noted: boolean, status = statusLines(tid)): ThreadAttrs {
  return {
    comm: statusName(status.get('Name') ?? ''),
    sched: schedOf(tid),
    affinity: affinityFromStatus(status.get('Cpus_allowed') ?? '0'),
    timerSlack: noted ? fs.readFileSync(`/proc/${tid}/timerslack_ns`, 'utf8').trim() : '',
    pdeathsig: 0,
    caps: capsOf(status),
    noNewPrivs: status.get('NoNewPrivs') === '1',
    creds: parseCreds(status),
    ioprio: ioprioOf(tid),
  };
}

/** The I/O priority of thread `tid` (read by the supervisor: no injected call). */
function ioprioOf(tid: number): number {
  const v = sys.syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid);
  if (v < 0) throw new CkptError(errnoNow(), 'checkpoint:ioprio', `task ${tid}: ioprio_get failed`);
  return v;
}

const THREAD_KEYS = ['Name', 'Uid', 'Gid', 'Groups', 'NoNewPrivs', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'Cpus_allowed'];

/** The lines of /proc/TID/status a thread's capture needs, found in the text rather than all split (it runs in the stop). */
function statusLines(tid: number): Map<string, string> {
  const text = fs.readFileSync(`/proc/${tid}/status`, 'utf8');
  const m = new Map<string, string>();
  for (const k of THREAD_KEYS) {
    const at = k === 'Name' && text.startsWith('Name:') ? 0 : text.indexOf(`\n${k}:`) + 1;
    if (at <= 0 && k !== 'Name') continue;
    const end = text.indexOf('\n', at);
    m.set(k, text.slice(at + k.length + 1, end < 0 ? undefined : end).trim());
  }
  return m;
}

/** prctl PR_SET_PDEATHSIG, PR_SET_TIMERSLACK or PR_SET_CHILD_SUBREAPER seen on its way in (then run as asked). */
export function notePrctl(ctx: { tracer: Tracer; caller: { tgid: number } }): void {
  ctx.tracer.prctlNoted.add(ctx.caller.tgid);
}

/**
 * What a clone does not inherit, asked of the frozen tasks of the
 * processes that ever set it (Tracer.prctlNoted), in injected rounds whose
 * round trips overlap: in the first, each leader says whether it is a
 * child subreaper and every other thread its pdeathsig; in the second,
 * the leaders their pdeathsig. Answers land in a few bytes of each
 * thread's own stack (put back after). `leaders[i]` is `procs[i]`'s, if
 * given (the husk round's); else one is made here.
 */
export function queryUninherited(tracer: Tracer, leaders: Remote[], others: Remote[], procs: { ids: { pid: number }; attrs?: ProcAttrs; threads: ThreadState[] }[], otherThreads: ThreadState[]): void {
  const noted = procs.map((p) => tracer.prctlNoted.has(p.ids.pid));
  if (!noted.some(Boolean)) return;
  const made: Remote[] = [];
  const ls: { r: Remote; p: (typeof procs)[number] }[] = [];
  procs.forEach((p, i) => {
    if (!noted[i]) return;
    let r = leaders[i];
    if (!r) made.push((r = new Remote(tracer, tracer.tasks.get(p.ids.pid)!)));
    ls.push({ r, p });
  });
  const os = others.map((r, i) => ({ r, t: otherThreads[i] })).filter(({ r }) => tracer.prctlNoted.has(r.task.tgid));
  const all = [...ls.map((x) => x.r), ...os.map((x) => x.r)];
  const slots = all.map((r) => r.stackScratch(8));
  const at = (i: number) => slots[i]?.addr ?? all[i].scratch();
  const read = (i: number) => all[i].mem.read(at(i), 4).readInt32LE(0);
  const fail = (res: bigint, i: number, what: string) => {
    if (res < 0n) throw new CkptError(Number(-res), 'checkpoint:prctl', `task ${all[i].task.tid}: ${what} failed`);
  };
  try {
    callEach(all, (_, i) => [SYS.prctl, i < ls.length ? PR_GET_CHILD_SUBREAPER : PR_GET_PDEATHSIG, at(i)]).forEach((res, i) => {
      fail(res, i, i < ls.length ? 'PR_GET_CHILD_SUBREAPER' : 'PR_GET_PDEATHSIG');
      if (i < ls.length) ls[i].p.attrs = { subreaper: read(i) !== 0 } as ProcAttrs; // completed by captureProcAttrs
      else if (os[i - ls.length].t.attrs) os[i - ls.length].t.attrs!.pdeathsig = read(i);
    });
    const rs = ls.map((x) => x.r);
    callEach(rs, (_, i) => [SYS.prctl, PR_GET_PDEATHSIG, at(i)]).forEach((res, i) => {
      fail(res, i, 'PR_GET_PDEATHSIG');
      const t = ls[i].p.threads.find((t) => t.tid === ls[i].p.ids.pid);
      if (t?.attrs) t.attrs.pdeathsig = read(i);
    });
  } finally {
    for (const s of slots) s?.putBack();
    for (const r of made) r.finish();
  }
}

/**
 * The process-wide attributes through `r`: the leader's husk (after the
 * thaw) or, for a direct checkpoint, the frozen leader itself; `status` is
 * r's task's; `prev` holds what queryUninherited asked of the leader.
 */
export function captureProcAttrs(r: Remote, state: { ids: { pid: number }; attrs?: ProcAttrs; threads: ThreadState[] }, status: Map<string, string>): ProcAttrs {
  const t = r.task.tid;
  const pid = state.ids.pid;
  const prev = state.attrs;
  const b = new CallBatch(r);
  b.add('checkpoint:prctl PR_GET_DUMPABLE', SYS.prctl, PR_GET_DUMPABLE);
  b.add('checkpoint:prctl PR_GET_SECUREBITS', SYS.prctl, PR_GET_SECUREBITS);
  b.add(undefined, SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0);
  b.add('checkpoint:prctl PR_GET_TIMERSLACK', SYS.prctl, PR_GET_TIMERSLACK);
  b.add(undefined, SYS.prctl, PR_GET_MDWE, 0, 0, 0, 0); // EINVAL before Linux 6.3: none
  b.add(undefined, SYS.prctl, PR_GET_MEMORY_MERGE, 0, 0, 0, 0); // EINVAL before 6.4 or without KSM: none
  const [dumpable, securebits, membarrier, slack, mdwe, ksm] = b.run().map(Number);
  // Not asked of each thread (the process never set one): all have the leader's, which the husk inherited.
  for (const th of state.threads) if (th.attrs && !th.attrs.timerSlack) th.attrs.timerSlack = String(slack);
  if (membarrier < 0) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:membarrier', `task ${pid}: this kernel cannot say which membarrier commands the process registered (errno ${-membarrier})`);
  if (dumpable !== 0 && dumpable !== 1) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:dumpable', `task ${pid}: dumpable is ${dumpable} (root-only core dumps), which prctl cannot set again`);
  return {
    rlimits: readLimits(t),
    oomScoreAdj: Number(fs.readFileSync(`/proc/${t}/oom_score_adj`, 'utf8')),
    personality: parseInt(fs.readFileSync(`/proc/${t}/personality`, 'utf8'), 16),
    thpDisable: status.get('THP_enabled') === '0',
    subreaper: !!prev?.subreaper,
    dumpable,
    securebits,
    membarrier,
    root: fs.readlinkSync(`/proc/${t}/root`),
    cgroups: fs.readFileSync(`/proc/${t}/cgroup`, 'utf8').split('\n').filter(Boolean),
    coredumpFilter: parseInt(fs.readFileSync(`/proc/${t}/coredump_filter`, 'utf8'), 16),
    mdwe: mdwe > 0 ? mdwe : 0,
    ksm: ksm > 0,
  };
}

// ---------------------------------------------------------------- restore

interface Who {
  pid: number;
  creds: Creds;
  caps: CapSets;
  limits: ProcAttrs['rlimits'];
  noNewPrivs: boolean;
  root: string;
}

function describe(pid: number): Who {
  const st = readStatus(pid);
  return { pid, creds: parseCreds(st), caps: capsOf(st), limits: readLimits(pid), noNewPrivs: st.get('NoNewPrivs') === '1', root: fs.readlinkSync(`/proc/${pid}/root`) };
}

const has = (caps: CapSets, cap: bigint) => (hexBig(caps.eff) & (1n << cap)) !== 0n;
const CAP_NAMES = ('chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio ' +
  'sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore').split(' ');
const capNames = (x: bigint) => [...Array(64).keys()].filter((i) => x & (1n << BigInt(i))).map((i) => (CAP_NAMES[i] ? `CAP_${CAP_NAMES[i].toUpperCase()}` : `cap ${i}`)).join(',');

/** Where `want` is below `root` (both as the supervisor sees them): the path to chroot to from there, else undefined. */
function under(root: string, want: string): string | undefined {
  if (want === root) return '.';
  if (root === '/') return want;
  return want.startsWith(root + '/') ? want.slice(root.length) : undefined;
}

/**
 * What the rebuilt process may not have, checked before anything is
 * built: `by` is the caller (restart) or the live process (rollback),
 * whose permissions the restore runs with.
 */
export function checkAttrs(p: { ids: { pid: number }; attrs?: ProcAttrs; threads: ThreadState[] }, byPid: number, rollback: boolean): void {
  const a = p.attrs;
  if (!a) return;
  const by = describe(byPid);
  const task = `task ${p.ids.pid}`;
  const who = rollback ? 'the process has now' : `the caller (${byPid}) has`;
  const lacks = rollback ? 'the process no longer has' : `the caller (${byPid}) lacks`;
  if (!has(by.caps, CAP_SYS_RESOURCE)) {
    a.rlimits.forEach((l, i) => {
      const mine = by.limits[i];
      if (mine && limitValue(l.hard) > limitValue(mine.hard)) {
        throw new CkptError(errno('EPERM'), 'restart:rlimit', `${task}: RLIMIT_${RLIMIT_NAMES[i]} hard limit ${l.hard} is above the ${mine.hard} ${who}, without CAP_SYS_RESOURCE`);
      }
    });
  }
  for (const t of p.threads) {
    const c = t.attrs?.caps;
    if (!c) continue;
    const prm = hexBig(by.caps.prm);
    const more = (hexBig(c.prm) | hexBig(c.eff) | hexBig(c.amb)) & ~prm;
    const inh = hexBig(c.inh) & ~(prm | hexBig(by.caps.inh));
    const bnd = hexBig(c.bnd) & ~hexBig(by.caps.bnd);
    if (more || inh || bnd) throw new CkptError(errno('EPERM'), 'restart:capabilities', `${task}: thread ${t.tid} had capabilities ${capNames(more | inh | bnd)} that ${lacks}`);
    if (hexBig(c.bnd) !== hexBig(by.caps.bnd) && !(prm & (1n << CAP_SETPCAP))) throw new CkptError(errno('EPERM'), 'restart:capabilities', `${task}: its bounding set is smaller than the one ${who}, and dropping needs CAP_SETPCAP`);
    if (!rollback && t.attrs?.creds) checkCreds(t.attrs.creds, by.creds, t.tid);
    if (t.attrs!.noNewPrivs === false && by.noNewPrivs) throw new CkptError(errno('EPERM'), 'restart:no_new_privs', `${task}: thread ${t.tid} had no_new_privs unset; ${who} it set, and it cannot be cleared`);
  }
  // oom_score_adj and cgroups are written through /proc and the cgroup file system, before any chroot.
  const cur = { oom: Number(fs.readFileSync(`/proc/${byPid}/oom_score_adj`, 'utf8')), cgroups: new Set(fs.readFileSync(`/proc/${byPid}/cgroup`, 'utf8').split('\n').filter(Boolean)) };
  const moves = a.cgroups.filter((l) => !cur.cgroups.has(l));
  if (by.root !== '/' && (moves.length || cur.oom !== a.oomScoreAdj)) throw new CkptError(errno('EOPNOTSUPP'), 'restart:root', `${task}: its cgroups or oom_score_adj must be set, and ${who} root ${by.root}, where /proc and /sys may not be`);
  if (moves.length) cgroupFiles(p.ids.pid, moves);
  if (a.root !== by.root) {
    if (under(by.root, a.root) === undefined) throw new CkptError(errno('EOPNOTSUPP'), 'restart:root', `${task}: root directory ${a.root} is outside the root ${by.root} ${who}`);
    if (!has(by.caps, CAP_SYS_CHROOT)) throw new CkptError(errno('EPERM'), 'restart:root', `${task}: chrooted to ${a.root}; ${who} root ${by.root} and no CAP_SYS_CHROOT`);
  }
}

const CAP_SETGID = 6n, CAP_SETUID = 7n;
const sameIds = (x: number[], y: number[]) => x.length === y.length && x.every((v, i) => v === y[i]);
const sameCreds = (a: Creds, b: Creds) => sameIds(a.uid, b.uid) && sameIds(a.gid, b.gid) && sameIds([...a.groups].sort(), [...b.groups].sort());

/**
 * A rollback's checks, before anything changes (`undo` thaws the subtree
 * on a refusal): each live process must be able to take its attributes
 * back with its own permissions, and credentials changed since the
 * checkpoint must be ones the caller could have and the process can set.
 */
export function checkRollbackAttrs(tracer: Tracer, kept: { ids: { pid: number }; creds: Creds; attrs?: ProcAttrs; threads: ThreadState[] }[], host: (pid: number) => number, callerPid: number, undo: () => void): void {
  try {
    // A membarrier registration cannot be undone: one made since the checkpoint refuses the rollback.
    const withAttrs = kept.filter((p) => p.attrs);
    const rs = withAttrs.map((p) => new Remote(tracer, tracer.tasks.get(host(p.ids.pid))!));
    try {
      callEach(rs, () => [SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0]).forEach((regs, i) => {
        const extra = Number(regs) & ~withAttrs[i].attrs!.membarrier;
        if (regs >= 0n && extra) throw new CkptError(errno('EOPNOTSUPP'), 'restart:membarrier', `task ${withAttrs[i].ids.pid}: registered for membarrier commands 0x${extra.toString(16)} since the checkpoint, and a registration cannot be undone`);
      });
    } finally {
      for (const r of rs) r.finish();
    }
    for (const p of kept) {
      const pid = host(p.ids.pid);
      checkAttrs(p, pid, true);
      if (tracer.prctlNoted.has(pid)) checkMdwe(tracer, p, pid); // PR_SET_MDWE is trapped to be noted: no call for the others
      for (const t of p.threads) {
        const st = readStatus(host(t.tid));
        const want = t.attrs?.creds ?? p.creds;
        if (sameCreds(parseCreds(st), want)) continue;
        checkCreds(want, parseCreds(readStatus(callerPid)), t.tid);
        const caps = capsOf(st);
        if (!has(caps, CAP_SETUID) || !has(caps, CAP_SETGID)) throw new CkptError(errno('EPERM'), 'restart:creds', `task ${p.ids.pid}: thread ${t.tid}'s credentials changed since the checkpoint (uid ${parseCreds(st).uid.join('/')}, was ${want.uid.join('/')}) and it can no longer change them back`);
      }
    }
  } catch (e) {
    undo();
    throw e;
  }
}

/**
 * `path`, as the supervisor sees it, as task `pid` names it from its own
 * root: a live chrooted process rolled back opens its files and its cwd
 * from inside its root.
 */
export function inTaskRoot(pid: number, path: string): string {
  const root = fs.readlinkSync(`/proc/${pid}/root`);
  if (root === '/') return path;
  const rel = under(root, path);
  return rel === undefined ? path : rel === '.' ? '/' : rel;
}

function capsetBuf(eff: bigint, prm: bigint, inh: bigint): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(CAP_V3, 0); // header: version, pid 0 (the calling thread)
  const lo = (x: bigint) => Number(x & 0xffffffffn), hi = (x: bigint) => Number(x >> 32n);
  [[lo(eff), lo(prm), lo(inh)], [hi(eff), hi(prm), hi(inh)]].forEach((w, k) => w.forEach((v, j) => b.writeUInt32LE(v, 8 + 12 * k + 4 * j)));
  return b;
}

/** The cgroup hierarchies the supervisor sees mounted: controllers ('' for v2) -> mount point. */
function cgroupMounts(): Map<string, string> {
  const out = new Map<string, string>();
  for (const l of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [pre, post] = l.split(' - ');
    if (!post) continue;
    const [type, , opts] = post.split(' ');
    const mnt = pre.split(' ')[4];
    if (type === 'cgroup2') out.set('', mnt);
    else if (type === 'cgroup') {
      const ctrls = opts.split(',').filter((o) => !['rw', 'ro', 'relatime', 'noatime', 'nosuid', 'nodev', 'noexec', 'clone_children'].includes(o) && !o.startsWith('release_agent'));
      out.set(ctrls.join(','), mnt);
    }
  }
  return out;
}

/** In the TREE record: every attribute typed and bounded (the kernel still checks what it is given). */
const decimal = z.string().regex(/^[0-9]{1,20}$/, 'not a decimal number');
const capHex = z.string().regex(/^[0-9a-f]{1,16}$/, 'not a capability set');
export const threadAttrsSchema = z.strictObject({
  comm: z.string().max(64),
  sched: z.strictObject({ policy: int(0, 7), flags: decimal, nice: int(-20, 19), priority: int(0, 99), runtime: decimal, deadline: decimal, period: decimal, utilMin: int(0, 1024).optional(), utilMax: int(0, 1024).optional() }),
  affinity: z.string().regex(/^[0-9a-f]{0,2048}$/, 'not an affinity mask'),
  timerSlack: z.union([decimal, z.literal('')]),
  pdeathsig: int(0, 64),
  caps: z.strictObject({ eff: capHex, prm: capHex, inh: capHex, bnd: capHex, amb: capHex }),
  noNewPrivs: z.boolean(),
  creds: credsSchema,
  ioprio: int(0, 0xffff).optional(),
});
export const procAttrsSchema = z.strictObject({
  rlimits: z.array(z.strictObject({ soft: z.union([decimal, z.literal('unlimited')]), hard: z.union([decimal, z.literal('unlimited')]) })).max(64),
  oomScoreAdj: int(-1000, 1000),
  personality: u32,
  thpDisable: z.boolean(),
  subreaper: z.boolean(),
  dumpable: int(0, 2),
  securebits: int(0, 0xffff),
  membarrier: int(0, 0xffffffff),
  root: path,
  cgroups: z.array(z.string().max(4096)).max(64),
  coredumpFilter: u32.optional(),
  mdwe: int(0, 3).optional(),
  ksm: z.boolean().optional(),
});
const sameAttrs: [Same<z.infer<typeof threadAttrsSchema>, ThreadAttrs>, Same<z.infer<typeof procAttrsSchema>, ProcAttrs>] = [true, true];
void sameAttrs;

/** memory-deny-write-execute set since the checkpoint cannot be cleared: the rollback is refused. */
function checkMdwe(tracer: Tracer, p: { ids: { pid: number }; attrs?: ProcAttrs }, pid: number): void {
  const r = new Remote(tracer, tracer.tasks.get(pid)!);
  let now: bigint;
  try {
    now = r.call(SYS.prctl, PR_GET_MDWE, 0, 0, 0, 0);
  } finally {
    r.finish();
  }
  if (now > 0n && Number(now) !== (p.attrs?.mdwe ?? 0)) throw new CkptError(errno('EOPNOTSUPP'), 'restart:mdwe', `task ${p.ids.pid}: set memory-deny-write-execute (PR_SET_MDWE 0x${now.toString(16)}) since the checkpoint, and it cannot be cleared`);
}

/** Open `path` in the task, write `text`, close: with the task's own permissions. */
function writeAs(r: Remote, what: string, path: string, text: string): void {
  const s = r.scratch();
  r.mem.write(s, Buffer.from(path + '\0'));
  const fd = r.check(what, SYS.openat, AT_FDCWD, s, O_WRONLY | O_CLOEXEC, 0);
  try {
    r.mem.write(s, Buffer.from(text));
    r.check(what, SYS.write, fd, s, text.length);
  } finally {
    r.call(SYS.close, fd);
  }
}

export interface AttrShell {
  state: { ids: { pid: number }; creds: Creds; attrs?: ProcAttrs; threads: ThreadState[] };
  remote: Remote;
  task: { tid: number; tgid: number };
  threads: Map<number, { tid: number; tgid: number; stop: string }>;
  gadget?: bigint;
  live: boolean;
}

/**
 * Every attribute back in a rebuilt process (fresh shell or live process),
 * its threads already made, memory and files in place. Order: what needs
 * the permissions the task starts with (limits, oom, cgroup, chroot, then
 * per thread scheduling, affinity, name, slack, personality, NNP), then
 * each thread's credentials where they differ from its checkpoint's (the
 * permission was checked before anything was built), then what they
 * include or what changing them resets (capabilities, securebits,
 * pdeathsig, dumpable). Per thread: two batches, and a few calls more
 * when its credentials change.
 */
export function restoreAttrs(tracer: Tracer, sh: AttrShell): void {
  const p = sh.state;
  const a = p.attrs;
  const host = (tid: number) => sh.threads.get(tid)!.tid;
  const credsOf = (t: ThreadState) => t.attrs?.creds ?? p.creds;
  const status = new Map(p.threads.map((t) => [t.tid, readStatus(host(t.tid))])); // /proc/TID: that thread's own
  const credsDiffer = (t: ThreadState) => !sameCreds(parseCreds(status.get(t.tid)!), credsOf(t));
  const remotes = new Map<number, Remote>();
  const remote = (tid: number): Remote => {
    if (tid === p.ids.pid) return sh.remote;
    let r = remotes.get(tid);
    if (!r) {
      r = new Remote(tracer, tracer.tasks.get(host(tid))!, sh.gadget);
      if (sh.gadget) useGadget(r, sh.gadget);
      remotes.set(tid, r);
    }
    return r;
  };
  try {
    if (!a) {
      for (const t of p.threads) if (credsDiffer(t)) restoreCreds(remote(t.tid), credsOf(t));
      return;
    }
    // The threads of a fresh shell are copies of its leader; a live process's are taken to share the leader's securebits.
    const sec = restoreProcessWide(sh, a);
    // A live process that never set pdeathsig or a slack has them as at the checkpoint (0, the leader's).
    const unnoted = sh.live && !tracer.prctlNoted.has(sh.task.tgid);
    for (const t of p.threads) {
      const ta = t.attrs;
      const tid = host(t.tid);
      const st = status.get(t.tid)!;
      // Only what differs: a thread with nothing to change is not run at all.
      const tb = new ThreadCalls(() => remote(t.tid));
      // ---- before credentials (they may drop what sched needs)
      if (ta) {
        if (!sameSched(schedOf(tid), ta.sched)) tb.add((b) => b.add(`restart:sched policy ${ta.sched.policy} nice ${ta.sched.nice} priority ${ta.sched.priority}`, SYS_sched_setattr, 0, b.put(schedBuf(ta.sched)), 0));
        if (ta.ioprio !== undefined && ioprioOf(tid) !== ta.ioprio) tb.add((b) => b.add(`restart:ioprio class ${ta.ioprio! >> 13} level ${ta.ioprio! & 0x1fff}`, SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, ta.ioprio!));
        if (!sameMask(affinityOf(tid), ta.affinity)) {
          const m = Buffer.from(ta.affinity, 'hex');
          tb.add((b) => b.add('restart:affinity', SYS_sched_setaffinity, 0, m.length, b.put(m)));
        }
        if (ta.timerSlack && !unnoted && readOr(`/proc/${tid}/timerslack_ns`) !== ta.timerSlack) tb.add((b) => b.add('restart:timerslack', SYS.prctl, PR_SET_TIMERSLACK, BigInt(ta.timerSlack)));
        const comm = Buffer.from(ta.comm).subarray(0, 15);
        if (statusName(st.get('Name') ?? '') !== comm.toString()) tb.add((b) => b.add('restart:comm', SYS.prctl, PR_SET_NAME, b.put(Buffer.concat([comm, Buffer.from([0])]))));
        if (ta.noNewPrivs && st.get('NoNewPrivs') !== '1') tb.add((b) => b.add('restart:no_new_privs', SYS.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
      }
      const pers = readOr(`/proc/${tid}/personality`);
      if (pers === undefined || parseInt(pers, 16) !== a.personality) tb.add((b) => b.add('restart:personality', SYS_personality, a.personality));
      // ---- credentials (what is above runs first if they change; else one batch does it all)
      const want = ta?.caps;
      const now = capsOf(st);
      const setCreds = credsDiffer(t);
      const capsDiffer = !!want && (Object.keys(want) as (keyof CapSets)[]).some((k) => hexBig(want[k]) !== hexBig(now[k]));
      if (setCreds) {
        tb.run();
        const rt = remote(t.tid);
        // Keep the permitted set through a change of uid: it is cut to the checkpoint's below.
        if (want) rt.check('restart:keepcaps', SYS.prctl, PR_SET_KEEPCAPS, 1);
        restoreCreds(rt, credsOf(t));
      }
      // ---- what they include, what changing them resets
      const caps = want && (capsDiffer || setCreds);
      if (caps) {
        const prm = hexBig(now.prm);
        tb.add((b) => {
          // Everything the task may have in effect, the inheritable set as wanted (ambient needs it).
          const at = b.put(capsetBuf(prm, prm, hexBig(want.inh)));
          b.add('restart:capabilities capset', SYS_capset, at, at + 8n);
          const drop = hexBig(now.bnd) & ~hexBig(want.bnd);
          for (let c = 0n; c < 64n; c++) if (drop & (1n << c)) b.add(`restart:capabilities drop ${capNames(1n << c)} from the bounding set`, SYS.prctl, PR_CAPBSET_DROP, c);
          b.add('restart:capabilities ambient', SYS.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
          const amb = hexBig(want.amb);
          for (let c = 0n; c < 64n; c++) if (amb & (1n << c)) b.add(`restart:capabilities ambient ${capNames(1n << c)}`, SYS.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0);
        });
      }
      const nowSec = setCreds && want ? sec | SECBIT_KEEP_CAPS : sec;
      if (nowSec !== a.securebits) {
        if ((nowSec ^ a.securebits) === SECBIT_KEEP_CAPS) tb.add((b) => b.add('restart:keepcaps', SYS.prctl, PR_SET_KEEPCAPS, a.securebits & SECBIT_KEEP_CAPS ? 1 : 0));
        else tb.add((b) => b.add(`restart:securebits 0x${a.securebits.toString(16)}`, SYS.prctl, PR_SET_SECUREBITS, a.securebits));
      }
      if (caps) {
        tb.add((b) => {
          const at = b.put(capsetBuf(hexBig(want.eff), hexBig(want.prm), hexBig(want.inh)));
          b.add('restart:capabilities capset', SYS_capset, at, at + 8n);
        });
      }
      // A fresh thread has none (clone clears it), nor has one after a change of credentials.
      const death = ta?.pdeathsig ?? 0;
      if (death || setCreds || (sh.live && !unnoted)) tb.add((b) => b.add('restart:pdeathsig', SYS.prctl, PR_SET_PDEATHSIG, death));
      if (t.tid === p.ids.pid) tb.add((b) => b.add('restart:dumpable', SYS.prctl, PR_SET_DUMPABLE, a.dumpable));
      tb.run();
    }
    // Set by injected calls the filter does not see: its next checkpoint must ask for them.
    if (a.subreaper || p.threads.some((t) => t.attrs?.pdeathsig) || new Set(p.threads.map((t) => t.attrs?.timerSlack)).size > 1) tracer.prctlNoted.add(sh.task.tgid);
  } finally {
    for (const r of remotes.values()) r.mem.close(); // registers are set last, by finishProcess
  }
}

/** Calls for one thread, collected first: its Remote is made only when there is any. */
class ThreadCalls {
  private ops: ((b: CallBatch) => void)[] = [];
  constructor(private readonly remote: () => Remote) {}
  add(op: (b: CallBatch) => void): void {
    this.ops.push(op);
  }
  run(): void {
    if (!this.ops.length) return;
    const b = new CallBatch(this.remote());
    for (const op of this.ops) op(b);
    this.ops = [];
    b.run();
  }
}

/** A /proc file's text (trimmed), or undefined where it cannot be read. */
function readOr(path: string): string | undefined {
  try {
    return fs.readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * Limits, mm flags, membarrier, oom_score_adj, cgroups, then the root
 * directory (CAP_SYS_CHROOT: before credentials). Returns the leader's
 * securebits as they are now.
 */
function restoreProcessWide(sh: AttrShell, a: ProcAttrs): number {
  const p = sh.state;
  const pid = sh.task.tid;
  const r = sh.remote;
  const pb = new CallBatch(r);
  const cur = readLimits(pid);
  a.rlimits.forEach((l, i) => {
    if (cur[i] && cur[i].soft === l.soft && cur[i].hard === l.hard) return;
    const v = Buffer.alloc(16);
    v.writeBigUInt64LE(limitValue(l.soft), 0);
    v.writeBigUInt64LE(limitValue(l.hard), 8);
    pb.add(`restart:rlimit RLIMIT_${RLIMIT_NAMES[i]} ${l.soft}/${l.hard}`, SYS_prlimit64, 0, i, pb.put(v), 0);
  });
  pb.add('restart:prctl PR_SET_THP_DISABLE', SYS.prctl, PR_SET_THP_DISABLE, a.thpDisable ? 1 : 0, 0, 0, 0);
  pb.add('restart:prctl PR_SET_CHILD_SUBREAPER', SYS.prctl, PR_SET_CHILD_SUBREAPER, a.subreaper ? 1 : 0);
  pb.add('restart:securebits', SYS.prctl, PR_GET_SECUREBITS);
  pb.add(undefined, SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0);
  const res = pb.run();
  const regs = Number(res[res.length - 1]), sec = Number(res[res.length - 2]);
  if (regs >= 0 && regs & ~a.membarrier) throw new CkptError(errno('EOPNOTSUPP'), 'restart:membarrier', `task ${p.ids.pid}: registered for membarrier commands 0x${(regs & ~a.membarrier).toString(16)} that the checkpoint was not, and a registration cannot be undone`);
  const mb = new CallBatch(r);
  for (let bit = 0; bit < 31; bit++) if (a.membarrier & ~regs & (1 << bit)) mb.add(`restart:membarrier register 0x${(1 << bit).toString(16)}`, SYS_membarrier, 1 << bit, 0, 0);
  mb.run();
  if (Number(fs.readFileSync(`/proc/${pid}/oom_score_adj`, 'utf8')) !== a.oomScoreAdj) writeAs(r, `restart:oom_score_adj ${a.oomScoreAdj}`, '/proc/self/oom_score_adj', String(a.oomScoreAdj));
  if (a.coredumpFilter !== undefined && parseInt(fs.readFileSync(`/proc/${pid}/coredump_filter`, 'utf8'), 16) !== a.coredumpFilter) writeAs(r, `restart:coredump_filter 0x${a.coredumpFilter.toString(16)}`, '/proc/self/coredump_filter', '0x' + a.coredumpFilter.toString(16));
  const mm = new CallBatch(r);
  mm.add(undefined, SYS.prctl, PR_GET_MDWE, 0, 0, 0, 0);
  mm.add(undefined, SYS.prctl, PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
  const [mdweNow, ksmNow] = mm.run().map((x) => (x > 0n ? Number(x) : 0));
  // MDWE cannot be cleared (a rollback past it was refused in checkRollbackAttrs); no mmap or mprotect of ours follows it.
  if ((a.mdwe ?? 0) !== mdweNow) r.check(`restart:prctl PR_SET_MDWE 0x${(a.mdwe ?? 0).toString(16)}`, SYS.prctl, PR_SET_MDWE, a.mdwe ?? 0, 0, 0, 0);
  // KSM for the whole process needs CAP_SYS_RESOURCE: the kernel says EPERM if the process lacks it.
  if (!!a.ksm !== (ksmNow !== 0)) r.check('restart:prctl PR_SET_MEMORY_MERGE', SYS.prctl, PR_SET_MEMORY_MERGE, a.ksm ? 1 : 0, 0, 0, 0);
  restoreCgroups(r, p.ids.pid, pid, a.cgroups);
  const root = fs.readlinkSync(`/proc/${pid}/root`);
  if (root !== a.root) {
    const to = under(root, a.root);
    if (to === undefined) throw new CkptError(errno('EOPNOTSUPP'), 'restart:root', `task ${p.ids.pid}: root directory ${a.root} is outside ${root}`);
    r.mem.write(r.scratch(), Buffer.from(to + '\0'));
    r.check(`restart:root chroot ${a.root}`, SYS_chroot, r.scratch());
  }
  return sec;
}

/**
 * Cgroup membership: in each hierarchy where the task is elsewhere than
 * the checkpoint's cgroup, it writes itself into that cgroup's
 * cgroup.procs (with its own permissions: the kernel's delegation rules).
 */
function restoreCgroups(r: Remote, pid: number, host: number, want: string[]): void {
  const now = new Set(fs.readFileSync(`/proc/${host}/cgroup`, 'utf8').split('\n').filter(Boolean));
  const moves = want.filter((l) => !now.has(l));
  if (!moves.length) return;
  for (const procs of cgroupFiles(pid, moves)) writeAs(r, `restart:cgroup ${procs}`, procs, '0');
}

/** The cgroup.procs file of each cgroup line, as the supervisor sees it; EOPNOTSUPP for one that is not there. */
function cgroupFiles(pid: number, lines: string[]): string[] {
  const mounts = cgroupMounts();
  return lines.map((l) => {
    const [, ctrls, path] = l.match(/^\d+:([^:]*):(.*)$/) ?? [];
    const mnt = ctrls === undefined ? undefined : mounts.get(ctrls);
    if (!mnt) throw new CkptError(errno('EOPNOTSUPP'), 'restart:cgroup', `task ${pid}: cgroup ${l}: no such hierarchy mounted here`);
    const procs = `${mnt}${path === '/' ? '' : path}/cgroup.procs`;
    if (!fs.existsSync(procs)) throw new CkptError(errno('EOPNOTSUPP'), 'restart:cgroup', `task ${pid}: cgroup ${l}: ${procs} does not exist`);
    return procs;
  });
}
