/** Reading an image for people (`ckpt inspect`), in the spirit of CRIU's crit. */
import { describeNetSock } from '../syscalls/resources/netdgram.js';
import { ImageReader, REC, parseJson, splitPages, splitShm, type ImageHeader } from '../lib/image.js';
import { FdSource } from '../lib/stream.js';
import type { ProcessState, TreeState } from '../syscalls/state.js';
import { describeOwner } from '../syscalls/resources/fown.js';
import { describeLocks } from '../syscalls/resources/locks.js';
import { describeNotify } from '../syscalls/resources/notify.js';
import { describeTcp } from '../syscalls/resources/tcp.js';

export interface ImageDescription {
  header: ImageHeader;
  processes: (Omit<ProcessState, 'threads'> & { threads: { tid: number; rip: string; rsp: string; filters: number }[]; pageBytes: number })[];
  zombies: TreeState['zombies'];
  files: TreeState['files'];
  shm: TreeState['shm'];
  sysvipc?: TreeState['sysvipc'];
  shmBytes: number;
  bytes: number;
}

export function describeImage(fd: number): ImageDescription {
  const source = new FdSource(fd);
  const reader = new ImageReader(source);
  const header = reader.header();
  const tree = parseJson<TreeState>(reader.expect(REC.TREE).payload, 'TREE');
  const processes: ImageDescription['processes'] = tree.processes.map((p) => ({
    ...p,
    threads: p.threads.map((t) => {
      const regs = Buffer.from(t.regs, 'base64');
      return { tid: t.tid, rip: '0x' + regs.readBigUInt64LE(16 * 8).toString(16), rsp: '0x' + regs.readBigUInt64LE(19 * 8).toString(16), filters: t.seccomp?.length ?? 0 };
    }),
    pageBytes: 0,
  }));
  let cur: ImageDescription['processes'][number] | undefined;
  let shmBytes = 0;
  for (let rec = reader.next(); rec; rec = reader.next()) {
    if (rec.type === REC.MEMORY) {
      const { pid } = parseJson<{ pid: number }>(rec.payload, 'MEMORY');
      cur = processes.find((p) => p.ids.pid === pid);
    } else if (rec.type === REC.PAGES && cur) cur.pageBytes += splitPages(rec.payload).data.length;
    else if (rec.type === REC.SHM) shmBytes += splitShm(rec.payload).data.length;
  }
  return { header, processes, zombies: tree.zombies, files: tree.files, shm: tree.shm.map((o) => ({ ...o })), sysvipc: tree.sysvipc, shmBytes, bytes: source.bytes };
}

const size = (n: number) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);
const PROT = (p: number) => `${p & 1 ? 'r' : '-'}${p & 2 ? 'w' : '-'}${p & 4 ? 'x' : '-'}`;

export function formatDescription(d: ImageDescription): string {
  const h = d.header;
  const out = [
    `ckpt image v${h.version} ${h.arch}, crid ${h.crid}, created ${h.created}, kernel ${h.kernel}, ${size(d.bytes)}`,
  ];
  for (const p of d.processes) {
    out.push(`process ${p.ids.pid} (${p.ids.comm}) ppid ${p.ids.ppid} pgid ${p.ids.pgid} sid ${p.ids.sid} uid ${p.creds.uid[0]} exe ${p.mm.exe}`);
    out.push(`  threads: ${p.threads.map((t) => `${t.tid} rip ${t.rip} rsp ${t.rsp}${t.filters ? ` (${t.filters} seccomp filter${t.filters > 1 ? 's' : ''} of its own)` : ''}`).join('; ')}`);
    const ITIMER = ['ITIMER_REAL', 'ITIMER_VIRTUAL', 'ITIMER_PROF'];
    for (const it of p.timers?.itimers ?? []) out.push(`  ${ITIMER[it.which]}: ${it.left[0]}.${it.left[1].padStart(6, '0')} s left, every ${it.interval[0]}.${it.interval[1].padStart(6, '0')} s`);
    for (const x of p.timers?.posix ?? []) out.push(`  timer ${x.id}: clock ${x.clock}, ${x.notify === 'none' ? 'no signal' : `signal ${x.signo}${x.notify === 'thread' ? ` to thread ${p.threads[x.thread ?? 0]?.tid}` : ''}`}, value 0x${x.value.replace(/^0+(?=.)/, '')}, ${x.left[0]}.${x.left[1].padStart(9, '0')} s left, every ${x.interval[0]}.${x.interval[1].padStart(9, '0')} s`);
    for (const a of p.aio ?? []) out.push(`  AIO context ${a.addr}: ring of ${a.nr} events, head ${a.head}, tail ${a.tail} (${(a.tail - a.head + a.nr) % a.nr} completed, not reaped)`);
    out.push(`  memory: ${p.memory.length} mappings, ${size(p.pageBytes)} of page data`);
    for (const v of p.memory) {
      const len = Number(BigInt(v.end) - BigInt(v.start));
      out.push(`    ${v.start}-${v.end} ${PROT(v.prot)}${v.shared ? 's' : 'p'} ${size(len).padStart(10)} ${String(v.pages * 4096 ? size(v.pages * 4096) + ' saved' : '').padStart(16)}  ${v.path ?? v.name ?? ''}`);
    }
    out.push(`  cwd ${p.files.cwd}, umask ${p.files.umask.toString(8).padStart(4, '0')}${p.files.filesOf !== undefined ? `, descriptors: the table of process ${p.files.filesOf} (shared, CLONE_FILES)` : ''}`);
    for (const f of p.files.fds) {
      out.push(`    fd ${f.fd}${f.cloexec ? ' (cloexec)' : ''}: ${'outside' in f ? "outside the tree (connected to the restarter's fd)" : describeDesc(d.files, f.desc)}`);
    }
    for (const u of p.semUndo ?? []) out.push(`  SEM_UNDO adjustments of semaphore set ${u.id}: ${u.adj.map(([n, a]) => `#${n} ${a > 0 ? '+' : ''}${a}`).join(', ')}`);
    const sigs = Object.keys(p.signals);
    if (sigs.length) out.push(`  signal handlers: ${sigs.join(', ')}`);
  }
  for (const o of d.shm) out.push(o.key.startsWith('ghost:') ? `deleted file contents ${o.name}, ${size(o.size)}` : `shared memory object ${o.key} (${o.name}), ${size(o.size)}${o.mode !== undefined ? `, mode 0${o.mode.toString(8)}` : ''}${o.seals ? `, seals 0x${o.seals.toString(16)}` : ''}`);
  if (d.shm.length) out.push(`  ${size(d.shmBytes)} of shared memory and deleted file data`);
  const owner = (o: { key: number; id: number; uid: number; gid: number; mode: number }) => `id ${o.id} key 0x${(o.key >>> 0).toString(16).padStart(8, '0')}, uid ${o.uid} gid ${o.gid} mode 0${o.mode.toString(8)}`;
  for (const o of d.sysvipc?.shm ?? []) out.push(`SysV shm segment ${owner(o)}, ${size(o.size)}${o.removed ? ', removed (IPC_RMID) while attached' : ''}`);
  for (const o of d.sysvipc?.sem ?? []) out.push(`SysV semaphore set ${owner(o)}, values ${o.values.join(' ')}`);
  for (const o of d.sysvipc?.msg ?? []) out.push(`SysV message queue ${owner(o)}, ${o.messages.length} messages (types ${[...new Set(o.messages.map((m) => m.type))].join(', ') || '-'}), byte limit ${o.qbytes}`);
  for (const z of d.zombies) out.push(`zombie ${z.pid} (child of ${z.ppid}), wait status ${z.status}`);
  return out.join('\n') + '\n';
}

function describeDesc(files: TreeState['files'], id: number): string {
  return describeKind(files, id) + describeOwner(files, id) + describeLocks(files, id);
}

function describeKind(files: TreeState['files'], id: number): string {
  const d = files.descs[id];
  if (!d) return '?';
  if (d.kind === 'path') return `${d.path} pos ${d.pos} flags 0${d.flags.toString(8)}`;
  if (d.kind === 'fifo') return `fifo ${d.path}${d.deleted ? ' (deleted)' : ''} (${Buffer.from(d.data, 'base64').length} bytes unread)`;
  const type = (t: number) => ['', 'stream', 'dgram', '', '', 'seqpacket'][t] ?? String(t);
  const shown = (n: string) => (n.startsWith('\0') ? '@' + n.slice(1) : n.replace(/\0$/, ''));
  const named = (n?: string) => (n === undefined ? '' : ` named ${shown(n)}`);
  const flying = (f: { end: number; descs: number[] }[] | undefined, end: number) => {
    const n = (f ?? []).filter((x) => x.end === end).reduce((a, x) => a + x.descs.length, 0);
    return n ? `, ${n} descriptors in flight` : '';
  };
  const shut = (how?: number) => (how ? `; shut down for ${['', 'reading', 'writing', 'reading and writing'][how & 3]}` : '');
  if (d.kind === 'unix') {
    const p = files.socks[d.pair];
    const q = p.queues[d.end].map((m) => Buffer.from(m, 'base64').length);
    return `unix socket pair #${d.pair} end ${d.end}${named(p.names?.[d.end].name)} (${type(p.type)}; ${q.length} queued, ${q.reduce((a, b) => a + b, 0)} bytes${flying(p.inflight, d.end)}${shut(p.shutdown?.[d.end])})`;
  }
  if (d.kind === 'usock') {
    const q = (d.queue ?? []).map((m) => Buffer.from(m, 'base64').length);
    const state = d.backlog !== undefined ? `listening, backlog ${d.backlog}${d.waiting ? `, ${d.waiting.length} connections not yet accepted` : ''}`
      : d.pendingOn !== undefined ? `waiting to be accepted by description ${d.pendingOn}`
      : d.peerGone ? 'its peer gone'
      : d.connectTo !== undefined ? `connected to ${shown(d.connectTo)}` : 'not connected';
    const files = (d.inflight ?? []).reduce((a, x) => a + x.descs.length, 0);
    const gone = d.name !== undefined && !d.name.startsWith('\0') && d.fileThere === false ? ', its file unlinked' : '';
    return `unix socket${named(d.name)}${gone} (${type(d.type)}; ${state}${q.length ? `, ${q.length} queued` : ''}${files ? `, ${files} descriptors in flight` : ''}${shut(d.shutdown)})`;
  }
  if (d.kind === 'event') {
    const e = d.ev;
    if (e.kind === 'eventfd') return `eventfd, count ${BigInt('0x' + e.count)}${e.semaphore ? ', semaphore' : ''}`;
    if (e.kind === 'signalfd') return `signalfd, mask ${e.mask}`;
    if (e.kind === 'timerfd') return `timerfd on clock ${e.clock}, ${e.left[0]}.${e.left[1].padStart(9, '0')} s left, every ${e.interval[0]}.${e.interval[1].padStart(9, '0')} s, ${e.ticks} expirations unread`;
    return `epoll watching ${e.watches.map((w) => `fd ${w.fd} (events 0x${w.events.toString(16)}${w.desc !== undefined ? `; its file no longer there: ${describeDesc(files, w.desc)}` : ''})`).join(', ') || 'nothing'}`;
  }
  if (d.kind === 'notify') return describeNotify(d.nt);
  if (d.kind === 'ghost') return `deleted file ${d.path} (contents kept) pos ${d.pos} flags 0${d.flags.toString(8)}`;
  if (d.kind === 'memfd') return `shared memory object ${d.shmKey} pos ${d.pos}`;
  if (d.kind === 'pidfd') return `pidfd of process ${d.pid}${d.flags & 0o200 ? ' (thread)' : ''}${d.flags & 0o4000 ? ', non-blocking' : ''}`;
  if (d.kind === 'net') return describeNetSock(d.net);
  if (d.kind === 'mqueue') return `message queue /${d.mq.name}${d.mq.deleted ? ' (unlinked)' : ''} (maxmsg ${d.mq.maxmsg}, msgsize ${d.mq.msgsize}${d.mq.messages ? `, ${d.mq.messages.length} messages` : ''}) flags 0${d.flags.toString(8)}`;
  if (d.kind === 'deldev') return `deleted device ${d.path} (${d.rdev >> 8}:${d.rdev & 0xff}, made again) mode 0${(d.mode & 0o7777).toString(8)}`;
  if (d.kind === 'deldir') return `deleted directory ${d.path} (made again empty) mode 0${d.mode.toString(8)}`;
  if (d.kind === 'tty') {
    if (d.side === 'hungup') return `hung-up pty slave (was /dev/pts/${d.pty}; its master closed)`;
    const t = files.ptys?.[d.pty];
    return `pty ${d.side} of /dev/pts/${t?.index ?? '?'}${t?.session !== undefined ? `, controlling terminal of session ${t.session}` : ''}${t ? `, ${Buffer.byteLength(t.output, 'base64')} bytes unread by the master, ${t.input.lines.length} lines and ${Buffer.byteLength(t.input.rest, 'base64')} bytes unread by the slave` : ''}`;
  }
  if (d.kind === 'tcp') return describeTcp(d);
  const p = files.pipes[d.pipe];
  return `pipe #${d.pipe} ${d.end === 'r' ? 'read' : 'write'} end (${Buffer.from(p.data, 'base64').length} bytes unread)`;
}
