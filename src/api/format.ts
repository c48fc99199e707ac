/** Times are stored as unix ms and shown as ISO-8601, as the SDK parses them. */
export const iso = (ms: number): string => new Date(ms).toISOString();
export const isoOrNull = (ms: number | null): string | null => (ms === null ? null : iso(ms));
