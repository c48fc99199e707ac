import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { migrations } from './migrations.js';

/**
 * All data access goes through this module so that a Postgres implementation can replace it
 * when several API servers share state.
 */

export interface Account {
  id: string;
  name: string;
  createdAt: number;
}

export interface ApiKeyRecord {
  id: string;
  accountId: string;
  name: string;
  prefix: string;
  createdAt: number;
  revokedAt: number | null;
}

export type ImageStatus = 'importing' | 'ready' | 'failed';

export interface ImageRecord {
  id: string;
  accountId: string;
  source: 'import' | 'build';
  imageUri: string | null;
  status: ImageStatus;
  digest: string | null;
  size: number | null;
  /** What an import is doing now, e.g. `downloading` or `unpacking layer 2/3`. */
  phase: string | null;
  progressBytes: number;
  totalBytes: number | null;
  error: string | null;
  config: ImageConfig | null;
  rootfsPath: string | null;
  createdAt: number;
  updatedAt: number;
}

/** The parts of an OCI image config that decide how the image runs. */
export interface ImageConfig {
  entrypoint: string[] | null;
  cmd: string[] | null;
  env: string[];
  workingDir: string;
  user: string;
  exposedPorts: string[];
}

export interface Page<T> {
  items: T[];
  next: string | null;
}

interface ImageRow {
  id: string;
  account_id: string;
  source: 'import' | 'build';
  image_uri: string | null;
  status: ImageStatus;
  digest: string | null;
  size: number | null;
  phase: string | null;
  progress_bytes: number;
  total_bytes: number | null;
  error: string | null;
  config_json: string | null;
  rootfs_path: string | null;
  created_at: number;
  updated_at: number;
}

function imageFromRow(r: ImageRow): ImageRecord {
  return {
    id: r.id,
    accountId: r.account_id,
    source: r.source,
    imageUri: r.image_uri,
    status: r.status,
    digest: r.digest,
    size: r.size,
    phase: r.phase,
    progressBytes: r.progress_bytes,
    totalBytes: r.total_bytes,
    error: r.error,
    config: r.config_json ? (JSON.parse(r.config_json) as ImageConfig) : null,
    rootfsPath: r.rootfs_path,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}

interface KeyRow {
  id: string;
  account_id: string;
  name: string;
  prefix: string;
  created_at: number;
  revoked_at: number | null;
}

function keyFromRow(r: KeyRow): ApiKeyRecord {
  return {
    id: r.id,
    accountId: r.account_id,
    name: r.name,
    prefix: r.prefix,
    createdAt: r.created_at,
    revokedAt: r.revoked_at,
  };
}

/** Cursor tokens are opaque to clients: base64url of "createdAt:id", the sort key of the last item. */
function encodeCursor(createdAt: number, id: string): string {
  return Buffer.from(`${createdAt}:${id}`).toString('base64url');
}

export function decodeCursor(token: string): { createdAt: number; id: string } | null {
  const raw = Buffer.from(token, 'base64url').toString('utf8');
  const m = /^(\d{1,16}):([a-z0-9_]{1,64})$/.exec(raw);
  if (!m) return null;
  return { createdAt: Number(m[1]), id: m[2]! };
}

export class Store {
  readonly db: Database.Database;

  constructor(file: string) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
    this.migrate();
  }

  private migrate(): void {
    const current = this.db.pragma('user_version', { simple: true }) as number;
    if (current > migrations.length) {
      throw new Error(`database schema version ${current} is newer than this server (${migrations.length})`);
    }
    for (let v = current; v < migrations.length; v++) {
      this.db.transaction(() => {
        this.db.exec(migrations[v]!);
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }

  close(): void {
    this.db.close();
  }

  // --- accounts and keys ---

  createAccount(id: string, name: string, now = Date.now()): Account {
    this.db.prepare('INSERT INTO accounts (id, name, created_at) VALUES (?, ?, ?)').run(id, name, now);
    return { id, name, createdAt: now };
  }

  getAccount(id: string): Account | null {
    const r = this.db.prepare('SELECT id, name, created_at FROM accounts WHERE id = ?').get(id) as
      | { id: string; name: string; created_at: number }
      | undefined;
    return r ? { id: r.id, name: r.name, createdAt: r.created_at } : null;
  }

  insertKey(k: Omit<ApiKeyRecord, 'revokedAt'>, keyHash: string): void {
    this.db
      .prepare(
        'INSERT INTO api_keys (id, account_id, name, prefix, key_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)',
      )
      .run(k.id, k.accountId, k.name, k.prefix, keyHash, k.createdAt);
  }

  /** Returns the key with this hash, revoked or not. */
  findKeyByHash(keyHash: string): ApiKeyRecord | null {
    const r = this.stmtKeyByHash.get(keyHash) as KeyRow | undefined;
    return r ? keyFromRow(r) : null;
  }

  private readonly stmtKeyByHash = this.lazy(
    'SELECT id, account_id, name, prefix, created_at, revoked_at FROM api_keys WHERE key_hash = ?',
  );

  listKeys(): ApiKeyRecord[] {
    const rows = this.db
      .prepare('SELECT id, account_id, name, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at, id')
      .all() as KeyRow[];
    return rows.map(keyFromRow);
  }

  /** Returns false when no such key exists. */
  revokeKey(id: string, now = Date.now()): boolean {
    const r = this.db
      .prepare('UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?')
      .run(now, id);
    return r.changes > 0;
  }

  // --- images ---

  insertImage(img: Pick<ImageRecord, 'id' | 'accountId' | 'source' | 'imageUri' | 'status'>, now = Date.now()): ImageRecord {
    this.db
      .prepare(
        `INSERT INTO images (id, account_id, source, image_uri, status, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(img.id, img.accountId, img.source, img.imageUri, img.status, now, now);
    return this.getImageById(img.id)!;
  }

  getImageById(id: string): ImageRecord | null {
    const r = this.stmtImageById.get(id) as ImageRow | undefined;
    return r ? imageFromRow(r) : null;
  }

  private readonly stmtImageById = this.lazy('SELECT * FROM images WHERE id = ?');

  /** An image as its owner sees it; another account's image is indistinguishable from a missing one. */
  getImage(accountId: string, id: string): ImageRecord | null {
    const img = this.getImageById(id);
    return img && img.accountId === accountId ? img : null;
  }

  listImages(accountId: string, limit: number, cursor: { createdAt: number; id: string } | null): Page<ImageRecord> {
    const rows = (
      cursor
        ? this.db
            .prepare(
              `SELECT * FROM images WHERE account_id = ? AND (created_at, id) > (?, ?)
               ORDER BY created_at, id LIMIT ?`,
            )
            .all(accountId, cursor.createdAt, cursor.id, limit + 1)
        : this.db
            .prepare('SELECT * FROM images WHERE account_id = ? ORDER BY created_at, id LIMIT ?')
            .all(accountId, limit + 1)
    ) as ImageRow[];
    const items = rows.slice(0, limit).map(imageFromRow);
    const last = items[items.length - 1];
    return { items, next: rows.length > limit && last ? encodeCursor(last.createdAt, last.id) : null };
  }

  updateImage(
    id: string,
    fields: Partial<Pick<ImageRecord, 'status' | 'digest' | 'size' | 'phase' | 'progressBytes' | 'totalBytes' | 'error' | 'config' | 'rootfsPath'>>,
    now = Date.now(),
  ): void {
    const columns: Record<string, unknown> = {};
    if (fields.status !== undefined) columns.status = fields.status;
    if (fields.digest !== undefined) columns.digest = fields.digest;
    if (fields.size !== undefined) columns.size = fields.size;
    if (fields.phase !== undefined) columns.phase = fields.phase;
    if (fields.progressBytes !== undefined) columns.progress_bytes = fields.progressBytes;
    if (fields.totalBytes !== undefined) columns.total_bytes = fields.totalBytes;
    if (fields.error !== undefined) columns.error = fields.error;
    if (fields.config !== undefined) columns.config_json = fields.config ? JSON.stringify(fields.config) : null;
    if (fields.rootfsPath !== undefined) columns.rootfs_path = fields.rootfsPath;
    const names = Object.keys(columns);
    const sets = names.map((n) => `${n} = @${n}`).join(', ');
    this.db
      .prepare(`UPDATE images SET ${sets}${sets ? ', ' : ''}updated_at = @updated_at WHERE id = @id`)
      .run({ ...columns, updated_at: now, id });
  }

  /** Imports cannot resume after a restart (the password is never stored), so they end as failed. */
  failInterruptedImports(reason: string, now = Date.now()): number {
    return this.db
      .prepare(`UPDATE images SET status = 'failed', phase = 'failed', error = ?, updated_at = ? WHERE status = 'importing'`)
      .run(reason, now).changes;
  }

  /** Prepares a statement on first use, so hot lookups skip SQL parsing. */
  private lazy(sql: string): { get: (...args: unknown[]) => unknown } {
    let stmt: Database.Statement | undefined;
    return {
      get: (...args: unknown[]) => {
        stmt ??= this.db.prepare(sql);
        return stmt.get(...args);
      },
    };
  }
}
