// Kinds of descriptors and descriptor state: kept across a restart and a
// rollback (the fixture checks itself), or refused with EOPNOTSUPP naming
// the kind, the program unharmed.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('fdkinds');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

/** Run `fdkinds WHAT [DIR] IMAGE|undo` both ways; every check it names must pass. */
function bothWays(what: string, title: string, checks: string[], done: string, withDir: boolean, beforeUndo: string[] = []) {
  for (const mode of ['restart', 'undo']) {
    t.test(`${title} across a ${mode}`, async (t) => {
      const img = path.join(dir, `${what}.img`);
      const args = [fixture('fdkinds'), what, ...(withDir ? [fs.mkdtempSync(path.join(dir, `${what}-`))] : []), mode === 'undo' ? 'undo' : img];
      const first = supervise(args);
      if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
      else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
      if (mode === 'undo') for (const c of beforeUndo) t.match(first.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
      const r = mode === 'undo' ? first : restart(img);
      for (const c of checks) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
      t.match(r.stdout, new RegExp(done), r.stdout.includes(done) ? done : r.stdout + r.stderr);
      t.equal(r.status, 0);
    });
  }
}

bothWays('ghost', 'a deleted file open by two descriptions in one process and one in its child stays one sparse inode', [
  'ghost: two descriptions, one inode', 'ghost: unlinked, mode, owner, size', 'ghost: offsets and access modes',
  'ghost: still sparse (SEEK_HOLE, SEEK_DATA)', 'ghost: contents', 'ghost: a write through one description is read through the other',
  'ghost: the child sees what the parent wrote', 'ghost: the parent sees what the child wrote', "ghost: the child's checks",
], 'GHOST2 OK', true);

bothWays('deleted', 'a deleted cwd, a deleted directory held open, a deleted FIFO with data and a deleted device node', [
  'deleted cwd: still a removed directory, its mode', 'deleted cwd: nothing can be made in it',
  'deleted directory fd: removed, its mode', 'deleted directory fd: nothing can be made in it',
  'deleted FIFO: still a FIFO with no name, its mode', 'deleted FIFO: the data queued', 'deleted FIFO: its two ends still one pipe',
  'deleted device node: the same device, mode and owner, no name', 'deleted device node: reads what the device gives, read-write', 'deleted device node: no name left behind',
], 'DELETED OK', true);

bothWays('pidfd', 'pidfds of a running child (non-blocking), of a zombie child (CLONE_PIDFD) and of itself (PIDFD_THREAD)', [
  'pidfd of a child: names it', 'pidfd of a child: non-blocking', 'pidfd of a child: still running', 'pidfd of a child: signals it',
  'pidfd of a child: waits for it', 'pidfd of a zombie (CLONE_PIDFD): readable at once', 'pidfd of a zombie: reaps it with its status',
  'pidfd of itself: names it, PIDFD_THREAD',
], 'PIDFD OK', false);

bothWays('shutdown', 'unix socket pairs with one end shut down (SHUT_WR on a stream, SHUT_RD on a seqpacket)', [
  'SHUT_WR: what was sent before is read', 'SHUT_WR: then the peer reads EOF', 'SHUT_WR: the end shut down cannot send (EPIPE)',
  'SHUT_WR: the other way still works', 'SHUT_RD: the peer cannot send to it (EPIPE)', 'SHUT_RD: it reads EOF', 'SHUT_RD: what it sent is still read',
], 'SHUTDOWN OK', false);

bothWays('epolldup', 'epoll watches whose files left their numbers (dup\'ed, then replaced or closed there)', [
  'epoll: the watch still under the old number', 'epoll: the other watch too', 'epoll: nothing ready yet',
  'epoll: the watched pipe (now only at another number) fires', 'epoll: the second one fires',
  'epoll: the watch is not under the new number', 'epoll: the numbers hold what they held',
], 'EPOLLDUP OK', false);

bothWays('scm', 'files in flight in SCM_RIGHTS messages on a stream pair (one held only there, one also held), plain bytes between', [
  'SCM_RIGHTS: the first message carries its file', "SCM_RIGHTS: a pipe's write end held only in flight", 'SCM_RIGHTS: it is the write end of the pipe the process reads',
  'SCM_RIGHTS: the plain bytes between, with no file', 'SCM_RIGHTS: the third carries the read end the process holds', 'SCM_RIGHTS: one pipe through both',
  'SCM_RIGHTS: no other write end left anywhere (EOF once it is closed)',
], 'SCM OK', false, ['SCM_RIGHTS: the queue left as it was by the checkpoint']);

const refusals: [string, RegExp][] = [
  ['pty-outside', /\/dev\/ptmx: pty \/dev\/pts\/\d+ also held by process \d+ outside the subtree/],
  ['pty-pktstatus', /pty master of \/dev\/pts\/\d+ in packet mode with a status byte unread/],
  ['scm-gone', /1 descriptors in flight in SCM_RIGHTS messages queued on this unix socket/],
  ['sharedfiles', /task \d+: shares its descriptor table with process \d+ outside the subtree \(clone CLONE_FILES without CLONE_THREAD\)/],
  ['sharedfiles-sibling', /task \d+: shares its descriptor table with process \d+ but its parent \d+ does not \(clone CLONE_FILES of a process that is not its parent\): not supported/],
  ['pidfd-outside', /a pidfd of process \d+, outside the subtree/],
  ['epoll-outside', /fd \d+ \(epoll watching a file that no process of the subtree holds \(added as descriptor \d+\)\)/],
];
t.test('a pty master whose slave was never opened is kept (it was refused before tty.ts)', async (t) => {
  const r = supervise([fixture('fdkinds'), 'refuse', 'ptmx']);
  t.match(r.stdout, /ptmx: checkpoint ret=[1-9]\d* errno=0/, r.stdout + r.stderr);
  t.match(r.stdout, /ptmx: still works after: yes/);
  t.equal(r.status, 0);
});

for (const [what, log] of refusals) {
  t.test(`refused with EOPNOTSUPP, the program unharmed: ${what}`, async (t) => {
    const r = supervise([fixture('fdkinds'), 'refuse', what]);
    t.match(r.stdout, new RegExp(`${what}: checkpoint ret=-1 errno=EOPNOTSUPP`));
    t.match(r.stderr, log, 'one log line names the task, the resource and why');
    t.match(r.stdout, new RegExp(`${what}: still works after: yes`));
    t.equal(r.status, 0);
  });
}
