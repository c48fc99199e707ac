import crypto from 'node:crypto';
import type { ApiKeyRecord, Store } from '../store/store.js';
import { newId } from '../util/ids.js';

// Keys carry 256 random bits, so a plain SHA-256 is enough to store them (no slow KDF needed,
// which keeps authentication off the latency budget of control calls).
export function hashKey(key: string): string {
  return crypto.createHash('sha256').update(key).digest('hex');
}

export function generateKey(): string {
  return `cw_${crypto.randomBytes(32).toString('base64url')}`;
}

function displayPrefix(key: string): string {
  return key.slice(0, 10);
}

export interface CreatedKey {
  key: string;
  record: ApiKeyRecord;
}

/** Creates a key; without an account id it also creates the account the key belongs to. */
export function createKey(store: Store, opts: { name?: string; accountId?: string; key?: string }): CreatedKey {
  const key = opts.key ?? generateKey();
  const name = opts.name ?? 'default';
  return store.db.transaction((): CreatedKey => {
    let accountId = opts.accountId;
    if (accountId) {
      if (!store.getAccount(accountId)) throw new Error(`no account with id ${accountId}`);
    } else {
      accountId = store.createAccount(newId('acc_'), name).id;
    }
    const record = { id: newId('key_'), accountId, name, prefix: displayPrefix(key), createdAt: Date.now() };
    store.insertKey(record, hashKey(key));
    return { key, record: { ...record, revokedAt: null } };
  })();
}

/**
 * Makes sure a key given by the operator (CAKEWORK_API_KEY) is usable. Returns the account id.
 * A key the operator revoked stays revoked: setting the variable again does not resurrect it.
 */
export function ensureKey(store: Store, key: string): { accountId: string; created: boolean; revoked: boolean } {
  const existing = store.findKeyByHash(hashKey(key));
  if (existing) return { accountId: existing.accountId, created: false, revoked: existing.revokedAt !== null };
  const { record } = createKey(store, { key, name: 'CAKEWORK_API_KEY' });
  return { accountId: record.accountId, created: true, revoked: false };
}

/** The account a presented key acts for, or null for an unknown or revoked key. */
export function authenticate(store: Store, key: string): string | null {
  const rec = store.findKeyByHash(hashKey(key));
  return rec && rec.revokedAt === null ? rec.accountId : null;
}
