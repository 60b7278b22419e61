#!/usr/bin/env node
/**
 * ckpt: the shell's way to the ckpt system calls (inside a supervised tree),
 * and `ckpt inspect`, which reads an image anywhere.
 */
import fs from 'node:fs';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { sys, errnoNow } from '../lib/libc.js';
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

/** Wait for a child (the restored root) and exit as it did. */
function exitLike(pid: number): never {
  for (;;) {
    const [r, st] = sys.waitpid(pid, 0);
    if (r === -1 && errnoNow() === EINTR) continue;
    if (r === -1) fail(`waitpid ${pid}: ${errnoName(errnoNow())}`);
    if ((st & 0x7f) === 0) process.exit((st >> 8) & 0xff);
    if ((st & 0x7f) !== 0x7f) process.exit(128 + (st & 0x7f));
  }
}

await yargs(hideBin(process.argv))
  .scriptName('ckpt')
  .command(
    'checkpoint <pid>',
    'checkpoint the subtree rooted at pid (0: this ckpt process) to a file or stdout',
    (y) => y
      .positional('pid', { type: 'number', demandOption: true })
      .option('o', { alias: 'output', type: 'string', describe: 'image file (default: stdout)' })
      .option('kill', { type: 'boolean', default: false, describe: 'kill the subtree after the checkpoint' }),
    (a) => {
      const fd = a.o ? fs.openSync(a.o, 'w') : 1;
      const crid = call('checkpoint', a.pid, fd, a.kill ? CKPT.KILL : 0);
      process.stderr.write(`ckpt: checkpoint ${crid} of ${a.pid}${a.o ? ` written to ${a.o}` : ''}\n`);
    },
  )
  .command(
    'restart',
    'restart from an image (file or stdin); waits for the restored root and exits with its status',
    (y) => y.option('i', { alias: 'input', type: 'string', describe: 'image file (default: stdin)' }),
    (a) => {
      const fd = a.i ? fs.openSync(a.i, 'r') : 0;
      const pid = call('restart', 0, fd, 0);
      if (a.i) fs.closeSync(fd);
      process.stderr.write(`ckpt: restarted as pid ${pid}\n`);
      exitLike(pid);
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
