/**
 * Benchmark (not a test): checkpoint to a file, image size and restart time
 * for a process with 64 MiB and 1 GiB of touched memory, side by side with a
 * memcpy of the same bytes and with dd writing / reading them.
 *
 *   npm run bench            # both sizes
 *   node dist/bench/roundtrip.js 64
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SUP = [path.join(ROOT, 'dist/supervisor/cli.js'), '--'];
const bin = (n: string) => path.join(ROOT, 'fixtures/bin', n);
const sizes = process.argv.slice(2).map(Number).filter(Boolean);
const dir = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'ckpt-bench-'));

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout + r.stderr;
}
const num = (text: string, key: string) => Number(new RegExp(`${key}=([0-9.]+)`).exec(text)?.[1]);
function timeMs(cmd: string, args: string[]): number {
  const t = process.hrtime.bigint();
  sh(cmd, args);
  return Number(process.hrtime.bigint() - t) / 1e6;
}

/** Median, min and max of a series; shown as "median (min..max)". */
function stats(xs: number[]): { med: number; min: number; max: number } {
  const s = [...xs].sort((a, b) => a - b);
  return { med: s[Math.floor(s.length / 2)], min: s[0], max: s[s.length - 1] };
}
const f = (x: number) => x.toFixed(1);
const spread = (xs: number[]) => {
  const s = stats(xs);
  return `${f(s.med)} (${f(s.min)}..${f(s.max)})`;
};

const RUNS = 3;
const rows: string[][] = [['MiB', 'checkpoint ms', 'image MiB', 'restart ms', 'memcpy ms', 'dd write ms', 'dd read ms', 'ckpt/memcpy', 'ckpt/dd-w', 'rst/memcpy', 'rst/dd-r']];
for (const mb of sizes.length ? sizes : [64, 1024]) {
  const img = path.join(dir, `m${mb}.img`);
  const raw = path.join(dir, `m${mb}.raw`);
  const runs = { ckpt: [] as number[], memcpy: [] as number[], restart: [] as number[], ddw: [] as number[], ddr: [] as number[] };
  for (let i = 0; i < RUNS; i++) {
    const a = sh(process.execPath, [...SUP, bin('memhog'), String(mb), img]);
    runs.ckpt.push(num(a, 'checkpoint_ms'));
    runs.memcpy.push(num(a, 'memcpy_ms'));
    const b = sh(process.execPath, [...SUP, bin('timerestart'), img]);
    if (!/status=0/.test(b)) throw new Error(`restored process failed: ${b}`);
    runs.restart.push(num(b, 'restart_ms'));
    runs.ddw.push(timeMs('dd', ['if=/dev/zero', `of=${raw}`, 'bs=1M', `count=${mb}`, 'status=none']));
    runs.ddr.push(timeMs('dd', [`if=${raw}`, 'of=/dev/null', 'bs=1M', 'status=none']));
  }
  const size = fs.statSync(img).size / (1 << 20);
  const m = (xs: number[]) => stats(xs).med;
  rows.push([String(mb), spread(runs.ckpt), f(size), spread(runs.restart), spread(runs.memcpy), spread(runs.ddw), spread(runs.ddr),
    f(m(runs.ckpt) / m(runs.memcpy)), f(m(runs.ckpt) / m(runs.ddw)), f(m(runs.restart) / m(runs.memcpy)), f(m(runs.restart) / m(runs.ddr))]);
  fs.rmSync(img);
  fs.rmSync(raw);
}
fs.rmSync(dir, { recursive: true });
console.log(`checkpoint -> file and restart <- file (median (min..max) of ${RUNS} runs, ratios of medians; page cache warm; dd times include process start)`);
const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const r of rows) console.log(r.map((c, i) => c.padStart(w[i])).join('  '));
