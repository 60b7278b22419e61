// vim on the terminal outside the tree (tty.ts, and `ckpt restart`'s job
// control in tool.ts). A job-control shell (sh with set -m) in the tree runs
// vim as its foreground job on a pty the test owns; text is typed in, not
// saved; another process of the tree checkpoints vim with --kill. vim is
// restarted by `ckpt restart` in the foreground, by the same shell on the
// same terminal, or by a new supervisor on another terminal of another size.
// Keys typed after the restart (one at a time: vim must have its raw termios
// back), a window resize, ^C (a key to vim, and a SIGINT through the
// terminal to a command vim runs), /dev/tty in a child of vim, ^Z and fg,
// and at last :wq: the file holds what was typed before the checkpoint and
// after it, and the sizes vim saw. The terminals are ptys made by python3's
// pty module; vim is installed with apt-get if missing (skipped if that fails).
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { SUPERVISE, CKPT, tmpdir, q } from './helpers.js';

/**
 * Runs argv on a new pty of the given size and plays `steps`: each is
 * [what to wait for, what to do]. What to wait for: a string the terminal
 * shows (after what the previous step waited for) or seconds since the
 * previous step. What to do: null, keys to type, or `@touch PATH`,
 * `@winsize ROWSxCOLS` (TIOCSWINSZ on the master: the kernel sends SIGWINCH
 * to the foreground group), `@termios` (the terminal's termios, recorded).
 */
const DRIVE = `
import os, pty, sys, time, select, json, fcntl, termios, struct
cfg = json.loads(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.environ['TERM'] = 'xterm'
    os.execvp(cfg['argv'][0], cfg['argv'])
def winsize(s):
    r, c = map(int, s.split('x'))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', r, c, 0, 0))
winsize(cfg['winsize'])
steps, out, i, mark, t0, seen = cfg['steps'], b'', 0, 0, time.time(), []
end = time.time() + cfg['timeout']
while time.time() < end:
    if i < len(steps):
        w, s = steps[i]
        if isinstance(w, str):
            k = out.find(w.encode(), mark)
            go, nmark = k >= 0, k + len(w)
        else:
            go, nmark = time.time() - t0 >= w, len(out)
        if go:
            if s is None: pass
            elif s == '@termios':
                a = termios.tcgetattr(fd)
                seen.append({'lflag': a[3], 'icanon': bool(a[3] & termios.ICANON), 'echo': bool(a[3] & termios.ECHO)})
            elif s.startswith('@touch '): open(s[7:], 'w').close()
            elif s.startswith('@winsize '): winsize(s[9:])
            else: os.write(fd, s.encode())
            i, mark, t0 = i + 1, nmark, time.time()
    r, _, _ = select.select([fd], [], [], 0.05)
    if r:
        try:
            b = os.read(fd, 65536)
        except OSError:
            break
        if not b:
            break
        out += b
status = None
for _ in range(100):
    wp, st = os.waitpid(pid, os.WNOHANG)
    if wp:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.1)
if status is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(json.dumps({'out': out.decode(errors='replace'), 'steps': i, 'of': len(steps), 'status': status, 'termios': seen}))
`;

type Step = [string | number, string | null];
interface Session { out: string; steps: number; of: number; status: number | null; termios: { lflag: number; icanon: boolean; echo: boolean }[] }

function onTerminal(argv: string[], winsize: string, steps: Step[]): Session {
  const r = spawnSync('python3', ['-c', DRIVE, JSON.stringify({ argv, winsize, steps, timeout: 60 })], { encoding: 'utf8', timeout: 90_000 });
  if (r.status !== 0) throw new Error(`python3 driver: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const haveVim = () => spawnSync('vim', ['--version'], { encoding: 'utf8' }).status === 0;
if (!haveVim()) spawnSync('apt-get', ['install', '-y', 'vim'], { encoding: 'utf8', timeout: 300_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
const hasPython = spawnSync('python3', ['-c', 'import pty'], { encoding: 'utf8' }).status === 0;
const skip = !haveVim() ? 'vim is not installed and apt-get could not install it' : !hasPython ? 'python3 with its pty module is needed' : false;

const ckpt = CKPT.map(q).join(' ');
/** The shell of the first run: vim in the foreground, and a background job that checkpoints it with --kill once `go` exists. */
function first(dir: string): string {
  const file = path.join(dir, 'notes.txt'), img = path.join(dir, 'vim.img'), pidf = path.join(dir, 'vim.pid'), go = path.join(dir, 'go');
  return [
    'set -m',
    `( while [ ! -e ${q(go)} ]; do sleep 0.1; done; ${ckpt} checkpoint $(cat ${q(pidf)}) --kill -o ${q(img)}; echo "ck=$?" ) &`,
    `sh -c 'echo $$ > ${pidf}; exec vim -u NONE -i NONE -N -n ${file}'`,
    'echo "vim ended $?"',
    'wait',
    'stty sane', // as an interactive shell does for a job killed by a signal: the restart must set vim's termios itself
  ].join('\n');
}
/** `ckpt restart` in the foreground of a job-control shell; after ^Z the shell goes on and brings it back with fg. */
const restart = (dir: string) => [
  'echo restarting',
  `${ckpt} restart -i ${q(path.join(dir, 'vim.img'))}`,
  'echo "restart-status $?"',
  'fg',
  'echo "rs=$?"',
  "stty -a | grep -o -- '-*icanon'",
].join('\n');

const EXPR = "\x12=&columns.'x'.&lines\r"; // in insert mode: ^R = inserts the value of an expression
const before: Step[] = [['notes.txt', null], [0.5, 'ihello before'], [0.3, '\x1b'], [0.5, '@termios']];
/** After the restart, vim's window redrawn (SIGWINCH); then keys one at a time. */
const after = (resize: boolean): Step[] => [
  ['hello before', '@termios'], [0.3, 'o'], ['INSERT', 'after '], [0.2, EXPR], [0.3, '\x03'], // ^C leaves insert mode
  ...(resize ? [[0.3, '@winsize 35x120'], [0.5, `o${EXPR}`], [0.3, '\x03']] as Step[] : []),
  [0.3, ":r !sh -c ': </dev/tty && echo tty-works'\r"], ['tty-works', null],
  [0.5, ':!sleep 20\r'], [1, '\x03'], ['ENTER', '\r'], // ^C in the terminal's cooked mode: SIGINT to the foreground group
  [0.5, '\x1a'], ['restart-status', null], ['hello before', null], // ^Z: vim stops, the shell goes on; fg: vim redraws
  [0.5, ':wq\r'], ['rs=', null],
];

function common(t: Test, r: Session, termiosBefore: Session['termios'][0] | undefined) {
  t.equal(r.steps, r.of, `every step of the session happened (${r.out.slice(-3000)})`);
  t.ok(termiosBefore && !termiosBefore.icanon && !termiosBefore.echo, 'vim had the terminal in raw mode before');
  t.same(r.termios[r.termios.length - 1], termiosBefore, 'the restored vim has the termios it had (raw, no echo)');
  t.match(r.out, /Command terminated[\s\S]*Interrupt/, 'a ^C typed on the terminal interrupted the command vim ran (SIGINT to the foreground group)');
  t.match(r.out, /restart-status 148/, '^Z stopped vim, and `ckpt restart` with it: the shell went on (128 + SIGTSTP)');
  t.match(r.out, /rs=0/, 'after fg and :wq, `ckpt restart` exits as vim did');
  t.match(r.out, /^icanon\r?$/m, 'the terminal is canonical again once vim ended');
}

t.test('vim checkpointed with --kill and restarted in the foreground by the same shell on the same terminal', { skip }, async (t) => {
  const dir = tmpdir('vim');
  const script = `${first(dir)}\n${restart(dir)}`;
  const r = onTerminal([...SUPERVISE, '--', 'sh', '-c', script], '24x80', [
    ...before, [0, `@touch ${path.join(dir, 'go')}`], ['restarted as pid', null], [1, '@winsize 30x100'], ...after(false),
  ]);
  t.match(r.out, /vim ended 137/, 'vim was killed by the checkpoint');
  t.match(r.out, /ck=0/, 'the checkpoint succeeded');
  common(t, r, r.termios[0]);
  t.equal(r.status, 0, 'the supervisor exits 0');
  const text = fs.existsSync(path.join(dir, 'notes.txt')) ? fs.readFileSync(path.join(dir, 'notes.txt'), 'utf8') : '';
  t.equal(text, 'hello before\nafter 100x30\ntty-works\n', 'the file holds the text typed before the checkpoint, the text typed after, the new window size vim saw, and /dev/tty opened in its child');
});

t.test('vim restarted by a new supervisor on another terminal of another size', { skip }, async (t) => {
  const dir = tmpdir('vim2');
  const one = onTerminal([...SUPERVISE, '--', 'sh', '-c', first(dir)], '24x80', [...before, [0, `@touch ${path.join(dir, 'go')}`], ['ck=', null]]);
  t.match(one.out, /vim ended 137/, `vim was killed by the checkpoint (${one.out.slice(-1000)})`);
  t.match(one.out, /ck=0/, 'the checkpoint succeeded');
  const r = onTerminal([...SUPERVISE, '--', 'sh', '-c', `set -m\n${restart(dir)}`], '30x100', after(true));
  common(t, r, one.termios[0]);
  t.equal(r.status, 0, 'the supervisor exits 0');
  const text = fs.existsSync(path.join(dir, 'notes.txt')) ? fs.readFileSync(path.join(dir, 'notes.txt'), 'utf8') : '';
  t.equal(text, 'hello before\nafter 100x30\n120x35\ntty-works\n', "the file holds the text typed on both terminals, the new terminal's size (seen at the restart) and the size after a resize");
});
