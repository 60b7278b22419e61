// Notification groups and AIO: inotify watches (numbers with gaps, a
// renamed file, IN_ONESHOT, IN_MASK_ADD, IN_EXCL_UNLINK, a symlink itself,
// a deleted file held open), fanotify marks (inode, mount, filesystem,
// ignore masks, init and event flags) and AIO contexts (pending events,
// the same ids) kept across a restart and a rollback, the fixtures checking
// themselves; `tail -f` restarted follows its file; what is not kept
// (permission-event marks, io_uring, a watched deleted file held only
// outside the subtree) is refused, the program unharmed.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir, q } from './helpers.js';

const dir = tmpdir('notify');

/** Run FIXTURE ARGS... DIR IMAGE|undo both ways; every check it names must pass. */
function bothWays(name: string, args: string[], title: string, checks: string[], done: string) {
  for (const mode of ['restart', 'undo']) {
    t.test(`${title} across a ${mode}`, async (t) => {
      const img = path.join(dir, `${name}-${args.join('-')}.img`);
      const work = fs.mkdtempSync(path.join(dir, `${name}-`));
      const first = supervise([fixture(name), ...args, work, mode === 'undo' ? 'undo' : img], { timeout: 60_000 });
      if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
      else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
      const r = mode === 'undo' ? first : supervise([...CKPT, 'restart', '-i', img], { timeout: 60_000 });
      for (const c of checks) t.match(mode === 'undo' ? r.stdout : first.stdout + r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
      t.match(r.stdout, new RegExp(`^${done}$`, 'm'), r.stdout.includes(done) ? done : r.stdout + r.stderr);
      t.equal(r.status, 0);
    });
  }
}

bothWays('notify', ['inotify'], 'inotify: two groups, watches with gaps, a renamed, a symlink and a deleted file', [
  'inotify: set up', 'inotify: the same numbers and masks (fdinfo; IN_ONESHOT, IN_EXCL_UNLINK among them)',
  'inotify: the first group non-blocking, close-on-exec', 'inotify: the second group blocking, kept across exec', 'inotify: nothing queued after the restart',
  'inotify: watch 1 (directory) fires', 'inotify: watch 2 fires', 'inotify: removed watches 3 and 6 stay removed', 'inotify: watch 4 fires once (IN_ONESHOT)',
  'inotify: watch 5 on the renamed file fires', 'inotify: watch 7 has its added mask (IN_MASK_ADD)', 'inotify: watch 8 on the symlink itself (IN_DONT_FOLLOW)',
  'inotify: watch 9 on the deleted file fires', 'inotify: no other event', "inotify: the second group's watch 1 fires", 'inotify: a new watch gets a new number',
], 'NOTIFY OK');

bothWays('notify', ['fanotify'], 'fanotify: inode marks (one renamed), mount and filesystem marks, an ignore mask', [
  'fanotify: set up', 'fanotify: the same marks, masks and flags (fdinfo)', 'fanotify: non-blocking, close-on-exec', 'fanotify: nothing queued after the restart',
  'fanotify: the inode mark fires', 'fanotify: the mark on the renamed file fires', 'fanotify: the mount mark fires', 'fanotify: the ignore mask holds',
  'fanotify: the filesystem mark fires', "fanotify: event descriptors have the group's event flags",
], 'NOTIFY OK');

bothWays('aio', [], 'AIO: a ring gone round with two events pending and an empty one, at the same ids', [
  'aio: set up (two events pending)', "aio: the ring's header as it was", 'aio: the two pending events are reaped, with their data and results',
  'aio: the head moved to the tail', 'aio: a new write through the same context id', 'aio: the write reached the file', "aio: the kernel's tail follows the ring's",
  'aio: the small context works at its id', 'aio: the ring takes as many requests as its size allows', 'aio: both contexts destroyed',
], 'AIO OK');

t.test('tail -f (GNU tail follows with inotify) checkpointed and killed, restarted: it prints a line appended after', async (t) => {
  const file = path.join(dir, 'followed.log'), out = path.join(dir, 'tail.out'), img = path.join(dir, 'tail.img');
  fs.writeFileSync(file, 'line one\n');
  const ckpt = CKPT.map(q).join(' ');
  // Until tail waits in poll() (syscall 7), up to 20 s: the machine may be slow.
  const inPoll = (pid: string) => `n=0; until grep -q '^7 ' /proc/${pid}/syscall 2>/dev/null || [ $n -ge 200 ]; do sleep 0.1; n=$((n+1)); done`;
  const first = supervise(['sh', '-c', `tail -f ${q(file)} > ${q(out)} & pid=$!; ${inPoll('$pid')}; echo "tail $pid"; ls -l /proc/$pid/fd | grep -c inotify; ${ckpt} checkpoint $pid -o ${q(img)} --kill; wait`], { timeout: 60_000 });
  const pid = /^tail (\d+)$/m.exec(first.stdout)?.[1];
  t.ok(pid, first.stdout + first.stderr);
  t.match(first.stdout, /^1$/m, 'tail holds an inotify descriptor');
  t.equal(fs.readFileSync(out, 'utf8'), 'line one\n', 'tail printed the file before the checkpoint');
  t.ok(fs.existsSync(img), 'image written');
  const second = supervise(['sh', '-c', `${ckpt} restart -i ${q(img)} & r=$!; ${inPoll(pid!)}; echo 'line two' >> ${q(file)}; n=0; until grep -q 'line two' ${q(out)} || [ $n -ge 200 ]; do sleep 0.1; n=$((n+1)); done; kill ${pid}; wait $r; echo "restart $?"`], { timeout: 60_000 });
  t.match(second.stdout, /^restart 143$/m, `the restored tail ran until killed (${second.stdout.trim()} ${second.stderr.trim()})`);
  t.equal(fs.readFileSync(out, 'utf8'), 'line one\nline two\n', 'the restored tail printed the appended line');
});

const refusals: [string, RegExp][] = [
  ['fanperm', /checkpoint:notify: task \d+: fd \d+ \(a fanotify mark asking for permission events \(mask 0x10000\): a process may be blocked waiting for an answer/],
  ['uring', /checkpoint:files: task \d+: fd \d+ \(an io_uring instance: io_uring is not kept/],
  ['uringmap', /checkpoint:memory: task \d+: mapping 0x[0-9a-f]+-0x[0-9a-f]+ of an io_uring instance \(io_uring is not kept/],
  ['deleted', /checkpoint:notify: task \d+: fd \d+ \(inotify watch 1 on the deleted inode \d+, which no process of the subtree holds open\)/],
];
t.test('a rollback whose watched file is gone since is refused before it changes anything', async (t) => {
  const r = supervise([fixture('notify'), 'refuse', 'rollback-gone', fs.mkdtempSync(path.join(dir, 'gone-'))], { timeout: 60_000 });
  t.match(r.stdout, /rollback-gone: rollback ret=-1 errno=ENOENT/);
  t.match(r.stderr, /restart:notify: inotify watch 1 on \S+\/w: no longer there/, 'one log line names the watch and why');
  t.match(r.stdout, /rollback-gone: still works after: yes/);
  t.equal(r.status, 0);
});

for (const [what, log] of refusals) {
  t.test(`refused with EOPNOTSUPP, the program unharmed: ${what}`, async (t) => {
    const r = supervise([fixture('notify'), 'refuse', what, fs.mkdtempSync(path.join(dir, `${what}-`))], { timeout: 60_000 });
    t.match(r.stdout, new RegExp(`${what}: checkpoint ret=-1 errno=EOPNOTSUPP`));
    t.match(r.stderr, log, 'one log line names the task, the resource and why');
    t.match(r.stdout, new RegExp(`${what}: still works after: yes`));
    t.equal(r.status, 0);
  });
}
