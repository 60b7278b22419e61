/**
 * Calls in flight (supervisor/io.ts): an image going through a pipe, a FIFO
 * or a socket whose other end is a tracee of the same tree (or of another
 * supervisor) never deadlocks the loop, and a checkpoint of a process that
 * forks without pause succeeds every time.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { CKPT, SUPERVISE, fixture, supervise, tmpdir, q } from './helpers.js';

const dir = tmpdir('inflight');
const ckpt = CKPT.map(q).join(' ');
const counter = (n = 30, ms = 250) => `${q(fixture('counter'))} ${n} ${ms}`;
const steps = (s: string) => s.match(/^step \d+$/gm) ?? [];
const all30 = Array.from({ length: 30 }, (_, i) => `step ${i + 1}`);

t.test('ckpt checkpoint P --kill | ckpt restart, in one tree', async (t) => {
  const r = supervise(['sh', '-c', `${counter()} & p=$!; sleep 0.5; ${ckpt} checkpoint $p --kill | ${ckpt} restart; echo "restart status=$?"`], { timeout: 60_000 });
  t.match(r.stdout, /done n=30 sum=right/, 'the counter finished in its restored self');
  t.match(r.stdout, /restart status=0/, 'ckpt restart exits with the restored root\'s status');
  t.same(steps(r.stdout), all30, 'no step lost or repeated');
  t.equal(r.status, 0, r.stderr);
});

t.test('(sleep 1; cat img) | ckpt restart: the restart waits for a slow writer in its tree', async (t) => {
  const img = path.join(dir, 'slow.img');
  const first = supervise(['sh', '-c', `${counter()} & p=$!; sleep 0.5; ${ckpt} checkpoint $p --kill -o ${q(img)}; wait`]);
  const before = steps(first.stdout);
  t.ok(before.length > 0 && before.length < 30, `checkpointed mid-way (${before.length} steps)`);
  const t0 = Date.now();
  const r = supervise(['sh', '-c', `(sleep 1; cat ${q(img)}) | ${ckpt} restart`], { timeout: 60_000 });
  t.ok(Date.now() - t0 >= 1000, 'it waited for the image');
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /done n=30 sum=right/);
  t.same([...before, ...steps(r.stdout)], all30, 'no step lost or repeated');
});

t.test('a FIFO whose reader starts after the checkpoint began', async (t) => {
  const fifo = path.join(dir, 'fifo');
  const img = path.join(dir, 'fifo.img');
  fs.rmSync(fifo, { force: true });
  // The writer opens the FIFO read-write (so it does not wait for a reader
  // itself); the image is larger than the pipe, so the write blocks until
  // cat, started a second later, reads it: cat's exec needs the loop.
  const first = supervise(['sh', '-c', `mkfifo ${q(fifo)}; ${counter()} & p=$!; sleep 0.5; ${ckpt} checkpoint $p --kill 1<>${q(fifo)} & sleep 1; cat ${q(fifo)} > ${q(img)}; wait`], { timeout: 60_000 });
  t.equal(first.status, 0, first.stderr);
  t.ok(fs.statSync(img).size > 65536, `the image went through the FIFO (${fs.statSync(img).size} bytes)`);
  const before = steps(first.stdout);
  const r = supervise([...CKPT, 'restart', '-i', img]);
  t.equal(r.status, 0, r.stderr);
  t.same([...before, ...steps(r.stdout)], all30, 'no step lost or repeated');
});

t.test('two supervisors joined by a pipe: the writer kills and reaps before the image is complete', async (t) => {
  const out = path.join(dir, 'two.out');
  const cmd = `${SUPERVISE.map(q).join(' ')} -- sh -c ${q(`${counter()} > ${q(out)} & p=$!; sleep 0.5; ${ckpt} checkpoint $p --kill`)} | ${SUPERVISE.map(q).join(' ')} -- ${ckpt} restart`;
  const r = spawnSync('sh', ['-c', cmd], { timeout: 60_000 });
  t.equal(r.status, 0, r.stderr.toString());
  const text = fs.readFileSync(out, 'utf8');
  t.match(text, /done n=30 sum=right/, 'the counter finished under the second supervisor, with its own pid');
  t.same(steps(text), all30, 'no step lost or repeated');
});

t.test('a reader that dies mid-stream gives EPIPE, and the subtree runs on as it was', async (t) => {
  const r = supervise(['sh', '-c', `${counter(40, 200)} & p=$!; sleep 0.5; ${ckpt} checkpoint $p --kill | head -c 100 > /dev/null; wait $p; echo "counter status=$?"`], { timeout: 60_000 });
  t.match(r.stderr, /checkpoint: EPIPE/, 'the checkpoint failed with EPIPE');
  t.match(r.stderr, /ckpt-supervise: task \d+: checkpoint: EPIPE/, 'with one log line naming the task');
  t.match(r.stdout, /done n=40 sum=right/, 'the counter was not killed and finished');
  t.match(r.stdout, /counter status=0/);
});

t.test('writeback into a pipe whose reader is a tracee that starts late', async (t) => {
  const img = path.join(dir, 'wb.img');
  const first = supervise(['sh', '-c', `${counter(30, 200)} & p=$!; sleep 0.5; c=$(${ckpt} checkpoint $p --defer); ${ckpt} writeback $c | (sleep 0.5; cat > ${q(img)}); wait $p`], { timeout: 60_000 });
  t.equal(first.status, 0, first.stderr);
  const r = supervise([...CKPT, 'restart', '-i', img]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /done n=30 sum=right/, 'the written-back image restarts');
});

t.test('a release while the checkpoint is being written back waits for the write', async (t) => {
  const img = path.join(dir, 'held.img');
  const first = supervise(['sh', '-c', `${counter(30, 200)} & p=$!; sleep 0.5; c=$(${ckpt} checkpoint $p --defer); (${ckpt} writeback $c --keep | (sleep 3; cat > ${q(img)}); echo written) & sleep 0.5; ${ckpt} release $c && echo released; ${ckpt} list; wait`], { timeout: 60_000 });
  t.equal(first.status, 0, first.stderr);
  t.match(first.stdout, /released[^]*written/, 'the release succeeded at once, while the write went on');
  t.notMatch(first.stdout, /^\s*1\s/m, 'the checkpoint is gone for every caller');
  const r = supervise([...CKPT, 'restart', '-i', img]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /done n=30 sum=right/, 'the image written meanwhile is whole');
});

t.test('a process that forks without pause: 40 checkpoints to a file and 40 CKPT_DEFER, zombies around', async (t) => {
  const r = supervise([fixture('forkstorm'), path.join(dir, 'storm.img')], { timeout: 120_000 });
  t.match(r.stdout, /ok 40 checkpoints to a file/);
  t.match(r.stdout, /ok 40 CKPT_DEFER checkpoints/);
  t.match(r.stdout, /ok the last image restarts with the same pid/);
  t.match(r.stdout, /forkstorm: all passed/);
  t.equal(r.status, 0, r.stdout + r.stderr);
});
