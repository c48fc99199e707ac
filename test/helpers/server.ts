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
  call(method: string, url: string, body?: unknown, key?: string | null): Promise<ApiResponse>;
  waitForImage(imageId: string, timeoutMs?: number, key?: string): Promise<any>;
}

export type ApiResponse = { status: number; body: any; headers: Headers };

/** One JSON API call; a non-JSON body comes back as text. */
export async function apiCall(base: string, key: string | null, method: string, url: string, body?: unknown): Promise<ApiResponse> {
  const headers: Record<string, string> = {};
  if (key !== null) headers['x-api-key'] = key;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(base + url, { method, headers, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    /* not JSON: the test sees the text */
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

/** A real server on a loopback port with its own SQLite file; logs go to a file for post-mortems. */
export async function startTestServer(env: Record<string, string> = {}, dataDir?: string): Promise<TestServer> {
  const dir = dataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cw-data-'));
  fs.mkdirSync(dir, { recursive: true });
  const key = env.CAKEWORK_API_KEY ?? 'cw_test_key_' + Math.random().toString(36).slice(2);
  const config = loadConfig({ CAKEWORK_PORT: '0', CAKEWORK_HOST: '127.0.0.1', CAKEWORK_DATA_DIR: dir, CAKEWORK_API_KEY: key, ...env });
  const logger = pino({ level: 'debug' }, destination({ dest: path.join(dir, 'server.log'), sync: true }));
  const server = await startServer(config, logger);
  const call: TestServer['call'] = (method, url, body, k = key) => apiCall(server.url, k, method, url, body);
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

export interface ServerProcess {
  url: string;
  pid: number;
  /** SIGKILL: the crash case */
  crash(): Promise<void>;
  stop(): Promise<void>;
}

/** The real server as its own process (`node dist/main.js`), so a test can kill -9 it. */
export async function startServerProcess(env: Record<string, string>, dataDir: string): Promise<ServerProcess> {
  const { spawn } = await import('node:child_process');
  const { freePort } = await import('./registry.js');
  const port = env.CAKEWORK_PORT ?? String(await freePort());
  fs.mkdirSync(dataDir, { recursive: true });
  const out = fs.openSync(path.join(dataDir, 'server-process.log'), 'a');
  const child = spawn('node', ['dist/main.js'], {
    env: { ...process.env, CAKEWORK_HOST: '127.0.0.1', CAKEWORK_PORT: port, CAKEWORK_DATA_DIR: dataDir, ...env },
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  const url = `http://127.0.0.1:${port}`;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  for (let i = 0; ; i++) {
    if (child.exitCode !== null) throw new Error(`server exited: ${fs.readFileSync(path.join(dataDir, 'server-process.log'), 'utf8').slice(-2000)}`);
    if (await fetch(`${url}/healthz`).then((r) => r.ok, () => false)) break;
    if (i > 600) throw new Error('server did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url,
    pid: child.pid!,
    async crash() {
      child.kill('SIGKILL');
      await exited;
    },
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await exited;
      }
    },
  };
}
