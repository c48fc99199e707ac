import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pushImage, startRegistry } from '../test/helpers/registry.js';
import { startTestServer } from '../test/helpers/server.js';
import { fmtMs, median } from './stats.js';

/**
 * Import of the Debian minbase image (~170 MB, one gzip layer) from a local registry:
 * through our API (cold layer cache each run) against `skopeo copy` + `umoci raw unpack` of the same
 * image in the same run, writing to disk and to tmpfs. Ours unpacks on tmpfs and also writes the erofs
 * disk; the baseline stops at an unpacked directory.
 */
export async function benchImport(runs: number): Promise<void> {
  const fixtures = process.env.CAKEWORK_FIXTURES_DIR ?? '/var/cache/cakework-fixtures';
  const reg = await startRegistry({ users: { bench: 'bench-pass' } });
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-bench-import-'));
  try {
    const diffId = `sha256:${crypto.createHash('sha256').update(fs.readFileSync(path.join(fixtures, 'debian-minbase.tar'))).digest('hex')}`;
    await pushImage(reg, 'bench/debian', 'bookworm', {
      format: 'docker',
      layers: [{ blob: fs.readFileSync(path.join(fixtures, 'debian-minbase.tar.gz')), mediaType: 'application/vnd.docker.image.rootfs.diff.tar.gzip', diffId }],
      config: { Cmd: ['/bin/bash'] },
    });
    const uri = `${reg.host}/bench/debian:bookworm`;

    const ours: number[] = [];
    const warm: number[] = [];
    const baseline: number[] = [];
    const baselineTmpfs: number[] = [];
    const shm = fs.mkdtempSync('/dev/shm/cw-bench-');
    const runBaseline = (dir: string, i: number): number => {
      const layout = path.join(dir, `oci-${i}`);
      const rootfs = path.join(dir, `rootfs-${i}`);
      const t0 = performance.now();
      execFileSync('skopeo', ['copy', '--quiet', '--src-tls-verify=false', '--src-creds', 'bench:bench-pass', `docker://${uri}`, `oci:${layout}:bookworm`], { timeout: 600_000 });
      execFileSync('umoci', ['raw', 'unpack', '--image', `${layout}:bookworm`, rootfs], { timeout: 600_000, stdio: 'ignore' });
      const ms = performance.now() - t0;
      fs.rmSync(layout, { recursive: true, force: true });
      fs.rmSync(rootfs, { recursive: true, force: true });
      return ms;
    };
    for (let i = 0; i < runs; i++) {
      // Alternate which goes first so page-cache effects do not favour one side.
      const order = i % 2 === 0 ? ['ours', 'base', 'shm'] : ['shm', 'base', 'ours'];
      for (const which of order) {
        if (which === 'ours') {
          const dataDir = path.join(scratch, `data-${i}`);
          const srv = await startTestServer({}, dataDir);
          try {
            const t0 = performance.now();
            const r = await srv.call('POST', '/v1/image/import', { imageUri: uri, password: 'bench-pass' });
            const img = await srv.waitForImage(r.body.imageId, 600_000);
            if (img.status !== 'ready') throw new Error(`import failed: ${img.error}`);
            ours.push(performance.now() - t0);
            const t1 = performance.now();
            const again = await srv.call('POST', '/v1/image/import', { imageUri: uri, password: 'bench-pass' });
            await srv.waitForImage(again.body.imageId, 600_000);
            warm.push(performance.now() - t1);
          } finally {
            await srv.close();
            fs.rmSync(dataDir, { recursive: true, force: true });
          }
        } else if (which === 'base') {
          baseline.push(runBaseline(scratch, i));
        } else {
          baselineTmpfs.push(runBaseline(shm, i));
        }
      }
    }
    fs.rmSync(shm, { recursive: true, force: true });
    const m = median(ours);
    const b = median(baseline);
    console.log(`import: Debian minbase (${(fs.statSync(path.join(fixtures, 'debian-minbase.tar')).size / 1e6).toFixed(0)} MB unpacked), ${runs} runs each`);
    console.log(`  API import, cold cache (pull + verify + unpack + erofs): median ${fmtMs(m)}  [${ours.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  API import, same image again (cache hit):               median ${fmtMs(median(warm))}`);
    const bt = median(baselineTmpfs);
    console.log(`  skopeo copy + umoci raw unpack, on disk (baseline):      median ${fmtMs(b)}  [${baseline.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  skopeo copy + umoci raw unpack, on tmpfs (baseline):     median ${fmtMs(bt)}  [${baselineTmpfs.map((x) => x.toFixed(0)).join(', ')}]`);
    console.log(`  ratio API / baseline on disk: ${(m / b).toFixed(2)}x; API / baseline on tmpfs: ${(m / bt).toFixed(2)}x (target <= 1.0x)`);
  } finally {
    await reg.stop();
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}
