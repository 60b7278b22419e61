// ckpt-supervise itself: exit status, signals, stdio, tracing of the whole tree.
import t from 'tap';
import { supervise, run, fixture, q, SUPERVISE } from './helpers.js';

t.test('exit status of the program becomes the supervisor\'s', async (t) => {
  t.equal(supervise(['sh', '-c', 'exit 3']).status, 3);
  t.equal(supervise(['true']).status, 0);
});

t.test('death by signal N gives 128+N', async (t) => {
  t.equal(supervise(['sh', '-c', 'kill -TERM $$']).status, 128 + 15);
  t.equal(supervise(['sh', '-c', 'kill -KILL $$']).status, 128 + 9);
});

t.test('stdin, stdout, stderr are inherited', async (t) => {
  const r = supervise(['sh', '-c', 'cat; echo to-stderr >&2'], { input: 'hello through stdin\n' });
  t.equal(r.stdout, 'hello through stdin\n');
  t.match(r.stderr, /to-stderr/);
});

t.test('signals reach the program as without a supervisor', async (t) => {
  const r = supervise(['sh', '-c', 'trap "echo got USR1" USR1; kill -USR1 $$; echo after']);
  t.equal(r.stdout, 'got USR1\nafter\n');
});

t.test('stop and continue (group-stop) work as without a supervisor', async (t) => {
  // The child times its own stop; its parent looks at its state while it is stopped.
  const child = 't0=$(date +%s%N); kill -STOP $$; t1=$(date +%s%N); echo "resumed after $(( (t1 - t0) / 1000000 )) ms"';
  const r = supervise(['sh', '-c', `sh -c ${q(child)} & sleep 0.3; echo "state=$(sed 's/.*) //' /proc/$!/stat | cut -c1)"; sleep 0.3; kill -CONT $!; wait $!; echo status=$?`]);
  // A traced task in group-stop shows as 't' (the kernel keeps it TASK_TRACED
  // under PTRACE_LISTEN), an untraced one as 'T': either way it is stopped.
  t.match(r.stdout, /^state=[Tt]\n/, 'the child is stopped until SIGCONT');
  const ms = Number(/^resumed after (\d+) ms$/m.exec(r.stdout)?.[1]);
  t.ok(ms >= 300, `the child did not run while stopped: its kill -STOP returned after ${ms} ms`);
  t.match(r.stdout, /\nstatus=0\n$/, 'and it exits normally once continued');
});

t.test('a program that is not found', async (t) => {
  const r = supervise(['/nonexistent/prog']);
  t.equal(r.status, 127);
  t.match(r.stderr, /nonexistent/);
});

t.test('without a supervisor the calls answer ENOSYS', async (t) => {
  const r = run([fixture('callabi'), 'checkpoint', '0', 'none', '0']);
  t.match(r.stdout, /checkpoint ret=-1 errno=ENOSYS/);
});

t.test('descendants are traced: a grandchild after exec gets served', async (t) => {
  // pid 1 is outside any supervised tree: ESRCH, not ENOSYS, proves the trap.
  const r = supervise(['sh', '-c', `sh -c ${q(`${fixture('callabi')} checkpoint 1 none 0`)}`]);
  t.match(r.stdout, /checkpoint ret=-1 errno=ESRCH/);
  t.match(r.stderr, /ckpt-supervise: task \d+: checkpoint: ESRCH: pid 1 is not a process of this supervised tree/);
});

t.test('a bad call never takes the supervisor down', async (t) => {
  const r = supervise([fixture('callabi'), 'restart', '0', 'none', '0']);
  t.equal(r.status, 0);
  t.match(r.stdout, /caller alive/);
});

t.test('the warm-up checkpoint of the launcher leaves the program nothing to see', async (t) => {
  // What the program inherits: descriptors, signal state, its own pid and parent.
  // The shell reads its own status (no fork: a child reading it could see
  // the parent's mask while fork has every signal blocked).
  const probe = 'for f in /proc/$$/fd/*; do echo "${f##*/} $(readlink $f | sed "s/\\[[0-9]*\\]//")"; done; while read -r l; do case $l in SigBlk*|SigIgn*|SigCgt*) echo "$l";; esac; done < /proc/$$/status; ps -o stat= -p $$ | cut -c1';
  const warm = run([...SUPERVISE, '--', 'sh', '-c', probe], { env: { ...process.env, DEBUG: 'ckpt:syscall' } });
  const cold = run([...SUPERVISE, '--no-warm-up', '--', 'sh', '-c', probe]);
  t.equal(warm.status, 0);
  t.match(warm.stderr, /checkpoint 0 of \d+ to a file/, 'the warm-up ran (crid 0: none taken from the program)');
  t.equal(warm.stdout, cold.stdout, 'descriptors and signal state are the same with and without it');
  t.notMatch(warm.stdout, /T/, 'the program is not left stopped');
});

t.test('an unknown or misspelled option is refused with a hint, and the program does not run', async (t) => {
  const typo = run([...SUPERVISE, '--pidsn', '--', 'sh', '-c', 'echo ran']);
  t.equal(typo.status, 2);
  t.notMatch(typo.stdout, /ran/, 'the program did not run');
  t.match(typo.stderr, /unknown option --pidsn; did you mean --pidns\?/);
  const bogus = run([...SUPERVISE, '--bogus', 'sh', '-c', 'echo ran']);
  t.equal(bogus.status, 2);
  t.match(bogus.stderr, /unknown option --bogus \(usage: ckpt-supervise/);
  const fine = run([...SUPERVISE, '--no-warm-up', '--max-checkpoints', '3', 'sh', '-c', 'echo ran --bogus']);
  t.equal(fine.status, 0, 'known options, and the program\'s own options after its name, are left alone');
  t.match(fine.stdout, /^ran --bogus$/m);
});
