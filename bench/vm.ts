import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { encodeGuestRun, guestAssets, guestRun } from '../src/vms/guest.js';
import { Machine } from '../src/vms/machine.js';
import { HostNetwork } from '../src/vms/network.js';
import { makeScratchDisk } from '../src/vms/scratch.js';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry } from '../test/helpers/registry.js';
import { startTestServer } from '../test/helpers/server.js';
import { fmtMs, median } from './stats.js';

function get(host: string, port: number, path: string, hostHeader?: string): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get({ host, port, path, headers: hostHeader ? { host: hostHeader } : {}, agent: false, timeout: 1000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', () => resolve(0));
    req.on('timeout', () => req.destroy());
  });
}

export async function until200(host: string, port: number, path: string, hostHeader?: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  while ((await get(host, port, path, hostHeader)) !== 200) {
    if (Date.now() > deadline) throw new Error('no HTTP 200 within 60 s');
    await new Promise((r) => setTimeout(r, 5));
  }
}

function pssKb(pid: number): number {
  const m = /^Pss:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

/**
 * startVM → first HTTP 200 through the endpoint, against bare QEMU booting the same kernel,
 * initramfs and image disk to the same first HTTP 200 (polled on the guest address directly, tap and
 * scratch disk made beforehand, untimed): the floor. Plus host memory per idle 256 MB VM.
 */
export async function benchVm(runs: number): Promise<void> {
  const reg = await startRegistry({ users: { bench: 'bench-pass' } });
  const srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17', CAKEWORK_LOG_LEVEL: 'warn' });
  const scratchDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-bench-vm-'));
  try {
    await pushImage(reg, 'bench/httpd', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
    const imp = await srv.call('POST', '/v1/image/import', { imageUri: `${reg.host}/bench/httpd:v1`, password: 'bench-pass' });
    const image = await srv.waitForImage(imp.body.imageId);
    const apiPort = Number(new URL(srv.url).port);

    const ours: number[] = [];
    const floor: number[] = [];
    const net = new HostNetwork('198.19.200.0/24', 'bnc');
    await net.init();
    const runOurs = async (): Promise<void> => {
      const t0 = performance.now();
      const r = await srv.call('POST', '/v1/vm/start', { imageId: image.imageId, cpu: 1, memory: 256, port: 8080 });
      if (r.status !== 200) throw new Error(`startVM: ${JSON.stringify(r.body)}`);
      await until200('127.0.0.1', apiPort, '/index.html', r.body.hostname);
      ours.push(performance.now() - t0);
      await srv.call('POST', `/v1/vm/${r.body.id}/stop`);
    };
    const runFloor = async (i: number): Promise<void> => {
      const link = net.link(10 + i);
      const runDir = path.join(scratchDir, `floor-${i}`);
      fs.mkdirSync(runDir);
      const scratch = path.join(runDir, 'scratch.ext4');
      await makeScratchDisk(scratch, 2);
      await net.createTap(link);
      const config = encodeGuestRun(guestRun(image.config, {}, { hostname: 'floor', ip: link.guestIp, gateway: link.hostIp, prefix: link.prefix }), Date.now());
      const t1 = performance.now();
      const m = await Machine.launch(
        { id: `floor${i}`, cpu: 1, memoryMb: 256, imageDisk: srv.store.getImageById(image.imageId)!.rootfsPath!, scratchDisk: scratch, link, runDir, accel: 'tcg', assets: guestAssets() },
        config,
        { output: () => undefined },
      );
      // Polling before the guest has its address only buys ARP failures and their back-off.
      await m.started;
      await until200(link.guestIp, 8080, '/index.html');
      floor.push(performance.now() - t1);
      m.kill();
      await m.exited;
      await net.removeTap(link);
    };
    for (let i = 0; i < runs; i++) {
      // alternate the order so neither side always follows the other's teardown
      if (i % 2 === 0) {
        await runOurs();
        await runFloor(i);
      } else {
        await runFloor(i);
        await runOurs();
      }
    }

    // memory: three idle 256 MB VMs
    const idle = [];
    for (let i = 0; i < 3; i++) {
      const r = await srv.call('POST', '/v1/vm/start', { imageId: image.imageId, memory: 256, waitForPort: true });
      idle.push(r.body.id as string);
    }
    await new Promise((r) => setTimeout(r, 5000));
    const pss = idle.map((id) => pssKb(srv.store.getVmById(id)!.pid!) / 1024);
    for (const id of idle) await srv.call('POST', `/v1/vm/${id}/stop`);
    await net.teardown();

    const m = median(ours);
    const f = median(floor);
    console.log(`VM cold start (busybox httpd image, 1 vCPU, 256 MB, TCG), ${runs} runs each`);
    console.log(`  startVM -> first HTTP 200 through the endpoint: median ${fmtMs(m)}  [${ours.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  bare QEMU, same kernel+disk -> first HTTP 200:  median ${fmtMs(f)}  [${floor.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  ratio: ${(m / f).toFixed(2)}x the floor (target <= 1.25x, and <= 1200 ms)`);
    console.log(`  host memory (PSS) per idle 256 MB VM: ${pss.map((x) => x.toFixed(0)).join(', ')} MiB (target <= 100 MiB)`);
  } finally {
    await srv.close();
    await reg.stop();
    fs.rmSync(scratchDir, { recursive: true, force: true });
  }
}
