// Terminals: a pty pair made in the tree (tty.ts), kept across a restart
// and a rollback; the fixture checks everything itself.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { bothWays, tmpdir, supervise, fixture, CKPT, q } from './helpers.js';

const dir = tmpdir('pty');
const run = bothWays(dir, 'pty');
const checks = [
  'same /dev/pts index', 'same slave name', 'still locked', 'packet mode',
  'master termios lflag', 'master termios VEOL', 'master termios speed', 'master window size',
  'output unread by the master', 'nothing more from the slave',
  'slave termios lflag', 'slave termios VEOL', 'slave termios VERASE', 'slave termios speed', 'slave termios oflag', 'slave window size',
  'locked termios', 'locked termios hold ECHO off', 'exclusive mode',
  'controlling terminal of its session \\(TIOCGSID\\)', 'foreground group', '/dev/tty opens',
  'input line 1', 'input line 2', 'input line 3', 'input line 4', 'input line 5',
  'grandchild /dev/tty opens', 'grandchild is the foreground group', "grandchild in the leader's session",
  'hung-up slave: reads EOF, writes EIO', 'unopened pty: same index, locked', 'unopened pty: no hang-up \\(its slave never opened\\)', 'unopened pty: works once unlocked',
];
for (const mode of ['restart', 'undo'] as const) {
  t.test(`a pty pair, its session and its queues across a ${mode}`, async (t) => {
    // Another pty on the machine (tests run side by side) may take the index between the checkpoint and the restart: EBUSY, tried again.
    let { first, r } = run(mode);
    for (let i = 0; i < 3 && /EBUSY: restart:tty/.test(r.stderr); i++) ({ first, r } = run(mode));
    if (mode === 'restart') t.equal(first.status, 137, `CKPT_KILL (${first.stdout.trim()} ${first.stderr.trim()})`);
    else t.match(first.stdout, /spoiled, rolling back/, 'spoiled before the rollback');
    t.notMatch(r.stdout, /^FAIL/m, r.stdout + r.stderr);
    for (const c of checks) t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    t.match(r.stdout, /pty: all good/);
    t.equal(r.status, 0);
  });
}

t.test('a rollback past the pty being closed: made again with its index, the live session leader gets its terminal back', async (t) => {
  const r = supervise([fixture('pty'), 'undo', 'closed'], { timeout: 60_000 });
  t.match(r.stdout, /spoiled, rolling back/, 'the master was closed before the rollback');
  for (const c of ['closed: the pty is back with its index', 'closed: the leader has its terminal again', 'closed: it writes to it', 'closed: the master reads what the leader wrote']) {
    t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
  }
  t.match(r.stdout, /pty closed: all good/, r.stdout + r.stderr);
  t.equal(r.status, 0);
});

// script (util-linux) waits in poll() with every signal blocked: after a
// restart the call must go on (it died on an EINTR there before).
t.test('script checkpointed with --kill from inside and restarted goes on to its end', { skip: fs.existsSync('/usr/bin/script') ? false : 'no /usr/bin/script' }, async (t) => {
  const dir = tmpdir('script'), out = path.join(dir, 'typescript'), img = path.join(dir, 'script.img');
  const ck = CKPT.map(q).join(' ');
  const r = supervise(['sh', '-c', `script -qfc 'for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done' ${q(out)} > /dev/null & p=$!; sleep 2.5; ` +
    `${ck} checkpoint $p -o ${q(img)} --kill; echo "ck=$?"; ${ck} restart -i ${q(img)} > /dev/null; echo "rs=$?"`], { timeout: 60_000 });
  t.match(r.stdout, /^ck=0$/m, 'checkpointed and killed');
  t.match(r.stdout, /^rs=0$/m, 'restarted, and script ended with status 0');
  const text = fs.readFileSync(out, 'utf8').replace(/\r/g, '');
  t.same(text.match(/^tick \d$/gm), ['tick 1', 'tick 2', 'tick 3', 'tick 4', 'tick 5', 'tick 6'], 'every tick once, in order');
  t.match(text, /COMMAND_EXIT_CODE="0"/, 'its command ended normally');
});
