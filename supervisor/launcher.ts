/**
 * The first process of a supervised tree (spawned by supervisor/spawn.ts).
 * It makes itself traceable the way the supervisor needs, then becomes the
 * program: NO_NEW_PRIVS, the seccomp filter, SIGSTOP (the supervisor seizes
 * it while stopped), execvp. argv: node launcher.js PROG ARGS...
 */
import fs from 'node:fs';
import { sys, addressOf } from '../lib/libc.js';
import { buildTrapFilter } from '../lib/seccomp.js';
import { NR_FIRST, NR_LAST } from '../syscalls/abi.js';

const PR_SET_NO_NEW_PRIVS = 38, PR_SET_SECCOMP = 22, SECCOMP_MODE_FILTER = 2;
const F_GETFD = 1, F_SETFD = 2;
const SIGSTOP = 19;

const [prog, ...args] = process.argv.slice(2);
if (!prog) {
  process.stderr.write('ckpt launcher: no program\n');
  process.exit(127);
}

// Node marks its own stdio close-on-exec; the program must inherit them.
for (let fd = 0; fd <= 2; fd++) {
  const f = sys.fcntl(fd, F_GETFD);
  if (f >= 0) sys.fcntl(fd, F_SETFD, f & ~1);
}
// Node ignores SIGPIPE, and ignored signals survive execve: undo that, and
// any signal mask, so the program starts as it would from a shell.
for (const sig of [1, 2, 3, 13, 15]) sys.signalDefault(sig);

const filter = buildTrapFilter(NR_FIRST, NR_LAST);
const fprog = Buffer.alloc(16);
fprog.writeUInt16LE(filter.length / 8, 0);
fprog.writeBigUInt64LE(addressOf(filter), 8);
if (sys.prctl(PR_SET_NO_NEW_PRIVS, 1) !== 0 || sys.prctlBuf(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog) !== 0) {
  process.stderr.write('ckpt launcher: cannot install the seccomp filter\n');
  process.exit(126);
}
sys.kill(process.pid, SIGSTOP);
sys.unblockAllSignals();
sys.execvp(prog, [prog, ...args]);
fs.writeSync(2, `ckpt-supervise: cannot run ${prog}: ${fs.existsSync(prog) ? 'not executable' : 'not found'}\n`);
process.exit(127);
