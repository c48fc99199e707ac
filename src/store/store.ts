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

export type VmState = 'created' | 'caching' | 'starting' | 'started' | 'stopping' | 'stopped' | 'failed' | 'destroyed';
/** States in which a VM holds host memory and vCPUs. */
export const LIVE_VM_STATES: VmState[] = ['created', 'caching', 'starting', 'started', 'stopping'];
export type VmKind = 'vm' | 'cached';

export interface VmRecord {
  id: string;
  accountId: string;
  imageId: string;
  kind: VmKind;
  state: VmState;
  cpu: number;
  memory: number;
  port: number;
  envVars: Record<string, string>;
  volumeGb: number | null;
  /** network slot: the VM's /30 inside the VM subnet */
  slot: number | null;
  pid: number | null;
  runDir: string | null;
  exitCode: number | null;
  error: string | null;
  createdAt: number;
  updatedAt: number;
  startedAt: number | null;
  stoppedAt: number | null;
  /** cached VMs: where the snapshot (RAM, device state, disk) lives */
  snapshotDir: string | null;
  /** cached VMs: a request to the stopped VM's endpoint starts it */
  wake: boolean;
  /** cached VMs: how many times it was started from its snapshot */
  runs: number;
  /** cached VMs: stop after this many seconds without traffic (null: never) */
  idleStopS: number | null;
}

interface VmRow {
  id: string;
  account_id: string;
  image_id: string;
  kind: VmKind;
  state: VmState;
  cpu: number;
  memory: number;
  port: number;
  env_json: string;
  volume_gb: number | null;
  slot: number | null;
  pid: number | null;
  run_dir: string | null;
  exit_code: number | null;
  error: string | null;
  created_at: number;
  updated_at: number;
  started_at: number | null;
  stopped_at: number | null;
  snapshot_dir: string | null;
  wake: number;
  runs: number;
  idle_stop_s: number | null;
}

function vmFromRow(r: VmRow): VmRecord {
  return {
    id: r.id,
    accountId: r.account_id,
    imageId: r.image_id,
    kind: r.kind,
    state: r.state,
    cpu: r.cpu,
    memory: r.memory,
    port: r.port,
    envVars: JSON.parse(r.env_json) as Record<string, string>,
    volumeGb: r.volume_gb,
    slot: r.slot,
    pid: r.pid,
    runDir: r.run_dir,
    exitCode: r.exit_code,
    error: r.error,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    startedAt: r.started_at,
    stoppedAt: r.stopped_at,
    snapshotDir: r.snapshot_dir,
    wake: r.wake === 1,
    runs: r.runs,
    idleStopS: r.idle_stop_s,
  };
}

export type BuildStatus = 'created' | 'building' | 'succeeded' | 'failed';

export interface BuildRecord {
  id: string;
  accountId: string;
  imageId: string;
  source: 'github' | 'files';
  repository: string | null;
  branch: string | null;
  status: BuildStatus;
  error: string | null;
  createdAt: number;
  updatedAt: number;
  startedAt: number | null;
  finishedAt: number | null;
}

interface BuildRow {
  id: string;
  account_id: string;
  image_id: string;
  source: 'github' | 'files';
  repository: string | null;
  branch: string | null;
  status: BuildStatus;
  error: string | null;
  created_at: number;
  updated_at: number;
  started_at: number | null;
  finished_at: number | null;
}

function buildFromRow(r: BuildRow): BuildRecord {
  return {
    id: r.id,
    accountId: r.account_id,
    imageId: r.image_id,
    source: r.source,
    repository: r.repository,
    branch: r.branch,
    status: r.status,
    error: r.error,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    startedAt: r.started_at,
    finishedAt: r.finished_at,
  };
}

export type LogLevel = 'info' | 'error' | 'platform';

export interface LogLine {
  id: number;
  ts: number;
  level: LogLevel;
  message: string;
}

export interface LogQuery {
  query?: string;
  from?: number;
  to?: number;
  order: 'oldest_first' | 'newest_first';
  limit: number;
  /** id of the last line of the previous page */
  after?: number;
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

function ownedBy<T extends { accountId: string }>(r: T | null, accountId: string): T | null {
  return r && r.accountId === accountId ? r : null;
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
    return ownedBy(this.getImageById(id), accountId);
  }

  listImages(accountId: string, limit: number, cursor: { createdAt: number; id: string } | null): Page<ImageRecord> {
    return this.page<ImageRow, ImageRecord>('images', ['account_id = @accountId'], { accountId }, limit, cursor, imageFromRow);
  }

  /** One page of a table in (created_at, id) order after `cursor`, with the cursor of the next page. */
  private page<Row extends { created_at: number; id: string }, T>(
    table: 'images' | 'vms',
    where: string[],
    params: Record<string, unknown>,
    limit: number,
    cursor: { createdAt: number; id: string } | null,
    map: (r: Row) => T,
  ): Page<T> {
    const clauses = cursor ? [...where, '(created_at, id) > (@cAt, @cId)'] : where;
    const rows = this.db
      .prepare(`SELECT * FROM ${table} WHERE ${clauses.join(' AND ')} ORDER BY created_at, id LIMIT @lim`)
      .all({ ...params, ...(cursor ? { cAt: cursor.createdAt, cId: cursor.id } : {}), lim: limit + 1 }) as Row[];
    const kept = rows.slice(0, limit);
    const last = kept[kept.length - 1];
    return { items: kept.map(map), next: rows.length > limit && last ? encodeCursor(last.created_at, last.id) : null };
  }

  updateImage(
    id: string,
    fields: Partial<Pick<ImageRecord, 'status' | 'digest' | 'size' | 'phase' | 'progressBytes' | 'totalBytes' | 'error' | 'config' | 'rootfsPath'>>,
    now = Date.now(),
  ): void {
    const { config, ...rest } = fields;
    this.updateRow('images', id, { ...rest, ...(config !== undefined ? { configJson: config ? JSON.stringify(config) : null } : {}) }, now);
  }

  /** Sets the given camelCase fields (as snake_case columns) and updated_at on one row. */
  private updateRow(table: 'images' | 'vms' | 'builds', id: string, fields: Record<string, unknown>, now: number): void {
    const columns: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(fields)) {
      if (v !== undefined) columns[k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)] = v;
    }
    const sets = Object.keys(columns).map((n) => `${n} = @${n}`);
    sets.push('updated_at = @updated_at');
    this.db.prepare(`UPDATE ${table} SET ${sets.join(', ')} WHERE id = @id`).run({ ...columns, updated_at: now, id });
  }

  /** Imports cannot resume after a restart (the password is never stored), so they end as failed. */
  failInterruptedImports(reason: string, now = Date.now()): number {
    return this.db
      .prepare(`UPDATE images SET status = 'failed', phase = 'failed', error = ?, updated_at = ? WHERE status = 'importing'`)
      .run(reason, now).changes;
  }

  // --- VMs ---

  insertVm(
    vm: Pick<VmRecord, 'id' | 'accountId' | 'imageId' | 'kind' | 'cpu' | 'memory' | 'port' | 'envVars' | 'volumeGb'> & Partial<Pick<VmRecord, 'wake' | 'idleStopS'>>,
    now = Date.now(),
  ): VmRecord {
    this.db
      .prepare(
        `INSERT INTO vms (id, account_id, image_id, kind, state, cpu, memory, port, env_json, volume_gb, wake, idle_stop_s, created_at, updated_at)
         VALUES (?, ?, ?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(vm.id, vm.accountId, vm.imageId, vm.kind, vm.cpu, vm.memory, vm.port, JSON.stringify(vm.envVars), vm.volumeGb, vm.wake === false ? 0 : 1, vm.idleStopS ?? null, now, now);
    return this.getVmById(vm.id)!;
  }

  getVmById(id: string): VmRecord | null {
    const r = this.stmtVmById.get(id) as VmRow | undefined;
    return r ? vmFromRow(r) : null;
  }

  private readonly stmtVmById = this.lazy('SELECT * FROM vms WHERE id = ?');

  /** A VM as its owner sees it; another account's is indistinguishable from a missing one. */
  getVm(accountId: string, id: string): VmRecord | null {
    return ownedBy(this.getVmById(id), accountId);
  }

  listVms(
    accountId: string,
    filter: { imageId?: string; state?: string; kind: VmKind },
    limit: number,
    cursor: { createdAt: number; id: string } | null,
  ): Page<VmRecord> {
    const where = ['account_id = @accountId', 'kind = @kind'];
    if (filter.imageId) where.push('image_id = @imageId');
    if (filter.state) where.push('state = @state');
    return this.page<VmRow, VmRecord>('vms', where, { accountId, kind: filter.kind, imageId: filter.imageId, state: filter.state }, limit, cursor, vmFromRow);
  }

  vmsInStates(states: VmState[], kind?: VmKind): VmRecord[] {
    const rows = this.db
      .prepare(`SELECT * FROM vms WHERE state IN (${states.map(() => '?').join(', ')})${kind ? ' AND kind = ?' : ''} ORDER BY created_at`)
      .all(...states, ...(kind ? [kind] : [])) as VmRow[];
    return rows.map(vmFromRow);
  }

  countLiveVms(accountId: string): number {
    const r = this.db
      .prepare(`SELECT COUNT(*) AS n FROM vms WHERE account_id = ? AND state IN (${LIVE_VM_STATES.map((s) => `'${s}'`).join(', ')})`)
      .get(accountId) as { n: number };
    return r.n;
  }

  updateVm(
    id: string,
    fields: Partial<Pick<VmRecord, 'state' | 'slot' | 'pid' | 'runDir' | 'exitCode' | 'error' | 'startedAt' | 'stoppedAt' | 'snapshotDir' | 'runs'>>,
    now = Date.now(),
  ): void {
    this.updateRow('vms', id, fields, now);
  }

  // --- builds ---

  insertBuild(b: Pick<BuildRecord, 'id' | 'accountId' | 'imageId' | 'source' | 'repository' | 'branch'>, now = Date.now()): BuildRecord {
    this.db
      .prepare(
        `INSERT INTO builds (id, account_id, image_id, source, repository, branch, status, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?)`,
      )
      .run(b.id, b.accountId, b.imageId, b.source, b.repository, b.branch, now, now);
    return this.getBuild(b.accountId, b.id)!;
  }

  getBuild(accountId: string, id: string): BuildRecord | null {
    const r = this.db.prepare('SELECT * FROM builds WHERE id = ? AND account_id = ?').get(id, accountId) as BuildRow | undefined;
    return r ? buildFromRow(r) : null;
  }

  updateBuild(id: string, fields: Partial<Pick<BuildRecord, 'status' | 'error' | 'startedAt' | 'finishedAt'>>, now = Date.now()): void {
    this.updateRow('builds', id, fields, now);
  }

  /** Builds cannot resume after a restart (the token is never stored): they end as failed. */
  failInterruptedBuilds(reason: string, now = Date.now()): BuildRecord[] {
    const rows = this.db.prepare(`SELECT * FROM builds WHERE status IN ('created', 'building')`).all() as BuildRow[];
    for (const r of rows) this.updateBuild(r.id, { status: 'failed', error: reason, finishedAt: now }, now);
    return rows.map(buildFromRow);
  }

  // --- log lines ---

  appendLogs(lines: Array<{ ownerId: string; ts: number; level: LogLevel; message: string }>): number[] {
    const stmt = this.db.prepare('INSERT INTO log_lines (owner_id, ts, level, message) VALUES (?, ?, ?, ?)');
    return this.db.transaction(() => lines.map((l) => Number(stmt.run(l.ownerId, l.ts, l.level, l.message).lastInsertRowid)))();
  }

  /** Deletes log lines older than `ts`; returns how many. */
  deleteLogsBefore(ts: number): number {
    return this.db.prepare('DELETE FROM log_lines WHERE ts < ?').run(ts).changes;
  }

  queryLogs(ownerId: string, q: LogQuery): LogLine[] {
    const where = ['owner_id = @ownerId'];
    if (q.query) where.push("message LIKE @like ESCAPE '\\'");
    if (q.from !== undefined) where.push('ts >= @from');
    if (q.to !== undefined) where.push('ts <= @to');
    const desc = q.order === 'newest_first';
    if (q.after !== undefined) where.push(desc ? 'id < @after' : 'id > @after');
    const like = q.query ? `%${q.query.replace(/[\\%_]/g, (c) => `\\${c}`)}%` : undefined;
    return this.db
      .prepare(`SELECT id, ts, level, message FROM log_lines WHERE ${where.join(' AND ')} ORDER BY id ${desc ? 'DESC' : 'ASC'} LIMIT @limit`)
      .all({ ownerId, like, from: q.from, to: q.to, after: q.after, limit: q.limit }) as LogLine[];
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
