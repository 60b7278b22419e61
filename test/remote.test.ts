// The remote-syscall and freeze/thaw layers, driven in-process on a real tracee.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { launch } from '../supervisor/spawn.js';
import { Tracer } from '../supervisor/tracer.js';
import { Freeze } from '../supervisor/freeze.js';
import { Remote } from '../supervisor/remote.js';
import { getRegs } from '../lib/ptrace.js';
import { SYS } from '../lib/libc.js';
import { readMaps } from '../lib/proc.js';
import { pickGadget, installGadget, GADGET_SIZE } from '../syscalls/resources/memory.js';
import { CkptError } from '../lib/errors.js';
import { fixture, tmpdir, q } from './helpers.js';

const state = (pid: number) => { const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8'); return s[s.lastIndexOf(')') + 2]; };
const maps = (pid: number) => fs.readFileSync(`/proc/${pid}/maps`, 'utf8');

t.test('freeze, inject syscalls, put everything back, thaw', async (t) => {
  const out = path.join(tmpdir('remote'), 'out');
  const tracer = new Tracer(() => { throw new Error('no ckpt calls expected'); });
  const pid = launch(tracer, '/bin/sh', ['-c', `exec ${q(fixture('counter'))} 6 100 > ${q(out)}`]);
  // Let it exec and get into its sleeping loop.
  t.ok(tracer.runUntil(() => fs.existsSync(out) && fs.readFileSync(out, 'utf8').includes('step 1'), 10_000), 'counter runs under the tracer');

  const freeze = new Freeze(tracer);
  freeze.add([pid]);
  t.equal(state(pid), 't', 'frozen: in a tracing stop');
  const task = tracer.tasks.get(pid)!;
  const regsBefore = getRegs(pid).buf;
  const mapsBefore = maps(pid);

  const r = new Remote(tracer, task);
  t.equal(r.call(SYS.getpid), BigInt(pid), 'getpid() run inside the tracee returns its pid');
  const scratch = r.scratch();
  t.ok(maps(pid).includes(scratch.toString(16)), 'scratch page mapped in the tracee');
  r.mem.write(scratch, Buffer.from('hello tracee'));
  t.equal(r.mem.read(scratch, 12).toString(), 'hello tracee', 'scratch memory round trip');
  t.equal(r.call(SYS.close, 9999), -9n, 'a failing injected syscall reports -EBADF');
  t.throws(() => r.check('test', SYS.close, 9999), new CkptError(9, 'test', `task ${pid}: injected syscall 3 failed`), 'check() throws with the errno');
  // The restore gadget's batch loop: many syscalls for one resume.
  const gadget = pickGadget(readMaps(pid), []);
  installGadget(r, gadget);
  const ppid = Number(fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[1]);
  t.same(r.batch([[SYS.getpid], [SYS.close, 9999], [SYS.getppid]]), [BigInt(pid), -9n, BigInt(ppid)], 'a batch runs each syscall and returns each result');
  const many = r.batch(Array.from({ length: 300 }, () => [SYS.getpid]));
  t.ok(many.length === 300 && many.every((x) => x === BigInt(pid)), 'batches longer than the table run in pieces');
  r.check('test', SYS.munmap, scratch, 4096); // the gadget took over as scratch: unmap the first one here
  r.check('test', SYS.munmap, gadget, GADGET_SIZE); // the last injected call: it ran from the gadget
  t.equal(maps(pid), mapsBefore, 'the gadget and the scratch page are gone again');
  r.finish();
  t.same(getRegs(pid).buf, regsBefore, 'registers are exactly as before');
  t.equal(maps(pid), mapsBefore, 'address space is exactly as before');
  t.throws(() => { const r2 = new Remote(tracer, task); r2.useSyscallAt(0x1000n); try { r2.call(SYS.getpid); } finally { r2.finish(); } }, /faulted/, 'a fault at the injection address is an error, not a loop');
  t.same(getRegs(pid).buf, regsBefore, 'and the registers are put back');
  t.equal(state(pid), 't', 'still frozen until thawed');

  freeze.thaw();
  const code = tracer.run();
  t.equal(code, 0, 'the program exits normally');
  t.match(fs.readFileSync(out, 'utf8'), /done n=6 sum=right/, 'its sleep was restarted, its state intact');
  const steps = fs.readFileSync(out, 'utf8').match(/^step \d+$/gm) ?? [];
  t.same(steps, [1, 2, 3, 4, 5, 6].map((i) => `step ${i}`), 'no step lost or repeated');
});
