// TCP sockets: kept across a restart and a rollback, with the peer in the
// tree (the fixture checks every byte and option itself) or outside it (an
// echo peer run outside the supervisor checks it saw every byte once, in
// order, and no reset); netfilter rules held for the restart are gone after.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { spawn, execFileSync } from 'node:child_process';
import { supervise, fixture, CKPT, SUPERVISE, tmpdir, needPackage, runAsync } from './helpers.js';

const dir = tmpdir('tcp');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);
const rules = () => {
  try {
    return execFileSync('iptables', ['-w', '-S'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes('ckpt-tcp'));
  } catch {
    return [];
  }
};

const insideChecks = [
  'listener: same port, listening', 'listener: SO_REUSEADDR', 'listener: the connection that waited is accepted now, from its client',
  'listener: the connection that waited carries data both ways', 'listener: accepts a new connection',
  'options: TCP_NODELAY, SO_KEEPALIVE', 'options: keepalive idle, interval, count', 'options: SO_LINGER', 'options: IP_TOS, IP_TTL', 'options: O_NONBLOCK',
  'half-closed: C still shut down for writing (FIN_WAIT1)', 'queues: C reads what S had sent, once',
  'queues: S reads all C sent (received, unacknowledged, never sent), in order, then EOF',
  'half-closed: C still receives', 'half-closed: C sees the end',
  'half-closed: FIN_WAIT2 and CLOSE_WAIT', 'half-closed: CLOSE_WAIT reads the data, then EOF', 'half-closed: FIN_WAIT2 still receives', 'half-closed: then the end (LAST_ACK closed)', 'IPv6: both queues', 'IPv6: carries on',
  'bound IPv6-only socket: port, IPV6_V6ONLY', 'unbound socket: TCP, no port',
];

for (const mode of ['restart', 'undo']) {
  t.test(`a listener with a connection not yet accepted, connections with data both ways (one stuck in its send queue, then FIN_WAIT1; FIN_WAIT2 and CLOSE_WAIT), IPv6, bound and unbound sockets, peers in the tree, across a ${mode}`, async (t) => {
    const img = path.join(dir, 'inside.img');
    const first = supervise([fixture('tcp'), 'inside', mode === 'undo' ? 'undo' : img], { timeout: 120_000 });
    t.match(first.stdout, /setup: half-closed pair in states 5 and 8/, 'FIN_WAIT2 and CLOSE_WAIT');
    t.match(first.stdout, /setup: \d+ bytes sent, \d+ in C's send queue \([1-9]\d* never sent\), [1-9]\d* in S's receive queue, C state 4/, 'bytes stuck in the send queue, unread on the other side, FIN_WAIT1');
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
    const r = mode === 'undo' ? first : restart(img);
    for (const c of insideChecks) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
    t.match(r.stdout, /TCP INSIDE OK/, r.stdout + r.stderr);
    t.equal(r.status, 0);
  });
}

/** The echo peer, outside any supervisor; its port. */
async function startPeer(tag: string): Promise<{ port: number; log: string; done: Promise<void> }> {
  const portFile = path.join(dir, `${tag}.port`), log = path.join(dir, `${tag}.log`);
  for (const f of [portFile, log]) fs.rmSync(f, { force: true });
  const p = spawn(fixture('tcp'), ['peer', portFile, log], { stdio: 'ignore' });
  const done = new Promise<void>((res) => p.on('exit', () => res()));
  for (let i = 0; i < 100 && !fs.existsSync(portFile); i++) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 20));
  return { port: Number(fs.readFileSync(portFile, 'utf8')), log, done };
}

t.test('a connection to a peer outside the tree survives CKPT_KILL and a restart: no byte lost, repeated or reordered, no reset', async (t) => {
  const peer = await startPeer('kill');
  const img = path.join(dir, 'outside.img');
  const first = supervise([fixture('tcp'), 'outside', String(peer.port), img], { timeout: 60_000 });
  t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
  t.ok(rules().some((l) => l.includes(`:${peer.port}`)), 'its packets are held while it is down');
  const r = restart(img);
  t.match(r.stdout, /^ok after: the 600 echoed bytes unread at the checkpoint, once, in order$/m);
  t.match(r.stdout, /^ok after: 1000 more bytes echoed$/m);
  t.match(r.stdout, /TCP OUTSIDE OK 2000/, r.stdout + r.stderr);
  t.equal(r.status, 0);
  await peer.done;
  t.equal(fs.readFileSync(peer.log, 'utf8').trim(), 'PEER OK 2000', 'the peer saw every byte in order, then a clean end');
  t.same(rules().filter((l) => l.includes(`:${peer.port}`)), [], 'the rules are gone');
});

t.test('a rollback keeps a connection to a peer outside when nothing was sent or received since (what was read comes back), and refuses one after sending', async (t) => {
  const peer = await startPeer('undo');
  const r = supervise([fixture('tcp'), 'outside', String(peer.port), 'undo'], { timeout: 60_000 });
  t.match(r.stdout, /^ok undo: refused after sending to the outside peer \(EOPNOTSUPP\)$/m);
  t.match(r.stderr, /EOPNOTSUPP: restart:tcp: checkpoint \d+: the TCP connection 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ \(peer outside the subtree\): 10 bytes sent since the checkpoint/, 'the log names the connection and why');
  t.match(r.stdout, /^ok undo: the stream goes on after the refusal$/m);
  t.match(r.stdout, /^ok undo: what was read since the checkpoint is there again, once$/m);
  t.match(r.stdout, /TCP OUTSIDE OK 2060/, r.stdout + r.stderr);
  t.equal(r.status, 0);
  await peer.done;
  t.equal(fs.readFileSync(peer.log, 'utf8').trim(), 'PEER OK 2060', 'the peer saw every byte in order, then a clean end');
  t.same(rules().filter((l) => l.includes(`:${peer.port}`)), [], 'no rule left');
});


t.test('redis-server with a client connected from outside: CKPT_KILL, restart, and the client\'s next command on the same connection is answered with the data set before', { skip: needPackage('redis-server', ['redis-server', 'redis-cli']) }, async (t) => {
  const { default: net } = await import('node:net');
  const rd = fs.mkdtempSync(path.join(dir, 'redis-'));
  const port = 20000 + Math.floor(Math.random() * 20000);
  const img = path.join(rd, 'redis.img'), trigger = path.join(rd, 'trigger');
  const ckpt = CKPT.map((a) => `'${a}'`).join(' ');
  // A shell in the tree starts redis, then checkpoints it (the ckpt tool runs inside the tree) when told.
  const script = `redis-server --port ${port} --bind 127.0.0.1 --save '' --appendonly no --daemonize no >${rd}/redis.log 2>&1 & R=$!; while [ ! -e ${trigger} ]; do sleep 0.05; done; ${ckpt} checkpoint $R --kill -o ${img}; echo "checkpoint status $?"; wait`;
  const tree = runAsync([...SUPERVISE, '--', 'sh', '-c', script]);
  const client = await (async () => {
    for (let i = 0; i < 100; i++) {
      const s = await new Promise<import('node:net').Socket | null>((res) => {
        const c = net.connect(port, '127.0.0.1');
        c.once('connect', () => res(c));
        c.once('error', () => res(null));
      });
      if (s) return s;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('redis did not start');
  })();
  let got = '', trouble = '';
  client.on('data', (d) => (got += d));
  client.on('error', (e) => (trouble += `error ${e.message} `));
  client.on('end', () => (trouble += 'end '));
  const answer = async (cmd: string, want: string) => {
    got = '';
    client.write(cmd);
    for (let i = 0; i < 1200 && !got.includes(want); i++) await new Promise((r) => setTimeout(r, 25)); // its retransmission timer backed off while redis was down
    return got;
  };
  t.equal(await answer('SET greeting "kept across a restart"\r\n', '+OK'), '+OK\r\n', 'SET answered before the checkpoint');
  fs.writeFileSync(trigger, '');
  const first = await tree;
  t.match(first.out, /checkpoint status 0/, first.out);
  t.equal(trouble, '', 'the client saw no reset and no end while redis was down');
  const restarted = runAsync([...SUPERVISE, '--', ...CKPT, 'restart', '-i', img]);
  t.equal(await answer('GET greeting\r\n', 'restart\r\n'), '$21\r\nkept across a restart\r\n', 'the same connection: GET answered with the value set before');
  t.equal(await answer('INCR counter\r\n', ':1'), ':1\r\n', 'and it goes on');
  client.write('SHUTDOWN NOSAVE\r\n');
  const r = await restarted;
  t.equal(r.status, 0, r.out);
  t.match(trouble, /^end $/, 'the client sees the end only when redis shuts down');
  client.destroy();
  t.same(rules().filter((l) => l.includes(`:${port}`)), [], 'no rule left');
});

t.test('a port taken at restart is EBUSY; once free, the listener comes back on it', async (t) => {
  const { default: net } = await import('node:net');
  const port = 20000 + Math.floor(Math.random() * 20000);
  const img = path.join(dir, 'listen.img');
  const first = supervise([fixture('tcp'), 'listen', String(port), img]);
  t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
  const holder = net.createServer();
  await new Promise<void>((res) => holder.listen(port, '127.0.0.1', () => res()));
  const busy = restart(img);
  t.not(busy.status, 0, 'refused');
  t.match(busy.stderr, new RegExp(`EBUSY: restart:tcp bind: task \\d+: fd \\d+ \\(TCP port ${port}\\): 127\\.0\\.0\\.1 port ${port} is in use`), 'EBUSY naming the port');
  await new Promise<void>((res) => holder.close(() => res()));
  const ok = restart(img);
  t.match(ok.stdout, /LISTEN OK/, ok.stdout + ok.stderr);

});

t.test('a port the restarting caller could not bind itself (below 1024, no CAP_NET_BIND_SERVICE) is EPERM', async (t) => {
  // Port 80, bound with CAP_NET_BIND_SERVICE (ambient) by uid 65534, which then drops it: the image asks for no capability.
  const pdir = fs.mkdtempSync('/tmp/ckpt-tcppriv-'); // reachable by uid 65534
  fs.chmodSync(pdir, 0o777);
  const pimg = path.join(pdir, 'priv.img');
  const held = supervise(['setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups', '--inh-caps', '+net_bind_service', '--ambient-caps', '+net_bind_service', fixture('tcp'), 'listen', '80', pimg]);
  if (!/listening on 80/.test(held.stdout)) {
    t.comment(`skipped: port 80 could not be had (${held.stdout.trim()} ${held.stderr.trim()})`);
    return;
  }
  t.equal(held.status, 137, 'checkpointed and killed');
  // The restarter: root (it may give the image's uid and choose pids) with every capability but CAP_NET_BIND_SERVICE.
  const bnd = fs.readFileSync('/proc/self/status', 'utf8').match(/^CapBnd:\s*([0-9a-f]+)$/m)![1];
  const names = execFileSync('capsh', [`--decode=${bnd}`], { encoding: 'utf8' }).trim().replace(/^0x[0-9a-f]+=/, '').split(',').filter((c) => c !== 'cap_net_bind_service').join(',');
  const denied = supervise(['capsh', `--inh=${names}`, '--secbits=1', `--addamb=${names}`, '--', '-c', `exec ${CKPT.map((a) => `'${a}'`).join(' ')} restart -i '${pimg}'`]);
  t.not(denied.status, 0, 'refused');
  t.match(denied.stderr, /EPERM: restart:tcp bind: task \d+: fd \d+ \(TCP port 80\): the restarting process may not bind port 80/, 'EPERM naming the port');
  t.notMatch(denied.stdout, /LISTEN OK/, 'nothing runs');
  const allowed = restart(pimg);
  t.match(allowed.stdout, /LISTEN OK/, `a caller with CAP_NET_BIND_SERVICE restarts it (${allowed.stderr.trim()})`);
  fs.rmSync(pdir, { recursive: true, force: true });
});

t.test('refused: a TCP connection also held by a process outside the subtree; EOPNOTSUPP naming it, the connection unharmed', async (t) => {
  const r = supervise([fixture('tcp'), 'shared']);
  t.match(r.stdout, /^shared: checkpoint ret=-1 errno=EOPNOTSUPP$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:tcp: task \d+: fd \d+ \(socket:\[\d+\], TCP\): also held by process \d+ outside the subtree/, 'the log names the socket and the other holder');
  t.match(r.stdout, /^ok shared: the connection works after the refusal$/m);
  t.equal(r.status, 0);
});

t.test('refused: a TCP socket with a socket filter (nothing keeps it); EOPNOTSUPP naming it', async (t) => {
  const r = supervise([fixture('tcp'), 'filter']);
  t.match(r.stdout, /^filter: checkpoint ret=-1 errno=EOPNOTSUPP$/m);
  t.match(r.stderr, /EOPNOTSUPP: checkpoint:tcp: task \d+: fd \d+ \(socket:\[\d+\], TCP\): a socket filter \(SO_ATTACH_FILTER\): not kept/, 'the log names it');
  t.equal(r.status, 0);
});
