// A program's own seccomp filters: kept across a restart and a rollback,
// never doubled, never dropped; what cannot be kept is refused.
import t from 'tap';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('seccomp');
const esc = (s: string) => s.replace(/[()]/g, '\\$&');
const CHECKS = [
  'memory is the checkpoint\'s',
  'main thread refused uname with ENOTBLK, sysinfo allowed, 2 filters (after)',
  'sandboxed thread refused uname (ENOTBLK), sysinfo (EXDEV) and the rest (EPERM), 3 filters (after)',
  'thread started before the filters is not filtered (after)',
  'child: getpriority still refused with EACCES',
  'child: every thread has its 3 filters',
  'child: the threads still share their filter (a new TSYNC filter reaches all)',
  'child\'s checks passed',
];

for (const mode of ['restart', 'undo']) {
  t.test(`every thread's seccomp filters, in order, across a ${mode}`, async (t) => {
    const img = path.join(dir, 'sandbox.img');
    const first = supervise([fixture('sandbox'), mode === 'undo' ? 'undo' : img]);
    // A deny-by-default filter refuses what the supervisor injects (sigaltstack...): the capture must not trip on it.
    t.notMatch(first.stdout, /checkpoint failed/, 'the checkpoint of the sandboxed threads was taken');
    t.match(first.stdout, /^ok strict mode is entered under the supervisor and confines$/m, 'strict mode works under the supervisor');
    const r = mode === 'undo' ? first : supervise([...CKPT, 'restart', '-i', img]);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL');
      t.match(supervise([...CKPT, 'inspect', img]).stdout, /threads: \d+ rip \S+ rsp \S+ \(1 seccomp filter of its own\); \d+ rip \S+ rsp \S+; \d+ rip \S+ rsp \S+ \(2 seccomp filters of its own\)/, 'inspect shows each thread\'s own filters');
    }
    else t.match(first.stdout, /spoiled, rolling back/);
    t.match(r.stdout, /^back pid=\d+$/m, 'it came back');
    for (const c of CHECKS) t.match(r.stdout, new RegExp(`^ok ${esc(c)}$`, 'm'), c);
    t.notMatch(r.stdout, /^FAIL/m, 'no check failed');
    t.match(r.stdout, /SANDBOX OK/);
    t.equal(r.status, 0);
  });
}

t.test('a rollback to before a filter was added is refused, and the program stays sandboxed', async (t) => {
  const r = supervise([fixture('sandbox'), 'undo-more']);
  for (const c of ['rollback to before that filter refused with EOPNOTSUPP', 'the new filter still refuses getppid', 'the old filter still refuses uname', 'nothing was rolled back']) t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  t.match(r.stderr, /restart: EOPNOTSUPP: restart:seccomp: task \d+: would have 2 filters where checkpoint \d+ had 1 filter/, 'one log line says why');
  t.equal(r.status, 0);
});

t.test('a user-notification filter is refused at checkpoint, the program running on', async (t) => {
  const r = supervise([fixture('sandbox'), 'notify']);
  t.match(r.stdout, /^ok checkpoint with a user-notification filter refused with EOPNOTSUPP$/m);
  t.match(r.stdout, /^ok the program runs on with its filters$/m);
  t.match(r.stderr, /checkpoint: EOPNOTSUPP: checkpoint:seccomp: task \d+: seccomp filter 2 notifies a user-space listener/);
  t.equal(r.status, 0);
});

for (const mode of ['restart', 'undo']) {
  t.test(`SECCOMP_MODE_STRICT under the supervisor, kept across a ${mode}`, async (t) => {
    const r = supervise([fixture('strict'), mode === 'undo' ? 'undo' : path.join(dir, 'strict.img')]);
    for (const c of ['prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) succeeds', 'seccomp(SECCOMP_SET_MODE_STRICT) succeeds', 'the strict child is checkpointed', mode === 'undo' ? 'the strict child is rolled back' : 'the strict child is restarted', 'in strict mode it still reads and writes', 'a forbidden call ends it']) {
      t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    }
    t.match(r.stdout, /STRICT OK/);
    t.equal(r.status, 0, r.stdout + r.stderr);
  });
}
