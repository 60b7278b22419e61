/**
 * A young-generation collection on demand. A scavenge costs 1 to 2 ms here
 * and comes when the young heap fills up: left to itself it lands, now and
 * then, inside a stop. The supervisor runs one after each call it serves,
 * while the program runs, so that the next stop starts with an empty young
 * heap. (V8's gc function, exposed in a context of its own.)
 */
import v8 from 'node:v8';
import vm from 'node:vm';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as (options?: { type?: 'minor' | 'major'; execution?: 'sync' | 'async' }) => void;

export function collectYoung(): void {
  gc({ type: 'minor' });
}
