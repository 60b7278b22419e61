// Bad input never crashes the supervisor nor harms a tracee: the errno of
// ABI.md, one log line naming the task, the resource and the reason.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { supervise, fixture, tmpdir, q, pidAlive, CKPT } from './helpers.js';
import { encodeHeader, ImageReader, ImageWriter, REC, parseJson, splitPages } from '../lib/image.js';
import { FdSource, FdSink } from '../lib/stream.js';
import type { TreeState } from '../syscalls/state.js';

const dir = tmpdir('badinput');
const callabi = fixture('callabi');
const W = `w:${path.join(dir, 'out.img')}`;

/**
 * Run several callabi invocations in one supervised shell; return their
 * result lines, the pid of each caller (each says it before it becomes
 * callabi) and the supervisor's log lines.
 */
function calls(lines: string[]): { results: string[]; callers: number[]; log: string[]; stderr: string; status: number | null } {
  const r = supervise(['sh', '-c', lines.map((l) => `sh -c 'echo "caller $$"; exec "$0" "$@"' ${q(callabi)} ${l}`).join('; ')]);
  return {
    results: r.stdout.split('\n').filter((l) => / ret=/.test(l)),
    callers: [...r.stdout.matchAll(/^caller (\d+)$/gm)].map((m) => Number(m[1])),
    log: r.stderr.split('\n').filter((l) => l.startsWith('ckpt-supervise: ')),
    stderr: r.stderr,
    status: r.status,
  };
}

/**
 * ABI: every error leaves one line in the log naming the task, the resource
 * and the reason: `task T: CALL: ERRNO: ...` with the caller's pid, and a
 * reason that names what was wrong (`why`).
 */
function oneLogLineEach(t: Test, r: ReturnType<typeof calls>, call: string, cases: [string, string, RegExp][]): void {
  t.equal(r.callers.length, cases.length, 'every caller said its pid');
  t.equal(r.log.length, cases.length, 'one log line per error, no more');
  cases.forEach(([c, e, why], i) => {
    const line = r.log.find((l) => l.startsWith(`ckpt-supervise: task ${r.callers[i]}: `)) ?? '';
    t.match(line, new RegExp(`^ckpt-supervise: task ${r.callers[i]}: ${call}: ${e}: `), `${c}: the log line names the calling task and the errno`);
    t.match(line.slice(line.indexOf(`${e}: `) + e.length + 2), why, `${c}: and the resource and the reason (${why.source})`);
  });
}

t.test('checkpoint: every bad argument gets its errno, the caller lives on', async (t) => {
  const cases: [string, string, RegExp][] = [
    ['checkpoint 1 ' + W + ' 0', 'ESRCH', /pid 1 is not a process of this supervised tree/], // a pid outside the tree
    ['checkpoint 999999 ' + W + ' 0', 'ESRCH', /pid 999999 is not a process of this supervised tree/], // no such pid
    ['checkpoint -5 ' + W + ' 0', 'ESRCH', /pid -5 is not a process of this supervised tree/],
    ['checkpoint 0 r:/etc/hostname 0', 'EBADF', /fd \d+ is not open for writing/], // not open for writing
    ['checkpoint 0 777 0', 'EBADF', /fd 777 is not open/], // not open at all
    ['checkpoint 0 ' + W + ' 0x100', 'EINVAL', /unknown flag bits 0x100/], // unknown flag
    ['checkpoint 0 ' + W + ' 0x1', 'EINVAL', /CKPT_DEFER with fd \d+ \(must be -1\)/], // CKPT_DEFER with an fd
    ['checkpoint 0 ' + W + ' 0x8', 'EINVAL', /CKPT_HANDLE needs CKPT_DEFER or CKPT_KEEP/], // CKPT_HANDLE alone
  ];
  const r = calls(cases.map((c) => c[0]));
  t.equal(r.status, 0, 'the supervisor and the shell exit normally');
  t.equal(r.results.length, cases.length, 'every call returned');
  cases.forEach(([c, e], i) => t.match(r.results[i] ?? '', new RegExp(`ret=-1 errno=${e}$`), `${c} -> ${e}`));
  oneLogLineEach(t, r, 'checkpoint', cases);
});

t.test('restart: every bad argument gets its errno', async (t) => {
  const cases: [string, string, RegExp][] = [
    ['restart 0 none 0', 'EBADF', /fd -1 is not a descriptor/], // an image restart needs an fd
    ['restart 0 ' + W + ' 0', 'EBADF', /fd \d+ is not open for reading/], // not open for reading
    ['restart 0 r:/etc/hostname 0x1', 'EINVAL', /flags 0x1: only CKPT_HANDLE/], // flags other than CKPT_HANDLE
    ['restart 0 r:/etc/hostname 0x10', 'EINVAL', /flags 0x10: only CKPT_HANDLE/],
    ['restart 5 r:/etc/hostname 0', 'EINVAL', /crid 5 with fd \d+/], // a crid with an fd
    ['restart -3 none 0', 'EINVAL', /crid -3\b/],
    ['restart 12345 none 0', 'ENOENT', /checkpoint: no in-memory checkpoint 12345$/], // no such in-memory checkpoint
    ['restart 0 r:/etc/hostname 0', 'EBADMSG', /^image: /], // not an image
  ];
  const r = calls(cases.map((c) => c[0]));
  t.equal(r.status, 0);
  cases.forEach(([c, e], i) => t.match(r.results[i] ?? '', new RegExp(`ret=-1 errno=${e}$`), `${c} -> ${e}`));
  oneLogLineEach(t, r, 'restart', cases);
});

t.test('a process whose pid is taken cannot be restarted: EBUSY', async (t) => {
  const img = path.join(dir, 'busy.img');
  const r = supervise([callabi, 'selfbusy', img]);
  t.match(r.stdout, /checkpoint ret=\d+ errno=0\nrestart ret=-1 errno=EBUSY\ncaller alive/);
  t.match(r.stderr, /task \d+: restart: EBUSY: pid \d+ of the image is in use/);
});

/** A real image to damage: selfckpt in crash mode, so its pid is free again. */
function realImage(): { img: Buffer; pid: number } {
  const p = path.join(dir, 'good.img');
  const r = supervise([fixture('selfckpt'), p, 'crash']);
  return { img: fs.readFileSync(p), pid: Number(/pid=(\d+)/.exec(r.stdout)?.[1]) };
}

t.test('damaged and foreign images: EBADMSG / ENOEXEC, no process left behind', async (t) => {
  const { img, pid } = realImage();
  t.ok(img.length > 1 << 20, 'got an image');
  const variants: [string, Buffer, string][] = [];
  const headerLen = 12 + img.readUInt32LE(8) + 4;
  // Truncations: in the header, in the process record, in page data, before the trailer.
  for (const n of [0, 5, headerLen - 1, headerLen + 100, Math.floor(img.length / 2), img.length - 30, img.length - 1]) {
    variants.push([`truncated at ${n}`, img.subarray(0, n), 'EBADMSG']);
  }
  // Flipped bytes across the whole image.
  const spots = [3, 10, 20, headerLen + 3, headerLen + 20, headerLen + 500];
  for (let i = 1; i <= 16; i++) spots.push(Math.floor((img.length * i) / 17));
  spots.push(img.length - 2);
  for (const at of spots) {
    const c = Buffer.from(img);
    c[at] ^= 0x10;
    variants.push([`byte ${at} flipped`, c, 'EBADMSG']);
  }
  // Foreign: a sound header from another architecture / format version.
  const header = JSON.parse(img.subarray(12, headerLen - 4).toString());
  for (const [what, h] of [['arch', { ...header, arch: 'aarch64' }], ['version', { ...header, version: header.version + 1 }]] as const) {
    variants.push([`foreign ${what}`, Buffer.concat([encodeHeader(h), img.subarray(headerLen)]), 'ENOEXEC']);
  }
  const files = variants.map(([, data], i) => {
    const f = path.join(dir, `bad-${i}.img`);
    fs.writeFileSync(f, data);
    return f;
  });
  const r = supervise([callabi, 'restart-all', ...files]);
  t.equal(r.status, 0, 'the supervisor survived them all');
  const lines = r.stdout.split('\n').filter((l) => l.includes(' ret='));
  variants.forEach(([what, , e], i) => t.match(lines[i] ?? '', new RegExp(`ret=-1 errno=${e}$`), `${what} -> ${e}`));
  t.match(r.stdout, /leftover children: none/, 'no child (not even a zombie) left with the caller');
  t.match(r.stdout, /caller alive/);
  t.notOk(pidAlive(pid), `no process holds the image's pid ${pid}`);
  // And the undamaged image still restores after all that.
  fs.writeFileSync(path.join(dir, 'good2.img'), img);
  const ok = supervise([callabi, 'restart-all', path.join(dir, 'good2.img')]);
  t.match(ok.stdout, new RegExp(`ret=${pid} errno=0`), 'the intact image restores');
});

t.test('an image whose vDSO differs from this kernel\'s: ENOEXEC, one log line, no process left', async (t) => {
  const { img, pid } = realImage();
  const headerLen = 12 + img.readUInt32LE(8) + 4;
  const header = JSON.parse(img.subarray(12, headerLen - 4).toString());
  t.ok(header.vdso?.layout?.length > 0, 'the image records the vDSO layout');
  const other = { ...header.vdso, hash: header.vdso.hash.replace(/^./, (c: string) => (c === '0' ? '1' : '0')) };
  const bigger = { ...header.vdso, layout: header.vdso.layout.map((m: { name: string; size: number }) => (m.name === '[vdso]' ? { ...m, size: m.size + 4096 } : m)) };
  const files = [other, bigger].map((vdso, i) => {
    const f = path.join(dir, `vdso-${i}.img`);
    fs.writeFileSync(f, Buffer.concat([encodeHeader({ ...header, vdso }), img.subarray(headerLen)]));
    return f;
  });
  const r = supervise([callabi, 'restart-all', ...files]);
  t.equal(r.stdout.match(/restart ret=-1 errno=ENOEXEC/g)?.length, 2, 'other contents, another size: ENOEXEC both');
  t.equal(r.stderr.match(/^ckpt-supervise: task \d+: restart: ENOEXEC: vDSO layout differs: image .+, here .+$/gm)?.length, 2, 'one log line each, naming the vDSO and both layouts');
  t.match(r.stdout, /leftover children: none\ncaller alive/);
  t.notOk(pidAlive(pid), `no process holds the image's pid ${pid}`);
});

/** The image `from` again, sound (checksums and all), with its tree changed by `edit`. */
function rewriteTree(from: string, to: string, edit: (tree: TreeState) => void, editRecord?: (type: number, payload: Buffer) => Buffer): void {
  const r = new ImageReader(new FdSource(fs.openSync(from, 'r')));
  const out = fs.openSync(to, 'w');
  const w = new ImageWriter(new FdSink(out));
  w.header(r.header());
  const tree = parseJson<TreeState>(r.expect(REC.TREE).payload, 'TREE');
  edit(tree);
  w.json(REC.TREE, tree);
  for (let rec = r.next(); rec && rec.type !== REC.TRAILER; rec = r.next()) {
    if (rec.type === REC.PAGES) {
      const p = splitPages(rec.payload);
      w.pages(p.addr, p.data);
    } else w.record(rec.type, editRecord?.(rec.type, rec.payload) ?? rec.payload);
  }
  w.trailer();
  fs.closeSync(out);
}

t.test('a sound image whose state the kernel refuses half-way (a worker thread\'s bad altstack): its errno, no process left, no hang', async (t) => {
  const good = path.join(dir, 'pool.img'), bad = path.join(dir, 'pool-bad.img');
  const first = supervise([fixture('pool'), good]);
  const pid = Number(/checkpointed crid=\d+ pid=(\d+)/.exec(first.stdout)?.[1]);
  t.ok(pid > 0, 'the pool checkpointed itself');
  // Enabled, at 0, of size 0: sigaltstack refuses it (ENOMEM) once the process and two threads are rebuilt.
  rewriteTree(good, bad, (tree) => void (tree.processes[0].threads[2].altstack = { sp: '0x0', flags: 0, size: '0x0' }));
  const r = supervise([callabi, 'restart-all', bad], { timeout: 30_000 });
  t.match(r.stdout, /restart ret=-1 errno=ENOMEM/, 'the kernel\'s errno');
  t.match(r.stdout, /leftover children: none/, 'no child (not even a zombie) left with the caller');
  t.match(r.stderr, /restart:sigaltstack: task \d+/, 'one log line names the task and the resource');
  t.notOk(pidAlive(pid), `no process holds the image's pid ${pid}`);
  // A description of a kind this supervisor does not know, and an event file of no known kind: EBADMSG.
  const kinds = [path.join(dir, 'pool-kind.img'), path.join(dir, 'pool-event.img')];
  rewriteTree(good, kinds[0], (tree) => void ((tree.files.descs[0] as { kind: string }).kind = 'socketcan'));
  rewriteTree(good, kinds[1], (tree) => void (tree.files.descs[0] = { id: 0, kind: 'event', flags: 2, ev: { kind: 'inotify' } } as unknown as TreeState['files']['descs'][number]));
  const k = supervise([callabi, 'restart-all', ...kinds], { timeout: 30_000 });
  t.equal(k.stdout.match(/restart ret=-1 errno=EBADMSG/g)?.length, 2, 'unknown kinds in a sound image: EBADMSG, both');
  t.match(k.stdout, /leftover children: none/);
});

t.test('a failed checkpoint leaves the subtree running as it was', async (t) => {
  const pidfile = path.join(dir, 'counter.pid');
  // The counter writes into a pipe whose reader (cat) is outside its subtree.
  const r = supervise(['sh', '-c',
    `{ ${q(fixture('counter'))} 8 100 & echo $! > ${q(pidfile)}; wait; } | cat & sleep 0.4; ` +
    `${q(callabi)} checkpoint $(cat ${q(pidfile)}) ${q(W)} 0; ` +
    `wait`]);
  t.match(r.stdout, /checkpoint ret=-1 errno=EOPNOTSUPP\n/, 'a pipe shared with a process outside the subtree: EOPNOTSUPP');
  t.match(r.stderr, /task \d+: checkpoint: EOPNOTSUPP: checkpoint:files: task \d+: fd 1 \(pipe also held by process \d+ outside the subtree\)/, 'the log names the task, the fd and why');
  t.match(r.stdout, /done n=8 sum=right/, 'the counter went on undisturbed');
  const steps = r.stdout.match(/^step \d+$/gm) ?? [];
  t.same(steps, Array.from({ length: 8 }, (_, i) => `step ${i + 1}`), 'no step lost or repeated');
  t.equal(r.status, 0);
});

t.test('ckpt checkpoint -o FILE leaves no file behind when it fails, and a whole image when it succeeds', async (t) => {
  const ckpt = CKPT.map(q).join(' ');
  const failed = path.join(dir, 'failed.img'), good = path.join(dir, 'good-out.img');
  const r = supervise(['sh', '-c', `${ckpt} checkpoint 999999 -o ${q(failed)}; echo "status=$?"; sleep 100 & ${ckpt} checkpoint $! -o ${q(good)}; echo "status=$?"; kill $!`]);
  if (!/^status=1\nstatus=0$/m.test(r.stdout)) t.comment(r.stderr);
  t.match(r.stdout, /^status=1\nstatus=0$/m, 'the first checkpoint failed, the second succeeded');
  t.match(r.stderr, /ckpt: checkpoint: ESRCH/);
  t.notOk(fs.existsSync(failed) || fs.existsSync(failed + '.tmp'), 'the failed checkpoint left no file');
  t.ok(fs.existsSync(good) && !fs.existsSync(good + '.tmp'), 'the image is at its name, no temporary file left');
  t.ok(fs.statSync(good).size > 4096, 'and it is a whole image');
});

t.test('a sound image with absurd values (each checksum right): EBADMSG naming the field, one log line each, no process left', async (t) => {
  const good = path.join(dir, 'pool-absurd.img');
  const first = supervise([fixture('pool'), good]);
  const pid = Number(/checkpointed crid=\d+ pid=(\d+)/.exec(first.stdout)?.[1]);
  t.ok(pid > 0, 'the pool checkpointed itself');
  type P = TreeState['processes'][number];
  const p0 = (f: (p: P, tree: TreeState) => void) => (tree: TreeState) => f(tree.processes[0], tree);
  const clone = <T>(v: T): T => JSON.parse(JSON.stringify(v));
  const cases: [string, (tree: TreeState) => void, RegExp][] = [
    ['a mapping starting at 1e308', p0((p) => void ((p.memory[0] as unknown as { start: number }).start = 1e308)), /processes\[0\]\.memory\[0\]\.start: /],
    ['a mapping above user space', p0((p) => void (p.memory[0].start = '0xffffffffff600000')), /processes\[0\]\.memory\[0\]\.start: not below/],
    ['a mapping ending before it starts', p0((p) => void (p.memory[0].end = p.memory[0].start)), /processes\[0\]\.memory\[0\]\.end: mapping ends/],
    ['more pages than a mapping holds', p0((p) => void (p.memory[0].pages = 1 << 30)), /processes\[0\]\.memory\[0\]\.pages/],
    ['overlapping mappings', p0((p) => void p.memory.splice(1, 0, clone(p.memory[0]))), /processes\[0\]\.memory\[1\]\.start: mapping at .* overlaps/],
    ['uid -1', p0((p) => void (p.creds.uid[0] = -1)), /processes\[0\]\.creds\.uid\[0\]: Too small/],
    ['uid 2^32', p0((p) => void (p.creds.uid[1] = 2 ** 32)), /processes\[0\]\.creds\.uid\[1\]: Too big/],
    ['gid as a string', p0((p) => void ((p.creds.gid as unknown[])[0] = '0')), /processes\[0\]\.creds\.gid\[0\]: Invalid input: expected number/],
    ['a pid of 2^22 + 1', p0((p, tree) => void (tree.root = p.ids.pid = p.threads[0].tid = 2 ** 22 + 1)), /root: Too big/],
    ['a process twice', (tree) => void tree.processes.push(clone(tree.processes[0])), /processes\[1\]\.ids\.pid: process \d+ twice/],
    ['a child before its parent', (tree) => {
      const c = clone(tree.processes[0]);
      c.ids.pid = c.threads[0].tid = 4_000_000;
      c.ids.ppid = 4_000_001;
      c.threads = [c.threads[0]];
      tree.processes.push(c);
    }, /processes\[1\]\.ids\.ppid: process 4000000 comes before its parent 4000001/],
    ['a thread twice', p0((p) => void p.threads.push(clone(p.threads[1]))), /processes\[0\]\.threads\[\d+\]\.tid: thread \d+ twice/],
    ['no leader thread', p0((p) => void p.threads.shift()), /processes\[0\]\.threads: process \d+ has no leader thread/],
    ['a descriptor twice', p0((p) => void p.files.fds.push(clone(p.files.fds[0]))), /processes\[0\]\.files\.fds\[\d+\]\.fd: fd \d+ of \d+ twice/],
    ['a descriptor of no description', p0((p) => void p.files.fds.push({ fd: 900, cloexec: false, desc: 777 })), /processes\[0\]\.files\.fds\[\d+\]\.desc: fd 900 of \d+ names no description/],
    ['fd 2^21', p0((p) => void (p.files.fds[0].fd = 2 ** 21)), /processes\[0\]\.files\.fds\[0\]/],
    ['the descriptor table of no process before it', p0((p) => void (p.files.filesOf = 4_000_000)), /processes\[0\]\.files\.filesOf: process \d+ uses the descriptor table of 4000000, not a process before it/],
    ['the descriptor table of pid 2^23', p0((p) => void (p.files.filesOf = 2 ** 23)), /processes\[0\]\.files\.filesOf: Too big/],
    ['a zombie twice', (tree) => {
      const z = { pid: 4_000_002, ppid: tree.root, pgid: tree.processes[0].ids.pgid, sid: tree.processes[0].ids.sid, status: 0 };
      tree.zombies.push(z, { ...z });
    }, /zombies\[1\]\.pid: zombie 4000002 is also a live task or another zombie/],
    ['a zombie with a 1e308 status', (tree) => void tree.zombies.push({ pid: 4_000_003, ppid: tree.root, pgid: 0, sid: 0, status: 1e308 }), /zombies\[0\]\.status: Too big/],
    ['an action for SIGKILL', p0((p) => void (p.signals['9'] = { handler: '1', flags: '0', restorer: '0', mask: '0' })), /processes\[0\]\.signals\.9: Invalid key/],
    ['a signal handler above user space', p0((p) => void (p.signals['10'] = { handler: 'ffffffffffffffff', flags: '0', restorer: '0', mask: '0' })), /processes\[0\]\.signals\.10\.handler: not a user address/],
    ['registers of the wrong size', p0((p) => void (p.threads[0].regs = 'AAAA')), /processes\[0\]\.threads\[0\]\.regs: not 216 bytes/],
    ['an unknown field', p0((p) => void ((p as unknown as Record<string, unknown>).personality = 1)), /processes\[0\]: Unrecognized key: "personality"/],
    ['a description that is not where it says', (tree) => void tree.files.descs.push({ id: 99, kind: 'path', path: '/x', flags: 0, pos: '0' }), /files\.descs\[\d+\]\.id: description \d+ says it is 99/],
    ['an eventfd counting 0x1g', (tree) => void tree.files.descs.push({ id: tree.files.descs.length, kind: 'event', flags: 2, ev: { kind: 'eventfd', count: '1g', semaphore: false } }), /files\.descs\[\d+\]\.ev\.count: not a hex number/],
    ['a file offset of 2^64', (tree) => void tree.files.descs.push({ id: tree.files.descs.length, kind: 'path', path: '/x', flags: 0, pos: '18446744073709551616' }), /files\.descs\[\d+\]\.pos/],
  ];
  const files = cases.map(([, edit], i) => {
    const f = path.join(dir, `absurd-${i}.img`);
    rewriteTree(good, f, edit);
    return f;
  });
  // A MEMORY record for a pid of 1e308.
  const memFile = path.join(dir, 'absurd-memory.img');
  rewriteTree(good, memFile, () => {}, (type, payload) => (type === REC.MEMORY ? Buffer.from('{"pid":1e308}') : payload));
  const r = supervise([callabi, 'restart-all', ...files, memFile], { timeout: 60_000 });
  t.equal(r.status, 0, 'the supervisor survived them all');
  const lines = r.stdout.split('\n').filter((l) => l.includes(' ret='));
  const logs = r.stderr.split('\n').filter((l) => /restart: E[A-Z]+:/.test(l));
  t.equal(logs.length, cases.length + 1, 'one log line per refused image');
  cases.forEach(([what, , why], i) => {
    t.match(lines[i] ?? '', /ret=-1 errno=EBADMSG$/, `${what}: EBADMSG`);
    t.match(logs[i] ?? '', /task \d+: restart: EBADMSG: image: TREE record: /, `${what}: the log line says it is the TREE record`);
    t.match((logs[i] ?? '').replace(/^.*TREE record: /, ''), why, `${what}: and names the field`);
  });
  t.match(lines[cases.length] ?? '', /ret=-1 errno=EBADMSG$/, 'a MEMORY record for pid 1e308: EBADMSG');
  t.match(logs[cases.length] ?? '', /MEMORY record: pid: Too big/, 'and its log line names the field');
  t.notMatch(r.stderr, /EIO/, 'never EIO');
  t.match(r.stdout, /leftover children: none/);
  t.notOk(pidAlive(pid), `no process holds the image's pid ${pid}`);
  // The image rewritten unchanged still restores: the schema takes what the supervisor writes.
  const same = path.join(dir, 'absurd-none.img');
  rewriteTree(good, same, () => {});
  const ok = supervise([callabi, 'restart-all', same], { timeout: 30_000 });
  t.match(ok.stdout, new RegExp(`ret=${pid} errno=0`), 'the unchanged image restores');
});
