import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request, waitFor200 } from './helpers/http.js';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry, type Layer, type TestRegistry } from './helpers/registry.js';
import { apiCall, startServerProcess, startTestServer, type ServerProcess } from './helpers/server.js';
import { importImage, isOver, logLines, waitForLog, waitForVm, type Caller } from './helpers/vm.js';
import { execFileSync } from 'node:child_process';
import { instanceTag } from '../src/vms/service.js';

// Restarts, crashes and limits, with real QEMU guests and the server as a real process.

const skip = process.getuid?.() !== 0 ? 'VM tests need root (tap devices, nftables)' : !fs.existsSync('/var/cache/cakework-kernel/vmlinux') ? 'the guest kernel is not built (run scripts/setup.sh)' : false;

let reg: TestRegistry;
let layer: Layer;
const ticker = { ...busyboxConfig, Cmd: ['/bin/sh', '-c', 'httpd -p 8080 -h /www; i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'] };

function qemuPids(dir: string): number[] {
  return fs
    .readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        const c = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8');
        return c.startsWith('qemu-system') && c.includes(dir);
      } catch {
        return false;
      }
    })
    .map(Number);
}

const maxTick = (lines: Array<{ message: string }>) => Math.max(-1, ...lines.map((l) => /^tick (\d+)$/.exec(l.message)).filter(Boolean).map((m) => Number(m![1])));

describe('VM lifecycle across restarts and limits', { skip }, () => {
  before(async () => {
    reg = await startRegistry({ users: { life: 'life-pass' } });
    layer = await busyboxLayer();
    await pushImage(reg, 'life/ticker', 'v1', { layers: [layer], config: ticker });
  });
  after(async () => {
    await reg?.stop();
  });

  test('kill -9 of the server: running VMs are adopted, a VM that died meanwhile is failed, kill -9 of QEMU fails the VM', async () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-adopt-'));
    const env = { CAKEWORK_API_KEY: 'cw_adopt_test_key', CAKEWORK_VM_SUBNET: '198.18.128.0/17' };
    let server: ServerProcess = await startServerProcess(env, dataDir);
    const api = (): Caller => ({ call: (m, u, b, k = env.CAKEWORK_API_KEY) => apiCall(server.url, k, m, u, b) });
    try {
      const imp = await api().call('POST', '/v1/image/import', { imageUri: `${reg.host}/life/ticker:v1`, password: 'life-pass' });
      for (let i = 0; (await api().call('GET', `/v1/image/${imp.body.imageId}`)).body.status === 'importing'; i++) await new Promise((r) => setTimeout(r, 50));
      const start = async () => {
        const r = await api().call('POST', '/v1/vm/start', { imageId: imp.body.imageId, waitForPort: true });
        assert.equal(r.status, 200, JSON.stringify(r.body));
        return r.body as { id: string; hostname: string };
      };
      const kept = await start();
      const dies = await start();
      const killedLater = await start();
      await waitForLog(api(), kept.id, /^tick 3$/);
      const diesPid = qemuPids(`${dataDir}/vms/${dies.id}/`);
      assert.equal(diesPid.length, 1);

      await server.crash();
      assert.equal(qemuPids(`${dataDir}/vms/${kept.id}/`).length, 1, 'QEMU outlives the server');
      process.kill(diesPid[0]!, 'SIGKILL');
      await new Promise((r) => setTimeout(r, 300));
      const before = maxTick((await readDb(dataDir, 'SELECT message FROM log_lines WHERE owner_id = ? ORDER BY id', kept.id)) as Array<{ message: string }>);

      server = await startServerProcess(env, dataDir);
      const keptVm = (await api().call('GET', `/v1/vm/${kept.id}`)).body;
      assert.equal(keptVm.state, 'started');
      assert.equal((await waitFor200(server.url, kept.hostname, '/index.html')).body, 'hello from busybox\n');
      await waitForLog(api(), kept.id, new RegExp(`^tick ${before + 5}$`));
      assert.ok((await logLines(api(), kept.id)).some((l) => l.level === 'platform' && /adopted by a restarted server/.test(l.message)));

      const diesVm = (await api().call('GET', `/v1/vm/${dies.id}`)).body;
      assert.equal(diesVm.state, 'failed');
      assert.match(diesVm.error, /QEMU process ended while the server was down/);
      assert.equal((await request(server.url, dies.hostname, '/')).status, 502);

      const adoptedPid = qemuPids(`${dataDir}/vms/${killedLater.id}/`)[0]!;
      process.kill(adoptedPid, 'SIGKILL');
      const failedVm = await waitForVm(api(), killedLater.id, isOver);
      assert.equal(failedVm.state, 'failed');
      assert.match(failedVm.error, /the VM ended unexpectedly: QEMU/);
      assert.ok((await logLines(api(), killedLater.id)).some((l) => l.level === 'platform' && /^failed: the VM ended unexpectedly/.test(l.message)));

      const child = await start();
      process.kill(qemuPids(`${dataDir}/vms/${child.id}/`)[0]!, 'SIGKILL');
      const childVm = await waitForVm(api(), child.id, isOver);
      assert.equal(childVm.state, 'failed');
      assert.match(childVm.error, /QEMU was killed by SIGKILL/);

      const stopped = await api().call('POST', `/v1/vm/${kept.id}/stop`);
      assert.equal(stopped.body.state, 'stopped');
      assert.deepEqual(qemuPids(`${dataDir}/vms/`), [], 'no QEMU left');
    } finally {
      await server.stop();
      for (const pid of qemuPids(`${dataDir}/vms/`)) process.kill(pid, 'SIGKILL');
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });

  test('CAKEWORK_ON_SHUTDOWN=keep: a graceful stop leaves VMs running and the next start adopts them', async () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-keep-'));
    const env = { CAKEWORK_API_KEY: 'cw_keep_test_key', CAKEWORK_VM_SUBNET: '198.18.128.0/17', CAKEWORK_ON_SHUTDOWN: 'keep' };
    let server = await startServerProcess(env, dataDir);
    const api = (): Caller => ({ call: (m, u, b, k = env.CAKEWORK_API_KEY) => apiCall(server.url, k, m, u, b) });
    try {
      const imp = await api().call('POST', '/v1/image/import', { imageUri: `${reg.host}/life/ticker:v1`, password: 'life-pass' });
      while ((await api().call('GET', `/v1/image/${imp.body.imageId}`)).body.status === 'importing') await new Promise((r) => setTimeout(r, 50));
      const vm = (await api().call('POST', '/v1/vm/start', { imageId: imp.body.imageId, waitForPort: true })).body;
      await server.stop();
      assert.equal(qemuPids(`${dataDir}/vms/${vm.id}/`).length, 1, 'the VM outlives a graceful stop');
      server = await startServerProcess(env, dataDir);
      assert.equal((await api().call('GET', `/v1/vm/${vm.id}`)).body.state, 'started');
      assert.equal((await waitFor200(server.url, vm.hostname, '/index.html')).status, 200);
      assert.equal((await api().call('POST', `/v1/vm/${vm.id}/stop`)).body.state, 'stopped');
      await server.stop();
      assert.ok(!execFileSync('nft', ['list', 'tables']).toString().includes(`cakework_${instanceTag(dataDir)}`), 'nothing kept: the firewall table goes');
    } finally {
      await server.stop();
      for (const pid of qemuPids(`${dataDir}/vms/`)) process.kill(pid, 'SIGKILL');
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });

  test('a graceful shutdown stops running VMs; none is left running and none claims to run', async () => {
    const srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17' });
    const image = await importImage(srv, reg, 'life/ticker2', 'v1', { layers: [layer], config: ticker });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image });
    assert.equal(r.status, 200);
    await srv.close();
    assert.deepEqual(qemuPids(`${srv.dataDir}/vms/`), []);
    const tag = instanceTag(srv.dataDir);
    assert.deepEqual(fs.readdirSync('/sys/class/net').filter((n) => n.startsWith(`cwv${tag}`)), [], 'no tap left');
    assert.ok(!execFileSync('nft', ['list', 'tables']).toString().includes(`cakework_${tag}`), 'firewall table removed');
    const row = (await readDb(srv.dataDir, 'SELECT state FROM vms WHERE id = ?', r.body.id))[0] as { state: string };
    assert.equal(row.state, 'stopped');
    const lines = (await readDb(srv.dataDir, 'SELECT message FROM log_lines WHERE owner_id = ? ORDER BY id', r.body.id)) as Array<{ message: string }>;
    assert.ok(lines.some((l) => l.message === 'stopping: the server is shutting down'));
  });

  test('limits: per-account VM count answers 429, host memory 503; an image still importing 409 or waited for', async () => {
    const srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17', CAKEWORK_MAX_VMS_PER_ACCOUNT: '1', CAKEWORK_MEMORY_OVERCOMMIT: '0.1', CAKEWORK_IMAGE_WAIT_MS: '0' });
    try {
      const image = await importImage(srv, reg, 'life/ticker3', 'v1', { layers: [layer], config: ticker });
      const tooBig = await srv.call('POST', '/v1/vm/start', { imageId: image, memory: 16384 });
      assert.equal(tooBig.status, 503);
      assert.match(tooBig.body.error.message, /not enough memory on this host: 16384 MB asked/);
      const first = await srv.call('POST', '/v1/vm/start', { imageId: image });
      assert.equal(first.status, 200);
      const second = await srv.call('POST', '/v1/vm/start', { imageId: image });
      assert.equal(second.status, 429);
      assert.match(second.body.error.message, /already runs 1 VMs, the limit .* is 1/);
      await srv.call('POST', `/v1/vm/${first.body.id}/stop`);

      const fixtures = process.env.CAKEWORK_FIXTURES_DIR ?? '/var/cache/cakework-fixtures';
      await pushImage(reg, 'life/debian', 'v1', {
        layers: [{ blob: fs.readFileSync(path.join(fixtures, 'debian-minbase.tar.gz')), mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', diffId: 'sha256:' + '0'.repeat(64) }],
        config: { Cmd: ['/bin/sh', '-c', 'cat /etc/debian_version'] },
      });
      const imp = await srv.call('POST', '/v1/image/import', { imageUri: `${reg.host}/life/debian:v1`, password: 'life-pass' });
      const early = await srv.call('POST', '/v1/vm/start', { imageId: imp.body.imageId });
      assert.equal(early.status, 409);
      assert.match(early.body.error.message, /is still importing/);
    } finally {
      await srv.close();
    }
    // With the default bounded wait, startVM waits for the import and then boots it.
    const patient = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17' });
    try {
      const imp = await patient.call('POST', '/v1/image/import', { imageUri: `${reg.host}/life/debian:v1`, password: 'life-pass' });
      const r = await patient.call('POST', '/v1/vm/start', { imageId: imp.body.imageId });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      const vm = await waitForVm(patient, r.body.id, isOver);
      assert.equal(vm.exitCode, 0);
      assert.ok((await logLines(patient, r.body.id)).some((l) => l.level === 'info' && /^12\.\d+$/.test(l.message)), 'Debian userland ran');
    } finally {
      await patient.close();
    }
  });
});

/** Reads the SQLite file directly, for while no server runs. */
async function readDb(dataDir: string, sql: string, ...args: unknown[]): Promise<unknown[]> {
  const Database = (await import('better-sqlite3')).default;
  const db = new Database(path.join(dataDir, 'cakework.db'), { readonly: true });
  try {
    return db.prepare(sql).all(...args);
  } finally {
    db.close();
  }
}
