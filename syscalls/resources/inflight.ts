/**
 * Descriptors in flight: files sent in SCM_RIGHTS messages still queued on
 * a unix socket of a connected pair, not yet received.
 *
 * Capture: the queue is read with MSG_PEEK and a control buffer, so the
 * supervisor receives a copy of every file in flight (the queue keeps its
 * own) and learns which message carries which. files.ts then captures each
 * such file as a description: one the tree also holds is matched with kcmp,
 * one held only in flight is captured from the supervisor's copy and made,
 * at restore, at a temporary number of the receiving end's process.
 *
 * Restore: once every description exists, the queue is sent again in
 * order, each message with its files attached (the supervisor takes them
 * from where they were made), then those temporaries are closed.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../../lib/errors.js';
import { sys, addressOf, errnoNow } from '../../lib/libc.js';
import { withTraceeFd } from '../../supervisor/callerfd.js';
import { endOfQueue } from './unixsock.js';
import { getsockoptInt } from '../../lib/netsock.js';

const getInt = (fd: number, opt: number) => getsockoptInt(fd, SOL_SOCKET, opt);

const SOL_SOCKET = 1, SO_PEEK_OFF = 42, SCM_RIGHTS = 1, SCM_CREDENTIALS = 2, SO_PASSCRED = 16, SO_TYPE = 3, SOCK_STREAM = 1, MSG_PEEK = 2, MSG_DONTWAIT = 0x40, MSG_CTRUNC = 8, MSG_CMSG_CLOEXEC = 0x40000000;
const SYS_sendmsg = 46, SYS_recvmsg = 47, EAGAIN = 11;
export const CONTROL = 4096; // room for SCM_MAX_FD (253) descriptors and more

/** One queued message: its bytes, the supervisor's copies of the files it carries, and (SCM_CREDENTIALS, with SO_PASSCRED on) who sent it: a host pid. */
export interface PeekedMessage { data: Buffer; fds: number[]; cred?: { pid: number; uid: number; gid: number } }

/** A struct msghdr for one buffer, a control buffer and a name (all kept alive by the caller). */
function msghdr(iov: Buffer, data: Buffer, control: Buffer | null, controlLen: number, name?: Buffer): Buffer {
  iov.writeBigUInt64LE(addressOf(data), 0);
  iov.writeBigUInt64LE(BigInt(data.length), 8);
  const m = Buffer.alloc(56);
  if (name) {
    m.writeBigUInt64LE(addressOf(name), 0);
    m.writeUInt32LE(name.length, 8);
  }
  m.writeBigUInt64LE(addressOf(iov), 16); // msg_iov (no name)
  m.writeBigUInt64LE(1n, 24); // msg_iovlen
  if (control) {
    m.writeBigUInt64LE(addressOf(control), 32);
    m.writeBigUInt64LE(BigInt(controlLen), 40);
  }
  return m;
}

/** The SCM_CREDENTIALS of a control buffer of `len` bytes. */
function credsOf(control: Buffer, len: number): PeekedMessage['cred'] {
  for (let off = 0; off + 16 <= len; ) {
    const clen = Number(control.readBigUInt64LE(off));
    if (clen < 16) break;
    if (control.readInt32LE(off + 8) === SOL_SOCKET && control.readInt32LE(off + 12) === SCM_CREDENTIALS && clen >= 28) {
      return { pid: control.readInt32LE(off + 16), uid: control.readUInt32LE(off + 20), gid: control.readUInt32LE(off + 24) };
    }
    off += (clen + 7) & ~7;
  }
  return undefined;
}

/**
 * Run `fn` with SO_PASSCRED on the supervisor's copy `mine` of a datagram
 * or seqpacket socket (the socket's own flag: set back after), so that each
 * message peeked says who sent it. (A stream's messages merge: not asked.)
 */
export function withPassCred<T>(mine: number, fn: () => T): T {
  const old = getInt(mine, SO_PASSCRED);
  const stream = getInt(mine, SO_TYPE) === SOCK_STREAM;
  if (stream || old === undefined) return fn();
  if (!old) sys.setsockoptInt(mine, SOL_SOCKET, SO_PASSCRED, 1);
  try {
    return fn();
  } finally {
    if (!old) sys.setsockoptInt(mine, SOL_SOCKET, SO_PASSCRED, 0);
  }
}

/** The SCM_RIGHTS descriptors of a control buffer of `len` bytes. */
function rightsOf(control: Buffer, len: number): number[] {
  const out: number[] = [];
  for (let off = 0; off + 16 <= len; ) {
    const clen = Number(control.readBigUInt64LE(off));
    if (clen < 16) break;
    if (control.readInt32LE(off + 8) === SOL_SOCKET && control.readInt32LE(off + 12) === SCM_RIGHTS) {
      for (let p = off + 16; p + 4 <= off + clen; p += 4) out.push(control.readInt32LE(p));
    }
    off += (clen + 7) & ~7;
  }
  return out;
}

/**
 * The queue of a socket, message by message (SO_PEEK_OFF moves the peek
 * along), with the files each carries received as descriptors of the
 * supervisor (close-on-exec; the caller closes them).
 */
export function peekWithFds(pid: number, fd: number, peer?: { pid: number; fd: number }): PeekedMessage[] {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const old = getInt(mine, SO_PEEK_OFF) ?? -1; // the program's own, set back after
    if (sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, 0) !== 0) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd}: cannot peek at its queue`);
    const out: PeekedMessage[] = [];
    try {
      const data = Buffer.alloc(1 << 20), control = Buffer.alloc(CONTROL), iov = Buffer.alloc(16);
      withPassCred(mine, () => {
        for (;;) {
          const got = recvOne(mine, data, control, iov, MSG_PEEK, `task ${pid}: fd ${fd}`);
          if (!got) break;
          out.push(got);
          if (got.data.length === 0 && !got.fds.length && endOfQueue(mine)) break; // end of stream (else an empty message)
        }
      });
    } catch (e) {
      for (const m of out) for (const f of m.fds) fs.closeSync(f);
      throw e;
    } finally {
      sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, old);
    }
    // A stream glues the bytes sent before a message with files to it, and
    // a peek brings the files of the next such message whatever its length:
    // where the files attach is only seen by reading. So the queue is read
    // (one byte at a time up to each message with files) and sent again
    // behind itself from the peer, part by part: it ends as it was, its
    // parts known.
    if (peer && out.some((m) => m.fds.length && m.data.length > 1)) return rotate(mine, out, peer, `task ${pid}: fd ${fd}`);
    return out;
  }, 'socket fd');
}

/**
 * The datagrams queued on a socket on its own, each with the files it
 * carries (the supervisor's copies) and its sender's name ('' for none),
 * as peekDatagrams gives names.
 */
export function peekDatagramsWithFds(pid: number, fd: number): (PeekedMessage & { from: string })[] {
  return withTraceeFd(pid, fd, 'checkpoint:files', (mine) => {
    const old = getInt(mine, SO_PEEK_OFF) ?? -1; // the program's own, set back after
    if (sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, 0) !== 0) throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `task ${pid}: fd ${fd}: cannot peek at its queue`);
    const out: (PeekedMessage & { from: string })[] = [];
    try {
      const data = Buffer.alloc(1 << 20), control = Buffer.alloc(CONTROL), iov = Buffer.alloc(16), name = Buffer.alloc(112);
      withPassCred(mine, () => {
        for (;;) {
          const got = recvOne(mine, data, control, iov, MSG_PEEK, `task ${pid}: fd ${fd}`, data.length, name);
          if (!got) break;
          // Nothing and no file: EOF (a seqpacket peer gone), else an empty datagram.
          if (!got.data.length && !got.fds.length && endOfQueue(mine)) break;
          out.push(got as PeekedMessage & { from: string });
        }
      });
    } catch (e) {
      for (const m of out) for (const f of m.fds) fs.closeSync(f);
      throw e;
    } finally {
      sys.setsockoptInt(mine, SOL_SOCKET, SO_PEEK_OFF, old);
    }
    return out;
  }, 'socket fd');
}

/** One recvmsg: its bytes and files (the supervisor's, close-on-exec), or undefined when nothing is queued; with `name`, the sender's name too. */
export function recvOne(sock: number, data: Buffer, control: Buffer, iov: Buffer, flags: number, what: string, len = data.length, name?: Buffer): (PeekedMessage & { from?: string }) | undefined {
  control.fill(0);
  const m = msghdr(iov, data.subarray(0, len), control, CONTROL, name);
  const n = sys.syscall(SYS_recvmsg, sock, addressOf(m), flags | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0 && errnoNow() === EAGAIN) return undefined;
  if (n < 0) throw new CkptError(errnoNow(), 'checkpoint:files', `${what}: cannot read its queue`);
  const fds = rightsOf(control, Number(m.readBigUInt64LE(40)));
  if (m.readInt32LE(48) & MSG_CTRUNC) {
    for (const f of fds) fs.closeSync(f);
    throw new CkptError(errno('EOPNOTSUPP'), 'checkpoint:files', `${what}: a message carries more descriptors than can be read`);
  }
  const cred = credsOf(control, Number(m.readBigUInt64LE(40)));
  if (!name) return { data: Buffer.from(data.subarray(0, n)), fds, ...(cred ? { cred } : {}) };
  // sun_path after the family, as sock_diag gives names (a path keeps its NUL).
  const nlen = Math.min(m.readUInt32LE(8), name.length);
  let from = nlen > 2 ? name.subarray(2, nlen).toString('latin1') : '';
  if (from && !from.startsWith('\0') && from.includes('\0')) from = from.slice(0, from.indexOf('\0') + 1);
  else if (from && !from.startsWith('\0')) from += '\0';
  return { data: Buffer.from(data.subarray(0, n)), fds, from, ...(cred ? { cred } : {}) };
}

/**
 * Read a stream queue whose peeked chunks are `chunks` and send it again
 * from the peer, each chunk with files split where its files attach.
 */
function rotate(mine: number, chunks: PeekedMessage[], peer: { pid: number; fd: number }, what: string): PeekedMessage[] {
  return withTraceeFd(peer.pid, peer.fd, 'checkpoint:files', (back) => {
    const out: PeekedMessage[] = [];
    const data = Buffer.alloc(1 << 20), control = Buffer.alloc(CONTROL), iov = Buffer.alloc(16);
    const take = (len: number): PeekedMessage => {
      const parts: Buffer[] = [];
      const fds: number[] = [];
      for (let got = 0; got < len; ) {
        const m = recvOne(mine, data, control, iov, 0, what, Math.min(len - got, data.length));
        if (!m || !m.data.length) throw new CkptError(errno('EIO'), 'checkpoint:files', `${what}: its queue changed while it was read`);
        parts.push(m.data);
        fds.push(...m.fds);
        got += m.data.length;
      }
      return { data: Buffer.concat(parts), fds };
    };
    for (const c of chunks) {
      if (!c.fds.length || c.data.length <= 1) {
        const m = take(c.data.length);
        for (const f of m.fds) fs.closeSync(f); // the peek's copies stand for them
        sendWithFds(back, m.data, c.fds, what);
        out.push(c);
        continue;
      }
      let before = 0;
      for (; before < c.data.length; before++) {
        const m = take(1);
        for (const f of m.fds) fs.closeSync(f);
        if (m.fds.length) break;
      }
      if (before === c.data.length) throw new CkptError(errno('EIO'), 'checkpoint:files', `${what}: the files of its queue went missing while it was read`);
      const rest = take(c.data.length - before - 1);
      for (const f of rest.fds) fs.closeSync(f);
      if (before) {
        sendWithFds(back, c.data.subarray(0, before), [], what);
        out.push({ data: c.data.subarray(0, before), fds: [] });
      }
      sendWithFds(back, c.data.subarray(before), c.fds, what);
      out.push({ data: c.data.subarray(before), fds: c.fds });
    }
    return out;
  }, 'socket fd');
}

/** Send one message with files attached (`fds`: the supervisor's) through the supervisor's socket `mine`. */
export function sendWithFds(mine: number, data: Buffer, fds: number[], what: string, to?: Buffer, cred?: PeekedMessage['cred']): void {
  const clen = 16 + 4 * fds.length;
  const rights = Buffer.alloc(fds.length ? (clen + 7) & ~7 : 0);
  if (fds.length) {
    rights.writeBigUInt64LE(BigInt(clen), 0);
    rights.writeInt32LE(SOL_SOCKET, 8);
    rights.writeInt32LE(SCM_RIGHTS, 12);
    fds.forEach((f, i) => rights.writeInt32LE(f, 16 + 4 * i));
  }
  // Sent as its sender sent it (the supervisor may name any existing process and ids).
  const creds = Buffer.alloc(cred ? 32 : 0);
  if (cred) {
    creds.writeBigUInt64LE(28n, 0);
    creds.writeInt32LE(SOL_SOCKET, 8);
    creds.writeInt32LE(SCM_CREDENTIALS, 12);
    creds.writeInt32LE(cred.pid, 16);
    creds.writeUInt32LE(cred.uid, 20);
    creds.writeUInt32LE(cred.gid, 24);
  }
  const control = Buffer.concat([rights, creds]);
  const iov = Buffer.alloc(16);
  const m = msghdr(iov, data, control.length ? control : null, control.length, to);
  const n = sys.syscall(SYS_sendmsg, mine, addressOf(m), MSG_DONTWAIT);
  if (n !== data.length) throw new CkptError(n < 0 ? errnoNow() : errno('ENOMEM'), 'restart:files', `${what}: cannot queue a message of ${data.length} bytes with ${fds.length} descriptors`);
}
