// Memory end to end: shared memory kept quickly and exactly, refusals made
// before anything is copied, madvise advice and other mapping attributes
// kept by restart and rollback.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, run, fixture, tmpdir, pidAlive, CKPT } from './helpers.js';

const dir = tmpdir('memory');

/** Run a self-checking fixture to an image and restart it, or in memory and roll it back. */
function bothWays(name: string, args: string[] = [], opts: { timeout?: number } = {}) {
  return (mode: 'restart' | 'undo') => {
    const img = path.join(dir, `${name}.img`);
    const first = supervise([fixture(name), mode === 'undo' ? 'undo' : img, ...args], { timeout: opts.timeout ?? 60_000 });
    if (mode === 'undo') return { first, r: first };
    return { first, r: supervise([...CKPT, 'restart', '-i', img], { timeout: opts.timeout ?? 60_000 }) };
  };
}

for (const mode of ['restart', 'undo'] as const) {
  t.test(`shared memory: a quick stop, every byte back (${mode})`, async (t) => {
    const { first, r } = bothWays('shmfast')(mode);
    t.match(first.stdout, /^ok a CKPT_DEFER checkpoint with 32 MiB of shared memory is quick$/m, first.stdout.match(/stop_ms=\S+/)?.[0] ?? 'no stop time');
    t.match(first.stdout, /^ok it holds the shared bytes once, not the sparse memfd's holes$/m);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/);
    for (const c of ['32 MiB of shared anonymous memory, the zeroed page too', 'a memfd of 5000 bytes, its last page partial', 'a sparse 1 GiB memfd: its pages and its holes']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /SHMFAST OK/);
    t.equal(r.status, 0);
  });
}

t.test('a SysV shm segment is refused at once, named by key and id, the program unharmed', async (t) => {
  const r = supervise([fixture('sysvshm')]);
  const seg = /segment key=(0x[0-9a-f]+) id=(\d+)/.exec(r.stdout);
  t.ok(seg, 'the segment was made');
  t.match(r.stdout, /^ok a SysV shm segment is refused with EOPNOTSUPP$/m);
  t.match(r.stderr, new RegExp(`EOPNOTSUPP: checkpoint:memory: task \\d+: mapping \\S+ of SysV shm key ${seg?.[1]} id ${seg?.[2]} \\(SysV IPC is not kept\\)`));
  t.notMatch(r.stderr, /deleted file/, 'not taken for a deleted file');
  t.match(r.stdout, /^ok the program is as it was: the segment still shared$/m);
  t.match(r.stdout, /^ok detached, the checkpoint succeeds$/m);
  t.equal(r.status, 0);
});

for (const mode of ['restart', 'undo'] as const) {
  t.test(`madvise and mlock state (smaps VmFlags) is kept (${mode})`, async (t) => {
    const { first, r } = bothWays('vmadvice')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else {
      t.match(first.stdout, /spoiled, rolling back/);
      t.notMatch(first.stdout, /unchanged by the spoiling/, 'every region was changed before the rollback');
    }
    for (const c of ['dd', 'hg', 'nh', 'rr', 'sr', 'mg', 'lo', 'lo lf', 'dd rr', '']) t.match(r.stdout, new RegExp(`^ok region "${c}": its flags and data$`, 'm'), c || 'no advice');
    t.match(r.stdout, /VMADVICE OK/);
    t.equal(r.status, 0);
  });
}

t.test('mlockall(MCL_FUTURE) is refused, and accepted once undone', async (t) => {
  const r = supervise([fixture('vmadvice'), 'future']);
  t.match(r.stdout, /^ok mlockall\(MCL_FUTURE\) is refused$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:memory: task \d+: mlockall\(MCL_FUTURE\) is in force/);
  t.match(r.stdout, /^ok after munlockall the checkpoint succeeds$/m);
  t.equal(r.status, 0);
});

for (const mode of ['restart', 'undo'] as const) {
  t.test(`guard pages and MAP_DROPPABLE memory are kept (${mode})`, async (t) => {
    const { first, r } = bothWays('guards')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/);
    for (const c of ['the guard pages are where they were, and only there', 'touching a guard page faults', 'the other pages hold their data', 'the droppable region is droppable again', 'its data is kept, or dropped as the kernel may do']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    if (mode === 'restart') t.match(r.stdout, /droppable data kept/, 'an image keeps what the droppable region held');
    t.match(r.stdout, /GUARDS OK/);
    t.equal(r.status, 0);
  });
}

for (const mode of ['restart', 'undo'] as const) {
  for (const what of ['all', 'vdso'] as const) {
    t.test(`a program that unmapped its vDSO (${what === 'all' ? 'and its data pages' : 'the code only'}) comes back without it (${mode})`, async (t) => {
      const { first, r } = bothWays('novdso', what === 'vdso' ? ['vdso'] : [])(mode);
      if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
      else t.match(first.stdout, /spoiled, rolling back/);
      t.match(r.stdout, /^ok no vDSO after it either, the rest as it was$/m);
      t.match(r.stdout, /^ok the clock works through the system call$/m);
      t.match(r.stdout, /NOVDSO OK/);
      t.equal(r.status, 0);
    });
  }
}

t.test('a shared file mapping whose file may no longer be written is refused at restart, nothing left behind', async (t) => {
  const d = fs.mkdtempSync(path.join(dir, 'fileprot-'));
  const img = path.join(d, 'img');
  const probe = path.join(d, 'probe');
  fs.writeFileSync(probe, '');
  if (run(['chattr', '+i', probe]).status !== 0) {
    t.comment('no chattr +i here: skipped');
    return;
  }
  run(['chattr', '-i', probe]);
  const first = supervise([fixture('fileprot'), d, img]);
  t.equal(first.status, 137, 'CKPT_KILL');
  const pid = Number(/pid=(\d+)/.exec(first.stdout)?.[1]);
  for (const name of ['rw', 'mw']) {
    run(['chattr', '+i', path.join(d, name)]);
    const r = supervise([...CKPT, 'restart', '-i', img]);
    run(['chattr', '-i', path.join(d, name)]);
    t.not(r.status, 0, `${name} immutable: the restart fails`);
    t.match(r.stderr, new RegExp(`restart: EPERM: restart:memory: task \\d+: cannot open \\S+/${name} for writing \\(a shared mapping that may write\\): EPERM`), 'EPERM, the file named');
    t.notOk(pidAlive(pid), 'no process left behind');
    t.notMatch(r.stdout, /restored uid/, 'the program never ran');
  }
  const r = supervise([...CKPT, 'restart', '-i', img]);
  for (const c of ["the mappings hold the file's data", 'the writable mapping is still shared with its file', 'the read-only mapping may still be made writable', 'and it writes through to its file']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stdout, /FILEPROT OK/);
  t.equal(r.status, 0);
});

// Copy-on-write sharing between a parent and its child: a rollback keeps it
// (pages not written since stay as they are); a restart from an image makes
// a copy for each process (known: todo, see the design in the fixture's
// report), doubling the memory they use.
for (const mode of ['undo', 'restart'] as const) {
  t.test(`pages a parent and its child share copy-on-write stay shared (${mode})`, { todo: mode === 'restart' ? 'a restart gives each process its own copy' : false }, async (t) => {
    const { first, r } = bothWays('cowshare')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    const before = /before: .* pss sum (\d+) kB/.exec(first.stdout), after = /after: .* pss sum (\d+) kB/.exec(r.stdout);
    t.comment(`${before?.[0]} / ${after?.[0]}`);
    t.match(r.stdout, /^ok the child's memory is its own$/m);
    t.match(r.stdout, /^ok the pages shared at the checkpoint are still shared$/m);
  });
}
