import { decodeCursor } from '../store/store.js';
import { ApiError } from './errors.js';

/** Query-string helpers shared by the list and log routes: numbers and tokens arrive as strings. */

export function parseLimit(raw: string | undefined, field: string, fallback: number, min: number, max: number): number {
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (n < min || n > max) throw new ApiError(400, 'invalid_request', `${field} must be between ${min} and ${max}`, field);
  return n;
}

export function parseCursor(token: string | undefined): { createdAt: number; id: string } | null {
  if (token === undefined) return null;
  const c = decodeCursor(token);
  if (!c) throw new ApiError(400, 'invalid_request', 'pagination is not a token this server issued', 'pagination');
  return c;
}
