import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { destination, pino } from 'pino';
import { startServer, type Server } from '../../src/app.js';
import { loadConfig, type Config } from '../../src/config.js';

export interface TestServer extends Server {
  key: string;
  dataDir: string;
  config: Config;
  call(method: string, url: string, body?: unknown, key?: string | null): Promise<{ status: number; body: any; headers: Headers }>;
  waitForImage(imageId: string, timeoutMs?: number, key?: string): Promise<any>;
}

/** A real server on a loopback port with its own SQLite file; logs go to a file for post-mortems. */
export async function startTestServer(env: Record<string, string> = {}, dataDir?: string): Promise<TestServer> {
  const dir = dataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cw-data-'));
  fs.mkdirSync(dir, { recursive: true });
  const key = env.CAKEWORK_API_KEY ?? 'cw_test_key_' + Math.random().toString(36).slice(2);
  const config = loadConfig({ CAKEWORK_PORT: '0', CAKEWORK_HOST: '127.0.0.1', CAKEWORK_DATA_DIR: dir, CAKEWORK_API_KEY: key, ...env });
  const logger = pino({ level: 'debug' }, destination({ dest: path.join(dir, 'server.log'), sync: true }));
  const server = await startServer(config, logger);
  const call: TestServer['call'] = async (method, url, body, k = key) => {
    const headers: Record<string, string> = {};
    if (k !== null) headers['x-api-key'] = k;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(server.url + url, { method, headers, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      /* not JSON: the test sees the text */
    }
    return { status: res.status, body: parsed, headers: res.headers };
  };
  return {
    ...server,
    key,
    dataDir: dir,
    config,
    call,
    async waitForImage(imageId, timeoutMs = 120_000, k = key) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const r = await call('GET', `/v1/image/${imageId}`, undefined, k);
        if (r.status !== 200) throw new Error(`GET image: HTTP ${r.status} ${JSON.stringify(r.body)}`);
        if (r.body.status !== 'importing') return r.body;
        if (Date.now() > deadline) throw new Error(`image ${imageId} still importing after ${timeoutMs} ms: ${JSON.stringify(r.body)}`);
        await new Promise((res) => setTimeout(res, 20));
      }
    },
  };
}
