/**
 * Benchmark (not a test) of in-memory checkpoints, side by side in one run:
 *  - stop time of a CKPT_DEFER checkpoint, as the caller's latency and as
 *    the largest gap a running thread of the program observes, next to a
 *    plain fork() of the same process (the floor, also measured without a
 *    supervisor) and to a checkpoint to a file; medians with min and max;
 *  - write-back rate next to a plain read of the same bytes from /proc/PID/mem;
 *  - supervisor-private bytes per checkpoint;
 *  - undo (rollback) time for 0.1%, 1%, 100% of 1 GiB changed, next to a
 *    memcpy of the changed bytes.
 *
 *   node dist/bench/memckpt.js [MiB ...]     (default 256 1024 4096; BENCH_UNDO_MIB: undo size, 1024)
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

/** KEY=median,min,max as the fixtures print a series. */
interface Series { med: number; min: number; max: number }
function series(text: string, key: string): Series {
  const m = new RegExp(`${key}=([0-9.]+),([0-9.]+),([0-9.]+)`).exec(text);
  return m ? { med: Number(m[1]), min: Number(m[2]), max: Number(m[3]) } : { med: NaN, min: NaN, max: NaN };
}
/** "median (min..max)": the spread shows, not just the best run. */
const spread = (s: Series, d = 1) => `${f(s.med, d)} (${f(s.min, d)}..${f(s.max, d)})`;

// Each operation twice: the caller's latency (how long the call took in the
// thread that made it) and the largest gap a running thread of the program
// saw meanwhile (how long the program was stopped). fork stops no other
// thread: its gap is only contention; under the supervisor its call time
// also holds the tracer's fork event, so the floor is taken outside it too.
const stop: string[][] = [['MiB', 'fork call ms (unsupervised)', 'fork call ms', 'fork gap ms', 'DEFER call ms', 'DEFER gap ms', 'DEFER call/fork call', 'DEFER gap/fork call', 'to-file call ms', 'to-file gap ms', 'writeback GB/s', '/proc/mem GB/s', 'private KiB']];
for (const mb of sizes.length ? sizes : [256, 1024, 4096]) {
  const bare = spawnSync(bin('stopbench'), [String(mb), '-', '5'], { encoding: 'utf8', timeout: 600_000 }).stdout;
  const out = run([bin('stopbench'), String(mb), path.join(dir, 'stop.img'), '5', '3']);
  const floor = series(bare, 'fork_call_ms'), fork = series(out, 'fork_call_ms'), defer = series(out, 'defer_call_ms'), gap = series(out, 'defer_gap_ms');
  stop.push([String(mb), spread(floor), spread(fork), spread(series(out, 'fork_gap_ms')), spread(defer), spread(gap), f(defer.med / floor.med, 2), f(gap.med / floor.med, 2),
    spread(series(out, 'file_call_ms')), spread(series(out, 'file_gap_ms')), f(num(out, 'writeback_gbs'), 2), f(num(out, 'procmem_gbs'), 2), f(num(out, 'private_bytes') / 1024)]);
  fs.rmSync(path.join(dir, 'stop.img'), { force: true });
}
table('stop time: median (min..max) of 5 runs (3 for to-file); ratios of medians, to fork outside the supervisor', stop);

// Undo with dirty tracking (the default) and by page-frame comparison
// (--no-track-dirty), next to memcpy of the changed bytes and to a plain
// process_vm_readv of the same pages from another process: the floor for
// any copy between two address spaces on this machine.
const undoMb = Number(process.env.BENCH_UNDO_MIB ?? 1024); // smaller for a quick check that the bench runs
const undo: string[][] = [['changed', 'bytes', 'undo ms median (min..max)', 'frames ms median (min..max)', 'memcpy ms', 'cross-process copy ms', 'undo/memcpy', 'undo/copy']];
for (const [label, permille] of [['0.1%', 1], ['1%', 10], ['100%', 1000]] as const) {
  const args = [bin('undobench'), path.join(dir, 'undo.state'), String(undoMb), String(permille), '9'];
  const out = run(args), frames = run(args, ['--no-track-dirty']);
  const mc = num(out, 'memcpy_ms'), pvm = num(out, 'pvm_ms'), u = num(out, 'undo_ms');
  const of = (t: string): Series => ({ med: num(t, 'undo_ms'), min: num(t, 'min_ms'), max: num(t, 'max_ms') });
  undo.push([label, String(num(out, 'changed_bytes')), spread(of(out), 2), spread(of(frames), 2), f(mc, 3), f(pvm, 2), f(u / Math.max(mc, 0.001)), f(u / Math.max(pvm, 0.001))]);
}
table(`undo of a ${undoMb} MiB process (9 rollbacks each; program-side time from restart() to arriving at the checkpoint)`, undo);
fs.rmSync(dir, { recursive: true, force: true });
