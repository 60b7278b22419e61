// Network sockets other than TCP (UDP, UDP-Lite, ping, raw, packet,
// netlink): kept across a restart and a rollback, the fixture checking
// addresses, options, queued datagrams with their sources and that each
// still works; refused by name where they cannot be kept; a rollback that
// would give a process a raw socket it may no longer open: EPERM.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { supervise, fixture, tmpdir, bothWays, CKPT } from './helpers.js';

const dir = tmpdir('netdgram');

// Ping sockets only exist for groups in net.ipv4.ping_group_range: let root's in for this file.
const RANGE = '/proc/sys/net/ipv4/ping_group_range';
const range = fs.readFileSync(RANGE, 'utf8').trim();
const [lo, hi] = range.split(/\s+/).map(Number);
const gid = os.userInfo().gid;
if (!(lo <= gid && gid <= hi)) {
  fs.writeFileSync(RANGE, `${gid} ${gid}`);
  t.teardown(() => fs.writeFileSync(RANGE, range));
}

const checks = [
  'udp4: bound to its port', 'udp4: SO_RCVBUF', 'udp4: SO_REUSEADDR, SO_BROADCAST, SO_TIMESTAMP',
  'udp4: IP_TOS, IP_TTL, IP_MULTICAST_TTL, IP_MULTICAST_LOOP, IP_PKTINFO', 'udp4: options it did not set are not set',
  'udp4: 4 queued datagrams, their sources, in order', 'udp4: its multicast groups on lo (239.1.2.3; 232.1.1.1 from 127.0.0.9 only)',
  'udp4 connected: its BPF filter (SO_ATTACH_FILTER)', 'udp6: its multicast group ff12::1234 on lo',
  'udp4 connected: its address and peer', 'udp4 connected: 1 queued datagrams, their sources, in order',
  'udp4 connected: sends to its peer; the peer: 1 queued datagrams, their sources, in order',
  'udp4 connected: receives from its peer; it: 1 queued datagrams, their sources, in order', 'udp4 connected: takes nothing from others',
  'udp6: bound to its port', 'udp6: IPV6_V6ONLY, IPV6_UNICAST_HOPS, IPV6_RECVPKTINFO, IPV6_TCLASS', 'udp6: O_NONBLOCK',
  'udp6: 3 queued datagrams, their sources, in order', 'udp6 dual-stack (IPV6_PKTINFO: where each came to): 2 queued datagrams, their sources, in order',
  'udp6: still receives: 1 queued datagrams, their sources, in order',
  'udplite: port, UDPLITE_SEND_CSCOV, UDPLITE_RECV_CSCOV', 'udplite: 2 queued datagrams, their sources, in order',
  'udplite: still receives: 1 queued datagrams, their sources, in order',
  'udp shut down both ways: POLLHUP, EPIPE on send',
  'ping: its identifier', 'ping: still connected (send without an address)', 'ping: pings again, answered to its identifier',
  'raw: protocol 253, bound to 127.0.0.1, IP_TTL', 'raw: receives what it sent, with its TTL',
  'packet: bound to lo, its protocol, PACKET_AUXDATA', 'packet: its membership (PACKET_DROP_MEMBERSHIP finds it)', 'packet: receives on lo', 'packet: its PACKET_FANOUT group',
  'packet: TPACKET_V2, its PACKET_RX_RING and PACKET_TX_RING (2 and 1 blocks)',
  'SOCK_PACKET: bound to lo, receives its protocol', 'netlink: its port id and groups', 'netlink: group 33 (NETLINK_ADD_MEMBERSHIP)', 'netlink: NETLINK_ROUTE, NETLINK_EXT_ACK, NETLINK_NO_ENOBUFS',
  'netlink: asks the kernel and is answered',
];

const run = bothWays(dir, 'netdgram');
for (const mode of ['restart', 'undo'] as const) {
  t.test(`UDP (v4, v6, dual-stack, UDP-Lite) with queued datagrams, ping, raw, packet and netlink sockets across a ${mode}`, async (t) => {
    const { first, r } = run(mode);
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'queues read, options changed, sockets closed before the rollback');
    for (const c of checks) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    t.match(r.stdout, /^NETDGRAM OK$/m, r.stdout.includes('NETDGRAM OK') ? 'NETDGRAM OK' : r.stdout + r.stderr);
    t.equal(r.status, 0);
  });
}

t.test('a raw and a packet socket opened as root by a process now uid 1000: a restart by root keeps them', async (t) => {
  const img = path.join(dir, 'dropped.img');
  const first = supervise([fixture('netdgram'), 'dropped', img]);
  t.equal(first.status, 137, first.stdout + first.stderr);
  const again = supervise([...CKPT, 'restart', '-i', img]);
  t.match(again.stdout, /^ok dropped: the raw and packet sockets, as uid 1000$/m);
  t.match(again.stdout, /^DROPPED OK$/m, again.stdout + again.stderr);
  t.equal(again.status, 0);
});

t.test('EPERM: a rollback would make a raw socket again in a process that may no longer open one; refused before anything changed', async (t) => {
  const r = supervise([fixture('netdgram'), 'dropped', 'undo']);
  t.match(r.stdout, /^dropped: rollback ret=-1 errno=EPERM$/m);
  t.match(r.stderr, /^ckpt-supervise: task (\d+): restart: EPERM: restart:netsock: task \1 fd \d+: IPv4 raw \(protocol 253\) socket: the process may not open such a socket itself now \(it lacks CAP_NET_RAW\)$/m, 'one log line names the task, the socket and why');
  t.match(r.stdout, /^ok dropped: the raw and packet sockets, as uid 1000$/m, 'the program runs on with its sockets');
  t.equal(r.status, 0);
});

const refusals: [string, RegExp][] = [
  ['corked', /fd \d+ \(socket:\[\d+\]: IPv4 UDP socket 0\.0\.0\.0:\d+: \d+ bytes written but not sent yet \(UDP_CORK\): not supported\)/],
  ['ring', /fd \d+ \(socket:\[\d+\]: packet SOCK_RAW socket: PACKET_RX_RING mapped into the process \(mmapped rings\): not supported\)/],
  ['icmperr', /fd \d+ \(socket:\[\d+\]: IPv4 UDP socket 127\.0\.0\.1:\d+: an error not yet read \(SO_ERROR or the error queue\): not supported\)/],
  ['rawq', /fd \d+ \(socket:\[\d+\]: IPv4 raw \(protocol 253\) socket 0\.0\.0\.0:253: packets queued to read on a raw socket: not supported\)/],
];
for (const [what, log] of refusals) {
  t.test(`refused with EOPNOTSUPP, the program unharmed: ${what}`, async (t) => {
    const r = supervise([fixture('netdgram'), 'refuse', what]);
    t.match(r.stdout, new RegExp(`${what}: checkpoint ret=-1 errno=EOPNOTSUPP`));
    t.match(r.stderr, new RegExp(`^ckpt-supervise: task (\\d+): checkpoint: EOPNOTSUPP: checkpoint:netsock: task \\1: ${log.source}$`, 'm'), 'one log line names the task, the socket and why');
    t.match(r.stdout, new RegExp(`${what}: still works after: yes`));
    t.equal(r.status, 0);
  });
}

t.test('EBUSY: a rollback whose UDP port a process outside the subtree took since; refused before anything changed', async (t) => {
  const r = supervise([fixture('netdgram'), 'busy']);
  t.match(r.stdout, /^busy: rollback ret=-1 errno=EBUSY$/m);
  t.match(r.stderr, /^ckpt-supervise: task \d+: restart: EBUSY: restart:netsock: IPv4 UDP socket 127\.0\.0\.1:(\d+): its port \1 is held by socket:\[\d+\] outside the subtree$/m, 'one log line names the socket, its port and who holds it');
  t.match(r.stdout, /^busy: the port is still the other's: yes$/m);
  t.match(r.stdout, /^busy: child exited 0$/m, 'the subtree runs on');
  t.equal(r.status, 0);
});
