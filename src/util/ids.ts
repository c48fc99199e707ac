import crypto from 'node:crypto';

/** Lowercase alphanumeric ids, so that a VM id can be a DNS label in `<vmId>.<domain>`. */
export function newId(prefix: string): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = crypto.randomBytes(16);
  let s = '';
  for (const b of bytes) s += alphabet[b % 36];
  return `${prefix}${s}`;
}
