// Whole trees: threads, children, sessions, groups, zombies, pipes.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, run, fixture, CKPT, SUPERVISE, tmpdir, q, bothWays } from './helpers.js';

const dir = tmpdir('tree');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

t.test('a multi-threaded worker pool survives checkpoint -> crash -> restart', async (t) => {
  const img = path.join(dir, 'pool.img');
  const first = supervise([fixture('pool'), img]);
  t.equal(first.status, 137, 'crashed after its checkpoint');
  t.match(first.stdout, /checkpointed crid=\d+ pid=\d+ threads=5/);
  const second = restart(img);
  t.equal(second.status, 0, 'all the pool\'s own checks passed');
  for (const c of ['every item taken once', 'sum of items', 'worker 0 (tid, TLS, mask, altstack)', 'worker 1 (tid, TLS, mask, altstack)', 'worker 2 (tid, TLS, mask, altstack)', 'worker 3 (tid, TLS, mask, altstack)', 'went through a restart']) {
    t.match(second.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
  }
  t.match(second.stdout, /POOL OK/);
});

t.test('the worker pool checkpointed from outside while it runs (husk path) restarts with every thread\'s state', async (t) => {
  // No --kill: the image is written from a husk after the pool runs again;
  // the workers' own alternate stacks and masks are read during the stop.
  const img = path.join(dir, 'pool-outside.img');
  const first = supervise(['sh', '-c', `${q(fixture('pool'))} - & sleep 0.5; ${CKPT.map(q).join(' ')} checkpoint $! -o ${q(img)}; kill -9 $!; wait`]);
  t.match(first.stderr, /checkpoint \d+ of \d+ written/, 'the checkpoint was taken');
  const second = restart(img);
  t.equal(second.status, 0, 'all the pool\'s own checks passed');
  for (const c of ['every item taken once', 'sum of items', 'worker 0 (tid, TLS, mask, altstack)', 'worker 1 (tid, TLS, mask, altstack)', 'worker 2 (tid, TLS, mask, altstack)', 'worker 3 (tid, TLS, mask, altstack)', 'went through a restart']) {
    t.match(second.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
  }
  t.match(second.stdout, /POOL OK/);
});

t.test('a tree of three levels with its own session, group, a zombie and a pipe', async (t) => {
  const img = path.join(dir, 'tree.img');
  const first = supervise([fixture('tree'), img]);
  t.equal(first.status, 137, 'CKPT_KILL killed the whole tree, the caller too');
  const second = restart(img);
  t.equal(second.status, 0);
  for (const c of ["root is still its session's leader", 'data queued in the pipe survived', 'A: same pid, parent, own group, session', 'B: child of A, in A\'s group, same session', 'zombie reaped with its status 7', 'zombie killed by SIGKILL reaped as such', 'A exits normally']) {
    t.match(second.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(second.stdout, /TREE OK/);
  const inspect = supervise([...CKPT, 'inspect', img]);
  t.match(inspect.stdout, /zombie \d+ \(child of \d+\), wait status 1792/, 'inspect shows the zombie');
  t.match(inspect.stdout, /pipe #0 read end \(25 bytes unread\)/, 'and the queued bytes');
});

t.test('a producer/consumer pipeline, checkpointed by a sibling with ckpt checkpoint --kill', async (t) => {
  const img = path.join(dir, 'pipeline.img');
  // Long enough (3 s) for the ckpt tool, a Node process, to start even on a loaded machine.
  const pipeline = `${q(fixture('counter'))} 60 50 | cat`;
  const first = supervise(['sh', '-c', `sh -c ${q(pipeline)} & sleep 0.6; ${CKPT.map(q).join(' ')} checkpoint $! --kill -o ${q(img)}; wait`]);
  const before = first.stdout.match(/^step \d+$/gm) ?? [];
  t.ok(before.length > 0 && before.length < 60, `checkpointed after ${before.length} items`);
  t.notMatch(first.stdout, /done/);
  const second = restart(img);
  t.equal(second.status, 0, 'the restored pipeline exits 0');
  const after = second.stdout.match(/^step \d+$/gm) ?? [];
  t.same([...before, ...after], Array.from({ length: 60 }, (_, i) => `step ${i + 1}`), 'no item lost or repeated across the pipe');
  t.match(second.stdout, /done n=60 sum=right/);
});

t.test('a shell checkpoints its own tree (the caller inside it) and comes back', async (t) => {
  const img = path.join(dir, 'self-tree.img');
  const script = `${q(fixture('counter'))} 20 50 | cat & sleep 0.4; ${q(fixture('callabi'))} checkpoint $$ w:${q(img)} 4`;
  const first = supervise(['sh', '-c', script]);
  t.equal(first.status, 137, 'the shell was killed with its tree');
  const second = restart(img);
  t.match(second.stdout, /checkpoint ret=0 errno=0\ncaller alive/, 'the caller sees checkpoint() return 0');
  t.match(second.stdout, /done n=20 sum=right/);
  t.equal(second.status, 0);
});

t.test('pids of the tree are still taken: EBUSY, and nothing is left behind', async (t) => {
  const img = path.join(dir, 'long.img');
  const pipeline = `${q(fixture('counter'))} 40 100 | cat`;
  supervise(['sh', '-c', `sh -c ${q(pipeline)} & sleep 0.3; ${q(fixture('callabi'))} checkpoint $! w:${q(img)} 4; wait`]);
  // restart-all reports, after the failed restart, whether the caller has
  // any child left (a process made before the pid clash was found, or its zombie).
  const r = supervise(['sh', '-c', `${q(fixture('timerestart'))} ${q(img)} & sleep 0.5; ${q(fixture('callabi'))} restart-all ${q(img)}; wait`]);
  t.match(r.stdout, /restart ret=-1 errno=EBUSY/, 'restarting the running tree again finds its pids in use');
  t.match(r.stderr, /restart: EBUSY: pid \d+ of the image is in use/);
  t.match(r.stdout, /done n=40 sum=right/, 'the running one is unharmed');
  t.match(r.stdout, /^leftover children: none\ncaller alive$/m, 'no process (not even a zombie) is left with the failed caller, which lives on');
});

t.test('shared anonymous memory and a memfd stay shared between parent and child', async (t) => {
  const img = path.join(dir, 'shmem.img');
  t.equal(supervise([fixture('shmem'), img]).status, 137);
  const r = restart(img);
  t.equal(r.status, 0);
  for (const c of ['shared anonymous memory written by the child', 'memfd contents', 'memfd fd offset', 'read through the memfd fd sees the mapping', "still shared: the child sees the parent's writes"]) {
    t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
  }
  t.match(supervise([...CKPT, 'inspect', img]).stdout, /shared memory object \S+ \(\/dev\/zero\), 4\.0 MiB/);
});

t.test('unix socketpairs (stream, datagram, seqpacket) with queued data', async (t) => {
  const img = path.join(dir, 'sockets.img');
  t.equal(supervise([fixture('sockets'), img]).status, 137);
  const r = restart(img);
  t.equal(r.status, 0);
  t.match(r.stdout, /^ok the child's queued stream bytes$/m);
  t.match(r.stdout, /^ok the child read every queue exactly \(stream, datagram boundaries, seqpacket\)$/m);
  for (const c of ['datagram pair after the restart: child to parent', 'seqpacket pair after the restart: child to parent', 'datagram pair after the restart: parent to child', 'seqpacket pair after the restart: parent to child', 'stream pair after the restart: parent to child', 'child exits']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stdout, /SOCKETS OK/);
});

for (const mode of ['restart', 'undo']) {
  t.test(`named unix sockets (listeners, accepted connections, a bound datagram socket) across a ${mode}`, async (t) => {
    const sockdir = fs.mkdtempSync(path.join(dir, 'usock-'));
    const img = path.join(dir, 'usock.img');
    const first = supervise([fixture('usock'), sockdir, mode === 'undo' ? 'undo' : img]);
    const r = mode === 'undo' ? first : restart(img);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/, 'queues read, listeners closed and unlinked before the rollback');
    for (const c of ['stream listener keeps its path', 'accepted stream socket keeps the listener\'s name', 'seqpacket listener and its connection keep the abstract name', 'datagram socket keeps its path', 'queued stream bytes from the client', 'queued seqpackets, boundaries kept', 'queued datagrams of the unconnected socket', 'the client sees the server\'s name and its queues', 'a new client connects to the stream listener', 'a new client connects to the seqpacket listener', 'a new datagram reaches the named socket']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /USOCK OK/);
    t.equal(r.status, 0);
  });
}

for (const mode of ['restart', 'undo']) {
  t.test(`a datagram socket connected to its own name, a datagram queued, across a ${mode}`, async (t) => {
    const img = path.join(dir, 'selfdgram.img');
    const first = supervise([fixture('selfdgram'), mode === 'undo' ? 'undo' : img]);
    const r = mode === 'undo' ? first : restart(img);
    t.match(r.stdout, /^ok queued datagram back$/m);
    t.match(r.stdout, /^ok still connected to itself$/m);
    t.equal(r.status, 0, r.stderr);
  });
}

for (const mode of ['restart', 'undo']) {
  t.test(`eventfd, signalfd, timerfds and an epoll watching them across a ${mode}`, async (t) => {
    const img = path.join(dir, 'events.img');
    const first = supervise([fixture('events'), mode === 'undo' ? 'undo' : img]);
    const r = mode === 'undo' ? first : restart(img);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL');
      const inspect = supervise([...CKPT, 'inspect', img]).stdout;
      t.match(inspect, /eventfd, count 5, semaphore/);
      t.match(inspect, /eventfd, count 90\b/, 'inspect reads the count as hex');
      t.match(inspect, /timerfd on clock 1, 0\.0+ s left, every 0\.0+ s, 1 expirations unread/);
      for (const events of ['0x19', '0x80000019', '0x40000019']) t.match(inspect, new RegExp(`epoll watching .*fd \\d+ \\(events ${events}\\)`), `the epoll watch with events ${events} (level, edge, one-shot)`);
    } else t.match(first.stdout, /spoiled, rolling back/, 'everything read, changed and disarmed before the rollback');
    for (const c of ['epoll reports the eventfd and the signalfd with their data', 'one-shot and edge-triggered watches do not fire twice', 'eventfd in semaphore mode still counts 5, non-blocking', 'eventfd counts 16 and 90', 'signalfd reads the pending SIGUSR1', 'an expiration not read before the checkpoint is still there', 'the periodic timer fires again through the epoll', 'a timer far away keeps its time left', 'status flags']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /EVENTS OK/);
    t.equal(r.status, 0);
  });
}

t.test('a Node.js process (epoll, eventfds, pipes, threads) checkpointed from outside carries on after a restart', async (t) => {
  const img = path.join(dir, 'node.img');
  const script = 'let i = 0; setInterval(() => { console.log("tick " + ++i); if (i === 40) process.exit(0); }, 100)';
  const first = supervise(['sh', '-c', `${q(process.execPath)} -e ${q(script)} & sleep 0.5; ${CKPT.map(q).join(' ')} checkpoint $! --kill -o ${q(img)}; wait`], { timeout: 60_000 });
  const before = first.stdout.match(/^tick \d+$/gm) ?? [];
  t.ok(before.length > 0 && before.length < 40, `checkpointed after ${before.length} ticks`);
  const second = supervise([...CKPT, 'restart', '-i', img], { timeout: 60_000 });
  t.equal(second.status, 0, 'the restored node exits 0');
  const after = second.stdout.match(/^tick \d+$/gm) ?? [];
  t.same([...before, ...after], Array.from({ length: 40 }, (_, i) => `tick ${i + 1}`), 'its timer goes on from where it was: no tick lost or repeated');
});

for (const mode of ['restart', 'undo']) {
  t.test(`deleted files still open (an O_TMPFILE with a hole, a file unlinked after opening) across a ${mode}`, async (t) => {
    const gdir = fs.mkdtempSync(path.join(dir, 'ghost-'));
    const img = path.join(dir, 'ghost.img');
    const first = supervise([fixture('ghost'), gdir, mode === 'undo' ? 'undo' : img]);
    const r = mode === 'undo' ? first : restart(img);
    if (mode === 'restart') {
      t.equal(first.status, 137, 'CKPT_KILL');
      t.match(supervise([...CKPT, 'inspect', img]).stdout, /deleted file \S+\/unlinked \(contents kept\) pos 8/);
    } else t.match(first.stdout, /spoiled, rolling back/, 'both overwritten, one truncated, before the rollback');
    for (const c of ['O_TMPFILE: unlinked, mode and size kept', 'O_TMPFILE: contents from its offset', 'O_TMPFILE: the data after the hole', 'O_TMPFILE: the hole reads as zeros', 'O_TMPFILE: still writable', 'unlinked file: still unlinked, read-only', 'unlinked file: mode and size kept', 'unlinked file: contents from its offset']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /GHOST OK/);
    t.equal(r.status, 0);
  });
}

t.test('a datagram socket connected to a named socket outside the subtree (as to /dev/log) is connected again by name', async (t) => {
  const sock = path.join(fs.mkdtempSync(path.join(dir, 'dgram-')), 'log.sock');
  const img = path.join(dir, 'dgram-client.img');
  const ca = q(fixture('callabi'));
  // The server is a sibling of the client: outside the subtree checkpointed.
  const r = supervise(['sh', '-c', `${ca} dgram-server ${q(sock)} 2 & sleep 0.3; ${ca} dgram-client ${q(sock)} w:${q(img)}; ${CKPT.map(q).join(' ')} restart -i ${q(img)}; wait`]);
  t.match(r.stdout, /server got: before\n(.|\n)*server got: after/, 'the server hears the client before the checkpoint and after the restart');
  t.match(r.stdout, /client restored: send ok/);
  t.match(supervise([...CKPT, 'inspect', img]).stdout, new RegExp(`unix socket \\(dgram; connected to ${sock.replace(/[.]/g, '\\.')}\\)`), 'inspect names where it is connected');
});

for (const mode of ['restart', 'undo']) {
  t.test(`a child stopped by job control stays stopped across a ${mode}, and goes on at SIGCONT`, async (t) => {
    const img = path.join(dir, 'jobstop.img');
    const first = supervise([fixture('jobstop'), mode === 'undo' ? 'undo' : img], { timeout: 60_000 });
    const r = mode === 'undo' ? first : supervise([...CKPT, 'restart', '-i', img], { timeout: 60_000 });
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/, 'the child was continued and ran before the rollback');
    for (const c of ['the stopped child stays stopped', 'SIGCONT lets it go on', 'and it is still the parent\'s child']) t.match(r.stdout, new RegExp(`^ok ${c.replace(/'/g, "'")}$`, 'm'), c);
    t.match(r.stdout, /JOBSTOP OK/);
  });
}

t.test('a listener with a connection not yet accepted whose client sent data is refused, the program unharmed', async (t) => {
  const r = supervise([fixture('callabi'), 'pending-accept', path.join(dir, 'pending.sock')]);
  t.match(r.stdout, /checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, /listening unix socket \S+pending\.sock with 1 connections not yet accepted: the client socket:\[\d+\] has sent data/);
  t.match(r.stdout, /connection still usable after the refusal: yes/);
});

t.test('a socket connected outside the subtree is refused, the program unharmed', async (t) => {
  const r = supervise([fixture('callabi'), 'peer-outside', path.join(dir, 'x.img')]);
  t.match(r.stdout, /checkpoint ret=-1 errno=EOPNOTSUPP/);
  const child = /^child pid=(\d+) holds fd (\d+)$/m.exec(r.stdout);
  t.ok(child, 'the fixture says which task and fd hold the socket');
  const holder = /^peer held by pid=(\d+)$/m.exec(r.stdout)?.[1];
  t.match(r.stderr, new RegExp(`task \\d+: checkpoint: EOPNOTSUPP: checkpoint:files: task ${child?.[1]}: fd ${child?.[2]} \\(unix socket connected to process ${holder} \\(callabi\\), outside the subtree\\)`), 'the log names the task and the fd that hold it, and the process outside (pid, command)');
  t.match(r.stdout, /child alive after the refusal: yes/);
});

t.test('--pidns: the tree runs under a minimal init as pid 1 that reaps orphans', async (t) => {
  const r = run([...SUPERVISE, '--pidns', '--', 'sh', '-c', 'echo "me=$$ parent=$PPID"; (sleep 0.1 &); sleep 0.3; exit 7']);
  t.equal(r.status, 7, 'the exit status passes through the init');
  t.match(r.stdout, /^me=2 parent=1$/m, 'the program is pid 2, its parent the init (pid 1)');
  // The processes of the namespace as it sees them: a proc mounted from
  // inside it (in a mount namespace of its own), not the host's /proc.
  const orphans = run([...SUPERVISE, '--pidns', '--', 'sh', '-c', '(sh -c "echo orphan=\\$\\$; exit 0" &); sleep 0.3; unshare --mount --mount-proc --propagation private ps -o pid=,stat=,comm= -e']);
  const orphan = /^orphan=(\d+)$/m.exec(orphans.stdout)?.[1];
  t.ok(orphan, 'the orphan ran');
  const procs = orphans.stdout.split('\n').filter((l) => /^\s*\d+ /.test(l)).map((l) => l.trim().split(/\s+/));
  t.ok(procs.some(([pid, , comm]) => pid === '1' && comm === 'ckpt-init'), 'the list is the namespace\'s: its pid 1 is ckpt-init');
  t.notOk(procs.some(([pid]) => pid === orphan), `the orphan (pid ${orphan}) is not there, not even as a zombie`);
  t.same(procs.filter(([, stat]) => stat.startsWith('Z')), [], 'no zombie in the namespace');
  const esrch = run([...SUPERVISE, '--pidns', '--', fixture('callabi'), 'checkpoint', '999', 'none', '1']);
  t.match(esrch.stdout, /ret=-1 errno=ESRCH/, 'pids are the namespace\'s own: 999 is no one there');
});

t.test('--pidns: a program checkpoints itself (not pid 1) and is restarted inside the namespace with its own pid', async (t) => {
  const img = path.join(dir, 'ns-self.img');
  const r = run([...SUPERVISE, '--pidns', '--', 'sh', '-c', `${q(fixture('selfckpt'))} ${q(img)} crash; ${CKPT.map(q).join(' ')} restart -i ${q(img)}; echo restart-status=$?`]);
  const pid = Number(/checkpointed crid=\d+ pid=(\d+)/.exec(r.stdout)?.[1]);
  t.ok(pid > 1 && pid < 100, `the pid it saw is its namespace's (${pid})`);
  t.match(r.stdout, new RegExp(`restored pid=${pid}\\n`), 'restored with the same pid, as seen in the namespace');
  t.match(r.stdout, /^ok queued signal keeps its value and sender$/m);
  t.notMatch(r.stdout, /FAIL/);
  t.match(r.stdout, /RESTORE OK\nrestart-status=0/);
});

t.test('--pidns: shared memory restored inside the namespace, where the supervisor is out of sight', async (t) => {
  const img = path.join(dir, 'ns-shmem.img');
  const r = run([...SUPERVISE, '--pidns', '--', 'sh', '-c', `${q(fixture('shmem'))} ${q(img)}; ${CKPT.map(q).join(' ')} restart -i ${q(img)}; echo restart-status=$?`]);
  for (const c of ['shared anonymous memory written by the child', 'memfd contents', 'memfd fd offset', "still shared: the child sees the parent's writes"]) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stdout, /SHMEM OK\nrestart-status=0/);
});

t.test('--pidns: a program rolls itself back (not pid 1) again and again', async (t) => {
  const r = run([...SUPERVISE, '--pidns', '--', fixture('undo'), path.join(dir, 'undo-ns-self.state'), '3', '16']);
  t.equal(r.status, 0);
  t.equal((r.stdout.match(/^round \d+ ok: /gm) ?? []).length, 3, 'three rollbacks, each back at the checkpoint');
  t.match(r.stdout, /UNDO OK after 3 rounds/);
});

t.test('--pidns: the whole container checkpointed as pid 1, restored (twice at once) by a new supervisor', async (t) => {
  const img = path.join(dir, 'container.img');
  const first = run([...SUPERVISE, '--pidns', '--', 'sh', '-c', `${q(fixture('counter'))} 30 50 | cat & sleep 0.5; ${q(fixture('callabi'))} checkpoint 1 w:${q(img)} 4; wait`]);
  t.equal(first.status, 137, 'CKPT_KILL of pid 1 ended the container');
  const before = first.stdout.match(/^step \d+$/gm) ?? [];
  t.ok(before.length > 0 && before.length < 30);
  const inspect = supervise([...CKPT, 'inspect', img]).stdout;
  t.match(inspect, /^process 1 \(ckpt-init\)/m, 'the image holds the init as pid 1');
  t.match(inspect, /^process 2 \(sh\) ppid 1/m, 'and its tree with namespace pids');
  const r = supervise(['sh', '-c', `${CKPT.map(q).join(' ')} restart -i ${q(img)} > ${q(img)}.a & ${CKPT.map(q).join(' ')} restart -i ${q(img)} > ${q(img)}.b; wait`]);
  t.equal(r.status, 0);
  for (const out of [fs.readFileSync(img + '.a', 'utf8'), fs.readFileSync(img + '.b', 'utf8')]) {
    t.match(out, /checkpoint ret=0 errno=0/, 'the caller inside sees checkpoint() return 0');
    t.match(out, /done n=30 sum=right/, 'each copy finishes, every pid its own');
    t.same([...before, ...(out.match(/^step \d+$/gm) ?? [])], Array.from({ length: 30 }, (_, i) => `step ${i + 1}`), 'no step lost or repeated');
  }
});

t.test('a FIFO with unread data between parent and child', async (t) => {
  const img = path.join(dir, 'fifo.img');
  t.equal(supervise([fixture('fifo'), img, path.join(dir, 'the.fifo')]).status, 137);
  t.match(supervise([...CKPT, 'inspect', img]).stdout, /fifo \S+the\.fifo \(14 bytes unread\)/, 'the image holds the 14 unread bytes');
  const r = restart(img);
  t.equal(r.status, 0);
  t.match(r.stdout, /^ok the child read the queued bytes, then the new ones$/m);
});

t.test('a shell checkpoints itself with `ckpt checkpoint $$` and carries on after restart', async (t) => {
  const img = path.join(dir, 'shell-self.img');
  const first = supervise(['sh', '-c', `${q(fixture('counter'))} 60 50 | cat & sleep 0.3; ${CKPT.map(q).join(' ')} checkpoint $$ -o ${q(img)} --kill; echo "status=$?"; wait`]);
  t.equal(first.status, 137);
  t.notMatch(first.stdout, /status=/, 'the shell was killed with its tree');
  const second = restart(img);
  t.match(second.stdout, /^status=0$/m, 'the restored shell goes on after its ckpt command, which succeeded');
  t.match(second.stderr, /back from a restart of this checkpoint/);
  t.match(second.stdout, /done n=60 sum=right/);
  t.equal(second.status, 0);
});

// A vfork parent cannot be stopped until its child execs or exits, and the
// two share one address space meanwhile: refused at once, never a hang.
t.test('a checkpoint during a vfork is refused (parent and child), and works once it is over', async (t) => {
  const pidfile = path.join(tmpdir('vfork'), 'child.pid');
  const ckpt = CKPT.map(q).join(' ');
  const r = supervise(['sh', '-c', `${q(fixture('vfork'))} ${q(pidfile)} & p=$!; sleep 0.7; ` +
    `${ckpt} checkpoint $p --defer; echo "parent=$?"; ${ckpt} checkpoint $(cat ${q(pidfile)}) --defer; echo "child=$?"; wait $p; echo "fixture=$?"`], { timeout: 60_000 });
  t.match(r.stdout, /^parent=1$/m, 'the checkpoint of the vfork parent fails');
  t.match(r.stdout, /^child=1$/m, 'so does that of the vfork child');
  t.match(r.stderr, /^ckpt-supervise: task \d+: checkpoint: EOPNOTSUPP: checkpoint:vfork: task \d+: in vfork\(\): its child \d+ shares its memory until it calls exec or exits/m, 'the log names the parent and its child');
  t.match(r.stderr, /^ckpt-supervise: task \d+: checkpoint: EOPNOTSUPP: checkpoint:vfork: task \d+: a vfork child that has not called exec yet/m, 'and the child');
  t.match(r.stdout, /^ok the vfork child ran on to its exec$/m, 'both ran on');
  t.match(r.stdout, /^ok after the vfork: checkpoint and rollback$/m);
  t.match(r.stdout, /^fixture=0$/m);
});

// A shell loop forks all the time (dash: vfork, then exec): a freeze finds a
// child at its exec event, or the parent at its vfork event after the child
// exec'd; both are still inside the call, whose result would overwrite an
// injected one's (a husk's clone came back 0: ENOMEM; the parent's vfork
// came back ENOSYS, "Cannot fork"). And a release reaping a husk while the
// parent is in vfork left the vfork child stopped: the loop hung for good.
t.test('a shell loop that forks all the time: checkpoint --defer, undo and release, again and again; only vfork refusals, and the loop runs on', async (t) => {
  const d = tmpdir('forkloop');
  const ckpt = CKPT.map(q).join(' ');
  const r = supervise(['bash', '-c', [
    `sh -c 'n=0; while [ ! -e ${d}/stop ]; do /bin/true; n=$((n+1)); done; echo "loop ended after $n"' & S=$!`,
    'ok=0; refused=0; other=0; undone=0',
    'for i in $(seq 12); do',
    `  if C=$(${ckpt} checkpoint $S --defer 2> ${d}/err); then ok=$((ok+1))`,
    `    for j in $(seq 10); do ${ckpt} undo $C 2> ${d}/uerr && { undone=$((undone+1)); break; }; grep -q EOPNOTSUPP ${d}/uerr || { other=$((other+1)); cat ${d}/uerr; break; }; done`,
    `    ${ckpt} release $C 2> ${d}/rerr || { other=$((other+1)); cat ${d}/rerr; }`,
    `  elif grep -q EOPNOTSUPP ${d}/err; then refused=$((refused+1)); else other=$((other+1)); cat ${d}/err; fi`,
    'done',
    'echo "ok=$ok refused=$refused other=$other undone=$undone"',
    `touch ${d}/stop; wait $S; echo "loop status $?"`,
  ].join('\n')], { timeout: 180_000 });
  t.match(r.stdout, /^ok=\d+ refused=\d+ other=0 /m, `no error but a vfork refusal (${r.stdout.slice(-400)} ${r.stderr.split('\n').filter((l) => !/EOPNOTSUPP: checkpoint:vfork/.test(l)).join('\n').slice(-600)})`);
  const [ok, undone] = [Number(r.stdout.match(/ok=(\d+)/)?.[1]), Number(r.stdout.match(/undone=(\d+)/)?.[1])];
  t.ok(ok >= 5, `most checkpoints work (${ok} of 12)`);
  t.equal(undone, ok, 'every checkpoint taken was undone');
  t.notMatch(r.stderr, /Cannot fork/, 'the loop never saw its vfork fail');
  t.match(r.stdout, /^loop ended after \d+$/m, 'the loop ran on and ended when told to');
  t.match(r.stdout, /^loop status 0$/m);
});

t.test('processes sharing an address space (clone CLONE_VM) are refused, and run on', async (t) => {
  const r = supervise([fixture('sharedvm')], { timeout: 60_000 });
  t.match(r.stdout, /^ok a checkpoint of processes sharing an address space is refused$/m);
  t.match(r.stdout, /^ok both ran on, sharing their memory$/m);
  t.match(r.stderr, /^ckpt-supervise: task \d+: checkpoint: EOPNOTSUPP: checkpoint:memory: task \d+: shares its address space with process \d+ \(clone CLONE_VM without CLONE_THREAD\)/m, 'the log names both');
  t.equal(r.status, 0);
});

// A restart puts every process in the caller's namespaces: one of its own is refused.
for (const kind of ['uts', 'mnt', 'net', 'ipc', 'cgroup']) {
  t.test(`a process in a ${kind} namespace of its own is refused, and stays in it`, async (t) => {
    const r = supervise([fixture('ownns'), kind], { timeout: 60_000 });
    t.match(r.stdout, /^ok refused$/m);
    t.match(r.stdout, /^ok still in its own namespace$/m);
    t.match(r.stderr, new RegExp(`^ckpt-supervise: task \\d+: checkpoint: EOPNOTSUPP: checkpoint:namespaces: task \\d+: is in its own ${kind} namespace`, 'm'), 'the log names the namespace');
    t.equal(r.status, 0);
  });
}

// No handler runs at a checkpoint: calls the kernel restarts through
// restart_syscall go on after a restart or rollback, never EINTR.
for (const mode of ['restart', 'undo'] as const) {
  t.test(`threads blocked in poll, nanosleep and futex waits (all signals blocked) go on (${mode})`, async (t) => {
    const { first, r } = bothWays(tmpdir('blocked'), 'blocked')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    for (const c of ['poll with a timeout goes on and sees the byte', 'nanosleep goes on to its end', 'a futex wait with a timeout goes on and is woken']) t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    t.match(r.stdout, /BLOCKED OK/);
    t.equal(r.status, 0, r.stderr);
  });
}

t.test('a rollback after a process lost its parent (it left the subtree) is refused, nothing changed', async (t) => {
  const r = supervise([fixture('orphan')], { timeout: 60_000 });
  t.match(r.stdout, /^ok the rollback is refused$/m);
  t.match(r.stdout, /^ok the orphaned grandchild still runs$/m);
  t.match(r.stderr, /restart: EOPNOTSUPP: (restart: )?task \d+: its parent \d+ exited since the checkpoint, so it left the subtree/, 'the log names it');
  t.equal(r.status, 0);
});
