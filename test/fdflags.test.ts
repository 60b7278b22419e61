// Status flags, close-on-exec, owners and signals of every kind of descriptor; memfds' modes and seals.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('fdflags');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

for (const mode of ['restart', 'undo']) {
  t.test(`status flags, close-on-exec, owners and memfd seals of every kind of descriptor across a ${mode}`, async (t) => {
    const d = fs.mkdtempSync(path.join(dir, `${mode}-`));
    const img = path.join(d, 'fdflags.img');
    const first = supervise([fixture('fdflags'), d, mode === 'undo' ? 'undo' : img]);
    const r = mode === 'undo' ? first : restart(img);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL');
      const inspect = supervise([...CKPT, 'inspect', img]).stdout;
      t.match(inspect, /pipe #0 read end .*, owner process \d+, signal 12/, 'inspect shows an owner and its signal');
      t.match(inspect, /fifo .*, owner process group \d+/, 'and a process group owner');
    }
    else t.match(first.stdout, /spoiled, rolling back/, 'flags cleared, close-on-exec flipped, owners dropped before the rollback');
    const checks = r.stdout.match(/^(ok|FAIL) .*$/gm) ?? [];
    t.ok(checks.length >= 30, `${checks.length} checks ran`);
    for (const c of checks) t.ok(c.startsWith('ok '), c);
    for (const c of ['pipe: owner self and F_SETSIG kept', 'FIFO: owner process group kept', 'socket: owner thread and F_SETSIG kept', 'pipe: owner the child kept', 'file: owner kept without O_ASYNC', 'pipe O_ASYNC: SIGUSR2 with si_fd', 'FIFO O_ASYNC: SIGIO to the group', 'socket O_ASYNC: SIGRTMIN+1 to the thread', 'memfd: mode and size', 'memfd: seals kept', 'memfd: seals enforced', 'memfd: the read-only description has its own offset', 'deleted file O_RDWR|O_APPEND|O_DSYNC: flags kept', 'memfd MFD_NOEXEC_SEAL: not executable, and cannot be made so', 'memfd write-sealed and mapped shared: contents and seals']) {
      t.match(r.stdout, new RegExp(`^ok ${c.replace(/[|()+]/g, '\\$&')}$`, 'm'), c);
    }
    t.match(r.stdout, /FDFLAGS OK/);
    t.equal(r.status, 0);
  });
}

t.test('a descriptor whose owner is a process outside the subtree: the checkpoint is refused and the program runs on', async (t) => {
  const d = fs.mkdtempSync(path.join(dir, 'owner-'));
  const r = supervise([fixture('fdflags'), d, 'owner-outside']);
  t.match(r.stdout, /checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, /checkpoint:files: task \d+: fd 3 \(its owner, process \d+, is outside the subtree\)/, 'the log names the task, the fd and why');
  t.match(r.stdout, /^ok the child still runs, the owner unchanged$/m);
  t.equal(r.status, 0);
});
