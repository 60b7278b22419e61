/**
 * Typed FFI to the few libc entry points Node does not offer. Every call here
 * is synchronous on the main thread on purpose: ptrace requests belong to the
 * tracer thread, and koffi's async calls would run on a worker and get ESRCH.
 */
import koffi from 'koffi';
import { CkptError } from './errors.js';

const libc = koffi.load('libc.so.6');

const _ptraceN = libc.func('long ptrace(int req, int pid, uintptr_t addr, uintptr_t data)');
const _ptraceP = libc.func('long ptrace(int req, int pid, uintptr_t addr, _Inout_ void *data)');
const _waitpid = libc.func('int waitpid(int pid, _Out_ int *status, int options)');
const _syscall = libc.func('long syscall(long nr, ...)');
const _posixSpawn = libc.func(
  'int posix_spawn(_Out_ int *pid, const char *path, void *fa, void *attr, const char **argv, const char **envp)',
);
const _kill = libc.func('int kill(int pid, int sig)');
const _close = libc.func('int close(int fd)');
const _fcntl = libc.func('int fcntl(int fd, int cmd, ...)');
const _prctl = libc.func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)');
const _prctlP = libc.func('int prctl(int option, unsigned long a2, void *a3, unsigned long a4, unsigned long a5)');
const _execvp = libc.func('int execvp(const char *file, const char **argv)');
const _signal = libc.func('uintptr_t signal(int sig, uintptr_t handler)');
const _sigprocmask = libc.func('int sigprocmask(int how, void *set, void *old)');
const _setpriority = libc.func('int setpriority(int which, int who, int prio)');
const _poll = libc.func('int poll(_Inout_ void *fds, unsigned long nfds, int timeout)');
const _pipe2 = libc.func('int pipe2(_Out_ int *fds, int flags)');
const _tee = libc.func('intptr_t tee(int fdin, int fdout, size_t len, unsigned int flags)');
const _socket = libc.func('int socket(int domain, int type, int protocol)');
const _send = libc.func('intptr_t send(int fd, void *buf, size_t len, int flags)');
const _recv = libc.func('intptr_t recv(int fd, _Inout_ void *buf, size_t len, int flags)');
const _setsockopt = libc.func('int setsockopt(int fd, int level, int name, void *val, uint32_t len)');
const _vmReadv = libc.func('intptr_t process_vm_readv(int pid, void *local, unsigned long liovcnt, void *remote, unsigned long riovcnt, unsigned long flags)');
const _ioctl = libc.func('int ioctl(int fd, unsigned long req, _Inout_ void *arg)');
const _vmWritev = libc.func('intptr_t process_vm_writev(int pid, void *local, unsigned long liovcnt, void *remote, unsigned long riovcnt, unsigned long flags)');



export const errnoNow = (): number => koffi.errno();
export const addressOf = (buf: Buffer): bigint => koffi.address(buf) as bigint;

/** Throw a CkptError carrying errno when a libc call returned -1. */
function check(ret: number, op: string, detail: string): number {
  if (ret === -1) {
    const e = koffi.errno();
    throw new CkptError(e, op, detail);
  }
  return ret;
}

export const sys = {
  ptrace(req: number, pid: number, addr: number | bigint = 0, data: number | bigint = 0): number {
    return _ptraceN(req, pid, addr, data) as number;
  },
  ptraceBuf(req: number, pid: number, addr: number | bigint, data: Buffer): number {
    return _ptraceP(req, pid, addr, data) as number;
  },
  /** Returns [pid, status]; pid -1 with errno on failure, 0 with WNOHANG. */
  waitpid(pid: number, options: number): [number, number] {
    const st = [0];
    const r = _waitpid(pid, st, options) as number;
    return [r, st[0]];
  },
  /** Raw syscall with up to 6 long arguments; returns -1 and sets errno. */
  syscall(nr: number, ...args: (number | bigint)[]): number {
    const va: unknown[] = [];
    for (const a of args) va.push('long', a);
    return Number(_syscall(nr, ...va));
  },
  kill(pid: number, sig: number): number {
    return _kill(pid, sig) as number;
  },
  tgkill(tgid: number, tid: number, sig: number): number {
    return sys.syscall(SYS.tgkill, tgid, tid, sig);
  },
  fcntl(fd: number, cmd: number, arg = 0): number {
    return _fcntl(fd, cmd, 'int', arg) as number;
  },
  prctl(option: number, a2: number | bigint = 0, a3: number | bigint = 0, a4 = 0, a5 = 0): number {
    return _prctl(option, a2, a3, a4, a5) as number;
  },
  prctlBuf(option: number, a2: number, a3: Buffer): number {
    return _prctlP(option, a2, a3, 0, 0) as number;
  },
  /** execvp(3): PATH search, the C environment as it is. */
  execvp(file: string, argv: string[]): number {
    return _execvp(file, [...argv, null]) as number;
  },
  signalDefault(sig: number): void {
    _signal(sig, 0);
  },
  signalIgnore(sig: number): void {
    _signal(sig, 1);
  },
  unblockAllSignals(): void {
    _sigprocmask(2 /* SIG_SETMASK */, Buffer.alloc(128), null);
  },
  setpriority(which: number, who: number, prio: number): number {
    return _setpriority(which, who, prio) as number;
  },
  /** poll(2) on one fd; returns revents or 0 on timeout. */
  pollOne(fd: number, events: number, timeoutMs: number): number {
    const b = Buffer.alloc(8);
    b.writeInt32LE(fd, 0);
    b.writeInt16LE(events, 4);
    const r = check(_poll(b, 1, timeoutMs) as number, 'poll', `fd ${fd}`);
    return r === 0 ? 0 : b.readInt16LE(6);
  },
  pipe2(flags: number): [number, number] {
    const fds = [0, 0];
    check(_pipe2(fds, flags) as number, 'pipe2', 'supervisor');
    return [fds[0], fds[1]];
  },
  socket(domain: number, type: number, protocol: number): number {
    return check(_socket(domain, type, protocol) as number, 'socket', 'supervisor');
  },
  send(fd: number, buf: Buffer, flags: number): number {
    return Number(_send(fd, buf, buf.length, flags));
  },
  /** recv(2) into buf; bytes or -1 (errnoNow() tells why). */
  recv(fd: number, buf: Buffer, flags: number): number {
    return Number(_recv(fd, buf, buf.length, flags));
  },
  setsockoptInt(fd: number, level: number, name: number, value: number): number {
    const b = Buffer.alloc(4);
    b.writeInt32LE(value);
    return _setsockopt(fd, level, name, b, 4) as number;
  },
  /** ioctl(2) with a struct argument (read and written in place); -1 and errno on failure. */
  ioctl(fd: number, req: bigint, arg: Buffer): number {
    return _ioctl(fd, req, arg) as number;
  },
  /** tee(2): duplicate up to len bytes of a pipe into another, without consuming. */
  tee(fdin: number, fdout: number, len: number, flags: number): number {
    return Number(_tee(fdin, fdout, len, flags));
  },
  /**
   * Scatter-gather between one local buffer and many remote ranges, in one
   * call: process_vm_readv (read) or process_vm_writev. Bytes moved or -1.
   */
  vmMany(read: boolean, pid: number, buf: Buffer, ranges: { addr: bigint; len: number }[]): number {
    const local = Buffer.alloc(16);
    local.writeBigUInt64LE(koffi.address(buf) as bigint, 0);
    local.writeBigUInt64LE(BigInt(buf.length), 8);
    const remote = Buffer.alloc(16 * ranges.length);
    ranges.forEach((r, i) => {
      remote.writeBigUInt64LE(r.addr, i * 16);
      remote.writeBigUInt64LE(BigInt(r.len), i * 16 + 8);
    });
    return Number((read ? _vmReadv : _vmWritev)(pid, local, 1, remote, ranges.length, 0));
  },
  /** process_vm_readv into buf from addr; bytes read or -1. */
  vmRead(pid: number, buf: Buffer, addr: bigint): number {
    return sys.vmMany(true, pid, buf, [{ addr, len: buf.length }]);
  },
  vmWrite(pid: number, buf: Buffer, addr: bigint): number {
    return sys.vmMany(false, pid, buf, [{ addr, len: buf.length }]);
  },
  posixSpawn(path: string, argv: string[], envp: string[]): number {
    const pid = [0];
    const r = _posixSpawn(pid, path, null, null, [...argv, null], [...envp, null]) as number;
    if (r !== 0) throw new CkptError(r, 'posix_spawn', path);
    return pid[0];
  },
  pidfdOpen(pid: number): number {
    return check(sys.syscall(SYS.pidfd_open, pid, 0), 'pidfd_open', `pid ${pid}`);
  },
  /** Duplicate fd `fd` of process `pid` into the supervisor. */
  pidfdGetfd(pidfd: number, fd: number): number {
    return sys.syscall(SYS.pidfd_getfd, pidfd, fd, 0);
  },
  /**
   * Send descriptor `fd` over unix socket `sock` in one SCM_RIGHTS message
   * (one byte of payload, as a datagram must carry something). -1 and errno
   * on failure.
   */
  sendFd(sock: number, fd: number): number {
    const payload = Buffer.from([0]);
    const iov = Buffer.alloc(16);
    iov.writeBigUInt64LE(addressOf(payload), 0);
    iov.writeBigUInt64LE(1n, 8);
    // cmsghdr: len (CMSG_LEN(4) = 20), level SOL_SOCKET, type SCM_RIGHTS, the fd; padded to CMSG_SPACE(4)
    const cmsg = Buffer.alloc(24);
    cmsg.writeBigUInt64LE(20n, 0);
    cmsg.writeInt32LE(1, 8);
    cmsg.writeInt32LE(1, 12);
    cmsg.writeInt32LE(fd, 16);
    const msg = Buffer.alloc(56); // struct msghdr: no name; iov, iovlen, control, controllen
    msg.writeBigUInt64LE(addressOf(iov), 16);
    msg.writeBigUInt64LE(1n, 24);
    msg.writeBigUInt64LE(addressOf(cmsg), 32);
    msg.writeBigUInt64LE(24n, 40);
    const r = sys.syscall(SYS.sendmsg, sock, addressOf(msg), 0x4000 /* MSG_NOSIGNAL */);
    void [payload, iov, cmsg]; // alive until the call returned
    return r;
  },
  /** The very open file behind fd `fd` of process `pid`, as a descriptor of ours; -1 if none. */
  takeFd(pid: number, fd: number): number {
    const pidfd = sys.syscall(SYS.pidfd_open, pid, 0);
    if (pidfd < 0) return -1;
    const mine = sys.pidfdGetfd(pidfd, fd);
    _close(pidfd);
    return mine;
  },
};

export { check };

/** x86-64 syscall numbers used by the supervisor or injected into tracees. */
export const SYS = {
  read: 0, write: 1, open: 2, close: 3, lseek: 8, mmap: 9, mprotect: 10, munmap: 11,
  brk: 12, rt_sigaction: 13, rt_sigprocmask: 14, madvise: 28, dup2: 33, getpid: 39,
  clone: 56, fork: 57, wait4: 61, kill: 62, fcntl: 72, chdir: 80, fchdir: 81, umask: 95,
  getuid: 102, getppid: 110, prctl: 157, arch_prctl: 158, gettid: 186, tgkill: 234, openat: 257,
  mremap: 25, set_robust_list: 273, dup3: 292, rt_tgsigqueueinfo: 297,
  pidfd_open: 434, clone3: 435, close_range: 436, pidfd_getfd: 438, mlock2: 325, mlock: 149, mlockall: 151,
  setresuid: 117, setresgid: 119, socketpair: 53, sendmsg: 46, recvmsg: 47, setgroups: 116, sigaltstack: 131, exit: 60,
} as const;
