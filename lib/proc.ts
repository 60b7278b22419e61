/** Readers of /proc/PID files. Pure parsing is exported separately for tests. */
import fs from 'node:fs';

export interface MapEntry {
  start: bigint;
  end: bigint;
  perms: string; // "rwxp"
  offset: bigint;
  dev: string;
  inode: number;
  path: string; // "" for anonymous, "[heap]", "/usr/lib/...", "... (deleted)"
  flags?: string[]; // VmFlags from smaps
}

export function parseMaps(text: string): MapEntry[] {
  const out: MapEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$/.exec(line);
    if (!m) continue;
    out.push({
      start: BigInt('0x' + m[1]), end: BigInt('0x' + m[2]), perms: m[3],
      offset: BigInt('0x' + m[4]), dev: m[5], inode: Number(m[6]), path: m[7],
    });
  }
  return out;
}

/** smaps: the maps lines plus each VMA's VmFlags. */
export function parseSmaps(text: string): MapEntry[] {
  const out: MapEntry[] = [];
  for (const line of text.split('\n')) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) out.push(...parseMaps(line));
    else if (line.startsWith('VmFlags:') && out.length) out[out.length - 1].flags = line.slice(8).trim().split(/\s+/);
  }
  return out;
}

export const readMaps = (pid: number): MapEntry[] => parseMaps(fs.readFileSync(`/proc/${pid}/maps`, 'utf8'));
export const readSmaps = (pid: number): MapEntry[] => parseSmaps(fs.readFileSync(`/proc/${pid}/smaps`, 'utf8'));

export function parseStatus(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) m.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  return m;
}

export const readStatus = (pid: number): Map<string, string> => parseStatus(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));

/** /proc/PID/stat split after the comm field (which may hold spaces and parens). */
export function parseStat(text: string): { comm: string; fields: string[] } {
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  const rest = text.slice(close + 2).trim().split(' ');
  // fields[0] is field 3 (state) of proc(5)
  return { comm: text.slice(open + 1, close), fields: rest };
}

export function readStat(pid: number): { comm: string; field: (n: number) => string } {
  const { comm, fields } = parseStat(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  return { comm, field: (n: number) => fields[n - 3] };
}

export function listTids(pid: number): number[] {
  return fs.readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => a - b);
}

const PF_IO_WORKER = 0x10;

/**
 * Is task `tid` a kernel thread of io_uring (PF_IO_WORKER: an SQPOLL poller
 * "iou-sqp-N" or an io-wq worker "iou-wrk-N")? Listed among the threads of
 * the process that set the ring up, yet no user thread: it has no user
 * registers and cannot be traced. Its comm, or undefined for a user thread
 * (and for one gone meanwhile).
 */
export function ioWorker(pid: number, tid: number): string | undefined {
  try {
    const { comm, fields } = parseStat(fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8'));
    return Number(fields[9 - 3]) & PF_IO_WORKER ? comm : undefined;
  } catch {
    return undefined;
  }
}

export function listFds(pid: number): number[] {
  return fs.readdirSync(`/proc/${pid}/fd`).map(Number).sort((a, b) => a - b);
}

export interface FdInfo {
  pos: bigint;
  flags: number;
  mntId: number;
  extra: Map<string, string>;
  /** The whole text (an epoll has one line per watch). */
  text: string;
}

export function parseFdinfo(text: string): FdInfo {
  const kv = parseStatus(text);
  return {
    pos: BigInt(kv.get('pos') ?? '0'),
    flags: parseInt(kv.get('flags') ?? '0', 8),
    mntId: Number(kv.get('mnt_id') ?? 0),
    extra: kv,
    text,
  };
}

export const readFdinfo = (pid: number, fd: number): FdInfo =>
  parseFdinfo(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));

/**
 * Pagemap flag bytes for [start, end): the top byte of each 64-bit entry,
 * where bit 7 is "present", bit 6 "swapped", bit 5 "file page or shared".
 * Only that byte is kept, so a scan needs no 64-bit arithmetic.
 */
export function readPagemapFlags(pid: number, start: bigint, end: bigint, fd?: number): Uint8Array {
  const own = fd === undefined;
  const f = fd ?? fs.openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    const raw = readPagemapRaw(f, start, end);
    const flags = new Uint8Array(raw.length / 8);
    for (let i = 0, o = 7; i < flags.length; i++, o += 8) flags[i] = raw[o];
    return flags;
  } finally {
    if (own) fs.closeSync(f);
  }
}

/** Raw 64-bit pagemap entries of [start, end) from an open /proc/PID/pagemap. */
export function readPagemapRaw(fd: number, start: bigint, end: bigint): Buffer {
  const b = Buffer.allocUnsafe(Number((end - start) / 4096n) * 8);
  let got = 0;
  while (got < b.length) {
    const n = fs.readSync(fd, b, got, b.length - got, Number(start / 4096n) * 8 + got);
    if (n <= 0) break;
    got += n;
  }
  b.fill(0, got); // beyond what the kernel gave: nothing there
  return b;
}

export const PM_PRESENT = 0x80;
export const PM_SWAP = 0x40;
export const PM_FILE = 0x20;
/** Bit 58: a guard page (MADV_GUARD_INSTALL), Linux 6.14. */
export const PM_GUARD = 0x04;
