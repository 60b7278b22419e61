// File locks and leases: flock, POSIX, OFD, leases, a blocked waiter; a lock shared with the outside refused.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('locks');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

const CHECKS = [
  'flock write lock held', 'flock write lock excludes readers', 'POSIX write lock 10-29 held by the root', 'POSIX read lock 100-EOF held by the root',
  'POSIX: a read lock beside it and a write lock between them are free', 'OFD write lock 0-4 held', 'OFD lock seen as such', 'OFD: the rest of the file is free',
  "the child's shared flock held", "the child's POSIX read lock held by the child", 'flock on the description shared with the child held',
  'no lock where there was none at the checkpoint', 'the read lease held', 'the write lease held, and given up', "the waiter still waits for the root's POSIX lock", 'the root unlocks',
  'then the waiter gets its lock', "after the root's LOCK_UN the flock is free", "after the root's F_UNLCK the POSIX range is free",
  "after the root's OFD F_UNLCK the range is free", 'a writer opening the leased file is told to wait', 'the lease holder gets SIGIO and gives the lease up',
];

for (const mode of ['restart', 'undo']) {
  t.test(`flock, POSIX and OFD locks, a lease and a blocked waiter across a ${mode}`, async (t) => {
    const d = fs.mkdtempSync(path.join(dir, `${mode}-`));
    const img = path.join(d, 'locks.img');
    const first = supervise([fixture('locks'), d, mode === 'undo' ? 'undo' : img], { timeout: 60_000 });
    const r = mode === 'undo' ? first : restart(img);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL (every lock released with the processes)');
      const inspect = supervise([...CKPT, 'inspect', img]).stdout;
      for (const l of ['\\/a pos 0 flags \\d+, flock write lock by \\d+', '\\/b pos .*, POSIX write lock 10-29 by \\d+, POSIX read lock 100-EOF by \\d+', '\\/c pos .*, OFD write lock 0-4', '\\/d pos .*, read lease by \\d+', '\\/h pos .*, write lease by \\d+', '\\/e pos .*, flock read lock by \\d+, POSIX read lock 0-9 by \\d+']) t.match(inspect, new RegExp(l), `inspect shows ${l}`);
    }
    else t.match(first.stdout, /spoiled, rolling back/, 'every lock released, the waiter served, a new lock taken, the child killed before the rollback');
    for (const c of CHECKS) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()+]/g, '\\$&')}$`, 'm'), c);
    t.notMatch(r.stdout, /^FAIL/m, 'no check failed');
    t.match(r.stdout, /LOCKS OK/);
    t.equal(r.status, 0);
  });
}

t.test('a flock on a description shared with a process outside the subtree: the checkpoint is refused and the lock stays', async (t) => {
  const d = fs.mkdtempSync(path.join(dir, 'shared-'));
  const r = supervise([fixture('locks'), d, 'shared-outside']);
  t.match(r.stdout, /checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, /checkpoint:locks: task \d+: fd 3 \(a FLOCK lock on an open file description also held by process \d+ outside the subtree\)/, 'the log names the task, the fd and why');
  t.match(r.stdout, /^ok the child still runs and can unlock$/m);
  t.equal(r.status, 0);
});

t.test('a rollback whose lock a process outside the subtree holds now is refused (EBUSY) before anything changes, and works once it is free', async (t) => {
  const d = fs.mkdtempSync(path.join(dir, 'busy-'));
  const r = supervise([fixture('locks'), d, 'busy'], { timeout: 60_000 });
  for (const c of ['a rollback whose lock another process holds now: EBUSY', "and nothing changed: the lock is still the other's", 'once free, the rollback takes the lock again for the child', 'the child ends well']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stderr, /restart: EBUSY: restart:locks: the checkpoint's flock write lock on \S+\/k is held by process \d+ outside the subtree now/, 'the log says which lock and who holds it');
  t.equal(r.status, 0);
});
