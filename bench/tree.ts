/**
 * Benchmark (not a test) of whole trees, side by side in one run: stop time
 * and restart time of a 4-thread process (the worker pool) and of a
 * 3-process tree joined by a pipe (sh | counter | cat), for a checkpoint to
 * a file and for a CKPT_DEFER one. Stop times are the supervisor's own
 * (freeze to thaw, from its DEBUG=ckpt:syscall lines); restart time is the
 * restart() call as the caller sees it (fixtures/timerestart).
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

const cases = {
  '4-thread process': (img: string, flags: number) =>
    `${q(bin('pool'))} - & sleep 0.3; ${q(bin('callabi'))} checkpoint $! ${flags & 1 ? 'none' : `w:${q(img)}`} ${flags}; kill -9 $! 2>/dev/null; wait`,
  '3-process pipe tree': (img: string, flags: number) =>
    `sh -c ${q(`${bin('counter')} 40 20 | cat > /dev/null`)} & sleep 0.2; ${q(bin('callabi'))} checkpoint $! ${flags & 1 ? 'none' : `w:${q(img)}`} ${flags}; kill -9 $! 2>/dev/null; wait`,
};

const rows = [['subtree', 'to-file stop ms', 'DEFER stop ms', 'restart ms', 'image KiB']];
for (const [name, script] of Object.entries(cases)) {
  const file: number[] = [], defer: number[] = [], restart: number[] = [];
  let size = 0;
  for (let i = 0; i < 5; i++) {
    const img = path.join(dir, `t${i}.img`);
    const a = sup(['sh', '-c', script(img, 0)]);
    // freeze + capture + image: the subtree is stopped for all three
    const m = /freeze ([\d.]+) ms, capture ([\d.]+) ms, image ([\d.]+) ms/.exec(a.err);
    if (m) file.push(Number(m[1]) + Number(m[2]) + Number(m[3]));
    size = fs.statSync(img).size;
    const b = sup(['sh', '-c', script(img + '.d', 1)]);
    defer.push(ms(/in memory: stopped ([\d.]+) ms/, b.err));
    // restart: the restored subtree then runs to its end
    const c = sup([bin('timerestart'), img]);
    restart.push(ms(/restart_ms=([\d.]+)/, c.out));
  }
  rows.push([name, median(file).toFixed(2), median(defer).toFixed(2), median(restart).toFixed(2), (size / 1024).toFixed(0)]);
}
fs.rmSync(dir, { recursive: true, force: true });
console.log('whole trees (median of 5)');
const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const r of rows) console.log(r.map((c, i) => c.padStart(w[i])).join('  '));
