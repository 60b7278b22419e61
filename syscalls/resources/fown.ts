/**
 * Owners of open file descriptions (F_SETOWN / F_SETOWN_EX: a thread, a
 * process or a process group, the target of SIGIO and SIGURG) and the
 * signal sent instead of SIGIO (F_SETSIG).
 *
 * fdinfo does not show them. They belong to the description, not to a
 * descriptor or a process, so the supervisor reads them itself, on its own
 * duplicate of each description (pidfd_getfd, one pidfd per process): two
 * fcntl calls of its own per description, no call injected into the
 * stopped tasks, and it runs while the husks are made. Every description
 * is read, not only those with O_ASYNC: an owner set before O_ASYNC (or
 * one that a lease break, SIGURG or a later F_SETFL uses) is state the
 * program can read back.
 *
 * An owner must be a thread, process or process group of the subtree:
 * anything else could not be named again at a restart (EOPNOTSUPP).
 * Restored once every process exists and every description is in place,
 * by one holder of each, and after the locks (F_SETLEASE makes its caller
 * the owner). The kernel checks the sender's credentials against the
 * target's when it signals, with those of the process that set the owner:
 * here the restarter's (at a rollback the process's own), never more than
 * the caller has.
 */
import { z, int, MANY, PID_MAX, type Same } from '../../lib/schema.js';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, SYS, addressOf } from '../../lib/libc.js';
import fs, { closeSync } from 'node:fs';
import { readStat } from '../../lib/proc.js';
import { nsPids } from '../../supervisor/pidns.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import type { FdProbe, FilesState, FilesTable } from './files.js';

const F_SETSIG = 10, F_GETSIG = 11, F_SETOWN_EX = 15, F_GETOWN_EX = 16;
const F_OWNER_TID = 0, F_OWNER_PID = 1, F_OWNER_PGRP = 2;
const TYPES = ['thread', 'process', 'process group'];

export interface OwnerState {
  desc: number;
  /** F_OWNER_TID 0, F_OWNER_PID 1, F_OWNER_PGRP 2. */
  type: number;
  /** As the tree names it (0: no owner). */
  pid: number;
  /** F_SETSIG (0: SIGIO). */
  sig: number;
}

/** In the TREE record: owners name processes of the tree (or 0), signals 0..64. */
export const ownerSchema = z.strictObject({ desc: int(0, MANY), type: int(0, 2), pid: int(0, PID_MAX), sig: int(0, 64) });
const sameOwner: Same<z.infer<typeof ownerSchema>, OwnerState> = true;
void sameOwner;

/** Does the supervisor's descriptor `mine` have an owner or a signal set? */
export const hasOwner = (mine: number): boolean => readOwner(mine) !== null;

/** The owner and signal of one description, read through a duplicate of it; null if none. */
function readOwner(mine: number): { type: number; pid: number; sig: number } | null {
  const ex = Buffer.alloc(8);
  if (sys.syscall(SYS.fcntl, mine, F_GETOWN_EX, addressOf(ex)) < 0) return null;
  const sig = sys.fcntl(mine, F_GETSIG);
  const type = ex.readInt32LE(0), pid = ex.readInt32LE(4);
  return pid || sig > 0 ? { type, pid, sig: Math.max(0, sig) } : null;
}

/**
 * Owners of the subtree's descriptions (first holders from `probes`), into
 * `table.owners`. `procs`: the subtree's processes (host pids, root first).
 */
export function captureOwners(table: FilesTable, probes: FdProbe[], procs: number[]): void {
  const firsts = probes.filter((p): p is FdProbe & { desc: number } => p.first && typeof p.desc === 'number');
  if (!firsts.length) return;
  // Who may be named: the subtree's threads, processes and groups (host ids).
  const level = nsPids(procs[0]).length - 1;
  const toTree = (host: number) => nsPids(host)[level] ?? 0;
  const tids = new Set<number>(), pids = new Set(procs), pgrps = new Set<number>();
  const owners: OwnerState[] = [];
  let pidfd = -1, at = 0;
  try {
    for (const p of firsts) {
      if (p.pid !== at) {
        if (pidfd >= 0) closeSync(pidfd);
        pidfd = sys.pidfdOpen(p.pid);
        at = p.pid;
      }
      const mine = sys.pidfdGetfd(pidfd, p.fd);
      if (mine < 0) continue; // closed meanwhile: captureFiles saw it, it is not there any longer
      let o: ReturnType<typeof readOwner>;
      try {
        o = readOwner(mine);
      } finally {
        closeSync(mine);
      }
      if (!o) continue;
      if (o.pid) {
        if (!pgrps.size) {
          for (const pid of procs) {
            pgrps.add(Number(readStat(pid).field(5)));
            for (const t of listTasks(pid)) tids.add(t);
          }
        }
        const known = o.type === F_OWNER_PGRP ? pgrps.has(o.pid) && pids.has(o.pid) : o.type === F_OWNER_TID ? tids.has(o.pid) : pids.has(o.pid);
        if (!known) {
          throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${p.pid}: fd ${p.fd} (its owner, ${TYPES[o.type] ?? 'type ' + o.type} ${o.pid}, is outside the subtree${o.type === F_OWNER_PGRP ? ' or not led by one of its processes' : ''})`);
        }
      }
      owners.push({ desc: p.desc, type: o.type, pid: o.pid ? toTree(o.pid) : 0, sig: o.sig });
    }
  } finally {
    if (pidfd >= 0) closeSync(pidfd);
  }
  if (owners.length) table.owners = owners;
}

function listTasks(pid: number): number[] {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).map(Number);
  } catch {
    return [];
  }
}

/**
 * Owners and signals set again, each by the first holder of its
 * description. `reused`: descriptions a rollback left in place (their
 * owner now may be one set since: set back, to none if there was none).
 */
export function restoreOwners(table: FilesTable, perProc: Map<number, FilesState>, order: number[], remote: (pid: number) => Remote, host: (pid: number) => number, reused?: Set<number>): void {
  const want = new Map((table.owners ?? []).map((o) => [o.desc, o]));
  for (const d of reused ?? []) if (!want.has(d)) want.set(d, { desc: d, type: F_OWNER_PID, pid: 0, sig: 0 });
  if (!want.size) return;
  // A description left in place with no owner, as at the checkpoint, needs no call (read here, not injected).
  const same = (pid: number, fd: number, o: OwnerState) => {
    const mine = sys.takeFd(host(pid), fd);
    if (mine < 0) return false;
    try {
      const now = readOwner(mine) ?? { type: F_OWNER_PID, pid: 0, sig: 0 };
      return now.pid === 0 && o.pid === 0 && now.sig === o.sig; // an owner is always set again (its pid may be a namespace's)
    } finally {
      closeSync(mine);
    }
  };
  for (const pid of order) {
    let b: CallBatch | undefined, n = 0;
    for (const f of perProc.get(pid)!.fds) {
      if (!('desc' in f)) continue;
      const o = want.get(f.desc);
      if (!o) continue;
      want.delete(f.desc);
      if (reused?.has(f.desc) && same(pid, f.fd, o)) continue;
      if (![F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP].includes(o.type) || !Number.isInteger(o.pid) || o.pid < 0 || !Number.isInteger(o.sig) || o.sig < 0 || o.sig > 64) {
        throw new CkptError(errno('EBADMSG'), 'image', `description ${o.desc}: owner type ${o.type} pid ${o.pid} signal ${o.sig}`);
      }
      if (n++ % 200 === 0) b?.run(); // 16 bytes of scratch each
      if (n % 200 === 1) b = new CallBatch(remote(pid));
      b = b!;
      const ex = Buffer.alloc(8);
      ex.writeInt32LE(o.type, 0);
      ex.writeInt32LE(o.pid, 4);
      b.add(`restart:files fd ${f.fd} F_SETOWN_EX ${TYPES[o.type] ?? o.type} ${o.pid}`, SYS.fcntl, f.fd, F_SETOWN_EX, b.put(ex));
      b.add(`restart:files fd ${f.fd} F_SETSIG ${o.sig}`, SYS.fcntl, f.fd, F_SETSIG, o.sig);
    }
    b?.run();
  }
}

/** For `ckpt inspect`: ", owner process 42, signal 10" (or nothing). */
export function describeOwner(table: FilesTable, desc: number): string {
  const o = table.owners?.find((x) => x.desc === desc);
  if (!o) return '';
  return `${o.pid ? `, owner ${TYPES[o.type] ?? o.type} ${o.pid}` : ''}${o.sig ? `, signal ${o.sig}` : ''}`;
}
