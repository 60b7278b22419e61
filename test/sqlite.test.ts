// SQLite with a write transaction open (BEGIN IMMEDIATE, rows written in
// it), in rollback-journal and WAL mode: the sqlite3 shell holding it is
// checkpointed with --kill and restarted, or checkpointed in memory
// (--defer) and brought back with undo. While the restored shell still holds
// its transaction another writer (sqlite3, busy timeout 0) must be told
// "database is locked" (its POSIX locks on the database and on the -shm file
// are held again), and a reader must not take the left-behind journal for a
// hot one; then the shell commits, and sqlite3 reads the rows back with
// PRAGMA integrity_check ok. Skipped where sqlite3 cannot be had.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { run, supervise, tmpdir, CKPT, q } from './helpers.js';

function haveSqlite(): boolean {
  const ok = () => run(['sqlite3', '-version']).status === 0;
  if (ok()) return true;
  if (process.getuid?.() !== 0) return false;
  run(['apt-get', 'install', '-y', 'sqlite3'], { timeout: 600_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return ok();
}

const dir = tmpdir('sqlite');
const ckpt = CKPT.map(q).join(' ');

/**
 * A fresh directory with the shell's script: a table with one row
 * committed, then a transaction holding two more rows, "ready", and a wait
 * for the file `go`; what it does then is in next.sql (commit, by default).
 */
function prepare(tag: string, mode: 'delete' | 'wal'): string {
  const d = fs.mkdtempSync(path.join(dir, `${tag}-`));
  fs.writeFileSync(path.join(d, 'script.sql'), [
    `pragma journal_mode=${mode};`,
    "create table t(x int, s text);",
    "insert into t values (1, 'before');",
    'begin immediate;',
    "insert into t values (2, 'inside');",
    "insert into t values (3, 'inside');",
    '.print ready',
    `.system while [ ! -e ${d}/go ]; do sleep 0.05; done`,
    `.read ${d}/next.sql`,
    '',
  ].join('\n'));
  fs.writeFileSync(path.join(d, 'next.sql'), 'commit;\n.print committed\n');
  return d;
}

/** Shell functions for the scripts run under ckpt-supervise, in directory d. */
const lib = (d: string) => [
  `cd ${q(d)}`,
  'waitfor() { for i in $(seq 300); do grep -q "$1" "$2" 2>/dev/null && return 0; sleep 0.1; done; echo "timed out waiting for $1 in $2"; }',
  // The POSIX locks process $1 holds on the database and its -shm file, as /proc/locks shows them.
  'locks() { for f in db db-shm; do [ -e $f ] || continue; i=$(stat -c %i $f); awk -v p=$1 -v i=$i -v f=$f \'$5 == p && $6 ~ (":" i "$") { print "lock", f, $4, $7, $8 }\' /proc/locks; done | sort | tr "\\n" ";"; echo; }',
  // Another writer that does not wait.
  'writer() { sqlite3 -cmd ".timeout 0" db "insert into t values (99, \'outside\')" 2>&1 | tr "\\n" " "; echo "rc=${PIPESTATUS[0]}"; }',
  'rows() { echo "rows: $(sqlite3 db "select x from t order by x" | tr "\\n" " ")"; echo "integrity: $(sqlite3 db "pragma integrity_check")"; }',
  'start() { sqlite3 db < script.sql >> out 2>&1 & S=$!; waitfor ready out; echo "pid $S"; }',
  // ckpt checkpoint or undo, made again while it fails with EOPNOTSUPP: the
  // shell's wait loop runs sleep through vfork (dash), and a process in the
  // middle of a vfork can be neither checkpointed nor rolled back (the call
  // fails at once, to be made again).
  `ck() { for i in $(seq 20); do ${ckpt} "$@" 2> ck.err; rc=$?; [ $rc = 0 ] && { cat ck.err >&2; return 0; }; grep -q EOPNOTSUPP ck.err || break; echo "ckpt $1: EOPNOTSUPP, again" >&2; sleep 0.1; done; cat ck.err >&2; return $rc; }`,
];

/** The locks the shell holds in its transaction: RESERVED and SHARED on the database; in WAL mode SHARED on it, and the WAL write lock, a read mark and the DMS lock on the -shm file. */
const LOCKS = {
  delete: 'lock db READ 1073741826 1073742335;lock db WRITE 1073741825 1073741825;',
  wal: 'lock db READ 1073741826 1073742335;lock db-shm READ 124 124;lock db-shm READ 128 128;lock db-shm WRITE 120 120;',
};

if (!haveSqlite()) {
  t.pass('skipped: sqlite3 not available (and could not be installed)');
} else {
  for (const mode of ['delete', 'wal'] as const) {
    t.test(`${mode} mode: a write transaction open, checkpoint --kill, restart: the locks are held again, another writer is told the database is locked, the commit goes through`, async (t) => {
      const d = prepare(`kill-${mode}`, mode);
      const first = supervise(['bash', '-c', [...lib(d),
        'start',
        'echo "before: $(locks $S)"',
        'echo "before: writer $(writer)"',
        'ck checkpoint $S --kill -o img; rc=$?; echo "checkpoint rc=$rc"; [ $rc = 0 ] || touch go',
        'wait $S; echo "status $?"',
        'echo "killed: $(locks $S)"',
      ].join('\n')], { timeout: 120_000 });
      t.match(first.stdout, /checkpoint rc=0/, `checkpoint --kill (${first.stdout} ${first.stderr.slice(-600)})`);
      t.match(first.stdout, /status 137/, 'the shell was killed in its transaction');
      t.equal(first.stdout.match(/^before: (lock.*)$/m)?.[1], LOCKS[mode], 'the locks it held');
      t.match(first.stdout, /^before: writer .*database is locked.* rc=5$/m, 'another writer was locked out before');
      t.match(first.stdout, /^killed: $/m, 'no lock left once killed');
      const pid = first.stdout.match(/^pid (\d+)$/m)?.[1];
      if (mode === 'delete') t.ok(fs.statSync(path.join(d, 'db-journal')).size > 0, 'the killed shell left its journal behind');

      const second = supervise(['bash', '-c', [...lib(d),
        `S=${pid}`,
        `${ckpt} restart -i img 2> restart.err & R=$!`,
        'waitfor "restarted as pid" restart.err',
        'echo "after: $(locks $S)"',
        'echo "after: writer $(writer)"',
        'echo "after: reader sees $(sqlite3 db "select count(*) from t") rows"',
        'touch go',
        'wait $R; echo "restart status $?"',
        'echo "out: $(tr "\\n" " " < out)"',
        'rows',
        'sqlite3 db "insert into t values (4, \'later\')"; echo "later insert rc=$?"',
        'echo "count: $(sqlite3 db "select count(*) from t")"',
      ].join('\n')], { timeout: 120_000 });
      t.equal(second.stdout.match(/^after: (lock.*)$/m)?.[1], LOCKS[mode], `the restored shell holds the same locks again (${second.stdout} ${second.stderr.slice(-600)})`);
      t.match(second.stdout, /^after: writer .*database is locked.* rc=5$/m, 'another writer is told the database is locked (SQLITE_BUSY)');
      t.match(second.stdout, /^after: reader sees 1 rows$/m, 'a reader sees only the committed row (and did not roll the journal back)');
      t.match(second.stdout, /^restart status 0$/m, 'the restored shell ran to its end');
      t.match(second.stdout, /^out: .*ready committed $/m, 'it committed');
      t.match(second.stdout, /^rows: 1 2 3 $/m, 'the rows of the transaction are in the database');
      t.match(second.stdout, /^integrity: ok$/m, 'integrity_check ok');
      t.match(second.stdout, /^later insert rc=0$/m, 'another writer may write once it committed');
      t.match(second.stdout, /^count: 4$/m);
    });
  }

  t.test('WAL mode: --defer in the transaction, the shell rolls it back and lets go of its locks, undo: back in the transaction with the locks, the commit goes through', async (t) => {
    const d = prepare('undo-wal', 'wal');
    fs.writeFileSync(path.join(d, 'next.sql'), `rollback;\n.print rolledback\n.system while [ ! -e ${d}/go2 ]; do sleep 0.05; done\n.print not reached\n`);
    const r = supervise(['bash', '-c', [...lib(d),
      'start',
      'CRID=$(ck checkpoint $S --defer); echo "checkpoint rc=$? crid=$CRID"',
      'touch go',
      'waitfor rolledback out',
      'echo "rolled back: $(locks $S)"',
      'echo "rolled back: reader sees $(sqlite3 db "select count(*) from t") rows"',
      'rm go',
      `printf 'commit;\\n.print committed\\n' > next.sql`,
      'ck undo $CRID; echo "undo rc=$?"',
      'echo "undone: $(locks $S)"',
      'echo "undone: writer $(writer)"',
      'touch go go2', // go2 too: a shell left waiting for it by a failed undo ends
      'wait $S; echo "status $?"',
      'echo "out: $(tr "\\n" " " < out)"',
      'rows',
    ].join('\n')], { timeout: 120_000 });
    t.match(r.stdout, /checkpoint rc=0 crid=\d+/, `checkpoint --defer (${r.stdout} ${r.stderr.slice(-600)})`);
    t.equal(r.stdout.match(/^rolled back: (lock.*)$/m)?.[1], 'lock db READ 1073741826 1073742335;lock db-shm READ 128 128;', 'the SQL ROLLBACK let go of the WAL write lock and its read mark (the connection keeps its SHARED and DMS locks)');
    t.match(r.stdout, /^rolled back: reader sees 1 rows$/m);
    t.match(r.stdout, /^undo rc=0$/m, 'undo');
    t.equal(r.stdout.match(/^undone: (lock.*)$/m)?.[1], LOCKS.wal, 'the locks of the transaction are held again');
    t.match(r.stdout, /^undone: writer .*database is locked.* rc=5$/m, 'another writer is told the database is locked');
    t.match(r.stdout, /^status 0$/m, 'the shell ran to its end');
    t.match(r.stdout, /^out: wal ready rolledback committed $/m, 'it committed the transaction it was back in');
    t.match(r.stdout, /^rows: 1 2 3 $/m, 'the rows of the transaction are in the database');
    t.match(r.stdout, /^integrity: ok$/m, 'integrity_check ok');
  });

  t.test('rollback-journal mode: --defer in the transaction, the shell is killed (its hot journal left behind), undo: made again in the transaction with its locks, no one rolls the journal back, the commit goes through', async (t) => {
    const d = prepare('crash-delete', 'delete');
    const r = supervise(['bash', '-c', [...lib(d),
      'set -m', // the shell in a process group of its own, to kill it with its children
      'start',
      'CRID=$(ck checkpoint $S --defer); echo "checkpoint rc=$? crid=$CRID"',
      'kill -9 -$S; wait $S; echo "killed status $?"',
      'echo "journal left: $(stat -c %s db-journal)"',
      'ck undo $CRID; echo "undo rc=$?"',
      'echo "undone: $(locks $S)"',
      'echo "undone: writer $(writer)"',
      'echo "undone: reader sees $(sqlite3 db "select count(*) from t") rows"',
      'touch go',
      'waitfor committed out',
      'for i in $(seq 100); do kill -0 $S 2>/dev/null || break; sleep 0.1; done',
      'echo "out: $(tr "\\n" " " < out)"',
      'rows',
    ].join('\n')], { timeout: 120_000 });
    t.match(r.stdout, /checkpoint rc=0 crid=\d+/, `checkpoint --defer (${r.stdout} ${r.stderr.slice(-600)})`);
    t.match(r.stdout, /^killed status 137$/m);
    t.match(r.stdout, /^journal left: [1-9]\d*$/m, 'a hot journal left behind');
    t.match(r.stdout, /^undo rc=0$/m, 'undo made the shell again');
    t.equal(r.stdout.match(/^undone: (lock.*)$/m)?.[1], LOCKS.delete, 'with the locks of its transaction');
    t.match(r.stdout, /^undone: writer .*database is locked.* rc=5$/m, 'another writer is told the database is locked');
    t.match(r.stdout, /^undone: reader sees 1 rows$/m, 'a reader sees the committed row only (the journal is not hot: its owner holds RESERVED)');
    t.match(r.stdout, /^out: delete ready committed $/m, 'it committed');
    t.match(r.stdout, /^rows: 1 2 3 $/m, 'the rows of the transaction are in the database');
    t.match(r.stdout, /^integrity: ok$/m, 'integrity_check ok');
  });

  t.test('rollback-journal mode: an undo after the shell rolled back (its journal deleted) is refused with ENOENT before anything changes, and the shell goes on', async (t) => {
    const d = prepare('gone-delete', 'delete');
    fs.writeFileSync(path.join(d, 'next.sql'), `rollback;\n.print rolledback\n.system while [ ! -e ${d}/go2 ]; do sleep 0.05; done\ninsert into t values (5, 'on');\n.print went on\n`);
    const r = supervise(['bash', '-c', [...lib(d),
      'start',
      'CRID=$(ck checkpoint $S --defer); echo "checkpoint rc=$? crid=$CRID"',
      'touch go',
      'waitfor rolledback out',
      '[ -e db-journal ] || echo "journal gone"',
      'ck undo $CRID; echo "undo rc=$?"',
      'touch go2',
      'wait $S; echo "status $?"',
      'echo "out: $(tr "\\n" " " < out)"',
      'rows',
    ].join('\n')], { timeout: 120_000 });
    t.match(r.stdout, /checkpoint rc=0 crid=\d+/, `checkpoint --defer (${r.stdout} ${r.stderr.slice(-600)})`);
    t.match(r.stdout, /^journal gone$/m);
    t.match(r.stdout, /^undo rc=1$/m, 'undo refused');
    t.match(r.stderr, /restart: ENOENT: restart:files: checkpoint \d+: task \d+ fd 4: \S+\/db-journal is gone since the checkpoint/, 'the log names the task, the descriptor and the file');
    t.match(r.stdout, /^status 0$/m, 'the shell was left running and went on to its end');
    t.match(r.stdout, /^out: delete ready rolledback went on $/m);
    t.match(r.stdout, /^rows: 1 5 $/m, 'its own later insert and nothing of the rolled back transaction');
    t.match(r.stdout, /^integrity: ok$/m);
  });
}
