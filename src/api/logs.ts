import type { FastifyReply, FastifyRequest } from 'fastify';
import type { LogService } from '../logs/service.js';
import type { LogLine, LogQuery } from '../store/store.js';
import { ApiError } from './errors.js';
import { parseLimit } from './params.js';

export interface LogsQueryString {
  query?: string;
  batch?: string;
  order?: 'oldest_first' | 'newest_first';
  pagination?: string;
  from?: string;
  to?: string;
  follow?: string;
}

export interface LogsPage {
  lines: Array<{ timestamp: number; level: string; message: string }>;
  pagination?: string;
  from?: string;
  to?: string;
}

const view = (l: LogLine) => ({ timestamp: l.ts, level: l.level, message: l.message });

function parseTime(v: string | undefined, field: string): number | undefined {
  if (v === undefined) return undefined;
  const t = Date.parse(v);
  if (Number.isNaN(t)) throw new ApiError(400, 'invalid_request', `${field} must be an ISO-8601 date-time`, field);
  return t;
}

function parseQuery(q: LogsQueryString): LogQuery {
  let after: number | undefined;
  if (q.pagination !== undefined) {
    const m = /^l:(\d{1,15})$/.exec(Buffer.from(q.pagination, 'base64url').toString());
    if (!m) throw new ApiError(400, 'invalid_request', 'pagination is not a token this server issued', 'pagination');
    after = Number(m[1]);
  }
  return {
    query: q.query || undefined,
    from: parseTime(q.from, 'from'),
    to: parseTime(q.to, 'to'),
    order: q.order ?? 'oldest_first',
    limit: parseLimit(q.batch, 'batch', 100, 50, 1000),
    after,
  };
}

/**
 * A page of log lines (`{lines, pagination?, from?, to?}`), or with `follow=true` a live stream until
 * the owner stops: NDJSON (one `{timestamp, level, message}` per line), or Server-Sent Events when
 * the client sends `Accept: text/event-stream`.
 */
export async function sendLogs(
  req: FastifyRequest,
  reply: FastifyReply,
  logs: LogService,
  ownerId: string,
  qs: LogsQueryString,
  isLive: () => boolean,
): Promise<LogsPage | undefined> {
  const q = parseQuery(qs);
  if (qs.follow !== 'true') {
    const rows = logs.query(ownerId, { ...q, limit: q.limit + 1 });
    const page = rows.slice(0, q.limit);
    const last = page[page.length - 1];
    return {
      lines: page.map(view),
      ...(rows.length > q.limit && last ? { pagination: Buffer.from(`l:${last.id}`).toString('base64url') } : {}),
      ...(qs.from ? { from: qs.from } : {}),
      ...(qs.to ? { to: qs.to } : {}),
    };
  }

  const sse = (req.headers.accept ?? '').includes('text/event-stream');
  const matches = (l: LogLine) =>
    (!q.query || l.message.toLowerCase().includes(q.query.toLowerCase())) && (q.from === undefined || l.ts >= q.from) && (q.to === undefined || l.ts <= q.to);
  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, {
    'content-type': sse ? 'text/event-stream' : 'application/x-ndjson',
    'cache-control': 'no-cache',
    'x-request-id': req.id,
  });
  const write = (l: LogLine) => res.write(sse ? `id: ${l.id}\ndata: ${JSON.stringify(view(l))}\n\n` : `${JSON.stringify(view(l))}\n`);
  let lastId = q.after ?? 0;
  const buffered: LogLine[] = [];
  let replaying = true;
  const unsubscribe = logs.subscribe(ownerId, (l) => {
    if (replaying) buffered.push(l);
    else if (l.id > lastId && matches(l)) {
      lastId = l.id;
      write(l);
    }
  });
  const finish = (): void => {
    unsubscribe();
    offEnd();
    res.end();
  };
  const offEnd = logs.onEnd(ownerId, finish);
  res.on('close', () => {
    unsubscribe();
    offEnd();
  });
  // History first (oldest first, in pages), then what arrived meanwhile, then live lines.
  for (;;) {
    const page = logs.query(ownerId, { ...q, order: 'oldest_first', after: lastId, limit: 1000 });
    for (const l of page) write(l);
    if (page.length) lastId = page[page.length - 1]!.id;
    if (page.length < 1000) break;
  }
  replaying = false;
  for (const l of buffered) {
    if (l.id > lastId && matches(l)) {
      lastId = l.id;
      write(l);
    }
  }
  if (!isLive()) finish();
  return undefined; // the reply was hijacked and is written directly
}
