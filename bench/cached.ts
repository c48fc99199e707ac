import fs from 'node:fs';
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
  const srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17', CAKEWORK_LOG_LEVEL: 'warn' });
  try {
    await pushImage(reg, 'bench/httpd', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
    const imp = await srv.call('POST', '/v1/image/import', { imageUri: `${reg.host}/bench/httpd:v1`, password: 'bench-pass' });
    const image = await srv.waitForImage(imp.body.imageId);
    const apiPort = Number(new URL(srv.url).port);
    const cached = (await srv.call('POST', '/v1/vm/cache', { imageId: image.imageId, cpu: 1, memory: 256, port: 8080 })).body;
    if (cached.state !== 'stopped') throw new Error(`cacheVM: ${JSON.stringify(cached)}`);

    const warm: number[] = [];
    const backToBack: number[] = [];
    const cold: number[] = [];
    const timeStart = async (into: number[]) => {
      const t0 = performance.now();
      const s = await srv.call('POST', `/v1/vm/cached/${cached.id}/start`);
      if (s.body.state !== 'started') throw new Error(`startCachedVM: ${JSON.stringify(s.body)}`);
      await until200('127.0.0.1', apiPort, '/index.html', cached.hostname);
      into.push(performance.now() - t0);
      await srv.call('POST', `/v1/vm/cached/${cached.id}/stop`);
    };
    for (let i = 0; i < runs; i++) {
      // a start some time after the last stop: the next run was prepared in between (the server's
      // default CAKEWORK_PREPARE_RESTORES=warm: restored, warmed up by one request, paused)
      await new Promise((r) => setTimeout(r, 500));
      await timeStart(warm);
      // a start right after a stop: its preparation is still running
      if (i % 2 === 0) await timeStart(backToBack);
      else {
        const t1 = performance.now();
        const r = await srv.call('POST', '/v1/vm/start', { imageId: image.imageId, cpu: 1, memory: 256, port: 8080 });
        await until200('127.0.0.1', apiPort, '/index.html', r.body.hostname);
        cold.push(performance.now() - t1);
        await srv.call('POST', `/v1/vm/${r.body.id}/stop`);
      }
    }
    // host memory of the paused, warmed-up standby QEMU of the stopped cached VM
    await new Promise((r) => setTimeout(r, 2000));
    const standbyPss = fs
      .readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .filter((p) => {
        try {
          return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(`${srv.dataDir}/vms/${cached.id}/`);
        } catch {
          return false;
        }
      })
      .map((p) => Number(/^Pss:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${p}/smaps_rollup`, 'utf8'))?.[1] ?? 0) / 1024);
    const w = median(warm);
    const c = median(cold);
    const list = (xs: number[]) => xs.map((x) => x.toFixed(0)).join(', ');
    console.log(`cached VM start (busybox httpd, 1 vCPU, 256 MB, TCG): ${runs} prepared restores, ${backToBack.length} back-to-back, ${cold.length} cold starts, interleaved`);
    console.log(`  startCachedVM -> first HTTP 200, warm standby ready:    median ${fmtMs(w)}  [${list(warm)}]`);
    console.log(`  startCachedVM -> first HTTP 200, right after a stop:     median ${fmtMs(median(backToBack))}  [${list(backToBack)}]`);
    console.log(`  startVM (cold boot) -> first HTTP 200:                    median ${fmtMs(c)}  [${list(cold)}]`);
    console.log(`  cached (standby) is ${(c / w).toFixed(1)}x faster than cold (target >= 6x; <= 150 ms, stretch <= 50 ms)`);
    console.log(`  host memory (PSS) of the paused standby QEMU of a stopped cached VM: ${standbyPss.map((x) => x.toFixed(0)).join(', ')} MiB`);
  } finally {
    await srv.close();
    await reg.stop();
  }
}
