// What the README says is kept, refused or offered that no other test ran:
// each end to end under ckpt-supervise, checked by the program itself
// (fixtures/claims.c) or by what the user sees of the tool.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir, q } from './helpers.js';

const dir = tmpdir('claims');
// The credential tests run programs as uid 1000: they must reach the images.
fs.chmodSync(dir, 0o755);
const claims = fixture('claims'), callabi = fixture('callabi');
const ckpt = CKPT.map(q).join(' ');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);
const re = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

/** Every "ok NAME" line the program must print, and its verdict. */
function programSays(t: Tap, out: string, checks: string[]): void {
  for (const c of checks) t.match(out, new RegExp(`^ok ${re(c)}$`, 'm'), c);
  t.notMatch(out, /^FAIL /m, 'no check failed');
  t.match(out, /^CLAIMS OK$/m);
}
type Tap = Test;

/** Run `claims MODE ...args IMAGE|undo`; restart the image if there is one. The program's output after. */
function roundTrip(t: Tap, how: string, args: string[], pause = 0): string {
  if (how === 'undo') {
    const r = supervise([claims, ...args, 'undo']);
    t.match(r.stdout, /spoiled, rolling back/, 'the state was spoiled before the rollback');
    t.equal(r.status, 0, 'exit status');
    return r.stdout;
  }
  const img = path.join(dir, `${args[0]}.img`);
  const first = supervise([claims, ...args, img]);
  t.equal(first.status, 137, 'CKPT_KILL after the checkpoint');
  if (pause) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, pause);
  const r = restart(img);
  t.equal(r.status, 0, 'the restored program exits 0');
  return r.stdout;
}

t.test('a vfork child is traced through its exec: its calls are served', async (t) => {
  const r = supervise([claims, 'vfork', callabi]);
  t.match(r.stdout, /^query ret=\d+ errno=0\njson=\[\]$/m, 'the exec\'d child\'s ckpt_query was served (ENOSYS if untraced)');
  programSays(t, r.stdout, ['the vfork child ran and exited', 'the parent goes on after the child\'s exec, its memory as it was']);
  t.equal(r.status, 0);
});

for (const how of ['restart', 'undo']) {
  t.test(`rseq areas and robust futex lists of two threads across a ${how}`, async (t) => {
    const out = roundTrip(t, how, ['rseq']);
    programSays(t, out, ['rseq: the main thread\'s area is registered', 'rseq: the worker\'s area is registered', 'robust list: the main thread\'s head', 'robust list: the worker\'s head', 'a robust mutex held by a thread that exits: EOWNERDEAD', 'the worker is joined (clear_child_tid)']);
  });

  t.test(`umask, process and thread names, cwd across a ${how}`, async (t) => {
    const d = fs.mkdtempSync(path.join(dir, 'cwd-'));
    const out = roundTrip(t, how, ['proc', d]);
    programSays(t, out, ['umask', 'process name', 'thread name', 'cwd']);
  });

  t.test(`an absolute wall-clock timerfd keeps its wall-clock time across a ${how}`, async (t) => {
    // A second goes by between the checkpoint and the restart (the rollback
    // waits as long): a timer kept by its time left would be a second late.
    const out = roundTrip(t, how, ['walltimer'], 1000);
    programSays(t, out, ['the wall-clock timer keeps its wall-clock time', 'no interval', 'it fires at its wall-clock time']);
  });

  t.test(`directory and device descriptors across a ${how}`, async (t) => {
    const d = fs.mkdtempSync(path.join(dir, 'dirdev-'));
    const out = roundTrip(t, how, ['dirdev', d]);
    programSays(t, out, ['directory descriptor: the same directory', 'directory descriptor: its offset, the next entry', 'directory descriptor: lookups relative to it', '/dev/null: the device, write-only, append', '/dev/zero: the device, reads zeros', '/dev/urandom: the device, non-blocking']);
  });

  t.test(`an open file description shared by two descriptors and two processes across a ${how}`, async (t) => {
    const out = roundTrip(t, how, ['sharedfd', path.join(dir, `shared-${how}.txt`)]);
    programSays(t, out, ['a dup shares the description', 'the child\'s descriptor is the same description', 'its offset', 'the child sees the parent\'s seek and flags', 'the parent sees the child\'s read move the offset', 'child exits']);
  });
}

t.test('credentials: a process that dropped to uid 1000 comes back with them, and no capability', async (t) => {
  const img = path.join(dir, 'creds.img');
  const first = supervise([claims, 'creds', img]);
  t.equal(first.status, 137, 'checkpointed itself as uid 1000 (same uid: allowed), CKPT_KILL');
  const r = restart(img); // by root: it may set them
  t.equal(r.status, 0);
  programSays(t, r.stdout, ['uids', 'gids', 'supplementary groups', 'no capabilities (the restarter\'s are not given)']);
});

t.test('EPERM: a uid-1000 caller may not checkpoint a root process, which runs on', async (t) => {
  const img = path.join(dir, 'eperm.img');
  const r = supervise(['sh', '-c', `sleep 5 & echo "root pid $!"; setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'echo "caller $$"; exec "$0" "$@"' ${q(callabi)} checkpoint $! 3 0 3>${q(img)}; ` +
    `kill -0 $! && echo "root process alive"; kill $!`]);
  const root = /^root pid (\d+)$/m.exec(r.stdout)?.[1], caller = /^caller (\d+)$/m.exec(r.stdout)?.[1];
  t.match(r.stdout, /checkpoint ret=-1 errno=EPERM/);
  t.match(r.stderr, new RegExp(`^ckpt-supervise: task ${caller}: checkpoint: EPERM: task ${root}: uid 0(/0)* differs from the caller's 1000 and the caller lacks CAP_SYS_PTRACE$`, 'm'), 'one log line names the caller, the task and why');
  t.match(r.stdout, /^root process alive$/m, 'the root process runs on');
  t.equal(fs.statSync(img).size, 0, 'nothing was written');
});

t.test('EPERM: a restart asking for credentials the caller lacks (a root image, a uid-1000 caller), no process left', async (t) => {
  const img = path.join(dir, 'root.img');
  const first = supervise([fixture('selfckpt'), img, 'crash']);
  const pid = /checkpointed crid=\d+ pid=(\d+)/.exec(first.stdout)?.[1];
  t.ok(pid, 'a root process checkpointed itself');
  const r = supervise(['setpriv', '--reuid', '1000', '--regid', '1000', '--clear-groups', callabi, 'restart-all', img]);
  t.match(r.stdout, /restart ret=-1 errno=EPERM/);
  t.match(r.stderr, /^ckpt-supervise: task \d+: restart: EPERM: restart:creds: task \d+: image asks for uid 0(\/0)* gid 0(\/0)*, caller has uid 1000(\/1000)*$/m, 'the log names the credentials asked for and the caller\'s');
  t.match(r.stdout, /leftover children: none\ncaller alive/, 'no process (not even a zombie) left with the caller');
  t.notOk(fs.existsSync(`/proc/${pid}`), `nothing runs as pid ${pid}`);
});

t.test('refused: a TCP listener with a connection not yet accepted that holds bytes; EOPNOTSUPP and one log line naming it, the program running as it was (CKPT_KILL did not kill)', async (t) => {
  const r = supervise([claims, 'refuse-tcp', path.join(dir, 'tcp.img')]);
  const [, pid, fd, port] = /^pid=(\d+) holds a tcp listener at fd (\d+), port (\d+)$/m.exec(r.stdout) ?? [];
  t.match(r.stdout, /^checkpoint ret=-1 errno=EOPNOTSUPP$/m);
  t.match(r.stderr, new RegExp(`^ckpt-supervise: task ${pid}: checkpoint: EOPNOTSUPP: checkpoint:tcp: task ${pid}: fd ${fd} \\(socket:\\[\\d+\\], TCP\\): listening on port ${port}: a connection not yet accepted holds 1 bytes its client sent`, 'm'), 'the log names the task, the fd and why');
  programSays(t, r.stdout, ['the connection waiting is accepted after the refusal, its byte there', 'the tcp listener still works after the refusal', 'no husk left as a child']);
  t.equal(r.status, 0);
});

t.test('refused: a SysV shm segment attached only in part; EOPNOTSUPP naming it, the memory as it was', async (t) => {
  const r = supervise([claims, 'refuse-sysv']);
  const [, pid, start, end] = /^pid=(\d+) maps SysV shm at 0x([0-9a-f]+)-0x([0-9a-f]+)$/m.exec(r.stdout) ?? [];
  t.match(r.stdout, /^checkpoint ret=-1 errno=EOPNOTSUPP$/m);
  t.match(r.stderr, new RegExp(`^ckpt-supervise: task ${pid}: checkpoint: EOPNOTSUPP: checkpoint:sysvipc: task ${pid}: SysV shm key 0x[0-9a-f]+ id \\d+ attached at 0x${start} only in part \\(${parseInt(end ?? '0', 16) - parseInt(start ?? '0', 16)} of 65536 bytes`, 'm'), 'the log names the task and the SysV segment');
  programSays(t, r.stdout, ['the shm memory is as it was', 'and still writable, detached as usual', 'no husk left as a child']);
});

t.test('refused: a mapping of a deleted file; EOPNOTSUPP naming it, the program running as it was (CKPT_KILL did not kill)', async (t) => {
  const d = fs.mkdtempSync(path.join(dir, 'delmap-'));
  const r = supervise([claims, 'refuse-deleted', d, path.join(dir, 'delmap.img')]);
  const [, pid, file, start, end] = /^pid=(\d+) maps deleted (\S+) at 0x([0-9a-f]+)-0x([0-9a-f]+)$/m.exec(r.stdout) ?? [];
  t.match(r.stdout, /^checkpoint ret=-1 errno=EOPNOTSUPP$/m);
  t.match(r.stderr, new RegExp(`^ckpt-supervise: task ${pid}: checkpoint: EOPNOTSUPP: checkpoint:memory: task ${pid}: mapping 0x${start}-0x${end} of deleted file ${re(file ?? '?')} \\(deleted\\)$`, 'm'), 'the log names the task, the mapping and the file');
  programSays(t, r.stdout, ['the mapping is as it was (CKPT_KILL did not kill)', 'no husk left as a child']);
  t.equal(r.status, 0);
});

t.test('a socket name held by a live socket outside the tree at restart: EBUSY, no process left; once it is gone, the name is bound again', async (t) => {
  const sock = path.join(fs.mkdtempSync(path.join(dir, 'bound-')), 'b.sock');
  const img = path.join(dir, 'bound.img');
  const r = supervise(['sh', '-c', `${q(claims)} bound ${q(sock)} ${q(img)}; echo "first=$?"; ` +
    `${q(callabi)} dgram-server ${q(sock)} 1 & sleep 0.3; ${q(callabi)} restart-all ${q(img)}; kill $!; wait $!; ` +
    `${ckpt} restart -i ${q(img)} & ` +
    // dgram-client reaches its (failing) checkpoint call only once it could connect and send: until the restored socket is bound
    `i=0; until ${q(callabi)} dgram-client ${q(sock)} none 2>/dev/null | grep -q 'checkpoint ret='; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.2; done; ` +
    `wait $!; echo "restored=$?"`], { timeout: 90_000 });
  t.match(r.stdout, /^first=137$/m, 'checkpointed with its socket bound, CKPT_KILL');
  t.match(r.stdout, /restart ret=-1 errno=EBUSY\nleftover children: none\n/, 'EBUSY while another socket holds the name, nothing left behind');
  t.match(r.stderr, new RegExp(`^ckpt-supervise: task \\d+: restart: EBUSY: restart:files: task \\d+: unix socket name ${re(sock)} is held by a live socket$`, 'm'), 'the log names the socket name');
  t.match(r.stdout, /^bound got: before$/m, 'with the holder gone (its file left), the restored socket has the name again and gets a datagram sent to it');
  t.match(r.stdout, /^restored=0$/m);
});

t.test('the ckpt tool: checkpoint --defer, list, writeback --keep, undo, checkpoint --keep, release', async (t) => {
  // Long enough (15 s once continued) for the second checkpoint and the undo to come before it ends.
  const N = 300;
  const wb = path.join(dir, 'tool-wb.img'), keep = path.join(dir, 'tool-keep.img');
  const j = (n: number) => path.join(dir, `tool-list${n}.json`);
  const r = supervise(['sh', '-c', `${q(fixture('counter'))} ${N} 50 & c=$!; sleep 0.5; ` +
    // Stopped by job control while the tool lists and writes back (each
    // command a Node process: slow on a loaded machine), so that it is still
    // running when undone and checkpointed again.
    `crid=$(${ckpt} checkpoint $c --defer); echo "crid=$crid"; kill -STOP $c; ` +
    `${ckpt} list; ${ckpt} list --json > ${q(j(1))}; ` +
    `${ckpt} writeback $crid -o ${q(wb)} --keep; ${ckpt} list --json > ${q(j(2))}; ` +
    `kill -CONT $c; ${ckpt} checkpoint $c --keep -o ${q(keep)}; ${ckpt} list --json > ${q(j(3))}; ` +
    `echo undo; ${ckpt} undo $crid; ` +
    `${ckpt} release $crid; echo "release=$?"; ${ckpt} list --json > ${q(j(4))}; ${ckpt} release $crid; echo "again=$?"; ` +
    `wait $c; echo "counter=$?"`], { timeout: 120_000 });
  const counter = Number(/^counter pid=(\d+)$/m.exec(r.stdout)?.[1]);
  const crid = Number(/^crid=(\d+)$/m.exec(r.stdout)?.[1]);
  t.ok(crid >= 1, `--defer printed the crid (${crid})`);
  t.match(r.stdout, new RegExp(`^${crid}\\s+${counter}\\s+1\\s`, 'm'), 'list: the crid, the root and one process');
  const [l1, l2, l3, l4] = [1, 2, 3, 4].map((n) => JSON.parse(fs.readFileSync(j(n), 'utf8')) as { crid: number; root: number; pids: number[]; writtenBack: boolean }[]);
  t.same(l1.map((c) => [c.crid, c.root, c.pids, c.writtenBack]), [[crid, counter, [counter], false]], 'list --json: that one checkpoint, not written back');
  t.same(l2.map((c) => [c.crid, c.writtenBack]), [[crid, true]], 'writeback --keep: kept, and written back');
  t.equal(l3.length, 2, 'checkpoint --keep: a second one kept in memory');
  t.ok(l3.some((c) => c.crid !== crid && c.root === counter), 'of the same counter');
  t.same(l4.map((c) => c.crid).includes(crid), false, 'release: gone from the list');
  t.equal(l4.length, 1, 'the --keep one stays');
  t.match(r.stdout, /^release=0$/m);
  t.match(r.stdout, /^again=1$/m, 'releasing it again fails');
  t.match(r.stderr, /ckpt: ckpt_release: ENOENT/);
  t.match(r.stderr, new RegExp(`ckpt: subtree ${counter} is back at checkpoint ${crid}`));
  // The counter went back once, to the step after the checkpoint's, and
  // finished with the right sum (held in its memory, rolled back too).
  const steps = (r.stdout.match(/^step \d+$/gm) ?? []).map((s) => Number(s.slice(5)));
  const back = steps.findIndex((s, i) => i > 0 && s <= steps[i - 1]);
  t.ok(back > 0, 'undo: the counter went back');
  t.equal(steps.filter((s, i) => i > 0 && s <= steps[i - 1]).length, 1, 'once');
  const resumed = steps[back];
  t.ok(resumed < steps[back - 1], `from step ${steps[back - 1]} back to step ${resumed}`);
  t.same(steps.slice(back), Array.from({ length: N - resumed + 1 }, (_, i) => resumed + i), 'and on from there to the end, no step lost');
  t.match(r.stdout, new RegExp(`done n=${N} sum=right`));
  t.match(r.stdout, /^counter=0$/m);
  // The written-back image is the checkpoint: restored, it goes on from the same step.
  const a = restart(wb);
  t.equal(a.status, 0);
  t.equal(Number(/^step (\d+)$/m.exec(a.stdout)?.[1]), resumed, 'the writeback image resumes at the step the undo went back to');
  t.match(a.stdout, new RegExp(`done n=${N} sum=right`));
  const b = restart(keep);
  t.equal(b.status, 0, 'the --keep image restores too');
  t.match(b.stdout, new RegExp(`done n=${N} sum=right`));
});
