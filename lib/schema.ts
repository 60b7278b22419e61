/**
 * Building blocks for the schema of the TREE record (syscalls/state.ts): a
 * sound checksum only says the image is what was written, so every value is
 * checked for type and bounds before anything uses it. Each resource module
 * keeps its piece of the schema beside its state type.
 */
import { z } from 'zod';

export { z };

/** User-space addresses on x86-64 are below 2^47. */
export const USER_TOP = 1n << 47n;
/** PID_MAX_LIMIT. */
export const PID_MAX = 1 << 22;
/** No descriptor number above this (fs.nr_open's ceiling). */
export const FD_MAX = 1 << 20;
/** PATH_MAX. */
export const PATH_MAX = 4096;
/** Array lengths nothing real comes near, so that a hostile image cannot make the supervisor walk billions. */
export const MANY = 1 << 20;

export const int = (min: number, max: number) => z.number().int().min(min).max(max);
export const u32 = int(0, 2 ** 32 - 1);
export const pid = int(1, PID_MAX);
/** A pid that may be 0: the parent, group or session outside the root's pid namespace. */
export const pid0 = int(0, PID_MAX);
/** uid/gid: (uid_t)-1 means "no change" to the kernel, never an id. */
export const id = int(0, 2 ** 32 - 2);
export const fd = int(0, FD_MAX);
export const path = z.string().min(1).max(PATH_MAX).refine((s) => !s.includes('\0'), 'contains a NUL byte');
/** O_* flags of an open file. */
export const openFlags = int(0, 0o77777777);

const bigOf = (s: string) => BigInt(s);
/** "0x..." below `limit`, as the code stores addresses. */
export const hexBelow = (limit: bigint) =>
  z.string().regex(/^0x[0-9a-f]{1,16}$/, 'not a 0x-prefixed hex number').refine((s) => bigOf(s) < limit, `not below 0x${limit.toString(16)}`);
export const addr = hexBelow(USER_TOP);
/** A page-aligned user address (a mapping's bounds); the top itself may end a mapping. */
export const pageAddr = hexBelow(USER_TOP + 1n).refine((s) => bigOf(s) % 4096n === 0n, 'not page-aligned');
/** Bare hex of at most 64 bits (signal masks, handler words, epoll data), as fdinfo and the code spell them. */
export const hex64 = z.string().regex(/^[0-9a-f]{1,16}$/, 'not a hex number of at most 64 bits');
/** A user address in bare hex (signal handlers and restorers, as the code stores them). */
export const hexAddr = hex64.refine((s) => BigInt('0x' + s) < USER_TOP, 'not a user address (below 2^47)');
/** A decimal count or offset that fits in a signed 64-bit integer. */
export const dec63 = z.string().regex(/^[0-9]{1,19}$/, 'not a decimal number').refine((s) => BigInt(s) < 1n << 63n, 'not below 2^63');
export const dec64 = z.string().regex(/^[0-9]{1,20}$/, 'not a decimal number').refine((s) => BigInt(s) < 1n << 64n, 'not below 2^64');

/** Base64 (as Buffer.toString('base64') writes it) of at most `max` bytes, or exactly `exact`. */
export function base64(max: number, exact?: number) {
  return z.string().max(Math.ceil(max / 3) * 4).regex(/^[A-Za-z0-9+/]*={0,2}$/, 'not base64').refine((s) => s.length % 4 === 0, 'not base64 (length)')
    .refine((s) => exact === undefined || Buffer.byteLength(s, 'base64') === exact, `not ${exact} bytes`);
}

/** A siginfo as the kernel gives it to PTRACE_PEEKSIGINFO. */
export const siginfo = base64(128, 128);

/**
 * true when a schema's output (which may be narrower: literals for a number)
 * fits the state type it checks and has the same keys: a field added to a
 * state type without its schema (which would refuse every image carrying
 * it) fails to compile.
 */
export type Same<A, B> = [A] extends [B] ? ([keyof A] extends [keyof B] ? ([keyof B] extends [keyof A] ? true : false) : false) : false;
