/**
 * TCP sockets over IPv4 and IPv6 (capture and restore in one place).
 *
 * Kinds kept:
 * - not connected (bound or not) and listening sockets: family, address,
 *   port, backlog and options (below);
 * - connections (ESTABLISHED and the half-closed FIN_WAIT1, FIN_WAIT2,
 *   CLOSE_WAIT, LAST_ACK, CLOSING) through TCP_REPAIR: in repair mode a
 *   socket's sequence numbers and both queues can be read (MSG_PEEK on the
 *   receive queue and, with TCP_REPAIR_QUEUE = send, on the send queue:
 *   bytes sent but not acknowledged, then bytes never sent), and a new
 *   socket can be given them back and "connected" without a packet; the
 *   window (TCP_REPAIR_WINDOW), MSS, window scale, SACK and timestamps
 *   (TCP_REPAIR_OPTIONS, TCP_TIMESTAMP) go with them. Our FIN is queued
 *   again by shutdown in repair mode; the peer's FIN (and its ACK of ours,
 *   for FIN_WAIT2) cannot be queued by any call: it is forged from the
 *   peer's address on a raw socket of the supervisor (CRIU does the same).
 *
 * Refused by name: SYN_SENT and SYN_RECV (a connection being opened), a
 * listener with connections not yet accepted (no process holds them: the
 * kernel gives no way to read one's received bytes without accepting it,
 * which would take it from the program, nor to queue a socket in an
 * accept queue again), TCP-MD5 signatures and upper-layer protocols
 * (kTLS...), SO_MARK, IP_TRANSPARENT and SO_PRIORITY above 6 (a restart
 * would set them with the supervisor's privileges), TCP_REPAIR refused by
 * the kernel (no CAP_NET_ADMIN for the supervisor).
 *
 * The peer must see nothing. A socket in repair mode sends nothing, even
 * when it is closed, so:
 * - CKPT_KILL: every connection is put in repair mode while the subtree is
 *   frozen and stays so until the processes die (the supervisor holds a
 *   duplicate until the kill). A connection whose peer is outside the
 *   subtree also gets netfilter rules (iptables, matching its 4-tuple, in
 *   INPUT and OUTPUT) that drop its packets from before it is read until
 *   the restore has made it again: without them, bytes the peer sent
 *   after the capture would be acknowledged by the doomed socket (lost),
 *   and packets arriving once it is gone would be answered with a RST. The
 *   rules carry a comment naming the 4-tuple; the restore (by any
 *   supervisor) removes them once the socket is out of repair mode. Were
 *   the image never restored, the peer sees a silent connection (no RST)
 *   until it gives up, as with CRIU. A failed checkpoint puts everything
 *   back (repair off without a window probe, rules removed) as the subtree
 *   thaws.
 * - Other checkpoints: repair mode only while the socket is read, during
 *   the stop (the program goes on with it).
 * - Rollback: the live socket is the checkpoint's socket gone forward in
 *   time. Going back is making the socket again as it was at the
 *   checkpoint (repair), after the live one is put in repair mode and
 *   closed (silently). With a peer in the tree, the peer goes back too: the
 *   two ends agree again. A peer outside cannot un-receive bytes nor take
 *   back what it sent: such a rollback is kept only if, since the
 *   checkpoint, nothing was sent on the connection and nothing more
 *   received (the send and receive sequence numbers and the state are
 *   those of the checkpoint; what the program read since is put back in
 *   the receive queue); otherwise it is refused (EOPNOTSUPP naming the
 *   connection) before anything changes. Its packets are dropped by the
 *   same rules from the check until the new socket is in place.
 *
 * Security: the new socket is made and bound by the restored process
 * itself (injected socket and bind), so a port it could not bind (below
 * ip_unprivileged_port_start without CAP_NET_BIND_SERVICE) is EPERM; a
 * port or 4-tuple already taken is EBUSY. Repair-mode calls (which need
 * CAP_NET_ADMIN) are made by the supervisor on its duplicate of the socket.
 */
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, errnoNow, addressOf } from '../../lib/libc.js';
import { listFds } from '../../lib/proc.js';
import { diagDump } from '../../lib/sockdiag.js';
import { logError } from '../../lib/log.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, u32, base64, type Same } from '../../lib/schema.js';

export const AF_INET = 2, AF_INET6 = 10;
const SOCK_STREAM = 1, SOCK_RAW = 3, SOCK_CLOEXEC = 0o2000000, IPPROTO_TCP = 6;
const SOL_SOCKET = 1, SOL_IP = 0, SOL_IPV6 = 41;
const SYS_socket = 41, SYS_connect = 42, SYS_bind = 49, SYS_listen = 50, SYS_getsockname = 51, SYS_getpeername = 52, SYS_setsockopt = 54, SYS_getsockopt = 55, SYS_shutdown = 48;
const TCP_INFO = 11, TCP_REPAIR = 19, TCP_REPAIR_QUEUE = 20, TCP_QUEUE_SEQ = 21, TCP_REPAIR_OPTIONS = 22, TCP_TIMESTAMP = 24, TCP_REPAIR_WINDOW = 29, TCP_MAXSEG = 2;
const TCP_RECV_QUEUE = 1, TCP_SEND_QUEUE = 2, TCP_REPAIR_OFF_NO_WP = -1;
const SIOCINQ = 0x541bn, SIOCOUTQ = 0x5411n, SIOCOUTQNSD = 0x894bn;
const TCPOPT_MAXSEG = 2, TCPOPT_WINDOW = 3, TCPOPT_SACK_PERM = 4, TCPOPT_TIMESTAMP = 8;
const TCPI_OPT_TIMESTAMPS = 1, TCPI_OPT_SACK = 2, TCPI_OPT_WSCALE = 4;
const MSG_PEEK = 2, MSG_DONTWAIT = 0x40, MSG_NOSIGNAL = 0x4000;
const EADDRINUSE = 98, EADDRNOTAVAIL = 99, EACCES = 13, EPERM = 1, EINPROGRESS = 115;

/** TCP states (include/net/tcp_states.h). */
export const TCP = { ESTABLISHED: 1, SYN_SENT: 2, SYN_RECV: 3, FIN_WAIT1: 4, FIN_WAIT2: 5, TIME_WAIT: 6, CLOSE: 7, CLOSE_WAIT: 8, LAST_ACK: 9, LISTEN: 10, CLOSING: 11 } as const;
const stateName = (s: number) => Object.entries(TCP).find(([, v]) => v === s)?.[0] ?? `state ${s}`;
/** States whose send queue ends with our FIN (counted in the sequence, not data). */
const FIN_SENT = new Set<number>([TCP.FIN_WAIT1, TCP.FIN_WAIT2, TCP.CLOSING, TCP.LAST_ACK]);
/** ... whose FIN is our first (shut down before the peer's came) / the peer's acknowledged it. */
const FIN_FIRST = new Set<number>([TCP.FIN_WAIT1, TCP.FIN_WAIT2, TCP.CLOSING]);
/** States whose receive sequence ends with the peer's FIN. */
const FIN_RECEIVED = new Set<number>([TCP.CLOSE_WAIT, TCP.LAST_ACK, TCP.CLOSING]);
/** States a connection is kept in. */
const KEPT_CONN = new Set<number>([TCP.ESTABLISHED, TCP.FIN_WAIT1, TCP.FIN_WAIT2, TCP.CLOSE_WAIT, TCP.LAST_ACK, TCP.CLOSING]);

// ---------------------------------------------------------------- inet helpers (shared)

/** An IPv4 or IPv6 address and port: `ip` is the address's bytes in hex (8 or 32 digits). */
export interface InetAddr { ip: string; port: number }
export const inetAddrSchema = z.strictObject({ ip: z.string().regex(/^([0-9a-f]{8}|[0-9a-f]{32})$/, 'not an IPv4 or IPv6 address'), port: int(0, 65535) });

/** A sockaddr_in / sockaddr_in6 for `a` in `family` (an IPv4 address in an IPv6 socket is v4-mapped). */
export function sockaddr(family: number, a: InetAddr): Buffer {
  if (family === AF_INET) {
    const b = Buffer.alloc(16);
    b.writeUInt16LE(AF_INET, 0);
    b.writeUInt16BE(a.port, 2);
    Buffer.from(a.ip.slice(-8), 'hex').copy(b, 4);
    return b;
  }
  const b = Buffer.alloc(28);
  b.writeUInt16LE(AF_INET6, 0);
  b.writeUInt16BE(a.port, 2);
  const ip = a.ip.length === 8 ? '00000000000000000000ffff' + a.ip : a.ip;
  Buffer.from(ip, 'hex').copy(b, 8);
  return b;
}

/** The address in a sockaddr_in / sockaddr_in6. */
export function parseSockaddr(b: Buffer): InetAddr {
  const fam = b.readUInt16LE(0);
  if (fam === AF_INET) return { ip: b.subarray(4, 8).toString('hex'), port: b.readUInt16BE(2) };
  return { ip: b.subarray(8, 24).toString('hex'), port: b.readUInt16BE(2) };
}

/** Is an IPv6 address (hex) v4-mapped? Its IPv4 part then. */
const v4mapped = (ip: string) => (ip.length === 32 && ip.startsWith('00000000000000000000ffff') ? ip.slice(24) : undefined);

/** An address as iptables writes it. */
export function ipText(ip: string): string {
  if (ip.length === 8) return Buffer.from(ip, 'hex').join('.');
  return ip.match(/.{4}/g)!.join(':');
}

const isAny = (ip: string) => /^0+$/.test(ip);

/** getsockopt into a buffer of `size` bytes; the bytes the kernel wrote, or undefined (errno in errnoNow()). */
export function getsockopt(fd: number, level: number, name: number, size: number): Buffer | undefined {
  const val = Buffer.alloc(size);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(size);
  if (sys.syscall(SYS_getsockopt, fd, level, name, addressOf(val), addressOf(len)) < 0) return undefined;
  return val.subarray(0, len.readUInt32LE());
}

export function getsockoptInt(fd: number, level: number, name: number): number | undefined {
  const b = getsockopt(fd, level, name, 4);
  return b && b.length >= 4 ? b.readInt32LE(0) : undefined;
}

export function setsockopt(fd: number, level: number, name: number, val: Buffer): number {
  return sys.syscall(SYS_setsockopt, fd, level, name, addressOf(val), val.length) < 0 ? errnoNow() : 0;
}

const intBuf = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeInt32LE(v);
  return b;
};

function ioctlInt(fd: number, req: bigint): number {
  const b = Buffer.alloc(8);
  if (sys.ioctl(fd, req, b) < 0) throw new CkptError(errnoNow(), 'checkpoint:tcp', `ioctl 0x${req.toString(16)}`);
  return b.readInt32LE(0);
}

function sockName(fd: number, nr: number): InetAddr | undefined {
  const b = Buffer.alloc(128);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(128);
  if (sys.syscall(nr, fd, addressOf(b), addressOf(len)) < 0) return undefined;
  return parseSockaddr(b);
}

/**
 * Socket options kept as integers, by name: [level, option, family it
 * applies to (0: both), set before bind]. SO_SNDBUF/SO_RCVBUF read back
 * doubled and are given half.
 */
const INT_OPTS = {
  reuseaddr: [SOL_SOCKET, 2, 0, true], reuseport: [SOL_SOCKET, 15, 0, true], keepalive: [SOL_SOCKET, 9, 0, false],
  oobinline: [SOL_SOCKET, 10, 0, false], priority: [SOL_SOCKET, 12, 0, false], rcvlowat: [SOL_SOCKET, 18, 0, false],
  dontroute: [SOL_SOCKET, 5, 0, false], sndbuf: [SOL_SOCKET, 7, 0, false], rcvbuf: [SOL_SOCKET, 8, 0, false],
  nodelay: [IPPROTO_TCP, 1, 0, false], cork: [IPPROTO_TCP, 3, 0, false], keepidle: [IPPROTO_TCP, 4, 0, false],
  keepintvl: [IPPROTO_TCP, 5, 0, false], keepcnt: [IPPROTO_TCP, 6, 0, false], syncnt: [IPPROTO_TCP, 7, 0, false],
  linger2: [IPPROTO_TCP, 8, 0, false], deferaccept: [IPPROTO_TCP, 9, 0, false], windowclamp: [IPPROTO_TCP, 10, 0, false],
  usertimeout: [IPPROTO_TCP, 18, 0, false], notsentlowat: [IPPROTO_TCP, 25, 0, false], fastopen: [IPPROTO_TCP, 23, 0, false],
  thinlto: [IPPROTO_TCP, 16, 0, false], inq: [IPPROTO_TCP, 36, 0, false], savesyn: [IPPROTO_TCP, 27, 0, false],
  timestamp: [SOL_SOCKET, 29, 0, false], timestampns: [SOL_SOCKET, 35, 0, false], pacing: [SOL_SOCKET, 47, 0, false],
  tos: [SOL_IP, 1, AF_INET, false], ttl: [SOL_IP, 2, AF_INET, false], mtudisc: [SOL_IP, 10, AF_INET, false],
  recverr: [SOL_IP, 11, AF_INET, false], freebind: [SOL_IP, 15, AF_INET, true], nobindport: [SOL_IP, 24, AF_INET, true],
  v6only: [SOL_IPV6, 26, AF_INET6, true], hops: [SOL_IPV6, 16, AF_INET6, false], tclass: [SOL_IPV6, 67, AF_INET6, false],
  mtudisc6: [SOL_IPV6, 23, AF_INET6, false], recverr6: [SOL_IPV6, 25, AF_INET6, false], freebind6: [SOL_IPV6, 78, AF_INET6, true],
} as const satisfies Record<string, readonly [number, number, number, boolean]>;
type IntOpt = keyof typeof INT_OPTS;
const OPT_NAMES = Object.keys(INT_OPTS) as IntOpt[];
const SO_GET_FILTER = 26, SO_SNDBUFFORCE = 32, SO_TYPE = 3, SO_PROTOCOL = 38, SO_DOMAIN = 39, SO_LINGER = 13, SO_RCVTIMEO = 20, SO_SNDTIMEO = 21, SO_BINDTODEVICE = 25, SO_MARK = 36, IP_TRANSPARENT = 19, TCP_CONGESTION = 13;
const TCP_MSS_DEFAULT = 536;

/** Options as kept: the integers that differ from a new socket's are set again. */
export interface SockOpts {
  ints: Partial<Record<IntOpt, number>>;
  /** SO_LINGER when on: seconds. */
  linger?: number;
  /** SO_RCVTIMEO / SO_SNDTIMEO in microseconds, when set. */
  rcvtimeo?: number;
  sndtimeo?: number;
  /** TCP_CONGESTION. */
  congestion?: string;
  /** SO_BINDTODEVICE. */
  device?: string;
  /** TCP_MAXSEG asked for (user MSS), on a socket not connected. */
  maxseg?: number;
}

const i32 = int(-(2 ** 31), 2 ** 31 - 1);
const timeo = int(0, Number.MAX_SAFE_INTEGER);
export const sockOptsSchema = z.strictObject({
  ints: z.partialRecord(z.enum(OPT_NAMES as [IntOpt, ...IntOpt[]]), i32),
  linger: int(0, 2 ** 31 - 1).optional(),
  rcvtimeo: timeo.optional(),
  sndtimeo: timeo.optional(),
  congestion: z.string().regex(/^[a-z0-9_]{1,15}$/).optional(),
  device: z.string().regex(/^[^\0/ ]{1,15}$/).optional(),
  maxseg: int(88, 65535).optional(),
});

/** Read the options of socket `fd` (a supervisor's duplicate); `where` names it in a refusal. */
export function captureOpts(fd: number, family: number, where: string, connected: boolean): SockOpts {
  const o: SockOpts = { ints: {} };
  for (const name of OPT_NAMES) {
    const [level, opt, fam] = INT_OPTS[name];
    if (fam && fam !== family) continue;
    const v = getsockoptInt(fd, level, opt);
    if (v !== undefined) o.ints[name] = v;
  }
  const refuse = (what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${where}: ${what}: not kept`);
  if ((getsockoptInt(fd, SOL_SOCKET, SO_MARK) ?? 0) !== 0) throw refuse('SO_MARK (a restart would set it with the supervisor\'s CAP_NET_ADMIN)');
  if (family === AF_INET && (getsockoptInt(fd, SOL_IP, IP_TRANSPARENT) ?? 0) !== 0) throw refuse('IP_TRANSPARENT');
  if ((o.ints.priority ?? 0) > 6) throw refuse(`SO_PRIORITY ${o.ints.priority} (above 6 needs CAP_NET_ADMIN)`);
  // What nothing here keeps is refused, not dropped: a socket filter, SO_TIMESTAMPING, busy polling, TCP_TX_DELAY (the last two need CAP_NET_ADMIN).
  const flen = Buffer.alloc(4);
  if (sys.syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_GET_FILTER, addressOf(Buffer.alloc(8)), addressOf(flen)) === 0 && flen.readUInt32LE(0)) throw refuse('a socket filter (SO_ATTACH_FILTER)');
  for (const [name, level, opt] of [['SO_TIMESTAMPING', SOL_SOCKET, 37], ['SO_BUSY_POLL', SOL_SOCKET, 46], ['TCP_TX_DELAY', IPPROTO_TCP, 37]] as const) {
    if ((getsockoptInt(fd, level, opt) ?? 0) !== 0) throw refuse(name);
  }
  const l = getsockopt(fd, SOL_SOCKET, SO_LINGER, 8);
  if (l && l.readInt32LE(0)) o.linger = l.readInt32LE(4);
  for (const [key, opt] of [['rcvtimeo', SO_RCVTIMEO], ['sndtimeo', SO_SNDTIMEO]] as const) {
    const t = getsockopt(fd, SOL_SOCKET, opt, 16);
    const us = t ? Number(t.readBigInt64LE(0)) * 1e6 + Number(t.readBigInt64LE(8)) : 0;
    if (us) o[key] = us;
  }
  const cc = getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, 16);
  if (cc) o.congestion = cc.toString('latin1').replace(/\0.*$/s, '');
  const dev = getsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, 16);
  if (dev && dev.length && dev[0]) o.device = dev.toString('latin1').replace(/\0.*$/s, '');
  if (!connected) {
    const mss = getsockoptInt(fd, IPPROTO_TCP, TCP_MAXSEG);
    if (mss !== undefined && mss !== TCP_MSS_DEFAULT && mss >= 88) o.maxseg = mss;
  }
  return o;
}

/**
 * Set options on `fd` where they differ from what it has: `phase` 'bind'
 * those that must come before bind, 'after' the rest.
 */
export function restoreOpts(fd: number, family: number, o: SockOpts, phase: 'bind' | 'after', where: string): void {
  const fail = (what: string, e: number) => {
    throw new CkptError(e === EPERM || e === EACCES ? errno('EPERM') : e, 'restart:tcp', `${where}: ${what}`);
  };
  for (const name of OPT_NAMES) {
    const [level, opt, fam, preBind] = INT_OPTS[name];
    const want = o.ints[name];
    if (want === undefined || (fam && fam !== family) || preBind !== (phase === 'bind')) continue;
    const now = getsockoptInt(fd, level, opt);
    if (now === want) continue;
    const v = name === 'sndbuf' || name === 'rcvbuf' ? want >> 1 : want;
    const e = setsockopt(fd, level, opt, intBuf(v));
    if (e) fail(`setsockopt ${name} ${v}`, e);
  }
  if (phase === 'bind') {
    if (o.device) {
      const e = setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, Buffer.from(o.device + '\0', 'latin1'));
      if (e) fail(`SO_BINDTODEVICE ${o.device}`, e);
    }
    return;
  }
  if (o.linger !== undefined) {
    const b = Buffer.alloc(8);
    b.writeInt32LE(1, 0);
    b.writeInt32LE(o.linger, 4);
    const e = setsockopt(fd, SOL_SOCKET, SO_LINGER, b);
    if (e) fail('SO_LINGER', e);
  }
  for (const [key, opt] of [['rcvtimeo', SO_RCVTIMEO], ['sndtimeo', SO_SNDTIMEO]] as const) {
    const us = o[key];
    if (!us) continue;
    const b = Buffer.alloc(16);
    b.writeBigInt64LE(BigInt(Math.floor(us / 1e6)), 0);
    b.writeBigInt64LE(BigInt(us % 1e6), 8);
    const e = setsockopt(fd, SOL_SOCKET, opt, b);
    if (e) fail(key, e);
  }
  if (o.congestion) {
    const now = getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, 16)?.toString('latin1').replace(/\0.*$/s, '');
    if (now !== o.congestion) {
      const e = setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, Buffer.from(o.congestion, 'latin1'));
      if (e) fail(`TCP_CONGESTION ${o.congestion}`, e);
    }
  }
  if (o.maxseg !== undefined) {
    const e = setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, intBuf(o.maxseg));
    if (e) fail('TCP_MAXSEG', e);
  }
}

// ---------------------------------------------------------------- sock_diag

/** A TCP socket as sock_diag shows it. */
export interface InetSockInfo {
  family: number;
  state: number;
  local: InetAddr;
  remote: InetAddr;
  /** Listener: connections waiting to be accepted; else bytes to read. */
  rqueue: number;
  /** Listener: its backlog. */
  wqueue: number;
  ino: number;
  /** TCP-MD5 keys, an upper-layer protocol: refused. */
  md5?: boolean;
  ulp?: boolean;
}

const INET_DIAG_MD5SIG = 10, INET_DIAG_ULP_INFO = 20;

/** Every TCP socket of this network namespace (both families), by inode (0: no file: in an accept queue, or orphaned). */
export function tcpSockets(): InetSockInfo[] {
  const out: InetSockInfo[] = [];
  for (const family of [AF_INET, AF_INET6]) {
    const body = Buffer.alloc(56); // struct inet_diag_req_v2
    body.writeUInt8(family, 0);
    body.writeUInt8(IPPROTO_TCP, 1);
    body.writeUInt32LE(0xffffffff, 4); // every state
    for (const msg of diagDump(body)) {
      const fam = msg.readUInt8(0);
      const addr = (o: number, port: number): InetAddr => ({ ip: msg.subarray(o, o + (fam === AF_INET ? 4 : 16)).toString('hex'), port });
      const info: InetSockInfo = {
        family: fam, state: msg.readUInt8(1),
        local: addr(8, msg.readUInt16BE(4)), remote: addr(24, msg.readUInt16BE(6)),
        rqueue: msg.readUInt32LE(56), wqueue: msg.readUInt32LE(60), ino: msg.readUInt32LE(68),
      };
      for (let a = 72; a + 4 <= msg.length; ) {
        const alen = msg.readUInt16LE(a), atype = msg.readUInt16LE(a + 2);
        if (alen < 4) break;
        if (atype === INET_DIAG_MD5SIG) info.md5 = true;
        if (atype === INET_DIAG_ULP_INFO) info.ulp = true;
        a += (alen + 3) & ~3;
      }
      out.push(info);
    }
  }
  return out;
}

/** A 4-tuple as a key: "local>remote", IPv4 addresses v4-mapped so both families meet. */
const norm = (a: InetAddr) => `${a.ip.length === 8 ? '00000000000000000000ffff' + a.ip : a.ip}:${a.port}`;
const tupleKey = (local: InetAddr, remote: InetAddr) => `${norm(local)}>${norm(remote)}`;

// ---------------------------------------------------------------- netfilter

/** The rules that hold a connection's packets: one in INPUT (from the peer), one in OUTPUT. */
export interface Tuple { local: InetAddr; remote: InetAddr }
/** Packets the restore itself sends bear this mark and pass (kept for forged packets). */
const CKPT_MARK = '0x636b7074';

function ruleSpecs(t: Tuple): { v6: boolean; lines: string[] } {
  const l4 = v4mapped(t.local.ip) ?? (t.local.ip.length === 8 ? t.local.ip : undefined);
  const r4 = v4mapped(t.remote.ip) ?? (t.remote.ip.length === 8 ? t.remote.ip : undefined);
  const v6 = !(l4 && r4);
  const L = ipText(v6 ? t.local.ip : l4!), R = ipText(v6 ? t.remote.ip : r4!);
  const tag = `ckpt-tcp ${L}:${t.local.port} ${R}:${t.remote.port}`;
  return {
    v6,
    lines: [
      `INPUT -p tcp -s ${R} --sport ${t.remote.port} -d ${L} --dport ${t.local.port} -m mark ! --mark ${CKPT_MARK} -m comment --comment "${tag}" -j DROP`,
      `OUTPUT -p tcp -s ${L} --sport ${t.local.port} -d ${R} --dport ${t.remote.port} -m mark ! --mark ${CKPT_MARK} -m comment --comment "${tag}" -j DROP`,
    ],
  };
}

function iptablesRestore(v6: boolean, script: string): void {
  execFileSync(v6 ? 'ip6tables-restore' : 'iptables-restore', ['-w', '-n'], { input: script, stdio: ['pipe', 'ignore', 'pipe'] });
}

/** Drop every packet of these connections (both ways) until unlock. */
export function lockConnections(ts: Tuple[], what: string): void {
  for (const v6 of [false, true]) {
    const lines = ts.map(ruleSpecs).filter((s) => s.v6 === v6).flatMap((s) => s.lines);
    if (!lines.length) continue;
    try {
      iptablesRestore(v6, `*filter\n${lines.map((l) => `-I ${l}`).join('\n')}\nCOMMIT\n`);
    } catch (e) {
      throw new CkptError(errno('EOPNOTSUPP'), what, `cannot hold the packets of TCP connections to peers outside the subtree with netfilter rules (${v6 ? 'ip6tables' : 'iptables'}): ${String((e as { stderr?: Buffer }).stderr ?? e).trim()}`);
    }
  }
}

/** Remove the rules of these connections, those there are (a missing one is no error). */
export function unlockConnections(ts: Tuple[]): void {
  for (const v6 of [false, true]) {
    const lines = ts.map(ruleSpecs).filter((s) => s.v6 === v6).flatMap((s) => s.lines);
    if (!lines.length) continue;
    try {
      iptablesRestore(v6, `*filter\n${lines.map((l) => `-D ${l}`).join('\n')}\nCOMMIT\n`);
    } catch {
      // Some were not there: one by one.
      for (const l of lines) {
        try {
          iptablesRestore(v6, `*filter\n-D ${l}\nCOMMIT\n`);
        } catch { /* not there */ }
      }
    }
  }
}

// ---------------------------------------------------------------- state

/** A connection as repair mode reads it. */
export interface TcpConn {
  state: number;
  remote: InetAddr;
  /** rcv_nxt and write_seq (TCP_QUEUE_SEQ of each queue). */
  inqSeq: number;
  outqSeq: number;
  /** Received and not read; the send queue (sent but not acknowledged, then `unsent` bytes never sent). */
  inq: string;
  outq: string;
  unsent: number;
  /** FIN_WAIT1: our FIN is queued behind bytes not sent yet (else it was sent). */
  finUnsent?: boolean;
  mss: number;
  /** TCPI_OPT_* negotiated, window scales, timestamp clock. */
  optMask: number;
  sndWscale: number;
  rcvWscale: number;
  timestamp?: number;
  /** TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup. */
  window?: [number, number, number, number, number];
  /** The peer is no socket of the subtree. */
  outside?: boolean;
  /** Its packets are dropped (netfilter) from the checkpoint until a restore takes over. */
  locked?: boolean;
  /** Waiting in a listener of the subtree to be accepted: made again by connecting (pendingOf). */
  accept?: boolean;
}

export interface TcpState {
  family: 2 | 10;
  /** Bound or connected: the local address. */
  local?: InetAddr;
  /** Listening: its backlog. */
  backlog?: number;
  conn?: TcpConn;
  opts: SockOpts;
}

/** A queue of at most 64 MiB (the kernel's buffers are bounded by rmem_max/wmem_max anyway). */
const QUEUE_MAX = 64 << 20;
export const tcpConnSchema = z.strictObject({
  state: z.union([TCP.ESTABLISHED, TCP.FIN_WAIT1, TCP.FIN_WAIT2, TCP.CLOSE_WAIT, TCP.LAST_ACK, TCP.CLOSING].map((v) => z.literal(v)) as [z.ZodLiteral<number>, z.ZodLiteral<number>]),
  remote: inetAddrSchema,
  inqSeq: u32, outqSeq: u32,
  inq: base64(QUEUE_MAX), outq: base64(QUEUE_MAX),
  unsent: int(0, QUEUE_MAX),
  finUnsent: z.boolean().optional(),
  mss: int(0, 65535),
  optMask: int(0, 255), sndWscale: int(0, 15), rcvWscale: int(0, 15),
  timestamp: u32.optional(),
  window: z.tuple([u32, u32, u32, u32, u32]).optional(),
  outside: z.boolean().optional(),
  locked: z.boolean().optional(),
  accept: z.boolean().optional(),
});
/** The fields of a 'tcp' description (files.ts adds id, kind and flags). */
export const tcpFields = {
  family: z.union([z.literal(AF_INET), z.literal(AF_INET6)]),
  local: inetAddrSchema.optional(),
  backlog: int(0, 2 ** 31 - 1).optional(),
  conn: tcpConnSchema.optional(),
  opts: sockOptsSchema,
};
const tcpSchema = z.strictObject(tcpFields);
const sameTcp: [Same<z.infer<typeof tcpSchema>, TcpState>, Same<z.infer<typeof tcpConnSchema>, TcpConn>, Same<z.infer<typeof sockOptsSchema>, SockOpts>] = [true, true, true];
void sameTcp;

// ---------------------------------------------------------------- capture

/** One queue read in repair mode: its sequence number and (peeked) bytes. */
function readQueue(fd: number, queue: number, len: number, where: string): { seq: number; data: Buffer } {
  if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(queue))) throw new CkptError(errnoNow(), 'checkpoint:tcp', `${where}: TCP_REPAIR_QUEUE`);
  const seq = getsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, 4);
  if (!seq) throw new CkptError(errnoNow(), 'checkpoint:tcp', `${where}: TCP_QUEUE_SEQ`);
  const data = Buffer.alloc(len + 1);
  const n = len ? sys.recv(fd, data, MSG_PEEK | MSG_DONTWAIT) : 0;
  if (n !== len) throw new CkptError(errno('EAGAIN'), 'checkpoint:tcp', `${where}: read ${n} bytes of a queue of ${len}`);
  return { seq: seq.readUInt32LE(0), data: data.subarray(0, len) };
}

function repair(fd: number, on: number, where: string): void {
  if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, intBuf(on))) {
    const e = errnoNow();
    throw new CkptError(on === 1 && e === EPERM ? errno('EOPNOTSUPP') : e, 'tcp', `${where}: TCP_REPAIR ${on}${e === EPERM ? ' (needs CAP_NET_ADMIN)' : ''}`);
  }
}

/** A connection read in repair mode (the socket is left in repair mode). */
function readConn(fd: number, where: string): Omit<TcpConn, 'remote'> {
  repair(fd, 1, where);
  for (let tries = 0; ; tries++) {
    const ti = getsockopt(fd, IPPROTO_TCP, TCP_INFO, 104);
    if (!ti || ti.length < 8) throw new CkptError(errnoNow(), 'checkpoint:tcp', `${where}: TCP_INFO`);
    const state = ti[0];
    if (!KEPT_CONN.has(state)) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${where}: a connection in state ${stateName(state)}: not supported`);
    const rawOutq = ioctlInt(fd, SIOCOUTQ);
    let outqLen = rawOutq, unsent = ioctlInt(fd, SIOCOUTQNSD);
    const inqLen = ioctlInt(fd, SIOCINQ);
    const finUnsent = FIN_SENT.has(state) && unsent > 0;
    if (FIN_SENT.has(state)) {
      // The FIN is in the send queue's sequence, not data (and, if anything is unsent, last of it).
      if (outqLen) outqLen--;
      if (unsent) unsent--;
    }
    const rq = readQueue(fd, TCP_RECV_QUEUE, inqLen, where);
    const sq = readQueue(fd, TCP_SEND_QUEUE, outqLen, where);
    // The kernel goes on receiving while the program is frozen: the same
    // numbers again, or read it all once more.
    const again = getsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, 4)!.readUInt32LE(0);
    setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(TCP_RECV_QUEUE));
    const rAgain = getsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, 4)!.readUInt32LE(0);
    if ((again !== sq.seq || rAgain !== rq.seq || ioctlInt(fd, SIOCOUTQ) !== rawOutq) && tries < 8) continue;
    const mss = getsockoptInt(fd, IPPROTO_TCP, TCP_MAXSEG) ?? 0;
    const optMask = ti[5];
    const conn: Omit<TcpConn, 'remote'> = {
      state, inqSeq: rq.seq, outqSeq: sq.seq, inq: rq.data.toString('base64'), outq: sq.data.toString('base64'), unsent, ...(finUnsent ? { finUnsent } : {}),
      mss, optMask, sndWscale: optMask & TCPI_OPT_WSCALE ? ti[6] & 15 : 0, rcvWscale: optMask & TCPI_OPT_WSCALE ? ti[6] >> 4 : 0,
    };
    if (optMask & TCPI_OPT_TIMESTAMPS) conn.timestamp = getsockopt(fd, IPPROTO_TCP, TCP_TIMESTAMP, 4)?.readUInt32LE(0);
    const w = getsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, 20);
    if (w && w.length === 20) conn.window = [0, 4, 8, 12, 16].map((o) => w.readUInt32LE(o)) as TcpConn['window'];
    return conn;
  }
}

interface Met { pid: number; fd: number; ino: number; st: TcpState }

const where = (pid: number, fd: number, ino: number) => `task ${pid}: fd ${fd} (socket:[${ino}], TCP)`;

/**
 * The TCP sockets of a subtree being checkpointed: met one by one by
 * captureFiles (add), read together once every descriptor is known
 * (finish), so that a connection's peer is known to be in the subtree or
 * not, and those outside are held by netfilter (CKPT_KILL) before any is
 * read. `kill`: the subtree dies after this checkpoint.
 */
export class TcpCapture {
  private diag?: InetSockInfo[];
  private byIno?: Map<number, InetSockInfo>;
  private readonly met: Met[] = [];
  /** CKPT_KILL: duplicates of the connections left in repair mode until the kill, and the rules. */
  private readonly held: { fd: number; where: string }[] = [];
  private locked: Tuple[] = [];

  constructor(readonly kill = false) {}

  /**
   * Is socket inode `ino` (fd of pid) a TCP one? sock_diag lists those
   * hashed (listening, connected); one not bound or only bound is asked.
   */
  has(pid: number, fd: number, ino: number): boolean {
    if (!this.byIno) {
      this.diag = tcpSockets();
      this.byIno = new Map(this.diag.filter((d) => d.ino).map((d) => [d.ino, d]));
    }
    if (this.byIno.has(ino)) return true;
    let family: number | undefined;
    try {
      withTraceeFd(pid, fd, 'checkpoint:tcp', (mine) => {
        if (getsockoptInt(mine, SOL_SOCKET, SO_PROTOCOL) === IPPROTO_TCP && getsockoptInt(mine, SOL_SOCKET, SO_TYPE) === SOCK_STREAM) family = getsockoptInt(mine, SOL_SOCKET, SO_DOMAIN);
      });
    } catch {
      return false;
    }
    if (family !== AF_INET && family !== AF_INET6) return false;
    const none = { ip: family === AF_INET ? '00000000' : '0'.repeat(32), port: 0 };
    this.byIno.set(ino, { family, state: TCP.CLOSE, local: none, remote: none, rqueue: 0, wqueue: 0, ino });
    return true;
  }

  /** A TCP socket met at fd of pid: its description (`base` and TcpState), filled in by finish(). */
  add<T extends object>(pid: number, fd: number, ino: number, base: T): T & TcpState {
    const info = this.byIno!.get(ino)!;
    const st = Object.assign(base, { family: info.family as 2 | 10, opts: { ints: {} } });
    this.met.push({ pid, fd, ino, st });
    return st;
  }

  /**
   * Read every socket met (the subtree is frozen). `heldOutside`: a
   * supervised process outside the subtree holding that socket inode (it
   * would be left with a socket in repair mode, or two sockets with one
   * 4-tuple after a restart): refused.
   */
  finish(heldOutside: (ino: number) => number | undefined = () => undefined): void {
    if (!this.met.length) return;
    for (const m of this.met) {
      const other = heldOutside(m.ino);
      if (other !== undefined) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${where(m.pid, m.fd, m.ino)}: also held by process ${other} outside the subtree`);
    }
    const ours = new Set(this.met.map((m) => m.ino));
    const byTuple = new Map(this.diag!.map((d) => [tupleKey(d.local, d.remote), d]));
    const conns: { m: Met; info: InetSockInfo; outside: boolean; later: boolean }[] = [];
    for (const m of this.met) {
      const info = this.byIno!.get(m.ino)!;
      if (info.state === TCP.LISTEN && info.rqueue) this.pendingOf(m, info, ours, byTuple);
    }
    for (const m of this.met) {
      const info = this.byIno!.get(m.ino)!;
      const w = where(m.pid, m.fd, m.ino);
      if (info.md5) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: TCP-MD5 signatures (TCP_MD5SIG): not kept`);
      if (info.ulp) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: an upper-layer protocol (TCP_ULP, kTLS...): not kept`);
      if (info.state === TCP.LISTEN) continue; // its waiting connections: above
      if (info.state === TCP.CLOSE) continue;
      if (info.state === TCP.SYN_SENT || info.state === TCP.SYN_RECV) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: a connection being opened (${stateName(info.state)}): not supported`);
      if (!KEPT_CONN.has(info.state)) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: a connection in state ${stateName(info.state)}: not supported`);
      const peer = byTuple.get(tupleKey(info.remote, info.local));
      const later = !!peer && this.acceptLater.has(peer);
      conns.push({ m, info, outside: !later && (!peer || !ours.has(peer.ino)), later });
    }
    // The peers outside: their packets held before anything is read (or it could change after).
    if (this.kill) {
      const outside = conns.filter((c) => c.outside).map((c) => ({ local: c.info.local, remote: c.info.remote }));
      if (outside.length) {
        lockConnections(outside, 'checkpoint:tcp');
        this.locked = outside;
      }
    }
    const connOf = new Map(conns.map((c) => [c.m, c]));
    for (const m of this.met) {
      const info = this.byIno!.get(m.ino)!;
      const w = where(m.pid, m.fd, m.ino);
      withTraceeFd(m.pid, m.fd, 'checkpoint:tcp', (mine) => {
        const c = connOf.get(m);
        m.st.opts = captureOpts(mine, info.family, w, !!c);
        const local = sockName(mine, SYS_getsockname);
        if (local && (local.port || !isAny(local.ip))) m.st.local = local;
        if (info.state === TCP.LISTEN) m.st.backlog = info.wqueue;
        if (!c) return;
        const remote = sockName(mine, SYS_getpeername) ?? info.remote;
        let keep = false;
        try {
          m.st.conn = { ...readConn(mine, w), remote, ...(c.outside ? { outside: true } : {}), ...(c.outside && this.kill ? { locked: true } : {}), ...(c.later ? { accept: true } : {}) };
          if (c.later && (m.st.conn.state !== TCP.ESTABLISHED || m.st.conn.inq)) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: a connection not yet accepted by its listener in state ${stateName(m.st.conn.state)}${m.st.conn.inq ? ' with bytes received' : ''}: not supported`);
          if (this.kill) {
            // Left in repair mode: it dies silently with the subtree.
            this.held.push({ fd: sys.fcntl(mine, 1030 /* F_DUPFD_CLOEXEC */, 3), where: w });
            keep = true;
          }
        } finally {
          if (!keep) setsockopt(mine, IPPROTO_TCP, TCP_REPAIR, intBuf(TCP_REPAIR_OFF_NO_WP));
        }
      }, 'socket fd');
    }
  }

  /** Connections waiting in a listener of the subtree, whose clients are in it too: remade by connecting again. */
  private readonly acceptLater = new Set<InetSockInfo>();

  /**
   * A listener with connections waiting to be accepted. No process holds
   * them, and the kernel can neither show what one has received without
   * accepting it (which would take it from the program) nor put a socket
   * into an accept queue. One whose client is in the subtree and which has
   * received nothing yet is kept all the same: at restart its client
   * connects again (a real handshake through the listener made again, so
   * it waits to be accepted as before) and sends again what it had not
   * got acknowledged; the sequence numbers differ, which only the two
   * ends, both in the subtree, could tell. Any other is refused.
   */
  private pendingOf(m: Met, info: InetSockInfo, ours: Set<number>, byTuple: Map<string, InetSockInfo>): void {
    const w = where(m.pid, m.fd, m.ino);
    const mine = this.diag!.filter((d) => d.ino === 0 && d.state === TCP.ESTABLISHED && d.family === info.family && d.local.port === info.local.port && (isAny(info.local.ip) || d.local.ip === info.local.ip));
    let found = 0;
    for (const child of mine) {
      const client = byTuple.get(tupleKey(child.remote, child.local));
      if (!client || !ours.has(client.ino)) continue;
      if (child.rqueue) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: listening on port ${info.local.port}: a connection not yet accepted holds ${child.rqueue} bytes its client sent (they cannot be read without accepting it)`);
      this.acceptLater.add(child);
      found++;
    }
    if (found < info.rqueue) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:tcp', `${w}: listening on port ${info.local.port} with ${info.rqueue - found} connections not yet accepted from clients outside the subtree (no process holds them: the kernel cannot put them back in the accept queue)`);
  }

  /** The checkpoint failed or the subtree runs on: repair mode off (no window probe), rules removed. */
  release(): void {
    for (const h of this.held.splice(0)) {
      setsockopt(h.fd, IPPROTO_TCP, TCP_REPAIR, intBuf(TCP_REPAIR_OFF_NO_WP));
      fs.closeSync(h.fd);
    }
    if (this.locked.length) unlockConnections(this.locked.splice(0));
  }

  /** The subtree is killed: our duplicates go (the sockets stay in repair mode), the rules stay for the restore. */
  commit(): void {
    for (const h of this.held.splice(0)) fs.closeSync(h.fd);
    this.locked = [];
  }
}

// ---------------------------------------------------------------- restore

/** Where a restored socket lives (a process, a descriptor number in it). */
export interface TcpPlace { pid: number; fd: number }

export interface TcpRestoreCtx {
  remote: (pid: number) => Remote;
  host: (pid: number) => number;
  park: (pid: number, fd: bigint) => TcpPlace;
  /** A rollback: checkTcpRollback holds every connection to a peer outside (else only those the image says are held). */
  live?: boolean;
  /** Every description of the tree (sockets sharing a port are looked for among them). */
  descs: { kind: string }[];
}

const tupleOf = (st: TcpState): Tuple => ({ local: st.local!, remote: st.conn!.remote });

/**
 * The restore of a tree's TCP sockets: each made in its first holder
 * (make), left in repair mode until every one exists (a socket out of
 * repair mode may send at once, and its peer in the tree must be there to
 * hear it), then finish: repair off, unsent bytes sent, rules removed.
 */
export class TcpRestore {
  private readonly made: { place: TcpPlace; st: TcpState; where: string }[] = [];
  private shared?: Set<number>;
  constructor(private readonly ctx: TcpRestoreCtx) {}

  /**
   * Ports two sockets of the tree bind without a connection (listeners,
   * bound ones): a program may have cleared SO_REUSEPORT after binding the
   * second, so they are bound with it and given their own value after.
   */
  private sharedPort(st: TcpState): boolean {
    if (!this.shared) {
      const seen = new Set<number>();
      this.shared = new Set();
      for (const d of this.ctx.descs as (Partial<TcpState> & { kind: string })[]) {
        if (d.kind !== 'tcp' || d.conn || !d.local?.port) continue;
        if (seen.has(d.local.port)) this.shared.add(d.local.port);
        seen.add(d.local.port);
      }
    }
    return !st.conn && !!st.local && this.shared.has(st.local.port);
  }

  /** Make socket `st` in process `pid`; its final place will be `owner`. Returns where it is parked. */
  make(pid: number, st: TcpState, owner: TcpPlace): TcpPlace {
    const r = this.ctx.remote(pid);
    const w = `task ${r.task.tid}: fd ${owner.fd} (TCP${st.local ? ` port ${st.local.port}` : ''})`;
    const at = this.ctx.park(pid, r.check('restart:tcp socket', SYS_socket, st.family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP));
    const host = this.ctx.host(pid);
    if (st.conn?.accept) {
      this.connectAgain(r, at, st, w);
      return at;
    }
    withTraceeFd(host, at.fd, 'restart:tcp', (mine) => {
      restoreOpts(mine, st.family, st.opts, 'bind', w);
      if (this.sharedPort(st)) setsockopt(mine, SOL_SOCKET, INT_OPTS.reuseport[1], intBuf(1));
      // Before bind, after SO_REUSEADDR (which would undo it): repair mode forces address reuse, so it can share its listener's port.
      if (st.conn) repair(mine, 1, w);
    }, 'socket fd');
    if (st.local) this.bind(r, at.fd, st, w);
    withTraceeFd(host, at.fd, 'restart:tcp', (mine) => {
      if (st.backlog !== undefined) {
        if (sys.syscall(SYS_listen, mine, st.backlog) < 0) {
          const e = errnoNow();
          throw new CkptError(e === EADDRINUSE ? errno('EBUSY') : e, 'restart:tcp listen', `${w}: port ${st.local?.port ?? 0} is in use`);
        }
      }
      if (st.conn) this.connect(mine, st, w);
      else restoreOpts(mine, st.family, st.opts, 'after', w);
      if (this.sharedPort(st)) setsockopt(mine, SOL_SOCKET, INT_OPTS.reuseport[1], intBuf(st.opts.ints.reuseport ?? 0));
    }, 'socket fd');
    this.made.push({ place: owner, st, where: w });
    return at;
  }

  /** A connection that waited to be accepted: it connects again to its listener (made already) and sends again what was not acknowledged. */
  private connectAgain(r: Remote, at: TcpPlace, st: TcpState, w: string): void {
    const c = st.conn!;
    const host = this.ctx.host(at.pid);
    withTraceeFd(host, at.fd, 'restart:tcp', (mine) => restoreOpts(mine, st.family, st.opts, 'bind', w), 'socket fd');
    this.bind(r, at.fd, st, w);
    const b = new CallBatch(r);
    const sa = sockaddr(st.family, c.remote);
    b.add(undefined, SYS_connect, at.fd, b.put(sa), sa.length);
    const [res] = b.run();
    if (res < 0n) throw new CkptError(Number(-res), 'restart:tcp connect', `${w}: connecting again to its listener ${ipText(c.remote.ip)} port ${c.remote.port}`);
    withTraceeFd(host, at.fd, 'restart:tcp', (mine) => {
      const outq = Buffer.from(c.outq, 'base64');
      if (outq.length) sendAll(mine, outq, w, 'not acknowledged');
      restoreOpts(mine, st.family, st.opts, 'after', w);
    }, 'socket fd');
  }

  /** bind by the process itself: its own right to the port. */
  private bind(r: Remote, fd: number, st: TcpState, w: string): void {
    const b = new CallBatch(r);
    const sa = sockaddr(st.family, st.local!);
    b.add(undefined, SYS_bind, fd, b.put(sa), sa.length);
    const [res] = b.run();
    if (res === -BigInt(EADDRINUSE) || res === -BigInt(EADDRNOTAVAIL)) throw new CkptError(errno('EBUSY'), 'restart:tcp bind', `${w}: ${ipText(st.local!.ip)} port ${st.local!.port} is in use or not available here`);
    if (res === -BigInt(EACCES) || res === -BigInt(EPERM)) throw new CkptError(errno('EPERM'), 'restart:tcp bind', `${w}: the restarting process may not bind port ${st.local!.port}`);
    if (res < 0n) throw new CkptError(Number(-res), 'restart:tcp bind', `${w}: ${ipText(st.local!.ip)} port ${st.local!.port}`);
  }

  /** A connection made again in repair mode: sequences, connect (no SYN), options, queues, window, FIN. */
  private connect(fd: number, st: TcpState, w: string): void {
    const c = st.conn!;
    const fail = (what: string) => {
      throw new CkptError(errnoNow(), 'restart:tcp', `${w}: ${what}`);
    };
    const inq = Buffer.from(c.inq, 'base64'), outq = Buffer.from(c.outq, 'base64');
    const finSent = FIN_SENT.has(c.state) ? 1 : 0;
    const setSeq = (q: number, seq: number) => {
      if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(q)) || setsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, intBuf(seq | 0))) fail('TCP_QUEUE_SEQ');
    };
    const finIn = FIN_RECEIVED.has(c.state) ? 1 : 0;
    setSeq(TCP_RECV_QUEUE, (c.inqSeq - finIn - inq.length) >>> 0);
    setSeq(TCP_SEND_QUEUE, (c.outqSeq - finSent - outq.length) >>> 0);
    const sa = sockaddr(st.family, c.remote);
    if (sys.syscall(SYS_connect, fd, addressOf(sa), sa.length) < 0 && errnoNow() !== EINPROGRESS) {
      const e = errnoNow();
      throw new CkptError(e === EADDRNOTAVAIL || e === EADDRINUSE ? errno('EBUSY') : e, 'restart:tcp connect', `${w}: the connection to ${ipText(c.remote.ip)} port ${c.remote.port} exists already`);
    }
    const opts: [number, number][] = [];
    if (c.optMask & TCPI_OPT_SACK) opts.push([TCPOPT_SACK_PERM, 0]);
    if (c.optMask & TCPI_OPT_WSCALE) opts.push([TCPOPT_WINDOW, c.sndWscale + (c.rcvWscale << 16)]);
    if (c.optMask & TCPI_OPT_TIMESTAMPS) opts.push([TCPOPT_TIMESTAMP, 0]);
    opts.push([TCPOPT_MAXSEG, c.mss]);
    const ob = Buffer.alloc(8 * opts.length);
    opts.forEach(([code, val], i) => {
      ob.writeUInt32LE(code, i * 8);
      ob.writeUInt32LE(val >>> 0, i * 8 + 4);
    });
    if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, ob)) fail('TCP_REPAIR_OPTIONS');
    if (c.timestamp !== undefined && setsockopt(fd, IPPROTO_TCP, TCP_TIMESTAMP, intBuf(c.timestamp | 0))) fail('TCP_TIMESTAMP');
    // Buffers first: the queues must fit as they did.
    restoreOpts(fd, st.family, { ints: { sndbuf: st.opts.ints.sndbuf, rcvbuf: st.opts.ints.rcvbuf } }, 'after', w);
    if (inq.length) {
      setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(TCP_RECV_QUEUE));
      sendAll(fd, inq, w, 'received');
    }
    const sent = outq.subarray(0, outq.length - c.unsent);
    if (sent.length) {
      setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(TCP_SEND_QUEUE));
      sendAll(fd, sent, w, 'sent and not acknowledged');
    }
    if (c.window) {
      const wb = Buffer.alloc(20);
      const win = [...c.window];
      if (finIn) {
        // The peer's FIN is not in the sequence yet: the window as it was before it.
        win[4] = (win[4] - 1) >>> 0;
        win[3] = (win[3] + 1) >>> 0;
      }
      win.forEach((v, i) => wb.writeUInt32LE(v, i * 4));
      if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, wb)) fail('TCP_REPAIR_WINDOW');
    }
    // The FINs, in the order they came. Ours is queued as sent (shutdown
    // with the send queue chosen; one behind bytes never sent goes in
    // finish()). The peer's cannot be queued by any call: a FIN (and, for
    // FIN_WAIT2, the ACK of ours) is forged from the peer's address on a
    // raw socket, as CRIU does; its mark lets it past the rules.
    const ourFin = () => {
      if (c.finUnsent) return;
      setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(TCP_SEND_QUEUE));
      if (sys.syscall(SYS_shutdown, fd, 1) < 0) fail(`shutdown(SHUT_WR) for ${stateName(c.state)}`);
      setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(0));
    };
    const sndUna = (c.outqSeq - finSent - outq.length) >>> 0;
    const wnd = Math.min(65535, (c.window?.[1] ?? 65535) >>> c.sndWscale);
    if (FIN_FIRST.has(c.state)) ourFin();
    if (finIn) forge(fd, st, w, { seq: (c.inqSeq - 1) >>> 0, ack: sndUna, fin: true, wnd }, c.state === TCP.CLOSING ? TCP.CLOSING : TCP.CLOSE_WAIT);
    if (c.state === TCP.LAST_ACK) ourFin();
    if (c.state === TCP.FIN_WAIT2) forge(fd, st, w, { seq: c.inqSeq, ack: (c.outqSeq - outq.length) >>> 0, fin: false, wnd }, TCP.FIN_WAIT2);
    setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(0));
  }

  /** Every socket is there: out of repair mode, the bytes never sent sent now, the other options, rules gone. */
  finish(): void {
    for (const m of this.made) {
      if (!m.st.conn || m.st.conn.accept) continue;
      withTraceeFd(this.ctx.host(m.place.pid), m.place.fd, 'restart:tcp', (mine) => {
        repair(mine, 0, m.where);
        const outq = Buffer.from(m.st.conn!.outq, 'base64');
        const unsent = outq.subarray(outq.length - m.st.conn!.unsent);
        if (unsent.length) {
          // The bytes restored as sent take more room than they did (one buffer per send): room for these (the supervisor's SO_SNDBUFFORCE), then the program's size again below.
          const queued = ioctlInt(mine, SIOCOUTQ);
          setsockopt(mine, SOL_SOCKET, SO_SNDBUFFORCE, intBuf(Math.min(2 ** 30, 4 * (queued + unsent.length) + (1 << 20))));
          sendAll(mine, unsent, m.where, 'not yet sent');
        }
        if (m.st.conn!.finUnsent && sys.syscall(SYS_shutdown, mine, 1) < 0) throw new CkptError(errnoNow(), 'restart:tcp', `${m.where}: shutdown(SHUT_WR) for FIN_WAIT1`);
        restoreOpts(mine, m.st.family, m.st.opts, 'after', m.where);
        // Repair mode forced address reuse and leaving it cleared it: as the program had it.
        if (m.st.opts.ints.reuseaddr) setsockopt(mine, SOL_SOCKET, INT_OPTS.reuseaddr[1], intBuf(m.st.opts.ints.reuseaddr));
      }, 'socket fd');
    }
    const locked = this.made.filter((m) => m.st.conn?.outside && (this.ctx.live || m.st.conn.locked)).map((m) => tupleOf(m.st));
    if (locked.length) unlockConnections(locked);
  }
}

const IPPROTO_RAW = 255, SYS_sendto = 44, SO_MARK_OPT = 36, TH_FIN = 1, TH_ACK = 0x10;

/** The Internet checksum of some buffers. */
function csum(parts: Buffer[]): number {
  let sum = 0;
  for (const b of parts) {
    for (let i = 0; i + 1 < b.length; i += 2) sum += b.readUInt16BE(i);
    if (b.length & 1) sum += b[b.length - 1] << 8;
  }
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return ~sum & 0xffff;
}

/**
 * A segment from the connection's peer to socket `fd` (in repair mode,
 * which still takes in what arrives), sent on a raw socket of the
 * supervisor; then wait until the socket is in state `want`.
 */
function forge(fd: number, st: TcpState, w: string, seg: { seq: number; ack: number; fin: boolean; wnd: number }, want: number): void {
  const c = st.conn!;
  const src = v4mapped(c.remote.ip) ?? c.remote.ip, dst = v4mapped(st.local!.ip) ?? st.local!.ip;
  const v4 = src.length === 8;
  const tcp = Buffer.alloc(20);
  tcp.writeUInt16BE(c.remote.port, 0);
  tcp.writeUInt16BE(st.local!.port, 2);
  tcp.writeUInt32BE(seg.seq >>> 0, 4);
  tcp.writeUInt32BE(seg.ack >>> 0, 8);
  tcp[12] = 5 << 4;
  tcp[13] = TH_ACK | (seg.fin ? TH_FIN : 0);
  tcp.writeUInt16BE(seg.wnd, 14);
  const s = Buffer.from(src, 'hex'), d = Buffer.from(dst, 'hex');
  const pseudo = v4 ? Buffer.concat([s, d, Buffer.from([0, IPPROTO_TCP, 0, 20])]) : Buffer.concat([s, d, Buffer.from([0, 0, 0, 20, 0, 0, 0, IPPROTO_TCP])]);
  tcp.writeUInt16BE(csum([pseudo, tcp]), 16);
  let ip: Buffer;
  if (v4) {
    ip = Buffer.alloc(20);
    ip[0] = 0x45;
    ip.writeUInt16BE(40, 2);
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    s.copy(ip, 12);
    d.copy(ip, 16);
  } else {
    ip = Buffer.alloc(40);
    ip.writeUInt32BE(0x60000000, 0);
    ip.writeUInt16BE(20, 4);
    ip[6] = IPPROTO_TCP;
    ip[7] = 64;
    s.copy(ip, 8);
    d.copy(ip, 24);
  }
  const pkt = Buffer.concat([ip, tcp]);
  const to = sockaddr(v4 ? AF_INET : AF_INET6, { ip: dst, port: 0 });
  const raw = sys.socket(v4 ? AF_INET : AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
  try {
    setsockopt(raw, SOL_SOCKET, SO_MARK_OPT, intBuf(Number(CKPT_MARK)));
    if (sys.syscall(SYS_sendto, raw, addressOf(pkt), pkt.length, 0, addressOf(to), to.length) !== pkt.length) throw new CkptError(errnoNow(), 'restart:tcp', `${w}: cannot forge the peer's ${seg.fin ? 'FIN' : 'ACK'}`);
  } finally {
    fs.closeSync(raw);
  }
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  for (let i = 0; i < 200; i++) {
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, 8)?.[0] === want) return;
    Atomics.wait(sleeper, 0, 0, 1);
  }
  throw new CkptError(errno('EIO'), 'restart:tcp', `${w}: the peer's forged ${seg.fin ? 'FIN' : 'ACK'} was not taken (state ${stateName(getsockopt(fd, IPPROTO_TCP, TCP_INFO, 8)?.[0] ?? 0)}, not ${stateName(want)})`);
}

/** Queue bytes on a socket (repair mode: into the queue chosen), in chunks the kernel takes. */
function sendAll(fd: number, data: Buffer, w: string, what: string): void {
  let chunk = data.length;
  for (let off = 0; off < data.length; ) {
    const n = sys.send(fd, data.subarray(off, off + chunk), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n <= 0) {
      if (chunk > 1024) {
        chunk >>= 1; // a linear buffer that large could not be had: smaller ones
        continue;
      }
      throw new CkptError(errno('ENOMEM'), 'restart:tcp', `${w}: cannot queue ${data.length - off} bytes ${what} (errno ${errnoNow()})`);
    }
    off += n;
  }
}

// ---------------------------------------------------------------- rollback

/** The TCP connections of a tree as kept in its files table. */
type Desc = { id: number; kind: string } & Partial<TcpState>;
const connsOf = (descs: Desc[]) => descs.filter((d): d is Desc & TcpState & { conn: TcpConn; local: InetAddr } => d.kind === 'tcp' && !!d.conn && !!d.local);

/** The live sockets of processes `pids` (host pids), by inode: one holder each. */
function liveHolders(pids: number[]): Map<number, { pid: number; fd: number }> {
  const out = new Map<number, { pid: number; fd: number }>();
  for (const pid of pids) {
    for (const fd of listFds(pid)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m && !out.has(Number(m[1]))) out.set(Number(m[1]), { pid, fd });
      } catch { /* closed */ }
    }
  }
  return out;
}

/**
 * Before a rollback changes anything: a connection to a peer outside the
 * subtree can go back only if nothing was sent or received on it since
 * the checkpoint (see the top of this file). Its packets are held from
 * now until the restore's finish (the live socket would otherwise take in
 * more while the tree is frozen, or the peer get a RST once it is
 * closed). Throws EOPNOTSUPP (rules removed) if one cannot go back.
 * `pids`: the live processes of the subtree (host pids).
 */
export function checkTcpRollback(descs: Desc[], pids: number[], crid: number): void {
  const outside = connsOf(descs).filter((d) => d.conn.outside);
  if (!outside.length) return;
  const tuples = outside.map(tupleOf);
  lockConnections(tuples, 'restart:tcp');
  try {
    const diag = new Map(tcpSockets().map((d) => [tupleKey(d.local, d.remote), d]));
    const holders = liveHolders(pids);
    for (const d of outside) {
      const name = `checkpoint ${crid}: the TCP connection ${ipText(d.local.ip)}:${d.local.port} -> ${ipText(d.conn.remote.ip)}:${d.conn.remote.port} (peer outside the subtree)`;
      const live = diag.get(tupleKey(d.local, d.conn.remote));
      const h = live && holders.get(live.ino);
      if (!h) throw new CkptError(errno('EOPNOTSUPP'), 'restart:tcp', `${name} was closed since: its peer cannot be taken back`);
      withTraceeFd(h.pid, h.fd, 'restart:tcp', (mine) => {
        repair(mine, 1, name);
        try {
          const ti = getsockopt(mine, IPPROTO_TCP, TCP_INFO, 8)!;
          const seq = (q: number) => {
            setsockopt(mine, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(q));
            return getsockopt(mine, IPPROTO_TCP, TCP_QUEUE_SEQ, 4)!.readUInt32LE(0);
          };
          const [rcv, snd] = [seq(TCP_RECV_QUEUE), seq(TCP_SEND_QUEUE)];
          setsockopt(mine, IPPROTO_TCP, TCP_REPAIR_QUEUE, intBuf(0));
          if (ti[0] !== d.conn.state || rcv !== d.conn.inqSeq || snd !== d.conn.outqSeq) {
            throw new CkptError(errno('EOPNOTSUPP'), 'restart:tcp', `${name}: ${snd !== d.conn.outqSeq ? `${(snd - d.conn.outqSeq) >>> 0} bytes sent` : rcv !== d.conn.inqSeq ? `${(rcv - d.conn.inqSeq) >>> 0} bytes received` : `now ${stateName(ti[0])}`} since the checkpoint: the peer cannot take them back`);
          }
        } finally {
          setsockopt(mine, IPPROTO_TCP, TCP_REPAIR, intBuf(TCP_REPAIR_OFF_NO_WP));
        }
      }, 'socket fd');
    }
  } catch (e) {
    unlockConnections(tuples);
    throw e;
  }
}

/** A rollback failed after checkTcpRollback (the subtree is killed): its rules go. */
export function unlockTcpRollback(descs: Desc[]): void {
  const outside = connsOf(descs).filter((d) => d.conn.outside);
  if (outside.length) unlockConnections(outside.map(tupleOf));
}

/**
 * A rollback, before the live descriptors are closed: every live socket of
 * a connection the checkpoint holds is put in repair mode, so that closing
 * it sends nothing (neither FIN nor RST) and frees its 4-tuple for the
 * socket made again. `pids`: the live processes (host pids).
 */
export function silenceLiveTcp(descs: Desc[], pids: number[]): void {
  const conns = connsOf(descs);
  if (!conns.length) return;
  // (and the accepted end of one that waited to be accepted: its 4-tuple is made again by the connect)
  const want = new Set(conns.flatMap((d) => [tupleKey(d.local, d.conn.remote), ...(d.conn.accept ? [tupleKey(d.conn.remote, d.local)] : [])]));
  const holders = liveHolders(pids);
  for (const s of tcpSockets()) {
    const h = s.ino && want.has(tupleKey(s.local, s.remote)) ? holders.get(s.ino) : undefined;
    if (!h) continue;
    try {
      withTraceeFd(h.pid, h.fd, 'restart:tcp', (mine) => repair(mine, 1, `task ${h.pid}: fd ${h.fd}`), 'socket fd');
    } catch (e) {
      logError(`task ${h.pid}: fd ${h.fd}: rollback: cannot put a TCP socket in repair mode before it is closed: ${(e as Error).message}`);
    }
  }
}

/** For `ckpt inspect`. */
export function describeTcp(st: TcpState): string {
  const at = (a?: InetAddr) => (a ? `${ipText(a.ip)}:${a.port}` : 'unbound');
  const fam = st.family === AF_INET ? 'TCP/IPv4' : 'TCP/IPv6';
  if (st.backlog !== undefined) return `${fam} listening on ${at(st.local)} (backlog ${st.backlog})`;
  if (!st.conn) return `${fam} not connected, ${at(st.local)}`;
  const c = st.conn;
  return `${fam} ${stateName(c.state)} ${at(st.local)} -> ${at(c.remote)}${c.outside ? ' (peer outside the subtree)' : ''}, ${Buffer.from(c.inq, 'base64').length} bytes unread, ${Buffer.from(c.outq, 'base64').length} to send (${c.unsent} never sent)`;
}
