// The terminal outside the tree (tty.ts): a foreground job in a process
// group of its own, with raw-ish termios, checkpointed with CKPT_KILL on one
// terminal and restarted by `ckpt restart` on another: it gets the terminal
// back (termios, foreground group, /dev/tty), a ^C typed there reaches it,
// and when it ends the shell finds its terminal as it left it. Terminals are
// ptys made by python3's pty module.
import t from 'tap';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { SUPERVISE, CKPT, fixture, tmpdir } from './helpers.js';

const DRIVE = `
import os, pty, sys, time, json, select
def drive(argv, until=None, send=None, timeout=60):
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    out, sent, end = b'', False, time.time() + timeout
    while time.time() < end:
        if until and not sent and until.encode() in out:
            os.write(fd, send.encode())
            sent = True
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                b = os.read(fd, 4096)
            except OSError:
                break
            if not b:
                break
            out += b
    _, st = os.waitpid(pid, 0)
    return {'out': out.decode(errors='replace'), 'status': os.waitstatus_to_exitcode(st)}
args = json.loads(sys.argv[1])
print(json.dumps(drive(*args)))
`;

function onTerminal(argv: string[], until?: string, send?: string): { out: string; status: number } {
  const r = spawnSync('python3', ['-c', DRIVE, JSON.stringify([argv, until ?? null, send ?? null])], { encoding: 'utf8', timeout: 90_000 });
  if (r.status !== 0) throw new Error(`python3 driver: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const hasPython = spawnSync('python3', ['-c', 'import pty'], { encoding: 'utf8' }).status === 0;

t.test('a foreground job with raw termios, restarted on another terminal', { skip: hasPython ? false : 'python3 with its pty module is needed' }, async (t) => {
  const img = path.join(tmpdir('terminal'), 'termfg.img');
  const first = onTerminal([...SUPERVISE, '--', fixture('termfg'), img]);
  t.match(first.out, /termfg: fg yes, checkpointing/, 'the job is the foreground group before');
  t.equal(first.status, 137, first.out);
  // `stty` after `ckpt restart`, in the same session: the terminal as the shell left it.
  const shell = `${CKPT.map((x) => `'${x}'`).join(' ')} restart -i '${img}'; echo "restart status $?"; stty -a | grep -o -- '-*icanon'; stty -a | grep -o -- ' -*echo '`;
  const r = onTerminal([...SUPERVISE, '--', 'sh', '-c', shell], 'ready', '\x03');
  t.match(r.out, /termfg: back: raw termios yes/, `its termios are set on the new terminal (${r.out})`);
  t.match(r.out, /foreground yes/, 'its process group is the foreground group');
  t.match(r.out, /\/dev\/tty yes/, '/dev/tty opens');
  t.match(r.out, /termfg: SIGINT received/, 'a ^C typed on the terminal reaches it');
  t.match(r.out, /restart status 0/, 'ckpt restart exits as the job did');
  t.match(r.out, /^icanon\r?$/m, 'the terminal is canonical again once the job ended');
  t.match(r.out, /^ echo \r?$/m, 'and echoes again');
  t.equal(r.status, 0);
});

// An interactive shell's job control around `ckpt restart`: ^Z stops the
// restored job and gives the shell its terminal back; fg gives the job the
// terminal again; a ^C then reaches it.
const JOBS = `
import os, pty, sys, time, select, json
cmd, = json.loads(sys.argv[1])
steps = [('$ ', cmd + '\\n'), ('ready', '\\x1a'), ('Stopped', 'echo shell-is-back\\n'), ('shell-is-back\\r\\n', 'fg\\n'),
         ('WAIT', '\\x03'), ('SIGINT', None), ('$ ', 'exit\\n')]
pid, fd = pty.fork()
if pid == 0:
    os.environ['PS1'] = '$ '
    os.execvp('bash', ['bash', '--norc', '--noprofile', '-i'])
out, i, end, mark, t0 = b'', 0, time.time() + 60, 0, None
while time.time() < end:
    if i < len(steps):
        w, s = steps[i]
        if w == 'WAIT':
            t0 = t0 or time.time()
            if time.time() - t0 > 1.5:
                os.write(fd, s.encode()); i += 1; mark = len(out)
        elif w.encode() in out[mark:]:
            if s: os.write(fd, s.encode())
            i += 1; mark = len(out)
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            b = os.read(fd, 4096)
        except OSError:
            break
        if not b:
            break
        out += b
os.waitpid(pid, 0)
print(json.dumps({'out': out.decode(errors='replace'), 'steps': i, 'of': len(steps)}))
`;
const hasBash = spawnSync('bash', ['-c', 'true']).status === 0;

t.test('job control of an interactive shell around ckpt restart: ^Z, fg, ^C', { skip: hasPython && hasBash ? false : 'python3 and bash are needed' }, async (t) => {
  const img = path.join(tmpdir('terminal-jobs'), 'termfg.img');
  const first = onTerminal([...SUPERVISE, '--', fixture('termfg'), img]);
  t.equal(first.status, 137, first.out);
  const cmd = [...SUPERVISE, '--', ...CKPT, 'restart', '-i', img].map((x) => `'${x}'`).join(' ');
  const r = spawnSync('python3', ['-c', JOBS, JSON.stringify([cmd])], { encoding: 'utf8', timeout: 90_000 });
  const o = JSON.parse(r.stdout) as { out: string; steps: number; of: number };
  t.match(o.out, /termfg: back: raw termios yes, foreground yes/, `restored in the foreground (${o.out})`);
  t.match(o.out, /Stopped/, '^Z stops the job: the shell says so');
  t.match(o.out, /^shell-is-back\r?$/m, 'and has its terminal back');
  t.match(o.out, /termfg: SIGINT received/, 'after fg, a ^C reaches the restored job');
  t.equal(o.steps, o.of, 'every step of the session happened');
});
