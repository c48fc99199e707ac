import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, test } from 'node:test';
// The package has no "main" field, so its entry point is imported by path, as its users must.
import sdk from '@cakework/client/dist/index.js';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry, type TestRegistry } from './helpers/registry.js';
import { startTestServer, type TestServer } from './helpers/server.js';

// The published SDK (@cakework/client, pinned in package.json), unchanged, against our server.

const { CakeworkApiClient, CakeworkApi } = sdk;
const vmSkip = process.getuid?.() !== 0 ? 'VMs need root' : !fs.existsSync('/var/cache/cakework-kernel/vmlinux') ? 'the guest kernel is not built' : false;
const buildSkip = process.getuid?.() !== 0 ? 'builds need root' : false;
let reg: TestRegistry;
let srv: TestServer;

before(async () => {
  reg = await startRegistry({ users: { sdkuser: 'sdk-pass' } });
  srv = await startTestServer({ CAKEWORK_VM_SUBNET: '198.18.0.0/17' });
});
after(async () => {
  await srv.close();
  await reg.stop();
});

test('importImage through the SDK returns an imageId that becomes ready', async () => {
  await pushImage(reg, 'sdkuser/busybox', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  const image = await client.importImage({ imageUri: `${reg.host}/sdkuser/busybox:v1`, password: 'sdk-pass' });
  assert.match(image.imageId, /^img_/);
  const detail = await srv.waitForImage(image.imageId);
  assert.equal(detail.status, 'ready', detail.error);
});

test('SDK errors map from our status codes: 401 Unauthorized, 400 BadRequest', async () => {
  const bad = new CakeworkApiClient({ environment: srv.url, xApiKey: 'cw_wrong' });
  await assert.rejects(bad.importImage({ imageUri: `${reg.host}/x/y`, password: 'p' }), CakeworkApi.UnauthorizedError);
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  await assert.rejects(client.importImage({ imageUri: 'NOT A URI', password: 'p' }), CakeworkApi.BadRequest);
});

test('startVm, getVm, listVMs, getVmLogs and stopVm through the SDK run a real microVM', { skip: vmSkip }, async () => {
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  const image = await client.importImage({ imageUri: `${reg.host}/sdkuser/busybox:v1`, password: 'sdk-pass' });
  await srv.waitForImage(image.imageId);
  const vm = await client.startVm({ imageId: image.imageId, cpu: 1, memory: 256, port: 8080, envVars: { A: 'b' } });
  assert.match(vm.id, /^vm/);
  assert.equal(vm.state, 'started');
  assert.equal(vm.hostname, `${vm.id}.localhost`);
  assert.ok(vm.createdAt instanceof Date);
  const got = await client.getVm(vm.id);
  assert.equal(got.id, vm.id);
  const list = await client.listVMs({ status: 'started' });
  assert.ok(list.vms.some((v) => v.id === vm.id));
  await client.stopVm(vm.id);
  assert.equal((await client.getVm(vm.id)).state, 'stopped');
  const logs = await client.getVmLogs(vm.id, { batch: 50, order: 'oldest_first' });
  assert.ok(logs.lines.some((l) => l.level === 'platform' && l.message === 'started'));
  await assert.rejects(client.stopVm(vm.id), CakeworkApi.ConflictError);
  await assert.rejects(client.getVm('vmnope'), CakeworkApi.DoesNotExistError);
});

test('cacheVm, startCachedVm, stopCachedVm, getCachedVmLogs and destroyCachedVm through the SDK', { skip: vmSkip }, async () => {
  // The SDK sends Content-Type: application/json with an empty body on the start/stop/destroy POSTs.
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  const image = await client.importImage({ imageUri: `${reg.host}/sdkuser/busybox:v1`, password: 'sdk-pass' });
  await srv.waitForImage(image.imageId);
  const cached = await client.cacheVm({ imageId: image.imageId, cpu: 1, memory: 256, port: 8080 });
  assert.match(cached.id, /^vm/);
  assert.equal(cached.hostname, `${cached.id}.localhost`);
  await client.startCachedVm(cached.id);
  assert.equal((await srv.call('GET', `/v1/vm/cached/${cached.id}`)).body.state, 'started');
  await client.stopCachedVm(cached.id);
  const logs = await client.getCachedVmLogs(cached.id);
  assert.ok(logs.lines.some((l) => /^run 1: started/.test(l.message)));
  await client.destroyCachedVm(cached.id);
  assert.equal((await srv.call('GET', `/v1/vm/cached/${cached.id}`)).body.state, 'destroyed');
});

test('buildImageFromFiles, getBuild and getBuildLogs through the SDK', { skip: buildSkip }, async () => {
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  const build = await client.buildImageFromFiles({
    dockerfile: 'FROM scratch\nCOPY . /data/\n',
    files: [{ dir: '.', name: 'hello.txt', content: 'hello\n' }],
  });
  assert.match(build.buildId, /^bld_/);
  assert.equal(build.status, 'created');
  assert.ok(build.createdAt instanceof Date);
  let got = await client.getBuild(build.buildId);
  for (let i = 0; got.status !== 'succeeded' && got.status !== 'failed' && i < 600; i++) {
    await new Promise((r) => setTimeout(r, 100));
    got = await client.getBuild(build.buildId);
  }
  assert.equal(got.status, 'succeeded');
  assert.equal(got.imageId, build.imageId);
  const logs = await client.getBuildLogs(build.buildId, { batch: 100 });
  assert.ok(logs.lines.some((l) => /^STEP 2\/2: COPY/.test(l.message)));
  await assert.rejects(client.getBuild('bld_nope'), CakeworkApi.DoesNotExistError);
});

