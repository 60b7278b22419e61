/**
 * File locks and leases held by the subtree: flock, POSIX (fcntl F_SETLK),
 * OFD (F_OFD_SETLK) locks and leases (F_SETLEASE).
 *
 * Capture reads the "lock:" lines of /proc/PID/fdinfo that captureFiles
 * already read for every descriptor (nothing more is read, nothing is
 * injected): the kernel lists there the locks taken through that very open
 * file description by its owner, that is, for POSIX locks the process (its
 * descriptor table) and for flock, OFD locks and leases the description.
 * A lock a process outside the subtree holds through a description of its
 * own does not show there and needs no keeping (it is not the subtree's).
 * Refused (EOPNOTSUPP): a flock/OFD lock or lease on a description a
 * supervised process outside the subtree also holds (whose lock would it be
 * after a restart?), any lock through a descriptor inherited from outside
 * the tree, a POSIX lock whose owner is outside the subtree, a lease being
 * broken, and lock kinds of no use here (mandatory, NFS delegations).
 * Blocked waiters are not locks: their call (F_SETLKW, flock) is restarted
 * as any interrupted call is, and waits again.
 *
 * Restore, once every descriptor is in place: each lock is taken again by
 * its owner, without waiting (F_SETLK, LOCK_NB, F_OFD_SETLK, F_SETLEASE):
 * a POSIX lock by its process through the same descriptor, the others
 * through a holder of the description (the one that took it if it still
 * holds it). One that cannot be taken (another process took the file
 * meanwhile) fails the restart with EBUSY. At a rollback, descriptions left
 * in place may hold locks taken since: those are released first.
 */
import { z, int, MANY, PID_MAX, type Same } from '../../lib/schema.js';
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { SYS } from '../../lib/libc.js';
import { readFdinfo } from '../../lib/proc.js';
import { nsPids } from '../../supervisor/pidns.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import type { FdProbe, FilesState, FilesTable, OutsideHolders } from './files.js';

const F_RDLCK = 0, F_WRLCK = 1, F_UNLCK = 2, F_SETLK = 6, F_OFD_SETLK = 37, F_SETLEASE = 1024;
const LOCK_SH = 1, LOCK_EX = 2, LOCK_NB = 4, LOCK_UN = 8, SYS_flock = 73;

export interface LockState {
  kind: 'posix' | 'flock' | 'ofd' | 'lease';
  /** The open file description (FilesTable.descs index). */
  desc: number;
  /** posix: the owner process and the descriptor it took it through; flock, lease: who took it (preferred holder at restore). */
  pid?: number;
  fd?: number;
  write: boolean;
  /** Byte range (decimal strings); end "EOF" for a range to the end of the file and beyond. */
  start: string;
  end: string;
}

/** In the TREE record: a lock's description, owner and byte range, bounded. */
const offset = z.string().regex(/^[0-9]{1,19}$/, 'not a decimal offset');
export const lockSchema = z.strictObject({
  kind: z.enum(['posix', 'flock', 'ofd', 'lease']),
  desc: int(0, MANY),
  pid: int(1, PID_MAX).optional(),
  fd: int(0, 1 << 20).optional(),
  write: z.boolean(),
  start: offset,
  end: z.union([offset, z.literal('EOF')]),
});
const sameLock: Same<z.infer<typeof lockSchema>, LockState> = true;
void sameLock;

const LINE = /^lock:\s+\d+:\s+(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+\S+\s+(\d+)\s+(\d+|EOF)\s*$/gm;
const KINDS: Record<string, LockState['kind']> = { POSIX: 'posix', FLOCK: 'flock', OFDLCK: 'ofd', LEASE: 'lease' };

const unsupported = (pid: number, fd: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:locks', `task ${pid}: fd ${fd} (${what})`);

/** The locks shown in fdinfo text (host pids). */
function parse(text: string): { cls: string; mode: string; type: string; pid: number; start: string; end: string }[] {
  if (!text.includes('lock:')) return [];
  const all = text.match(/^lock:.*$/gm) ?? [];
  const known = [...text.matchAll(LINE)].map((m) => ({ cls: m[1], mode: m[2], type: m[3], pid: Number(m[4]), start: m[5], end: m[6] }));
  // A line of a form not known here stands for a lock all the same: never dropped, refused.
  if (known.length !== all.length) return [...known, { cls: `unrecognised (${all.find((l) => !LINE_ONE.test(l))})`, mode: '', type: '', pid: 0, start: '0', end: '0' }];
  return known;
}
const LINE_ONE = new RegExp(LINE.source); // one line at a time

/**
 * The locks of a frozen subtree (host pids `procs`, root first), from what
 * captureFiles read; into `table.locks`.
 */
export function captureLocks(table: FilesTable, probes: FdProbe[], procs: number[], others: OutsideHolders): void {
  const inside = new Set(procs);
  const level = nsPids(procs[0]).length - 1;
  const toTree = (host: number) => nsPids(host)[level] ?? 0;
  const locks: LockState[] = [];
  const seen = new Set<string>();
  const checkedShare = new Set<number>();
  for (const p of probes) {
    for (const l of parse(p.text)) {
      const kind = KINDS[l.cls];
      if (p.desc === 'outside') throw unsupported(p.pid, p.fd, `a ${l.cls} lock on a descriptor inherited from outside the tree`);
      if (!kind) throw unsupported(p.pid, p.fd, `a ${l.cls} lock`);
      if (kind === 'lease' ? l.mode !== 'ACTIVE' || l.type === 'UNLCK' : l.mode !== 'ADVISORY') throw unsupported(p.pid, p.fd, kind === 'lease' ? `a lease being broken (${l.mode} ${l.type})` : `a ${l.mode} ${l.cls} lock`);
      if (l.type !== 'READ' && l.type !== 'WRITE') throw unsupported(p.pid, p.fd, `a ${l.cls} lock of type ${l.type}`);
      if (kind === 'posix' && !inside.has(l.pid)) throw unsupported(p.pid, p.fd, `a POSIX lock of process ${l.pid} outside the subtree`);
      if (kind !== 'posix' && !checkedShare.has(p.desc)) {
        checkedShare.add(p.desc);
        const ext = others.sharing(p.pid, p.fd, inside);
        if (ext !== undefined) throw unsupported(p.pid, p.fd, `a ${l.cls} lock on an open file description also held by process ${ext} outside the subtree`);
      }
      const owner = kind === 'posix' ? `${l.pid}` : '';
      const key = `${kind} ${p.desc} ${owner} ${l.type} ${l.start} ${l.end}`;
      if (seen.has(key)) continue; // the same description at two numbers, or in two processes
      seen.add(key);
      const s: LockState = { kind, desc: p.desc, write: l.type === 'WRITE', start: l.start, end: l.end };
      if (kind === 'posix') Object.assign(s, { pid: toTree(l.pid), fd: p.fd });
      else if (inside.has(l.pid)) s.pid = toTree(l.pid);
      locks.push(s);
    }
  }
  if (locks.length) table.locks = locks;
}

export interface LocksRestore {
  table: FilesTable;
  perProc: Map<number, FilesState>;
  order: number[];
  remote: (pid: number) => Remote;
  host: (pid: number) => number;
  /** Descriptions a rollback left in place: with the locks they hold now. */
  reused?: Set<number>;
}

const flockBuf = (type: number, start: bigint, len: bigint) => {
  const b = Buffer.alloc(32); // struct flock: short type, short whence, off_t start, off_t len, pid_t pid
  b.writeInt16LE(type, 0);
  b.writeBigInt64LE(start, 8);
  b.writeBigInt64LE(len, 16);
  return b;
};

/** Release and take again: the locks of every description, by their owners. */
export function restoreLocks(ctx: LocksRestore): void {
  const { table, perProc, order, remote } = ctx;
  const locks = table.locks ?? [];
  if (!locks.length && !ctx.reused?.size) return;
  // Where each description is held: its holders in restore order.
  const holders = new Map<number, { pid: number; fd: number }[]>();
  // A process sharing another's descriptor table (filesOf) holds that one's descriptors: a POSIX lock it took is taken again by it.
  const fdsOf = (pid: number) => perProc.get(perProc.get(pid)!.filesOf ?? pid)?.fds ?? [];
  for (const pid of order) {
    for (const f of fdsOf(pid)) if ('desc' in f) holders.set(f.desc, [...(holders.get(f.desc) ?? []), { pid, fd: f.fd }]);
  }
  // Rollback: a description left in place keeps what it holds now (taken since, maybe).
  for (const d of ctx.reused ?? []) {
    const h = holders.get(d)?.[0];
    if (!h) continue;
    let text = '';
    try {
      text = readFdinfo(ctx.host(h.pid), h.fd).text;
    } catch { /* gone: nothing held */ }
    if (!parse(text).length) continue;
    const b = new CallBatch(remote(h.pid));
    b.add(undefined, SYS_flock, h.fd, LOCK_UN);
    b.add(undefined, SYS.fcntl, h.fd, F_OFD_SETLK, b.put(flockBuf(F_UNLCK, 0n, 0n)));
    b.add(undefined, SYS.fcntl, h.fd, F_SETLK, b.put(flockBuf(F_UNLCK, 0n, 0n)));
    b.add(undefined, SYS.fcntl, h.fd, F_SETLEASE, F_UNLCK);
    b.run();
  }
  // Per process, one batch of lock calls.
  const calls = new Map<number, { fd: number; l: LockState; call: (b: CallBatch) => void }[]>();
  for (const l of locks) {
    if (!l || !['posix', 'flock', 'ofd', 'lease'].includes(l.kind) || typeof l.write !== 'boolean' || !/^\d{1,19}$/.test(String(l.start)) || !/^(\d{1,19}|EOF)$/.test(String(l.end))) {
      throw new CkptError(errno('EBADMSG'), 'image', `a lock of no known kind or range: ${JSON.stringify(l).slice(0, 200)}`);
    }
    const hs = holders.get(l.desc);
    const h = l.kind === 'posix' ? hs?.find((x) => x.pid === l.pid && x.fd === l.fd) : hs?.find((x) => x.pid === l.pid) ?? hs?.[0];
    if (!h) throw new CkptError(errno('EBADMSG'), 'image', `a ${l.kind} lock on description ${l.desc} that ${l.kind === 'posix' ? `process ${l.pid} does not hold at fd ${l.fd}` : 'nobody holds'}`);
    const start = BigInt(l.start), len = l.end === 'EOF' ? 0n : BigInt(l.end) - start + 1n;
    if (start < 0n || len < 0n) throw new CkptError(errno('EBADMSG'), 'image', `a ${l.kind} lock on description ${l.desc} with range ${l.start}-${l.end}`);
    const type = l.write ? F_WRLCK : F_RDLCK;
    const call = (b: CallBatch) => {
      if (l.kind === 'flock') b.add(undefined, SYS_flock, h.fd, (l.write ? LOCK_EX : LOCK_SH) | LOCK_NB);
      else if (l.kind === 'lease') b.add(undefined, SYS.fcntl, h.fd, F_SETLEASE, type);
      else b.add(undefined, SYS.fcntl, h.fd, l.kind === 'ofd' ? F_OFD_SETLK : F_SETLK, b.put(flockBuf(type, start, len)));
    };
    calls.set(h.pid, [...(calls.get(h.pid) ?? []), { fd: h.fd, l, call }]);
  }
  for (const [pid, cs] of calls) {
    for (let i = 0; i < cs.length; i += 100) { // 48 bytes of scratch each at most
      const part = cs.slice(i, i + 100);
      const b = new CallBatch(remote(pid));
      for (const c of part) c.call(b);
      b.run().forEach((x, j) => {
        if (x >= 0n || x <= -4096n) return;
        const { fd, l } = part[j];
        const what = `${l.kind === 'posix' ? 'POSIX' : l.kind === 'ofd' ? 'OFD' : l.kind} ${l.write ? 'write' : 'read'} ${l.kind === 'lease' ? 'lease' : 'lock'}`;
        const e = Number(-x);
        throw new CkptError(e === errno('EAGAIN') ? errno('EBUSY') : e, 'restart:locks', `task ${pid}: fd ${fd}: the ${what}${l.kind === 'flock' || l.kind === 'lease' ? '' : ` on ${l.start}-${l.end}`} cannot be taken again (errno ${e}: another process holds the file now?)`);
      });
    }
  }
}

/** For `ckpt inspect`: ", flock write lock, POSIX read lock 100-EOF by 42" (or nothing). */
export function describeLocks(table: FilesTable, desc: number): string {
  return (table.locks ?? []).filter((l) => l.desc === desc).map((l) => {
    const name = l.kind === 'posix' ? 'POSIX' : l.kind === 'ofd' ? 'OFD' : l.kind;
    const range = l.kind === 'flock' || l.kind === 'lease' ? '' : ` ${l.start}-${l.end}`;
    return `, ${l.kind === 'lease' ? '' : name + ' '}${l.write ? 'write' : 'read'} ${l.kind === 'lease' ? 'lease' : 'lock'}${range}${l.pid ? ` by ${l.pid}` : ''}`;
  }).join('');
}

/**
 * Before a rollback changes anything: is every lock of the checkpoint free
 * to be taken again, as far as /proc/locks tells? A flock or POSIX lock
 * that a process outside the subtree (`inside`: host pids) holds now on
 * the same file and that conflicts means EBUSY, with nothing changed. (OFD
 * locks show no owner and leases conflict with opens, not locks: those are
 * found only when taken.) `treePids`: the host pids of the checkpoint's
 * processes: a POSIX lock shown for one that no longer runs was taken
 * through a descriptor table it shared (fdkinds.ts), which its sharers
 * still hold, and so the lock: the subtree's own.
 */
export function checkLocksFree(table: FilesTable, inside: Set<number>, treePids: number[] = []): void {
  const locks = (table.locks ?? []).filter((l) => l.kind === 'flock' || l.kind === 'posix' || l.kind === 'ofd');
  if (!locks.length) return;
  const idOf = new Map<number, string>(); // desc -> "maj:min:ino" as /proc/locks writes it
  for (const l of locks) {
    const d = table.descs[l.desc];
    if (idOf.has(l.desc) || !d || (d.kind !== 'path' && d.kind !== 'fifo')) continue;
    try {
      const st = fs.statSync(d.path);
      const dev = st.dev, maj = Math.floor(dev / 256) & 0xfff, min = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
      idOf.set(l.desc, `${maj.toString(16).padStart(2, '0')}:${min.toString(16).padStart(2, '0')}:${st.ino}`);
    } catch { /* gone: reopening it will say so */ }
  }
  if (!idOf.size) return;
  let text: string;
  try {
    text = fs.readFileSync('/proc/locks', 'utf8');
  } catch {
    return;
  }
  for (const m of text.matchAll(/^\d+:\s+(POSIX|FLOCK|OFDLCK)\s+\S+\s+(READ|WRITE)\s+(-?\d+)\s+(\S+)\s+(\d+)\s+(\d+|EOF)\s*$/gm)) {
    const [cls, type, pid, id, s, e] = [m[1], m[2], Number(m[3]), m[4], BigInt(m[5]), m[6] === 'EOF' ? -1n : BigInt(m[6])];
    if (pid < 0 || inside.has(pid) || (treePids.includes(pid) && !fs.existsSync(`/proc/${pid}`))) continue; // an OFD lock (no owner shown), or the subtree's own
    for (const l of locks) {
      if (idOf.get(l.desc) !== id || (!l.write && type === 'READ')) continue;
      const flock = l.kind === 'flock';
      if (flock !== (cls === 'FLOCK')) continue; // flock and POSIX/OFD locks do not meet
      if (!flock) {
        const ls = BigInt(l.start), le = l.end === 'EOF' ? -1n : BigInt(l.end);
        const before = (a: bigint, b: bigint) => a !== -1n && a < b; // range [.., a] ends before b
        if (before(le, s) || before(e, ls)) continue;
      }
      throw new CkptError(errno('EBUSY'), 'restart:locks', `the checkpoint's ${l.kind === 'posix' ? 'POSIX' : l.kind === 'ofd' ? 'OFD' : 'flock'} ${l.write ? 'write' : 'read'} lock on ${(table.descs[l.desc] as { path: string }).path} is held by process ${pid} outside the subtree now`);
    }
  }
}
