import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import autocannon from 'autocannon';
import { freePort } from '../test/helpers/registry.js';

interface Latency {
  p50: number;
  p99: number;
  max: number;
  rps: number;
}

/**
 * `clients` keep-alive connections, each sending `perSecond` requests a second on a fixed schedule
 * (open loop: a slow answer does not slow the schedule down), timed with sub-millisecond resolution.
 */
async function paced(url: string, headers: Record<string, string>, clients: number, perSecond: number, durationMs: number): Promise<Latency> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: clients });
  const once = () =>
    new Promise<number>((resolve, reject) => {
      const t0 = performance.now();
      http
        .get(url, { agent, headers }, (res) => {
          res.resume();
          res.on('end', () => (res.statusCode === 200 ? resolve(performance.now() - t0) : reject(new Error(`HTTP ${res.statusCode}`))));
        })
        .on('error', reject);
    });
  const samples: number[] = [];
  const interval = 1000 / perSecond;
  const start = performance.now() + 50;
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      for (let i = 0; ; i++) {
        const due = start + (c / clients) * interval + i * interval;
        if (due - start > durationMs) break;
        const wait = due - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        samples.push(await once());
      }
    }),
  );
  agent.destroy();
  samples.sort((a, b) => a - b);
  const at = (q: number) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))]!;
  return { p50: at(0.5), p99: at(0.99), max: samples[samples.length - 1]!, rps: samples.length / (durationMs / 1000) };
}

/**
 * Control-call latency: GET /v1/image/{id} (auth + SQLite read + JSON) under 50 concurrent clients,
 * against GET /healthz (no auth, no database) on the same server in the same run as the floor.
 * The server runs as its own process (`node dist/main.js`), as in production.
 */
export async function benchControl(): Promise<void> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-bench-control-'));
  const port = await freePort();
  const key = 'cw_bench_control_key';
  const child = spawn('node', ['dist/main.js'], {
    env: { ...process.env, CAKEWORK_PORT: String(port), CAKEWORK_HOST: '127.0.0.1', CAKEWORK_DATA_DIR: dataDir, CAKEWORK_API_KEY: key },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const base = `http://127.0.0.1:${port}`;
  try {
    for (let i = 0; ; i++) {
      if (await fetch(`${base}/healthz`).then((r) => r.ok, () => false)) break;
      if (i > 200) throw new Error('server did not start');
      await new Promise((r) => setTimeout(r, 50));
    }
    const res = await fetch(`${base}/v1/image/import`, {
      method: 'POST',
      headers: { 'x-api-key': key, 'content-type': 'application/json' },
      body: JSON.stringify({ imageUri: '127.0.0.1:1/bench/none:1', password: '' }),
    });
    const { imageId } = (await res.json()) as { imageId: string };

    // Saturation (each client sends its next request as soon as the last is answered) shows the
    // throughput limit; paced clients show the latency callers see in normal use. The load generator
    // shares this machine's 2 cores with the server.
    const saturate = async (url: string, headers: Record<string, string>) => {
      await autocannon({ url, connections: 50, duration: 2, headers }); // warm-up
      const r = await autocannon({ url, connections: 50, duration: 10, headers });
      if (r.non2xx > 0 || r.errors > 0) throw new Error(`control bench saw ${r.non2xx} non-2xx and ${r.errors} errors on ${url}`);
      return { p50: r.latency.p50, p99: r.latency.p99, max: r.latency.max, rps: r.requests.average };
    };
    const imageUrl = `${base}/v1/image/${imageId}`;
    const auth = { 'x-api-key': key };
    const rows: Array<[string, Latency]> = [
      ['GET /healthz, saturation (floor: no auth, no DB)', await saturate(`${base}/healthz`, {})],
      ['GET /v1/image/{id}, saturation                 ', await saturate(imageUrl, auth)],
      ['GET /healthz, paced 50 x 40/s (floor)          ', await paced(`${base}/healthz`, {}, 50, 40, 10_000)],
      ['GET /v1/image/{id}, paced 50 x 40/s            ', await paced(imageUrl, auth, 50, 40, 10_000)],
    ];
    console.log('control calls: 50 concurrent clients, 10 s per row, server in its own process at log level info');
    for (const [name, r] of rows) {
      console.log(`  ${name}: p50 ${r.p50.toFixed(2)} ms, p99 ${r.p99.toFixed(2)} ms, max ${r.max.toFixed(2)} ms, ${Math.round(r.rps)} req/s`);
    }
    const p99 = rows[3]![1].p99;
    console.log(`  p99 target <= 5 ms with 50 paced clients: ${p99 <= 5 ? 'met' : 'NOT met'} (${p99.toFixed(2)} ms)`);
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}
