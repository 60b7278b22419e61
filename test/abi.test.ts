// The C header and the TypeScript constants are one contract: they must agree.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { NR, CKPT } from '../syscalls/abi.js';
import { ROOT } from './helpers.js';

const header = fs.readFileSync(path.join(ROOT, 'syscalls/ckpt.h'), 'utf8');
const defines = new Map<string, number>();
for (const m of header.matchAll(/^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)(?:UL?)?\b/gm)) defines.set(m[1], Number(m[2]));

t.test('syscall numbers agree', async (t) => {
  for (const [name, nr] of Object.entries(NR)) t.equal(defines.get(`__NR_${name}`), nr, name);
  t.equal([...defines.keys()].filter((k) => k.startsWith('__NR_')).length, Object.keys(NR).length, 'no extra numbers in the header');
});

t.test('flags agree', async (t) => {
  for (const [name, v] of Object.entries(CKPT)) t.equal(defines.get(`CKPT_${name}`), v, name);
  t.equal([...defines.keys()].filter((k) => k.startsWith('CKPT_')).length, Object.keys(CKPT).length, 'no extra flags in the header');
});

t.test('numbers are the ABI.md ones', async (t) => {
  t.same(NR, { checkpoint: 1000, restart: 1001, ckpt_writeback: 1002, ckpt_release: 1003, ckpt_query: 1004 });
  t.same(CKPT, { DEFER: 1, KEEP: 2, KILL: 4, HANDLE: 8 });
});

t.test('every call has an inline wrapper', async (t) => {
  for (const name of ['ckpt_checkpoint', 'ckpt_restart', 'ckpt_writeback', 'ckpt_release', 'ckpt_query']) {
    t.match(header, new RegExp(`static inline long ${name}\\(`), name);
  }
});
