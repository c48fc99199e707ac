import { busyboxConfig, busyboxLayer, pushImage, startRegistry } from '../test/helpers/registry.js';
import { startTestServer } from '../test/helpers/server.js';
import { fmtMs, median } from './stats.js';
import { until200 } from './vm.js';

/**
 * startCachedVM → first HTTP 200 through the endpoint (restoring the snapshot), beside a cold
 * startVM → first HTTP 200 of the same image in the same run.
 */
export async function benchCached(runs: number): Promise<void> {
  const reg = await startRegistry({ users: { bench: 'bench-pass' } });
  const srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/16', CAKEWORK_LOG_LEVEL: 'warn' });
  try {
    await pushImage(reg, 'bench/httpd', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
    const imp = await srv.call('POST', '/v1/image/import', { imageUri: `${reg.host}/bench/httpd:v1`, password: 'bench-pass' });
    const image = await srv.waitForImage(imp.body.imageId);
    const apiPort = Number(new URL(srv.url).port);
    const cached = (await srv.call('POST', '/v1/vm/cache', { imageId: image.imageId, cpu: 1, memory: 256, port: 8080 })).body;
    if (cached.state !== 'stopped') throw new Error(`cacheVM: ${JSON.stringify(cached)}`);

    const warm: number[] = [];
    const cold: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      const s = await srv.call('POST', `/v1/vm/cached/${cached.id}/start`);
      if (s.body.state !== 'started') throw new Error(`startCachedVM: ${JSON.stringify(s.body)}`);
      await until200('127.0.0.1', apiPort, '/index.html', cached.hostname);
      warm.push(performance.now() - t0);
      await srv.call('POST', `/v1/vm/cached/${cached.id}/stop`);
      if (i % 2 === 0) {
        const t1 = performance.now();
        const r = await srv.call('POST', '/v1/vm/start', { imageId: image.imageId, cpu: 1, memory: 256, port: 8080 });
        await until200('127.0.0.1', apiPort, '/index.html', r.body.hostname);
        cold.push(performance.now() - t1);
        await srv.call('POST', `/v1/vm/${r.body.id}/stop`);
      }
    }
    const w = median(warm);
    const c = median(cold);
    console.log(`cached VM start (busybox httpd, 1 vCPU, 256 MB, TCG): ${runs} restores, ${cold.length} cold starts interleaved`);
    console.log(`  startCachedVM -> first HTTP 200: median ${fmtMs(w)}  [${warm.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  startVM (cold) -> first HTTP 200: median ${fmtMs(c)}  [${cold.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  cached is ${(c / w).toFixed(1)}x faster (target >= 6x, and <= 150 ms)`);
  } finally {
    await srv.close();
    await reg.stop();
  }
}
