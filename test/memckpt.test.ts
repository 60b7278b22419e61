// In-memory checkpoints: CKPT_DEFER / KEEP / HANDLE, write-back, release,
// query, rollback ("undo"), restore from memory, limits and errors.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { supervise, run, fixture, tmpdir, q, pidAlive, SUPERVISE, CKPT } from './helpers.js';

const dir = tmpdir('mem');
const callabi = fixture('callabi');

t.test('undo: roll back again and again to exactly the checkpoint', async (t) => {
  const r = supervise([fixture('undo'), path.join(dir, 'undo.state'), '6', '64']);
  t.equal(r.status, 0, 'the program\'s own checks all passed');
  const rounds = r.stdout.match(/^round \d+ ok: .*$/gm) ?? [];
  t.equal(rounds.length, 6, 'six rollbacks, each back at the checkpoint');
  t.match(r.stdout, /round 6 ok: heap 0, region 0, threads 1, children none, handler default, mask same, cwd \S+, fds (\d+)\/\1, files as they were, sigchld 0, queued 1\+1 \(42, 7\), pages mapped since left 0, umask 027$/m, 'descriptors (a file moved since, one replaced since), exactly the signals queued at the checkpoint and the umask are back; a mapping made since is gone');
  t.match(r.stdout, /UNDO OK after 6 rounds/);
  t.notMatch(r.stdout, /restart returned/, 'restart never returned to the caller');
});

for (const mode of ['tracked', 'frames']) {
  t.test(`undo between two checkpoints while memory changes in every way a page tracker must see (${mode})`, async (t) => {
    const opts = mode === 'frames' ? ['--no-track-dirty'] : [];
    const r = run([...SUPERVISE, ...opts, '--', fixture('dirty'), path.join(dir, `dirty-${mode}.state`), '12'], { env: { ...process.env, DEBUG: 'ckpt:syscall' } });
    t.equal(r.status, 0, 'exit status');
    const arrivals = r.stdout.match(/^arrive c[12] step \d+ ok$/gm) ?? [];
    t.equal(arrivals.length, 12, 'twelve rollbacks, each at exactly the memory of its checkpoint');
    t.ok(arrivals.some((a) => a.startsWith('arrive c1')) && arrivals.some((a) => a.startsWith('arrive c2')), 'both checkpoints were gone back to');
    t.notMatch(r.stdout, /FAIL/);
    t.match(r.stdout, /DIRTY OK after 12 rounds/);
    // The path under test really was taken: tracking ends only where it began.
    if (mode === 'tracked') t.match(r.stderr, /dirty \d+: tracking ends: no checkpoint of it left/, 'pages were tracked');
    else t.notMatch(r.stderr, /dirty \d+: tracking/, 'nothing was tracked');
  });
}

t.test('a container (--pidns, pid 1) rolled back in place again and again', async (t) => {
  const r = run([...SUPERVISE, '--pidns', '--', fixture('undo'), path.join(dir, 'undo-ns.state'), '4', '16', '1']);
  t.equal(r.status, 0, 'the program\'s own checks all passed');
  t.equal((r.stdout.match(/^round \d+ ok: .*queued 1\+1 \(42, 7\), pages mapped since left 0, umask 027$/gm) ?? []).length, 4, 'four rollbacks of the whole container, each back at the checkpoint');
  t.match(r.stdout, /ok no husk left as a child, not even a zombie/);
  t.match(r.stdout, /UNDO OK after 4 rounds/);
});

t.test('a deferred checkpoint written back later holds the memory of checkpoint time', async (t) => {
  const img = path.join(dir, 'deferred.img'), keep = path.join(dir, 'keep.img');
  const r = supervise([fixture('deferwb'), img, keep]);
  t.match(r.stdout, /DEFERWB OK/);
  const info = JSON.parse(/^query (.*)$/m.exec(r.stdout)![1]);
  t.ok(info.stopMs > 0 && info.referencedBytes >= 32 << 20 && info.privateBytes > 0, 'query: stop time, bytes referenced and held');
  t.same(Object.keys(info).sort(), ['created', 'crid', 'handle', 'husks', 'note', 'pids', 'privateBytes', 'referencedBytes', 'root', 'stopMs', 'threads', 'writtenBack'].sort());
  const a = supervise([...CKPT, 'restart', '-i', img]);
  t.match(a.stdout, /restored: 0 bytes differ from checkpoint time/, 'the written-back image is the checkpoint-time state');
  t.equal(a.status, 0);
  const b = supervise([...CKPT, 'restart', '-i', keep]);
  t.match(b.stdout, /restored from the KEEP image/, 'a CKPT_KEEP image restores too');
});

t.test('handles: passed to another process, released when the last copy closes', async (t) => {
  const img = path.join(dir, 'handle.img');
  const r = supervise([fixture('handles'), img]);
  t.equal(r.status, 0);
  for (const c of ['handle is an fd >= 3', 'query through the handle', 'the child queries through its copy', 'the child writes back through its copy', 'closing every copy released it', 'the closed handle is no handle']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(supervise([...CKPT, 'restart', '-i', img]).stdout, /restored from the handle's image: state at checkpoint/);
});

t.test('a program that waits for children never sees a husk', async (t) => {
  const r = supervise([fixture('waitloop')]);
  t.equal(r.status, 0);
  t.match(r.stdout, /WAITLOOP OK/);
});

t.test('restart of a checkpoint whose subtree exited restores it (ABI case 2)', async (t) => {
  const r = supervise(['sh', '-c', `${q(callabi)} defer-then-exit; ${q(callabi)} restart 1 none 0; wait`]);
  t.match(r.stdout, /checkpoint ret=1 errno=0/, 'first run: the deferred checkpoint');
  const pid = /restart ret=(\d+) errno=0/.exec(r.stdout)?.[1];
  t.ok(pid, 'restart from memory returned a pid');
  t.match(r.stdout, new RegExp(`^back pid=${pid}$`, 'm'), 'the exited process is back with its pid, and checkpoint() returned 0 there');
});

t.test('errors of the in-memory calls', async (t) => {
  const cases: [string, string][] = [
    ['writeback 77 w:' + path.join(dir, 'x.img') + ' 0', 'ENOENT'],
    ['release 77 0', 'ENOENT'],
    ['query 77 0', 'ENOENT'],
    ['restart 77 none 0', 'ENOENT'],
    ['writeback 1 w:' + path.join(dir, 'x.img') + ' 0x4', 'EINVAL'],
    ['release 1 0x2', 'EINVAL'],
    ['query 0 0x1', 'EINVAL'],
    ['release 0 0', 'EINVAL'],
    ['release 5 0x8', 'EBADF'], // a handle that is no open fd
    ['query 1 0x8', 'ENOENT'], // an open fd (stdout) that is not a handle
  ];
  const r = supervise(['sh', '-c', cases.map(([c]) => `${q(callabi)} ${c}`).join('; ')]);
  const lines = r.stdout.split('\n').filter((l) => / ret=/.test(l));
  cases.forEach(([c, e], i) => t.match(lines[i] ?? '', new RegExp(`ret=-1 errno=${e}$`), `${c} -> ${e}`));
  const f = supervise(['sh', '-c', `${q(callabi)} defer-then-exit; ${q(callabi)} query 1 0 -1; ${q(callabi)} query 1 0; ${q(callabi)} query 1 0 10`]);
  t.match(f.stdout, /query ret=-1 errno=EFAULT/, 'a bad buffer: EFAULT');
  const full = /query ret=(\d+) errno=0\njson=(.*)\n/.exec(f.stdout);
  const short = /query ret=(\d+) errno=0\njson=(.*)\n(?![^]*json=)/.exec(f.stdout);
  t.ok(full && short && full.index < short.index, 'the whole query, then the short one');
  JSON.parse(full![2]); // the whole text came back
  t.equal(Number(full![1]), Buffer.byteLength(full![2]), 'a large buffer: the length returned is the JSON\'s');
  t.equal(Number(short![1]), Buffer.byteLength(full![2]), 'a short buffer: the full length is returned all the same');
  t.equal(short![2], full![2].slice(0, 10), 'and only len (10) bytes were written, the JSON\'s first ones');
  t.equal(r.status, 0, 'the supervisor lived through it all');
});

t.test('a cap on live checkpoints: EAGAIN past it', async (t) => {
  const r = run3([...SUPERVISE, '--max-checkpoints', '2', '--', 'sh', '-c', `for i in 1 2 3; do ${q(callabi)} defer-then-exit; done; ${q(callabi)} release 1 0; ${q(callabi)} defer-then-exit`]);
  const lines = r.split('\n').filter((l) => l.includes(' ret='));
  t.match(lines[0], /checkpoint ret=1 errno=0/);
  t.match(lines[1], /checkpoint ret=2 errno=0/);
  t.match(lines[2], /checkpoint ret=-1 errno=EAGAIN/, 'the third is refused');
  t.match(lines[3], /release ret=0/);
  t.match(lines[4], /checkpoint ret=\d+ errno=0/, 'after a release there is room again');
});

function run3(cmd: string[]): string {
  return spawnSync(cmd[0], cmd.slice(1), { encoding: 'utf8', timeout: 60_000 }).stdout;
}

t.test('release frees everything; no husk outlives a killed supervisor', async (t) => {
  // The husk is looked for from inside the tree, while the supervisor
  // still runs (once it exits the husks go anyway): /proc/PID exists for a
  // zombie too, so a husk killed but not reaped would be seen.
  const look = (when: string) => `if [ -e /proc/$h ]; then echo "husk $h ${when}: present"; else echo "husk $h ${when}: gone"; fi`;
  const r = supervise(['sh', '-c', `${q(callabi)} defer-then-exit; out=$(${q(callabi)} query 1 0); echo "$out"; ` +
    `h=$(echo "$out" | sed -n 's/.*"husks":\\[\\([0-9]*\\)\\].*/\\1/p'); ${look('before release')}; ` +
    `${q(callabi)} release 1 0; ${look('after release')}; ${q(callabi)} query 0 0`]);
  const info = JSON.parse(/^json=(\{.*\})$/m.exec(r.stdout)![1]);
  t.equal(info.husks.length, 1);
  t.match(r.stdout, new RegExp(`^husk ${info.husks[0]} before release: present$`, 'm'), 'the husk is there before the release');
  t.match(r.stdout, new RegExp(`^release ret=0 errno=0\ncaller alive\nhusk ${info.husks[0]} after release: gone$`, 'm'), 'the husk is gone (reaped too) as soon as release returns, the supervisor still running');
  t.match(r.stdout, /json=\[\]/, 'nothing is listed after release');

  const state = path.join(dir, 'killed.state');
  const child = spawn(SUPERVISE[0], [...SUPERVISE.slice(1), '--', 'sh', '-c', `${q(callabi)} defer-then-exit; ${q(callabi)} query 1 0; sleep 30`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const husk = await new Promise<number>((resolve) => {
    child.stdout.on('data', (d) => {
      out += d;
      const m = /"husks":\[(\d+)\]/.exec(out);
      if (m) resolve(Number(m[1]));
    });
  });
  t.ok(pidAlive(husk), 'the husk lives while the supervisor does');
  child.kill('SIGKILL');
  await new Promise((res) => child.on('exit', res));
  for (let i = 0; i < 50 && pidAlive(husk); i++) await new Promise((res) => setTimeout(res, 20));
  t.notOk(pidAlive(husk), 'killing the supervisor killed the husk');
  fs.writeFileSync(state, out);
});

t.test('a MADV_WIPEONFORK region checkpointed to a file is restored with its bytes', async (t) => {
  const img = path.join(dir, 'wipeonfork.img');
  const r = supervise([callabi, 'wipeonfork-file', `w:${img}`]);
  t.match(r.stdout, /checkpoint ret=[1-9]\d* errno=0/);
  t.match(r.stdout, /memory intact: yes/);
  const again = supervise([...CKPT, 'restart', '-i', img]);
  t.match(again.stdout, /restored: wipeonfork data intact: yes/, 'the image holds the region\'s bytes');
  t.match(again.stdout, /rolled back after the restore: wipeonfork data intact: yes/, 'a checkpoint of the restored process keeps the region (it is known to hold one)');
  t.equal(again.status, 0);
});

t.test('a child that inherited a MADV_WIPEONFORK region keeps its bytes across a rollback', async (t) => {
  // Only the parent called madvise: the child is known to hold such a region because it was forked from it.
  const r = supervise([callabi, 'wipeonfork-child']);
  t.match(r.stdout, /child back at the checkpoint: inherited wipeonfork data intact/);
  t.match(r.stdout, /child exit=0/);
});

for (const advice of ['dontfork', 'wipeonfork']) {
  t.test(`MADV_${advice.toUpperCase()} memory is copied during the stop: write-back, rollback and restore hold it, and the advice`, async (t) => {
    const img = path.join(dir, `${advice}.img`);
    const r = supervise([callabi, advice, img]);
    t.match(r.stdout, /checkpoint ret=\d+ errno=0\nwriteback ret=0 errno=0\n/);
    t.match(r.stdout, new RegExp(`back at the checkpoint: ${advice} data intact, advice kept`), 'rolled back: the region has its checkpoint-time bytes');
    t.equal(r.status, 0);
    const again = supervise([...CKPT, 'restart', '-i', img]);
    t.match(again.stdout, new RegExp(`back at the checkpoint: ${advice} data intact, advice kept`), 'the written-back image holds them too');
  });
}

t.test('undo after a checkpointed child exited and was reaped: the child is back with its memory, and can be waited for again', async (t) => {
  const r = supervise([fixture('reaped')], { timeout: 60_000 });
  t.match(r.stdout, /child (\d+) reaped: \1 status 7\nspoiled, rolling back/, 'the child exited and its parent reaped it before the rollback');
  for (const c of ['the reaped child is there again', "the child's memory is as at the checkpoint", 'the parent waits for it again']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stdout, /REAPED OK/);
  t.equal(r.status, 0);
});
