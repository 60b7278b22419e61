// Memory end to end: shared memory kept quickly and exactly, refusals made
// before anything is copied, madvise advice and other mapping attributes
// kept by restart and rollback.
import t from 'tap';
import { supervise, fixture, tmpdir, bothWays as bothWaysIn } from './helpers.js';

const dir = tmpdir('memory');

const bothWays = (name: string, args: string[] = [], opts: { timeout?: number } = {}) => bothWaysIn(dir, name, args, opts);

for (const mode of ['restart', 'undo'] as const) {
  t.test(`shared memory: a quick stop, every byte back (${mode})`, async (t) => {
    const { first, r } = bothWays('shmfast')(mode);
    t.match(first.stdout, /^ok a CKPT_DEFER checkpoint with 32 MiB of shared memory is quick$/m, first.stdout.match(/stop_ms=\S+/)?.[0] ?? 'no stop time');
    t.match(first.stdout, /^ok it holds the shared bytes once, not the sparse memfd's holes$/m);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/);
    for (const c of ['32 MiB of shared anonymous memory, the zeroed page too', 'a memfd of 5000 bytes, its last page partial', 'a sparse 1 GiB memfd: its pages and its holes']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /SHMFAST OK/);
    t.equal(r.status, 0);
  });
}

t.test('shared memory rolled back in a process of another uid: it may not take the supervisor\'s memfd, which is handed over a socket', async (t) => {
  const r = supervise(['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups', fixture('shmfast'), 'undo']);
  t.match(r.stdout, /spoiled, rolling back/);
  t.match(r.stdout, /SHMFAST OK/, r.stdout + r.stderr);
  t.equal(r.status, 0);
});

t.test('a locked SysV shm segment is refused at once, named by key and id, the program unharmed', async (t) => {
  const r = supervise([fixture('sysvshm')]);
  const seg = /segment key=(0x[0-9a-f]+) id=(\d+)/.exec(r.stdout);
  t.ok(seg, 'the segment was made');
  t.match(r.stdout, /^ok a locked SysV shm segment is refused with EOPNOTSUPP$/m);
  t.match(r.stderr, new RegExp(`EOPNOTSUPP: checkpoint:sysvipc: task \\d+: SysV shm key ${seg?.[1]} id ${seg?.[2]} is locked \\(SHM_LOCK is not kept\\)`));
  t.notMatch(r.stderr, /deleted file/, 'not taken for a deleted file');
  t.match(r.stdout, /^ok the program is as it was: the segment still shared$/m);
  t.match(r.stdout, /^ok unlocked, the checkpoint succeeds$/m);
  t.equal(r.status, 0);
});

for (const mode of ['restart', 'undo'] as const) {
  t.test(`madvise and mlock state (smaps VmFlags) is kept (${mode})`, async (t) => {
    const { first, r } = bothWays('vmadvice')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else {
      t.match(first.stdout, /spoiled, rolling back/);
      t.notMatch(first.stdout, /unchanged by the spoiling/, 'every region was changed before the rollback');
    }
    for (const c of ['dd', 'hg', 'nh', 'rr', 'sr', 'mg', 'lo', 'lo lf', 'dd rr', '']) t.match(r.stdout, new RegExp(`^ok region "${c}": its flags and data$`, 'm'), c || 'no advice');
    t.match(r.stdout, /VMADVICE OK/);
    t.equal(r.status, 0);
  });
}

t.test('mlockall(MCL_FUTURE) is refused, and accepted once undone', async (t) => {
  const r = supervise([fixture('vmadvice'), 'future']);
  t.match(r.stdout, /^ok mlockall\(MCL_FUTURE\) is refused$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:memory: task \d+: mlockall\(MCL_FUTURE\) is in force/);
  t.match(r.stdout, /^ok after munlockall the checkpoint succeeds$/m);
  t.equal(r.status, 0);
});
