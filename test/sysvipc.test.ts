// SysV IPC (shm segments, semaphore sets, message queues) kept across a
// restart and a rollback, the fixture checking itself; an id or key taken
// at restart is EBUSY and leaves no object behind; SEM_UNDO is refused.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir, bothWays } from './helpers.js';

const dir = tmpdir('sysvipc');
const both = bothWays(dir, 'sysvipc');
const CHECKS = [
  'shm: id, key, size, mode, owner', 'shm: attached three times (parent, child twice)', 'shm: found by its key', 'shm: contents',
  'removed segment: still attached under its id, removed, contents', 'sem: id, key, mode, values', 'msg: id, key, mode, byte limit, count',
  'msg: messages by type, in order', "shm: the child's write is seen by the parent", "shm: the parent's write is seen by the child (both attaches)",
  'removed segment: gone once detached', "sem: the child's exit undid its SEM_UNDO adjustments",
];
const ids = (kind: string) => fs.readFileSync(`/proc/sysvipc/${kind}`, 'utf8').split('\n').slice(1).filter((l) => l.trim()).map((l) => l.trim().split(/\s+/)).map((f) => ({ key: Number(f[0]), id: Number(f[1]) }));

for (const mode of ['restart', 'undo'] as const) {
  t.test(`SysV shm, semaphores and message queues across a ${mode}`, async (t) => {
    const { first, r } = both(mode);
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
    for (const c of CHECKS) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    t.match(r.stdout, /SYSVIPC OK/, r.stdout + r.stderr);
    t.equal(r.status, 0);
    if (mode === 'undo') {
      const since = Number(/made since: sem id=(\d+)/.exec(first.stdout)?.[1] ?? -1);
      t.ok(since >= 0 && !ids('sem').some((o) => o.id === since), `the set made since the checkpoint (id ${since}) was removed by the rollback`);
    }
  });
}

for (const kind of ['shm', 'msg'] as const) {
  t.test(`restart: a SysV ${kind} key taken meanwhile is EBUSY, and no object is left behind`, async (t) => {
    const img = path.join(dir, `busy-${kind}.img`);
    const first = supervise([fixture('sysvipc'), img]);
    t.equal(first.status, 137, 'CKPT_KILL');
    const m = /shm key=(0x[0-9a-f]+) id=(\d+) sem key=(0x[0-9a-f]+) id=(\d+) msg key=(0x[0-9a-f]+) id=(\d+)/.exec(first.stdout);
    t.ok(m, 'the objects were made');
    if (!m) return;
    const key = kind === 'shm' ? m[1] : m[5];
    t.notOk(ids(kind).some((o) => o.key === Number(key)), 'CKPT_KILL took the objects with the subtree');
    const took = supervise([fixture('sysvipc'), 'take', kind, key]);
    t.match(took.stdout, /^took/m, 'another program takes the key');
    const r = supervise([...CKPT, 'restart', '-i', img]);
    t.not(r.status, 0, 'the restart fails');
    t.match(r.stderr, new RegExp(`restart: EBUSY: restart:sysvipc: SysV ${kind} id \\d+ key ${key}: the key is in use`), 'EBUSY naming the object');
    t.notMatch(r.stdout, /restarted/, 'no process ran');
    // Made before the failing one (shm, sem come before msg): removed again.
    t.notOk(ids('sem').some((o) => o.key === Number(m[3])), 'no semaphore set left behind');
    if (kind === 'msg') t.notOk(ids('shm').some((o) => o.key === Number(m[1])), 'no segment left behind');
    supervise([fixture('sysvipc'), 'drop', kind, key]);
    const again = supervise([...CKPT, 'restart', '-i', img]);
    t.match(again.stdout, /SYSVIPC OK/, 'once the key is free again, the same image restarts');
  });
}

t.test('rollback: SysV segments destroyed since the checkpoint come back under their ids (one removed while attached, one with its key)', async (t) => {
  const r = supervise([fixture('sysvipc'), 'gone']);
  for (const c of ['gone: both segments destroyed', 'gone: the removed segment is back under its id, removed, attached, its bytes', 'gone: the keyed segment is back under its id and key', 'gone: still attached read-only']) t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  t.match(r.stdout, /GONE OK/, r.stdout + r.stderr);
  t.equal(r.status, 0);
});

t.test('restart: a SysV semaphore id taken meanwhile (under another key) is EBUSY', async (t) => {
  const img = path.join(dir, 'busy-id.img');
  const first = supervise([fixture('sysvipc'), img]);
  t.equal(first.status, 137, 'CKPT_KILL');
  const m = /sem key=(0x[0-9a-f]+) id=(\d+)/.exec(first.stdout);
  t.ok(m, 'the set was made');
  if (!m) return;
  const other = '0x7e7e' + m[1].slice(-4);
  fs.writeFileSync('/proc/sys/kernel/sem_next_id', m[2]); // the next set gets that id
  const took = supervise([fixture('sysvipc'), 'take', 'sem', other]);
  t.match(took.stdout, new RegExp(`^took sem key=${other} id=${m[2]}$`, 'm'), 'another program holds the id');
  const r = supervise([...CKPT, 'restart', '-i', img]);
  t.not(r.status, 0, 'the restart fails');
  t.match(r.stderr, new RegExp(`restart: EBUSY: restart:sysvipc: SysV sem id ${m[2]} key ${m[1]}: the id is in use \\(key ${other}\\)`), 'EBUSY naming the object and who holds the id');
  supervise([fixture('sysvipc'), 'drop', 'sem', other]);
  t.match(supervise([...CKPT, 'restart', '-i', img]).stdout, /SYSVIPC OK/, 'once the id is free again, the same image restarts');
});

t.test('a process whose SEM_UNDO adjustments cannot be followed is refused by name, the semaphore as it was', async (t) => {
  const r = supervise([fixture('sysvipc'), 'refuse-undo']);
  t.match(r.stdout, /^ok a process whose undo adjustments are not known is refused$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:sysvipc: task \d+: semop on semaphore set \d+ whose operations could not be read \(whether it made SEM_UNDO adjustments is not known\)/);
  t.match(r.stdout, /SEMUNDO OK/);
  t.equal(r.status, 0);
});

const MQ_CHECKS = [
  'mqueue: attributes, four messages', 'mqueue: mode and owner', 'mqueue: the second description write-only, non-blocking', 'mqueue: the write-only one cannot receive',
  'mqueue: found again by its name', 'mqueue: highest priority first', 'mqueue: then the next', 'mqueue: equal priorities in the order sent (1)',
  'mqueue: equal priorities in the order sent (2)', 'mqueue: the one sent through the name is the same queue', 'unlinked queue: still without a name',
  'unlinked queue: its message, its mode', 'unlinked queue: the message', 'mqueue: the child sent through its descriptor', "mqueue: the child's descriptor is the same queue",
];
const mq = bothWays(dir, 'mqueue');
for (const mode of ['restart', 'undo'] as const) {
  t.test(`POSIX message queues (named and unlinked, two descriptions, a child) across a ${mode}`, async (t) => {
    const { first, r } = mq(mode);
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
    for (const c of MQ_CHECKS) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    t.match(r.stdout, /MQUEUE OK/, r.stdout + r.stderr);
    t.equal(r.status, 0);
  });
}

t.test('a message queue with an mq_notify registration is refused by name, the registration kept', async (t) => {
  const r = supervise([fixture('mqueue'), 'refuse-notify']);
  t.match(r.stdout, /^ok a queue with an mq_notify registration is refused$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:files: task (\d+): fd \d+ \(message queue \/ckpt-notify-\d+ with an mq_notify registration of process \1: not kept\)/);
  t.match(r.stdout, /MQNOTIFY OK/);
  t.equal(r.status, 0);
});
