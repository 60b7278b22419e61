/**
 * SysV IPC: shared memory segments, semaphore sets and message queues, each
 * with its id, key, owner, mode and contents.
 *
 * Which objects belong to a subtree (SysV objects are not held by a
 * descriptor, and semaphores and queues are attached to nothing):
 * - a segment belongs to it when a process of the subtree has it attached
 *   (its mapping is named /SYSV<key>, its inode number is the id);
 * - a semaphore set or a queue belongs to it when a process of the subtree
 *   (or an ancestor, before it forked that process) passed its id to semop,
 *   semtimedop, semctl, msgsnd, msgrcv or msgctl, or its key to semget or
 *   msgget (the seccomp filter traps those calls only to note them:
 *   Tracer.sysvUsed). Restored objects are noted for every restored process.
 * An object made with IPC_PRIVATE and never used yet is not seen.
 *
 * Semaphore undo lists (SEM_UNDO) are not visible in /proc, so the
 * supervisor follows them: a semop asking for SEM_UNDO (seen at the trap,
 * from its sembuf array) runs to its exit stop, and if it succeeded its
 * adjustments are added to the process's record; semctl SETVAL, SETALL and
 * IPC_RMID clear them (in every process, as the kernel does); exit drops
 * them, fork starts empty. They are made again in each restored or
 * rolled-back process by paired semops (restoreUndo). Adjustments cleared
 * by a process outside the tree (its SETVAL) are not seen. A semop whose
 * operations cannot be read is refused by name.
 *
 * Capture runs during the stop, from /proc/sysvipc/* and calls the
 * supervisor makes itself (semctl GETALL, msgrcv MSG_COPY|IPC_NOWAIT, which
 * reads a message without taking it); a segment's bytes are read once,
 * through the attaching process's /proc/PID/map_files entry, by ShmCapture
 * (fork does not snapshot them; an image carries them as SHM records under
 * the key "sysv:ID"). A husk would hold every segment attached (shm_nattch
 * one more, a removed segment kept alive): its attaches are undone as soon
 * as its memory is described.
 *
 * Restore writes /proc/sys/kernel/{shm,sem,msg}_next_id before each
 * *get(IPC_CREAT|IPC_EXCL), in the IPC namespace of the caller (the
 * supervisor's main thread joins it with setns for the time it takes), so
 * that each object gets its id back; then owner and mode (IPC_SET: the
 * creator stays the supervisor, cuid/cgid are not kept), contents, values,
 * messages. Each process attaches its segments again at their addresses
 * (memory.ts, shmat SHM_REMAP). A segment removed (IPC_RMID) while attached
 * is removed again once every process has attached it. An id or key
 * taken at restart is EBUSY (nothing made is left behind). With CKPT_KILL
 * the objects go with the subtree (dropWithSubtree). Not kept: SHM_LOCK,
 * SHM_HUGETLB, an attach only in part (partial munmap, mremap): refused by
 * name; cuid/cgid, shm_lpid/sempid/lspid/lrpid and the time stamps.
 */
import fs from 'node:fs';
import { CkptError, errno, errnoName } from '../../lib/errors.js';
import { sys, errnoNow, addressOf } from '../../lib/libc.js';
import type { MapEntry } from '../../lib/proc.js';
import type { Tracer } from '../../supervisor/tracer.js';
import { Remote, CallBatch } from '../../supervisor/remote.js';
import type { SyscallCtx } from '../context.js';
import { getRegs } from '../../lib/ptrace.js';
import type { ShmCapture, ShmRestore } from './shm.js';
import type { VmaState } from './memory.js';
import type { Creds } from './process.js';
import { unlinkQueues } from './mqueue.js';
import { z, int, MANY, type Same } from '../../lib/schema.js';

const SYS_shmat = 30, SYS_shmctl = 31, SYS_semget = 64, SYS_semop = 65, SYS_semctl = 66, SYS_shmdt = 67;
const SYS_msgget = 68, SYS_msgsnd = 69, SYS_msgrcv = 70, SYS_msgctl = 71, SYS_semtimedop = 220, SYS_setns = 308, SYS_shmget = 29;
const SYS_fallocate = 285, SYS_munmap = 11;
const IPC_CREAT = 0o1000, IPC_EXCL = 0o2000, IPC_NOWAIT = 0o4000, IPC_RMID = 0, IPC_SET = 1, IPC_STAT = 2;
const GETALL = 13, SETALL = 17, MSG_COPY = 0o40000, SEM_UNDO = 0x1000;
const SHM_DEST = 0o1000, SHM_LOCKED = 0o2000;
const CLONE_NEWIPC = 0x08000000, FALLOC_FL_KEEP_SIZE = 1, FALLOC_FL_PUNCH_HOLE = 2;
const PAGE = 4096;

const ipcKey = int(-(2 ** 31), 2 ** 31 - 1);
const ipcId = int(0, 2 ** 31 - 1);
const owner = { key: ipcKey, id: ipcId, uid: int(0, 2 ** 32 - 2), gid: int(0, 2 ** 32 - 2), mode: int(0, 0o777) };

export interface SysvShmSeg {
  key: number;
  id: number;
  uid: number;
  gid: number;
  /** Permission bits (0..0o777). */
  mode: number;
  size: number;
  /** IPC_RMID'ed while still attached: removed again once attached. */
  removed?: boolean;
}
export interface SysvSemSet {
  key: number;
  id: number;
  uid: number;
  gid: number;
  mode: number;
  /** semval of each semaphore. */
  values: number[];
}
export interface SysvMsgQueue {
  key: number;
  id: number;
  uid: number;
  gid: number;
  mode: number;
  /** msg_qbytes: the queue's byte limit. */
  qbytes: number;
  /** In queue order: mtype and the text (base64). */
  messages: { type: number; data: string }[];
}
export interface SysvIpcState {
  shm: SysvShmSeg[];
  sem: SysvSemSet[];
  msg: SysvMsgQueue[];
}

export const sysvIpcSchema = z.strictObject({
  shm: z.array(z.strictObject({ ...owner, size: int(1, 2 ** 46), removed: z.boolean().optional() })).max(4096 * 8),
  sem: z.array(z.strictObject({ ...owner, values: z.array(int(0, 32767)).min(1).max(32000) })).max(32000),
  msg: z.array(z.strictObject({ ...owner, qbytes: int(0, 2 ** 31 - 1), messages: z.array(z.strictObject({ type: int(1, Number.MAX_SAFE_INTEGER), data: z.string().max(1 << 26) })).max(MANY) })).max(32000),
}).superRefine((s, ctx) => {
  for (const kind of ['shm', 'sem', 'msg'] as const) {
    const ids = new Set<number>(), keys = new Set<number>();
    s[kind].forEach((o, i) => {
      if (ids.has(o.id)) ctx.addIssue({ code: 'custom', path: [kind, i, 'id'], message: `SysV ${kind} id ${o.id} twice` });
      if (o.key !== 0 && keys.has(o.key)) ctx.addIssue({ code: 'custom', path: [kind, i, 'key'], message: `SysV ${kind} key ${o.key} twice` });
      ids.add(o.id);
      keys.add(o.key);
    });
  }
});
const sameSysv: Same<z.infer<typeof sysvIpcSchema>, SysvIpcState> = true;
void sameSysv;

/** A process's undo adjustments of one set: [semaphore, semadj] pairs (what its exit will add to each value). */
export interface SemUndo {
  id: number;
  adj: [number, number][];
}
export const semUndoSchema = z.array(z.strictObject({ id: ipcId, adj: z.array(z.tuple([int(0, 31999), int(-32768, 32767)])).min(1).max(32000) })).max(32000);
const sameUndo: Same<z.infer<typeof semUndoSchema>, SemUndo[]> = true;
void sameUndo;

const hexKey = (k: number) => '0x' + (k >>> 0).toString(16).padStart(8, '0');
const unsupported = (pid: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:sysvipc', `task ${pid}: ${what}`);

// ---------------------------------------------------------------- notes (the filter's traps)

function notesOf(tracer: Tracer, tgid: number) {
  let n = tracer.sysvUsed.get(tgid);
  if (!n) tracer.sysvUsed.set(tgid, (n = { used: new Set(), undo: new Map() }));
  return n;
}
const arg32 = (v: bigint) => Number(BigInt.asIntN(32, v));
const noteId = (kind: 'sem' | 'msg') => (ctx: SyscallCtx) => {
  const id = arg32(ctx.args[0]);
  if (id >= 0) notesOf(ctx.tracer, ctx.caller.tgid).used.add(`${kind}:${id}`);
};
const noteKey = (kind: 'sem' | 'msg') => (ctx: SyscallCtx) => {
  const key = arg32(ctx.args[0]);
  if (key !== 0) notesOf(ctx.tracer, ctx.caller.tgid).used.add(`${kind}key:${key}`);
};
/**
 * semop/semtimedop(id, sops, nsops): the id and, when any operation asks
 * for SEM_UNDO, the adjustments it makes (semadj -= sem_op), applied to
 * the process's record if the call succeeds: it runs to its exit stop.
 */
function noteSemop(ctx: SyscallCtx): boolean {
  noteId('sem')(ctx);
  const id = arg32(ctx.args[0]);
  const n = Number(ctx.args[2] & 0xffffn);
  if (id < 0 || n <= 0 || n > 4096) return false; // EINVAL or E2BIG: nothing done
  const buf = Buffer.alloc(6 * n);
  if (sys.vmRead(ctx.caller.tid, buf, ctx.args[1]) !== buf.length) {
    // Unreadable here (it may still be readable to the call): cannot follow it.
    (notesOf(ctx.tracer, ctx.caller.tgid).unknown ??= new Set()).add(id);
    return false;
  }
  const deltas = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    if (!(buf.readUInt16LE(i * 6 + 4) & SEM_UNDO)) continue;
    const num = buf.readUInt16LE(i * 6);
    deltas.set(num, (deltas.get(num) ?? 0) - buf.readInt16LE(i * 6 + 2));
  }
  if (![...deltas.values()].some((d) => d !== 0)) return false;
  const { tracer, caller } = ctx;
  caller.atSyscallExit = () => {
    if (!succeeded(caller.tid, [SYS_semop, SYS_semtimedop])) return;
    const undo = notesOf(tracer, caller.tgid).undo;
    let m = undo.get(id);
    if (!m) undo.set(id, (m = new Map()));
    for (const [num, d] of deltas) {
      const v = (m.get(num) ?? 0) + d;
      if (v) m.set(num, v);
      else m.delete(num);
    }
    if (!m.size) undo.delete(id);
  };
  return true;
}

/**
 * A freeze may catch a task at the exit stop of a noted call before the
 * loop has seen that stop: its result is taken in now (before any call is
 * injected into it), so that the capture has it. Run first in every stop.
 */
export function settleSyscallExits(tracer: Tracer, procs: number[]): void {
  for (const pid of procs) {
    for (const t of tracer.threadsOf(pid)) {
      const then = t.atSyscallExit;
      if (!then || !(t.parked?.kind === 'stopped' && t.parked.syscallStop)) continue;
      t.atSyscallExit = undefined;
      then();
    }
  }
}

/** Did the call the task is at the exit of (one of `nrs`) succeed? */
function succeeded(tid: number, nrs: number[]): boolean {
  try {
    const regs = getRegs(tid);
    return nrs.includes(Number(regs.getSigned('orig_rax'))) && regs.getSigned('rax') >= 0n;
  } catch {
    return false;
  }
}

const SETVAL = 16;
/** semctl SETVAL, SETALL, IPC_RMID clear the set's adjustments in every process (the kernel's rule): followed at its exit. */
function noteSemctl(ctx: SyscallCtx): boolean {
  noteId('sem')(ctx);
  const id = arg32(ctx.args[0]), num = arg32(ctx.args[1]), cmd = arg32(ctx.args[2]) & ~0x100; // IPC_64
  if (cmd !== SETVAL && cmd !== SETALL && cmd !== IPC_RMID) return false;
  const { tracer, caller } = ctx;
  caller.atSyscallExit = () => {
    if (succeeded(caller.tid, [SYS_semctl])) clearAdjustments(tracer, id, cmd === SETVAL ? num : undefined);
  };
  return true;
}

/** Every process's adjustments of set `id` (of its semaphore `num` only) are gone. */
function clearAdjustments(tracer: Tracer, id: number, num?: number): void {
  for (const n of tracer.sysvUsed.values()) {
    const m = n.undo.get(id);
    if (!m) continue;
    if (num !== undefined) m.delete(num);
    if (num === undefined || !m.size) n.undo.delete(id);
  }
}

/** The SysV calls the filter traps only to note them (lib/seccomp.ts SYS_SYSV). */
export const NOTED_SYSV: Record<number, (ctx: SyscallCtx) => void> = {
  [SYS_semget]: noteKey('sem'),
  [SYS_semop]: noteSemop,
  [SYS_semtimedop]: noteSemop,
  [SYS_semctl]: noteSemctl,
  [SYS_msgget]: noteKey('msg'),
  [SYS_msgsnd]: noteId('msg'),
  [SYS_msgrcv]: noteId('msg'),
  [SYS_msgctl]: noteId('msg'),
};

/** After a restore or rollback: every process of the tree uses every object of it again. */
function noteRestored(tracer: Tracer, pids: number[], s: SysvIpcState): void {
  for (const p of pids) {
    const n = notesOf(tracer, p);
    for (const o of s.sem) n.used.add(`sem:${o.id}`);
    for (const o of s.msg) n.used.add(`msg:${o.id}`);
  }
}

// ---------------------------------------------------------------- the kernel's tables

type Row = Record<string, number>;
/** /proc/sysvipc/KIND as rows by column name (perms in octal, the rest decimal), as the current thread's IPC namespace shows it. */
function table(kind: 'shm' | 'sem' | 'msg'): Row[] {
  const lines = fs.readFileSync(`/proc/sysvipc/${kind}`, 'utf8').split('\n').filter((l) => l.trim());
  const names = lines[0].trim().split(/\s+/);
  return lines.slice(1).map((l) => {
    const row: Row = {};
    l.trim().split(/\s+/).forEach((v, i) => (row[names[i]] = names[i] === 'perms' ? parseInt(v, 8) : Number(v)));
    row.id = row.shmid ?? row.semid ?? row.msqid;
    return row;
  });
}

const nsIno = (pid: number | 'thread-self') => fs.statSync(`/proc/${pid}/ns/ipc`).ino;

/** Run `fn` with the supervisor's main thread in process `pid`'s IPC namespace. */
function inIpcNs<T>(pid: number, op: string, fn: () => T): T {
  if (nsIno(pid) === nsIno('thread-self')) return fn();
  const mine = fs.openSync('/proc/thread-self/ns/ipc', 'r');
  try {
    const theirs = fs.openSync(`/proc/${pid}/ns/ipc`, 'r');
    try {
      if (sys.syscall(SYS_setns, theirs, CLONE_NEWIPC) < 0) throw new CkptError(errnoNow(), op, `task ${pid}: cannot join its IPC namespace: ${errnoName(errnoNow())}`);
    } finally {
      fs.closeSync(theirs);
    }
    try {
      return fn();
    } finally {
      if (sys.syscall(SYS_setns, mine, CLONE_NEWIPC) < 0) throw new CkptError(errnoNow(), op, 'cannot go back to the supervisor\'s IPC namespace');
    }
  } finally {
    fs.closeSync(mine);
  }
}

function semValues(id: number, nsems: number): number[] {
  const buf = Buffer.alloc(2 * nsems);
  if (sys.syscall(SYS_semctl, id, 0, GETALL, addressOf(buf)) < 0) throw new CkptError(errnoNow(), 'checkpoint:sysvipc', `semctl(${id}, GETALL): ${errnoName(errnoNow())}`);
  return Array.from({ length: nsems }, (_, i) => buf.readUInt16LE(2 * i));
}

const msgMax = () => Number(fs.readFileSync('/proc/sys/kernel/msgmax', 'utf8'));

/** A queue's messages, in order, read without taking them (MSG_COPY: the n-th message). */
function msgMessages(id: number, qnum: number, cbytes: number): { type: number; data: string }[] {
  const max = Math.max(1, Math.min(msgMax(), cbytes)); // no message is larger than the queue's bytes
  const buf = Buffer.alloc(8 + max);
  const out: { type: number; data: string }[] = [];
  for (let i = 0; i < qnum; i++) {
    const n = sys.syscall(SYS_msgrcv, id, addressOf(buf), max, i, IPC_NOWAIT | MSG_COPY);
    if (n < 0) throw new CkptError(errnoNow() === errno('ENOSYS') ? errno('EOPNOTSUPP') : errnoNow(), 'checkpoint:sysvipc', `message queue ${id}: msgrcv(MSG_COPY) of message ${i}: ${errnoName(errnoNow())}`);
    out.push({ type: Number(buf.readBigInt64LE(0)), data: buf.subarray(8, 8 + n).toString('base64') });
  }
  return out;
}

function msgQbytes(id: number): number {
  const ds = Buffer.alloc(128);
  if (sys.syscall(SYS_msgctl, id, IPC_STAT, addressOf(ds)) < 0) throw new CkptError(errnoNow(), 'checkpoint:sysvipc', `msgctl(${id}, IPC_STAT): ${errnoName(errnoNow())}`);
  return Number(ds.readBigUInt64LE(88));
}

// ---------------------------------------------------------------- capture

const sysvOfMap = (m: MapEntry) => (/^\/SYSV[0-9a-f]{8}(?: \(deleted\))?$/.test(m.path) ? m.inode : -1);

/**
 * During the stop, with every process's maps read (`maps`, same order as
 * `procs`): the subtree's SysV objects, and its segments' bytes noted in
 * `shm` (copied with the other shared memory). Undefined: it has none.
 */
export function captureSysv(tracer: Tracer, procs: number[], maps: MapEntry[][], shm: ShmCapture): SysvIpcState | undefined {
  const attached = new Map<number, { pid: number; maps: MapEntry[] }[]>();
  procs.forEach((pid, i) => {
    for (const m of maps[i] ?? []) {
      const id = sysvOfMap(m);
      if (id < 0) continue;
      const list = attached.get(id) ?? [];
      let at = list.find((a) => a.pid === pid);
      if (!at) list.push((at = { pid, maps: [] }));
      at.maps.push(m);
      attached.set(id, list);
    }
  });
  const used = new Set<string>();
  for (const pid of procs) {
    const n = tracer.sysvUsed.get(pid);
    if (!n) continue;
    if (n.unknown?.size) throw unsupported(pid, `semop on semaphore set ${[...n.unknown].join(', ')} whose operations could not be read (whether it made SEM_UNDO adjustments is not known)`);
    for (const u of n.used) used.add(u);
  }
  if (!attached.size && !used.size) return undefined;
  const ns = nsIno(procs[0]);
  for (const pid of procs) if (nsIno(pid) !== ns) throw unsupported(pid, `in another IPC namespace than process ${procs[0]} of the same subtree (SysV objects of two namespaces are not kept)`);
  return inIpcNs(procs[0], 'checkpoint:sysvipc', () => {
    const state: SysvIpcState = { shm: [], sem: [], msg: [] };
    const shmRows = new Map(table('shm').map((r) => [r.id, r]));
    for (const [id, list] of attached) {
      const row = shmRows.get(id);
      const who = list[0].pid;
      if (!row) throw unsupported(who, `SysV shm id ${id} attached but not in /proc/sysvipc/shm`);
      if (row.perms & SHM_LOCKED) throw unsupported(who, `SysV shm key ${hexKey(row.key)} id ${id} is locked (SHM_LOCK is not kept)`);
      const whole = Math.ceil(row.size / PAGE) * PAGE;
      for (const a of list) {
        // Each attach whole: its VMAs (mprotect may split one) cover the segment from offset 0.
        const byOrigin = new Map<bigint, bigint>();
        for (const m of a.maps) byOrigin.set(m.start - m.offset, (byOrigin.get(m.start - m.offset) ?? 0n) + (m.end - m.start));
        for (const [origin, len] of byOrigin) {
          if (len !== BigInt(whole)) throw unsupported(a.pid, `SysV shm key ${hexKey(row.key)} id ${id} attached at 0x${origin.toString(16)} only in part (${len} of ${whole} bytes: a partial munmap or mremap is not kept)`);
        }
      }
      const m = list[0].maps[0];
      shm.add(`sysv:${id}`, `/SYSV${hexKey(row.key).slice(2)}`, `/proc/${who}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`);
      state.shm.push({ key: row.key, id, uid: row.uid, gid: row.gid, mode: row.perms & 0o777, size: row.size, removed: row.perms & SHM_DEST ? true : undefined });
    }
    const pick = (rows: Row[], kind: 'sem' | 'msg') => rows.filter((r) => used.has(`${kind}:${r.id}`) || (r.key !== 0 && used.has(`${kind}key:${r.key}`)));
    for (const r of pick(table('sem'), 'sem')) state.sem.push({ key: r.key, id: r.id, uid: r.uid, gid: r.gid, mode: r.perms & 0o777, values: semValues(r.id, r.nsems) });
    for (const r of pick(table('msg'), 'msg')) state.msg.push({ key: r.key, id: r.id, uid: r.uid, gid: r.gid, mode: r.perms & 0o777, qbytes: msgQbytes(r.id), messages: msgMessages(r.id, r.qnum, r.cbytes) });
    // The contents are copied with the other shared memory (ShmCapture.copy).
    return state.shm.length || state.sem.length || state.msg.length ? state : undefined;
  });
}

/** Process `pid`'s undo adjustments of the sets the capture keeps (undefined: none). */
export function semUndoOf(tracer: Tracer, pid: number, s: SysvIpcState | undefined): SemUndo[] | undefined {
  const undo = tracer.sysvUsed.get(pid)?.undo;
  if (!undo?.size || !s) return undefined;
  const out: SemUndo[] = [];
  for (const set of s.sem) {
    const m = undo.get(set.id);
    if (m?.size) out.push({ id: set.id, adj: [...m].filter(([num]) => num < set.values.length).sort((a, b) => a[0] - b[0]) });
  }
  return out.length ? out : undefined;
}

/**
 * Each process's undo adjustments made again, by the process itself: for
 * each one, one semop of two operations on the semaphore, the one with
 * SEM_UNDO (sem_op = -semadj) and its opposite without, the raising one
 * first, so the value is unchanged and never negative. The sets must have
 * no adjustments yet (new, or just given their values with SETALL).
 */
function restoreUndo(tracer: Tracer, procs: UndoHolder[]): void {
  for (const p of procs) {
    const n = notesOf(tracer, p.tgid);
    n.undo = new Map();
    if (!p.undo?.length) continue;
    const b = new CallBatch(p.r);
    for (const u of p.undo) {
      const ops = Buffer.alloc(12 * u.adj.length);
      u.adj.forEach(([num, a], i) => {
        const withUndo = { op: -a, flg: SEM_UNDO }, plain = { op: a, flg: 0 };
        [a < 0 ? withUndo : plain, a < 0 ? plain : withUndo].forEach((o, j) => {
          ops.writeUInt16LE(num, 12 * i + 6 * j);
          ops.writeInt16LE(o.op, 12 * i + 6 * j + 2);
          ops.writeInt16LE(o.flg | IPC_NOWAIT, 12 * i + 6 * j + 4);
        });
      });
      b.add(`restart:sysvipc task ${p.tgid}: semop (its SEM_UNDO adjustments of set ${u.id})`, SYS_semop, u.id, b.put(ops), 2 * u.adj.length);
      n.undo.set(u.id, new Map(u.adj));
      n.used.add(`sem:${u.id}`);
    }
    b.run();
  }
}

/** A process that may hold undo adjustments: its host pid, a Remote into it, the checkpoint's adjustments. */
export interface UndoHolder { tgid: number; r: Remote; undo?: SemUndo[] }

/**
 * A husk holds every segment its process had attached: undo those
 * attaches once its memory is described (the program would see
 * shm_nattch one too many, and a removed segment would outlive its users).
 */
export function detachInHusk(tracer: Tracer, husk: number, vmas: VmaState[]): void {
  const sysv = vmas.filter((v) => v.kind === 'sysv');
  if (!sysv.length) return;
  const r = new Remote(tracer, tracer.tasks.get(husk)!);
  try {
    r.batch(sysv.map((v) => [SYS_munmap, BigInt(v.start), BigInt(v.end) - BigInt(v.start)]));
  } finally {
    r.finish();
  }
}

// ---------------------------------------------------------------- restore

type Kind = 'shm' | 'sem' | 'msg';
const NEXT_ID: Record<Kind, string> = { shm: '/proc/sys/kernel/shm_next_id', sem: '/proc/sys/kernel/sem_next_id', msg: '/proc/sys/kernel/msg_next_id' };
const CTL: Record<Kind, number> = { shm: SYS_shmctl, sem: SYS_semctl, msg: SYS_msgctl };

/** IPC_SET: owner, mode (and a queue's byte limit). */
function ipcSet(kind: Kind, id: number, o: { uid: number; gid: number; mode: number }, qbytes?: number): void {
  const ds = Buffer.alloc(128);
  let r: number;
  if (kind === 'msg') {
    if (sys.syscall(SYS_msgctl, id, IPC_STAT, addressOf(ds)) < 0) throw new CkptError(errnoNow(), 'restart:sysvipc', `msgctl(${id}, IPC_STAT): ${errnoName(errnoNow())}`);
    if (qbytes !== undefined) ds.writeBigUInt64LE(BigInt(qbytes), 88);
  }
  ds.writeUInt32LE(o.uid, 4);
  ds.writeUInt32LE(o.gid, 8);
  ds.writeUInt32LE(o.mode, 20);
  if (kind === 'sem') r = sys.syscall(SYS_semctl, id, 0, IPC_SET, addressOf(ds));
  else r = sys.syscall(CTL[kind], id, IPC_SET, addressOf(ds));
  if (r < 0) throw new CkptError(errnoNow(), 'restart:sysvipc', `SysV ${kind} ${id}: IPC_SET uid ${o.uid} gid ${o.gid} mode 0${o.mode.toString(8)}: ${errnoName(errnoNow())}`);
}

function remove(kind: Kind, id: number): void {
  if (kind === 'sem') sys.syscall(SYS_semctl, id, 0, IPC_RMID, 0);
  else sys.syscall(CTL[kind], id, IPC_RMID, 0);
}

/** Make an object with its original id (next_id) and key; EBUSY if either is taken. */
function create(kind: Kind, o: { key: number; id: number; mode: number }, arg: number): void {
  fs.writeFileSync(NEXT_ID[kind], String(o.id));
  const flags = IPC_CREAT | IPC_EXCL | 0o600;
  const got = kind === 'shm' ? sys.syscall(SYS_shmget, o.key, arg, flags) : kind === 'sem' ? sys.syscall(SYS_semget, o.key, arg, flags) : sys.syscall(SYS_msgget, o.key, flags);
  const e = errnoNow();
  try {
    fs.writeFileSync(NEXT_ID[kind], '-1'); // unused (a failed *get): not left for someone else's
  } catch { /* already -1 */ }
  if (got < 0) throw new CkptError(e === errno('EEXIST') || e === errno('ENOSPC') ? errno('EBUSY') : e, 'restart:sysvipc', `SysV ${kind} id ${o.id} key ${hexKey(o.key)}: ${e === errno('EEXIST') ? 'the key' : e === errno('ENOSPC') ? 'the id' : 'it'} is taken (${errnoName(e)})`);
  if (got !== o.id) {
    remove(kind, got);
    throw new CkptError(errno('EBUSY'), 'restart:sysvipc', `SysV ${kind} id ${o.id} key ${hexKey(o.key)}: made as id ${got} (the id is taken)`);
  }
}

function setSem(s: SysvSemSet): void {
  const buf = Buffer.alloc(2 * s.values.length);
  s.values.forEach((v, i) => buf.writeUInt16LE(v, 2 * i));
  if (sys.syscall(SYS_semctl, s.id, 0, SETALL, addressOf(buf)) < 0) throw new CkptError(errnoNow(), 'restart:sysvipc', `semctl(${s.id}, SETALL): ${errnoName(errnoNow())}`);
}

/** A queue's messages: any it has now are taken first (rollback), then the checkpoint's are sent in order. */
function setMsgs(q: SysvMsgQueue): void {
  const buf = Buffer.alloc(8 + 64);
  while (sys.syscall(SYS_msgrcv, q.id, addressOf(buf), 64, 0, IPC_NOWAIT | 0o10000 /* MSG_NOERROR: what is dropped may be cut */) >= 0);
  for (const m of q.messages) {
    const data = Buffer.from(m.data, 'base64');
    const b = Buffer.alloc(8 + data.length);
    b.writeBigInt64LE(BigInt(m.type), 0);
    data.copy(b, 8);
    if (sys.syscall(SYS_msgsnd, q.id, addressOf(b), data.length, IPC_NOWAIT) < 0) throw new CkptError(errnoNow(), 'restart:sysvipc', `message queue ${q.id}: msgsnd of ${data.length} bytes: ${errnoName(errnoNow())}`);
  }
}

/** A segment's bytes: attached in the supervisor, written through its /proc/self/map_files entry. */
function fillSeg(s: SysvShmSeg, shm: ShmRestore, punch: boolean): void {
  const at = sys.syscall(SYS_shmat, s.id, 0, 0);
  if (at < 0 && at > -4096) throw new CkptError(errnoNow(), 'restart:sysvipc', `shmat(${s.id}): ${errnoName(errnoNow())}`);
  try {
    const end = at + Math.ceil(s.size / PAGE) * PAGE;
    const fd = fs.openSync(`/proc/self/map_files/${at.toString(16)}-${end.toString(16)}`, 'r+');
    try {
      // What was a hole (never written) at the checkpoint reads as zeros again.
      if (punch && sys.syscall(SYS_fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, s.size) < 0) throw new CkptError(errnoNow(), 'restart:sysvipc', `SysV shm ${s.id}: cannot clear it: ${errnoName(errnoNow())}`);
      shm.copyInto(`sysv:${s.id}`, fd);
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    sys.syscall(SYS_shmdt, at);
  }
}

/** ABI: never objects owned by someone the caller could not be. */
function checkOwners(s: SysvIpcState, caller: Creds): void {
  if (caller.uid[1] === 0) return;
  for (const [kind, list] of [['shm', s.shm], ['sem', s.sem], ['msg', s.msg]] as const) {
    for (const o of list) {
      if (!caller.uid.includes(o.uid) || !(caller.gid.includes(o.gid) || caller.groups.includes(o.gid))) {
        throw new CkptError(errno('EPERM'), 'restart:sysvipc', `SysV ${kind} id ${o.id} is owned by uid ${o.uid} gid ${o.gid}, which the caller (uid ${caller.uid.join('/')}) cannot be`);
      }
    }
  }
}

/** Is the id, or the key, of each object free in the namespace as the tables show it (`except`: ids that will be made free first)? */
function checkFree(kind: Kind, list: { key: number; id: number }[], rows: Row[], skip: Set<number>): void {
  for (const o of list) {
    if (skip.has(o.id)) continue;
    const byId = rows.find((r) => r.id === o.id), byKey = o.key !== 0 ? rows.find((r) => r.key === o.key) : undefined;
    if (byId || byKey) throw new CkptError(errno('EBUSY'), 'restart:sysvipc', `SysV ${kind} id ${o.id} key ${hexKey(o.key)}: ${byId ? `the id is in use (key ${hexKey(byId.key)})` : `the key is in use (id ${byKey!.id})`}`);
  }
}

/** The objects made again in one restore or rollback; undone if it fails. */
export class SysvRestore {
  private made: { kind: Kind; id: number }[] = [];
  constructor(private readonly s: SysvIpcState, private readonly nsPid: number) {}

  /**
   * restart: every object made again (before any process), owners checked
   * (EPERM) and ids and keys free (EBUSY) first. Segments get their bytes
   * in fill(), once the image's SHM records are read.
   */
  static restore(s: SysvIpcState | undefined, caller: number, creds: Creds): SysvRestore | undefined {
    if (!s) return undefined;
    checkOwners(s, creds);
    const r = new SysvRestore(s, caller);
    inIpcNs(caller, 'restart:sysvipc', () => {
      for (const kind of ['shm', 'sem', 'msg'] as const) checkFree(kind, s[kind], table(kind), new Set());
      try {
        r.makeAll(s.shm, s.sem, s.msg);
      } catch (e) {
        r.undoHere();
        throw e;
      }
    });
    return r;
  }

  /** Make these objects (in the namespace: the caller runs this inside inIpcNs). */
  makeAll(shm: SysvShmSeg[], sem: SysvSemSet[], msg: SysvMsgQueue[]): void {
    for (const o of shm) {
      create('shm', o, o.size);
      this.made.push({ kind: 'shm', id: o.id });
      ipcSet('shm', o.id, o);
    }
    for (const o of sem) {
      create('sem', o, o.values.length);
      this.made.push({ kind: 'sem', id: o.id });
      setSem(o);
      ipcSet('sem', o.id, o);
    }
    for (const o of msg) {
      create('msg', o, 0);
      this.made.push({ kind: 'msg', id: o.id });
      ipcSet('msg', o.id, o, o.qbytes);
      setMsgs(o);
    }
  }

  /** The segments' bytes, from the staged shared objects (image or checkpoint); each process's undo adjustments. */
  fill(shm: ShmRestore, tracer: Tracer, procs: UndoHolder[]): void {
    const fresh = new Set(this.made.filter((m) => m.kind === 'shm').map((m) => m.id));
    inIpcNs(this.nsPid, 'restart:sysvipc', () => {
      for (const seg of this.s.shm) fillSeg(seg, shm, !fresh.has(seg.id));
    });
    restoreUndo(tracer, procs);
  }

  /** Everything attached again: segments removed at the checkpoint are removed again; the tree's processes noted as users. */
  finish(tracer: Tracer, pids: number[]): void {
    inIpcNs(this.nsPid, 'restart:sysvipc', () => {
      for (const seg of this.s.shm) if (seg.removed) remove('shm', seg.id); // again for one still removed: no-op
    });
    noteRestored(tracer, pids, this.s);
  }

  /** A failed restore leaves no object behind. */
  undo(): void {
    try {
      inIpcNs(this.nsPid, 'restart:sysvipc', () => this.undoHere());
    } catch { /* the namespace is gone: so are they */ }
  }
  private undoHere(): void {
    for (const m of this.made.splice(0)) remove(m.kind, m.id);
  }

  /**
   * rollback: checked before anything changes (EBUSY: an id or key the
   * checkpoint needs is taken by another object; a segment removed since
   * that is still attached cannot be made again under its id). Objects the
   * subtree uses now and the checkpoint does not have are removed in
   * apply(); those gone since are made again; all get the checkpoint's
   * owner, mode, values, messages and bytes.
   */
  static checkRollback(tracer: Tracer, s: SysvIpcState | undefined, procs: number[]): SysvRollback | undefined {
    settleSyscallExits(tracer, procs);
    for (const pid of procs) for (const t of tracer.threadsOf(pid)) t.atSyscallExit = undefined; // their registers go back to the checkpoint's
    const now = captureUsed(tracer, procs);
    if (!s && !now.size) return undefined;
    const st = s ?? { shm: [], sem: [], msg: [] };
    const nsPid = procs[0];
    return inIpcNs(nsPid, 'restart:sysvipc', () => {
      const rows = { shm: table('shm'), sem: table('sem'), msg: table('msg') };
      const live = new Set<string>();
      const extra: { kind: Kind; id: number }[] = [];
      for (const kind of ['shm', 'sem', 'msg'] as const) {
        const want = new Map<number, { key: number; id: number }>(st[kind].map((o) => [o.id, o]));
        for (const r of rows[kind]) {
          const o = want.get(r.id);
          if (o && (r.key === o.key || (kind === 'shm' && r.perms & SHM_DEST))) {
            if (kind === 'shm' && r.perms & SHM_DEST && !(o as SysvShmSeg).removed) throw new CkptError(errno('EBUSY'), 'restart:sysvipc', `SysV shm id ${r.id} was removed since the checkpoint and is still attached: it cannot be made again under its id`);
            live.add(`${kind}:${r.id}`);
          } else if (now.has(`${kind}:${r.id}`) || (r.key !== 0 && now.has(`${kind}key:${r.key}`))) {
            if (!o) extra.push({ kind, id: r.id }); // made since by the subtree: goes
            else throw new CkptError(errno('EBUSY'), 'restart:sysvipc', `SysV ${kind} id ${r.id} now has key ${hexKey(r.key)}, not the checkpoint's ${hexKey(o.key)}`);
          }
        }
        const going = new Set(extra.filter((x) => x.kind === kind).map((x) => x.id));
        const gone = st[kind].filter((o) => !live.has(`${kind}:${o.id}`));
        checkFree(kind, gone, rows[kind].filter((r) => !going.has(r.id)), new Set());
      }
      return new SysvRollback(st, nsPid, live, extra);
    });
  }
}

/** The objects a live subtree uses now: attached segments and noted ids and keys. */
function captureUsed(tracer: Tracer, procs: number[]): Set<string> {
  const out = new Set<string>();
  for (const pid of procs) {
    for (const u of tracer.sysvUsed.get(pid)?.used ?? []) out.add(u);
    let maps: string;
    try {
      maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8');
    } catch {
      continue;
    }
    for (const m of maps.matchAll(/^\S+ \S+ \S+ \S+ (\d+)\s+\/SYSV[0-9a-f]{8}/gm)) out.add(`shm:${m[1]}`);
  }
  return out;
}

export class SysvRollback {
  private restore?: SysvRestore;
  constructor(private readonly s: SysvIpcState, private readonly nsPid: number, private readonly live: Set<string>, private readonly extra: { kind: Kind; id: number }[]) {}

  /**
   * After the checks, once the checkpoint's shared objects are staged in
   * `shm` and the processes born since are gone (their exit applied their
   * own adjustments): `procs`, every process of the tree.
   */
  apply(shm: ShmRestore, tracer: Tracer, procs: UndoHolder[]): void {
    for (const o of this.s.sem) clearAdjustments(tracer, o.id); // SETALL (or a new set) clears them in the kernel
    inIpcNs(this.nsPid, 'restart:sysvipc', () => {
      for (const x of this.extra) remove(x.kind, x.id);
      for (const o of this.s.shm) if (this.live.has(`shm:${o.id}`)) ipcSet('shm', o.id, o);
      for (const o of this.s.sem) {
        if (!this.live.has(`sem:${o.id}`)) continue;
        setSem(o);
        ipcSet('sem', o.id, o);
      }
      for (const o of this.s.msg) {
        if (!this.live.has(`msg:${o.id}`)) continue;
        ipcSet('msg', o.id, o, o.qbytes);
        setMsgs(o);
      }
    });
    const gone = (kind: Kind) => this.s[kind].filter((o) => !this.live.has(`${kind}:${o.id}`));
    const r = (this.restore = new SysvRestore(this.s, this.nsPid));
    inIpcNs(this.nsPid, 'restart:sysvipc', () => r.makeAll(gone('shm') as SysvShmSeg[], gone('sem') as SysvSemSet[], gone('msg') as SysvMsgQueue[]));
    r.fill(shm, tracer, procs); // every segment's bytes (the live ones cleared first), the adjustments
  }

  finish(tracer: Tracer, pids: number[]): void {
    this.restore?.finish(tracer, pids);
  }
}

/**
 * CKPT_KILL: the subtree's objects go with it (while it is still frozen,
 * before it is killed), as its pids do, so that a restart finds their ids,
 * keys and names free: SysV objects and named POSIX message queues would
 * otherwise outlive their processes. Only those a process of the subtree
 * could remove itself (its euid the object's owner or creator, or 0): an
 * object of someone else's it merely used stays (and a restart of the image
 * is EBUSY while it does).
 */
export function dropWithSubtree(tree: { sysvipc?: SysvIpcState; processes: { creds: Creds }[]; files: { descs: { kind: string; mq?: { name: string; deleted?: boolean; uid: number } }[] } }, root: number): void {
  const s = tree.sysvipc;
  const euids = new Set(tree.processes.map((p) => p.creds.uid[1]));
  const may = (...owners: number[]) => euids.has(0) || owners.some((u) => euids.has(u));
  const queues = tree.files.descs.flatMap((d) => (d.kind === 'mqueue' && d.mq && !d.mq.deleted && may(d.mq.uid) ? [d.mq.name] : []));
  if (!s && !queues.length) return;
  inIpcNs(root, 'checkpoint:sysvipc', () => {
    for (const kind of ['shm', 'sem', 'msg'] as const) {
      if (!s?.[kind].length) continue;
      const rows = new Map(table(kind).map((r) => [r.id, r]));
      for (const o of s[kind]) {
        const r = rows.get(o.id);
        if (r && may(r.uid, r.cuid)) remove(kind, o.id);
      }
    }
    unlinkQueues(queues);
  });
}
