import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { after, before, test } from 'node:test';
import { startTestServer, type TestServer } from './helpers/server.js';

let srv: TestServer;
before(async () => {
  srv = await startTestServer();
});
after(async () => {
  await srv.close();
});

function cli(...args: string[]): string {
  return execFileSync('node', ['bin/cakework', ...args], {
    env: { ...process.env, CAKEWORK_DATA_DIR: srv.dataDir },
    encoding: 'utf8',
    timeout: 30_000,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

test('every /v1 route needs a valid X-Api-Key and answers 401 JSON otherwise', async () => {
  const missing = await srv.call('GET', '/v1/images', undefined, null);
  assert.equal(missing.status, 401);
  assert.equal(missing.body.error.code, 'unauthorized');
  assert.match(missing.body.error.message, /missing X-Api-Key/);
  const wrong = await srv.call('POST', '/v1/image/import', { imageUri: 'x', password: 'y' }, 'cw_not_a_key');
  assert.equal(wrong.status, 401);
  assert.match(wrong.body.error.message, /invalid or revoked/);
  assert.match(wrong.body.error.requestId, /^req_/);
  assert.equal(wrong.headers.get('x-request-id'), wrong.body.error.requestId);
  const ok = await srv.call('GET', '/v1/images');
  assert.equal(ok.status, 200);
  assert.deepEqual(ok.body, { images: [], pagination: null });
});

test('bad input is a 400 that names the field and the rule', async () => {
  const cases: Array<[string, string, unknown, string, RegExp]> = [
    ['POST', '/v1/image/import', { password: 'p' }, 'imageUri', /imageUri is required/],
    ['POST', '/v1/image/import', { imageUri: 42, password: 'p' }, 'imageUri', /must be of type string/],
    ['POST', '/v1/image/import', { imageUri: '', password: 'p' }, 'imageUri', /must not be empty/],
    ['POST', '/v1/image/import', { imageUri: 'x'.repeat(1025), password: 'p' }, 'imageUri', /at most 1024/],
    ['POST', '/v1/image/import', { imageUri: '127.0.0.1:5000/UPPER/case', password: 'p' }, 'imageUri', /not a valid repository name/],
    ['POST', '/v1/image/import', { imageUri: 'http://registry.example.com/a/b', password: 'p' }, 'imageUri', /plain HTTP .* not allowed/],
    ['POST', '/v1/image/import', { imageUri: '127.0.0.1:5000/a/b' }, 'password', /password is required/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', cpu: 0 }, 'cpu', /cpu must be >= 1/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', cpu: 9 }, 'cpu', /cpu must be <= 8/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', cpu: '2' }, 'cpu', /must be of type integer/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', memory: 255 }, 'memory', /memory must be >= 256/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', memory: 16385 }, 'memory', /memory must be <= 16384/],
    ['POST', '/v1/vm/start', { imageId: 'img_x', port: 0 }, 'port', /port must be >= 1/],
    ['POST', '/v1/vm/cache', { imageId: 'img_x', envVars: { 'BAD-NAME': 'x' } }, 'envVars', /invalid key "BAD-NAME"/],
    ['POST', '/v1/image/build/github', { dockerfile: 'FROM x', token: 't', repository: 'no-slash', branch: 'main' }, 'repository', /invalid format/],
    ['GET', '/v1/images?limit=5000', undefined, 'limit', /between 1 and 1000/],
    ['GET', '/v1/images?pagination=bogus', undefined, 'pagination', /not a token this server issued/],
    ['GET', '/v1/vm/vm_1/logs?order=sideways', undefined, 'order', /order/],
  ];
  for (const [method, url, body, field, message] of cases) {
    const r = await srv.call(method, url, body);
    assert.equal(r.status, 400, `${method} ${url} ${JSON.stringify(body)} → ${r.status} ${JSON.stringify(r.body)}`);
    assert.equal(r.body.error.code, 'invalid_request');
    assert.equal(r.body.error.field, field, JSON.stringify(r.body));
    assert.match(r.body.error.message, message);
  }
  const badJson = await srv.call('POST', '/v1/image/import', '{"imageUri":');
  assert.equal(badJson.status, 400);
  assert.ok(badJson.body.error.message);
  assert.ok(!JSON.stringify(badJson.body).includes('    at '), 'no stack trace');
});

test('unknown resources are 404 on every route, and unknown routes too', async () => {
  for (const [method, url] of [
    ['GET', '/v1/vm/vmnope'],
    ['POST', '/v1/vm/vmnope/stop'],
    ['GET', '/v1/vm/vmnope/logs'],
    ['POST', '/v1/vm/cached/vmnope/start'],
    ['POST', '/v1/vm/cached/vmnope/stop'],
    ['POST', '/v1/vm/cached/vmnope/destroy'],
    ['POST', '/v1/vm/vmnope/destroy'],
    ['GET', '/v1/vm/cached/vmnope/logs'],
    ['GET', '/v1/image/build/bld_nope'],
    ['GET', '/v1/image/build/bld_nope/logs'],
    ['GET', '/v1/image/img_nope'],
  ] as const) {
    const r = await srv.call(method, url);
    assert.equal(r.status, 404, `${method} ${url}`);
    assert.equal(r.body.error.code, 'not_found');
  }
  const unknown = await srv.call('GET', '/v1/nothing-here');
  assert.equal(unknown.status, 404);
  assert.equal(unknown.body.error.code, 'not_found');
});

test('GET /openapi.json documents every route from the same schemas', async () => {
  const r = await srv.call('GET', '/openapi.json', undefined, null);
  assert.equal(r.status, 200);
  assert.equal(r.body.openapi, '3.0.3');
  const paths = Object.keys(r.body.paths);
  for (const p of [
    '/v1/image/import', '/v1/image/{imageId}', '/v1/images', '/v1/image/build/github', '/v1/image/build/files',
    '/v1/image/build/{buildId}', '/v1/image/build/{buildId}/logs', '/v1/vm/start', '/v1/vm/{id}/stop', '/v1/vm/{id}',
    '/v1/vms', '/v1/vm/{id}/logs', '/v1/vm/cache', '/v1/vm/cached/{id}/start', '/v1/vm/cached/{id}/stop',
    '/v1/vm/cached/{id}/destroy', '/v1/vm/{id}/destroy', '/v1/vm/cached/{id}/logs',
  ]) {
    assert.ok(paths.includes(p), `${p} in OpenAPI`);
  }
  const cpu = r.body.paths['/v1/vm/start'].post.requestBody.content['application/json'].schema.properties.cpu;
  assert.equal(cpu.minimum, 1);
  assert.equal(cpu.maximum, 8);
  assert.deepEqual(r.body.components.securitySchemes.apiKey, { type: 'apiKey', in: 'header', name: 'X-Api-Key' });
});

test('CLI keys create | list | revoke work on the server store; keys are stored hashed', async () => {
  const key = cli('keys', 'create', '--name', 'cli-test').trim();
  assert.match(key, /^cw_[A-Za-z0-9_-]{43}$/);
  const listed = cli('keys', 'list');
  const row = listed.split('\n').find((l) => l.includes('cli-test'));
  assert.ok(row, listed);
  assert.ok(!listed.includes(key), 'the full key is never shown again');
  const rows = srv.store.db.prepare('SELECT key_hash FROM api_keys').all() as Array<{ key_hash: string }>;
  assert.ok(rows.every((r) => /^[a-f0-9]{64}$/.test(r.key_hash) && r.key_hash !== key));

  assert.equal((await srv.call('GET', '/v1/images', undefined, key)).status, 200);
  const keyId = row.split('\t')[0]!;
  cli('keys', 'revoke', keyId);
  assert.equal((await srv.call('GET', '/v1/images', undefined, key)).status, 401);
  assert.match(cli('keys', 'list'), new RegExp(`${keyId}.*\\d{4}-\\d\\d-\\d\\dT[^\\t]*\\t\\d{4}-`));
  assert.throws(() => cli('keys', 'revoke', 'key_nope'), /no key with id key_nope/);
});

test('a second key of the same account sees the same images; another account gets 404', async () => {
  const accountId = (srv.store.findKeyByHash((await import('../src/accounts/keys.js')).hashKey(srv.key)))!.accountId;
  const sameAccount = cli('keys', 'create', '--account', accountId).trim();
  const otherAccount = cli('keys', 'create', '--name', 'mallory').trim();
  const imp = await srv.call('POST', '/v1/image/import', { imageUri: '127.0.0.1:1/nobody/none:1', password: 'x' });
  assert.equal(imp.status, 200);
  const id = imp.body.imageId;
  assert.equal((await srv.call('GET', `/v1/image/${id}`, undefined, sameAccount)).status, 200);
  const other = await srv.call('GET', `/v1/image/${id}`, undefined, otherAccount);
  assert.equal(other.status, 404);
  assert.equal(other.body.error.code, 'not_found');
  assert.deepEqual((await srv.call('GET', '/v1/images', undefined, otherAccount)).body.images, []);
  const failed = await srv.waitForImage(id);
  assert.equal(failed.status, 'failed');
  assert.match(failed.error, /cannot reach registry 127\.0\.0\.1:1/);
});

test('image lists are cursor-paginated', async () => {
  const key = cli('keys', 'create', '--name', 'pager').trim();
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    ids.push((await srv.call('POST', '/v1/image/import', { imageUri: `127.0.0.1:1/p/img${i}`, password: '' }, key)).body.imageId);
  }
  const seen: string[] = [];
  let token: string | null = null;
  do {
    const r = await srv.call('GET', `/v1/images?limit=2${token ? `&pagination=${token}` : ''}`, undefined, key);
    assert.equal(r.status, 200);
    assert.ok(r.body.images.length <= 2);
    seen.push(...r.body.images.map((i: { imageId: string }) => i.imageId));
    token = r.body.pagination;
  } while (token);
  assert.deepEqual(seen.sort(), [...ids].sort());
  for (const id of ids) await srv.waitForImage(id, 30_000, key);
});
