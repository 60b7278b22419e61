// Unix sockets in the states usock.test leaves out: connections not yet
// accepted, peers that are gone, datagrams with their senders' names, names
// in directories, relative, unlinked or replaced; kept across a restart and
// a rollback (the fixture checks itself), or refused naming why.
import t from 'tap';
import path from 'node:path';
import fs from 'node:fs';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('usock2');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

/** Run `usock2 WHAT DIR IMAGE|undo` both ways; every check it names must pass. */
function bothWays(what: string, title: string, checks: string[], done: string) {
  for (const mode of ['restart', 'undo']) {
    t.test(`${title} across a ${mode}`, async (t) => {
      const img = path.join(dir, `${what}.img`);
      const work = fs.mkdtempSync(path.join(dir, `${what}-`));
      const first = supervise([fixture('usock2'), what, work, mode === 'undo' ? 'undo' : img]);
      if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
      else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
      const r = mode === 'undo' ? first : restart(img);
      for (const c of checks) t.match(r.stdout, new RegExp(`^ok ${c.replace(/[()]/g, '\\$&')}$`, 'm'), c);
      t.match(r.stdout, new RegExp(done), r.stdout.includes(done) ? done : r.stdout + r.stderr);
      t.equal(r.status, 0);
    });
  }
}

bothWays('waiting', 'listeners with connections not yet accepted (stream, one client in a child; seqpacket, abstract)', [
  'waiting: the connection accepted before keeps its queues', "waiting: the child's client still connected, sends", "waiting: an accepted connection has the listener's name",
  'waiting: accept() gives the connections in the order they were made', 'waiting: no other connection waiting',
  "waiting: a client's peer is the listener's name", 'waiting: the seqpacket connection accepted, its messages whole',
  'waiting: the listener takes new connections',
], 'WAITING OK');

bothWays('gone', 'sockets whose peer is gone (stream, seqpacket, datagram)', [
  'gone: the stream reads what its peer sent', 'gone: then EOF', 'gone: the stream cannot send (EPIPE)',
  'gone: the seqpacket reads its two messages, then EOF', 'gone: the datagram socket reads what its peer sent',
  "gone: the datagram socket's peer refuses (ECONNREFUSED)",
], 'GONE OK');

bothWays('empty', 'empty datagrams and seqpacket messages among others (a named socket, a datagram pair, a seqpacket pair)', [
  'empty: a named socket\'s datagrams, empty ones among them, in order', 'empty: a datagram pair\'s queue starting and ending with an empty datagram',
  'empty: a seqpacket pair\'s empty message between two',
], 'EMPTY OK');

bothWays('creds', 'SO_PEERCRED of a listener, of connections from a uid-1000 child (accepted, and not yet), of socketpairs made as other ids', [
  "creds: the listener's own", 'creds: the accepted connection names its client (uid 1000)', 'creds: a socketpair made while acting as uid 1234', 'creds: and its supplementary groups (SO_PEERGROUPS)', "creds: the process's own groups",
  'creds: a socketpair shared with the child', 'creds: a datagram queued on a pair says who sent it (SCM_CREDENTIALS)', 'creds: a datagram queued on a named socket says who sent it', 'creds: unix socket options (SO_RCVTIMEO, SO_SNDBUF, SO_PEEK_OFF, SO_PASSCRED)', 'creds: a connection accepted after names its client (uid 1000)', "creds: the child's sockets", "creds: the process's own ids",
], 'CREDS OK');

bothWays('dgram', 'datagrams with their senders\' names; a socketpair\'s; senders to a socket whose name and directory were removed', [
  "dgram: datagram 1, with its sender's name", "dgram: datagram 2, with its sender's name", "dgram: datagram 3, with its sender's name",
  "dgram: datagram 4, with its sender's name", "dgram: datagram 5, with its sender's name", 'dgram: the socket file a gone sender left is still there', 'dgram: nothing more queued', 'dgram: the named socket still reachable by its name',
  'dgram: an autobound socket keeps its name and what its connected senders sent', 'dgram: its senders still reach it', "dgram: a socketpair's datagrams both ways", 'dgram: three senders still connected to the socket whose name was removed',
  'dgram: it keeps its name, still removed with its directory',
], 'DGRAM OK');

bothWays('names', 'names: relative, in subdirectories with their mode, unlinked, replaced by another socket\'s', [
  'names: the cwd is the directory of the relative name', 'names: the relative name stays relative', 'names: the relative name is bound in its directory',
  "names: a name in subdirectories, its file's mode", 'names: reachable by its path', 'names: an unlinked name: still bound to it, unreachable by its path',
  'names: two sockets of one name: the path reaches the one whose file it is',
], 'NAMES OK');

bothWays('scm', 'files in flight in datagrams queued to a named socket (one held only there, one also held), a plain one between', [
  'scm: the first datagram, from an unnamed sender, carries its file', 'scm: the write end held only in flight, of the pipe the process reads',
  'scm: a plain datagram between, from its named sender', 'scm: the third carries the read end the process holds, from its named sender',
  'scm: no other write end left anywhere (EOF once it is closed)', 'scm: a seqpacket socket whose peer is gone reads its file in flight', 'scm: then EOF',
], 'SCM OK');

t.test('a unix socket connected to a process outside the subtree is refused, the log naming that process', async (t) => {
  const r = supervise([fixture('usock2'), 'outside']);
  const parent = /outside: parent (\d+)/.exec(r.stdout)?.[1];
  t.ok(parent, r.stdout);
  t.match(r.stdout, /outside: checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, new RegExp(`checkpoint:files: task \\d+: fd \\d+ \\(unix socket connected to process ${parent} \\(usock2\\), outside the subtree\\)`), 'one log line names the process, its pid and command');
  t.match(r.stdout, /outside: still works after: yes/);
  t.equal(r.status, 0);
});

t.test('a connection not yet accepted whose client sent data is refused, the program unharmed', async (t) => {
  const r = supervise([fixture('usock2'), 'refuse-sent', fs.mkdtempSync(path.join(dir, 'sent-'))]);
  t.match(r.stdout, /refuse-sent: checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, /listening unix socket \S+sent\.sock with 1 connections not yet accepted: the client socket:\[\d+\] has sent data/, 'the log line says why');
  t.match(r.stdout, /refuse-sent: still works after: yes/);
  t.equal(r.status, 0);
});

t.test('a relative name bound in a directory its holder has left is refused, the program unharmed', async (t) => {
  const r = supervise([fixture('usock2'), 'refuse-rel', fs.mkdtempSync(path.join(dir, 'rel-'))]);
  t.match(r.stdout, /refuse-rel: checkpoint ret=-1 errno=EOPNOTSUPP/);
  t.match(r.stderr, /fd \d+ \(unix socket bound to the relative name x\.sock, whose file is neither in the cwd nor in the root of its holder: bound elsewhere, or unlinked\)/, 'the log line says why');
  t.match(r.stdout, /refuse-rel: still works after: yes/);
  t.equal(r.status, 0);
});
