/** ckpt-supervise [options] -- prog args...: run prog as the root of a supervised tree (entry: cli.ts). */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { Tracer } from './tracer.js';
import { launch } from './spawn.js';
import { sys } from '../lib/libc.js';
import { Supervisor } from '../syscalls/context.js';
import { serve } from '../syscalls/table.js';
import { warmUp } from '../syscalls/checkpoint.js';
import { log, logError } from '../lib/log.js';
import { inheritedFds } from '../syscalls/resources/files.js';

// Before anything else opens a descriptor: these are what we were given.
const outsideFds = inheritedFds();

const PR_SET_CHILD_SUBREAPER = 36, PRIO_PROCESS = 0;

// Everything after "--" is the program, untouched by option parsing.
const raw = hideBin(process.argv);
const dash = raw.indexOf('--');
refuseUnknownOptions(dash < 0 ? raw : raw.slice(0, dash));
const argv = yargs(dash < 0 ? raw : raw.slice(0, dash))
  .scriptName('ckpt-supervise')
  .usage('$0 [options] -- prog [args...]\n\nRun prog as the root of a supervised tree that may call the ckpt system calls.')
  .option('max-checkpoints', { type: 'number', default: 64, describe: 'cap on live in-memory checkpoints' })
  .option('track-dirty', { type: 'boolean', default: true, describe: 'track written pages (userfaultfd) so that undo copies only them; --no-track-dirty compares page frames instead' })
  .option('warm-up', { type: 'boolean', default: true, describe: 'checkpoint the launcher into /dev/null before the program starts (about 40 ms), so that the first checkpoint is not slowed by cold code; --no-warm-up skips it' })
  .option('pidns', { type: 'boolean', default: false, describe: 'run the tree in a new pid namespace under a minimal init (pid 1), so that a restart always gets its pids' })
  .parserConfiguration({ 'halt-at-non-option': true })
  .strict(false)
  .help()
  .parseSync();

const cmd = dash < 0 ? raw.slice(raw.length - argv._.length) : raw.slice(dash + 1);
if (cmd.length === 0) {
  logError('no program given (usage: ckpt-supervise [options] -- prog args...)');
  process.exit(2);
}

// Orphans of the tree come to us, so that their exits are reaped.
sys.prctl(PR_SET_CHILD_SUBREAPER, 1);
const sv: Supervisor = new Supervisor(new Tracer((tracer, task) => serve(sv, tracer, task)), {
  maxCheckpoints: argv['max-checkpoints'],
  trackDirty: argv['track-dirty'],
  outsideFds,
});
try {
  launch(sv.tracer, cmd[0], cmd.slice(1), argv.pidns, (launcher) => {
    if (!argv['warm-up']) return;
    try {
      warmUp(sv, launcher);
    } catch (e) {
      log.syscall('warm-up checkpoint of the launcher failed: %s', (e as Error).message);
    }
  });
} catch (e) {
  logError(`cannot start ${cmd[0]}: ${(e as Error).message}`);
  process.exit(127);
}
// A terminal's ^C and ^\ go to the whole foreground group: the tree decides
// what they mean, the supervisor outlives them. Also: the freeze window is
// shorter at a higher priority (only this thread does the tracing).
sys.signalIgnore(2);
sys.signalIgnore(3);
sys.setpriority(PRIO_PROCESS, 0, -10);
sv.io.warm(); // the first call in flight does not wait for a worker to start
process.exit(sv.tracer.run());

/**
 * An option of ours misspelled would otherwise be taken for the program's
 * start (or ignored) and the program run without it: refused, with the
 * nearest option named. Options end at the program's name (or at "--").
 */
function refuseUnknownOptions(args: string[]): void {
  const known = ['max-checkpoints', 'track-dirty', 'warm-up', 'pidns', 'help', 'version'];
  const takesValue = new Set(['max-checkpoints']);
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (!a.startsWith('-')) return; // the program
    const name = a.replace(/^--?/, '').replace(/=.*$/, '').replace(/^no-/, '');
    if (known.includes(name)) {
      if (takesValue.has(name) && !a.includes('=')) i++;
      continue;
    }
    const near = known.map((k) => ({ k, d: editDistance(name, k) })).sort((x, y) => x.d - y.d)[0];
    const hint = near && near.d <= Math.max(2, Math.floor(near.k.length / 3)) ? `; did you mean --${near.k}?` : '';
    logError(`unknown option ${a}${hint} (usage: ckpt-supervise [options] -- prog args...; see --help)`);
    process.exit(2);
  }
}

/** Levenshtein distance, for the hint. */
function editDistance(a: string, b: string): number {
  let prev = [...Array(b.length + 1).keys()];
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length];
}
