// Mappings end to end (restart and rollback): guard pages, MAP_DROPPABLE,
// a vDSO unmapped by the program, shared file mappings and the file's
// permissions at restart, copy-on-write sharing between parent and child.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, run, fixture, tmpdir, pidAlive, CKPT, q, bothWays as bothWaysIn } from './helpers.js';

const dir = tmpdir('mappings');

const bothWays = (name: string, args: string[] = [], opts: { timeout?: number } = {}) => bothWaysIn(dir, name, args, opts);

for (const mode of ['restart', 'undo'] as const) {
  t.test(`guard pages and MAP_DROPPABLE memory are kept (${mode})`, async (t) => {
    const { first, r } = bothWays('guards')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else t.match(first.stdout, /spoiled, rolling back/);
    for (const c of ['the guard pages are where they were, and only there', 'touching a guard page faults', 'the other pages hold their data', 'the droppable region is droppable again', 'its data is kept, or dropped as the kernel may do']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
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
// (pages not written since stay as they are); a restart makes the child a
// fork of its filled parent (cowshare.ts), so memory is not doubled.
for (const mode of ['undo', 'restart'] as const) {
  t.test(`pages a parent and its child share copy-on-write stay shared (${mode})`, async (t) => {
    const { first, r } = bothWays('cowshare')(mode);
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    const before = /before: .* pss sum (\d+) kB/.exec(first.stdout), after = /after: .* pss sum (\d+) kB/.exec(r.stdout);
    t.comment(`${before?.[0]} / ${after?.[0]}`);
    t.match(r.stdout, /^ok the child's memory is its own$/m);
    t.match(r.stdout, /^ok the pages shared at the checkpoint are still shared$/m);
  });
}

t.test('pages a parent and its child share stay shared after a restart from memory (DEFER|KILL, then restart(crid))', async (t) => {
  const r = supervise(['sh', '-c', `${q(fixture('cowshare'))} outside & c=$!; sleep 1; crid=$(${CKPT.map(q).join(' ')} checkpoint $c --defer --kill); echo "crid=$crid"; ${CKPT.map(q).join(' ')} undo $crid`], { timeout: 60_000 });
  const before = /before: .* pss sum (\d+) kB/.exec(r.stdout), after = /after: .* pss sum (\d+) kB/.exec(r.stdout);
  t.comment(`${before?.[0]} / ${after?.[0]}`);
  t.match(r.stdout, /^crid=\d+$/m, 'the checkpoint was taken');
  t.match(r.stderr, /back at checkpoint/, 'and restored from memory');
  t.match(r.stdout, /^ok the child's memory is its own$/m);
  t.match(r.stdout, /^ok the pages shared at the checkpoint are still shared$/m);
});
