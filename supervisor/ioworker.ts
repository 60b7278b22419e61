/**
 * An I/O worker thread of the pool in io.ts: runs one image job at a time
 * (lib/imagejob.ts) and bumps the shared doorbell when it is done. It may
 * block as long as the descriptor makes it: the tracer's loop goes on.
 */
import { workerData, type MessagePort } from 'node:worker_threads';
import { CkptError, asCkptError } from '../lib/errors.js';
import { runJob, type IoJob, type LoadedImage } from '../lib/imagejob.js';
import type { WorkerReply } from './io.js';

const { bell, port } = workerData as { bell: Int32Array; port: MessagePort };

port.on('message', ({ id, job }: { id: number; job: IoJob }) => {
  let reply: WorkerReply;
  const transfer: ArrayBuffer[] = [];
  try {
    const value = runJob(job);
    if (job.kind === 'read') {
      // Payloads that own their memory move to the main thread without a copy.
      for (const r of (value as LoadedImage).records) if (r.payload.byteOffset === 0 && r.payload.byteLength === r.payload.buffer.byteLength) transfer.push(r.payload.buffer as ArrayBuffer);
    }
    reply = { id, ok: true, value };
  } catch (e) {
    const err: CkptError = asCkptError(e, 'image');
    reply = { id, ok: false, errno: err.errno, op: err.op, detail: err.detail };
  }
  port.postMessage(reply, transfer);
  Atomics.add(bell, 0, 1);
  Atomics.notify(bell, 0);
});
