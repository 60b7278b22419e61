// checkpoint -> crash -> restart through an image, with fresh supervisors.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir, q, pidAlive } from './helpers.js';

const dir = tmpdir('roundtrip');

/** A fresh image of selfckpt (crash mode) for one test: no test reads another's. */
function selfImage(name: string): string {
  const img = path.join(dir, name);
  const r = supervise([fixture('selfckpt'), img, 'crash']);
  if (r.status !== 137 || !/checkpointed crid=1 /.test(r.stdout)) throw new Error(`selfckpt did not checkpoint into ${img}: ${r.stdout}${r.stderr}`);
  return img;
}

t.test('a program checkpoints itself, crashes, and carries on after restart', async (t) => {
  const img = path.join(dir, 'self.img');
  const first = supervise([fixture('selfckpt'), img, 'crash']);
  t.equal(first.status, 128 + 9, 'the first run dies of SIGKILL after its checkpoint');
  const pid = Number(/checkpointed crid=\d+ pid=(\d+)/.exec(first.stdout)?.[1]);
  t.ok(pid > 0, 'checkpoint returned a crid');
  t.match(first.stdout, /ok ymm7 across the checkpoint call/);
  t.notOk(pidAlive(pid), 'the original process is gone');

  const second = supervise([...CKPT, 'restart', '-i', img]);
  t.equal(second.status, 0, 'the restored program exits 0 (all its checks passed)');
  t.match(second.stdout, new RegExp(`restored pid=${pid}\\n`), 'same pid, and checkpoint() returned 0');
  for (const check of ['pid', 'stack frames', 'ymm7 register', 'heap', 'anonymous mmap', 'private file mapping (modified and clean pages)', 'file offset', 'read continues at the offset', 'signal mask', 'every handler with its flags and mask', 'signal handler', 'SA_SIGINFO, SA_NODEFER and sa_mask as the handler runs', 'SA_RESTART: a read interrupted by its signal goes on', 'no SA_RESTART: a read interrupted by its signal fails with EINTR', 'pending signals', 'queued signal keeps its value and sender', 'malloc after restart']) {
    t.match(second.stdout, new RegExp(`^ok ${check.replace(/[()]/g, '\\$&')}$`, 'm'), check);
  }
  t.notMatch(second.stdout, /FAIL/);

  // The same image again, this time read from a pipe (stdin).
  const third = supervise([...CKPT, 'restart'], { input: fs.readFileSync(img) });
  t.equal(third.status, 0, 'restart from stdin works too');
  t.match(third.stdout, /RESTORE OK/);
});

t.test('a restored program can checkpoint again (it keeps the filter)', async (t) => {
  const img = path.join(dir, 'again.img');
  const img2 = path.join(dir, 'again2.img');
  t.equal(supervise([fixture('selfckpt'), img, 'crash', img2]).status, 137);
  const second = supervise([...CKPT, 'restart', '-i', img]);
  t.match(second.stdout, /RESTORE OK\ncheckpointed again crid=\d+\n/, 'the restored program checkpointed itself again');
  t.equal(second.status, 137, 'and crashed again');
  const third = supervise([...CKPT, 'restart', '-i', img2]);
  t.match(third.stdout, /^restored again pid=\d+$/m, 'the second-generation image restores too');
  t.equal(third.status, 0);
});

t.test('external checkpoint of a sibling with ckpt checkpoint --kill, through a pipe', async (t) => {
  const img = path.join(dir, 'counter.img');
  const first = supervise(['sh', '-c',
    `${q(fixture("counter"))} 30 200 & sleep 0.5; ${CKPT.map(q).join(' ')} checkpoint $! --kill | cat > ${q(img)}; wait $!; echo "counter status=$?"`]);
  t.match(first.stdout, /counter status=137/, 'CKPT_KILL killed the counter after the checkpoint');
  t.notMatch(first.stdout, /done/, 'it did not get to finish');
  const before = first.stdout.match(/^step \d+$/gm) ?? [];
  t.ok(before.length >= 1 && before.length < 30, `checkpointed mid-way (after ${before.length} steps)`);

  const second = supervise([...CKPT, 'restart', '-i', img]);
  t.equal(second.status, 0, 'the restored counter exits 0');
  t.match(second.stdout, /done n=30 sum=right/, 'its in-memory sum carried over');
  const after = second.stdout.match(/^step \d+$/gm) ?? [];
  t.same([...before, ...after], Array.from({ length: 30 }, (_, i) => `step ${i + 1}`), 'no step lost or repeated');
});

t.test('ckpt inspect describes an image', async (t) => {
  const img = selfImage('inspect.img');
  const text = supervise([...CKPT, 'inspect', img]);
  t.equal(text.status, 0);
  t.match(text.stdout, /^ckpt image v2 x86_64, crid 1/);
  t.match(text.stdout, /process \d+ \(selfckpt\)/);
  t.match(text.stdout, /\[heap\]/);
  t.match(text.stdout, /fd 3: .*inspect\.img\.data pos 100/);
  const json = JSON.parse(supervise([...CKPT, 'inspect', '--json', img]).stdout);
  t.equal(json.header.arch, 'x86_64');
  t.equal(json.processes[0].ids.comm, 'selfckpt');
  t.ok(json.processes[0].pageBytes >= (12 << 20), 'heap + mmap pages are in the image');
  const bad = supervise([...CKPT, 'inspect', '/etc/hostname']);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /EBADMSG/);
});

t.test('an image stays small: untouched pages are not written', async (t) => {
  const img = selfImage('small.img');
  const size = fs.statSync(img).size;
  // 8 MiB heap + 4 MiB mmap + some libc/stack pages; the 64 MiB never touched are absent.
  t.ok(size > (12 << 20) && size < (14 << 20), `image is ${size} bytes`);
});
