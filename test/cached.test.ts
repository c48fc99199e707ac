import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request, waitFor200 } from './helpers/http.js';
import { busyboxConfig, busyboxLayer, compressLayer, makeTar, pushImage, startRegistry, type Layer, type TestRegistry } from './helpers/registry.js';
import { apiCall, startServerProcess, startTestServer, type TestServer } from './helpers/server.js';
import { importImage, type Caller } from './helpers/vm.js';

// Cached VMs: real snapshots of real QEMU guests, restored through the API.

const skip = process.getuid?.() !== 0 ? 'VM tests need root (tap devices, nftables)' : !fs.existsSync('/var/cache/cakework-kernel/vmlinux') ? 'the guest kernel is not built (run scripts/setup.sh)' : false;

let reg: TestRegistry;
let srv: TestServer;
let layer: Layer;
let app: string;

// The app serves /www and, on each run, writes a marker file whose presence it reports in /state.txt.
const appScript = [
  'echo "boot $(date +%s)"',
  'if [ -e /www/marker ]; then echo seen > /www/state.txt; else echo fresh > /www/state.txt; fi',
  'touch /www/marker',
  'httpd -f -p 8080 -h /www',
].join('; ');

const cmd = (script: string) => ({ ...busyboxConfig, Cmd: ['/bin/sh', '-c', script] });

describe('cached VMs', { skip }, () => {
  before(async () => {
    reg = await startRegistry({ users: { cache: 'cache-pass' } });
    srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17', CAKEWORK_STOP_GRACE_MS: '3000', CAKEWORK_CACHE_TIMEOUT_MS: '8000' });
    layer = await busyboxLayer();
    app = await importImage(srv, reg, 'cache/app', 'v1', { layers: [layer], config: cmd(appScript) });
  });
  after(async () => {
    await srv?.close();
    await reg?.stop();
  });

  test('cache → start → 200 → stop → start → 200, each run from the snapshot', async () => {
    const c = await srv.call('POST', '/v1/vm/cache', { imageId: app, cpu: 1, memory: 256, port: 8080 });
    assert.equal(c.status, 200, JSON.stringify(c.body));
    assert.equal(c.body.state, 'stopped');
    assert.equal(c.body.hostname, `${c.body.id}.localhost`);
    assert.ok(c.body.disk.ramBytes > 0 && c.body.disk.stateBytes > 0, JSON.stringify(c.body.disk));
    const id = c.body.id as string;
    for (let run = 1; run <= 2; run++) {
      const s = await srv.call('POST', `/v1/vm/cached/${id}/start`);
      assert.equal(s.status, 200, JSON.stringify(s.body));
      assert.equal(s.body.state, 'started');
      assert.equal(s.body.runs, run);
      assert.equal((await waitFor200(srv.url, c.body.hostname, '/index.html', 10_000)).body, 'hello from busybox\n');
      // the app ran its start-up once, while caching: a restored run does not boot it again
      assert.equal((await request(srv.url, c.body.hostname, '/state.txt')).body, 'fresh\n');
      const again = await srv.call('POST', `/v1/vm/cached/${id}/start`);
      assert.equal(again.body.state, 'started', 'starting a started cached VM is idempotent');
      assert.equal(again.body.runs, run);
      const stop = await srv.call('POST', `/v1/vm/cached/${id}/stop`);
      assert.equal(stop.body.state, 'stopped');
      assert.equal((await srv.call('POST', `/v1/vm/cached/${id}/stop`)).body.state, 'stopped', 'stopping a stopped cached VM is idempotent');
    }
    const lines = (await srv.call('GET', `/v1/vm/cached/${id}/logs?batch=1000`)).body.lines as Array<{ level: string; message: string }>;
    const platform = lines.filter((l) => l.level === 'platform').map((l) => l.message);
    for (const re of [/^cached: snapshot taken/, /^run 1: started \(restored in \d+ ms\)$/, /^run 1: stopped by request/, /^run 2: started/, /^run 2: stopped by request/]) {
      assert.ok(platform.some((m) => re.test(m)), `${re} in ${JSON.stringify(platform)}`);
    }
    assert.equal(lines.filter((l) => l.level === 'info' && /^boot /.test(l.message)).length, 1, 'the app booted once, while caching');
    assert.equal((await srv.call('GET', `/v1/vm/${id}`)).status, 404, 'a cached VM is not a one-time VM');
    await srv.call('POST', `/v1/vm/cached/${id}/destroy`);
  });

  test('the guest clock is right after restoring a snapshot taken earlier; files written in a run are gone', async () => {
    const cgi = (body: string) => `#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n${body}\n`;
    const scripts = compressLayer(
      await makeTar([
        { name: 'www/cgi-bin/', type: 'directory' },
        { name: 'www/cgi-bin/now', content: cgi('date +%s'), mode: 0o755 },
        { name: 'www/cgi-bin/write', content: cgi('touch /www/written; ls /www'), mode: 0o755 },
      ]),
      'gzip',
      'oci',
    );
    const clock = await importImage(srv, reg, 'cache/clock', 'v1', { layers: [layer, scripts], config: cmd('httpd -f -p 8080 -h /www') });
    const c = await srv.call('POST', '/v1/vm/cache', { imageId: clock });
    assert.equal(c.body.state, 'stopped', JSON.stringify(c.body));
    await new Promise((r) => setTimeout(r, 4000)); // the snapshot ages
    const s = await srv.call('POST', `/v1/vm/cached/${c.body.id}/start`);
    assert.equal(s.body.state, 'started');
    const now = await waitFor200(srv.url, c.body.hostname, '/cgi-bin/now', 10_000);
    const guest = Number(now.body.trim());
    assert.ok(Math.abs(guest - Date.now() / 1000) < 2, `guest clock ${guest} vs host ${Date.now() / 1000}`);
    const wrote = await request(srv.url, c.body.hostname, '/cgi-bin/write');
    assert.match(wrote.body, /written/);
    await srv.call('POST', `/v1/vm/cached/${c.body.id}/stop`);
    await srv.call('POST', `/v1/vm/cached/${c.body.id}/start`);
    const again = await waitFor200(srv.url, c.body.hostname, '/cgi-bin/now', 10_000);
    assert.ok(again.body);
    assert.equal((await request(srv.url, c.body.hostname, '/written')).status, 404, 'a file written in the previous run is gone');
    await srv.call('POST', `/v1/vm/cached/${c.body.id}/destroy`);
  });

  test('wake on request, opt-out, idle stop, and destroy (both routes) frees the files', async () => {
    const woke = await srv.call('POST', '/v1/vm/cache', { imageId: app, idleStopSeconds: 2 });
    assert.equal(woke.body.state, 'stopped');
    const page = await request(srv.url, woke.body.hostname, '/index.html', { timeoutMs: 15_000 });
    assert.equal(page.status, 200, 'a request to a stopped cached VM starts it and is served');
    assert.equal((await srv.call('GET', `/v1/vm/cached/${woke.body.id}`)).body.state, 'started');
    const deadline = Date.now() + 15_000;
    while ((await srv.call('GET', `/v1/vm/cached/${woke.body.id}`)).body.state !== 'stopped') {
      assert.ok(Date.now() < deadline, 'idle stop');
      await new Promise((r) => setTimeout(r, 200));
    }
    const snapshotDir = path.join(srv.dataDir, 'snapshots', woke.body.id);
    assert.ok(fs.existsSync(snapshotDir));
    const d = await srv.call('POST', `/v1/vm/${woke.body.id}/destroy`);
    assert.equal(d.status, 200);
    assert.equal(d.body.state, 'destroyed');
    assert.ok(!fs.existsSync(snapshotDir), 'snapshot files deleted');
    assert.equal((await srv.call('POST', `/v1/vm/cached/${woke.body.id}/start`)).status, 409);
    assert.equal((await srv.call('POST', `/v1/vm/cached/${woke.body.id}/destroy`)).body.state, 'destroyed', 'destroy is idempotent');
    assert.equal((await request(srv.url, woke.body.hostname, '/index.html')).status, 502);

    const noWake = await srv.call('POST', '/v1/vm/cache', { imageId: app, wakeOnRequest: false });
    const refused = await request(srv.url, noWake.body.hostname, '/index.html');
    assert.equal(refused.status, 502);
    assert.match(refused.body, /not running \(state stopped\)/);
    await srv.call('POST', `/v1/vm/cached/${noWake.body.id}/destroy`);
  });

  test('cacheVM of an app that never listens fails clearly, with its boot logs', async () => {
    const deaf = await importImage(srv, reg, 'cache/deaf', 'v1', { layers: [layer], config: cmd('echo "not listening"; sleep 600') });
    const c = await srv.call('POST', '/v1/vm/cache', { imageId: deaf });
    assert.equal(c.status, 200);
    assert.equal(c.body.state, 'failed');
    assert.match(c.body.error, /the app did not listen on port 8080 within 8000 ms/);
    const lines = (await srv.call('GET', `/v1/vm/cached/${c.body.id}/logs`)).body.lines.map((l: { message: string }) => l.message);
    assert.ok(lines.includes('not listening'));
    assert.ok(!fs.existsSync(path.join(srv.dataDir, 'snapshots', c.body.id)));
    const exits = await importImage(srv, reg, 'cache/exits', 'v1', { layers: [layer], config: cmd('echo bye; exit 3') });
    const e = await srv.call('POST', '/v1/vm/cache', { imageId: exits });
    assert.equal(e.body.state, 'failed');
    assert.match(e.body.error, /exited before it listened/);
  });

  test('a server restart keeps stopped cached VMs and adopts started ones', async () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-cached-restart-'));
    const env = { CAKEWORK_API_KEY: 'cw_cached_restart', CAKEWORK_VM_SUBNET: '198.18.128.0/17' };
    let server = await startServerProcess(env, dataDir);
    const api = (): Caller => ({ call: (m, u, b, k = env.CAKEWORK_API_KEY) => apiCall(server.url, k, m, u, b) });
    try {
      await pushImage(reg, 'cache/restart', 'v1', { layers: [layer], config: cmd(appScript) });
      const imp = await api().call('POST', '/v1/image/import', { imageUri: `${reg.host}/cache/restart:v1`, password: 'cache-pass' });
      while ((await api().call('GET', `/v1/image/${imp.body.imageId}`)).body.status === 'importing') await new Promise((r) => setTimeout(r, 50));
      const stopped = (await api().call('POST', '/v1/vm/cache', { imageId: imp.body.imageId })).body;
      const running = (await api().call('POST', '/v1/vm/cache', { imageId: imp.body.imageId })).body;
      assert.equal((await api().call('POST', `/v1/vm/cached/${running.id}/start`)).body.state, 'started');
      await server.crash();
      server = await startServerProcess(env, dataDir);
      assert.equal((await api().call('GET', `/v1/vm/cached/${running.id}`)).body.state, 'started');
      assert.equal((await waitFor200(server.url, running.hostname, '/index.html')).status, 200);
      assert.equal((await api().call('GET', `/v1/vm/cached/${stopped.id}`)).body.state, 'stopped');
      assert.equal((await api().call('POST', `/v1/vm/cached/${stopped.id}/start`)).body.state, 'started');
      assert.equal((await waitFor200(server.url, stopped.hostname, '/index.html')).status, 200);
      await server.stop();
      server = await startServerProcess(env, dataDir);
      for (const id of [stopped.id, running.id]) {
        assert.equal((await api().call('GET', `/v1/vm/cached/${id}`)).body.state, 'stopped', 'a graceful stop leaves cached VMs stopped with their snapshots');
        assert.equal((await api().call('POST', `/v1/vm/cached/${id}/start`)).body.state, 'started');
      }
      await server.stop();
      const left = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
        try {
          return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(`${dataDir}/`);
        } catch {
          return false;
        }
      });
      assert.deepEqual(left, [], 'a graceful stop leaves no QEMU behind, prepared restores included');
    } finally {
      await server.stop();
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
