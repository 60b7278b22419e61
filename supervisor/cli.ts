#!/usr/bin/env node
/**
 * ckpt-supervise's entry. Our own modules are compiled eagerly (V8's
 * --no-lazy, set once the libraries are loaded, which stay lazy): else the
 * first checkpoint or restart a supervisor serves compiles each function
 * it calls on its first call, inside the stop. Measured here: first stop
 * of a 4-thread process 11.5 -> 6.5 ms, first restart 20 -> 16 ms, for
 * about 20 ms more at start-up.
 */
import v8 from 'node:v8';

await Promise.all([import('yargs'), import('yargs/helpers'), import('debug'), import('koffi')]);
v8.setFlagsFromString('--no-lazy');
await import('./main.js');
