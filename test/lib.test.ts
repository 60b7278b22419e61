// Unit tests of lib/: wait-status decoding, /proc parsing, seccomp filter, registers.
import t from 'tap';
import { decodeWaitStatus, Regs, REGS_SIZE } from '../lib/ptrace.js';
import { parseMaps, parseSmaps, parseStat, parseFdinfo } from '../lib/proc.js';
import { buildTrapFilter, evalFilter, SECCOMP_RET_ALLOW, SECCOMP_RET_TRACE, MADV_DONTFORK, MADV_WIPEONFORK, MADV_VM_STATE, SYS_LOCKS, PR_SET_PDEATHSIG, PR_SET_TIMERSLACK, PR_SET_CHILD_SUBREAPER } from '../lib/seccomp.js';
import { normalize, union, intersect, subtract, runBytes, type Runs } from '../lib/runs.js';

t.test('wait status decoding', async (t) => {
  t.same(decodeWaitStatus(5, 3 << 8), { kind: 'exited', pid: 5, code: 3 });
  t.same(decodeWaitStatus(5, 9), { kind: 'killed', pid: 5, signal: 9, core: false });
  t.same(decodeWaitStatus(5, 0x8b), { kind: 'killed', pid: 5, signal: 11, core: true });
  t.same(decodeWaitStatus(5, 0x7f | (0x85 << 8)), { kind: 'stopped', pid: 5, signal: 5, event: 0, syscallStop: true });
  t.same(decodeWaitStatus(5, 0x7f | (5 << 8) | (7 << 16)), { kind: 'stopped', pid: 5, signal: 5, event: 7, syscallStop: false });
  t.same(decodeWaitStatus(5, 0x7f | (19 << 8) | (128 << 16)), { kind: 'stopped', pid: 5, signal: 19, event: 128, syscallStop: false });
});

t.test('maps and smaps', async (t) => {
  const text = [
    '55d0c0a00000-55d0c0a01000 r--p 00000000 fe:00 1234 /usr/bin/prog name with spaces',
    '7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]',
    '7f0000000000-7f0000001000 rw-s 00001000 00:05 77 /dev/shm/x (deleted)',
    '7f0000002000-7f0000003000 ---p 00000000 00:00 0 ',
  ].join('\n');
  const m = parseMaps(text);
  t.equal(m.length, 4);
  t.equal(m[0].path, '/usr/bin/prog name with spaces');
  t.equal(m[0].start, 0x55d0c0a00000n);
  t.equal(m[1].path, '[stack]');
  t.equal(m[2].perms, 'rw-s');
  t.equal(m[2].offset, 0x1000n);
  t.equal(m[3].path, '');
  const s = parseSmaps(`${text.split('\n')[1]}\nSize: 4 kB\nVmFlags: rd wr mr mw me gd ac\n`);
  t.same(s[0].flags, ['rd', 'wr', 'mr', 'mw', 'me', 'gd', 'ac']);
});

t.test('stat with a hostile comm', async (t) => {
  const { comm, fields } = parseStat('42 (a) b (c)) S 1 42 42 0 -1');
  t.equal(comm, 'a) b (c)');
  t.equal(fields[0], 'S');
  t.equal(fields[1], '1');
});

t.test('fdinfo', async (t) => {
  const f = parseFdinfo('pos:\t100\nflags:\t02100002\nmnt_id:\t25\nino:\t7\n');
  t.equal(f.pos, 100n);
  t.equal(f.flags, 0o2100002);
  t.equal(f.mntId, 25);
});

t.test('seccomp filter traps exactly the ckpt numbers on x86-64', async (t) => {
  const f = buildTrapFilter(1000, 1004);
  const X86_64 = 0xc000003e, I386 = 0x40000003, AARCH64 = 0xc00000b7;
  for (const nr of [999, 0, 1, 60, 231, 1005, 0x40000000 + 1000]) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_ALLOW, `x86-64 ${nr} allowed`);
  for (let nr = 1000; nr <= 1004; nr++) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_TRACE, `x86-64 ${nr} traps`);
  t.equal(evalFilter(f, I386, 1000), SECCOMP_RET_ALLOW, 'other architectures are never trapped or killed');
  t.equal(evalFilter(f, AARCH64, 1002), SECCOMP_RET_ALLOW);
  for (const advice of [MADV_DONTFORK, MADV_WIPEONFORK, ...MADV_VM_STATE]) t.equal(evalFilter(f, X86_64, 28, [0x1000, 4096, advice]), SECCOMP_RET_TRACE, `madvise ${advice} traps`);
  for (const advice of [0 /* NORMAL */, 4 /* DONTNEED */, 8 /* FREE */, 11 /* DOFORK */, 17 /* DODUMP */, 0x10000 + 10]) t.equal(evalFilter(f, X86_64, 28, [0x1000, 4096, advice]), SECCOMP_RET_ALLOW, `madvise ${advice} runs untouched`);
  t.equal(evalFilter(f, X86_64, 27, [0, 0, MADV_DONTFORK]), SECCOMP_RET_ALLOW, 'the advice value alone traps nothing');
  t.equal(evalFilter(f, I386, 28, [0, 0, MADV_DONTFORK]), SECCOMP_RET_ALLOW);
  for (const nr of SYS_LOCKS) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_TRACE, `lock call ${nr} traps`);
  for (const nr of [150 /* munlock */]) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_ALLOW, `${nr} runs untouched`);
  for (const opt of [PR_SET_PDEATHSIG, PR_SET_TIMERSLACK, PR_SET_CHILD_SUBREAPER]) t.equal(evalFilter(f, X86_64, 157, [opt, 1]), SECCOMP_RET_TRACE, `prctl ${opt} traps`);
  for (const opt of [2 /* GET_PDEATHSIG */, 15 /* SET_NAME */, 30 /* GET_TIMERSLACK */, 37 /* GET_CHILD_SUBREAPER */, 38 /* SET_NO_NEW_PRIVS */]) t.equal(evalFilter(f, X86_64, 157, [opt, 1]), SECCOMP_RET_ALLOW, `prctl ${opt} runs untouched`);
  t.equal(evalFilter(f, X86_64, 158, [PR_SET_PDEATHSIG]), SECCOMP_RET_ALLOW, 'the option value alone traps nothing');
  for (const nr of [37 /* alarm */, 38 /* setitimer */]) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_TRACE, `${nr} (an interval timer armed) traps`);
  for (const nr of [36 /* getitimer */, 222 /* timer_create */, 223 /* timer_settime */]) t.equal(evalFilter(f, X86_64, nr), SECCOMP_RET_ALLOW, `${nr} runs untouched`);
  t.equal(evalFilter(f, I386, 38), SECCOMP_RET_ALLOW);
});

t.test('register set', async (t) => {
  const r = new Regs();
  t.equal(r.buf.length, REGS_SIZE);
  r.set('rax', -38n);
  t.equal(r.getSigned('rax'), -38n);
  t.equal(r.get('rax'), (1n << 64n) - 38n);
  r.set('rip', 0x401000);
  const c = r.clone();
  c.set('rip', 0);
  t.equal(r.get('rip'), 0x401000n, 'clone is independent');
});

t.test('page run sets agree with a page-by-page model', async (t) => {
  // Deterministic pseudo-random sets over 200 pages, checked against bitmaps.
  let seed = 12345;
  const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % n);
  const P = 4096, N = 220;
  const make = (): Runs => normalize(Array.from({ length: rnd(9) }, () => {
    const s = rnd(200);
    return [s * P, (s + 1 + rnd(12)) * P] as [number, number];
  }));
  const bits = (r: Runs) => {
    const b = new Uint8Array(N);
    for (const [s, e] of r) for (let x = s / P; x < e / P; x++) b[x] = 1;
    return b;
  };
  const model = { union: (x: number, y: number) => x | y, intersect: (x: number, y: number) => x & y, subtract: (x: number, y: number) => x & (1 - y) };
  let bad = 0, merged = true;
  for (let k = 0; k < 3000; k++) {
    const a = make(), b = make(), A = bits(a), B = bits(b);
    for (const [name, f] of [['union', union], ['intersect', intersect], ['subtract', subtract]] as const) {
      const got = f(a, b);
      const G = bits(got);
      for (let i = 0; i < N; i++) if (G[i] !== model[name](A[i], B[i])) bad++;
      for (let i = 1; i < got.length; i++) if (got[i][0] < got[i - 1][1] || (name === 'union' && got[i][0] === got[i - 1][1])) merged = false;
    }
  }
  t.equal(bad, 0, 'every page of every union, intersection and difference is right');
  t.ok(merged, 'results are sorted and disjoint (unions also merged)');
  t.same(normalize([[8192, 12288], [0, 4096], [4096, 8192], [20480, 20480]]), [[0, 12288]], 'normalize sorts, merges touching runs, drops empty ones');
  t.equal(runBytes([[0, 4096], [8192, 16384]]), 12288);
});
