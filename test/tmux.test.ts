// tmux checkpointed and restarted (tty.ts): the server and its pane's
// shell, each pane a pty pair made in the tree. The pane checkpoints the
// server from inside (CKPT_KILL); a new supervisor restarts it: the pane
// shows what it showed before (tmux's own screen), what the pane printed
// after the restart (through the restored pty), and keys sent to it reach
// its shell. tmux is installed with apt-get if missing (skipped if that fails).
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { SUPERVISE, CKPT, tmpdir, q } from './helpers.js';

const have = () => spawnSync('tmux', ['-V'], { encoding: 'utf8' }).status === 0;
if (!have()) spawnSync('apt-get', ['install', '-y', 'tmux'], { encoding: 'utf8', timeout: 300_000 });

t.test('a tmux server and its pane across a checkpoint, kill and restart', { skip: have() ? false : 'tmux is not installed and apt-get could not install it' }, async (t) => {
  const dir = tmpdir('tmux');
  const sock = path.join(dir, 'sock'), img = path.join(dir, 'img'), pane = path.join(dir, 'pane.sh');
  const ckpt = CKPT.map(q).join(' ');
  fs.writeFileSync(pane, `echo "pane: before, on $(tty)"\nsleep 1\n${ckpt} checkpoint $PPID --kill -o ${q(img)}\necho "pane: after the checkpoint"\nexec sh\n`);
  const tmux = `tmux -S ${q(sock)} -f /dev/null`;
  const first = spawnSync(SUPERVISE[0], [...SUPERVISE.slice(1), '--', 'sh', '-c', `${tmux} new-session -d -s t -x 80 -y 24 ${q(`sh ${pane}`)}; sleep 8; ${tmux} has-session -t t 2>/dev/null && echo "server still there"`], { encoding: 'utf8', timeout: 60_000 });
  t.notMatch(first.stdout, /server still there/, `the server was checkpointed and killed (${first.stdout} ${first.stderr})`);
  t.ok(fs.existsSync(img), 'the image was written');
  const script = [
    `${ckpt} restart -i ${q(img)} & sleep 4`,
    `${tmux} capture-pane -p -t t | grep .`,
    `${tmux} send-keys -t t 'echo typed-$((6*7))' Enter; sleep 2`,
    `${tmux} capture-pane -p -t t | grep . | sed 's/^/later: /'`,
    `${tmux} kill-server; wait`,
  ].join('\n');
  const r = spawnSync(SUPERVISE[0], [...SUPERVISE.slice(1), '--', 'sh', '-c', script], { encoding: 'utf8', timeout: 60_000 });
  t.match(r.stdout, /^pane: before, on \/dev\/pts\/\d+$/m, `the pane shows what it showed before (${r.stdout} ${r.stderr})`);
  t.match(r.stdout, /^pane: after the checkpoint$/m, 'what the pane printed after the restart came through its pty');
  t.match(r.stdout, /^later: typed-42$/m, 'keys sent to the pane reach its shell');
});
