import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
// The package has no "main" field, so its entry point is imported by path, as its users must.
import sdk from '@cakework/client/dist/index.js';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry, type TestRegistry } from './helpers/registry.js';
import { startTestServer, type TestServer } from './helpers/server.js';

// The published SDK (@cakework/client, pinned in package.json), unchanged, against our server.

const { CakeworkApiClient, CakeworkApi, CakeworkApiError } = sdk;
let reg: TestRegistry;
let srv: TestServer;

before(async () => {
  reg = await startRegistry({ users: { sdkuser: 'sdk-pass' } });
  srv = await startTestServer();
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

test('calls the server cannot serve yet reach it and surface as 501, not as a parse or 400 error', async () => {
  // The SDK sends Content-Type: application/json with an empty body on these POSTs.
  const client = new CakeworkApiClient({ environment: srv.url, xApiKey: srv.key });
  for (const call of [() => client.stopVm('vm_x'), () => client.startCachedVm('c_x'), () => client.destroyCachedVm('c_x'), () => client.getVm('vm_x'), () => client.listVMs()]) {
    await assert.rejects(call(), (err: unknown) => {
      assert.ok(err instanceof CakeworkApiError);
      assert.equal((err as InstanceType<typeof CakeworkApiError>).statusCode, 501);
      return true;
    });
  }
});
