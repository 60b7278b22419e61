// Process attributes and security state: kept across restart and rollback, or EPERM.
import t, { type Test } from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir, bothWays } from './helpers.js';

const dir = tmpdir('attrs');

/** A fresh cgroup v2 directory below ours for the fixture to move into, or '-' when there is none we may make. */
function cgroupDir(tag: string): string {
  const mnt = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').find((l) => l.split(' - ')[1]?.startsWith('cgroup2 '))?.split(' ')[4];
  const own = fs.readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => l.startsWith('0::'))?.slice(3);
  if (!mnt || own === undefined) return '-';
  const d = path.join(mnt, own, `ckpt-attrs-${process.pid}-${tag}`);
  try {
    fs.mkdirSync(d);
    fs.rmdirSync(d); // the fixture makes it itself
    return d;
  } catch {
    return '-';
  }
}

const CHECKS = [
  'rlimits (soft and hard)', 'oom_score_adj', 'personality', 'THP disabled', 'child subreaper', 'pdeathsig', 'not dumpable',
  'securebits (keepcaps)', 'no_new_privs', 'timer slack', 'membarrier registration', 'process name', 'fsuid/fsgid',
  'capability sets', 'ambient and bounding sets', 'main thread: nice', 'batch thread: policy and nice', 'fifo thread: policy and priority',
  'CPU affinity per thread', 'cgroup membership', 'batch thread: name', 'batch thread: timer slack', 'batch thread: pdeathsig',
  'batch thread: its own capability sets', 'batch thread: ambient and bounding sets', 'batch thread: fsuid (its own)', 'fifo thread: name',
  'fifo thread: capability sets', 'fifo thread: ambient and bounding sets', 'fifo thread: fsuid (its own)', 'child: still in its chroot',
  "the chrooted child's checks", 'no parent-death signal came',
];
const esc = (s: string) => s.replace(/[()/]/g, '\\$&');

function expectAll(t: Test, out: string): void {
  for (const c of CHECKS) t.match(out, new RegExp(`^ok ${esc(c)}$`, 'm'), c);
  t.notMatch(out, /^FAIL/m, 'no check failed');
  t.match(out, /ATTRS OK/);
}

const img = path.join(dir, 'attrs.img');
const cgroups = new Map<string, string>();
const rmCgroup = (cg: string | undefined) => {
  if (cg && cg !== '-') try { fs.rmdirSync(cg); } catch { /* already gone */ }
};
t.teardown(() => cgroups.forEach(rmCgroup));
for (const mode of ['restart', 'husk', 'undo'] as const) {
  t.test(`attributes, credentials and capabilities come back (${mode === 'undo' ? 'rollback in memory' : mode === 'husk' ? 'image written from husks, restart' : 'CKPT_KILL image, restart'})`, async (t) => {
    const cg = cgroupDir(mode);
    cgroups.set(mode, cg);
    if (cg === '-') t.comment('no cgroup v2 directory can be made here: membership is checked unchanged only');
    const jail = path.join(dir, `jail-${mode}`);
    const image = mode === 'husk' ? `${img}.husk` : img;
    try {
      const first = supervise([fixture('attrs'), mode === 'undo' ? 'undo' : mode === 'husk' ? `husk:${image}` : image, cg, jail], { timeout: 60_000 });
      if (mode === 'undo') {
        t.match(first.stdout, /spoiled, rolling back/, 'every attribute was changed before the rollback');
        expectAll(t, first.stdout);
        t.equal(first.status, 0);
      } else {
        t.equal(first.status, mode === 'husk' ? 3 : 137, 'checkpointed, then gone');
        const r = supervise([...CKPT, 'restart', '-i', image], { timeout: 60_000 });
        expectAll(t, r.stdout);
        t.equal(r.status, 0, 'the restored program passed its own checks');
      }
    } finally {
      if (mode !== 'restart') rmCgroup(cg); // the refusals below restart that image again
    }
  });
}

// The image of the first test: NOFILE hard 4321, CAP_NET_BIND_SERVICE, a child chrooted.
const refusals = [
  { less: 'nofile', log: /restart:rlimit: task \d+: RLIMIT_NOFILE hard limit 4321 is above the 1000 the caller \(\d+\) has, without CAP_SYS_RESOURCE/ },
  { less: 'cap', log: /restart:capabilities: task \d+: thread \d+ had capabilities CAP_NET_BIND_SERVICE that the caller \(\d+\) lacks/ },
  { less: 'chroot', log: /restart:root: task \d+: chrooted to \S+jail-restart; the caller \(\d+\) has root \/ and no CAP_SYS_CHROOT/ },
];
for (const { less, log } of refusals) {
  t.test(`a restart by a caller with less (${less}) fails with EPERM and leaves nothing`, async (t) => {
    t.ok(fs.existsSync(img), 'the image of the first test');
    const r = supervise([fixture('attrs'), 'restart', img, less], { timeout: 60_000 });
    t.match(r.stdout, /^restart errno=EPERM$/m);
    t.match(r.stderr, log, 'one log line names the task and what it would need');
    t.notMatch(r.stdout, /back pid=/, 'nothing of the image ran');
  });
}

for (const [mode, log] of [
  ['undo-hard', /restart:rlimit: task \d+: RLIMIT_NOFILE hard limit 4321 is above the 2000 the process has now, without CAP_SYS_RESOURCE/],
  ['undo-cap', /restart:capabilities: task \d+: thread \d+ had capabilities CAP_NET_BIND_SERVICE that the process no longer has/],
] as const) {
  t.test(`a rollback that would raise what the process gave up (${mode}) fails with EPERM, the program unharmed`, async (t) => {
    const r = supervise([fixture('attrs'), mode, '-', path.join(dir, `jail-${mode}`)], { timeout: 60_000 });
    t.match(r.stdout, /^rollback ret=-1 errno=EPERM$/m);
    t.match(r.stderr, log);
    t.match(r.stdout, /still running after the refusal: yes/);
    t.equal(r.status, 0);
  });
}

t.test('a restart into a cgroup that no longer exists is refused with EOPNOTSUPP naming it', async (t) => {
  const cg = cgroups.get('restart');
  if (!cg || cg === '-') return t.plan(0, 'no cgroup v2 directory could be made here');
  rmCgroup(cg);
  const r = supervise([...CKPT, 'restart', '-i', img], { timeout: 60_000 });
  t.not(r.status, 0);
  t.match(r.stderr, new RegExp(`restart:cgroup: task \\d+: cgroup 0::\\S+: ${cg.replace(/[.]/g, '\\.')}/cgroup.procs does not exist`));
  t.notMatch(r.stdout, /back pid=/, 'nothing of the image ran');
});

// A process that dropped root may not take its files back itself (pidfd_getfd
// needs ptrace rights over their holder): the rollback hands them over.
t.test('a rollback gives a process that dropped root its files back (a root sibling\'s pipe, stdout from outside)', async (t) => {
  const r = supervise([fixture('dropped'), 'undo'], { timeout: 60_000 });
  t.match(r.stdout, /spoiled, rolling back/, 'the child lost its files before the rollback');
  for (const c of ['child still uid 1000', 'child has its pipe end again', "root reads the child's line through the pipe", 'child checked its files'])
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  t.notMatch(r.stdout, /^FAIL|rollback failed/m, 'no check failed');
  t.equal(r.status, 0, r.stderr);
});

// I/O priorities, core dump filter, KSM merging and MDWE (fixtures/controls.c).
for (const mode of ['restart', 'undo'] as const) {
  t.test(`I/O priority per thread, core dump filter, KSM and MDWE come back (${mode})`, async (t) => {
    const { first, r } = bothWays(dir, 'controls')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    for (const c of ['main thread: I/O priority', 'worker thread: I/O priority \\(idle\\)', 'core dump filter', 'KSM merging of the process', 'memory-deny-write-execute', 'a writable and executable mapping is still refused', 'anonymous memory keeps its (name and )?data.*'])
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c.replace(/\\\\/g, ''));
    t.match(r.stdout, /CONTROLS OK/);
    t.equal(r.status, 0, r.stderr);
  });
}

t.test('a rollback past PR_SET_MDWE is refused, the process keeping it', async (t) => {
  const r = supervise([fixture('controls'), 'undo-mdwe'], { timeout: 60_000 });
  t.match(r.stdout, /^ok a rollback past PR_SET_MDWE is refused$/m);
  t.match(r.stdout, /^ok and the process keeps it$/m);
  t.match(r.stderr, /restart: EOPNOTSUPP: restart:mdwe: task \d+: set memory-deny-write-execute \(PR_SET_MDWE 0x1\) since the checkpoint, and it cannot be cleared/);
  t.equal(r.status, 0);
});
