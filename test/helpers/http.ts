import http from 'node:http';

/** An HTTP request to the server with a chosen Host header (fetch cannot set Host). */
export function request(
  baseUrl: string,
  host: string,
  path = '/',
  opts: { method?: string; body?: string | Buffer; headers?: Record<string, string>; timeoutMs?: number } = {},
): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  const u = new URL(baseUrl);
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: u.hostname, port: u.port, path, method: opts.method ?? 'GET', headers: { ...opts.headers, host }, agent: false },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString(), headers: res.headers }));
        res.on('error', reject);
      },
    );
    req.setTimeout(opts.timeoutMs ?? 10_000, () => req.destroy(new Error('request timed out')));
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** Polls until the endpoint answers 200 (or the deadline passes); returns the 200 response. */
export async function waitFor200(baseUrl: string, host: string, path = '/', timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    try {
      const r = await request(baseUrl, host, path, { timeoutMs: 2000 });
      if (r.status === 200) return r;
      last = `${r.status} ${r.body}`;
    } catch (err) {
      last = (err as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`no 200 from ${host}${path} within ${timeoutMs} ms; last: ${last}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
