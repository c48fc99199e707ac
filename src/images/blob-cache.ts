import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Transform } from 'node:stream';
import { ImportError } from './errors.js';

/**
 * Verified registry blobs (layers, configs) by digest, shared by every import. A blob enters the cache
 * only after its size and sha256 matched, by an atomic rename, so a crash never leaves a bad entry.
 */
export class BlobCache {
  private readonly inflight = new Map<string, Promise<string>>();

  constructor(private readonly dir: string) {
    fs.mkdirSync(path.join(dir, 'sha256'), { recursive: true });
    fs.mkdirSync(path.join(dir, 'tmp'), { recursive: true });
    // Partial downloads of a previous run are garbage.
    for (const f of fs.readdirSync(path.join(dir, 'tmp'))) fs.rmSync(path.join(dir, 'tmp', f), { force: true });
  }

  pathOf(digest: string): string {
    return path.join(this.dir, 'sha256', digest.slice('sha256:'.length));
  }

  /**
   * Returns the cached path of a blob, downloading it with `open` when missing. Concurrent requests
   * for one digest share a single download. `onBytes` sees the bytes downloaded, for progress.
   */
  async get(
    digest: string,
    size: number,
    open: () => Promise<Response>,
    onBytes: (n: number) => void,
  ): Promise<{ path: string; cached: boolean }> {
    const file = this.pathOf(digest);
    if (fs.existsSync(file)) {
      const now = new Date();
      fs.utimesSync(file, now, now); // last use, for a future eviction policy
      return { path: file, cached: true };
    }
    let p = this.inflight.get(digest);
    if (!p) {
      p = this.download(digest, size, open, onBytes).finally(() => this.inflight.delete(digest));
      this.inflight.set(digest, p);
    }
    return { path: await p, cached: false };
  }

  /** Takes a blob from a local file (an OCI layout) into the cache after checking its size and digest. */
  async adopt(digest: string, size: number, file: string): Promise<{ path: string; cached: boolean }> {
    const target = this.pathOf(digest);
    if (fs.existsSync(target)) return { path: target, cached: true };
    const hash = crypto.createHash('sha256');
    let bytes = 0;
    for await (const chunk of fs.createReadStream(file, { highWaterMark: 1024 * 1024 })) {
      hash.update(chunk as Buffer);
      bytes += (chunk as Buffer).length;
    }
    if (bytes !== size) throw new ImportError(`blob ${digest} is ${bytes} bytes, its manifest declares ${size}`);
    const actual = `sha256:${hash.digest('hex')}`;
    if (actual !== digest) throw new ImportError(`blob digest mismatch: expected ${digest}, found ${actual}`);
    const tmp = path.join(this.dir, 'tmp', `${digest.slice(7, 23)}-${crypto.randomBytes(4).toString('hex')}`);
    fs.copyFileSync(file, tmp, fs.constants.COPYFILE_FICLONE);
    fs.renameSync(tmp, target);
    return { path: target, cached: false };
  }

  private async download(digest: string, size: number, open: () => Promise<Response>, onBytes: (n: number) => void): Promise<string> {
    const res = await open();
    const tmp = path.join(this.dir, 'tmp', `${digest.slice(7, 23)}-${crypto.randomBytes(4).toString('hex')}`);
    const hash = crypto.createHash('sha256');
    let received = 0;
    const meter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        received += chunk.length;
        if (received > size) {
          cb(new ImportError(`blob ${digest} is larger than the ${size} bytes its manifest declares`));
          return;
        }
        hash.update(chunk);
        onBytes(chunk.length);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(Readable.fromWeb(res.body as import('node:stream/web').ReadableStream), meter, fs.createWriteStream(tmp));
      if (received !== size) {
        throw new ImportError(`blob ${digest} is ${received} bytes, its manifest declares ${size}`);
      }
      const actual = `sha256:${hash.digest('hex')}`;
      if (actual !== digest) throw new ImportError(`blob digest mismatch: expected ${digest}, received ${actual}`);
      const file = this.pathOf(digest);
      fs.renameSync(tmp, file);
      return file;
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      throw err;
    }
  }
}
