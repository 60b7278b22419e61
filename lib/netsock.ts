/**
 * Network sockets as the supervisor reads them: typed FFI for the socket
 * calls libc.ts does not have (getsockopt, getsockname, getpeername,
 * recvfrom, sendto), and the sock_diag dumps of inet (UDP, UDP-Lite, raw)
 * and packet sockets, which tell what no getsockopt does (a UDP socket's
 * shutdown state, a packet socket's rings, multicast list and fanout).
 * No policy here: syscalls/resources/netdgram.ts decides what is kept.
 */
import koffi from 'koffi';
import { errnoNow } from './libc.js';
import { CkptError } from './errors.js';
import { diagDump } from './sockdiag.js';

const libc = koffi.load('libc.so.6');
const _getsockopt = libc.func('int getsockopt(int fd, int level, int name, _Inout_ void *val, _Inout_ uint32_t *len)');
const _getsockname = libc.func('int getsockname(int fd, _Inout_ void *addr, _Inout_ uint32_t *len)');
const _getpeername = libc.func('int getpeername(int fd, _Inout_ void *addr, _Inout_ uint32_t *len)');
const _recvfrom = libc.func('intptr_t recvfrom(int fd, _Inout_ void *buf, size_t len, int flags, _Inout_ void *addr, _Inout_ uint32_t *alen)');
const _sendto = libc.func('intptr_t sendto(int fd, void *buf, size_t len, int flags, void *addr, uint32_t alen)');
const _setsockopt = libc.func('int setsockopt(int fd, int level, int name, void *val, uint32_t len)');
const _mmap = libc.func('uintptr_t mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, intptr_t off)');
const _munmap = libc.func('int munmap(uintptr_t addr, size_t len)');
const _memcpy = libc.func('void *memcpy(_Out_ uint8_t *dst, uintptr_t src, size_t len)');
const _memcpyTo = libc.func('void *memcpy(uintptr_t dst, uint8_t *src, size_t len)');
const _recvmsg = libc.func('intptr_t recvmsg(int fd, uintptr_t msg, int flags)');

/** Room recvmsgNative lays out: msghdr, name, iovec, control, then the data. */
const MSG_AT = 0, NAME_AT = 64, IOV_AT = 192, CTL_AT = 256, CTL_LEN = 1024, DATA_AT = 2048, DATA_LEN = 65536;

/**
 * recvmsg (for MSG_PEEK) with the source address and the control messages:
 * bytes (or -errno), source, and each cmsg's level, type and data.
 * msghdr holds pointers, so it is laid out in memory of koffi's own.
 */
export function recvmsgFull(fd: number, flags: number): { n: number; data: Buffer; from: Buffer; cmsgs: { level: number; type: number; data: Buffer }[] } {
  const mem = koffi.alloc('uint8_t', DATA_AT + DATA_LEN);
  const base = BigInt(koffi.address(mem));
  try {
    const hdr = Buffer.alloc(56);
    hdr.writeBigUInt64LE(base + BigInt(NAME_AT), 0);
    hdr.writeUInt32LE(128, 8);
    hdr.writeBigUInt64LE(base + BigInt(IOV_AT), 16);
    hdr.writeBigUInt64LE(1n, 24);
    hdr.writeBigUInt64LE(base + BigInt(CTL_AT), 32);
    hdr.writeBigUInt64LE(BigInt(CTL_LEN), 40);
    const iov = Buffer.alloc(16);
    iov.writeBigUInt64LE(base + BigInt(DATA_AT), 0);
    iov.writeBigUInt64LE(BigInt(DATA_LEN), 8);
    _memcpyTo(base + BigInt(MSG_AT), hdr, hdr.length);
    _memcpyTo(base + BigInt(IOV_AT), iov, iov.length);
    const n = Number(_recvmsg(fd, base + BigInt(MSG_AT), flags));
    if (n < 0) return { n: -errnoNow(), data: Buffer.alloc(0), from: Buffer.alloc(0), cmsgs: [] };
    const back = Buffer.alloc(56);
    _memcpy(back, base + BigInt(MSG_AT), 56);
    const namelen = Math.min(back.readUInt32LE(8), 128), ctllen = Math.min(Number(back.readBigUInt64LE(40)), CTL_LEN);
    const from = Buffer.alloc(namelen), ctl = Buffer.alloc(ctllen), data = Buffer.alloc(Math.min(n, DATA_LEN));
    if (namelen) _memcpy(from, base + BigInt(NAME_AT), namelen);
    if (ctllen) _memcpy(ctl, base + BigInt(CTL_AT), ctllen);
    if (data.length) _memcpy(data, base + BigInt(DATA_AT), data.length);
    const cmsgs: { level: number; type: number; data: Buffer }[] = [];
    for (let o = 0; o + 16 <= ctl.length; ) {
      const len = Number(ctl.readBigUInt64LE(o));
      if (len < 16 || o + len > ctl.length) break;
      cmsgs.push({ level: ctl.readInt32LE(o + 8), type: ctl.readInt32LE(o + 12), data: Buffer.from(ctl.subarray(o + 16, o + len)) });
      o += (len + 7) & ~7;
    }
    return { n, data, from, cmsgs };
  } finally {
    koffi.free(mem);
  }
}

/**
 * Read `len` bytes of what mmap of `fd` maps (a packet socket's rings), by
 * mapping it in the supervisor for the moment; undefined if it cannot.
 */
export function readMapped(fd: number, len: number): Buffer | undefined {
  const at = BigInt(_mmap(0, len, 1 /* PROT_READ */, 1 /* MAP_SHARED */, fd, 0) as number | bigint);
  if (at === 0xffffffffffffffffn || at === -1n) return undefined;
  try {
    const b = Buffer.alloc(len);
    _memcpy(b, at, len);
    return b;
  } finally {
    _munmap(at, len);
  }
}

/** getsockopt into a buffer of `size` bytes: the bytes the kernel gave, or the errno. */
export function getsockopt(fd: number, level: number, name: number, size = 4): Buffer | number {
  const b = Buffer.alloc(size);
  const len = [size];
  if ((_getsockopt(fd, level, name, b, len) as number) !== 0) return errnoNow();
  return b.subarray(0, Math.min(len[0], size));
}

/** getsockopt whose buffer carries input too (MCAST_MSFILTER): the bytes the kernel gave back, or the errno. */
export function getsockoptWith(fd: number, level: number, name: number, inout: Buffer): Buffer | number {
  const b = Buffer.from(inout);
  const len = [b.length];
  if ((_getsockopt(fd, level, name, b, len) as number) !== 0) return errnoNow();
  return b.subarray(0, Math.min(len[0], b.length));
}

export function getsockoptInt(fd: number, level: number, name: number): number | undefined {
  const b = getsockopt(fd, level, name, 4);
  return typeof b === 'number' || b.length < 4 ? undefined : b.readInt32LE(0);
}

export function setsockopt(fd: number, level: number, name: number, val: Buffer): number {
  return (_setsockopt(fd, level, name, val, val.length) as number) === 0 ? 0 : errnoNow();
}

/**
 * The classic BPF program attached with SO_ATTACH_FILTER (8 bytes an
 * instruction), if any; 'ebpf' for an eBPF program (SO_ATTACH_BPF). SO_GET_FILTER measures in instructions: given room
 * for none it says how many there are.
 */
export function socketFilter(fd: number): Buffer | undefined | 'ebpf' {
  const len = [0];
  // EACCES: a filter with no classic program behind it (SO_ATTACH_BPF).
  if ((_getsockopt(fd, 1, 26, Buffer.alloc(8), len) as number) !== 0) return errnoNow() === 13 ? 'ebpf' : undefined;
  if (!len[0]) return undefined;
  const b = Buffer.alloc(len[0] * 8);
  const l = [len[0]];
  if ((_getsockopt(fd, 1, 26, b, l) as number) !== 0) return undefined;
  return b.subarray(0, l[0] * 8);
}

/** The socket's own address (getsockname), or undefined. */
export function sockname(fd: number): Buffer | undefined {
  const b = Buffer.alloc(128);
  const len = [128];
  return (_getsockname(fd, b, len) as number) === 0 ? Buffer.from(b.subarray(0, len[0])) : undefined;
}

/** Its peer's (getpeername), or undefined when not connected. */
export function peername(fd: number): Buffer | undefined {
  const b = Buffer.alloc(128);
  const len = [128];
  return (_getpeername(fd, b, len) as number) === 0 ? Buffer.from(b.subarray(0, len[0])) : undefined;
}

/** recvfrom: bytes (or -errno) and the source address. */
export function recvfrom(fd: number, buf: Buffer, flags: number): { n: number; from: Buffer } {
  const a = Buffer.alloc(128);
  const alen = [128];
  const n = Number(_recvfrom(fd, buf, buf.length, flags, a, alen));
  return { n: n < 0 ? -errnoNow() : n, from: Buffer.from(a.subarray(0, Math.min(alen[0], 128))) };
}

/** sendto: bytes sent or -errno. */
export function sendto(fd: number, buf: Buffer, flags: number, to: Buffer): number {
  const n = Number(_sendto(fd, buf, buf.length, flags, to, to.length));
  return n < 0 ? -errnoNow() : n;
}



/** The attributes after a fixed header: type -> payload. */
function attrs(msg: Buffer, from: number): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (let a = from; a + 4 <= msg.length; ) {
    const alen = msg.readUInt16LE(a), atype = msg.readUInt16LE(a + 2);
    if (alen < 4) break;
    m.set(atype & 0x3fff, msg.subarray(a + 4, a + alen));
    a += (alen + 3) & ~3;
  }
  return m;
}

export interface InetDiag {
  ino: number;
  state: number;
  sport: number;
  dport: number;
  /** Bound device (SO_BINDTODEVICE), 0: none. */
  ifindex: number;
  rqueue: number;
  wqueue: number;
  /** sk_shutdown (1 receive, 2 send). */
  shutdown: number;
  src: Buffer;
  dst: Buffer;
}

const INET_DIAG_SHUTDOWN = 8;

/**
 * Every inet socket of one family and protocol (IPPROTO_UDP, IPPROTO_UDPLITE,
 * IPPROTO_RAW: raw sockets of every protocol, IPPROTO_ICMP: ping sockets are
 * not dumped by any diag module), by inode. A dump the kernel does not offer
 * (its diag module absent) is an empty map.
 */
export function inetSockets(family: number, protocol: number): Map<number, InetDiag> {
  const body = Buffer.alloc(56);
  body.writeUInt8(family, 0);
  body.writeUInt8(protocol, 1);
  body.writeUInt8(protocol === 255 ? 255 : 0, 3); // sdiag_raw_protocol: every one
  body.writeUInt32LE(0xffffffff, 4);
  const out = new Map<number, InetDiag>();
  let msgs: Buffer[];
  try {
    msgs = diagDump(body);
  } catch (e) {
    if (e instanceof CkptError && (e.errno === 2 || e.errno === 22 || e.errno === 95)) return out; // ENOENT/EINVAL/EOPNOTSUPP: no such dump
    throw e;
  }
  for (const m of msgs) {
    if (m.length < 72) continue;
    const a = attrs(m, 72);
    out.set(m.readUInt32LE(68), {
      state: m.readUInt8(1), sport: m.readUInt16BE(4), dport: m.readUInt16BE(6),
      src: Buffer.from(m.subarray(8, 24)), dst: Buffer.from(m.subarray(24, 40)), ifindex: m.readUInt32LE(40),
      rqueue: m.readUInt32LE(56), wqueue: m.readUInt32LE(60), ino: m.readUInt32LE(68),
      shutdown: a.get(INET_DIAG_SHUTDOWN)?.readUInt8(0) ?? 0,
    });
  }
  return out;
}

export interface PacketDiag {
  ino: number;
  type: number;
  /** The protocol it receives (network order, as socket() was given it). */
  num: number;
  info?: { ifindex: number; version: number; reserve: number; copyThresh: number; tstamp: number; flags: number };
  /** PACKET_ADD_MEMBERSHIP entries: ifindex, count, type, address. */
  mclist: { ifindex: number; count: number; type: number; addr: Buffer }[];
  /** packet_diag_ring: block size, block count, frame size, frame count, retire timeout, private size, features. */
  rxRing?: number[];
  txRing?: number[];
  fanout?: number;
  filter: boolean;
}

const AF_PACKET = 17;
const PACKET_SHOW_INFO = 1, PACKET_SHOW_MCLIST = 2, PACKET_SHOW_RING_CFG = 4, PACKET_SHOW_FANOUT = 8, PACKET_SHOW_FILTER = 0x20;

const ring = (b?: Buffer) => (b && b.length >= 28 ? [0, 1, 2, 3, 4, 5, 6].map((i) => b.readUInt32LE(4 * i)) : undefined);

/** Every packet socket, by inode. */
export function packetSockets(): Map<number, PacketDiag> {
  const body = Buffer.alloc(20);
  body.writeUInt8(AF_PACKET, 0);
  body.writeUInt32LE(PACKET_SHOW_INFO | PACKET_SHOW_MCLIST | PACKET_SHOW_RING_CFG | PACKET_SHOW_FANOUT | PACKET_SHOW_FILTER, 8);
  const out = new Map<number, PacketDiag>();
  for (const m of diagDump(body)) {
    if (m.length < 16) continue;
    const a = attrs(m, 16);
    const i = a.get(0);
    const mc = a.get(1);
    const mclist: PacketDiag['mclist'] = [];
    for (let o = 0; mc && o + 44 <= mc.length; o += 44) {
      const alen = mc.readUInt16LE(o + 10);
      mclist.push({ ifindex: mc.readUInt32LE(o), count: mc.readUInt32LE(o + 4), type: mc.readUInt16LE(o + 8), addr: Buffer.from(mc.subarray(o + 12, o + 12 + Math.min(alen, 32))) });
    }
    out.set(m.readUInt32LE(4), {
      ino: m.readUInt32LE(4), type: m.readUInt8(1), num: m.readUInt16LE(2),
      info: i && i.length >= 24 ? { ifindex: i.readUInt32LE(0), version: i.readUInt32LE(4), reserve: i.readUInt32LE(8), copyThresh: i.readUInt32LE(12), tstamp: i.readUInt32LE(16), flags: i.readUInt32LE(20) } : undefined,
      mclist, rxRing: ring(a.get(2)), txRing: ring(a.get(3)), fanout: a.get(4)?.readUInt32LE(0), filter: (a.get(7)?.length ?? 0) > 0,
    });
  }
  return out;
}
