/**
 * Benchmark (not a test): the CKPT_DEFER stop of a process holding MAP_SHARED
 * memory (anonymous and memfd), side by side in one run with what it must
 * cost at least: a fork of the same process (page tables) plus one copy of
 * the shared bytes (fork does not snapshot shared memory, so the stop copies
 * it). The copy is shown into memory already touched and into fresh memory
 * (a copy that is kept pays the page faults too).
 *
 *   node dist/bench/shmstop.js [MiB ...]     (default 8 16 64)
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CLI = path.join(ROOT, 'dist/supervisor/cli.js');
const sizes = process.argv.slice(2).map(Number).filter(Boolean);
const num = (text: string, key: string) => Number(new RegExp(`${key}=([0-9.]+)`).exec(text)?.[1]);
const f = (x: number, d = 1) => x.toFixed(d);

const rows: string[][] = [['MiB', 'kind', 'fork ms', 'memcpy ms', 'memcpy fresh ms', 'fork+copy ms', 'DEFER stop ms', 'call ms', 'stop/(fork+copy)']];
for (const mb of sizes.length ? sizes : [8, 16, 64]) {
  for (const kind of ['anon', 'memfd']) {
    const r = spawnSync(process.execPath, [CLI, '--', path.join(ROOT, 'fixtures/bin/shmstop'), String(mb), kind], { encoding: 'utf8', timeout: 600_000 });
    if (r.status !== 0) throw new Error(`shmstop ${mb} ${kind}: ${r.status}\n${r.stdout}\n${r.stderr}`);
    const fork = num(r.stdout, 'fork_ms'), fresh = num(r.stdout, 'memcpy_fresh_ms'), stop = num(r.stdout, 'defer_gap_ms');
    rows.push([String(mb), kind, f(fork, 2), f(num(r.stdout, 'memcpy_ms')), f(fresh), f(fork + fresh), f(stop), f(num(r.stdout, 'defer_call_ms')), f(stop / (fork + fresh), 2)]);
  }
}
console.log('CKPT_DEFER stop with MAP_SHARED memory (largest gap seen by a running thread; best of 3 each)');
const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const r of rows) console.log(r.map((c, i) => c.padStart(w[i])).join('  '));
