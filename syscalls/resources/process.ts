/**
 * Process-wide state: ids, name, credentials, and the mm fields the kernel
 * keeps beside the mappings (code/data/brk/stack/args/env bounds, auxv, exe),
 * which come back in one PR_SET_MM_MAP.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { readStat } from '../../lib/proc.js';
import { SYS } from '../../lib/libc.js';
import type { Remote, CallBatch } from '../../supervisor/remote.js';
import { openIn } from './memory.js';
import { z, pid, pid0, id, path, addr, base64, dec64, type Same } from '../../lib/schema.js';

const PR_SET_NAME = 15, PR_SET_MM = 35, PR_SET_MM_MAP = 14;
const O_RDONLY = 0, O_CLOEXEC = 0o2000000;

export interface Creds {
  uid: number[]; // real, effective, saved, fs
  gid: number[];
  groups: number[];
}

export interface ProcessIds {
  pid: number;
  ppid: number;
  pgid: number;
  sid: number;
  comm: string;
  /** Start time (clock ticks since boot) and boot id: tell this process from a pid reuse. */
  starttime: string;
  bootId: string;
}

export interface MmState {
  startCode: string; endCode: string; startData: string; endData: string;
  startBrk: string; brk: string; startStack: string;
  argStart: string; argEnd: string; envStart: string; envEnd: string;
  auxv: string; // base64
  exe: string;
}

/** NGROUPS_MAX */
const NGROUPS = 65536;
export const credsSchema = z.strictObject({
  uid: z.array(id).length(4),
  gid: z.array(id).length(4),
  groups: z.array(id).max(NGROUPS),
});
export const idsSchema = z.strictObject({
  pid,
  ppid: pid0,
  pgid: pid0,
  sid: pid0,
  comm: z.string().max(64),
  starttime: dec64,
  bootId: z.string().max(64),
});
export const mmSchema = z.strictObject({
  startCode: addr, endCode: addr, startData: addr, endData: addr,
  startBrk: addr, brk: addr, startStack: addr,
  argStart: addr, argEnd: addr, envStart: addr, envEnd: addr,
  auxv: base64(4096),
  exe: path,
});
const sameCreds: Same<z.infer<typeof credsSchema>, Creds> = true;
const sameIds: Same<z.infer<typeof idsSchema>, ProcessIds> = true;
const sameMm: Same<z.infer<typeof mmSchema>, MmState> = true;
void [sameCreds, sameIds, sameMm];

export function parseCreds(status: Map<string, string>): Creds {
  const nums = (k: string) => (status.get(k) ?? '').split(/\s+/).filter(Boolean).map(Number);
  return { uid: nums('Uid'), gid: nums('Gid'), groups: nums('Groups') };
}

export function captureIds(pid: number): ProcessIds {
  const st = readStat(pid);
  return {
    pid,
    ppid: Number(st.field(4)),
    pgid: Number(st.field(5)),
    sid: Number(st.field(6)),
    comm: st.comm,
    starttime: st.field(22),
    bootId: bootId(),
  };
}

/** This boot's id: constant until the machine restarts, so read once. */
const boot = { id: '' };
export const bootId = (): string => (boot.id ||= fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim());

/** brk comes from an injected brk(0); the rest from /proc/PID/stat. */
export function captureMm(r: Remote, pid: number): MmState {
  const st = readStat(pid);
  const h = (n: number) => '0x' + BigInt(st.field(n)).toString(16);
  const brk = r.check('checkpoint:mm', SYS.brk, 0);
  return {
    startCode: h(26), endCode: h(27), startStack: h(28),
    startData: h(45), endData: h(46), startBrk: h(47),
    brk: '0x' + brk.toString(16),
    argStart: h(48), argEnd: h(49), envStart: h(50), envEnd: h(51),
    auxv: fs.readFileSync(`/proc/${pid}/auxv`).toString('base64'),
    exe: fs.readlinkSync(`/proc/${pid}/exe`),
  };
}

/** `setExe`: a fresh shell must take the image's executable; a live process keeps its own. */
export function restoreMm(b: CallBatch, mm: MmState, setExe = true): void {
  const r = b.r;
  const auxv = Buffer.from(mm.auxv, 'base64');
  // The exe link can only be changed while the old file is unmapped: when
  // the shell already runs the image's binary there is nothing to change.
  const exeFd = setExe && !sameFile(`/proc/${r.task.tid}/exe`, mm.exe) ? openIn(r, mm.exe, O_RDONLY | O_CLOEXEC, 'restart:mm') : -1n;
  const map = Buffer.alloc(104);
  const fields = [mm.startCode, mm.endCode, mm.startData, mm.endData, mm.startBrk, mm.brk, mm.startStack, mm.argStart, mm.argEnd, mm.envStart, mm.envEnd];
  fields.forEach((v, i) => map.writeBigUInt64LE(BigInt(v), i * 8));
  map.writeBigUInt64LE(b.put(auxv), 88);
  map.writeUInt32LE(auxv.length, 96);
  map.writeInt32LE(Number(exeFd), 100);
  b.add('restart:mm', SYS.prctl, PR_SET_MM, PR_SET_MM_MAP, b.put(map), map.length, 0);
  if (exeFd >= 0n) b.add(undefined, SYS.close, exeFd);
}

function sameFile(a: string, b: string): boolean {
  try {
    const x = fs.statSync(a), y = fs.statSync(b);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

export function restoreName(b: CallBatch, comm: string): void {
  b.add(undefined, SYS.prctl, PR_SET_NAME, b.put(Buffer.concat([Buffer.from(comm).subarray(0, 15), Buffer.from([0])])));
}

const same = (a: number[], b: number[]) => a.length === b.length && a.every((x, i) => x === b[i]);

/**
 * A restart never grants credentials the caller lacks: the restored process
 * starts with the caller's (it is a copy of it); if the image asks for other
 * ones, only a caller with uid 0 may have them set.
 */
export function checkCreds(image: Creds, caller: Creds, pid: number): boolean {
  if (same(image.uid, caller.uid) && same(image.gid, caller.gid) && same([...image.groups].sort(), [...caller.groups].sort())) return false;
  if (caller.uid[1] !== 0) {
    throw new CkptError(errno('EPERM'), 'restart:creds', `task ${pid}: image asks for uid ${image.uid.join('/')} gid ${image.gid.join('/')}, caller has uid ${caller.uid.join('/')}`);
  }
  return true;
}

/** Set the image's credentials (caller is root); last, since it may drop privileges. */
export function restoreCreds(r: Remote, c: Creds): void {
  const scratch = r.scratch();
  const g = Buffer.alloc(4 * Math.max(1, c.groups.length));
  c.groups.forEach((x, i) => g.writeUInt32LE(x, i * 4));
  r.mem.write(scratch, g);
  r.check('restart:creds', SYS.setgroups, c.groups.length, scratch);
  r.check('restart:creds', SYS.setresgid, c.gid[0], c.gid[1], c.gid[2]);
  r.call(SYS_setfsgid, c.gid[3]); // returns the old one, never an error: asked again below
  r.check('restart:creds', SYS.setresuid, c.uid[0], c.uid[1], c.uid[2]);
  r.call(SYS_setfsuid, c.uid[3]);
  const fsgid = Number(r.call(SYS_setfsgid, -1)), fsuid = Number(r.call(SYS_setfsuid, -1));
  if (fsuid !== c.uid[3] || fsgid !== c.gid[3]) throw new CkptError(errno('EPERM'), 'restart:creds', `task ${r.task.tid}: fsuid/fsgid ${c.uid[3]}/${c.gid[3]} could not be set (got ${fsuid}/${fsgid})`);
}
const SYS_setfsuid = 122, SYS_setfsgid = 123;
