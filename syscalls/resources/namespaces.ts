/**
 * Namespaces: none of its own is kept. A restart makes every process a
 * child of the caller, in the caller's namespaces, so a process that made
 * its own (unshare or clone with CLONE_NEWNS, NEWNET, NEWUTS, NEWIPC,
 * NEWUSER, NEWCGROUP, NEWTIME) would come back without it: its mounts,
 * network, host name or user mapping silently gone. Such a checkpoint is
 * refused, naming the namespace. Pid namespaces are the exception,
 * handled by pidns.ts and the restart (--pidns, checkpoints of a pid 1).
 *
 * Read from the husk after the thaw (it shares the process's namespaces),
 * so the check costs the subtree no stop time.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';

const KINDS = ['mnt', 'net', 'uts', 'ipc', 'user', 'cgroup', 'time'] as const;

/** The supervisor's own namespaces (its tracees start in them). */
export function ownNamespaces(): Map<string, string> {
  return new Map(KINDS.map((k) => [k, readNs('self', k) ?? '']));
}

function readNs(pid: number | 'self', kind: string): string | undefined {
  try {
    return fs.readlinkSync(`/proc/${pid}/ns/${kind}`);
  } catch {
    return undefined; // a kind this kernel lacks
  }
}

/** Refuse process `who` (read through its husk `pid`) if it is in a namespace of its own. */
export function refuseOwnNamespaces(pid: number, who: number, ours: Map<string, string>): void {
  for (const kind of KINDS) {
    const ns = readNs(pid, kind);
    if (ns !== undefined && ns !== ours.get(kind)) {
      throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:namespaces', `task ${who}: is in its own ${kind} namespace (${ns}; unshare or clone with CLONE_NEW${kind === 'mnt' ? 'NS' : kind.toUpperCase()}): not supported`);
    }
  }
}
