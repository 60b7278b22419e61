#!/usr/bin/env node
/**
 * ckpt: the shell's way to the ckpt system calls (inside a supervised tree),
 * and `ckpt inspect`, which reads an image anywhere.
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { sys, errnoNow, addressOf } from '../lib/libc.js';
import { errnoName, CkptError } from '../lib/errors.js';
import { NR, CKPT } from '../syscalls/abi.js';
import { describeImage, formatDescription } from './inspect.js';

const ENOSYS = 38, EINTR = 4;

function call(name: keyof typeof NR, ...args: (number | bigint)[]): number {
  const r = sys.syscall(NR[name], ...args);
  if (r < 0) {
    const e = errnoNow();
    if (e === ENOSYS) fail(`${name}: not running under ckpt-supervise (ENOSYS)`);
    fail(`${name}: ${errnoName(e)} (see the ckpt-supervise log for the reason)`);
  }
  return r;
}

function fail(msg: string): never {
  process.stderr.write(`ckpt: ${msg}\n`);
  process.exit(1);
}

/** ckpt_query into a growing buffer; the parsed JSON. */
function query(crid: number): unknown {
  let buf = Buffer.alloc(4096);
  for (;;) {
    const n = call('ckpt_query', crid, addressOf(buf), buf.length, 0);
    if (n <= buf.length) return JSON.parse(buf.subarray(0, n).toString());
    buf = Buffer.alloc(n);
  }
}

/**
 * Wait for a child (the restored root) and exit as it did (`done` first).
 * `stopped`: called when it is stopped by job control.
 */
function exitLike(pid: number, done: () => void = () => {}, stopped?: () => void): never {
  for (;;) {
    const [r, st] = sys.waitpid(pid, stopped ? WUNTRACED : 0);
    if (r === -1 && errnoNow() === EINTR) continue;
    if (r === -1) fail(`waitpid ${pid}: ${errnoName(errnoNow())}`);
    if ((st & 0xff) === 0x7f) stopped?.();
    if ((st & 0x7f) !== 0x7f) done();
    if ((st & 0x7f) === 0) process.exit((st >> 8) & 0xff);
    if ((st & 0x7f) !== 0x7f) process.exit(128 + (st & 0x7f));
  }
}

const TCGETS2 = 0x802c542an, TCSETS2 = 0x402c542bn, TIOCSPGRP = 0x5410n, TIOCGPGRP = 0x540fn, SIGTTOU = 22, SIGTSTP = 20, SIGCONT = 18, SYS_getpgrp = 111, WUNTRACED = 2;

function pgrpState(pgid: number): string | undefined {
  try {
    const s = fs.readFileSync(`/proc/${pgid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2, s.lastIndexOf(')') + 3);
  } catch {
    return undefined;
  }
}

const sleepMs = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/** The process group of a process, or undefined. */
function pgidOf(pid: number | string): number | undefined {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[2]);
  } catch {
    return undefined;
  }
}

/** The supervisor: this process's tracer, or 0. */
function tracerPid(): number {
  try {
    return Number(/^TracerPid:\s*(\d+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/**
 * Job control for a restored foreground job in a group of its own: when ^Z
 * stops it, the terminal goes back to this job (the shell's), which is
 * stopped in turn so the shell sees it; when the shell continues it, the
 * restored job gets the terminal (and its termios) back and continues.
 *
 * Two shapes of job: `ckpt-supervise -- ckpt restart` started by a shell
 * outside (the supervisor, untraced, leads the group: it stops, while this
 * process, its tracee, ignores the stop so that the supervisor is not asked
 * to serve it while stopped, and waits until the supervisor runs again);
 * or `ckpt restart` started by a job-control shell inside the tree (the
 * group holds no supervisor: this process stops with the rest of its group
 * and goes on when the shell continues it).
 */
function jobControl(giveBack: () => void): () => void {
  return () => {
    const fg = Buffer.alloc(4), theirs = Buffer.alloc(44);
    if (sys.ioctl(0, TIOCGPGRP, fg) < 0 || sys.ioctl(0, TCGETS2, theirs) < 0) return;
    const mine = sys.syscall(SYS_getpgrp);
    if (fg.readInt32LE(0) === mine) return; // in this group: the kernel stopped it with us
    giveBack();
    const tracer = tracerPid();
    if (tracer > 0 && pgidOf(tracer) === mine) {
      sys.signalIgnore(SIGTSTP);
      sys.kill(-mine, SIGTSTP);
      // Until the shell continues this job (its leader stops, then runs again).
      for (let i = 0; i < 50 && pgrpState(mine) !== 'T'; i++) sleepMs(20);
      while (pgrpState(mine) === 'T') sleepMs(20);
      sys.signalDefault(SIGTSTP);
    } else {
      sys.signalDefault(SIGTSTP);
      sys.kill(-mine, SIGTSTP); // stops this process too, before the call returns; it returns once continued
    }
    sys.signalIgnore(SIGTTOU);
    sys.ioctl(0, TIOCSPGRP, fg);
    sys.ioctl(0, TCSETS2, theirs);
    sys.signalDefault(SIGTTOU);
    sys.kill(-fg.readInt32LE(0), SIGCONT);
  };
}

/**
 * The terminal on stdin as `ckpt restart` found it: a restored foreground
 * job gets it (its termios, its process group); when the job ends, the
 * terminal is given back to this process's group with these termios, so
 * the shell finds it as it left it.
 */
function holdTerminal(): () => void {
  const t = Buffer.alloc(44);
  if (sys.ioctl(0, TCGETS2, t) < 0) return () => {};
  return () => {
    sys.signalIgnore(SIGTTOU); // it may be in the background of its terminal by now
    const pg = Buffer.alloc(4);
    pg.writeInt32LE(sys.syscall(SYS_getpgrp), 0);
    sys.ioctl(0, TIOCSPGRP, pg);
    sys.ioctl(0, TCSETS2, t);
    sys.signalDefault(SIGTTOU);
  };
}

/** Is this process in the subtree of `pid` (or unsure: in a pid namespace /proc may not show)? */
function inSubtree(pid: number): boolean {
  if (pid === 0) return true;
  const status = (p: number | string) => fs.readFileSync(`/proc/${p}/status`, 'utf8');
  try {
    if ((/^NSpid:(.*)$/m.exec(status('self'))?.[1].trim().split(/\s+/).length ?? 1) > 1) return true;
    for (let p = process.pid; p > 1; p = Number(/^PPid:\s*(\d+)/m.exec(status(p))?.[1] ?? 0)) if (p === pid) return true;
  } catch {
    return true;
  }
  return false;
}

const OUTPUT = { alias: 'output', type: 'string', describe: 'image file (default: stdout)' } as const;

await yargs(hideBin(process.argv))
  .scriptName('ckpt')
  .command(
    'checkpoint <pid>',
    'checkpoint the subtree rooted at pid (0: this ckpt process) to a file or stdout, or into memory',
    (y) => y
      .positional('pid', { type: 'number', demandOption: true })
      .option('o', OUTPUT)
      .option('kill', { type: 'boolean', default: false, describe: 'kill the subtree after the checkpoint' })
      .option('defer', { type: 'boolean', default: false, describe: 'keep it in memory only (CKPT_DEFER); prints the crid' })
      .option('keep', { type: 'boolean', default: false, describe: 'write the image and keep it in memory too (CKPT_KEEP)' }),
    (a) => {
      if (a.defer && (a.keep || a.o)) fail('--defer keeps the checkpoint in memory only: no --keep, no -o');
      const flags = (a.kill ? CKPT.KILL : 0) | (a.defer ? CKPT.DEFER : 0) | (a.keep ? CKPT.KEEP : 0);
      // The image goes to FILE.tmp and is renamed when whole. When this
      // process is in the checkpointed subtree it goes to FILE itself: with
      // --kill it would never get to rename it, and a restart reopens the
      // descriptor by its path. Either is removed if the checkpoint fails.
      const written = a.o ? (a.kill || inSubtree(a.pid) ? a.o : `${a.o}.tmp`) : undefined;
      const fd = a.defer ? -1 : written ? fs.openSync(written, 'w') : 1;
      // Become ckpt-call to make the call: this Node process could not be
      // kept by a checkpoint of a subtree it belongs to ("ckpt checkpoint $$").
      for (const f of [0, 1, 2, fd]) if (f >= 0) sys.fcntl(f, 2 /* F_SETFD */, 0);
      const helper = fileURLToPath(new URL('./ckpt-call', import.meta.url));
      const what = `${a.pid}${a.o ? ` written to ${a.o}` : ''}${a.defer || a.keep ? ' (kept in memory)' : ''}`;
      sys.execvp(helper, [helper, String(a.pid), String(fd), String(flags), a.defer ? '1' : '0', what, ...(written ? [written, a.o!] : [])]);
      const e = errnoNow();
      if (written) fs.rmSync(written, { force: true });
      fail(`cannot run ${helper}: ${errnoName(e)}`);
    },
  )
  .command(
    'writeback <crid>',
    'write an in-memory checkpoint as an image (then release it, unless --keep)',
    (y) => y
      .positional('crid', { type: 'number', demandOption: true })
      .option('o', OUTPUT)
      .option('keep', { type: 'boolean', default: false }),
    (a) => {
      const fd = a.o ? fs.openSync(a.o, 'w') : 1;
      call('ckpt_writeback', a.crid, fd, a.keep ? CKPT.KEEP : 0);
      process.stderr.write(`ckpt: checkpoint ${a.crid} written${a.o ? ` to ${a.o}` : ''}\n`);
    },
  )
  .command('release <crid>', 'discard an in-memory checkpoint', (y) => y.positional('crid', { type: 'number', demandOption: true }), (a) => {
    call('ckpt_release', a.crid, 0);
  })
  .command('list', 'the in-memory checkpoints (from ckpt_query)', (y) => y.option('json', { type: 'boolean', default: false }), (a) => {
    const list = query(0) as ReturnType<typeof JSON.parse>[];
    if (a.json) return void process.stdout.write(JSON.stringify(list, null, 2) + '\n');
    const mib = (n: number) => (n / (1 << 20)).toFixed(1);
    process.stdout.write('crid  root   processes  referenced MiB  private KiB  stopped ms  written  created\n');
    for (const c of list) {
      process.stdout.write(`${String(c.crid).padEnd(5)} ${String(c.root).padEnd(6)} ${String(c.pids.length).padEnd(10)} ${mib(c.referencedBytes).padStart(14)} ${(c.privateBytes / 1024).toFixed(1).padStart(12)} ${c.stopMs.toFixed(2).padStart(11)}  ${c.writtenBack ? 'yes' : 'no '}      ${c.created}\n`);
    }
  })
  .command('undo <crid>', 'bring the checkpointed subtree back to the checkpoint (rollback, or restore if it is gone)', (y) => y.positional('crid', { type: 'number', demandOption: true }), (a) => {
    const pid = call('restart', a.crid, -1, 0);
    process.stderr.write(`ckpt: subtree ${pid} is back at checkpoint ${a.crid}\n`);
  })
  .command(
    'restart',
    'restart from an image (file or stdin); waits for the restored root and exits with its status',
    (y) => y.option('i', { alias: 'input', type: 'string', describe: 'image file (default: stdin)' }),
    (a) => {
      let fd = 0;
      if (a.i) {
        try {
          fd = fs.openSync(a.i, 'r');
        } catch (e) {
          fail(`restart: cannot open the image ${a.i}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        }
      }
      const giveBack = holdTerminal();
      const pid = call('restart', 0, fd, 0);
      if (a.i) fs.closeSync(fd);
      process.stderr.write(`ckpt: restarted as pid ${pid}\n`);
      exitLike(pid, giveBack, jobControl(giveBack));
    },
  )
  .command(
    'inspect <file>',
    'describe an image: header, processes, mappings, descriptors (works anywhere)',
    (y) => y.positional('file', { type: 'string', demandOption: true }).option('json', { type: 'boolean', default: false }),
    (a) => {
      const fd = a.file === '-' ? 0 : fs.openSync(a.file, 'r');
      try {
        const d = describeImage(fd);
        process.stdout.write(a.json ? JSON.stringify(d, null, 2) + '\n' : formatDescription(d));
      } catch (e) {
        fail(e instanceof CkptError ? `${a.file}: ${errnoName(e.errno)}: ${e.detail}` : String(e));
      }
    },
  )
  .demandCommand(1)
  .strict()
  .help()
  .parseAsync();
