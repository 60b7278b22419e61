/**
 * Terminals: pty pairs made inside the tree, controlling terminals, and the
 * terminal outside the tree that its stdio may be.
 *
 * A pty pair whose master a process of the tree holds is kept: the same
 * index (/dev/pts/N), lock, termios (one set: a master's termios ioctls act
 * on its slave; the master's own ldisc is always raw), locked termios,
 * window size, packet mode, exclusive mode (read on a slave the tree
 * holds), whether the slave was opened and closed again (the master then
 * reads EIO), the slave's owner and mode, the bytes queued both ways, the
 * session it is the controlling terminal of and its foreground group.
 *
 * The queues are read while the tree is frozen, by the supervisor on its
 * own copies of the descriptions, and put back at once (the program runs
 * on) and at restore: bytes unread by the master with TIOCSTI into the
 * master's raw ldisc (exact); input unread by the slave, in canonical mode
 * line by line (each read gives one line; one without its newline or EOL
 * ended with EOF), the partial line being edited by switching to
 * non-canonical mode for a moment; then put back by TIOCSTI into the
 * slave's ldisc under termios that pass bytes through (no echo, no signal
 * characters, no erase or kill, no input mapping, the same canonical mode),
 * with EOF marks made again with an EOF character of the moment. What is
 * not exact: characters quoted with LNEXT come back unquoted, and the
 * ldisc's echo column bookkeeping (for erase echo) starts afresh.
 *
 * Refused by name: a pty of another devpts instance or mount namespace, in
 * a tree in its own pid namespace, whose slave was never opened, with a
 * packet-mode status byte unread, with more than an ldisc holds queued,
 * the controlling terminal of a session led outside the subtree or whose
 * foreground group is outside it; queued bytes when the supervisor cannot
 * use TIOCSTI (no CAP_SYS_ADMIN).
 *
 * The terminal outside the tree: its termios, window size and whether the
 * tree was its foreground job are recorded; a restore sets the termios on
 * the restarter's terminal and makes the restored group the foreground one
 * (it then gets ^C, ^Z and SIGWINCH from the kernel); `ckpt restart` takes
 * the terminal back when the root ends.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, SYS } from '../../lib/libc.js';
import { listFds, readFdinfo, readStat, type FdInfo } from '../../lib/proc.js';
import { logError } from '../../lib/log.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { openIn } from './memory.js';
import type { FilesState, FilesTable } from './files.js';
import { z, int, id, fd as fdNum, path, pid as pidSchema, base64, MANY, type Same } from '../../lib/schema.js';

const SYS_ioctl = 16;
const TCGETS2 = 0x802c542an, TCSETS2 = 0x402c542bn, TCFLSH = 0x540b, TIOCEXCL = 0x540c, TIOCNXCL = 0x540d, TIOCSCTTY = 0x540e;
const TIOCSPGRP = 0x5410, TIOCSTI = 0x5412n, TIOCGWINSZ = 0x5413n, TIOCSWINSZ = 0x5414n, FIONREAD = 0x541bn, TIOCPKT = 0x5420n, TIOCNOTTY = 0x5422;
const TIOCSPTLCK = 0x40045431n, TIOCGPKT = 0x80045438n, TIOCGPTLCK = 0x80045439n, TIOCGEXCL = 0x80045440n, TIOCGPTPEER = 0x5441;
const TIOCGLCKTRMIOS = 0x5456n, TIOCSLCKTRMIOS = 0x5457n;
const TCIFLUSH = 0, POLLIN = 1, POLLPRI = 2, POLLHUP = 0x10, SIGTTOU = 22;
const O_RDWR = 2, O_NOCTTY = 0o400, O_CLOEXEC = 0o2000000, O_NONBLOCK = 0o4000;
const ICANON = 0o2, EXTPROC = 0o200000;
const VERASE = 2, VKILL = 3, VEOF = 4, VTIME = 5, VMIN = 6, VEOL = 11, VREPRINT = 12, VWERASE = 14, VLNEXT = 15, VEOL2 = 16;
/** struct termios2 (with speeds) and struct termios (locked termios). */
const T2 = 44, T1 = 36;
/** What one n_tty ldisc holds (N_TTY_BUF_SIZE - 1). */
const LDISC_MAX = 4095;

export interface TtyLine { data: string; eof?: true }
export interface PtyState {
  id: number;
  /** N of /dev/pts/N. */
  index: number;
  /** The path the master was opened by (opened again there). */
  master: string;
  locked: boolean;
  termios: string;
  lockedTermios: string;
  winsize: string;
  packet: boolean;
  excl?: boolean;
  /** The slave was opened and every descriptor of it closed since: the master reads EIO. */
  slaveClosed?: boolean;
  /** The slave was never opened (posix_openpt, not yet grantpt/unlockpt and open). */
  unopened?: boolean;
  owner: { uid: number; gid: number; mode: number };
  /** Input unread by the slave: whole lines (canonical mode), then the rest (a partial line, or raw bytes). */
  input: { lines: TtyLine[]; rest: string };
  /** Bytes unread by the master. */
  output: string;
  /** The session (its leader's pid) whose controlling terminal it is, and its foreground group. */
  session?: number;
  fg?: number;
}

/** The terminal outside the tree (an "outside" descriptor), as the tree had it. */
export interface TerminalState {
  /** The descriptor number (of the restarter's, at a restore) it is. */
  fd: number;
  termios: string;
  winsize: string;
  /** The tree's own process group (a pid of the tree) was its foreground group. */
  fg?: number;
}

/** `hungup`: a slave whose master was closed (hung up: reads give EOF, writes EIO); `pty` is then the index it had. */
export type TtyDesc = { id: number; kind: 'tty'; flags: number; pty: number; side: 'master' | 'slave' | 'hungup' };

const queue = base64(8 * LDISC_MAX);
export const ptySchema = z.strictObject({
  id: int(0, MANY),
  index: int(0, 1 << 20),
  master: path,
  locked: z.boolean(),
  termios: base64(T2, T2),
  lockedTermios: base64(T1, T1),
  winsize: base64(8, 8),
  packet: z.boolean(),
  excl: z.boolean().optional(),
  slaveClosed: z.boolean().optional(),
  unopened: z.boolean().optional(),
  owner: z.strictObject({ uid: id, gid: id, mode: int(0, 0o7777) }),
  input: z.strictObject({ lines: z.array(z.strictObject({ data: queue, eof: z.literal(true).optional() })).max(LDISC_MAX + 1), rest: queue }),
  output: queue,
  session: pidSchema.optional(),
  fg: pidSchema.optional(),
});
export const terminalSchema = z.strictObject({ fd: fdNum, termios: base64(T2, T2), winsize: base64(8, 8), fg: pidSchema.optional() });
export const ttyDescFields = { pty: int(0, MANY), side: z.enum(['master', 'slave', 'hungup']) };
const samePty: [Same<z.infer<typeof ptySchema>, PtyState>, Same<z.infer<typeof terminalSchema>, TerminalState>] = [true, true];
void samePty;

const unsupported = (pid: number, fd: number | string, what: string) =>
  new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tty', `task ${pid}: ${typeof fd === 'number' ? `fd ${fd}` : fd} (${what})`);

/** Major and minor of a device number as Linux encodes it. */
function devOf(rdev: number): [number, number] {
  return [Math.floor(rdev / 256) & 0xfff, (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00)];
}
const isMaster = (rdev: number) => devOf(rdev)[0] === 5 && devOf(rdev)[1] === 2;
/** The pts index of a slave device number, or -1. */
function ptsIndex(rdev: number): number {
  const [ma, mi] = devOf(rdev);
  return ma >= 136 && ma <= 143 ? (ma - 136) * 256 + mi : -1;
}
/** Is this a pty master or slave (a descriptor this module is asked about)? */
export const isPtyDevice = (st: fs.Stats) => st.isCharacterDevice() && (isMaster(st.rdev) || ptsIndex(st.rdev) >= 0);

// ---------------------------------------------------------------- ioctls of the supervisor

function ioctlBuf(fd: number, req: bigint, len: number, what: string, data?: Buffer): Buffer {
  const b = data ?? Buffer.alloc(len);
  if (sys.ioctl(fd, req, b) < 0) throw new CkptError(errno('EIO'), 'tty', `ioctl 0x${req.toString(16)} (${what}) failed`);
  return b;
}
const getInt = (fd: number, req: bigint, what: string) => ioctlBuf(fd, req, 4, what).readInt32LE(0);
function setInt(fd: number, req: bigint, v: number, what: string): void {
  const b = Buffer.alloc(4);
  b.writeInt32LE(v, 0);
  ioctlBuf(fd, req, 4, what, b);
}
const ioctlVal = (fd: number, req: number, v: number) => sys.syscall(SYS_ioctl, fd, req, v);

/** The supervisor may use TIOCSTI and set locked termios on any tty (CAP_SYS_ADMIN). */
function supervisorAdmin(): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m ? (BigInt('0x' + m[1]) & (1n << 21n)) !== 0n : false;
}

/** Everything readable now from a tty's ldisc (non-canonical reads, or raw): VMIN/VTIME must let a read return. */
function drainRaw(fd: number, what: string): Buffer {
  const parts: Buffer[] = [];
  let total = 0;
  for (;;) {
    let n = getInt(fd, FIONREAD, what);
    if (n <= 0) {
      sys.pollOne(fd, POLLIN, 0); // with nothing to read, poll pushes what the flip buffers still hold
      n = getInt(fd, FIONREAD, what);
      if (n <= 0) break;
    }
    const b = Buffer.alloc(n);
    const got = fs.readSync(fd, b, 0, n, null);
    if (got <= 0) break;
    parts.push(b.subarray(0, got));
    total += got;
    if (total > 4 * LDISC_MAX) break;
  }
  return Buffer.concat(parts);
}

const cc = (t: Buffer, i: number) => t[17 + i];

/** The slave's input queue: whole lines first (canonical mode), then what is left. `t`: its termios. */
function drainInput(s: number, t: Buffer): { lines: Buffer[]; eofs: boolean[]; rest: Buffer } {
  const lines: Buffer[] = [], eofs: boolean[] = [];
  const lflag = t.readUInt32LE(12);
  const canon = (lflag & ICANON) !== 0 && (lflag & EXTPROC) === 0;
  if (canon) {
    const buf = Buffer.alloc(LDISC_MAX + 2);
    const ends = new Set([10, cc(t, VEOL), cc(t, VEOL2)].filter((c) => c !== 0));
    while (sys.pollOne(s, POLLIN, 0) & POLLIN) {
      const n = fs.readSync(s, buf, 0, buf.length, null);
      const line = Buffer.from(buf.subarray(0, n));
      lines.push(line);
      eofs.push(n === 0 || !ends.has(line[n - 1]));
      if (lines.length > LDISC_MAX) break;
    }
  }
  // The partial line (canonical) or the bytes (raw): readable at once with ICANON off, VMIN = VTIME = 0.
  const raw = Buffer.from(t);
  raw.writeUInt32LE(lflag & ~ICANON, 12);
  raw[17 + VMIN] = 0;
  raw[17 + VTIME] = 0;
  ioctlBuf(s, TCSETS2, T2, 'TCSETS2', raw);
  try {
    return { lines, eofs, rest: drainRaw(s, 'slave input') };
  } finally {
    ioctlBuf(s, TCSETS2, T2, 'TCSETS2', Buffer.from(t));
  }
}

/** Bytes into a tty's ldisc, as if received (TIOCSTI: synchronous, nothing echoed under pass-through termios). */
function sti(fd: number, data: Buffer): void {
  const b = Buffer.alloc(1);
  for (const c of data) {
    b[0] = c;
    ioctlBuf(fd, TIOCSTI, 1, 'TIOCSTI', b);
  }
}

/**
 * Put the queues back: `m` the master, `s` the slave, `t` the termios the
 * slave ends with (locked termios cleared meanwhile by the caller).
 */
function injectQueues(m: number, s: number, p: Pick<PtyState, 'input' | 'output'>, t: Buffer): void {
  sti(m, Buffer.from(p.output, 'base64'));
  const lines = p.input.lines.map((l) => ({ data: Buffer.from(l.data, 'base64'), eof: l.eof === true }));
  const rest = Buffer.from(p.input.rest, 'base64');
  if (!lines.length && !rest.length) return;
  const pass = Buffer.from(t);
  pass.writeUInt32LE(0, 0); // no input mapping, no flow control characters
  pass.writeUInt32LE(t.readUInt32LE(12) & ICANON, 12); // no echo, no signals, no IEXTEN: only the same canonical mode
  for (const i of [VERASE, VKILL, VWERASE, VREPRINT, VLNEXT]) pass[17 + i] = 0;
  // An EOF mark is made again with a character none of the lines uses.
  const used = new Set(lines.flatMap((l) => [...l.data]));
  let eof = 4;
  while (used.has(eof) || eof === 10 || eof === cc(t, VEOL) || eof === cc(t, VEOL2)) eof = (eof % 255) + 1;
  pass[17 + VEOF] = eof;
  ioctlBuf(s, TCSETS2, T2, 'TCSETS2', pass);
  try {
    for (const l of lines) sti(s, l.eof ? Buffer.concat([l.data, Buffer.from([eof])]) : l.data);
    sti(s, rest);
  } finally {
    ioctlBuf(s, TCSETS2, T2, 'TCSETS2', Buffer.from(t));
  }
}

/** Run `fn` with the slave's locked termios cleared (they would keep the pass-through termios from being set). */
function unlockedTermios<T>(m: number, fn: () => T): T {
  const locked = ioctlBuf(m, TIOCGLCKTRMIOS, T1, 'TIOCGLCKTRMIOS');
  if (locked.every((b) => b === 0)) return fn();
  ioctlBuf(m, TIOCSLCKTRMIOS, T1, 'TIOCSLCKTRMIOS', Buffer.alloc(T1));
  try {
    return fn();
  } finally {
    ioctlBuf(m, TIOCSLCKTRMIOS, T1, 'TIOCSLCKTRMIOS', locked);
  }
}

// ---------------------------------------------------------------- capture

interface Seen { pid: number; fd: number; desc: TtyDesc; index: number; target: string; st: fs.Stats }

/**
 * What captureFiles meets of ptys: descriptions of masters and slaves, and
 * at the end the pairs' state, who has which as controlling terminal, and
 * the outside terminal.
 */
export class TtyCapture {
  private readonly masters: Seen[] = [];
  private readonly slaves: Seen[] = [];
  constructor(private readonly level: number) {}

  /** A pty master or slave descriptor: a TtyDesc, made final (or a path again) by finish(). */
  describe(pid: number, fd: number, target: string, st: fs.Stats, info: FdInfo, id: number, flags: number): TtyDesc {
    const desc: TtyDesc = { id, kind: 'tty', flags, pty: -1, side: isMaster(st.rdev) ? 'master' : 'slave' };
    if (desc.side === 'master') {
      const index = Number(info.extra.get('tty-index') ?? -1);
      if (index < 0) throw unsupported(pid, fd, `${target}: a pty master with no tty-index in its fdinfo`);
      if (this.level > 0) throw unsupported(pid, fd, `${target}: a pty master in a tree with its own pid namespace: not supported`);
      if (target !== '/dev/ptmx' && target !== '/dev/pts/ptmx') throw unsupported(pid, fd, `${target}: a pty master of another devpts instance (only /dev/ptmx is kept)`);
      if (!sameMountNs(pid)) throw unsupported(pid, fd, `${target}: a pty master of a process in another mount namespace`);
      this.masters.push({ pid, fd, desc, index, target, st });
    } else if (target.endsWith(' (deleted)')) {
      // Its master was closed: the slave is hung up, and gone from /dev/pts.
      Object.assign(desc, { side: 'hungup', pty: Math.max(0, ptsIndex(st.rdev)) });
    } else this.slaves.push({ pid, fd, desc, index: ptsIndex(st.rdev), target, st });
    return desc;
  }

  /**
   * The pairs (their masters in the tree), read while frozen, with their
   * queues put back; slaves of ptys outside go back to being paths.
   * `procs`: the tree's processes (host pids), `outside`: its outside
   * descriptors per process and the supervisor's own copies of them.
   */
  finish(asPath: (id: number, path: string, flags: number) => void, procs: number[], outsideFds: (pid: number) => { fd: number; sfd: number }[], heldOutside: (pid: number, fd: number, rdev?: number) => number | undefined): { ptys?: PtyState[]; terminal?: TerminalState; ctty: Map<number, number> } {
    const ptys: PtyState[] = [];
    const devpts = statOr('/dev/pts');
    for (const m of this.masters) {
      // Whoever outside holds it would be left with a pty no restart brings back.
      const ext = heldOutside(m.pid, m.fd, this.slaves.find((s) => s.index === m.index)?.st.rdev ?? slaveRdev(m.index));
      if (ext !== undefined) throw unsupported(m.pid, m.fd, `${m.target}: pty /dev/pts/${m.index} also held by process ${ext} outside the subtree`);
      m.desc.pty = ptys.length;
      ptys.push(capturePty(m, this.slaves.filter((s) => s.index === m.index && s.st.dev === devpts?.dev), ptys.length));
    }
    for (const s of this.slaves) {
      const pty = ptys.find((p) => p.index === s.index);
      if (pty && s.st.dev === devpts?.dev) s.desc.pty = pty.id;
      else if (pty) throw unsupported(s.pid, s.fd, `${s.target}: a pty slave of another devpts instance`);
      else asPath(s.desc.id, s.target, s.desc.flags);
    }
    const ctty = new Map<number, number>();
    const stats = new Map(procs.map((p) => [p, readStat(p)]));
    const pgids = new Set([...stats.values()].map((s) => Number(s.field(5))));
    const inTree = new Set(procs);
    let terminal: TerminalState | undefined;
    for (const [pid, st] of stats) {
      const ttyNr = Number(st.field(7)), sid = Number(st.field(6)), tpgid = Number(st.field(8));
      if (!ttyNr) continue;
      const pty = ptys.find((p) => ptsIndex(ttyNr) === p.index && ptsIndex(ttyNr) >= 0);
      if (pty) {
        if (!inTree.has(sid) || Number(stats.get(sid)!.field(7)) !== ttyNr) throw unsupported(pid, 'controlling terminal', `/dev/pts/${pty.index} is the controlling terminal of session ${sid}, led outside the subtree`);
        if (tpgid > 0 && !(inTree.has(tpgid) && pgids.has(tpgid))) throw unsupported(pid, 'controlling terminal', `the foreground group ${tpgid} of /dev/pts/${pty.index} is outside the subtree`);
        pty.session = sid;
        if (tpgid > 0) pty.fg = tpgid;
        ctty.set(pid, pty.id);
        continue;
      }
      if (terminal) continue;
      // The outside terminal: one of the tree's outside descriptors is it.
      for (const o of outsideFds(pid)) {
        const ost = fstatOr(o.sfd);
        if (!ost?.isCharacterDevice() || ost.rdev !== ttyNr) continue;
        const termios = Buffer.alloc(T2), ws = Buffer.alloc(8);
        if (sys.ioctl(o.sfd, TCGETS2, termios) < 0 || sys.ioctl(o.sfd, TIOCGWINSZ, ws) < 0) break;
        const pgid = Number(st.field(5));
        if (tpgid !== pgid) break; // a background job: the terminal's termios are not its own
        terminal = { fd: o.fd, termios: termios.toString('base64'), winsize: ws.toString('base64'), ...(tpgid === pgid && inTree.has(pgid) ? { fg: pgid } : {}) };
        break;
      }
    }
    return { ...(ptys.length ? { ptys } : {}), ...(terminal ? { terminal } : {}), ctty };
  }
}

/** The device number of /dev/pts/N as Linux encodes it. */
function slaveRdev(index: number): number {
  const major = 136 + Math.floor(index / 256), minor = index % 256;
  return major * 256 + minor;
}

function statOr(p: string): fs.Stats | undefined {
  try {
    return fs.statSync(p);
  } catch {
    return undefined;
  }
}
function fstatOr(fd: number): fs.Stats | undefined {
  try {
    return fs.fstatSync(fd);
  } catch {
    return undefined;
  }
}
function sameMountNs(pid: number): boolean {
  try {
    return fs.readlinkSync(`/proc/${pid}/ns/mnt`) === fs.readlinkSync('/proc/self/ns/mnt');
  } catch {
    return false;
  }
}

/** One pair, from its master (and a slave the tree holds, if any), while frozen. */
function capturePty(m: Seen, slaves: Seen[], id: number): PtyState {
  return withTraceeFd(m.pid, m.fd, 'checkpoint:tty', (mfd) => {
    const termios = ioctlBuf(mfd, TCGETS2, T2, 'TCGETS2');
    const lockedTermios = ioctlBuf(mfd, TIOCGLCKTRMIOS, T1, 'TIOCGLCKTRMIOS');
    const winsize = ioctlBuf(mfd, TIOCGWINSZ, 8, 'TIOCGWINSZ');
    const locked = getInt(mfd, TIOCGPTLCK, 'TIOCGPTLCK') !== 0;
    const packet = getInt(mfd, TIOCGPKT, 'TIOCGPKT') !== 0;
    const ev = sys.pollOne(mfd, POLLIN | POLLPRI, 0);
    const slaveClosed = (ev & POLLHUP) !== 0;
    const name = `/dev/pts/${m.index}`;
    if (packet && ev & POLLPRI) throw unsupported(m.pid, m.fd, `pty master of ${name} in packet mode with a status byte unread`);
    // The slave never opened: opening it to read its input would leave the master reading EIO once closed again.
    // Input written meanwhile shows as its echo in the master's queue (echo is on by default): refused.
    const unopened = !slaves.length && !slaveClosed;
    if (unopened && getInt(mfd, FIONREAD, 'FIONREAD') > 0) throw unsupported(m.pid, m.fd, `pty master of ${name} whose slave was never opened, with bytes written to it (reading them would need the slave opened)`);
    const st = statOr(name);
    if (!st) throw unsupported(m.pid, m.fd, `pty master of ${name}, which is not in /dev/pts`);
    const owner = { uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 };
    const withSlave = <T>(fn: (s: number) => T): T => {
      if (slaves.length) return withTraceeFd(slaves[0].pid, slaves[0].fd, 'checkpoint:tty', fn);
      // Closed everywhere: opened for a moment (closing it again leaves the master as it was).
      if (locked) setInt(mfd, TIOCSPTLCK, 0, 'TIOCSPTLCK');
      const s = ioctlVal(mfd, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
      if (locked) setInt(mfd, TIOCSPTLCK, 1, 'TIOCSPTLCK');
      if (s < 0) throw unsupported(m.pid, m.fd, `pty master of ${name}: its slave cannot be opened to read its input`);
      try {
        return fn(s);
      } finally {
        fs.closeSync(s);
      }
    };
    // Reading the queues (a partial line needs termios changed for a moment, past any locked termios) and putting them back needs CAP_SYS_ADMIN.
    if (!supervisorAdmin()) throw unsupported(m.pid, m.fd, `pty ${name}: reading its queues and putting them back (TIOCSTI, locked termios) needs CAP_SYS_ADMIN, which the supervisor lacks`);
    if (getInt(mfd, FIONREAD, 'FIONREAD') >= LDISC_MAX - 64) throw unsupported(m.pid, m.fd, `pty master of ${name} with more unread output than an ldisc holds`);
    const base = { id, index: m.index, master: m.target, locked, termios: termios.toString('base64'), lockedTermios: lockedTermios.toString('base64'), winsize: winsize.toString('base64'), packet, owner, ...(slaveClosed ? { slaveClosed } : {}), ...(unopened ? { unopened } : {}) };
    if (unopened) return { ...base, input: { lines: [], rest: '' }, output: '' };
    return withSlave((s) => {
      const excl = slaves.length ? getInt(s, TIOCGEXCL, 'TIOCGEXCL') !== 0 : undefined;
      let q: Pick<PtyState, 'input' | 'output'>;
      {
        // Packet mode off meanwhile (its status byte is known to be clear), so reads give bare bytes and termios changes no status.
        if (packet) setInt(mfd, TIOCPKT, 0, 'TIOCPKT');
        try {
          q = unlockedTermios(mfd, () => {
            const out = drainRaw(mfd, 'master output');
            const inp = drainInput(s, termios);
            const got = {
              output: out.toString('base64'),
              input: { lines: inp.lines.map((l, i) => ({ data: l.toString('base64'), ...(inp.eofs[i] ? { eof: true as const } : {}) })), rest: inp.rest.toString('base64') },
            };
            injectQueues(mfd, s, got, termios); // the program runs on with them
            return got;
          });
        } finally {
          if (packet) setInt(mfd, TIOCPKT, 1, 'TIOCPKT');
        }
        const inBytes = q.input.lines.reduce((n, l) => n + Buffer.byteLength(l.data, 'base64') + 1, 0) + Buffer.byteLength(q.input.rest, 'base64');
        if (inBytes > LDISC_MAX) logError(`task ${m.pid}: pty ${name}: ${inBytes} bytes of input queued, more than its ldisc holds: the rest is lost`);
      }
      return { ...base, ...(excl !== undefined ? { excl } : {}), ...q };
    });
  }, 'pty master fd');
}

// ---------------------------------------------------------------- restore

interface Made { m: number; s: number; reused: boolean }

/**
 * Ptys made again (or, in a rollback, found still open and set back), held
 * by the supervisor from their making to the end of restoreFiles.
 */
export class TtyRestore {
  private readonly made = new Map<number, Made>();
  private readonly ptys: PtyState[];

  /**
   * `live`: for a rollback, the host pids of the processes kept, and the
   * host pid of a process of the tree. Checks (nothing changes here): a
   * pty still open is used again; one gone needs its index free, and every
   * live process that had it as controlling terminal must be its session's
   * leader (only a leader can take a terminal again).
   */
  constructor(private readonly tree: { files: FilesTable; processes: { ids: { pid: number; sid: number }; files: FilesState }[] }, live?: { host: (pid: number) => number; kept: Set<number>; all: number[] }) {
    this.ptys = tree.files.ptys ?? [];
    if (!live || !this.ptys.length) return;
    try {
      for (const p of this.ptys) {
        const holder = findMaster(p.index, live.all);
        if (holder) {
          const m = sys.takeFd(holder.pid, holder.fd);
          if (p.unopened && !stillUnopened(m, p.index, live.all)) {
            fs.closeSync(m); // its slave was opened since: made again once the live one is closed
            continue;
          }
          this.made.set(p.id, { m, s: -1, reused: true });
        } else if (fs.existsSync(`/dev/pts/${p.index}`)) {
          throw new CkptError(errno('EBUSY'), 'restart:tty', `/dev/pts/${p.index} of the checkpoint is now another pty`);
        }
      }
      for (const proc of tree.processes) {
        const host = live.host(proc.ids.pid);
        if (!live.kept.has(host)) continue;
        const want = proc.files.ctty !== undefined ? this.ptys[proc.files.ctty] : undefined;
        const nowNr = Number(readStat(host).field(7));
        const nowIdx = nowNr ? ptsIndex(nowNr) : -1;
        const reused = want && this.made.get(want.id)?.reused;
        if (want && reused && nowIdx === want.index) continue;
        if (!want && !nowNr) continue;
        if (want && !reused && !nowNr && proc.ids.sid === proc.ids.pid) continue; // the leader takes the new one
        // A terminal outside the tree, the same as then, is not ours to judge.
        if (!want && nowIdx >= 0 && !this.ptys.some((p) => p.index === nowIdx)) continue;
        if (!want && nowIdx < 0) continue;
        throw new CkptError(errno('EOPNOTSUPP'), 'restart:tty', `task ${host}: its controlling terminal is not the checkpoint's (${want ? `/dev/pts/${want.index}` : 'none'}) and cannot be made so in place`);
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /**
   * A session leader just made (setsid done, children not yet cloned): its
   * controlling terminal, so that children inherit it.
   */
  session(r: Remote, pid: number, live = false): void {
    const p = this.ptys.find((x) => x.session === pid);
    if (!p || this.made.get(p.id)?.reused) return;
    // A live leader (rollback) whose pty was closed since: once its old descriptors are closed (they may hold the index).
    if (live) return void this.lateLeaders.push({ r, p });
    this.takeTerminal(r, p);
  }

  private readonly lateLeaders: { r: Remote; p: PtyState }[] = [];

  private takeTerminal(r: Remote, p: PtyState): void {
    this.ensure(r, p);
    const b = new CallBatch(r);
    const path = b.put(Buffer.from(`/dev/pts/${p.index}\0`));
    b.add('restart:tty open slave', SYS.openat, -100, path, O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
    const [fd] = b.run();
    try {
      r.check(`restart:tty TIOCSCTTY /dev/pts/${p.index}`, SYS_ioctl, fd, TIOCSCTTY, 0);
    } finally {
      r.call(SYS.close, fd);
    }
  }

  /** A descriptor of the pty of `d` in process `r`, numbered >= `min`. */
  open(r: Remote, d: TtyDesc, min: number): bigint {
    if (d.side === 'hungup') {
      for (const p of this.ptys) this.ensure(r, p); // every kept index taken first: the hung-up one takes any other
      return hungUp(r, d.flags, min);
    }
    const p = this.ptys[d.pty];
    if (!p) throw new CkptError(errno('EBADMSG'), 'image', `descriptor ${d.id} names pty ${d.pty}, which the image lacks`);
    const made = this.ensure(r, p);
    if (d.side === 'master') return r.takeFd(process.pid, made.m, min);
    return r.raise(openIn(r, `/dev/pts/${p.index}`, (d.flags & ~(O_NONBLOCK | 0o20000)) | O_NOCTTY | O_CLOEXEC, 'restart:tty'), min);
  }

  /** The pair of `p`, made in `r` if not yet: the same index (EBUSY if another pty has it), unlocked until finish(). */
  private ensure(r: Remote, p: PtyState): Made {
    let made = this.made.get(p.id);
    if (made) {
      if (made.reused && made.s < 0 && !p.unopened) this.prepareReused(p, made);
      return made;
    }
    const fds: bigint[] = [];
    let found: bigint | undefined;
    try {
      // The kernel gives the lowest free index: open until it is ours (those below stay open meanwhile).
      while (found === undefined) {
        const k = Math.min(64, Math.max(1, p.index + 1 - fds.length));
        const b = new CallBatch(r);
        const path = b.put(Buffer.from(p.master + '\0'));
        for (let i = 0; i < k; i++) b.add(undefined, SYS.openat, -100, path, O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
        const got = b.run();
        for (const fd of got) {
          if (fd < 0n) throw new CkptError(Number(-fd), 'restart:tty', `task ${r.task.tid}: cannot open ${p.master}`);
          fds.push(fd);
          const idx = Number(readFdinfo(r.task.tgid, Number(fd)).extra.get('tty-index') ?? -1);
          if (idx === p.index) found = fd;
          else if (idx > p.index && found === undefined) throw new CkptError(errno('EBUSY'), 'restart:tty', `/dev/pts/${p.index} of the image is held by another pty`);
        }
      }
      const m = sys.takeFd(r.task.tgid, Number(found));
      setInt(m, TIOCSPTLCK, 0, 'TIOCSPTLCK');
      // The size before it is anyone's terminal: no SIGWINCH.
      ioctlBuf(m, TIOCSWINSZ, 8, 'TIOCSWINSZ', Buffer.from(p.winsize, 'base64'));
      // The supervisor holds the slave open meanwhile (unless it never was): nothing sees it closed on the way.
      const s = p.unopened ? -1 : fs.openSync(`/dev/pts/${p.index}`, fs.constants.O_RDWR | O_NOCTTY | O_NONBLOCK);
      made = { m, s, reused: false };
      this.made.set(p.id, made);
    } finally {
      r.batch(fds.map((fd) => [SYS.close, fd]));
    }
    const st = fs.statSync(`/dev/pts/${p.index}`);
    if (!p.unopened && (st.uid !== p.owner.uid || st.gid !== p.owner.gid || (st.mode & 0o7777) !== p.owner.mode)) {
      // Given by the process itself, with its own permissions.
      const b = new CallBatch(r);
      const path = b.put(Buffer.from(`/dev/pts/${p.index}\0`));
      b.add(undefined, SYS.openat, -100, path, O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
      const [fd] = b.run();
      if (fd < 0n) throw new CkptError(Number(-fd), 'restart:tty', `task ${r.task.tid}: cannot open /dev/pts/${p.index}`);
      const res = r.batch([[93 /* fchown */, fd, p.owner.uid, p.owner.gid], [91 /* fchmod */, fd, p.owner.mode], [SYS.close, fd]]);
      if (res[0] < 0n || res[1] < 0n) throw new CkptError(errno('EPERM'), 'restart:tty', `task ${r.task.tid}: /dev/pts/${p.index} was owned by ${p.owner.uid}:${p.owner.gid} mode ${p.owner.mode.toString(8)}, which this process cannot give it`);
    }
    return made;
  }

  /** A pty of a rollback still open: emptied, unlocked, packet mode and exclusive mode off until finish(). */
  private prepareReused(p: PtyState, made: Made): void {
    setInt(made.m, TIOCPKT, 0, 'TIOCPKT');
    if (p.unopened) return void ioctlVal(made.m, TCFLSH, TCIFLUSH); // left unopened
    setInt(made.m, TIOCSPTLCK, 0, 'TIOCSPTLCK');
    made.s = fs.openSync(`/dev/pts/${p.index}`, fs.constants.O_RDWR | O_NOCTTY | O_NONBLOCK);
    ioctlVal(made.s, TIOCNXCL, 0);
    ioctlVal(made.m, TCFLSH, TCIFLUSH);
    ioctlVal(made.s, TCFLSH, TCIFLUSH);
  }

  /** Before any descriptor is closed or made: rollback's ptys still open are made ready. */
  prepare(): void {
    for (const p of this.ptys) {
      const made = this.made.get(p.id);
      if (made?.reused && made.s < 0) this.prepareReused(p, made);
    }
  }

  /**
   * Once every descriptor is in place: each pair's state, foreground
   * groups, processes that had no controlling terminal lose the one they
   * inherited; the outside terminal's termios and foreground group.
   * `remote`/`host` name the tree's processes.
   */
  finish(remote: (pid: number) => Remote, host: (pid: number) => number, holders: (pty: number, side: 'master' | 'slave') => { pid: number; fd: number }[]): void {
    const procs = this.tree.processes;
    for (const { r, p } of this.lateLeaders) this.takeTerminal(r, p);
    for (const p of this.ptys) {
      const made = this.made.get(p.id);
      if (!made) continue; // held by no process (the image names it all the same): nothing to set
      const { m, s } = made;
      const termios = Buffer.from(p.termios, 'base64');
      unlockedTermios(m, () => {
        if (made.reused) ioctlBuf(m, TIOCSWINSZ, 8, 'TIOCSWINSZ', Buffer.from(p.winsize, 'base64'));
        if (s >= 0) injectQueues(m, s, p, termios);
        ioctlBuf(m, TCSETS2, T2, 'TCSETS2', termios);
      });
      if (p.excl && s >= 0) ioctlVal(s, TIOCEXCL, 0);
      const locks = Buffer.from(p.lockedTermios, 'base64');
      if (locks.some((x) => x !== 0)) {
        // Set by a process holding the master, with its own permission (CAP_SYS_ADMIN).
        const h = holders(p.id, 'master')[0];
        const r = remote(h.pid);
        const b = new CallBatch(r);
        b.add(`restart:tty TIOCSLCKTRMIOS /dev/pts/${p.index}`, SYS_ioctl, h.fd, TIOCSLCKTRMIOS, b.put(locks));
        try {
          b.run();
        } catch (e) {
          throw new CkptError(errno('EPERM'), 'restart:tty', `task ${r.task.tid}: the locked termios of /dev/pts/${p.index} need CAP_SYS_ADMIN: ${(e as Error).message}`);
        }
      }
      if (p.fg !== undefined && p.session !== undefined) setForeground(remote(p.session), m, p.fg, `/dev/pts/${p.index}`);
      setInt(m, TIOCSPTLCK, p.locked ? 1 : 0, 'TIOCSPTLCK');
      if (p.packet) setInt(m, TIOCPKT, 1, 'TIOCPKT');
    }
    // A process of a session with one of these as its terminal, that had none itself (born before the leader took it).
    for (const proc of procs) {
      if (proc.files.ctty !== undefined || proc.ids.sid === proc.ids.pid) continue;
      const lead = this.ptys.find((p) => p.session === proc.ids.sid);
      if (!lead || this.made.get(lead.id)?.reused) continue;
      const r = remote(proc.ids.pid);
      const b = new CallBatch(r);
      b.add(undefined, SYS.openat, -100, b.put(Buffer.from('/dev/tty\0')), O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK, 0);
      const [fd] = b.run();
      if (fd >= 0n) r.batch([[SYS_ioctl, fd, TIOCNOTTY, 0], [SYS.close, fd]]);
    }
    this.outside(host);
    this.close();
  }

  /** The terminal outside: its termios and foreground group, set on the restarter's (the tree holds it at that number). */
  private outside(host: (pid: number) => number): void {
    const t = this.tree.files.terminal;
    if (!t) return;
    const holder = this.tree.processes.find((p) => p.files.fds.some((f) => f.fd === t.fd && 'outside' in f));
    if (!holder) return;
    let fd: number;
    try {
      fd = sys.takeFd(host(holder.ids.pid), t.fd);
    } catch {
      return;
    }
    if (fd < 0) return;
    try {
      const st = fs.fstatSync(fd);
      if (!st.isCharacterDevice()) return;
      // The supervisor may be in the background of that terminal: SIGTTOU ignored for these calls.
      sys.signalIgnore(SIGTTOU);
      try {
        if (sys.ioctl(fd, TCSETS2, Buffer.from(t.termios, 'base64')) < 0) logError(`restart: the termios of the terminal at fd ${t.fd} could not be set`);
        if (t.fg !== undefined) {
          const pg = Buffer.alloc(4);
          pg.writeInt32LE(host(t.fg), 0);
          if (sys.ioctl(fd, BigInt(TIOCSPGRP), pg) < 0) logError(`restart: process group ${t.fg} could not be made the foreground group of the terminal at fd ${t.fd}`);
        }
        const ws = Buffer.alloc(8);
        if (sys.ioctl(fd, TIOCGWINSZ, ws) === 0 && !ws.equals(Buffer.from(t.winsize, 'base64')) && t.fg !== undefined) sys.kill(-host(t.fg), 28); // SIGWINCH: the size changed meanwhile
      } finally {
        sys.signalDefault(SIGTTOU);
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Drop the supervisor's copies (on success and on failure alike). */
  close(): void {
    for (const x of this.made.values()) {
      for (const fd of [x.m, x.s]) {
        if (fd >= 0) {
          try {
            fs.closeSync(fd);
          } catch { /* closed */ }
        }
      }
    }
    this.made.clear();
  }
}

/**
 * A hung-up slave made again: a pty of its own (any index) whose slave is
 * opened and whose master is then closed, which hangs the slave up.
 */
function hungUp(r: Remote, flags: number, min: number): bigint {
  const b = new CallBatch(r);
  b.add('restart:tty open /dev/ptmx', SYS.openat, -100, b.put(Buffer.from('/dev/ptmx\0')), O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
  const [m] = b.run();
  try {
    const zero = new CallBatch(r);
    zero.add('restart:tty TIOCSPTLCK', SYS_ioctl, m, TIOCSPTLCK, zero.put(Buffer.alloc(4)));
    zero.run();
    const idx = Number(readFdinfo(r.task.tgid, Number(m)).extra.get('tty-index') ?? -1);
    return r.raise(openIn(r, `/dev/pts/${idx}`, (flags & ~(O_NONBLOCK | 0o20000)) | O_NOCTTY | O_CLOEXEC, 'restart:tty'), min);
  } finally {
    r.call(SYS.close, m);
  }
}

/** A pty whose slave was never opened: no hang-up seen by the master, no slave held by `procs`. */
function stillUnopened(m: number, index: number, procs: number[]): boolean {
  if (sys.pollOne(m, POLLIN, 0) & POLLHUP) return false;
  for (const pid of procs) {
    for (const fd of listFds(pid)) {
      try {
        if (ptsIndex(fs.statSync(`/proc/${pid}/fd/${fd}`).rdev) === index) return false;
      } catch { /* gone */ }
    }
  }
  return true;
}

/** A live process of `procs` holding the master of /dev/pts/`index`. */
function findMaster(index: number, procs: number[]): { pid: number; fd: number } | undefined {
  for (const pid of procs) {
    for (const fd of listFds(pid)) {
      try {
        if (!isMaster(fs.statSync(`/proc/${pid}/fd/${fd}`).rdev)) continue;
        if (Number(readFdinfo(pid, fd).extra.get('tty-index')) === index) return { pid, fd };
      } catch { /* gone */ }
    }
  }
  return undefined;
}

/**
 * Make `pgid` the foreground group of the pty (TIOCSPGRP must come from a
 * process of its session): injected in the session leader, SIGTTOU blocked
 * for it (its mask is set to the checkpoint's afterwards).
 */
function setForeground(r: Remote, m: number, pgid: number, name: string): void {
  const fd = r.takeFd(process.pid, m, 3);
  try {
    const b = new CallBatch(r);
    const set = Buffer.alloc(8);
    set.writeBigUInt64LE(1n << BigInt(SIGTTOU - 1), 0);
    b.add('restart:tty sigprocmask', SYS.rt_sigprocmask, 0 /* SIG_BLOCK */, b.put(set), 0, 8);
    const pg = Buffer.alloc(4);
    pg.writeInt32LE(pgid, 0);
    b.add(`restart:tty TIOCSPGRP ${name} ${pgid}`, SYS_ioctl, fd, TIOCSPGRP, b.put(pg));
    b.run();
  } finally {
    r.call(SYS.close, fd);
  }
}
