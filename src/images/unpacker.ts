import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { ImportError } from './errors.js';
import type { LayerStats } from './unpack.js';

// Runs from dist/*.js in production and from src/*.ts under tsx in tests; the worker file matches.
const here = fileURLToPath(import.meta.url);
const workerFile = path.join(path.dirname(here), `unpack-worker${path.extname(here)}`);

function startWorker(): Worker {
  if (!workerFile.endsWith('.ts')) return new Worker(workerFile);
  // Under tsx (tests) the worker thread must register the TypeScript loader before importing.
  const boot = `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(pathToFileURL(workerFile).href)}); })`;
  return new Worker(boot, { eval: true });
}

const MAX_IDLE = 4;
const idle: Unpacker[] = [];

/**
 * Layer extraction off the event loop: a worker thread serves one import at a time, layers applied
 * in order. Workers are kept warm between imports (starting one costs ~50 ms, a quarter of a small
 * build's storing time).
 */
export class Unpacker {
  private readonly worker = startWorker();
  private nextId = 0;
  private dead = false;

  /** A warm worker if one is idle, else a new one. */
  static acquire(): Unpacker {
    const u = idle.pop();
    if (u) {
      u.worker.ref();
      return u;
    }
    return new Unpacker();
  }

  /** Starts a worker ahead of the first import. */
  static warm(): void {
    if (idle.length === 0) Unpacker.acquire().release();
  }

  /** Returns a healthy worker to the pool (it no longer keeps the process alive); else ends it. */
  release(): void {
    if (this.dead || this.pending.size > 0 || idle.length >= MAX_IDLE) {
      void this.close();
      return;
    }
    this.worker.unref();
    idle.push(this);
  }
  private readonly pending = new Map<number, { resolve: (s: LayerStats) => void; reject: (e: Error) => void }>();

  constructor() {
    this.worker.on('message', (m: { id: number; stats?: LayerStats; error?: string; unsafe?: boolean }) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.stats) p.resolve(m.stats);
      else p.reject(m.unsafe ? new ImportError(`unsafe layer: ${m.error}`) : new ImportError(`cannot unpack layer: ${m.error}`));
    });
    this.worker.on('error', (e) => this.failAll(e));
    this.worker.on('exit', () => {
      this.dead = true;
      const i = idle.indexOf(this);
      if (i >= 0) idle.splice(i, 1);
      this.failAll(new Error('unpack worker exited'));
    });
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  apply(root: string, blobPath: string): Promise<LayerStats> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, root, blobPath });
    });
  }

  async close(): Promise<void> {
    this.dead = true;
    await this.worker.terminate();
  }
}
