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

/** Layer extraction off the event loop: one worker thread per import, layers applied in order. */
export class Unpacker {
  private readonly worker = startWorker();
  private nextId = 0;
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
    this.worker.on('exit', () => this.failAll(new Error('unpack worker exited')));
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
    await this.worker.terminate();
  }
}
