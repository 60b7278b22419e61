/**
 * Benchmark (not a test) of whole trees, side by side in one run: stop time
 * and restart time of a 4-thread process (the worker pool) and of a
 * 3-process tree joined by a pipe (sh | counter | cat), for a checkpoint to
 * a file and for a CKPT_DEFER one. Stop times are the supervisor's own
 * (freeze to thaw, from its DEBUG=ckpt:syscall lines); restart time is the
 * restart() call as the caller sees it (fixtures/timerestart).
 *
 * Each figure is given twice: for the first call a supervisor serves (its
 * JavaScript still cold: lazily compiled, interpreted) and for the calls
 * after it (the next 5), over 3 supervisors: medians with min and max.
 *
 *   node dist/bench/tree.js
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SUP = [path.join(ROOT, 'dist/supervisor/cli.js'), '--'];
const bin = (n: string) => path.join(ROOT, 'fixtures/bin', n);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ckpt-bench-'));
const q = (s: string) => `'${s}'`;

function sup(args: string[]): { out: string; err: string } {
  const r = spawnSync(process.execPath, [...SUP, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, DEBUG: 'ckpt:syscall' } });
  return { out: r.stdout, err: r.stderr };
}
const ms = (re: RegExp, text: string) => Number(re.exec(text)?.[1] ?? NaN);
const median = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const ROUNDS = 6;
const cases = {
  '4-thread process': (img: string, flags: number) =>
    `${q(bin('pool'))} - & sleep 0.3; for i in $(seq ${ROUNDS}); do ${q(bin('callabi'))} checkpoint $! ${flags & 1 ? 'none' : `w:${q(img)}`} ${flags} >/dev/null; done; kill -9 $! 2>/dev/null; wait`,
  '3-process pipe tree': (img: string, flags: number) =>
    `sh -c ${q(`${bin('counter')} 400 20 | cat > /dev/null`)} & sleep 0.2; for i in $(seq ${ROUNDS}); do ${q(bin('callabi'))} checkpoint $! ${flags & 1 ? 'none' : `w:${q(img)}`} ${flags} >/dev/null; done; pkill -9 -P $!; kill -9 $! 2>/dev/null; wait`,
};

/** [first, the rest] of the stop times a supervisor logged. */
function stops(err: string, re: RegExp): [number, number[]] {
  const all = [...err.matchAll(re)].map((m) => Number(m[1]));
  return [all[0], all.slice(1)];
}

const rows = [['subtree', 'to-file stop ms (first / then)', 'DEFER stop ms (first / then)', 'restart ms (first / then)', 'image KiB']];
const RUNS = Number(process.env.BENCH_RUNS ?? 3); // supervisors per figure
for (const [name, script] of Object.entries(cases)) {
  const cols: number[][] = [[], [], [], [], [], []];
  let size = 0;
  for (let i = 0; i < RUNS; i++) {
    const img = path.join(dir, `t${i}.img`);
    const a = stops(sup(['sh', '-c', script(img, 0)]).err, /to a file: stopped ([\d.]+) ms/g);
    size = fs.statSync(img).size;
    const b = stops(sup(['sh', '-c', script(img + '.d', 1)]).err, /in memory: stopped ([\d.]+) ms/g);
    // restart: the restored tree is killed and restarted again, ROUNDS times
    const c = sup([bin('timerestart'), img, String(ROUNDS)]).out;
    const warm = (/warm_all=([\d.,]+)/.exec(c)?.[1] ?? '').split(',').filter(Boolean).map(Number);
    // The first calls: one per supervisor; the calls after: every one of every supervisor.
    cols[0].push(a[0]); cols[1].push(...a[1]); cols[2].push(b[0]); cols[3].push(...b[1]);
    cols[4].push(ms(/restart_ms=([\d.]+)/, c)); cols[5].push(...warm);
  }
  // median (min..max): of the supervisors' first calls / of all the calls after them
  const spread = (xs: number[]) => `${median([...xs]).toFixed(2)} (${Math.min(...xs).toFixed(2)}..${Math.max(...xs).toFixed(2)})`;
  const pair = (k: number) => `${spread(cols[k])} / ${spread(cols[k + 1])}`;
  rows.push([name, pair(0), pair(2), pair(4), (size / 1024).toFixed(0)]);
}
fs.rmSync(dir, { recursive: true, force: true });
console.log(`whole trees: median (min..max) of the first call of ${RUNS} supervisors / of the ${ROUNDS - 1} calls after it in each`);
const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const r of rows) console.log(r.map((c, i) => c.padStart(w[i])).join('  '));
