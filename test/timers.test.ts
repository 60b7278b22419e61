// Interval timers, POSIX timers and a timerfd across a restart and a rollback.
import t from 'tap';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('timers');
const CHECKS = [
  'ITIMER_REAL: time left and interval',
  'ITIMER_VIRTUAL: time left and interval',
  'ITIMER_PROF: time left and interval',
  'the same POSIX timers with the same ids (none made since survives)',
  'SIGEV_NONE timer on CLOCK_BOOTTIME keeps its hour',
  'a timer never armed is there, disarmed',
  'periodic timer armed with its interval',
  'timerfd armed with its time left and interval',
  'the periodic timer fires again (SIGUSR1)',
  'the SIGEV_THREAD_ID timer fires once, on its thread',
  'each signal carries its timer\'s id and sigev_value',
  'a new timer gets an id of its own',
];

for (const mode of ['restart', 'undo']) {
  t.test(`setitimer, timer_create (signal, thread, none) and timerfd timers across a ${mode}`, async (t) => {
    const img = path.join(dir, 'timers.img');
    const first = supervise([fixture('timers'), mode === 'undo' ? 'undo' : img]);
    t.notMatch(first.stdout, /checkpoint failed/, 'the checkpoint was taken');
    const r = mode === 'undo' ? first : supervise([...CKPT, 'restart', '-i', img]);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL');
      const inspect = supervise([...CKPT, 'inspect', img]).stdout;
      t.match(inspect, /ITIMER_REAL: (29|30)\.\d+ s left, every 7\.000000 s/, 'inspect shows the interval timers');
      t.match(inspect, /timer \d+: clock 0, signal 14, .*0\.000000000 s left/, 'and a POSIX timer never armed');
      t.match(inspect, /timer \d+: clock 1, signal 35 to thread \d+, value 0x5eed, 1\.\d+ s left/, 'and one aimed at a thread');
    } else t.match(first.stdout, /made timer \d+\nspoiled, rolling back/, 'every timer changed, one deleted and one made before the rollback');
    t.match(r.stdout, /^back pid=\d+$/m, 'it came back');
    for (const c of CHECKS) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    t.notMatch(r.stdout, /^FAIL/m, 'no check failed');
    t.match(r.stdout, /TIMERS OK/);
    t.equal(r.status, 0);
  });
}

t.test('a timer whose last signal came with overruns is refused, the program running on', async (t) => {
  const r = supervise([fixture('timers'), 'overrun']);
  for (const c of ['a timer\'s last signal came with overruns', 'the checkpoint is refused with EOPNOTSUPP', 'the program runs on, its timer as it was']) t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  t.match(r.stderr, /checkpoint: EOPNOTSUPP: checkpoint:timers: task \d+: POSIX timer \d+ had \d+ overruns at its last expiry/, 'one log line says why');
  t.equal(r.status, 0);
});
