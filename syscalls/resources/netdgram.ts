/**
 * Network sockets other than TCP and unix: UDP and UDP-Lite (IPv4, IPv6),
 * ICMP ping sockets, raw sockets, packet sockets and netlink sockets.
 * files.ts hands every socket sock_diag does not call a unix socket to
 * captureNetSock, and makes each one again with makeNetSock.
 *
 * Kept: family, type, protocol; the bound address (a port the kernel chose
 * is bound again explicitly), the connected peer, socket options that differ
 * from a fresh socket's of the same kind (read back with getsockopt, set
 * again in the restored task, so with its permissions: SO_MARK, a
 * SO_PRIORITY above 6 or a buffer above the sysctl limits need what they
 * needed then), a classic BPF filter (SO_ATTACH_FILTER) and its lock, the
 * shutdown state, and per kind:
 * - UDP, UDP-Lite, ping: the datagrams queued to read, with their source
 *   addresses, in order. Peeked at without reading them (SO_PEEK_OFF). At
 *   restore they are sent again by the supervisor from a raw socket whose
 *   packets carry the original source address and port, over loopback to
 *   the restored socket, before it connects (a connected socket takes only
 *   its peer's). Then the restored queue is peeked at again and compared:
 *   datagrams that did not come back as they were (data, source) fail the
 *   restart (EOPNOTSUPP) rather than give the program a wrong source. A
 *   source that loopback cannot reproduce is refused at the checkpoint: a
 *   link-local IPv6 source (its scope is the interface it came in by). So
 *   is a queue on a port another socket shares (where a datagram goes among
 *   them is the kernel's choice). A datagram corked or held by MSG_MORE and
 *   not sent yet is refused (it cannot be read back).
 * - packet sockets: the protocol, the interface bound to (by name: its
 *   index is looked up again at restore), PACKET_* options, memberships
 *   (PACKET_ADD_MEMBERSHIP); mmapped rings (PACKET_RX_RING, PACKET_TX_RING)
 *   and BPF-steered fanout groups are refused; packets queued to read are
 *   dropped, with a log line (link traffic, which a link may drop anyway).
 * - raw sockets: protocol, IP_HDRINCL, ICMP_FILTER, IPV6_CHECKSUM,
 *   ICMPV6_FILTER; a packet queued to read is refused.
 * - netlink sockets: protocol, the port id (a port id taken at restart:
 *   EBUSY), every multicast group, the connected destination, NETLINK_*
 *   options. Messages queued to read are dropped: they are answers and
 *   notifications of a kernel state that a restart does not bring back.
 * Refused by name: TCP and other stream or seqpacket sockets (SCTP, MPTCP),
 * SOCK_PACKET, any other family, a socket of another network namespace, a
 * socket also held by a process outside the subtree.
 *
 * Rights: every socket is made by the restored task itself, so it gets a raw
 * or packet socket only with CAP_NET_RAW, a ping socket only inside
 * net.ipv4.ping_group_range: EPERM otherwise.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { logError } from '../../lib/log.js';
import { sys, SYS } from '../../lib/libc.js';
import { getsockopt, getsockoptInt, sockname, peername, recvfrom, recvmsgFull, sendto, socketFilter, getsockoptWith, readMapped, inetSockets, packetSockets, type PacketDiag } from '../../lib/netsock.js';
import { CallBatch, type Remote } from '../../supervisor/remote.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { z, int, u32, base64, MANY, type Same } from '../../lib/schema.js';

export const AF_INET = 2, AF_INET6 = 10, AF_NETLINK = 16, AF_PACKET = 17;
const SOCK_STREAM = 1, SOCK_DGRAM = 2, SOCK_RAW = 3, SOCK_SEQPACKET = 5, SOCK_PACKET = 10, SOCK_CLOEXEC = 0o2000000;
const IPPROTO_ICMP = 1, IPPROTO_UDP = 17, IPPROTO_ICMPV6 = 58, IPPROTO_UDPLITE = 136, IPPROTO_RAW = 255;
const SOL_SOCKET = 1, SOL_IP = 0, SOL_IPV6 = 41, SOL_RAW = 255, SOL_ICMPV6 = 58, SOL_PACKET = 263, SOL_NETLINK = 270;
const SO_DOMAIN = 39, SO_TYPE = 3, SO_PROTOCOL = 38, SO_PEEK_OFF = 42, SO_ATTACH_FILTER = 26, SO_LOCK_FILTER = 44, SO_BINDTODEVICE = 25;
const SO_SNDBUF = 7, SO_RCVBUF = 8, SO_SNDBUFFORCE = 32, SO_RCVBUFFORCE = 33;
const MSG_PEEK = 2, MSG_DONTWAIT = 0x40, MSG_TRUNC = 0x20;
const SIOCGSKNS = 0x894cn, SIOCOUTQ = 0x5411n;
const SYS_socket = 41, SYS_connect = 42, SYS_shutdown = 48, SYS_bind = 49, SYS_setsockopt = 54;
const EADDRINUSE = 98, ENOTCONN = 107, EPERM = 1, EACCES = 13;
const PACKET_ADD_MEMBERSHIP = 1, PACKET_COPY_THRESH = 7, PACKET_RX_RING = 5, PACKET_TX_RING = 13, PACKET_FANOUT = 18, NETLINK_ADD_MEMBERSHIP = 1, NETLINK_LIST_MEMBERSHIPS = 9;
const UDP_CORK = 1, IP_PKTINFO = 8, IPV6_RECVPKTINFO = 49, IPV6_PKTINFO = 50;
/** Classic BPF instructions kept (the program is an argument of one injected call, in one scratch page). */
const MAX_FILTER = 256;

const familyNames: Record<number, string> = {
  3: 'AF_AX25', 4: 'AF_IPX', 5: 'AF_APPLETALK', 8: 'AF_ATMPVC', 9: 'AF_X25', 15: 'AF_KEY', 20: 'AF_ATMSVC', 21: 'AF_RDS', 24: 'AF_PPPOX',
  26: 'AF_LLC', 27: 'AF_IB', 28: 'AF_MPLS', 29: 'AF_CAN', 30: 'AF_TIPC', 31: 'AF_BLUETOOTH', 33: 'AF_RXRPC', 35: 'AF_PHONET', 36: 'AF_IEEE802154',
  38: 'AF_ALG', 39: 'AF_NFC', 40: 'AF_VSOCK', 41: 'AF_KCM', 42: 'AF_QIPCRTR', 43: 'AF_SMC', 44: 'AF_XDP', 45: 'AF_MCTP',
};
const protoNames: Record<number, string> = { 6: 'TCP', 132: 'SCTP', 262: 'MPTCP', 17: 'UDP', 136: 'UDP-Lite', 1: 'ICMP', 58: 'ICMPv6' };

/**
 * The options kept, by level: [name, bytes getsockopt gives]. Only those
 * that differ from a fresh socket's are recorded, so nothing is set at
 * restore that the program did not set (some need privileges to set at all).
 * Order matters where the kernel cares (PACKET_VERSION before PACKET_RESERVE).
 */
const SOCKET_OPTS: [number, number][] = [
  [1, 4] /* SO_DEBUG */, [2, 4] /* SO_REUSEADDR */, [5, 4] /* SO_DONTROUTE */, [6, 4] /* SO_BROADCAST */, [SO_SNDBUF, 4], [SO_RCVBUF, 4],
  [9, 4] /* SO_KEEPALIVE */, [10, 4] /* SO_OOBINLINE */, [11, 4] /* SO_NO_CHECK */, [12, 4] /* SO_PRIORITY */, [13, 8] /* SO_LINGER */,
  [15, 4] /* SO_REUSEPORT */, [16, 4] /* SO_PASSCRED */, [18, 4] /* SO_RCVLOWAT */, [20, 16] /* SO_RCVTIMEO_OLD */, [21, 16] /* SO_SNDTIMEO_OLD */,
  [SO_BINDTODEVICE, 16], [29, 4] /* SO_TIMESTAMP_OLD */, [34, 4] /* SO_PASSSEC */, [35, 4] /* SO_TIMESTAMPNS_OLD */, [36, 4] /* SO_MARK */,
  [37, 8] /* SO_TIMESTAMPING_OLD */, [40, 4] /* SO_RXQ_OVFL */, [41, 4] /* SO_WIFI_STATUS */, [43, 4] /* SO_NOFCS */, [45, 4] /* SO_SELECT_ERR_QUEUE */,
  [46, 4] /* SO_BUSY_POLL */, [47, 8] /* SO_MAX_PACING_RATE */, [60, 4] /* SO_ZEROCOPY */, [61, 8] /* SO_TXTIME */,
  [63, 4] /* SO_TIMESTAMP_NEW */, [64, 4] /* SO_TIMESTAMPNS_NEW */, [65, 8] /* SO_TIMESTAMPING_NEW */, [69, 4] /* SO_PREFER_BUSY_POLL */,
  [70, 4] /* SO_BUSY_POLL_BUDGET */, [75, 4] /* SO_RCVMARK */, [76, 4] /* SO_PASSPIDFD */, [SO_PEEK_OFF, 4], [SO_LOCK_FILTER, 4],
];
const IP_OPTS: [number, number][] = [
  [1, 4] /* IP_TOS */, [2, 4] /* IP_TTL */, [3, 4] /* IP_HDRINCL */, [4, 40] /* IP_OPTIONS */, [6, 4] /* IP_RECVOPTS */, [7, 4] /* IP_RETOPTS */,
  [8, 4] /* IP_PKTINFO */, [10, 4] /* IP_MTU_DISCOVER */, [11, 4] /* IP_RECVERR */, [12, 4] /* IP_RECVTTL */, [13, 4] /* IP_RECVTOS */,
  [15, 4] /* IP_FREEBIND */, [18, 4] /* IP_PASSSEC */, [19, 4] /* IP_TRANSPARENT */, [20, 4] /* IP_RECVORIGDSTADDR */, [21, 4] /* IP_MINTTL */,
  [22, 4] /* IP_NODEFRAG */, [23, 4] /* IP_CHECKSUM */, [24, 4] /* IP_BIND_ADDRESS_NO_PORT */, [25, 4] /* IP_RECVFRAGSIZE */,
  [26, 4] /* IP_RECVERR_RFC4884 */, [32, 4] /* IP_MULTICAST_IF */, [33, 4] /* IP_MULTICAST_TTL */, [34, 4] /* IP_MULTICAST_LOOP */,
  [49, 4] /* IP_MULTICAST_ALL */, [50, 4] /* IP_UNICAST_IF */, [51, 4] /* IP_LOCAL_PORT_RANGE */,
];
const IPV6_OPTS: [number, number][] = [
  [26, 4] /* IPV6_V6ONLY */, [16, 4] /* IPV6_UNICAST_HOPS */, [17, 4] /* IPV6_MULTICAST_IF */, [18, 4] /* IPV6_MULTICAST_HOPS */,
  [19, 4] /* IPV6_MULTICAST_LOOP */, [22, 4] /* IPV6_ROUTER_ALERT */, [23, 4] /* IPV6_MTU_DISCOVER */, [25, 4] /* IPV6_RECVERR */,
  [29, 4] /* IPV6_MULTICAST_ALL */, [36, 4] /* IPV6_HDRINCL */, [49, 4] /* IPV6_RECVPKTINFO */, [51, 4] /* IPV6_RECVHOPLIMIT */,
  [53, 4] /* IPV6_RECVHOPOPTS */, [56, 4] /* IPV6_RECVRTHDR */, [58, 4] /* IPV6_RECVDSTOPTS */, [60, 4] /* IPV6_RECVPATHMTU */,
  [62, 4] /* IPV6_DONTFRAG */, [66, 4] /* IPV6_RECVTCLASS */, [67, 4] /* IPV6_TCLASS */, [70, 4] /* IPV6_AUTOFLOWLABEL */,
  [72, 4] /* IPV6_ADDR_PREFERENCES */, [73, 4] /* IPV6_MINHOPCOUNT */, [74, 4] /* IPV6_RECVORIGDSTADDR */, [75, 4] /* IPV6_TRANSPARENT */,
  [76, 4] /* IPV6_UNICAST_IF */, [77, 4] /* IPV6_RECVFRAGSIZE */, [78, 4] /* IPV6_FREEBIND */, [7, 4] /* IPV6_CHECKSUM (raw) */,
];
const UDP_OPTS: [number, number][] = [[UDP_CORK, 4], [100, 4] /* UDP_ENCAP */, [101, 4] /* UDP_NO_CHECK6_TX */, [102, 4] /* UDP_NO_CHECK6_RX */, [103, 4] /* UDP_SEGMENT */, [104, 4] /* UDP_GRO */];
const UDPLITE_OPTS: [number, number][] = [[10, 4] /* UDPLITE_SEND_CSCOV */, [11, 4] /* UDPLITE_RECV_CSCOV */];
const PACKET_OPTS: [number, number][] = [
  [10, 4] /* PACKET_VERSION */, [12, 4] /* PACKET_RESERVE */, [8, 4] /* PACKET_AUXDATA */, [9, 4] /* PACKET_ORIGDEV */, [14, 4] /* PACKET_LOSS */,
  [15, 4] /* PACKET_VNET_HDR */, [24, 4] /* PACKET_VNET_HDR_SZ */, [17, 4] /* PACKET_TIMESTAMP */, [19, 4] /* PACKET_TX_HAS_OFF */,
  [20, 4] /* PACKET_QDISC_BYPASS */, [23, 4] /* PACKET_IGNORE_OUTGOING */,
];
const NETLINK_OPTS: [number, number][] = [[3, 4] /* PKTINFO */, [4, 4] /* BROADCAST_ERROR */, [5, 4] /* NO_ENOBUFS */, [8, 4] /* LISTEN_ALL_NSID */, [10, 4] /* CAP_ACK */, [11, 4] /* EXT_ACK */, [12, 4] /* GET_STRICT_CHK */];

/**
 * The option levels that apply to a kind of socket. SOL_SOCKET last: IP_TOS
 * also sets SO_PRIORITY, so the priority read back is set after it.
 * (SO_INCOMING_CPU is left out: the kernel sets it on every receive.)
 */
/** The schema of a socket's options as captureSockOpts gives them. */
export const sockOptsSchema = z.array(z.strictObject({ level: int(0, 65535), name: int(0, 255), val: base64(40) })).max(128);

const AF_UNIX = 1;
/** Those a unix socket has (buffers, timeouts, what it is told of each message, its own peek offset). */
const UNIX_OPTS: [number, number][] = [
  [SO_SNDBUF, 4], [SO_RCVBUF, 4], [12, 4] /* SO_PRIORITY */, [16, 4] /* SO_PASSCRED */, [18, 4] /* SO_RCVLOWAT */,
  [20, 16] /* SO_RCVTIMEO_OLD */, [21, 16] /* SO_SNDTIMEO_OLD */, [29, 4] /* SO_TIMESTAMP_OLD */, [34, 4] /* SO_PASSSEC */,
  [35, 4] /* SO_TIMESTAMPNS_OLD */, [40, 4] /* SO_RXQ_OVFL */, [SO_PEEK_OFF, 4], [76, 4] /* SO_PASSPIDFD */,
];

function optionTable(family: number, type: number, protocol: number): [number, [number, number][]][] {
  if (family === AF_UNIX) return [[SOL_SOCKET, UNIX_OPTS]];
  const t: [number, [number, number][]][] = [];
  if (family === AF_INET) t.push([SOL_IP, IP_OPTS]);
  if (family === AF_INET6) t.push([SOL_IPV6, IPV6_OPTS]);
  if ((family === AF_INET || family === AF_INET6) && type === SOCK_DGRAM && (protocol === IPPROTO_UDP || protocol === IPPROTO_UDPLITE)) t.push([protocol, UDP_OPTS]);
  if ((family === AF_INET || family === AF_INET6) && protocol === IPPROTO_UDPLITE) t.push([IPPROTO_UDPLITE, UDPLITE_OPTS]);
  if (family === AF_INET && type === SOCK_RAW && protocol === IPPROTO_ICMP) t.push([SOL_RAW, [[1, 4]]]); // ICMP_FILTER
  if (family === AF_INET6 && type === SOCK_RAW && protocol === IPPROTO_ICMPV6) t.push([SOL_ICMPV6, [[1, 32]]]); // ICMPV6_FILTER
  if (family === AF_PACKET) t.push([SOL_PACKET, PACKET_OPTS]);
  if (family === AF_NETLINK) t.push([SOL_NETLINK, NETLINK_OPTS]);
  t.push([SOL_SOCKET, SOCKET_OPTS]);
  return t;
}

export interface SockOpt { level: number; name: number; val: string }
/** A datagram queued to read: its bytes, its source address (a sockaddr) and the address it came to (4 or 16 bytes), base64. */
export interface QueuedDatagram { data: string; from: string; to?: string }
/** A packet socket's PACKET_ADD_MEMBERSHIP entry. */
export interface PacketMembership { ifname: string; type: number; addr: string; count: number }

/** A multicast group joined on an interface; a source filter unless it is EXCLUDE of none (a plain join). */
export interface McastMembership { ifname: string; group: string; include?: boolean; sources?: string[] }

export interface NetSockState {
  family: number;
  type: number;
  protocol: number;
  /** getsockname (bound, or given a port or port id by the kernel), base64 of the sockaddr. */
  name?: string;
  /** getpeername: the connected peer (a netlink socket's destination). */
  peer?: string;
  opts?: SockOpt[];
  /** SO_ATTACH_FILTER: the classic BPF program (8 bytes an instruction). */
  filter?: string;
  /** sk_shutdown: 1 receive, 2 send. */
  shutdown?: number;
  queue?: QueuedDatagram[];
  /** Packet socket: the interface it is bound to. */
  ifname?: string;
  /** Packet socket: the protocol it receives, when bind changed it from the socket's own. */
  pnum?: number;
  mclist?: PacketMembership[];
  copyThresh?: number;
  /** Netlink: the multicast groups past the first 32 (those are in name). */
  groups?: number[];
  /** IP multicast groups joined (IP_ADD_MEMBERSHIP, MCAST_JOIN_GROUP...), with their source filters. */
  mcast?: McastMembership[];
  /** Packet socket: its PACKET_FANOUT group (id, type, flags as getsockopt gives them). */
  fanout?: number;
  /** Packet socket rings, not mapped: block size, blocks, frame size, frames, retire timeout, private size, features. */
  rxRing?: number[];
  txRing?: number[];
}

const sockaddr = base64(128);
const ifname = z.string().min(1).max(15).regex(/^[^/\s\0]+$/, 'not an interface name');
export const netSockSchema = z.strictObject({
  family: z.union([z.literal(AF_INET), z.literal(AF_INET6), z.literal(AF_NETLINK), z.literal(AF_PACKET)]),
  type: z.union([z.literal(SOCK_DGRAM), z.literal(SOCK_RAW), z.literal(SOCK_PACKET)]),
  protocol: int(0, 65535),
  name: sockaddr.optional(),
  peer: sockaddr.optional(),
  opts: sockOptsSchema.optional(),
  filter: base64(256 * 8).optional(),
  shutdown: int(0, 3).optional(),
  queue: z.array(z.strictObject({ data: base64(65536), from: sockaddr, to: base64(16).optional() })).max(MANY).optional(),
  ifname: ifname.optional(),
  pnum: int(0, 65535).optional(),
  mclist: z.array(z.strictObject({ ifname, type: int(0, 65535), addr: base64(32), count: int(1, 2 ** 31 - 1) })).max(4096).optional(),
  copyThresh: u32.optional(),
  groups: z.array(int(33, 2 ** 31 - 1)).max(4096).optional(),
  fanout: u32.optional(),
  mcast: z.array(z.strictObject({ ifname, group: base64(16), include: z.boolean().optional(), sources: z.array(base64(16)).max(24).optional() })).max(4096).optional(),
  rxRing: z.array(u32).length(7).optional(),
  txRing: z.array(u32).length(7).optional(),
});
const sameNet: Same<z.infer<typeof netSockSchema>, NetSockState> = true;
void sameNet;

// ---------------------------------------------------------------- addresses (shared with other inet modules)

/** An inet sockaddr as text: "1.2.3.4:53", "[::1]:53", with "%scope" when it has one. */
export function inetAddrText(sa: Buffer): string {
  const fam = sa.length >= 2 ? sa.readUInt16LE(0) : 0;
  if (fam === AF_INET && sa.length >= 8) return `${[...sa.subarray(4, 8)].join('.')}:${sa.readUInt16BE(2)}`;
  if (fam === AF_INET6 && sa.length >= 24) {
    const g = [...Array(8).keys()].map((i) => sa.readUInt16BE(8 + 2 * i).toString(16)).join(':');
    const scope = sa.length >= 28 ? sa.readUInt32LE(24) : 0;
    return `[${g}${scope ? `%${scope}` : ''}]:${sa.readUInt16BE(2)}`;
  }
  return `(family ${fam})`;
}

/** An inet sockaddr's parts: family, port, address bytes (4 or 16), v6 scope. */
export function inetAddr(sa: Buffer): { family: number; port: number; addr: Buffer; scope: number } | undefined {
  const family = sa.length >= 2 ? sa.readUInt16LE(0) : 0;
  if (family === AF_INET && sa.length >= 8) return { family, port: sa.readUInt16BE(2), addr: Buffer.from(sa.subarray(4, 8)), scope: 0 };
  if (family === AF_INET6 && sa.length >= 24) return { family, port: sa.readUInt16BE(2), addr: Buffer.from(sa.subarray(8, 24)), scope: sa.length >= 28 ? sa.readUInt32LE(24) : 0 };
  return undefined;
}

/** A sockaddr_in / sockaddr_in6 made of its parts. */
export function makeInetAddr(family: number, addr: Buffer, port: number): Buffer {
  const b = Buffer.alloc(family === AF_INET ? 16 : 28);
  b.writeUInt16LE(family, 0);
  b.writeUInt16BE(port, 2);
  addr.copy(b, family === AF_INET ? 4 : 8);
  return b;
}

const isAny = (a: Buffer) => a.every((x) => x === 0);
const V4MAPPED = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
const isV4Mapped = (a: Buffer) => a.length === 16 && a.subarray(0, 12).equals(V4MAPPED);
const isLinkLocal6 = (a: Buffer) => a.length === 16 && a[0] === 0xfe && (a[1] & 0xc0) === 0x80;

/**
 * Socket options of a socket that differ from `fresh`'s (a new socket of
 * the same kind), in table order. Options the kernel does not give for this
 * socket are left out.
 */
export function captureSockOpts(mine: number, fresh: number | undefined, family: number, type: number, protocol: number): SockOpt[] {
  const out: SockOpt[] = [];
  for (const [level, opts] of optionTable(family, type, protocol)) {
    for (const [name, size] of opts) {
      const v = getsockopt(mine, level, name, size);
      if (typeof v === 'number') continue;
      const d = fresh === undefined ? undefined : getsockopt(fresh, level, name, size);
      if (d !== undefined && typeof d !== 'number' && d.equals(v)) continue;
      if (d === undefined && v.every((x) => x === 0)) continue;
      out.push({ level, name, val: v.toString('base64') });
    }
  }
  return out;
}

/** A known option? (a hostile image names nothing else) */
export function knownOpt(family: number, type: number, protocol: number, o: SockOpt): boolean {
  return optionTable(family, type, protocol).some(([l, opts]) => l === o.level && opts.some(([n]) => n === o.name));
}

function readSysctl(path: string): number {
  try {
    return Number(fs.readFileSync(path, 'utf8').trim());
  } catch {
    return Number.MAX_SAFE_INTEGER;
  }
}

/**
 * The setsockopt calls that give a socket `opts` again, added to a batch.
 * getsockopt gives buffer sizes doubled (what the kernel accounts); one
 * above the sysctl limit was set with the FORCE variant.
 */
export function addSockOpts(b: CallBatch, fd: number | bigint, opts: SockOpt[], what: string): void {
  for (const o of opts) {
    let val = Buffer.from(o.val, 'base64');
    let name = o.name;
    if (o.level === SOL_SOCKET && (name === SO_SNDBUF || name === SO_RCVBUF) && val.length === 4) {
      const half = Math.floor(val.readInt32LE(0) / 2);
      val = Buffer.alloc(4);
      val.writeInt32LE(half, 0);
      const max = readSysctl(`/proc/sys/net/core/${name === SO_SNDBUF ? 'wmem_max' : 'rmem_max'}`);
      if (half > max) name = name === SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE;
    }
    b.add(`${what} setsockopt(${o.level}, ${name})`, SYS_setsockopt, fd, o.level, name, b.put(val), val.length);
  }
}

// ---------------------------------------------------------------- capture

const refuse = (pid: number, fd: number, what: string) => new CkptError(errno('EOPNOTSUPP'), 'checkpoint:netsock', `task ${pid}: fd ${fd} (${what})`);

/** What a socket is, for the log: "UDP socket [::]:5353". */
function describe(family: number, type: number, protocol: number, name?: Buffer): string {
  const fam = family === AF_INET ? 'IPv4' : family === AF_INET6 ? 'IPv6' : family === AF_PACKET ? 'packet' : family === AF_NETLINK ? 'netlink' : familyNames[family] ?? `family ${family}`;
  const kind = type === SOCK_RAW ? `raw (protocol ${protocol})` : protoNames[protocol] ?? `protocol ${protocol}`;
  if (family === AF_PACKET && type === SOCK_PACKET) return 'packet SOCK_PACKET socket';
  const at = name && (family === AF_INET || family === AF_INET6) ? ` ${inetAddrText(name)}` : '';
  return `${fam} ${family === AF_INET || family === AF_INET6 ? kind : family === AF_NETLINK ? `protocol ${protocol}` : type === SOCK_RAW ? 'SOCK_RAW' : 'SOCK_DGRAM'} socket${at}`;
}

/** A kept socket, for `ckpt inspect`. */
export function describeNetSock(s: NetSockState): string {
  const inet = s.family === AF_INET || s.family === AF_INET6;
  const name = s.name ? Buffer.from(s.name, 'base64') : undefined;
  const peer = s.peer ? Buffer.from(s.peer, 'base64') : undefined;
  const nl = (b: Buffer) => `port id ${b.readUInt32LE(4)}, groups 0x${b.readUInt32LE(8).toString(16)}`;
  const at = inet ? (name ? ` bound to ${inetAddrText(name)}` : '') + (peer ? `, connected to ${inetAddrText(peer)}` : '')
    : s.family === AF_NETLINK ? (name ? ` ${nl(name)}` : '') + (peer ? `, destination ${nl(peer)}` : '') + (s.groups ? ` and groups ${s.groups.join(',')}` : '')
      : s.ifname ? ` bound to ${s.ifname}` : '';
  const extra = [s.opts?.length ? `${s.opts.length} options set` : '', s.filter ? 'BPF filter' : '', s.queue?.length ? `${s.queue.length} datagrams queued` : '', s.shutdown ? `shut down ${s.shutdown}` : ''].filter(Boolean);
  return `${describe(s.family, s.type, s.protocol)}${at}${extra.length ? ` (${extra.join('; ')})` : ''}`;
}

/** Does this socket live in the supervisor's network namespace? */
function sameNetns(mine: number): boolean {
  const ns = sys.ioctl(mine, SIOCGSKNS, Buffer.alloc(8));
  if (ns < 0) return true; // no such ioctl: one namespace
  try {
    return fs.fstatSync(ns).ino === fs.statSync('/proc/self/ns/net').ino;
  } finally {
    fs.closeSync(ns);
  }
}

/** A fresh socket of the same kind, to compare options with (a plain UDP one when this kind is not the supervisor's to make). */
function freshLike(family: number, type: number, protocol: number): number | undefined {
  for (const [t, p] of [[type, family === AF_PACKET ? 0 : protocol], [SOCK_DGRAM, family === AF_INET || family === AF_INET6 ? IPPROTO_UDP : protocol]]) {
    try {
      return sys.socket(family, t | SOCK_CLOEXEC, p);
    } catch { /* not ours to make */ }
  }
  return undefined;
}

/**
 * Datagrams queued to read, in order, with their sources and the addresses
 * they came to: peeked at with SO_PEEK_OFF (each peek gives the next one)
 * and IP_PKTINFO / IPV6_RECVPKTINFO (the header's destination), both set
 * back after. undefined: something is queued that cannot be peeked at so.
 */
function peekDatagrams(mine: number, family: number): { data: Buffer; from: Buffer; to?: Buffer }[] | undefined {
  const old = getsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF) ?? -1;
  if (sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, 0) !== 0) return anyQueued(mine) ? undefined : [];
  const [lvl, opt] = family === AF_INET ? [SOL_IP, IP_PKTINFO] : [SOL_IPV6, IPV6_RECVPKTINFO];
  const oldInfo = getsockoptInt(mine, lvl, opt);
  if (oldInfo !== undefined) sys.setsockoptInt(mine, lvl, opt, 1);
  const out: { data: Buffer; from: Buffer; to?: Buffer }[] = [];
  try {
    for (let i = 0; i < MANY; i++) {
      const r = recvmsgFull(mine, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC);
      if (r.n < 0) break; // EAGAIN: all of it
      const v4 = r.cmsgs.find((c) => c.level === SOL_IP && c.type === IP_PKTINFO && c.data.length >= 12);
      const v6 = r.cmsgs.find((c) => c.level === SOL_IPV6 && c.type === IPV6_PKTINFO && c.data.length >= 16);
      const to = v4 ? Buffer.from(v4.data.subarray(8, 12)) : v6 ? Buffer.from(v6.data.subarray(0, 16)) : undefined;
      out.push({ data: r.data, from: r.from, ...(to ? { to } : {}) });
    }
  } finally {
    sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, old);
    if (oldInfo !== undefined) sys.setsockoptInt(mine, lvl, opt, oldInfo);
  }
  return out;
}

/** Is anything queued to read? (one peek, nothing taken) */
function anyQueued(mine: number): boolean {
  return recvfrom(mine, Buffer.alloc(1), MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC).n >= 0;
}

function ifName(index: number): string | undefined {
  try {
    for (const n of fs.readdirSync('/sys/class/net')) if (Number(fs.readFileSync(`/sys/class/net/${n}/ifindex`, 'utf8')) === index) return n;
  } catch { /* no sysfs */ }
  return undefined;
}

function ifIndex(name: string): number | undefined {
  try {
    return Number(fs.readFileSync(`/sys/class/net/${name}/ifindex`, 'utf8'));
  } catch {
    return undefined;
  }
}

/** Diag dumps read once per checkpoint. */
export class NetDiag {
  private inet = new Map<string, Map<number, import('../../lib/netsock.js').InetDiag>>();
  private packet?: Map<number, PacketDiag>;
  inetOf(family: number, protocol: number) {
    const k = `${family}:${protocol}`;
    let m = this.inet.get(k);
    if (!m) this.inet.set(k, (m = inetSockets(family, protocol)));
    return m;
  }
  packets() {
    return (this.packet ??= packetSockets());
  }
  private mc = new Map<number, ReturnType<typeof multicastGroups>>();
  groups(family: number) {
    let g = this.mc.get(family);
    if (!g) this.mc.set(family, (g = multicastGroups(family)));
    return g;
  }
}

/**
 * One network socket (not unix) of a frozen task, or a refusal naming it.
 * `ino` is its inode; `diag` caches the sock_diag dumps of one checkpoint.
 */
export function captureNetSock(pid: number, fd: number, ino: number, diag: NetDiag): NetSockState {
  return withTraceeFd(pid, fd, 'checkpoint:netsock', (mine) => {
    const family = getsockoptInt(mine, SOL_SOCKET, SO_DOMAIN) ?? -1;
    const type = getsockoptInt(mine, SOL_SOCKET, SO_TYPE) ?? -1;
    const protocol = getsockoptInt(mine, SOL_SOCKET, SO_PROTOCOL) ?? -1;
    const nameBuf = sockname(mine);
    const what = describe(family, type, protocol, nameBuf);
    if (family !== AF_INET && family !== AF_INET6 && family !== AF_PACKET && family !== AF_NETLINK) throw refuse(pid, fd, `socket:[${ino}]: a ${familyNames[family] ?? `family ${family}`} socket: not supported`);
    if (type === SOCK_STREAM || type === SOCK_SEQPACKET) throw refuse(pid, fd, `socket:[${ino}]: ${what}: ${protocol === 6 || protocol === 0 ? 'TCP sockets are' : 'stream and seqpacket sockets of this protocol are'} not supported yet`);
    if (type === SOCK_PACKET && family !== AF_PACKET) throw refuse(pid, fd, `socket:[${ino}]: a SOCK_PACKET socket of family ${family}: not supported`);
    if (type !== SOCK_DGRAM && type !== SOCK_RAW && type !== SOCK_PACKET) throw refuse(pid, fd, `socket:[${ino}]: ${what} of type ${type}: not supported`);
    if (!sameNetns(mine)) throw refuse(pid, fd, `socket:[${ino}]: ${what} of another network namespace: not supported`);
    const s: NetSockState = { family, type, protocol };
    const fresh = freshLike(family, type, protocol);
    try {
      s.opts = captureSockOpts(mine, fresh, family, type, protocol);
    } finally {
      if (fresh !== undefined) fs.closeSync(fresh);
    }
    const filter = socketFilter(mine);
    if (filter === 'ebpf') throw refuse(pid, fd, `socket:[${ino}]: ${what}: an eBPF socket filter (SO_ATTACH_BPF): not supported`);
    if (filter && filter.length > MAX_FILTER * 8) throw refuse(pid, fd, `socket:[${ino}]: ${what}: a socket filter of ${filter.length / 8} instructions (up to ${MAX_FILTER} are kept)`);
    if (filter) s.filter = filter.toString('base64');
    // An error not yet read (an ICMP error on a connected socket, IP_RECVERR's queue) shows as POLLERR and cannot be read without taking it.
    if (family !== AF_NETLINK && sys.pollOne(mine, 0, 0) & 8) throw refuse(pid, fd, `socket:[${ino}]: ${what}: an error not yet read (SO_ERROR or the error queue): not supported`);
    const peerBuf = peername(mine);
    if (family === AF_INET || family === AF_INET6) captureInet(pid, fd, mine, s, what, nameBuf, peerBuf, ino, diag);
    else if (family === AF_PACKET) capturePacket(pid, fd, mine, s, what, nameBuf, ino, diag);
    else captureNetlink(mine, s, nameBuf, peerBuf);
    if (!s.opts?.length) delete s.opts;
    return s;
  }, 'socket fd');
}

function captureInet(pid: number, fd: number, mine: number, s: NetSockState, what: string, nameBuf: Buffer | undefined, peerBuf: Buffer | undefined, ino: number, diag: NetDiag): void {
  let mc: McastMembership[];
  try {
    mc = captureMemberships(mine, s.family, diag);
  } catch (e) {
    throw e instanceof CkptError ? refuse(pid, fd, `socket:[${ino}]: ${what}: ${e.detail}`) : e;
  }
  if (mc.length) s.mcast = mc;
  const name = nameBuf && inetAddr(nameBuf);
  if (name && (name.port || !isAny(name.addr))) s.name = nameBuf!.toString('base64');
  const peer = peerBuf && inetAddr(peerBuf);
  if (peer && (peer.port || !isAny(peer.addr))) s.peer = peerBuf!.toString('base64');
  const dgram = s.type === SOCK_DGRAM;
  const ping = dgram && (s.protocol === IPPROTO_ICMP || s.protocol === IPPROTO_ICMPV6);
  // Shutdown: only sock_diag tells (UDP, UDP-Lite, raw); ping sockets have no dump, and keep it by poll bits below.
  const dumpProto = s.type === SOCK_RAW ? IPPROTO_RAW : s.protocol;
  const d = dumpProto === IPPROTO_UDP || dumpProto === IPPROTO_UDPLITE || dumpProto === IPPROTO_RAW ? diag.inetOf(s.family, dumpProto).get(ino) : undefined;
  // A raw or ping socket connected has no port: getpeername says ENOTCONN, sock_diag or /proc/net/icmp tell.
  if (!s.peer && !dgram && d?.state === 1) s.peer = makeInetAddr(s.family, d.dst.subarray(0, s.family === AF_INET ? 4 : 16), 0).toString('base64');
  if (!s.peer && ping) {
    const dst = pingPeer(s.family, ino);
    if (dst) s.peer = makeInetAddr(s.family, dst, 0).toString('base64');
  }
  if (d?.shutdown) s.shutdown = d.shutdown & 3;
  if (!d && (s.protocol === IPPROTO_ICMP || s.protocol === IPPROTO_ICMPV6)) {
    const ev = sys.pollOne(mine, 0x2000 /* POLLRDHUP */, 0);
    if (ev & 0x10 /* POLLHUP: both */) s.shutdown = 3;
    else if (ev & 0x2000) s.shutdown = 1;
  }
  // What is written but not sent: a corked datagram or one held by MSG_MORE (never readable back).
  const outq = Buffer.alloc(4);
  if (dgram && sys.ioctl(mine, SIOCOUTQ, outq) === 0 && outq.readInt32LE(0) > 0) {
    const corked = s.opts?.some((o) => o.level === s.protocol && o.name === UDP_CORK);
    throw refuse(pid, fd, `socket:[${ino}]: ${what}: ${outq.readInt32LE(0)} bytes written but not sent yet (${corked ? 'UDP_CORK' : 'MSG_MORE or in flight'}): not supported`);
  }
  if (!dgram) {
    if (anyQueued(mine)) throw refuse(pid, fd, `socket:[${ino}]: ${what}: packets queued to read on a raw socket: not supported`);
    return;
  }
  // A ping socket cannot be peeked at past its first reply (no SO_PEEK_OFF).
  if (ping) {
    if (anyQueued(mine)) throw refuse(pid, fd, `socket:[${ino}]: ${what}: echo replies queued to read on a ping socket: not supported`);
    return;
  }
  const q = peekDatagrams(mine, s.family);
  if (!q) throw refuse(pid, fd, `socket:[${ino}]: ${what}: datagrams queued that cannot be peeked at (no SO_PEEK_OFF)`);
  if (!q.length) return;
  for (const m of q) {
    const src = inetAddr(m.from);
    if (!src) throw refuse(pid, fd, `socket:[${ino}]: ${what}: a datagram queued from an address of an unknown family`);
    if (src.family === AF_INET6 && (isLinkLocal6(src.addr) || src.scope)) throw refuse(pid, fd, `socket:[${ino}]: ${what}: a datagram queued from the link-local address ${inetAddrText(m.from)}, whose source (its interface) cannot be reproduced`);
  }
  // Where it goes among sockets sharing its port is the kernel's choice: one only.
  if (s.protocol === IPPROTO_UDP || s.protocol === IPPROTO_UDPLITE) {
    const sharer = portSharer(diag, s.protocol, name!.port, ino);
    if (sharer) throw refuse(pid, fd, `socket:[${ino}]: ${what}: datagrams queued on a port that socket:[${sharer}] shares`);
  }
  s.queue = q.map((m) => ({ data: m.data.toString('base64'), from: m.from.toString('base64'), ...(m.to ? { to: m.to.toString('base64') } : {}) }));
}

/**
 * The address a ping socket is connected to, from /proc/net/icmp(6) (state
 * 01, established): addresses there are the kernel's 32-bit words in hex.
 */
function pingPeer(family: number, ino: number): Buffer | undefined {
  let text: string;
  try {
    text = fs.readFileSync(family === AF_INET ? '/proc/net/icmp' : '/proc/net/icmp6', 'utf8');
  } catch {
    return undefined;
  }
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || Number(f[9]) !== ino || f[3] !== '01') continue;
    const hex = f[2].split(':')[0];
    const b = Buffer.alloc(hex.length / 2);
    for (let i = 0; i < hex.length / 8; i++) b.writeUInt32LE(parseInt(hex.slice(i * 8, i * 8 + 8), 16), i * 4);
    return b;
  }
  return undefined;
}

const MCAST_JOIN_GROUP = 42, MCAST_MSFILTER = 48, GF_SLIST = 144, SS = 128;
/** A filter is set again in one call whose argument must fit in the injected calls' scratch page. */
const MAX_SOURCES = 24;

/**
 * The multicast groups a socket joined. No call lists them; the groups
 * joined on each interface are in /proc/net/igmp(6), and MCAST_MSFILTER
 * answers for one group and interface only where this socket joined it
 * (EADDRNOTAVAIL elsewhere), with its filter mode and sources.
 */
function captureMemberships(mine: number, family: number, diag: NetDiag): McastMembership[] {
  const out: McastMembership[] = [];
  const alen = family === AF_INET ? 4 : 16;
  for (const g of diag.groups(family)) {
    const q = Buffer.alloc(GF_SLIST + SS * 64);
    q.writeUInt32LE(g.ifindex, 0);
    makeInetAddr(family, g.addr, 0).copy(q, 8);
    q.writeUInt32LE(64, 140); // room for more sources than are kept
    const r = getsockoptWith(mine, family === AF_INET ? SOL_IP : SOL_IPV6, MCAST_MSFILTER, q);
    if (typeof r === 'number' || r.length < GF_SLIST) continue;
    const include = r.readUInt32LE(136) === 1;
    const n = r.readUInt32LE(140);
    if (n > MAX_SOURCES) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:netsock', `a multicast membership with a filter of ${n} sources (up to ${MAX_SOURCES} are kept)`);
    const sources: string[] = [];
    for (let i = 0; i < n; i++) {
      const a = inetAddr(r.subarray(GF_SLIST + SS * i, GF_SLIST + SS * (i + 1)));
      if (a) sources.push(a.addr.subarray(0, alen).toString('base64'));
    }
    out.push({ ifname: g.ifname, group: g.addr.toString('base64'), ...(include ? { include } : {}), ...(sources.length ? { sources } : {}) });
  }
  return out;
}

/** The multicast groups joined on each interface, from /proc/net/igmp (addresses as host-order hex words) or igmp6. */
function multicastGroups(family: number): { ifindex: number; ifname: string; addr: Buffer }[] {
  const out: { ifindex: number; ifname: string; addr: Buffer }[] = [];
  let text = '';
  try {
    text = fs.readFileSync(family === AF_INET ? '/proc/net/igmp' : '/proc/net/igmp6', 'utf8');
  } catch {
    return out;
  }
  if (family === AF_INET6) {
    for (const l of text.split('\n')) {
      const f = l.trim().split(/\s+/);
      if (f.length >= 3 && /^[0-9a-f]{32}$/.test(f[2])) out.push({ ifindex: Number(f[0]), ifname: f[1], addr: Buffer.from(f[2], 'hex') });
    }
    return out;
  }
  let dev: { ifindex: number; ifname: string } | undefined;
  for (const l of text.split('\n').slice(1)) {
    const m = /^(\d+)\s+(\S+)\s*:/.exec(l);
    if (m) dev = { ifindex: Number(m[1]), ifname: m[2] };
    const g = /^\s+([0-9A-F]{8})\s/.exec(l);
    if (g && dev) {
      const addr = Buffer.alloc(4);
      addr.writeUInt32LE(parseInt(g[1], 16), 0);
      out.push({ ...dev, addr });
    }
  }
  return out;
}

/** Another UDP socket (either family) bound to the same local port, if any. */
function portSharer(diag: NetDiag, protocol: number, port: number, ino: number): number | undefined {
  for (const fam of [AF_INET, AF_INET6]) {
    for (const x of diag.inetOf(fam, protocol).values()) if (x.sport === port && x.ino !== ino) return x.ino;
  }
  return undefined;
}

function capturePacket(pid: number, fd: number, mine: number, s: NetSockState, what: string, nameBuf: Buffer | undefined, ino: number, diag: NetDiag): void {
  const d = diag.packets().get(ino);
  if (!d) throw refuse(pid, fd, `socket:[${ino}]: ${what}: not found by sock_diag (packet_diag)`);
  if (d.rxRing || d.txRing) captureRings(pid, fd, mine, s, d, `socket:[${ino}]: ${what}`, ino);
  if (d.fanout !== undefined) {
    // id | type << 16 | flags << 24, as setsockopt takes it again; the eBPF and cBPF modes carry a program, not kept.
    const f = getsockoptInt(mine, SOL_PACKET, PACKET_FANOUT) ?? 0;
    const type = (f >> 16) & 0xff;
    if (type === 6 || type === 7) throw refuse(pid, fd, `socket:[${ino}]: ${what}: in a PACKET_FANOUT group steered by a BPF program (PACKET_FANOUT_${type === 6 ? 'CBPF' : 'EBPF'}): not supported`);
    if (f) s.fanout = f >>> 0;
  }
  // Frames a packet socket has queued are traffic seen on a link, not state
  // the program made: a busy interface nearly always has some. They are
  // dropped, as a congested link or a full buffer drops them, and said so.
  if (anyQueued(mine)) logError(`task ${pid}: checkpoint: fd ${fd} (socket:[${ino}]: ${what}): the packets queued to read are not kept (dropped, as a link may drop them)`);
  // The protocol it receives now, if bind changed what socket() was given (diag gives it in host order; socket() takes it as htons() made it).
  const num = ((d.num & 0xff) << 8) | (d.num >> 8);
  if (s.type === SOCK_PACKET) s.protocol = num; // its own protocol reads 0: the one it receives is made with
  else if (num !== s.protocol) s.pnum = num;
  if (s.type === SOCK_PACKET) {
    // The obsolete interface names its device in a plain sockaddr.
    const dev = nameBuf && nameBuf.length > 2 ? nameBuf.subarray(2, 16).toString('latin1').replace(/\0.*$/s, '') : '';
    if (dev) s.ifname = dev;
    return;
  }
  const ifindex = nameBuf && nameBuf.length >= 8 ? nameBuf.readInt32LE(4) : 0;
  if (ifindex) {
    const n = ifName(ifindex);
    if (!n) throw refuse(pid, fd, `socket:[${ino}]: ${what}: bound to interface ${ifindex}, which has no name`);
    s.ifname = n;
  }
  if (d.info?.copyThresh) s.copyThresh = d.info.copyThresh;
  if (d.mclist.length) {
    s.mclist = d.mclist.map((m) => {
      const n = ifName(m.ifindex);
      if (!n) throw refuse(pid, fd, `socket:[${ino}]: ${what}: a membership on interface ${m.ifindex}, which has no name`);
      return { ifname: n, type: m.type, addr: m.addr.toString('base64'), count: m.count };
    });
  }
}

/**
 * A packet socket's rings (PACKET_RX_RING, PACKET_TX_RING): their layout is
 * set again. Mapped by a process, the program may have frames in them that
 * only the mapping holds (refused); not mapped, the receive ring is mapped
 * by the supervisor for a moment to see that no frame waits to be read
 * (else refused: a ring cannot be filled again).
 */
function captureRings(pid: number, fd: number, mine: number, s: NetSockState, d: PacketDiag, what: string, ino: number): void {
  let maps = '';
  try {
    maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch { /* gone */ }
  const names = [d.rxRing ? 'PACKET_RX_RING' : '', d.txRing ? 'PACKET_TX_RING' : ''].filter(Boolean).join(' and ');
  if (maps.includes(`socket:[${ino}]`)) throw refuse(pid, fd, `${what}: ${names} mapped into the process (mmapped rings): not supported`);
  const version = d.info?.version ?? 0;
  if (d.rxRing) {
    const [bsize, bnr, fsize, fnr] = d.rxRing;
    // One mapping covers both rings (the receive ring first), and only the whole of it maps.
    const ring = readMapped(mine, bsize * bnr + (d.txRing ? d.txRing[0] * d.txRing[1] : 0));
    if (!ring) throw refuse(pid, fd, `${what}: its PACKET_RX_RING cannot be read: not supported`);
    // A frame (V1, V2) or block (V3: its status after version and offset) handed to user space holds packets.
    const TP_STATUS_USER = 1;
    let waiting = false;
    if (version === 2) for (let b = 0; b < bnr; b++) waiting ||= (ring.readUInt32LE(b * bsize + 8) & TP_STATUS_USER) !== 0;
    else {
      const perBlock = Math.floor(bsize / fsize);
      for (let i = 0; i < fnr; i++) {
        const at = Math.floor(i / perBlock) * bsize + (i % perBlock) * fsize;
        waiting ||= (Number(version === 0 ? ring.readBigUInt64LE(at) & 0xffffffffn : BigInt(ring.readUInt32LE(at))) & TP_STATUS_USER) !== 0;
      }
    }
    if (waiting) throw refuse(pid, fd, `${what}: packets waiting in its PACKET_RX_RING: not supported`);
    s.rxRing = d.rxRing;
  }
  if (d.txRing) s.txRing = d.txRing;
}

function captureNetlink(mine: number, s: NetSockState, nameBuf: Buffer | undefined, peerBuf: Buffer | undefined): void {
  // sockaddr_nl: family, pad, port id, groups (the first 32).
  if (nameBuf && nameBuf.length >= 12 && (nameBuf.readUInt32LE(4) || nameBuf.readUInt32LE(8))) s.name = nameBuf.toString('base64');
  if (peerBuf && peerBuf.length >= 12 && (peerBuf.readUInt32LE(4) || peerBuf.readUInt32LE(8))) s.peer = peerBuf.toString('base64');
  const all = getsockopt(mine, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 512);
  if (typeof all !== 'number') {
    const groups: number[] = [];
    for (let w = 1; w * 4 + 4 <= all.length; w++) {
      const bits = all.readUInt32LE(w * 4);
      for (let i = 0; i < 32; i++) if (bits & (1 << i)) groups.push(w * 32 + i + 1);
    }
    if (groups.length) s.groups = groups;
  }
  // What is queued to read is dropped (answers and notifications about a kernel state a restart does not bring back).
}

// ---------------------------------------------------------------- restore

/**
 * The socket made again in the task of `r` (`host`: its pid as the
 * supervisor sees it); returns its descriptor there. `where` names it for
 * errors ("task N fd M").
 */
export function makeNetSock(r: Remote, host: number, s: NetSockState, where: string): bigint {
  const what = `${where}: ${describe(s.family, s.type, s.protocol)}`;
  for (const o of s.opts ?? []) if (!knownOpt(s.family, s.type, s.protocol, o)) throw new CkptError(errno('EBADMSG'), 'image', `${what}: socket option ${o.level}/${o.name} is not one a checkpoint keeps`);
  const fd = r.call(SYS_socket, s.family, s.type | SOCK_CLOEXEC, s.protocol);
  if (fd === -BigInt(EPERM) || fd === -BigInt(EACCES)) {
    const why = s.family === AF_PACKET || s.type === SOCK_RAW ? 'it lacks CAP_NET_RAW' : s.protocol === IPPROTO_ICMP || s.protocol === IPPROTO_ICMPV6 ? 'its group is outside net.ipv4.ping_group_range' : 'not permitted';
    throw new CkptError(errno('EPERM'), 'restart:netsock', `${what}: the process may not open such a socket itself (${why})`);
  }
  if (fd < 0n) throw new CkptError(Number(-fd), 'restart:netsock', `${what}: socket()`);
  try {
    restoreInto(r, host, fd, s, what);
  } catch (e) {
    r.call(SYS.close, fd);
    throw e;
  }
  return fd;
}

function restoreInto(r: Remote, host: number, fd: bigint, s: NetSockState, what: string): void {
  const inet = s.family === AF_INET || s.family === AF_INET6;
  const queued = s.queue?.length ? s.queue : undefined;
  // Set after the queue is back: a device other than loopback would not take what comes over it.
  const late = (o: SockOpt) => (o.level === SOL_SOCKET && (o.name === SO_LOCK_FILTER || (queued !== undefined && o.name === SO_BINDTODEVICE))) || (o.level === SOL_SOCKET && o.name === SO_PEEK_OFF);
  const early = (s.opts ?? []).filter((o) => !late(o));
  for (let i = 0; i < early.length; i += 32) { // their arguments in one scratch page a batch
    const bo = new CallBatch(r);
    addSockOpts(bo, fd, early.slice(i, i + 32), `restart:netsock ${what}`);
    bo.run();
  }
  const b = new CallBatch(r);
  if (s.filter) {
    const prog = Buffer.from(s.filter, 'base64');
    const at = b.put(prog);
    const fprog = Buffer.alloc(16);
    fprog.writeUInt16LE(prog.length / 8, 0);
    fprog.writeBigUInt64LE(at, 8);
    b.add(`restart:netsock ${what} SO_ATTACH_FILTER`, SYS_setsockopt, fd, SOL_SOCKET, SO_ATTACH_FILTER, b.put(fprog), 16);
  }
  if (s.family === AF_PACKET && s.copyThresh) {
    const v = Buffer.alloc(4);
    v.writeUInt32LE(s.copyThresh, 0);
    b.add(`restart:netsock ${what} PACKET_COPY_THRESH`, SYS_setsockopt, fd, SOL_PACKET, PACKET_COPY_THRESH, b.put(v), 4);
  }
  b.run();

  // Bound where it was.
  let bindAddr: Buffer | undefined;
  if (s.family === AF_PACKET) {
    if (s.ifname || s.pnum !== undefined) {
      const idx = s.ifname ? ifIndex(s.ifname) : 0;
      if (idx === undefined) throw new CkptError(errno('ENODEV'), 'restart:netsock', `${what}: bound to interface ${s.ifname}, which is not there`);
      if (s.type === SOCK_PACKET) {
        bindAddr = Buffer.alloc(16); // a sockaddr naming the device
        bindAddr.writeUInt16LE(AF_PACKET, 0);
        Buffer.from(s.ifname ?? '', 'latin1').copy(bindAddr, 2, 0, 13);
      } else {
        bindAddr = Buffer.alloc(20);
        bindAddr.writeUInt16LE(AF_PACKET, 0);
        bindAddr.writeUInt16LE(s.pnum ?? s.protocol, 2);
        bindAddr.writeInt32LE(idx, 4);
      }
    }
  } else if (s.name) bindAddr = Buffer.from(s.name, 'base64');
  if (bindAddr) {
    const fam = bindAddr.readUInt16LE(0);
    if (fam !== s.family) throw new CkptError(errno('EBADMSG'), 'image', `${what}: bound address of family ${fam}`);
    const bb = new CallBatch(r);
    bb.add(undefined, SYS_bind, fd, bb.put(bindAddr), bindAddr.length);
    const [res] = bb.run();
    const at = inet ? inetAddrText(bindAddr) : s.family === AF_NETLINK ? `port id ${bindAddr.readUInt32LE(4)}` : s.ifname;
    if (res === -BigInt(EADDRINUSE)) throw new CkptError(errno('EBUSY'), 'restart:netsock', `${what}: ${at} is in use`);
    if (res === -BigInt(EACCES) || res === -BigInt(EPERM)) throw new CkptError(errno('EPERM'), 'restart:netsock', `${what}: the process may not bind ${at} itself (a port below 1024 needs CAP_NET_BIND_SERVICE)`);
    if (res < 0n) throw new CkptError(Number(-res), 'restart:netsock', `${what}: bind to ${at}`);
  }

  const b2 = new CallBatch(r);
  for (const m of s.mclist ?? []) {
    const idx = ifIndex(m.ifname);
    if (idx === undefined) throw new CkptError(errno('ENODEV'), 'restart:netsock', `${what}: a membership on interface ${m.ifname}, which is not there`);
    const mr = Buffer.alloc(16);
    const addr = Buffer.from(m.addr, 'base64');
    mr.writeInt32LE(idx, 0);
    mr.writeUInt16LE(m.type, 4);
    mr.writeUInt16LE(Math.min(addr.length, 8), 6);
    addr.copy(mr, 8, 0, Math.min(addr.length, 8));
    const at = b2.put(mr);
    for (let i = 0; i < m.count; i++) b2.add(`restart:netsock ${what} PACKET_ADD_MEMBERSHIP`, SYS_setsockopt, fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, at, 16);
  }
  for (const m of s.mcast ?? []) {
    const idx = ifIndex(m.ifname);
    if (idx === undefined) throw new CkptError(errno('ENODEV'), 'restart:netsock', `${what}: a multicast membership on interface ${m.ifname}, which is not there`);
    const level = s.family === AF_INET ? SOL_IP : SOL_IPV6;
    const group = Buffer.from(m.group, 'base64');
    if (group.length !== (s.family === AF_INET ? 4 : 16)) throw new CkptError(errno('EBADMSG'), 'image', `${what}: a multicast group of ${group.length} bytes`);
    const req = Buffer.alloc(136);
    req.writeUInt32LE(idx, 0);
    makeInetAddr(s.family, group, 0).copy(req, 8);
    const bm = new CallBatch(r); // one each: a filter nearly fills the scratch page
    bm.add(`restart:netsock ${what} MCAST_JOIN_GROUP`, SYS_setsockopt, fd, level, MCAST_JOIN_GROUP, bm.put(req), req.length);
    if (m.include || m.sources?.length) {
      const src = m.sources ?? [];
      const gf = Buffer.alloc(GF_SLIST + SS * src.length);
      req.copy(gf, 0, 0, 136);
      gf.writeUInt32LE(m.include ? 1 : 0, 136);
      gf.writeUInt32LE(src.length, 140);
      src.forEach((x, i) => makeInetAddr(s.family, Buffer.from(x, 'base64'), 0).copy(gf, GF_SLIST + SS * i));
      bm.add(`restart:netsock ${what} MCAST_MSFILTER`, SYS_setsockopt, fd, level, MCAST_MSFILTER, bm.put(gf), gf.length);
    }
    bm.run();
  }
  if (s.fanout !== undefined) {
    const v = Buffer.alloc(4);
    v.writeUInt32LE(s.fanout, 0);
    b2.add(`restart:netsock ${what} PACKET_FANOUT`, SYS_setsockopt, fd, SOL_PACKET, PACKET_FANOUT, b2.put(v), 4);
  }
  // Rings after PACKET_VERSION and PACKET_RESERVE (set above), which a ring freezes; V3 takes the longer request.
  const v3 = (s.opts ?? []).some((o) => o.level === SOL_PACKET && o.name === 10 && Buffer.from(o.val, 'base64').readInt32LE(0) === 2);
  for (const [name, ring] of [[PACKET_RX_RING, s.rxRing], [PACKET_TX_RING, s.txRing]] as const) {
    if (!ring) continue;
    const req = Buffer.alloc(v3 ? 28 : 16);
    for (let i = 0; i < req.length / 4; i++) req.writeUInt32LE(ring[i], 4 * i);
    b2.add(`restart:netsock ${what} ${name === PACKET_RX_RING ? 'PACKET_RX_RING' : 'PACKET_TX_RING'}`, SYS_setsockopt, fd, SOL_PACKET, name, b2.put(req), req.length);
  }
  for (const g of s.groups ?? []) {
    const v = Buffer.alloc(4);
    v.writeUInt32LE(g, 0);
    b2.add(`restart:netsock ${what} NETLINK_ADD_MEMBERSHIP ${g}`, SYS_setsockopt, fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, b2.put(v), 4);
  }
  b2.run();

  if (queued) requeue(host, fd, s, queued, what);

  // Then what would get in the way of the queue: connected, shut down, late options.
  const b3 = new CallBatch(r);
  addSockOpts(b3, fd, (s.opts ?? []).filter(late), `restart:netsock ${what}`);
  if (s.peer) {
    const p = Buffer.from(s.peer, 'base64');
    b3.add(`restart:netsock ${what} connect to ${inet ? inetAddrText(p) : 'its destination'}`, SYS_connect, fd, b3.put(p), p.length);
  }
  if (s.shutdown) b3.add(undefined, SYS_shutdown, fd, (s.shutdown & 3) - 1);
  const res = b3.run();
  if (s.shutdown) {
    const x = res[res.length - 1];
    // An unconnected UDP socket is shut down all the same, and told ENOTCONN.
    if (x < 0n && x !== -BigInt(ENOTCONN)) throw new CkptError(Number(-x), 'restart:netsock', `${what}: shutdown`);
  }
}

// ---------------------------------------------------------------- datagrams queued again

/** The Internet checksum (RFC 1071) of some buffers, folded. */
function checksum(...parts: Buffer[]): number {
  let sum = 0;
  let odd: number | undefined;
  for (const p of parts) {
    for (let i = 0; i < p.length; i++) {
      if (odd === undefined) odd = p[i];
      else {
        sum += (odd << 8) | p[i];
        odd = undefined;
      }
    }
  }
  if (odd !== undefined) sum += odd << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function pseudoHeader(family: number, src: Buffer, dst: Buffer, proto: number, len: number): Buffer {
  if (family === AF_INET) {
    const p = Buffer.alloc(12);
    src.copy(p, 0);
    dst.copy(p, 4);
    p[9] = proto;
    p.writeUInt16BE(len, 10);
    return p;
  }
  const p = Buffer.alloc(40);
  src.copy(p, 0);
  dst.copy(p, 16);
  p.writeUInt32BE(len, 32);
  p[39] = proto;
  return p;
}

/** The transport part of one datagram as it came: UDP or UDP-Lite header and data, or the ICMP message itself. */
function transport(family: number, proto: number, src: Buffer, dst: Buffer, sport: number, dport: number, data: Buffer): Buffer {
  if (proto === IPPROTO_ICMP || proto === IPPROTO_ICMPV6) {
    const m = Buffer.from(data);
    if (m.length < 8) throw new Error('short ICMP message');
    m.writeUInt16BE(0, 2);
    const sum = proto === IPPROTO_ICMP ? checksum(m) : checksum(pseudoHeader(family, src, dst, proto, m.length), m);
    m.writeUInt16BE(sum, 2);
    return m;
  }
  const u = Buffer.alloc(8 + data.length);
  u.writeUInt16BE(sport, 0);
  u.writeUInt16BE(dport, 2);
  // UDP-Lite: the length field is the checksum coverage (0: all of it).
  u.writeUInt16BE(proto === IPPROTO_UDPLITE ? 0 : u.length, 4);
  data.copy(u, 8);
  let sum = checksum(pseudoHeader(family, src, dst, proto, u.length), u);
  if (sum === 0) sum = 0xffff;
  u.writeUInt16BE(sum, 6);
  return u;
}

function ipPacket(family: number, proto: number, src: Buffer, dst: Buffer, payload: Buffer): Buffer {
  if (family === AF_INET) {
    const h = Buffer.alloc(20);
    h[0] = 0x45;
    h.writeUInt16BE(20 + payload.length, 2);
    h[8] = 64;
    h[9] = proto;
    src.copy(h, 12);
    dst.copy(h, 16);
    h.writeUInt16BE(checksum(h), 10);
    return Buffer.concat([h, payload]);
  }
  const h = Buffer.alloc(40);
  h.writeUInt32BE(0x60000000, 0);
  h.writeUInt16BE(payload.length, 4);
  h[6] = proto;
  h[7] = 64;
  src.copy(h, 8);
  dst.copy(h, 24);
  return Buffer.concat([h, payload]);
}

const LOOP4 = Buffer.from([127, 0, 0, 1]);
const LOOP6 = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

/**
 * Send the datagrams queued at the checkpoint to the restored socket again,
 * each from its own source, through a raw socket of the supervisor over
 * loopback; then check that its queue holds them as they were.
 */
function requeue(host: number, fd: bigint, s: NetSockState, q: QueuedDatagram[], what: string): void {
  const cannot = (why: string) => new CkptError(errno('EOPNOTSUPP'), 'restart:netsock', `${what}: its ${q.length} queued datagrams cannot be queued again with their sources: ${why}`);
  const local = inetAddr(Buffer.from(s.name ?? '', 'base64'));
  if (!local || !local.port && s.protocol !== IPPROTO_ICMP && s.protocol !== IPPROTO_ICMPV6) throw cannot('it has no port');
  withTraceeFd(host, fd, 'restart:netsock', (mine) => {
    const ino = fs.fstatSync(mine).ino;
    if (s.protocol === IPPROTO_UDP || s.protocol === IPPROTO_UDPLITE) {
      const sharer = portSharer(new NetDiag(), s.protocol, local.port, ino);
      if (sharer) throw cannot(`socket:[${sharer}] shares its port ${local.port}`);
    }
    const raws = new Map<number, number>();
    try {
      for (const m of q) {
        const src = inetAddr(Buffer.from(m.from, 'base64'));
        if (!src) throw cannot('a source of unknown family');
        // An IPv4 source on an IPv6 socket (v4-mapped) came as IPv4.
        const v4 = src.family === AF_INET || isV4Mapped(src.addr);
        const fam = v4 ? AF_INET : AF_INET6;
        const srcAddr = v4 && src.family === AF_INET6 ? src.addr.subarray(12) : src.addr;
        // To where it came if that is an address of this host (IP_PKTINFO then says so again), else to where the socket is bound.
        const bound = local.family === AF_INET || !v4 ? local.addr : isV4Mapped(local.addr) ? local.addr.subarray(12) : isAny(local.addr) ? Buffer.alloc(4) : Buffer.alloc(0);
        if (bound.length !== (fam === AF_INET ? 4 : 16)) throw cannot(`an IPv4 source ${inetAddrText(Buffer.from(m.from, 'base64'))} on a socket bound to an IPv6 address`);
        const came = m.to ? Buffer.from(m.to, 'base64') : undefined;
        const cameTo = came && (fam === AF_INET ? (came.length === 16 && isV4Mapped(came) ? came.subarray(12) : came) : came);
        let dst: Buffer;
        if (cameTo && cameTo.length === bound.length && (isAny(bound) || cameTo.equals(bound)) && isLocalUnicast(fam, cameTo)) dst = cameTo;
        else if (isAny(bound)) dst = fam === AF_INET ? LOOP4 : LOOP6;
        else if (isLocalUnicast(fam, bound)) dst = bound;
        else throw cannot(`it is bound to ${inetAddrText(Buffer.from(s.name!, 'base64'))}, not a unicast address of this host (a datagram sent there could leave it)`);
        const proto = s.protocol;
        const pkt = ipPacket(fam, proto, srcAddr, dst,
          transport(fam, proto, srcAddr, dst, src.port, local.port, Buffer.from(m.data, 'base64')));
        let raw = raws.get(fam);
        if (raw === undefined) {
          try {
            raw = sys.socket(fam, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
          } catch {
            throw cannot('the supervisor cannot open a raw socket (CAP_NET_RAW) to send them from their sources');
          }
          raws.set(fam, raw);
        }
        const n = sendto(raw, pkt, 0, makeInetAddr(fam, dst, 0));
        if (n !== pkt.length) throw cannot(`sending one again failed (errno ${-n})`);
      }
    } finally {
      for (const f of raws.values()) fs.closeSync(f);
    }
    // Loopback delivers in a softirq: give it a moment, then compare.
    let got: { data: Buffer; from: Buffer }[] = [];
    for (let i = 0; i < 50; i++) {
      got = peekDatagrams(mine, s.family) ?? [];
      if (got.length >= q.length) break;
      sys.pollOne(mine, 1, 2);
    }
    const same = got.length === q.length && got.every((g, i) => g.data.equals(Buffer.from(q[i].data, 'base64')) && sameSource(g.from, Buffer.from(q[i].from, 'base64')));
    if (!same) throw cannot(`${got.length} came back${got.length === q.length ? ', not as they were' : ''}`);
  }, 'socket fd');
}

/**
 * Is this an address of this host, not multicast, broadcast or link-local?
 * Only such a destination keeps the datagrams sent from a raw socket on the
 * host: 127/8 and ::1, and the addresses /proc/net/fib_trie calls "host
 * LOCAL" or /proc/net/if_inet6 lists.
 */
function isLocalUnicast(family: number, a: Buffer): boolean {
  if (family === AF_INET) {
    if (a[0] === 127) return true;
    if (a[0] >= 224 || isAny(a)) return false;
    let trie = '';
    try {
      trie = fs.readFileSync('/proc/net/fib_trie', 'utf8');
    } catch {
      return false;
    }
    const text = [...a].join('.');
    const lines = trie.split('\n');
    return lines.some((l, i) => l.trim() === `|-- ${text}` && /\/32 host LOCAL/.test(lines[i + 1] ?? ''));
  }
  if (a.equals(LOOP6)) return true;
  if (a[0] === 0xff || isLinkLocal6(a) || isAny(a) || isV4Mapped(a)) return false;
  try {
    const hex = a.toString('hex');
    return fs.readFileSync('/proc/net/if_inet6', 'utf8').split('\n').some((l) => l.startsWith(hex + ' '));
  } catch {
    return false;
  }
}

/** The same source address (the sockaddr's family, port, address and scope; not its padding). */
function sameSource(a: Buffer, b: Buffer): boolean {
  const x = inetAddr(a), y = inetAddr(b);
  return !!x && !!y && x.family === y.family && x.port === y.port && x.addr.equals(y.addr) && x.scope === y.scope;
}

// ---------------------------------------------------------------- rights, before a rollback changes anything

/**
 * A rollback makes every socket again in a live process, with the
 * credentials it has now: one that dropped CAP_NET_RAW (or left
 * ping_group_range) since it opened a raw, packet or ping socket would fail
 * half-way. Checked first, from /proc (its effective capabilities in the
 * namespace the network belongs to, its groups): EPERM, nothing changed.
 * `holders` gives, for a live process's descriptors, its host pid.
 */
export function checkNetRights(descs: { id: number; kind: string; net?: NetSockState }[], firstHolder: (desc: number) => { pid: number; fd: number } | undefined, hostOf: (pid: number) => number | undefined): void {
  for (const d of descs) {
    if (d.kind !== 'net' || !d.net) continue;
    const s = d.net;
    const raw = s.family === AF_PACKET || s.type === SOCK_RAW;
    const ping = s.type === SOCK_DGRAM && (s.protocol === IPPROTO_ICMP || s.protocol === IPPROTO_ICMPV6);
    if (!raw && !ping) continue;
    const h = firstHolder(d.id);
    const host = h && hostOf(h.pid);
    if (host === undefined) continue; // made anew: the kernel answers for it
    const what = `task ${h!.pid} fd ${h!.fd}: ${describe(s.family, s.type, s.protocol)}`;
    let status: string;
    try {
      status = fs.readFileSync(`/proc/${host}/status`, 'utf8');
    } catch {
      continue;
    }
    if (raw) {
      const capEff = BigInt('0x' + (/^CapEff:\s*([0-9a-f]+)/m.exec(status)?.[1] ?? '0'));
      let sameNs = true;
      try {
        sameNs = fs.statSync(`/proc/${host}/ns/user`).ino === fs.statSync('/proc/self/ns/user').ino;
      } catch { /* no namespaces */ }
      if (!(capEff & (1n << 13n)) || !sameNs) throw new CkptError(errno('EPERM'), 'restart:netsock', `${what}: the process may not open such a socket itself now (it lacks CAP_NET_RAW)`);
    } else {
      const [lo, hi] = readSysctlPair('/proc/sys/net/ipv4/ping_group_range');
      const egid = Number(/^Gid:\s*\d+\s+(\d+)/m.exec(status)?.[1] ?? -1);
      const groups = (/^Groups:\s*(.*)$/m.exec(status)?.[1] ?? '').trim().split(/\s+/).filter(Boolean).map(Number);
      if (![egid, ...groups].some((g) => g >= lo && g <= hi)) throw new CkptError(errno('EPERM'), 'restart:netsock', `${what}: the process may not open such a socket itself now (its groups are outside net.ipv4.ping_group_range ${lo} ${hi})`);
    }
  }
}

function readSysctlPair(path: string): [number, number] {
  try {
    const [a, b] = fs.readFileSync(path, 'utf8').trim().split(/\s+/).map(Number);
    return [a, b];
  } catch {
    return [1, 0];
  }
}

/** The first holder of each description, in the tree's order (where files.ts makes it). */
export function firstHolder(procs: { ids: { pid: number }; files: { fds: ({ fd: number } & ({ desc: number } | { outside: true }))[] } }[]): (desc: number) => { pid: number; fd: number } | undefined {
  const first = new Map<number, { pid: number; fd: number }>();
  for (const p of procs) for (const f of p.files.fds) if ('desc' in f && !first.has(f.desc)) first.set(f.desc, { pid: p.ids.pid, fd: f.fd });
  return (d) => first.get(d);
}

/**
 * Before a rollback changes anything: every UDP port and netlink port id
 * the checkpoint's sockets were bound to must be free but for the tree's
 * own sockets of now (closed first by the rollback). One held by a socket
 * outside the tree would fail the bind half-way: EBUSY first. Ports shared
 * on purpose (SO_REUSEADDR, SO_REUSEPORT) are left to the bind.
 */
export function checkNetPortsFree(descs: { kind: string; net?: NetSockState }[], procs: number[]): void {
  const nets = descs.filter((d) => d.kind === 'net' && d.net?.name).map((d) => d.net!);
  if (!nets.length) return;
  const ours = new Set<number>();
  for (const p of procs) {
    let fds: string[] = [];
    try {
      fds = fs.readdirSync(`/proc/${p}/fd`);
    } catch { /* gone */ }
    for (const f of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${p}/fd/${f}`));
        if (m) ours.add(Number(m[1]));
      } catch { /* closed */ }
    }
  }
  const diag = new NetDiag();
  let netlink: { proto: number; portid: number; ino: number }[] | undefined;
  for (const s of nets) {
    const name = Buffer.from(s.name!, 'base64');
    const shared = (s.opts ?? []).some((o) => o.level === SOL_SOCKET && (o.name === 2 || o.name === 15));
    if ((s.protocol === IPPROTO_UDP || s.protocol === IPPROTO_UDPLITE) && s.type === SOCK_DGRAM && !shared) {
      const a = inetAddr(name);
      if (!a?.port) continue;
      for (const fam of [AF_INET, AF_INET6]) {
        for (const x of diag.inetOf(fam, s.protocol).values()) {
          if (x.sport !== a.port || ours.has(x.ino)) continue;
          throw new CkptError(errno('EBUSY'), 'restart:netsock', `${describe(s.family, s.type, s.protocol, name)}: its port ${a.port} is held by socket:[${x.ino}] outside the subtree`);
        }
      }
    } else if (s.family === AF_NETLINK && name.length >= 8 && name.readUInt32LE(4)) {
      netlink ??= netlinkSockets();
      const holder = netlink.find((x) => x.proto === s.protocol && x.portid === name.readUInt32LE(4) && !ours.has(x.ino));
      if (holder) throw new CkptError(errno('EBUSY'), 'restart:netsock', `netlink protocol ${s.protocol} socket: its port id ${holder.portid} is held by socket:[${holder.ino}] outside the subtree`);
    }
  }
}

/** Netlink sockets from /proc/net/netlink: protocol, port id, inode. */
function netlinkSockets(): { proto: number; portid: number; ino: number }[] {
  try {
    return fs.readFileSync('/proc/net/netlink', 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)).filter((f) => f.length >= 10)
      .map((f) => ({ proto: Number(f[1]), portid: Number(f[2]), ino: Number(f[9]) }));
  } catch {
    return [];
  }
}
