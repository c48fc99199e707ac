import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry } from '../test/helpers/registry.js';
import { apiCall, startServerProcess } from '../test/helpers/server.js';
import { fmtMs, median } from './stats.js';

/**
 * A small Dockerfile build (FROM a local registry image, COPY, two RUNs) through the API, until the
 * image is ready to run, against `buildah build` with the same flags on the same context.
 */
export async function benchBuild(runs: number): Promise<void> {
  const reg = await startRegistry({ users: { bench: 'bench-pass' } });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-bench-build-'));
  const auth = path.join(dir, 'auth.json');
  fs.writeFileSync(auth, JSON.stringify({ auths: { [reg.host]: { auth: Buffer.from('bench:bench-pass').toString('base64') } } }));
  // The server as in production: its own process, from dist/.
  const key = 'cw_bench_build_key';
  const server = await startServerProcess({ CAKEWORK_API_KEY: key, CAKEWORK_INSECURE_REGISTRIES: reg.host, CAKEWORK_BUILD_AUTH_FILE: auth }, path.join(dir, 'data'));
  const srv = { call: (m: string, u: string, b?: unknown) => apiCall(server.url, key, m, u, b) };
  try {
    await pushImage(reg, 'bench/base', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
    const dockerfile = [`FROM ${reg.host}/bench/base:v1`, 'COPY . /www/', 'RUN ["/bin/sh", "-c", "echo one > /www/one.txt"]', 'RUN ["/bin/sh", "-c", "ls /www > /www/list.txt"]', ''].join('\n');
    const files = Array.from({ length: 20 }, (_, i) => ({ dir: 'site', name: `page${i}.html`, content: `<p>page ${i}</p>\n`.repeat(50) }));
    const ctx = path.join(dir, 'context');
    for (const f of files) {
      fs.mkdirSync(path.join(ctx, f.dir), { recursive: true });
      fs.writeFileSync(path.join(ctx, f.dir, f.name), f.content);
    }
    fs.writeFileSync(path.join(dir, 'Dockerfile'), dockerfile);
    const regConf = path.join(dir, 'registries.conf');
    fs.writeFileSync(regConf, `[[registry]]\nlocation = "${reg.host}"\ninsecure = true\n`);

    const api: number[] = [];
    const cli: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const r = await srv.call('POST', '/v1/image/build/files', { dockerfile, files });
      for (;;) {
        const b = (await srv.call('GET', `/v1/image/build/${r.body.buildId}`)).body;
        if (b.status === 'failed') throw new Error(`build failed: ${b.error}`);
        if (b.status === 'succeeded') break;
        await new Promise((res) => setTimeout(res, 10));
      }
      api.push(performance.now() - t0);

      const t1 = performance.now();
      execFileSync(
        'buildah',
        // the same flags the server passes (src/builds/service.ts: buildArgs, with the default limits)
        ['build', '--quiet', '--isolation', 'oci', '--runtime', 'runc', '--network', 'none', '--memory', '2048m', '--cpu-period', '100000', '--cpu-quota', '200000', '--layers=false', '--pull=missing', '--file', path.join(dir, 'Dockerfile'), '--tag', 'localhost/cakework-bench-cli', ctx],
        { env: { ...process.env, REGISTRY_AUTH_FILE: auth, CONTAINERS_REGISTRIES_CONF: regConf }, stdio: 'ignore', timeout: 600_000 },
      );
      cli.push(performance.now() - t1);
      execFileSync('buildah', ['rmi', '--force', 'localhost/cakework-bench-cli'], { stdio: 'ignore', timeout: 60_000 });
    }
    const a = median(api);
    const c = median(cli);
    console.log(`build: small Dockerfile (FROM, COPY of 20 files, 2 RUNs), ${runs} runs each`);
    console.log(`  through the API, until the image is ready (build + push + import + disk): median ${fmtMs(a)}  [${api.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  buildah build CLI, same flags and context:                                median ${fmtMs(c)}  [${cli.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  ratio API / CLI: ${(a / c).toFixed(2)}x (target <= 1.3x)`);
  } finally {
    await server.stop();
    await reg.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
