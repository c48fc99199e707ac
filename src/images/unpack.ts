import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import zlib from 'node:zlib';
import tar from 'tar-stream';

/**
 * Applies one image layer (a tar, gzip or zstd) onto a root directory, as a container runtime would:
 * whiteouts remove lower-layer files, and no entry can write outside the root. Symlinks already in the
 * tree are followed with the root as "/", never the host's "/" (what Docker and umoci do: Debian's
 * `/lib -> usr/lib` must keep working for later layers).
 *
 * File operations are synchronous on purpose: this runs in a worker thread, where sync calls avoid one
 * thread-pool round trip per syscall and cannot block the API's event loop.
 */

export class UnsafeLayerError extends Error {
  override name = 'UnsafeLayerError';
}

export interface LayerStats {
  entries: number;
  bytes: number;
  skippedDevices: number;
}

const isRoot = process.getuid?.() === 0;
const MAX_SYMLINK_HOPS = 40;
const DECOMPRESS_TIMEOUT_MS = 3_600_000;

/** `./a//b/` → ['a', 'b']; rejects `..` anywhere (the layer is refused as a whole). */
export function entryParts(name: string): string[] {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new UnsafeLayerError(`layer entry "${name}" contains "..": refusing the layer`);
  if (name.includes('\0')) throw new UnsafeLayerError('layer entry name contains a NUL byte: refusing the layer');
  return parts;
}

function lstatOrNull(p: string): fs.Stats | null {
  try {
    return fs.lstatSync(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

function removeTree(p: string): void {
  fs.rmSync(p, { recursive: true, force: true });
}

class LayerWriter {
  /** Tar-relative directory path → real path inside the root; cleared when the tree's shape changes. */
  private readonly dirCache = new Map<string, string>();
  /** Real paths written by this layer: an opaque whiteout or a whiteout must not remove them. */
  private readonly written = new Set<string>();
  readonly stats: LayerStats = { entries: 0, bytes: 0, skippedDevices: 0 };

  constructor(private readonly root: string) {}

  /**
   * Resolves directory components inside the root. A symlink is followed with `..` and absolute targets
   * clamped to the root. Missing directories are created when `create` is set, else null is returned.
   */
  private resolveDir(parts: string[], create: boolean, hops = 0): string | null {
    const key = parts.join('/');
    const hit = this.dirCache.get(key);
    if (hit) return hit;
    let cur = this.root;
    const curParts: string[] = [];
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i]!;
      const next = path.join(cur, part);
      const st = lstatOrNull(next);
      if (!st) {
        if (!create) return null;
        fs.mkdirSync(next, { mode: 0o755 });
        cur = next;
        curParts.push(part);
        continue;
      }
      if (st.isSymbolicLink()) {
        if (hops >= MAX_SYMLINK_HOPS) throw new UnsafeLayerError(`too many symlinks resolving "${key}"`);
        const target = fs.readlinkSync(next);
        const base = target.startsWith('/') ? [] : curParts;
        const joined: string[] = [];
        for (const t of [...base, ...target.split('/')]) {
          if (t === '' || t === '.') continue;
          if (t === '..') joined.pop(); // clamped at the root
          else joined.push(t);
        }
        const resolved = this.resolveDir([...joined, ...parts.slice(i + 1)], create, hops + 1);
        if (resolved) this.dirCache.set(key, resolved);
        return resolved;
      }
      if (!st.isDirectory()) {
        if (!create) return null;
        throw new UnsafeLayerError(`layer entry path "${key}" passes through "${curParts.concat(part).join('/')}", which is not a directory`);
      }
      cur = next;
      curParts.push(part);
    }
    this.dirCache.set(key, cur);
    return cur;
  }

  private shapeChanged(): void {
    this.dirCache.clear();
  }

  /** Removes whatever is at `dest` unless it is a directory and a directory replaces it. */
  private clearFor(dest: string, keepDir: boolean): fs.Stats | null {
    const st = lstatOrNull(dest);
    if (!st) return null;
    if (st.isDirectory()) {
      if (keepDir) return st;
      removeTree(dest);
      this.shapeChanged();
      return null;
    }
    fs.unlinkSync(dest);
    if (st.isSymbolicLink()) this.shapeChanged();
    return null;
  }

  private purgeOpaque(dir: string): void {
    for (const name of fs.readdirSync(dir)) {
      const p = path.join(dir, name);
      if (!this.written.has(p)) removeTree(p);
      else if (lstatOrNull(p)?.isDirectory()) this.purgeOpaque(p);
    }
    this.shapeChanged();
  }

  private owner(dest: string, h: tar.Header, fd?: number): void {
    if (!isRoot) return;
    const uid = h.uid ?? 0;
    const gid = h.gid ?? 0;
    if (fd !== undefined) fs.fchownSync(fd, uid, gid);
    else fs.lchownSync(dest, uid, gid);
  }

  async apply(header: tar.Header, body: AsyncIterable<Buffer>): Promise<void> {
    this.stats.entries++;
    const parts = entryParts(header.name);
    if (parts.length === 0) return; // the root itself
    const base = parts[parts.length - 1]!;
    const parentParts = parts.slice(0, -1);

    if (base.startsWith('.wh.')) {
      const parent = this.resolveDir(parentParts, base === '.wh..wh..opq');
      if (!parent) return;
      if (base === '.wh..wh..opq') {
        this.purgeOpaque(parent);
      } else {
        const victim = path.join(parent, base.slice(4));
        if (!this.written.has(victim) && lstatOrNull(victim)) {
          removeTree(victim);
          this.shapeChanged();
        }
      }
      return;
    }

    const parent = this.resolveDir(parentParts, true)!;
    const dest = path.join(parent, base);
    const mode = (header.mode ?? 0o644) & 0o7777;
    this.written.add(dest);

    switch (header.type) {
      case 'directory': {
        if (!this.clearFor(dest, true)) fs.mkdirSync(dest);
        this.owner(dest, header);
        fs.chmodSync(dest, mode);
        return;
      }
      case 'file':
      case 'contiguous-file': {
        this.clearFor(dest, false);
        const fd = fs.openSync(dest, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
        try {
          for await (const chunk of body) {
            fs.writeSync(fd, chunk);
            this.stats.bytes += chunk.length;
          }
          this.owner(dest, header, fd);
          fs.fchmodSync(fd, mode); // after chown, which clears setuid bits
          if (header.mtime) fs.futimesSync(fd, header.mtime, header.mtime);
        } finally {
          fs.closeSync(fd);
        }
        return;
      }
      case 'symlink': {
        this.clearFor(dest, false);
        fs.symlinkSync(header.linkname ?? '', dest);
        this.owner(dest, header);
        this.shapeChanged();
        return;
      }
      case 'link': {
        const targetParts = entryParts(header.linkname ?? '');
        const targetDir = this.resolveDir(targetParts.slice(0, -1), false);
        const target = targetDir && targetParts.length > 0 ? path.join(targetDir, targetParts[targetParts.length - 1]!) : null;
        const st = target ? lstatOrNull(target) : null;
        if (!target || !st || st.isDirectory()) {
          throw new UnsafeLayerError(`hard link "${header.name}" points to "${header.linkname}", which is not a file in the image`);
        }
        if (target === dest) return;
        this.clearFor(dest, false);
        fs.linkSync(target, dest);
        return;
      }
      case 'character-device':
      case 'block-device':
      case 'fifo': {
        this.clearFor(dest, false);
        if (!isRoot && header.type !== 'fifo') {
          this.stats.skippedDevices++;
          return;
        }
        // Node has no mknod(2); mknod(1) with an argument array is the smallest safe stand-in.
        const kind = header.type === 'fifo' ? ['p'] : [header.type === 'block-device' ? 'b' : 'c', String(header.devmajor ?? 0), String(header.devminor ?? 0)];
        const r = spawnSync('mknod', ['-m', mode.toString(8), '--', dest, ...kind], { timeout: 10_000, stdio: ['ignore', 'ignore', 'pipe'] });
        if (r.status !== 0) throw new Error(`mknod ${header.name} failed: ${r.stderr?.toString().trim() || r.error?.message}`);
        this.owner(dest, header);
        return;
      }
      default:
        // Other entry kinds (e.g. GNU sparse or volume headers) carry nothing a root filesystem needs.
        for await (const _chunk of body) void _chunk;
    }
  }
}

/** Opens a layer blob as a tar stream, detecting gzip and zstd by their magic bytes. */
function openDecompressed(blobPath: string): Readable {
  const head = Buffer.alloc(4);
  const fd = fs.openSync(blobPath, 'r');
  try {
    fs.readSync(fd, head, 0, 4, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (head[0] === 0x1f && head[1] === 0x8b) {
    const gunzip = zlib.createGunzip({ chunkSize: 256 * 1024 });
    const src = fs.createReadStream(blobPath, { highWaterMark: 1024 * 1024 });
    src.on('error', (e) => gunzip.destroy(e));
    return src.pipe(gunzip);
  }
  if (head.readUInt32LE(0) === 0xfd2fb528) {
    // Node 20's zlib has no zstd; the zstd CLI streams it at native speed.
    const child = spawn('zstd', ['-dc', '--no-progress', '--', blobPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: DECOMPRESS_TIMEOUT_MS,
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
    // The tar stream may only end once zstd has exited cleanly: a truncated or corrupt layer must fail.
    const out = new PassThrough({ highWaterMark: 1024 * 1024 });
    child.stdout.pipe(out, { end: false });
    child.on('close', (code, signal) => {
      if (code === 0) out.end();
      else out.destroy(new Error(`zstd failed (${signal ?? `exit ${code}`}): ${stderr.trim()}`));
    });
    child.on('error', (e) => out.destroy(e));
    out.on('close', () => child.kill('SIGKILL'));
    return out;
  }
  return fs.createReadStream(blobPath, { highWaterMark: 1024 * 1024 });
}

export async function applyLayer(root: string, blobPath: string): Promise<LayerStats> {
  const writer = new LayerWriter(fs.realpathSync(root));
  const extract = tar.extract();
  const source = openDecompressed(blobPath);
  source.on('error', (e) => extract.destroy(e));
  source.pipe(extract);
  try {
    for await (const entry of extract) {
      await writer.apply(entry.header, entry as AsyncIterable<Buffer>);
      entry.resume();
    }
  } catch (err) {
    source.destroy();
    throw err;
  }
  return writer.stats;
}
