/**
 * Calls in flight: how the one tracer thread serves every tracee while an
 * image moves through a descriptor that may block.
 *
 * The problem: the supervisor is a single thread that owns ptrace. If a
 * handler wrote an image into a pipe whose reader is a tracee, the write
 * would block as soon as the pipe filled, the reader would need a ptrace
 * stop served (an exec, a fork, its own restart call) to go on, and the
 * whole tree would hang. The same holds for a FIFO whose reader comes
 * later, a restart reading from `(sleep 1; cat img) |`, or a socket.
 *
 * The mechanism:
 * - Byte work that needs no ptrace (reading husks through /proc/PID/mem,
 *   checksums, reads and writes on the caller's descriptor) runs as a job
 *   on a worker thread of this pool (ioworker.ts, jobs in lib/imagejob.ts).
 *   Workers are kept and reused; one is started with the supervisor, and
 *   another is started when every worker is busy (two supervised calls can
 *   be each other's reader and writer).
 * - A handler that starts such a job returns an `InFlight` (context.ts):
 *   the job and what to do with its outcome. The caller stays in its
 *   seccomp stop meanwhile, so it sees nothing but a call that takes time.
 * - While any job runs, the loop (Tracer.run) never blocks in waitpid: it
 *   polls waitpid(WNOHANG) at its one site, and sleeps on this pool's
 *   doorbell (a shared word every worker bumps when it finishes a job) for
 *   at most a millisecond between polls. Finished jobs are taken with
 *   receiveMessageOnPort (the main thread never returns to Node's event
 *   loop) and their continuations run on the main thread, where ptrace is.
 * - A continuation may start another job (a restart reads its image, then
 *   rebuilds), or answer the caller.
 * Only the image's bytes move this way; injected syscalls, freezes and
 * everything else that needs the tracer stay on the main thread.
 */
import { Worker, MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { CkptError, errno } from '../lib/errors.js';
import { log } from '../lib/log.js';
import type { IoJob, IoValue } from '../lib/imagejob.js';

export type { IoJob, IoValue };

/** A job's outcome: its value, or the error it met (errno and where). */
export type IoOutcome<T> = { ok: true; value: T } | { ok: false; error: CkptError };

export interface WorkerReply {
  id: number;
  ok: boolean;
  value?: unknown;
  errno?: number;
  op?: string;
  detail?: string;
}

interface PoolWorker {
  worker: Worker;
  port: MessagePort;
  busy: number; // job id, or 0
}

export class IoPool {
  private readonly workers: PoolWorker[] = [];
  private readonly waiting = new Map<number, (o: IoOutcome<unknown>) => void>();
  private lastId = 0;
  /** Bumped by a worker each time it finishes a job. */
  private readonly bell = new Int32Array(new SharedArrayBuffer(4));
  private seen = 0;

  /** Start one worker now, so that the first call does not wait for it. */
  warm(): void {
    if (!this.workers.length) this.spawn();
  }

  /** Is any job running? (Then the loop must not block in waitpid.) */
  busy(): boolean {
    return this.waiting.size > 0;
  }

  submit<J extends IoJob>(job: J, done: (o: IoOutcome<IoValue<J>>) => void): void {
    const w = this.workers.find((x) => !x.busy) ?? this.spawn();
    const id = ++this.lastId;
    w.busy = id;
    this.waiting.set(id, done as (o: IoOutcome<unknown>) => void);
    log.syscall('io job %d: %s fd %d', id, job.kind, job.fd);
    w.port.postMessage({ id, job });
  }

  /** Sleep until a worker finishes a job, or `ms` pass. */
  sleep(ms: number): void {
    if (Atomics.load(this.bell, 0) === this.seen) Atomics.wait(this.bell, 0, this.seen, ms);
  }

  /** Take finished jobs and run their continuations; returns how many. */
  pump(): number {
    const now = Atomics.load(this.bell, 0);
    if (now === this.seen) return 0;
    this.seen = now;
    let n = 0;
    for (const w of this.workers) {
      for (let m; (m = receiveMessageOnPort(w.port)); ) {
        const r = m.message as WorkerReply;
        if (w.busy === r.id) w.busy = 0;
        const done = this.waiting.get(r.id);
        this.waiting.delete(r.id);
        if (!done) continue;
        n++;
        log.syscall('io job %d: %s', r.id, r.ok ? 'done' : `failed: ${r.detail}`);
        done(r.ok ? { ok: true, value: r.value } : { ok: false, error: new CkptError(r.errno ?? errno('EIO'), r.op ?? 'image', r.detail ?? 'I/O failed') });
      }
    }
    return n;
  }

  private spawn(): PoolWorker {
    const { port1, port2 } = new MessageChannel();
    const worker = new Worker(new URL('./ioworker.js', import.meta.url), { workerData: { bell: this.bell, port: port2 }, transferList: [port2] });
    worker.unref();
    const w: PoolWorker = { worker, port: port1, busy: 0 };
    this.workers.push(w);
    return w;
  }
}
