import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { HostNetwork } from '../src/vms/network.js';
import { request, waitFor200 } from './helpers/http.js';
import { startOutsideHost } from './helpers/netns.js';
import { busyboxConfig, busyboxLayer, startRegistry, type Layer, type TestRegistry } from './helpers/registry.js';
import { startTestServer, type TestServer } from './helpers/server.js';
import { importImage, isOver, logLines, waitForLog, waitForVm } from './helpers/vm.js';

// Real QEMU microVMs booted through the API, reached through the endpoint proxy.

const skip = process.getuid?.() !== 0 ? 'VM tests need root (tap devices, nftables)' : !fs.existsSync('/var/cache/cakework-kernel/vmlinux') ? 'the guest kernel is not built (run scripts/setup.sh)' : false;

let reg: TestRegistry;
let srv: TestServer;
let layer: Layer;
let httpd: string;

const sh = (script: string) => ({ ...busyboxConfig, Cmd: ['/bin/sh', '-c', script] });

describe('microVMs', { skip }, () => {
  before(async () => {
    reg = await startRegistry({ users: { vmtest: 'vm-pass' } });
    // The API listens on every address, so the isolation test shows the firewall (not the bind) stops VMs.
    srv = await startTestServer({ CAKEWORK_HOST: '0.0.0.0', CAKEWORK_VM_SUBNET: '198.18.0.0/17', CAKEWORK_STOP_GRACE_MS: '3000' });
    layer = await busyboxLayer();
    httpd = await importImage(srv, reg, 'vmtest/httpd', 'v1', { layers: [layer], config: busyboxConfig });
  });
  after(async () => {
    await srv?.close();
    await reg?.stop();
  });

  test('startVM boots the image and its endpoint serves HTTP through the proxy', async () => {
    const r = await srv.call('POST', '/v1/vm/start', { imageId: httpd, cpu: 1, memory: 256, port: 8080 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const vm = r.body;
    assert.match(vm.id, /^vm[a-z0-9]+$/);
    assert.equal(vm.state, 'started');
    assert.equal(vm.hostname, `${vm.id}.localhost`);
    assert.equal(vm.endpoint, `http://${vm.id}.localhost:${new URL(srv.url).port}`);
    assert.deepEqual([vm.cpu, vm.memory, vm.port, vm.imageId], [1, 256, 8080, httpd]);
    assert.ok(Date.parse(vm.createdAt) <= Date.parse(vm.updatedAt));

    const page = await waitFor200(srv.url, vm.hostname, '/index.html');
    assert.equal(page.body, 'hello from busybox\n');
    const big = await request(srv.url, vm.hostname, '/nope.html');
    assert.equal(big.status, 404, 'the app\'s own 404 passes through');

    assert.equal((await srv.call('GET', `/v1/vm/${vm.id}`)).body.state, 'started');
    const listed = await srv.call('GET', `/v1/vms?status=started&imageId=${httpd}`);
    assert.ok(listed.body.vms.some((v: { id: string }) => v.id === vm.id));

    const stopped = await srv.call('POST', `/v1/vm/${vm.id}/stop`);
    assert.equal(stopped.status, 200);
    assert.equal(stopped.body.state, 'stopped');
    const again = await srv.call('POST', `/v1/vm/${vm.id}/stop`);
    assert.equal(again.status, 409);
    assert.match(again.body.error.message, /not running \(state stopped\)/);
    const gone = await request(srv.url, vm.hostname, '/index.html');
    assert.equal(gone.status, 502);
    assert.match(gone.body, /not running \(state stopped\)/);
    assert.equal((await request(srv.url, 'vmdoesnotexist.localhost', '/')).status, 404);
    const messages = (await logLines(srv, vm.id)).filter((l) => l.level === 'platform').map((l) => l.message);
    assert.ok(messages[0]!.startsWith('booting'));
    assert.ok(messages.includes('started'));
    assert.ok(messages.includes('stopping: SIGTERM sent to the app'));
    assert.ok(messages.includes('stopped by request'));
    assert.ok(!fs.existsSync(`${srv.dataDir}/vms/${vm.id}`), 'the overlay disk and sockets are freed');
  });

  test('envVars override the image Env; stdout is info, stderr is error; the exit code stops the VM', async () => {
    const image = await importImage(srv, reg, 'vmtest/env', 'v1', {
      layers: [layer],
      config: sh('echo "FOO=$FOO GREETING=$GREETING HOME=$HOME PWD=$(pwd) USER=$(id -u)"; echo to-stderr >&2; exit 7'),
    });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image, envVars: { FOO: 'bar', GREETING: 'overridden' } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const vm = await waitForVm(srv, r.body.id, isOver);
    assert.equal(vm.state, 'stopped');
    assert.equal(vm.exitCode, 7);
    const lines = await logLines(srv, vm.id);
    const info = lines.find((l) => l.level === 'info');
    assert.equal(info?.message, 'FOO=bar GREETING=overridden HOME=/ PWD=/www USER=0');
    assert.deepEqual(lines.filter((l) => l.level === 'error').map((l) => l.message), ['to-stderr']);
    assert.ok(lines.some((l) => l.level === 'platform' && l.message === 'exited with code 7'));
    for (const l of lines) assert.ok(Math.abs(l.timestamp - Date.now()) < 120_000 && Number.isInteger(l.timestamp), 'ms timestamps');
  });

  test('the image User is applied and the guest sees exactly the vCPUs and memory asked for', async () => {
    const image = await importImage(srv, reg, 'vmtest/sizes', 'v1', {
      layers: [layer],
      config: { ...sh('echo "nproc=$(nproc) $(grep MemTotal /proc/meminfo) uid=$(id -u) home=$HOME"'), User: 'appuser' },
    });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image, cpu: 2, memory: 512 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    await waitForVm(srv, r.body.id, isOver);
    const line = (await logLines(srv, r.body.id)).find((l) => l.level === 'info')?.message ?? '';
    const m = /^nproc=(\d+) MemTotal:\s+(\d+) kB uid=(\d+) home=(\S+)$/.exec(line);
    assert.ok(m, line);
    assert.equal(Number(m[1]), 2);
    const memKb = Number(m[2]);
    assert.ok(memKb > 450 * 1024 && memKb <= 512 * 1024, `MemTotal ${memKb} kB for 512 MB`);
    assert.equal(m[3], '1000');
    assert.equal(m[4], '/home/app');
  });

  test('a WebSocket upgrade is tunnelled both ways through the endpoint', async () => {
    const image = await importImage(srv, reg, 'vmtest/ws', 'v1', { layers: [layer], config: { ...busyboxConfig, Cmd: ['/bin/nc', '-ll', '-p', '8080', '-e', '/ws-echo.sh'] } });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image, waitForPort: true });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const key = crypto.randomBytes(16).toString('base64');
    const expectAccept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
    const sock = net.connect(Number(new URL(srv.url).port), '127.0.0.1');
    await new Promise((res) => sock.once('connect', res));
    sock.write(`GET /chat HTTP/1.1\r\nHost: ${r.body.hostname}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    let received = Buffer.alloc(0);
    sock.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
    const until = async (pred: () => boolean) => {
      const deadline = Date.now() + 15_000;
      while (!pred()) {
        if (Date.now() > deadline) throw new Error(`timed out; received ${JSON.stringify(received.toString('latin1'))}`);
        await new Promise((res) => setTimeout(res, 10));
      }
    };
    await until(() => received.includes('\r\n\r\n'));
    const head = received.subarray(0, received.indexOf('\r\n\r\n')).toString();
    assert.match(head, /^HTTP\/1\.1 101 Switching Protocols/);
    assert.match(head, new RegExp(`Sec-WebSocket-Accept: ${expectAccept.replace(/[+/=]/g, '\\$&')}`));
    received = received.subarray(received.indexOf('\r\n\r\n') + 4);
    // A masked text frame "ping!"; the app echoes the bytes back.
    const mask = crypto.randomBytes(4);
    const payload = Buffer.from('ping!');
    const frame = Buffer.concat([Buffer.from([0x81, 0x80 | payload.length]), mask, Buffer.from(payload.map((b, i) => b ^ mask[i % 4]!))]);
    sock.write(frame);
    await until(() => received.length >= frame.length);
    assert.deepEqual(received.subarray(0, frame.length), frame);
    sock.destroy();
    await srv.call('POST', `/v1/vm/${r.body.id}/stop`);
  });

  test('an app killed by the out-of-memory killer fails the VM with that reason', async () => {
    const image = await importImage(srv, reg, 'vmtest/oom', 'v1', { layers: [layer], config: { ...busyboxConfig, Cmd: ['/bin/busybox', 'dd', 'if=/dev/zero', 'of=/dev/null', 'bs=220M', 'count=1'] } });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image, memory: 256 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const vm = await waitForVm(srv, r.body.id, isOver);
    assert.equal(vm.state, 'failed');
    assert.equal(vm.error, 'the app was killed: out of memory');
    assert.ok((await logLines(srv, vm.id)).some((l) => l.level === 'platform' && l.message === 'killed: out of memory'));
  });

  test('startVM validates input: ranges, unknown image 404, failed image 400, still importing 409', async () => {
    for (const [body, field] of [
      [{ imageId: httpd, cpu: 0 }, 'cpu'],
      [{ imageId: httpd, cpu: 9 }, 'cpu'],
      [{ imageId: httpd, memory: 255 }, 'memory'],
      [{ imageId: httpd, memory: 16385 }, 'memory'],
      [{ imageId: httpd, port: 0 }, 'port'],
    ] as const) {
      const r = await srv.call('POST', '/v1/vm/start', body);
      assert.equal(r.status, 400);
      assert.equal(r.body.error.field, field);
    }
    const unknown = await srv.call('POST', '/v1/vm/start', { imageId: 'img_nope' });
    assert.equal(unknown.status, 404);
    assert.match(unknown.body.error.message, /image img_nope does not exist/);

    const bad = await srv.call('POST', '/v1/image/import', { imageUri: '127.0.0.1:1/none/none:1', password: '' });
    await srv.waitForImage(bad.body.imageId);
    const failed = await srv.call('POST', '/v1/vm/start', { imageId: bad.body.imageId });
    assert.equal(failed.status, 400);
    assert.equal(failed.body.error.field, 'imageId');
    assert.match(failed.body.error.message, /failed to import: cannot reach registry/);
  });

  test('a VM reaches outside hosts but not the host services, loopback or other VMs', async (t) => {
    // An "outside" host of the test's own: a network namespace with busybox httpd on 198.19.77.2.
    const outside = startOutsideHost('198.19.77.2', '198.19.77.1');
    t.after(() => outside.stop());

    // Another tenant's VM to aim at.
    const other = await srv.call('POST', '/v1/vm/start', { imageId: httpd, waitForPort: true });
    assert.equal(other.status, 200);
    const otherIp = new HostNetwork('198.18.0.0/17', 'any').link(srv.store.getVmById(other.body.id)!.slot!).guestIp;
    const apiPort = new URL(srv.url).port;
    const probe = (label: string, host: string, port: string | number) =>
      `if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 ${host} ${port} | head -c 200 | grep -q .; then echo "${label}=reached"; else echo "${label}=blocked"; fi`;
    const script = [
      'sleep 0.5',
      probe('outside', '198.19.77.2', 80),
      probe('api_via_gateway', '$(ip route | sed -n "s/^default via \\([0-9.]*\\).*/\\1/p")', apiPort),
      probe('other_vm', otherIp, 8080),
      probe('loopback_api', '127.0.0.1', apiPort),
      // last: take the other VM's address and send to the outside host from it
      `ip addr add ${otherIp}/32 dev eth0; ip route add 198.19.77.2/32 via $(ip route | sed -n "s/^default via \\([0-9.]*\\).*/\\1/p") src ${otherIp}`,
      probe('outside_spoofed', '198.19.77.2', 80),
    ].join('; ');
    const image = await importImage(srv, reg, 'vmtest/probe', 'v1', { layers: [layer], config: sh(script) });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image });
    assert.equal(r.status, 200);
    await waitForVm(srv, r.body.id, isOver);
    const out = (await logLines(srv, r.body.id)).filter((l) => l.level === 'info').map((l) => l.message);
    assert.deepEqual(out, ['outside=reached', 'api_via_gateway=blocked', 'other_vm=blocked', 'loopback_api=blocked', 'outside_spoofed=blocked'], JSON.stringify(await logLines(srv, r.body.id)));
    // the other VM itself still serves its endpoint: it was the network path that was closed
    assert.equal((await waitFor200(srv.url, other.body.hostname, '/index.html')).status, 200);
    await srv.call('POST', `/v1/vm/${other.body.id}/stop`);
  });

  test('logs: query, order, batch, pagination and time range; follow streams until the VM stops', async () => {
    const image = await importImage(srv, reg, 'vmtest/chatty', 'v1', {
      layers: [layer],
      config: sh('i=0; while [ $i -lt 120 ]; do echo "line $i"; i=$((i+1)); done; echo "special needle"; sleep 1; echo last'),
    });
    const r = await srv.call('POST', '/v1/vm/start', { imageId: image });
    const id = r.body.id;
    const follow = await fetch(`${srv.url}/v1/vm/${id}/logs?follow=true`, { headers: { 'x-api-key': srv.key } });
    assert.equal(follow.headers.get('content-type'), 'application/x-ndjson');
    const streamed = (await follow.text()).trim().split('\n').map((l) => JSON.parse(l));
    assert.ok(streamed.some((l) => l.message === 'last'), 'follow ends after the VM stopped, with every line');
    assert.ok(streamed.some((l) => l.level === 'platform' && /exited with code 0/.test(l.message)));

    const sse = await fetch(`${srv.url}/v1/vm/${id}/logs?follow=true&query=needle`, { headers: { 'x-api-key': srv.key, accept: 'text/event-stream' } });
    assert.equal(sse.headers.get('content-type'), 'text/event-stream');
    const events = (await sse.text()).trim().split('\n\n');
    assert.equal(events.length, 1, 'a stopped VM: the stream replays matching lines and ends');
    assert.match(events[0]!, /^id: \d+\ndata: \{"timestamp":\d+,"level":"info","message":"special needle"\}$/);

    const needle = await srv.call('GET', `/v1/vm/${id}/logs?query=NEEDLE`);
    assert.deepEqual(needle.body.lines.map((l: { message: string }) => l.message), ['special needle']);
    const first = await srv.call('GET', `/v1/vm/${id}/logs?batch=50`);
    assert.equal(first.body.lines.length, 50);
    assert.ok(first.body.pagination);
    const second = await srv.call('GET', `/v1/vm/${id}/logs?batch=50&pagination=${first.body.pagination}`);
    assert.equal(second.body.lines.length, 50);
    assert.ok(second.body.lines[0].timestamp >= first.body.lines[49].timestamp);
    const all = [...first.body.lines, ...second.body.lines].map((l: { message: string }) => l.message);
    assert.equal(new Set(all).size, 100, 'pages do not overlap');
    const newest = await srv.call('GET', `/v1/vm/${id}/logs?order=newest_first&batch=50`);
    assert.match(newest.body.lines[0].message, /^stopped$/);
    const future = new Date(Date.now() + 60_000).toISOString();
    const empty = await srv.call('GET', `/v1/vm/${id}/logs?from=${future}`);
    assert.deepEqual(empty.body.lines, []);
    assert.equal(empty.body.from, future);
    assert.equal((await srv.call('GET', `/v1/vm/${id}/logs?batch=49`)).status, 400);
    assert.equal((await srv.call('GET', `/v1/vm/${id}/logs?batch=1001`)).status, 400);
  });
});
