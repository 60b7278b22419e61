// PostgreSQL under ckpt-supervise, as user postgres (SysV shm interlock
// segment, shared anonymous memory, a unix and a TCP listener, several
// processes): a table written, checkpoint --kill, restart, the table read
// back with psql over its unix socket and over TCP, new connections work.
// (No rollback: the database's files are not part of a checkpoint, so a
// PostgreSQL rolled back in memory would disagree with its own WAL on disk.)
// Skipped where PostgreSQL cannot be had.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { run, supervise, tmpdir, CKPT, q } from './helpers.js';

function pgBin(): string | undefined {
  const find = () => {
    try {
      return fs.readdirSync('/usr/lib/postgresql').map((v) => `/usr/lib/postgresql/${v}/bin`).find((d) => fs.existsSync(`${d}/postgres`));
    } catch {
      return undefined;
    }
  };
  let bin = find();
  if (!bin && process.getuid?.() === 0) {
    run(['apt-get', 'install', '-y', 'postgresql'], { timeout: 600_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
    bin = find();
  }
  return bin;
}

const bin = pgBin();
const hasUser = run(['id', '-u', 'postgres']).status === 0;
if (!bin || !hasUser || process.getuid?.() !== 0 || !fs.existsSync('/usr/bin/psql')) {
  t.pass(`skipped: PostgreSQL not available (bin ${bin}, user postgres ${hasUser}, root ${process.getuid?.() === 0})`);
} else {
  t.test('PostgreSQL as user postgres: a table written, checkpoint --kill, restart, the table read back over its unix socket and TCP', async (t) => {
    const dir = tmpdir('postgres');
    const data = path.join(dir, 'data'), sock = path.join(dir, 'sock'), img = path.join(dir, 'pg.img'), log = path.join(dir, 'pg.log');
    fs.mkdirSync(sock);
    fs.chmodSync(dir, 0o755);
    run(['chown', 'postgres:postgres', dir, sock]);
    const asPg = `setpriv --reuid=postgres --regid=postgres --init-groups`;
    const init = run(['bash', '-c', `${asPg} ${bin}/initdb -D ${q(data)} -A trust -U postgres`], { timeout: 120_000 });
    t.equal(init.status, 0, `initdb (${init.stderr.slice(-300)})`);
    const ckpt = CKPT.map(q).join(' ');
    const port = 20000 + (process.pid % 20000);
    const ready = `for i in $(seq 100); do ${bin}/pg_isready -h ${q(sock)} -p ${port} -q && break; sleep 0.2; done`;
    const psql = (sql: string, host = sock) => `psql -h ${q(host)} -p ${port} -U postgres -tAc ${q(sql)} postgres`;
    const first = supervise(['bash', '-c', [
      `${asPg} ${bin}/postgres -D ${q(data)} -k ${q(sock)} -p ${port} -c listen_addresses=127.0.0.1 -c shared_buffers=16MB > ${q(log)} 2>&1 &`,
      'PG=$!', ready,
      psql("create table t(x int, s text); insert into t values (42, 'kept'), (43, 'also')"),
      `${ckpt} checkpoint $PG --kill -o ${q(img)}`, 'echo "checkpoint rc=$?"', 'wait',
    ].join('\n')], { timeout: 180_000 });
    t.match(first.stdout, /checkpoint rc=0/, `checkpoint --kill of the postmaster (${first.stderr.slice(-600)})`);
    const second = supervise(['bash', '-c', [
      `${ckpt} restart -i ${q(img)} &`, ready,
      `echo "rows: $(${psql('select x, s from t order by x')} | tr '\\n' ' ')"`,
      `echo "tcp rows: $(${psql('select x from t order by x', '127.0.0.1')} | tr '\\n' ' ')"`,
      psql("insert into t values (7, 'after')"),
      `echo "count: $(${psql('select count(*) from t')})"`,
      `${asPg} ${bin}/pg_ctl -D ${q(data)} stop -m fast`, 'wait', 'echo "restart status $?"',
    ].join('\n')], { timeout: 180_000 });
    t.match(second.stdout, /rows: 42\|kept 43\|also /, `the table read back after the restart (${second.stderr.slice(-600)})`);
    t.match(second.stdout, /tcp rows: 42 43 /, 'and over its TCP listener');
    t.match(second.stdout, /count: 3/, 'and written to');
    t.match(second.stdout, /restart status 0/, 'the restored postmaster shut down cleanly');
  });
}
