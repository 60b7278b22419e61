// Redis on 127.0.0.1 with 100,000 keys, a client connection from inside the
// checkpointed subtree (a bash holding /dev/tcp) and one from outside it (this
// test): checkpoint --kill and restart, and a CKPT_DEFER checkpoint rolled
// back after the data was wiped. Both connections keep working and see the
// data as at the checkpoint. redis-server is installed with apt-get if
// missing (skipped if that fails).
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CKPT, SUPERVISE, tmpdir, needPackage, runAsync, until, deferThenUndo } from './helpers.js';

const dir = tmpdir('redis');


/** A RESP client on one connection: each command's whole answer (as many lines as `lines`). */
async function connect(port: number) {
  for (let i = 0; i < 200; i++) {
    const c = await new Promise<net.Socket | null>((res) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => res(s));
      s.once('error', () => res(null));
    });
    if (!c) {
      await new Promise((r) => setTimeout(r, 50));
      continue;
    }
    let got = '', trouble = '';
    c.on('data', (d) => (got += d));
    c.on('error', (e) => (trouble += `error ${e.message} `));
    c.on('end', () => (trouble += 'end '));
    return {
      // Its retransmission timer may have backed off while redis was down: up to 30 s.
      async ask(cmd: string, lines = 1): Promise<string> {
        got = '';
        c.write(cmd + '\r\n');
        await until(() => got.split('\r\n').length > lines, 30_000);
        return got.trim();
      },
      trouble: () => trouble,
      close: () => c.destroy(),
    };
  }
  throw new Error(`redis did not listen on ${port}`);
}

/**
 * The subtree: bash starts redis, loads 100,000 keys, opens its own
 * connection (fd 5), says READY, and on GO asks through it; its answers go
 * to OUT. `extra` runs in the outer shell once the test says SETDONE (the checkpoint).
 */
function tree(rd: string, port: number, extra: string): string {
  const inner = [
    `redis-server --port ${port} --bind 127.0.0.1 --save '' --appendonly no --daemonize no >${rd}/redis.log 2>&1 &`,
    `until redis-cli -p ${port} ping >/dev/null 2>&1; do sleep 0.05; done`,
    `seq 0 99999 | awk '{printf "SET key:%d value:%d\\n", $1, $1}' | redis-cli -p ${port} --pipe >${rd}/load.log 2>&1`,
    `exec 5<>/dev/tcp/127.0.0.1/${port}`,
    `printf 'SET inside before\\r\\n' >&5; read -r l <&5; echo "inside set: $l" >>${rd}/OUT`,
    `touch ${rd}/READY`,
    `while [ ! -e ${rd}/GO ]; do sleep 0.05; done`,
    `printf 'GET inside\\r\\n' >&5; read -r l <&5; read -r v <&5; echo "inside get: $v" >>${rd}/OUT`,
    `printf 'GET key:77777\\r\\n' >&5; read -r l <&5; read -r v <&5; echo "inside key: $v" >>${rd}/OUT`,
    `printf 'DBSIZE\\r\\n' >&5; read -r n <&5; echo "inside dbsize: $n" >>${rd}/OUT`,
    `redis-cli -p ${port} shutdown nosave >/dev/null 2>&1; wait`,
  ].join('\n');
  fs.writeFileSync(path.join(rd, 'inner.sh'), inner);
  // The checkpoint waits for the outside client's SET too (SETDONE).
  return `bash ${rd}/inner.sh & S=$!; while [ ! -e ${rd}/SETDONE ]; do sleep 0.05; done; ${extra}; wait`;
}

const ckpt = CKPT.map((a) => `'${a}'`).join(' ');
const skip = needPackage('redis-server', ['redis-server', 'redis-cli']);

t.test('redis with 100,000 keys, a client inside the subtree and one outside: checkpoint --kill, restart, both connections go on with the data', { skip }, async (t) => {
  const rd = fs.mkdtempSync(path.join(dir, 'kill-'));
  const port = 20000 + Math.floor(Math.random() * 20000);
  const img = path.join(rd, 'redis.img');
  const first = runAsync([...SUPERVISE, '--', 'bash', '-c', tree(rd, port, `${ckpt} checkpoint $S --kill -o ${img}; echo "checkpoint status $?"`)]);
  t.ok(await until(() => fs.existsSync(path.join(rd, 'READY')), 120_000), 'redis loaded, the inside client connected');
  const out = await connect(port);
  t.equal(await out.ask('SET outside before'), '+OK', 'the outside client sets a key');
  fs.writeFileSync(path.join(rd, 'SETDONE'), '');
  const one = await first;
  t.match(one.out, /checkpoint status 0/, one.out);
  t.equal(out.trouble(), '', 'the outside client saw no reset and no end while redis was down');
  const restarted = runAsync([...SUPERVISE, '--', ...CKPT, 'restart', '-i', img]);
  t.equal(await out.ask('DBSIZE'), ':100002', 'the same outside connection: every key is there');
  t.equal(await out.ask('GET key:12345', 2), '$11\r\nvalue:12345', 'and their values');
  t.equal(await out.ask('GET outside', 2), '$6\r\nbefore');
  t.equal(await out.ask('GET inside', 2), '$6\r\nbefore', 'what the inside client set');
  fs.writeFileSync(path.join(rd, 'GO'), '');
  const r = await restarted;
  t.equal(r.status, 0, r.out);
  const said = fs.readFileSync(path.join(rd, 'OUT'), 'utf8');
  t.match(said, /^inside set: \+OK/m);
  t.match(said, /^inside get: before/m, 'the inside client: its own connection answers after the restart');
  t.match(said, /^inside key: value:77777/m);
  t.match(said, /^inside dbsize: :100002/m);
  t.match(out.trouble(), /^end $/, 'the outside client sees the end only when redis shuts down');
  out.close();
});

t.test('redis rolled back: a CKPT_DEFER checkpoint, the data wiped through another connection, ckpt undo; the idle outside connection and the inside one see the data of the checkpoint', { skip }, async (t) => {
  const rd = fs.mkdtempSync(path.join(dir, 'undo-'));
  const port = 20000 + Math.floor(Math.random() * 20000);
  const flag = (f: string) => fs.existsSync(path.join(rd, f));
  const extra = deferThenUndo(rd);
  const run = runAsync([...SUPERVISE, '--', 'bash', '-c', tree(rd, port, extra)]);
  t.ok(await until(() => flag('READY'), 120_000), 'redis loaded, the inside client connected');
  const idle = await connect(port);
  t.equal(await idle.ask('SET outside before'), '+OK');
  fs.writeFileSync(path.join(rd, 'SETDONE'), '');
  t.ok(await until(() => flag('CKPTED'), 60_000), 'checkpointed in memory');
  const other = await connect(port);
  t.equal(await other.ask('FLUSHALL'), '+OK', 'the data wiped after the checkpoint');
  t.equal(await other.ask('DBSIZE'), ':0');
  other.close();
  fs.writeFileSync(path.join(rd, 'ROLL'), '');
  t.ok(await until(() => flag('ROLLED'), 60_000), 'rolled back');
  t.equal(await idle.ask('DBSIZE'), ':100002', 'the idle outside connection: every key is back');
  t.equal(await idle.ask('GET key:4242', 2), '$10\r\nvalue:4242');
  const fresh = await connect(port);
  t.equal(await fresh.ask('GET inside', 2), '$6\r\nbefore', 'a new connection works');
  fresh.close();
  fs.writeFileSync(path.join(rd, 'GO'), '');
  const r = await run;
  t.match(r.out, /undo status 0/, r.out);
  const said = fs.readFileSync(path.join(rd, 'OUT'), 'utf8');
  t.match(said, /^inside get: before/m, 'the inside client: its connection rolled back with redis, it answers');
  t.match(said, /^inside dbsize: :100002/m);
  idle.close();
});
