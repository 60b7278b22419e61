/** Shared by the tests: paths and running things under ckpt-supervise. */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const BIN = path.join(ROOT, 'fixtures/bin');
export const SUPERVISE = [process.execPath, path.join(ROOT, 'dist/supervisor/cli.js')];
export const CKPT = [process.execPath, path.join(ROOT, 'dist/supervisor/tool.js')];
export const fixture = (name: string) => path.join(BIN, name);

// Some tests run fixtures as uid 1000 or nobody: they must be able to reach
// them (and the tree's cwd) even when the checkout lies below a private
// directory (a CI clone under mktemp -d, mode 0700). Search permission only,
// on the checkout's own directories and their parents.
if (process.getuid?.() === 0) {
  for (let d = ROOT.replace(/\/$/, ''); d && d !== '/'; d = path.dirname(d)) {
    const mode = fs.statSync(d).mode;
    if (!(mode & 0o001)) fs.chmodSync(d, (mode & 0o7777) | 0o001);
  }
}

export interface RunResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run a command (tests may use child_process; only the supervisor may not). */
export function run(cmd: string[], opts: { input?: Buffer | string; timeout?: number; cwd?: string; env?: NodeJS.ProcessEnv } = {}): RunResult {
  const r = spawnSync(cmd[0], cmd.slice(1), {
    input: opts.input,
    env: opts.env ?? process.env,
    timeout: opts.timeout ?? 120_000,
    cwd: opts.cwd ?? ROOT,
    maxBuffer: 1 << 30,
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

/** `ckpt-supervise -- cmd...` */
export const supervise = (cmd: string[], opts?: Parameters<typeof run>[1]) => run([...SUPERVISE, '--', ...cmd], opts);

/** A fresh temporary directory for one test file. */
export function tmpdir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `ckpt-${tag}-`));
}

/** Does a process with this pid run (a zombie waiting for its reaper does not)? */
export function pidAlive(pid: number): boolean {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !'ZX'.includes(s[s.lastIndexOf(')') + 2]);
  } catch {
    return false;
  }
}

/** Shell-quote for sh -c command lines. */
export const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** A self-checking fixture taken to an image in `dir` and restarted, or checkpointed in memory and rolled back ("undo"). */
export function bothWays(dir: string, name: string, args: string[] = [], opts: { timeout?: number } = {}) {
  return (mode: 'restart' | 'undo') => {
    const img = path.join(dir, `${name}.img`);
    const first = supervise([fixture(name), mode === 'undo' ? 'undo' : img, ...args], { timeout: opts.timeout ?? 60_000 });
    if (mode === 'undo') return { first, r: first };
    return { first, r: supervise([...CKPT, 'restart', '-i', img], { timeout: opts.timeout ?? 60_000 }) };
  };
}

/**
 * The commands `cmds` of Debian package `pkg`, installed with apt-get first
 * if they are missing (as root). false when they are there, else why a test
 * needing them is skipped.
 */
export function needPackage(pkg: string, cmds: string[]): string | false {
  const have = () => cmds.every((c) => spawnSync('sh', ['-c', `command -v ${c}`], { stdio: 'ignore' }).status === 0);
  if (have()) return false;
  if (process.getuid?.() === 0) spawnSync('apt-get', ['install', '-y', pkg], { stdio: 'ignore', timeout: 600_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return have() ? false : `${cmds.join(', ')} not installed, and apt-get could not install ${pkg}`;
}

/** Run a command to its end without blocking this process (a client of the program lives here meanwhile). */
export function runAsync(cmd: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ status: number | null; out: string }> {
  return new Promise((res) => {
    const p = spawn(cmd[0], cmd.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('exit', (status) => res({ status, out }));
  });
}

/** Wait (polling every 25 ms) until `what` holds, at most `ms`; whether it held. */
export async function until(what: () => boolean, ms: number): Promise<boolean> {
  for (let i = 0; i < ms / 25 && !what(); i++) await new Promise((r) => setTimeout(r, 25));
  return what();
}

/**
 * Shell steps, for a tree whose subtree root is $S, that take a CKPT_DEFER
 * checkpoint of it (file CKPTED in `dir` once taken), wait for the file ROLL,
 * roll back (`undo status N`), and say ROLLED.
 */
export function deferThenUndo(dir: string): string {
  const ckpt = CKPT.map((a) => `'${a}'`).join(' ');
  return [
    `C=$(${ckpt} checkpoint $S --defer); echo "crid $C"; touch ${dir}/CKPTED`,
    `while [ ! -e ${dir}/ROLL ]; do sleep 0.05; done`,
    `${ckpt} undo $C; echo "undo status $?"; touch ${dir}/ROLLED`,
  ].join('; ');
}
