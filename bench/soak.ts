/**
 * Soak benchmark (not a test): a program does N cycles of CKPT_DEFER
 * checkpoint, rollback and release under one supervisor, which is sampled
 * (VmRSS from /proc) every 10 cycles. The garbage collector moves RSS up
 * and down by tens of MiB, so each window of 250 cycles is summed up by its
 * lowest sample (the floor after a collection); prints those and the growth
 * per 1000 cycles after a warm-up (least squares over the floors past it).
 * The supervisor runs with --trace-gc: the JavaScript heap left after each
 * full collection (what the program really holds) is shown beside it.
 *
 *   node dist/bench/soak.js [CYCLES] [WARMUP]     (default 2000 500)
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CLI = path.join(ROOT, 'dist/supervisor/cli.js');
const cycles = Number(process.argv[2] ?? 2000);
const warmup = Number(process.argv[3] ?? 500);
const dir = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'ckpt-soak-'));

const rssKiB = (pid: number) => Number(/^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);

const sv = spawn(process.execPath, ['--trace-gc', CLI, '--', path.join(ROOT, 'fixtures/bin/soak'), path.join(dir, 'state'), String(cycles)], { stdio: ['ignore', 'pipe', 'inherit'] });
const samples: { cycle: number; kib: number; ms: number }[] = [];
/** Heap MB after each full collection, with the cycle it happened in. */
const heaps: { cycle: number; mb: number }[] = [];
const t0 = performance.now();
let ok = false;
for await (const line of readline.createInterface({ input: sv.stdout! })) {
  const m = /^cycle (\d+)$/.exec(line);
  if (m) samples.push({ cycle: Number(m[1]), kib: rssKiB(sv.pid!), ms: performance.now() - t0 });
  else if (line === 'SOAK OK') ok = true;
  else if (/Mark-Compact/.test(line)) {
    const h = /-> ([0-9.]+) \(/.exec(line);
    if (h) heaps.push({ cycle: samples[samples.length - 1]?.cycle ?? 0, mb: Number(h[1]) });
  } else if (!/ms: (Scavenge|Mark-Compact|Minor)/.test(line)) console.log(line);
}
await new Promise((res) => sv.once('exit', res));
fs.rmSync(dir, { recursive: true, force: true });
if (!ok) throw new Error('the soak program did not finish');

const WINDOW = 250;
const floors: { cycle: number; kib: number; ms: number }[] = [];
for (const s of samples) {
  const w = Math.ceil(s.cycle / WINDOW) * WINDOW;
  const f = floors[floors.length - 1];
  if (!f || f.cycle !== w) floors.push({ cycle: w, kib: s.kib, ms: s.ms });
  else {
    f.kib = Math.min(f.kib, s.kib);
    f.ms = s.ms;
  }
}
console.log('cycles  RSS floor MiB  RSS max MiB  heap after full GC MB  ms/cycle');
floors.forEach((f, i) => {
  const prev = floors[i - 1];
  const max = Math.max(...samples.filter((s) => s.cycle > f.cycle - WINDOW && s.cycle <= f.cycle).map((s) => s.kib));
  const hs = heaps.filter((h) => h.cycle >= f.cycle - WINDOW && h.cycle < f.cycle).map((h) => h.mb);
  console.log(`${String(f.cycle).padStart(6)}  ${(f.kib / 1024).toFixed(1).padStart(13)}  ${(max / 1024).toFixed(1).padStart(11)}  ${(hs.length ? Math.min(...hs).toFixed(1) : '-').padStart(21)}  ${((f.ms - (prev?.ms ?? 0)) / (f.cycle - (prev?.cycle ?? 0))).toFixed(2).padStart(8)}`);
});
const past = floors.filter((s) => s.cycle > warmup);
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
/** Least-squares slope of y over x. */
function slopeOf(pts: { x: number; y: number }[]): number {
  const mx = mean(pts.map((p) => p.x)), my = mean(pts.map((p) => p.y));
  return pts.reduce((a, p) => a + (p.x - mx) * (p.y - my), 0) / pts.reduce((a, p) => a + (p.x - mx) ** 2, 0);
}
const rss = slopeOf(past.map((f) => ({ x: f.cycle, y: f.kib / 1024 })));
const heapPast = heaps.filter((h) => h.cycle > warmup);
const heap = heapPast.length > 1 ? slopeOf(heapPast.map((h) => ({ x: h.cycle, y: h.mb }))) : NaN;
console.log(`\ngrowth after cycle ${warmup}, per 1000 cycles: RSS ${(rss * 1000).toFixed(2)} MiB (least squares over ${past.length} window floors; floor ${(past[0].kib / 1024).toFixed(1)} -> ${(past[past.length - 1].kib / 1024).toFixed(1)} MiB), JavaScript heap after full collections ${(heap * 1000).toFixed(2)} MB (over ${heapPast.length} collections)`);
