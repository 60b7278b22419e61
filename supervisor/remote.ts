/**
 * Remote syscalls (rr's AutoRemoteSyscalls): make a stopped tracee run
 * syscalls we choose, then put back every register and byte we touched.
 *
 * From a seccomp stop the first call swaps orig_rax and runs to the syscall
 * exit (PTRACE_SYSCALL). From any other stop we point rip at a `syscall`
 * instruction and single-step it: the step trap is a SIGTRAP
 * signal-delivery-stop, i.e. inside get_signal(), so when the saved
 * registers are put back the kernel still applies its own -ERESTART*
 * handling to the interrupted syscall and no such code leaks to the program.
 */
import fs from 'node:fs';
import { CkptError, errno } from '../lib/errors.js';
import { PT, PTRACE_EVENT, Regs, getRegs, setRegs, getEventMsg } from '../lib/ptrace.js';
import { sys, SYS, errnoNow } from '../lib/libc.js';
import { RemoteMem } from '../lib/mem.js';
import { readMaps } from '../lib/proc.js';
import { log } from '../lib/log.js';
import type { Task, Tracer } from './tracer.js';

const SIGTRAP = 5;
const FAULTS = new Set([4 /* SIGILL */, 7 /* SIGBUS */, 11 /* SIGSEGV */]);
const ARG_REGS = ['rdi', 'rsi', 'rdx', 'r10', 'r8', 'r9'] as const;
const SYS_fcntl = 72, F_DUPFD_CLOEXEC = 1030, O_CLOEXEC_SOCK = 0o2000000;

export class Remote {
  readonly saved: Regs;
  private syscallAddr: bigint;
  private scratchAddr = 0n;
  private ownScratch = false;
  /** Children created by an injected fork/clone, by their pid. */
  readonly newChildren: number[] = [];
  mem: RemoteMem;

  /** `syscallAt`: a syscall instruction known to be there (a gadget), so none is looked for. */
  constructor(readonly tracer: Tracer, readonly task: Task, syscallAt?: bigint) {
    if (task.stop === 'running') throw new Error(`remote: task ${task.tid} is not stopped`);
    this.saved = getRegs(task.tid);
    this.mem = new RemoteMem(task.tid, true);
    this.syscallAddr = syscallAt ?? this.findSyscallInsn();
  }

  /** rip-2 when the task sits just after a syscall instruction, else one in [vdso]. */
  private findSyscallInsn(): bigint {
    const rip = this.saved.get('rip');
    try {
      const b = this.mem.read(rip - 2n, 2);
      if (b[0] === 0x0f && b[1] === 0x05) return rip - 2n;
    } catch { /* rip at a page start; fall through */ }
    const vdso = readMaps(this.task.tgid).find((m) => m.path === '[vdso]');
    if (vdso) {
      const text = this.mem.read(vdso.start, Number(vdso.end - vdso.start));
      for (let i = 0; i + 1 < text.length; i++) if (text[i] === 0x0f && text[i + 1] === 0x05) return vdso.start + BigInt(i);
    }
    throw new CkptError(errno('EOPNOTSUPP'), 'remote', `task ${this.task.tid}: no syscall instruction found`);
  }

  private batchCode = 0n;
  private batchTable = 0n;
  private batchMax = 0;
  private batchStack = 0n;

  /**
   * The restore gadget's batch loop and table (see memory.ts installGadget);
   * `stack`: the stack pointer its batches run with, where the task's own
   * may not do (sigaltstack refuses to change while the sp is on the
   * alternate stack: a thread rolled back inside a handler).
   */
  useBatchAt(code: bigint, table: bigint, max: number, stack = 0n): void {
    this.batchCode = code;
    this.batchTable = table;
    this.batchMax = max;
    this.batchStack = stack;
  }

  /**
   * Run many syscalls with one resume: the gadget's loop executes the table
   * and stops on int3. Results in order (raw, signed). Without a gadget,
   * one injected call each.
   */
  batch(calls: (number | bigint)[][]): bigint[] {
    if (!this.batchCode) return calls.map(([nr, ...args]) => this.call(Number(nr), ...args));
    const out: bigint[] = [];
    for (let i = 0; i < calls.length; i += this.batchMax) {
      this.beginBatch(calls.slice(i, i + this.batchMax));
      out.push(...this.endBatch());
    }
    return out;
  }

  /** At most this many calls go in one beginBatch (the gadget's table). */
  get batchLimit(): number {
    return this.batchMax;
  }

  private startedBatch?: { regs: Regs; n: number };

  /**
   * Start one batch through the gadget (at most batchLimit calls) and
   * return at once, so the supervisor can do other work while it runs;
   * endBatch waits for it and gives the results.
   */
  beginBatch(calls: (number | bigint)[][]): void {
    if (!this.batchCode || calls.length > this.batchMax) throw new Error(`remote: task ${this.task.tid}: no gadget for a batch of ${calls.length}`);
    const table = Buffer.alloc(64 * calls.length);
    calls.forEach((c, j) => c.forEach((v, k) => table.writeBigInt64LE(BigInt.asIntN(64, BigInt(v)), j * 64 + k * 8)));
    this.mem.write(this.batchTable, table);
    const regs = this.saved.clone();
    regs.set('rip', this.batchCode);
    regs.set('rbx', this.batchTable);
    regs.set('r12', calls.length);
    regs.set('orig_rax', -1n);
    if (this.batchStack) regs.set('rsp', this.batchStack);
    this.startedBatch = { regs, n: calls.length };
    this.start(regs, PT.CONT);
  }

  endBatch(): bigint[] {
    const s = this.startedBatch;
    if (!s) throw new Error(`remote: task ${this.task.tid}: endBatch() without beginBatch()`);
    this.startedBatch = undefined;
    this.finishRun(s.regs, PT.CONT);
    const done = this.mem.read(this.batchTable, 64 * s.n);
    log.remote('%d: batch of %d syscalls', this.task.tid, s.n);
    return Array.from({ length: s.n }, (_, j) => done.readBigInt64LE(j * 64 + 56));
  }

  /** Use another syscall instruction from now on (the restore gadget). */
  useSyscallAt(addr: bigint): void {
    this.syscallAddr = addr;
  }

  /** Run one syscall in the tracee; returns the raw (signed) result. */
  call(nr: number, ...args: (bigint | number)[]): bigint {
    this.begin(nr, ...args);
    return this.end();
  }

  private started?: { regs: Regs; req: number; nr: number; args: (bigint | number)[] };

  /**
   * Start one syscall and return at once; `end` waits for it. Several
   * tracees can be started before any is waited for, so that their round
   * trips overlap (see callEach).
   */
  begin(nr: number, ...args: (bigint | number)[]): void {
    const t = this.task;
    const regs = this.saved.clone();
    ARG_REGS.forEach((r, i) => regs.set(r, BigInt(args[i] ?? 0)));
    let req: number;
    if (t.stop === 'seccomp') {
      regs.set('orig_rax', nr);
      req = PT.SYSCALL;
    } else {
      regs.set('rip', this.syscallAddr);
      regs.set('rax', nr);
      // -1: no syscall in progress, so the kernel does not "restart" ours.
      regs.set('orig_rax', -1n);
      req = PT.SINGLESTEP;
    }
    this.started = { regs, req, nr, args };
    this.start(regs, req);
  }

  /** Wait for the syscall `begin` started; its raw (signed) result. */
  end(): bigint {
    const s = this.started;
    if (!s) throw new Error(`remote: task ${this.task.tid}: end() without begin()`);
    this.started = undefined;
    this.finishRun(s.regs, s.req);
    const res = getRegs(this.task.tid).getSigned('rax');
    log.remote('%d: syscall %d(%s) = %d', this.task.tid, s.nr, s.args.join(', '), res);
    return res;
  }

  /**
   * Run a syscall that does not return (exit_group), or deliver `sig` if nr
   * is 0, and follow the task until it is gone.
   */
  runToExit(nr: number, arg: number, sig = 0): void {
    const t = this.task;
    const regs = this.saved.clone();
    if (nr) {
      regs.set('rip', this.syscallAddr);
      regs.set('rax', nr);
      regs.set('rdi', arg);
      regs.set('orig_rax', -1n);
    }
    setRegs(t.tid, regs);
    this.mem.close();
    if (sig) sys.tgkill(t.tgid, t.tid, sig);
    for (let deliver = 0; ; ) {
      if (sys.ptrace(PT.CONT, t.tid, 0, deliver) === -1) return;
      const ev = this.tracer.wait(t.tid);
      if (!ev || ev.kind !== 'stopped') return;
      deliver = ev.event === 0 && !ev.syscallStop ? ev.signal : 0;
    }
  }

  private start(regs: Regs, req: number): void {
    this.tracer.roundTrips++;
    setRegs(this.task.tid, regs);
    if (sys.ptrace(req, this.task.tid, 0, 0) === -1) throw this.gone();
  }

  private finishRun(regs: Regs, req: number): void {
    const t = this.task;
    for (;;) {
      const ev = this.tracer.wait(t.tid);
      if (!ev || ev.kind !== 'stopped') throw this.gone();
      if (ev.event === PTRACE_EVENT.FORK || ev.event === PTRACE_EVENT.CLONE || ev.event === PTRACE_EVENT.VFORK) {
        const child = getEventMsg(t.tid);
        this.tracer.add(child, ev.event === PTRACE_EVENT.CLONE ? undefined : child);
        this.newChildren.push(child);
      } else if (ev.syscallStop || (ev.signal === SIGTRAP && ev.event === 0)) {
        break;
      } else if (ev.event === 0 && FAULTS.has(ev.signal) && getRegs(t.tid).get('rip') === regs.get('rip')) {
        // Our own injected code faulted (no gadget there any more?): never retry it.
        throw new CkptError(errno('EFAULT'), 'remote', `task ${t.tid}: injected code at 0x${regs.get('rip').toString(16)} faulted (signal ${ev.signal})`);
      } else if (ev.event === 0) {
        t.heldSignals.push(ev.signal); // a real signal: keep it for later
      } // otherwise a stray PTRACE_EVENT_STOP (a pending interrupt): go on
      if (sys.ptrace(req, t.tid, 0, 0) === -1) throw this.gone();
    }
    t.stop = 'stopped';
  }

  /**
   * `len` bytes of the task's own stack, below the red zone, to use as
   * scratch without mapping anything (two injected syscalls fewer): the
   * bytes are saved here and must be put back with `putBack`. Undefined
   * where the stack cannot be read there.
   */
  stackScratch(len: number): { addr: bigint; putBack: () => void } | undefined {
    const addr = (this.saved.get('rsp') - 128n - BigInt(len) - 64n) & ~15n;
    let old: Buffer;
    try {
      old = this.mem.read(addr, len);
    } catch {
      return undefined;
    }
    return { addr, putBack: () => this.mem.write(addr, old) };
  }

  /** Move tracee descriptor `fd` to a number >= `min` (close-on-exec), if it is below. */
  raise(fd: bigint, min: number): bigint {
    if (fd >= BigInt(min)) return fd;
    const hi = this.check('remote:fd', SYS_fcntl, fd, F_DUPFD_CLOEXEC, min);
    this.call(SYS.close, fd);
    return hi;
  }

  /**
   * The open file behind fd `fd` of process `pid` (named as this tracee sees
   * it), as a descriptor of this tracee numbered >= `min`: injected
   * pidfd_open + pidfd_getfd, every temporary kept off the low numbers.
   */
  takeFd(pid: number, fd: number, min = 0): bigint {
    const pidfd = this.raise(this.check('remote:fd', SYS.pidfd_open, pid, 0), min);
    let got: bigint;
    try {
      got = this.call(SYS.pidfd_getfd, pidfd, fd, 0);
    } finally {
      this.call(SYS.close, pidfd);
    }
    // pidfd_getfd needs ptrace rights over `pid`: a process that dropped its
    // root (setuid(1000) in a root tree) may not take the supervisor's or a
    // root sibling's files. The supervisor may take them, so it hands the file
    // over itself through a socket pair made in this tracee.
    if (got === -BigInt(errno('EPERM'))) return this.handOver(pid, fd, min);
    if (got < 0n && got > -4096n) throw new CkptError(Number(-got), 'remote:fd', `task ${this.task.tid}: pidfd_getfd of fd ${fd} of ${pid} failed`);
    return this.raise(got, min);
  }

  /** Give this tracee fd `fd` of `pid` by SCM_RIGHTS from the supervisor (see takeFd). */
  private handOver(pid: number, fd: number, min: number): bigint {
    if (pid === process.pid) return this.receiveFd(fd, min);
    const mine = sys.takeFd(pid, fd);
    if (mine < 0) throw new CkptError(errnoNow(), 'remote:fd', `task ${this.task.tid}: fd ${fd} of ${pid} cannot be taken`);
    try {
      return this.receiveFd(mine, min);
    } finally {
      fs.closeSync(mine);
    }
  }

  /**
   * The supervisor's descriptor `mine`, given to this tracee (numbered >=
   * `min`) through a socket pair made in it: the supervisor takes one end
   * (it may take from any tracee) and sends on it, the tracee receives on
   * the other. Needs no right over the supervisor, nor a pid that names it.
   */
  receiveFd(mine: number, min = 0): bigint {
    const at = this.scratch();
    const ends: bigint[] = [];
    try {
      this.check('remote:fd socketpair', SYS.socketpair, 1 /* AF_UNIX */, 2 | O_CLOEXEC_SOCK /* SOCK_DGRAM */, 0, at);
      const pair = this.mem.read(at, 8);
      ends.push(BigInt(pair.readInt32LE(0)), BigInt(pair.readInt32LE(4)));
      const sender = sys.takeFd(this.task.tgid, Number(ends[1]));
      if (sender < 0) throw new CkptError(errnoNow(), 'remote:fd', `task ${this.task.tid}: its socket cannot be taken`);
      const sent = sys.sendFd(sender, mine);
      const sendErr = errnoNow();
      fs.closeSync(sender);
      if (sent < 0) throw new CkptError(sendErr, 'remote:fd sendmsg', `task ${this.task.tid}: cannot send it a descriptor`);
      // msghdr at +64 (iov at +128 -> one byte at +160, control at +192, CMSG_SPACE(4) = 24)
      const msg = Buffer.alloc(56);
      msg.writeBigUInt64LE(at + 128n, 16);
      msg.writeBigUInt64LE(1n, 24);
      msg.writeBigUInt64LE(at + 192n, 32);
      msg.writeBigUInt64LE(24n, 40);
      const iov = Buffer.alloc(16);
      iov.writeBigUInt64LE(at + 160n, 0);
      iov.writeBigUInt64LE(1n, 8);
      this.mem.write(at + 64n, msg);
      this.mem.write(at + 128n, iov);
      this.mem.write(at + 192n, Buffer.alloc(24));
      this.check('remote:fd recvmsg', SYS.recvmsg, ends[0], at + 64n, 0x40000000 /* MSG_CMSG_CLOEXEC */);
      const cmsg = this.mem.read(at + 192n, 24);
      if (cmsg.readInt32LE(8) !== 1 || cmsg.readInt32LE(12) !== 1) throw new CkptError(errno('EIO'), 'remote:fd recvmsg', `task ${this.task.tid}: no descriptor came with the message`);
      return this.raise(BigInt(cmsg.readInt32LE(16)), min);
    } finally {
      for (const e of ends) this.call(SYS.close, e);
    }
  }

  /** Like call(), but a negative result throws with its errno. */
  check(what: string, nr: number, ...args: (bigint | number)[]): bigint {
    const r = this.call(nr, ...args);
    if (r < 0n && r > -4096n) throw new CkptError(Number(-r), what, `task ${this.task.tid}: injected syscall ${nr} failed`);
    return r;
  }

  /** A page of scratch memory in the tracee (mapped on first use unless given). */
  scratch(): bigint {
    if (!this.scratchAddr) {
      this.scratchAddr = this.check('remote:scratch', SYS.mmap, 0, 4096, 3, 0x22, -1, 0);
      this.ownScratch = true;
    }
    return this.scratchAddr;
  }

  setScratch(addr: bigint): void {
    this.scratchAddr = addr;
    this.ownScratch = false;
  }

  /** Put back the registers (and free scratch) so the task is as we found it. */
  finish(): void {
    try {
      if (this.ownScratch) this.call(SYS.munmap, this.scratchAddr, 4096);
      setRegs(this.task.tid, this.saved);
    } finally {
      this.mem.close();
    }
  }

  private gone(): CkptError {
    return new CkptError(errno('ESRCH'), 'remote', `task ${this.task.tid} died during an injected syscall`);
  }
}

/**
 * One injected call in each of several stopped tracees, all started before
 * any is waited for, so that the round trips overlap. `meanwhile` runs
 * while they are in flight: the supervisor's own work (reading /proc, say)
 * that would otherwise wait its turn. Results in order; every started call
 * is waited for even after a failure, and then the first failure is thrown.
 */
export function callEach(remotes: Remote[], call: (r: Remote, i: number) => [number, ...(bigint | number)[]], meanwhile?: () => void): bigint[] {
  const begun: Remote[] = [];
  let failure: unknown;
  for (const [i, r] of remotes.entries()) {
    try {
      const [nr, ...args] = call(r, i);
      r.begin(nr, ...args);
      begun.push(r);
    } catch (e) {
      failure = e;
      break;
    }
  }
  if (!failure && meanwhile) {
    try {
      meanwhile();
    } catch (e) {
      failure = e;
    }
  }
  // Each task must be stopped again before anything else is done with it.
  const out = begun.map((r) => {
    try {
      return r.end();
    } catch (e) {
      failure ??= e;
      return 0n;
    }
  });
  if (failure) throw failure;
  return out;
}

/**
 * Syscalls collected to run with one resume of the gadget's batch loop
 * (Remote.batch), their in-memory arguments laid out side by side in
 * scratch. Each call says what it does, for the error when it fails.
 */
export class CallBatch {
  private readonly calls: (bigint | number)[][] = [];
  private readonly whats: (string | undefined)[] = [];
  private readonly blobs: { at: bigint; data: Buffer }[] = [];
  private next: bigint;
  private readonly end: bigint;

  constructor(readonly r: Remote, room = 4096) {
    this.next = r.scratch();
    this.end = this.next + BigInt(room);
  }

  /** A place in scratch for `data` (written there when the batch runs). */
  put(data: Buffer): bigint {
    const at = this.next;
    this.next += BigInt((data.length + 15) & ~15);
    if (this.next > this.end) throw new Error(`remote: task ${this.r.task.tid}: batch arguments exceed the scratch space`);
    this.blobs.push({ at, data });
    return at;
  }

  /** A call whose failure fails the batch (`what` names it), or, with `what` undefined, one that may fail. */
  add(what: string | undefined, nr: number, ...args: (bigint | number)[]): void {
    this.calls.push([nr, ...args]);
    this.whats.push(what);
  }

  /** Run everything (in order, all of it), then throw for the first required call that failed. */
  run(): bigint[] {
    if (!this.calls.length) return [];
    for (const b of this.blobs) this.r.mem.write(b.at, b.data);
    const res = this.r.batch(this.calls);
    res.forEach((x, i) => {
      const what = this.whats[i];
      if (what && x < 0n && x > -4096n) throw new CkptError(Number(-x), what, `task ${this.r.task.tid}: injected syscall ${this.calls[i][0]} failed`);
    });
    return res;
  }
}
