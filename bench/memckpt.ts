/**
 * Benchmark (not a test) of in-memory checkpoints, side by side in one run:
 *  - stop time of a CKPT_DEFER checkpoint, as the largest gap a running
 *    thread of the program observes, next to a plain fork() of the same
 *    process (the floor) and to a checkpoint to a file;
 *  - write-back rate next to a plain read of the same bytes from /proc/PID/mem;
 *  - supervisor-private bytes per checkpoint;
 *  - undo (rollback) time for 0.1%, 1%, 100% of 1 GiB changed, next to a
 *    memcpy of the changed bytes.
 *
 *   node dist/bench/memckpt.js [MiB ...]     (default 256 1024 4096)
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CLI = path.join(ROOT, 'dist/supervisor/cli.js');
const bin = (n: string) => path.join(ROOT, 'fixtures/bin', n);
const sizes = process.argv.slice(2).map(Number).filter(Boolean);
const dir = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'ckpt-bench-'));

function run(args: string[], options: string[] = []): string {
  const r = spawnSync(process.execPath, [CLI, ...options, '--', ...args], { encoding: 'utf8', maxBuffer: 1 << 26, timeout: 600_000 });
  if (r.status !== 0) throw new Error(`${args.join(' ')}: ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}
const num = (text: string, key: string) => Number(new RegExp(`${key}=([0-9.]+)`).exec(text)?.[1]);
const f = (x: number, d = 1) => x.toFixed(d);

function table(title: string, rows: string[][]): void {
  console.log(`\n${title}`);
  const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  for (const r of rows) console.log(r.map((c, i) => c.padStart(w[i])).join('  '));
}

const stop: string[][] = [['MiB', 'fork ms', 'DEFER stop ms', 'DEFER/fork', 'to-file stop ms', 'file/fork', 'writeback GB/s', '/proc/mem GB/s', 'private KiB']];
for (const mb of sizes.length ? sizes : [256, 1024, 4096]) {
  const out = run([bin('stopbench'), String(mb), path.join(dir, 'stop.img')]);
  const fork = num(out, 'fork_ms'), defer = num(out, 'defer_gap_ms'), file = num(out, 'file_gap_ms');
  stop.push([String(mb), f(fork), f(defer), f(defer / fork, 2), f(file), f(file / fork), f(num(out, 'writeback_gbs'), 2), f(num(out, 'procmem_gbs'), 2), f(num(out, 'private_bytes') / 1024)]);
  fs.rmSync(path.join(dir, 'stop.img'), { force: true });
}
table('stop time (largest gap seen by a running thread; best of 3 for fork and DEFER, 1 for to-file)', stop);

// Undo with dirty tracking (the default) and by page-frame comparison
// (--no-track-dirty), next to memcpy of the changed bytes and to a plain
// process_vm_readv of the same pages from another process: the floor for
// any copy between two address spaces on this machine.
const undo: string[][] = [['changed', 'bytes', 'undo ms (median)', 'undo ms (min)', 'frames ms (median)', 'memcpy ms', 'cross-process copy ms', 'undo/memcpy', 'undo/copy']];
for (const [label, permille] of [['0.1%', 1], ['1%', 10], ['100%', 1000]] as const) {
  const args = [bin('undobench'), path.join(dir, 'undo.state'), '1024', String(permille), '9'];
  const out = run(args), frames = run(args, ['--no-track-dirty']);
  const mc = num(out, 'memcpy_ms'), pvm = num(out, 'pvm_ms'), u = num(out, 'undo_ms');
  undo.push([label, String(num(out, 'changed_bytes')), f(u, 2), f(num(out, 'min_ms'), 2), f(num(frames, 'undo_ms'), 2), f(mc, 3), f(pvm, 2), f(u / Math.max(mc, 0.001)), f(u / Math.max(pvm, 0.001))]);
}
table('undo of a 1 GiB process (9 rollbacks each; program-side time from restart() to arriving at the checkpoint)', undo);
fs.rmSync(dir, { recursive: true, force: true });
