// A descriptor table shared by a parent and its child (clone CLONE_FILES
// without CLONE_THREAD): one table again after a restart from an image, a
// rollback, a rollback after the child left the table (unshare), and a
// restore from an in-memory checkpoint whose processes are gone. The
// fixture checks itself: descriptors from before with their offsets, one
// closed by the child gone for the parent, the child's POSIX lock held by
// it again, and a descriptor one opens afterwards seen by the other.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { supervise, fixture, tmpdir, bothWays } from './helpers.js';

const dir = tmpdir('clonefiles');
const CHECKS = [
  'parent: its descriptor from before, its offset', "parent: the child's descriptor from before, its offset",
  'parent: the descriptor the child closed is gone', "parent: the child's POSIX lock is held again, by the child",
  'child: sees the descriptor the parent opened after the restore', "child: the parent's descriptor from before, its offset",
  'child: its own descriptor from before, its offset', 'child: the descriptor it closed is still closed',
  'parent: sees the descriptor the child opened after the restore', 'child: the descriptor the parent closed after the restore is gone',
  "parent: the child's checks passed",
];
const sub = (tag: string) => fs.mkdtempSync(path.join(dir, `${tag}-`));

function checked(t: Test, out: { stdout: string; stderr: string; status: number | null }, checks: string[], done: string) {
  for (const c of checks) t.match(out.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
  t.notMatch(out.stdout, /^FAIL/m, 'no check failed');
  t.match(out.stdout, new RegExp(`^${done}$`, 'm'), out.stdout.includes(done) ? done : out.stdout + out.stderr);
  t.equal(out.status, 0);
}

for (const mode of ['restart', 'undo'] as const) {
  t.test(`a table shared by a parent and its CLONE_FILES child is one table again after a ${mode}`, async (t) => {
    const { first, r } = bothWays(dir, 'clonefiles', [sub(mode)])(mode);
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
    checked(t, r, CHECKS, 'CLONEFILES OK');
  });
}

const CHAIN = ['parent: the grandchild shares the table again', "parent: the grandchild's descriptor from before"];
for (const mode of ['restart', 'undo'] as const) {
  t.test(`three processes (parent, child, grandchild) on one table after a ${mode}`, async (t) => {
    const { first, r } = bothWays(dir, 'clonefiles', [sub(`chain-${mode}`), 'chain'])(mode);
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    checked(t, r, [...CHECKS, ...CHAIN], 'CLONEFILES OK');
  });
}

t.test('a rollback after the child left the table (unshare(CLONE_FILES)) makes it share again', async (t) => {
  const r = supervise([fixture('clonefiles'), 'undo-unshare', sub('unshare')]);
  t.match(r.stdout, /spoiled, rolling back/);
  checked(t, r, CHECKS, 'CLONEFILES OK');
});

t.test('... and its child (the grandchild, still on the table) is made again with it, by it', async (t) => {
  const r = supervise([fixture('clonefiles'), 'undo-unshare', sub('unshare-chain'), 'chain']);
  t.match(r.stdout, /spoiled, rolling back/);
  checked(t, r, [...CHECKS, ...CHAIN], 'CLONEFILES OK');
});

t.test('a rollback after the child exited and was reaped makes it again, sharing the table', async (t) => {
  const r = supervise([fixture('clonefiles'), 'undo-exit', sub('exit')]);
  t.match(r.stdout, /spoiled, rolling back/);
  checked(t, r, CHECKS, 'CLONEFILES OK');
});

t.test('a restore from an in-memory checkpoint whose sharing processes are gone', async (t) => {
  const r = supervise([fixture('clonefiles'), 'gone', sub('gone')]);
  checked(t, r, [...CHECKS, 'gone: restored with its pid', "gone: the restored pair's checks passed"], 'CLONEFILES OK');
});

t.test('the rollback asked for by the sharer that left the table is refused, nothing changed', async (t) => {
  const r = supervise([fixture('clonefiles'), 'undo-refused', sub('refused')]);
  checked(t, r, ['child: its own rollback, once it left the table, is refused (EOPNOTSUPP)', 'child: its descriptors untouched', "parent: the child's checks passed", 'parent: nothing changed'], 'CLONEFILES REFUSED OK');
  t.match(r.stderr, /restart: EOPNOTSUPP: restart:files: task \d+: it no longer shares the descriptor table of process \d+ as at the checkpoint .*: it is the caller/, 'one log line names the task, the resource and why');
});
