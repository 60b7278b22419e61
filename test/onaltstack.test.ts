// A thread inside a signal handler on its alternate stack at the checkpoint.
import t from 'tap';
import path from 'node:path';
import { supervise, fixture, CKPT, tmpdir } from './helpers.js';

const dir = tmpdir('onaltstack');
const restart = (img: string) => supervise([...CKPT, 'restart', '-i', img]);

for (const mode of ['restart', 'undo', 'undo-in']) {
  t.test(`a thread inside a signal handler on its alternate stack at the checkpoint, across a ${mode}`, async (t) => {
    const img = path.join(dir, 'onaltstack.img');
    const first = supervise([fixture('onaltstack'), mode === 'restart' ? img : mode], { timeout: 60_000 });
    const r = mode === 'restart' ? restart(img) : first;
    if (mode === 'restart') t.equal(first.status, 137, 'CKPT_KILL');
    else if (mode === 'undo') t.match(first.stdout, /the handler returned before the rollback/, 'the handler had returned when the rollback came');
    else t.match(first.stdout, /still in the handler at the rollback/, 'the thread was still on its alternate stack when the rollback came');
    for (const c of ['the thread is inside its handler again', 'the handler runs on the alternate stack and returns', 'the thread goes on where the signal took it']) {
      t.match(r.stdout, new RegExp(`^ok ${c}$`, 'm'), c);
    }
    t.match(r.stdout, /ONALTSTACK OK/);
    t.equal(r.status, 0);
  });
}
