/** Versioned schema: entry N brings the database from user_version N to N+1. Never edit a shipped entry. */
export const migrations: string[] = [
  `
  CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
  );
  CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
  );
  CREATE TABLE images (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    source TEXT NOT NULL,
    image_uri TEXT,
    status TEXT NOT NULL,
    digest TEXT,
    size INTEGER,
    phase TEXT,
    progress_bytes INTEGER NOT NULL DEFAULT 0,
    total_bytes INTEGER,
    error TEXT,
    config_json TEXT,
    rootfs_path TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
  );
  CREATE INDEX images_account ON images(account_id, created_at, id);
  `,
  `
  CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    image_id TEXT NOT NULL REFERENCES images(id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    port INTEGER NOT NULL,
    env_json TEXT NOT NULL,
    volume_gb INTEGER,
    slot INTEGER,
    pid INTEGER,
    run_dir TEXT,
    exit_code INTEGER,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    started_at INTEGER,
    stopped_at INTEGER
  );
  CREATE INDEX vms_account ON vms(account_id, created_at, id);
  CREATE INDEX vms_state ON vms(state);
  CREATE TABLE log_lines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
  );
  CREATE INDEX log_lines_owner ON log_lines(owner_id, id);
  `,
  `
  ALTER TABLE vms ADD COLUMN snapshot_dir TEXT;
  ALTER TABLE vms ADD COLUMN wake INTEGER NOT NULL DEFAULT 1;
  ALTER TABLE vms ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
  ALTER TABLE vms ADD COLUMN idle_stop_s INTEGER;
  `,
  `
  CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    image_id TEXT NOT NULL REFERENCES images(id),
    source TEXT NOT NULL,
    repository TEXT,
    branch TEXT,
    status TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
  );
  CREATE INDEX builds_account ON builds(account_id, created_at, id);
  `,
];
