/**
 * Unix sockets as the kernel sees them (sock_diag over netlink): type,
 * state, peer inode, bound name. How a checkpoint learns which socket is
 * connected to which, something /proc does not say.
 */
import fs from 'node:fs';
import { sys, errnoNow } from './libc.js';
import { CkptError } from './errors.js';

const AF_NETLINK = 16, SOCK_RAW = 3, SOCK_CLOEXEC = 0o2000000, NETLINK_SOCK_DIAG = 4;
const SOCK_DIAG_BY_FAMILY = 20, NLM_F_REQUEST = 1, NLM_F_DUMP = 0x300, NLMSG_DONE = 3, NLMSG_ERROR = 2;
const AF_UNIX = 1, UDIAG_SHOW_NAME = 1, UDIAG_SHOW_VFS = 2, UDIAG_SHOW_PEER = 4, UDIAG_SHOW_ICONS = 8, UDIAG_SHOW_RQLEN = 0x10;
const UNIX_DIAG_NAME = 0, UNIX_DIAG_VFS = 1, UNIX_DIAG_PEER = 2, UNIX_DIAG_ICONS = 3, UNIX_DIAG_RQLEN = 4, UNIX_DIAG_SHUTDOWN = 6;

export interface UnixSockInfo {
  ino: number;
  type: number; // SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5
  state: number; // 1 established, 10 listening, 7 unconnected
  peer: number; // 0: none
  /**
   * It has a peer pointer (UNIX_DIAG_PEER was sent): with `peer` 0 that
   * peer has no inode, being gone (closed) or an embryo (the server end of a
   * connection not yet accepted).
   */
  hasPeer?: boolean;
  /** For a listener: the clients of the connections not yet accepted, in accept order (0: a client closed since). */
  icons?: number[];
  /** Bound name (latin1 bytes as the kernel keeps them: a path with its NUL, or NUL and an abstract name). */
  name?: string;
  /** Bytes queued to read; for a listener, connections not yet accepted. */
  rqueue: number;
  /** For a listener: its backlog. */
  wqueue: number;
  /** Bound to a path: the inode of its socket file. */
  fileIno?: number;
  /** sk_shutdown: 1 receive side shut down, 2 send side (by shutdown() on it, or on its peer). */
  shutdown?: number;
}

/**
 * One sock_diag dump (SOCK_DIAG_BY_FAMILY, `body` the request after the
 * netlink header): the payload of each answer, after its netlink header.
 * The one netlink loop for unix (here), TCP (tcp.ts) and the other inet,
 * packet and netlink sockets (netsock.ts).
 */
export function diagDump(body: Buffer): Buffer[] {
  const fd = sys.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  const out: Buffer[] = [];
  try {
    const req = Buffer.alloc(16 + body.length);
    req.writeUInt32LE(req.length, 0);
    req.writeUInt16LE(SOCK_DIAG_BY_FAMILY, 4);
    req.writeUInt16LE(NLM_F_REQUEST | NLM_F_DUMP, 6);
    req.writeUInt32LE(1, 8); // seq
    body.copy(req, 16);
    if (sys.send(fd, req, 0) !== req.length) throw new CkptError(errnoNow(), 'sock_diag', 'send');
    const buf = Buffer.alloc(1 << 16);
    for (;;) {
      const n = sys.recv(fd, buf, 0);
      if (n <= 0) throw new CkptError(errnoNow(), 'sock_diag', 'recv');
      for (let off = 0; off + 16 <= n; ) {
        const len = buf.readUInt32LE(off), type = buf.readUInt16LE(off + 4);
        if (type === NLMSG_DONE) return out;
        if (type === NLMSG_ERROR) throw new CkptError(-buf.readInt32LE(off + 16), 'sock_diag', 'netlink error');
        if (len < 16) return out;
        out.push(Buffer.from(buf.subarray(off + 16, off + len)));
        off += (len + 3) & ~3;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Every unix socket of the system, by inode. */
export function unixSockets(): Map<number, UnixSockInfo> {
  const body = Buffer.alloc(24);
  body.writeUInt8(AF_UNIX, 0);
  body.writeUInt32LE(0xffffffff, 4); // all states
  body.writeUInt32LE(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN, 12);
  const out = new Map<number, UnixSockInfo>();
  for (const msg of diagDump(body)) {
    const info: UnixSockInfo = { type: msg.readUInt8(1), state: msg.readUInt8(2), ino: msg.readUInt32LE(4), peer: 0, rqueue: 0, wqueue: 0 };
    for (let a = 16; a + 4 <= msg.length; ) {
      const alen = msg.readUInt16LE(a), atype = msg.readUInt16LE(a + 2);
      if (alen < 4) break;
      if (atype === UNIX_DIAG_PEER) {
        info.peer = msg.readUInt32LE(a + 4);
        info.hasPeer = true;
      } else if (atype === UNIX_DIAG_ICONS) {
        info.icons = [];
        for (let k = a + 4; k + 4 <= a + alen; k += 4) info.icons.push(msg.readUInt32LE(k));
      } else if (atype === UNIX_DIAG_RQLEN) {
        info.rqueue = msg.readUInt32LE(a + 4);
        info.wqueue = msg.readUInt32LE(a + 8);
      } else if (atype === UNIX_DIAG_NAME) info.name = msg.subarray(a + 4, a + alen).toString('latin1');
      else if (atype === UNIX_DIAG_VFS) info.fileIno = msg.readUInt32LE(a + 4);
      else if (atype === UNIX_DIAG_SHUTDOWN) info.shutdown = msg.readUInt8(a + 4);
      a += (alen + 3) & ~3;
    }
    out.set(info.ino, info);
  }
  return out;
}
