// A Node.js HTTP server on 127.0.0.1 (the machine's own node: V8 with its
// worker threads, the libuv thread pool, epoll, eventfds, timers) holding its
// state in memory, and keep-alive clients outside the tree: checkpoint --kill
// and restart, and a CKPT_DEFER checkpoint rolled back after the state was
// changed through other connections. The same keep-alive connections answer
// with the state of the checkpoint (the server's own count of requests on
// each connection goes on from where it was), and new connections work.
//
// io_uring: libuv 1.45+ can use it (for file operations, and for epoll_ctl
// batches), and ckpt refuses an io_uring ring. This node (20.20, libuv
// 1.46.0) makes no io_uring_setup call here (strace -f of a server doing
// fs.readFile and pbkdf2: none; its libuv uses io_uring only when
// UV_USE_IO_URING=1 asks for it), so nothing is set to keep it away; the
// first two tests check that the server holds no ring. The third asks for
// io_uring: each event loop (the main one and those of the V8 platform's
// threads) then sets up two rings, one with an SQPOLL kernel thread, and
// the checkpoint is refused (EOPNOTSUPP, the log line naming it), the
// server going on as before.
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import http from 'node:http';
import path from 'node:path';
import { CKPT, SUPERVISE, tmpdir, runAsync, until, deferThenUndo } from './helpers.js';

const dir = tmpdir('nodehttp');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true })); // images of about 30 MB each

/**
 * The server. State: a request counter, a Map the requests change (and
 * 20,000 entries loaded at start), the number of ticks of an interval timer,
 * and per connection (a WeakMap on the socket object) how many requests it
 * carried. Some answers go through the thread pool (fs.readFile, pbkdf2) so
 * that the pool's threads are exercised after a restart.
 */
const SERVER = `
const http = require('http'), fs = require('fs'), crypto = require('crypto');
const [port, rd] = [Number(process.argv[2]), process.argv[3]];
let requests = 0, ticks = 0;
const map = new Map();
for (let i = 0; i < 20000; i++) map.set('k' + i, 'v' + i);
const perConn = new WeakMap();
setInterval(() => ticks++, 20);
const server = http.createServer((req, res) => {
  requests++;
  const n = (perConn.get(req.socket) || 0) + 1;
  perConn.set(req.socket, n);
  const u = new URL(req.url, 'http://x');
  const state = (extra) => JSON.stringify({ requests, conn: n, size: map.size, ticks, ...extra });
  const send = (body) => res.end(body);
  switch (u.pathname) {
    case '/set':
      map.set(u.searchParams.get('k'), u.searchParams.get('v'));
      return send(state({}));
    case '/get':
      return send(state({ v: map.get(u.searchParams.get('k')) ?? null }));
    case '/clear':
      map.clear();
      return send(state({}));
    case '/pool':
      // Through the libuv thread pool: a file read and a key derivation.
      return fs.readFile(__filename, (e, b) => crypto.pbkdf2('pw', 'salt', 1000, 16, 'sha256', (e2, k) =>
        send(state({ file: e ? e.code : b.length, key: e2 ? e2.code : k.toString('hex') }))));
    case '/quit':
      res.end(state({}));
      server.close();
      for (const s of sockets) s.destroy();
      return setImmediate(() => process.exit(0));
  }
  res.statusCode = 404;
  send('{}');
});
const sockets = new Set();
server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
// Idle keep-alive connections stay open (the default closes them after 5 s).
server.keepAliveTimeout = 0;
server.listen(port, '127.0.0.1', () => fs.writeFileSync(rd + '/READY', String(process.pid)));
`;

/** Run a command to its end without blocking this process (the outside clients live here meanwhile). */


interface State { requests: number; conn: number; size: number; ticks: number; v?: string | null; file?: number | string; key?: string }

/**
 * One keep-alive connection speaking HTTP/1.1 by hand: every request on the
 * same TCP connection, each answer read whole (Content-Length or chunked).
 */
async function keepAlive(port: number) {
  const c = await new Promise<net.Socket>((res, rej) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => res(s));
    s.once('error', rej);
  });
  let got = Buffer.alloc(0), trouble = '';
  c.on('data', (d) => (got = Buffer.concat([got, d])));
  c.on('error', (e) => (trouble += `error ${e.message} `));
  c.on('end', () => (trouble += 'end '));
  /** The body of the first whole response in `got`, or undefined. */
  const whole = (): string | undefined => {
    const s = got.toString('latin1'), h = s.indexOf('\r\n\r\n');
    if (h < 0) return undefined;
    const head = s.slice(0, h), rest = s.slice(h + 4);
    const len = /^content-length: *(\d+)/im.exec(head);
    if (len) return rest.length >= Number(len[1]) ? rest.slice(0, Number(len[1])) : undefined;
    if (/^transfer-encoding: *chunked/im.test(head)) {
      let body = '', at = 0;
      for (;;) {
        const nl = rest.indexOf('\r\n', at);
        if (nl < 0) return undefined;
        const size = parseInt(rest.slice(at, nl), 16);
        if (size === 0) return rest.indexOf('\r\n', nl + 2) >= 0 ? body : undefined;
        if (rest.length < nl + 2 + size + 2) return undefined;
        body += rest.slice(nl + 2, nl + 2 + size);
        at = nl + 2 + size + 2;
      }
    }
    return undefined;
  };
  return {
    localPort: c.localPort,
    // Its retransmission timer may have backed off while the server was down: up to 30 s.
    async get(url: string): Promise<State> {
      got = Buffer.alloc(0);
      c.write(`GET ${url} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: keep-alive\r\n\r\n`);
      if (!(await until(() => whole() !== undefined, 30_000))) throw new Error(`no whole answer to ${url} (got ${JSON.stringify(got.toString())}, ${trouble})`);
      return JSON.parse(whole()!) as State;
    },
    trouble: () => trouble,
    close: () => c.destroy(),
  };
}

/** A request through an http.Agent with keepAlive and one socket: which local port carried it, and the answer. */
function agentGet(agent: http.Agent, port: number, url: string): Promise<{ via: number; state: State }> {
  return new Promise((res, rej) => {
    const req = http.get({ host: '127.0.0.1', port, path: url, agent, timeout: 30_000 }, (r) => {
      let b = '';
      r.on('data', (d) => (b += d));
      r.on('end', () => res({ via: req.socket!.localPort!, state: JSON.parse(b) as State }));
    });
    req.on('error', rej);
    req.on('timeout', () => req.destroy(new Error(`${url}: timed out`)));
  });
}

/** A new connection each time (no agent reuse): for "a new connection works". */
async function fresh(port: number, url: string): Promise<State> {
  const c = await keepAlive(port);
  try {
    return await c.get(url);
  } finally {
    c.close();
  }
}

/** The tree: bash starts the server, and once the test says GO runs `extra` (the checkpoint) and waits. */
function tree(rd: string, port: number, extra: string): string {
  fs.writeFileSync(path.join(rd, 'server.js'), SERVER);
  return `${process.execPath} ${rd}/server.js ${port} ${rd} & S=$!; while [ ! -e ${rd}/GO ]; do sleep 0.05; done; ${extra}; wait`;
}

const ckpt = CKPT.map((a) => `'${a}'`).join(' ');
const port = () => 20000 + Math.floor(Math.random() * 20000);

/** The server's descriptors that are io_uring rings (none expected: see the top). */
function rings(pid: number): string[] {
  const out: string[] = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const l = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
      if (l.includes('io_uring')) out.push(`${fd} -> ${l}`);
    } catch { /* closed meanwhile */ }
  }
  return out;
}

t.test('node HTTP server: checkpoint --kill, restart; the same keep-alive connections go on with the state of the checkpoint, new ones work', async (t) => {
  const rd = fs.mkdtempSync(path.join(dir, 'kill-'));
  const p = port(), img = path.join(rd, 'node.img');
  const debug = { ...process.env, DEBUG: 'ckpt:syscall' }; // for the figures: how long the server was stopped, the restart
  const first = runAsync([...SUPERVISE, '--', 'bash', '-c', tree(rd, p, `${ckpt} checkpoint $S --kill -o ${img}; echo "checkpoint status $?"`)], debug);
  t.ok(await until(() => fs.existsSync(path.join(rd, 'READY')), 60_000), 'the server listens');
  const pid = Number(fs.readFileSync(path.join(rd, 'READY'), 'utf8'));
  t.same(rings(pid), [], 'node holds no io_uring ring');
  t.ok(fs.readdirSync(`/proc/${pid}/task`).length > 4, 'node runs its threads (V8 platform workers, the libuv pool)');

  const raw = await keepAlive(p);
  t.match(await raw.get('/set?k=color&v=blue'), { requests: 1, conn: 1, size: 20001 }, 'the raw keep-alive client sets a key');
  t.match(await raw.get('/set?k=k7&v=changed'), { requests: 2, conn: 2, size: 20001 });
  const pool = await raw.get('/pool');
  t.match(pool, { requests: 3, conn: 3, file: SERVER.length }, 'the thread pool answers before the checkpoint');
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const a1 = await agentGet(agent, p, '/set?k=shape&v=round');
  t.match(a1.state, { requests: 4, conn: 1, size: 20002 }, 'the agent client sets a key');
  const ticksBefore = (await raw.get('/get?k=color')).ticks;

  fs.writeFileSync(path.join(rd, 'GO'), '');
  const one = await first;
  t.match(one.out, /checkpoint status 0/, one.out);
  t.comment(`checkpoint: ${/to a file: (stopped [\d.]+ ms, image [\d.]+ ms)/.exec(one.out)?.[1]}`);
  t.ok(fs.statSync(img).size > 0, `image of ${fs.statSync(img).size} bytes`);
  t.equal(raw.trouble(), '', 'the raw client saw no reset and no end while the server was down');

  const t0 = Date.now();
  const restarted = runAsync([...SUPERVISE, '--', ...CKPT, 'restart', '-i', img], debug);
  const after = await raw.get('/get?k=color');
  // Most of it is the client's retransmission timer, backed off while the server was down.
  t.comment(`first answer on the old connection ${Date.now() - t0} ms after the restart began`);
  t.match(after, { requests: 6, conn: 5, size: 20002, v: 'blue' }, 'the same raw connection: the counters go on from the checkpoint, the key is there');
  t.match(await raw.get('/get?k=k7'), { requests: 7, conn: 6, v: 'changed' }, 'a changed entry of the 20,000');
  t.match(await raw.get('/get?k=k19999'), { v: 'v19999' }, 'an unchanged one');
  t.match(await raw.get('/pool'), { conn: 8, file: SERVER.length, key: pool.key }, 'the thread pool works after the restart');
  const a2 = await agentGet(agent, p, '/get?k=shape');
  t.equal(a2.via, a1.via, 'the agent reuses its kept-alive socket');
  t.match(a2.state, { conn: 2, v: 'round' }, 'and the server knows it as the same connection');
  const later = await until(() => false, 300).then(() => raw.get('/get?k=color'));
  t.ok(later.ticks > ticksBefore, `the interval timer ticks again (${ticksBefore} -> ${later.ticks})`);
  t.match(await fresh(p, '/get?k=color'), { conn: 1, v: 'blue' }, 'a new connection works');
  t.equal(raw.trouble(), '', 'no reset, no end');

  t.match(await raw.get('/quit'), { size: 20002 });
  agent.destroy();
  const r = await restarted;
  t.equal(r.status, 0, 'the restored server exits 0');
  t.comment(`restart: ${/restart\(0, \d+, 0\) = \d+n \(([\d.]+ ms, \d+ injected runs)\)/.exec(r.out)?.[1]}`);
  t.ok(await until(() => raw.trouble() === 'end ', 5_000), 'the raw client sees the end when the server quits');
  raw.close();
});

t.test('node HTTP server rolled back: a CKPT_DEFER checkpoint, the state changed through other connections, ckpt undo; the idle keep-alive connection and new ones see the state of the checkpoint', async (t) => {
  const rd = fs.mkdtempSync(path.join(dir, 'undo-'));
  const p = port();
  const flag = (f: string) => fs.existsSync(path.join(rd, f));
  const extra = deferThenUndo(rd);
  const run = runAsync([...SUPERVISE, '--', 'bash', '-c', tree(rd, p, extra)]);
  t.ok(await until(() => flag('READY'), 60_000), 'the server listens');
  const idle = await keepAlive(p);
  t.match(await idle.get('/set?k=color&v=blue'), { requests: 1, conn: 1, size: 20001 });
  t.match(await idle.get('/pool'), { requests: 2, conn: 2, file: SERVER.length });

  fs.writeFileSync(path.join(rd, 'GO'), '');
  t.ok(await until(() => flag('CKPTED'), 60_000), 'checkpointed in memory');
  // The idle connection stays idle: a rollback keeps a connection to a peer
  // outside only if nothing moved on it since the checkpoint.
  const other = await keepAlive(p);
  t.match(await other.get('/set?k=color&v=red'), { requests: 3, conn: 1 });
  t.match(await other.get('/clear'), { requests: 4, size: 0 }, 'the map wiped after the checkpoint');
  other.close();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  t.match((await agentGet(agent, p, '/set?k=late&v=1')).state, { requests: 5, size: 1 });
  agent.destroy();
  await new Promise((r) => setTimeout(r, 100)); // the server sees both connections close

  fs.writeFileSync(path.join(rd, 'ROLL'), '');
  t.ok(await until(() => flag('ROLLED'), 60_000), 'rolled back');
  t.match(await idle.get('/get?k=color'), { requests: 3, conn: 3, size: 20001, v: 'blue' }, 'the idle keep-alive connection: the state of the checkpoint, its own count goes on');
  t.match(await idle.get('/get?k=late'), { v: null }, 'what came after the checkpoint is gone');
  t.match(await idle.get('/pool'), { conn: 5, file: SERVER.length }, 'the thread pool works after the rollback');
  t.match(await fresh(p, '/get?k=k123'), { conn: 1, size: 20001, v: 'v123' }, 'a new connection works');
  const agent2 = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const b1 = await agentGet(agent2, p, '/set?k=after&v=1'), b2 = await agentGet(agent2, p, '/get?k=after');
  t.equal(b2.via, b1.via, 'a new kept-alive agent connection');
  t.match(b2.state, { conn: 2, size: 20002, v: '1' }, 'changes the state again');
  agent2.destroy();
  t.equal(idle.trouble(), '', 'no reset, no end on the idle connection');

  t.match(await idle.get('/quit'), { size: 20002 });
  const r = await run;
  t.match(r.out, /undo status 0/, r.out);
  t.equal(r.status, 0, 'the tree exits 0');
  idle.close();
});

t.test('node HTTP server with UV_USE_IO_URING=1: the checkpoint is refused (EOPNOTSUPP, the log names the io_uring), the server goes on with its state', async (t) => {
  const rd = fs.mkdtempSync(path.join(dir, 'uring-'));
  const p = port(), img = path.join(rd, 'node.img');
  const extra = [
    `${ckpt} checkpoint $S --kill -o ${img}; echo "kill status $?"`,
    `${ckpt} checkpoint $S --defer; echo "defer status $?"`,
    `touch ${rd}/TRIED`,
  ].join('; ');
  const run = runAsync([...SUPERVISE, '--', 'bash', '-c', tree(rd, p, extra)], { ...process.env, UV_USE_IO_URING: '1' });
  t.ok(await until(() => fs.existsSync(path.join(rd, 'READY')), 60_000), 'the server listens');
  const c = await keepAlive(p);
  t.match(await c.get('/set?k=color&v=blue'), { requests: 1, conn: 1 });
  t.match(await c.get('/pool'), { requests: 2, file: SERVER.length }, 'a file read and a key derivation (through io_uring and the pool)');
  const pid = Number(fs.readFileSync(path.join(rd, 'READY'), 'utf8'));
  const ring = rings(pid).length > 0;
  fs.writeFileSync(path.join(rd, 'GO'), '');
  t.ok(await until(() => fs.existsSync(path.join(rd, 'TRIED')), 60_000), 'both checkpoints tried');
  if (!ring) {
    t.comment('this node set up no io_uring even when asked (io_uring disabled here?): nothing to refuse');
  } else {
    t.match(await c.get('/get?k=color'), { requests: 3, conn: 3, v: 'blue' }, 'the same connection: the server runs on with its state');
    t.notOk(fs.existsSync(img) || fs.existsSync(img + '.tmp'), 'no image left behind');
  }
  t.match(await c.get('/quit'), { size: 20001 });
  const r = await run;
  if (ring) {
    t.match(r.out, /kill status 1/, 'CKPT_KILL refused');
    t.match(r.out, /defer status 1/, 'CKPT_DEFER refused');
    t.match(r.out, /EOPNOTSUPP: checkpoint:\w+: task \d+: .*io_uring/, 'the log names the task and the io_uring');
    t.notMatch(r.out, /ESRCH/, 'not taken for a thread gone (the io_uring kernel threads are no tracees)');
  }
  t.equal(r.status, 0, r.out);
  c.close();
});
