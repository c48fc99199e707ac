import assert from 'node:assert/strict';
import { test } from 'node:test';
import { describeValidation } from '../src/api/errors.js';
import { parseImageConfig, parseManifest, selectPlatform } from '../src/images/manifest.js';
import { defaultUsername, isLoopbackHost, parseImageUri } from '../src/images/reference.js';
import { parseAuthenticate } from '../src/images/registry.js';
import { decodeCursor } from '../src/store/store.js';

test('parseImageUri: registry, repository, tag and digest', () => {
  assert.deepEqual(parseImageUri('127.0.0.1:5000/alice/app:v1'), {
    registry: '127.0.0.1:5000',
    repository: 'alice/app',
    reference: 'v1',
    userFromUri: null,
    scheme: null,
  });
  const hub = parseImageUri('nginx');
  assert.equal(hub.registry, 'registry-1.docker.io');
  assert.equal(hub.repository, 'library/nginx');
  assert.equal(hub.reference, 'latest');
  const digest = 'sha256:' + 'a'.repeat(64);
  assert.equal(parseImageUri(`ghcr.io/org/app@${digest}`).reference, digest);
  const withUser = parseImageUri('https://bob@registry.example.com/team/app:1.0');
  assert.equal(withUser.userFromUri, 'bob');
  assert.equal(withUser.scheme, 'https');
  assert.equal(withUser.registry, 'registry.example.com');
  assert.equal(parseImageUri('localhost:5000/app').registry, 'localhost:5000');
});

test('parseImageUri rejects malformed references with a reason', () => {
  assert.throws(() => parseImageUri('127.0.0.1:5000/Alice/app'), /not a valid repository name/);
  assert.throws(() => parseImageUri('127.0.0.1:5000/app:bad tag'), /not a valid tag/);
  assert.throws(() => parseImageUri('127.0.0.1:5000/app@sha256:xyz'), /not a sha256 digest/);
  assert.throws(() => parseImageUri('http://app'), /must name a registry host/);
  assert.throws(() => parseImageUri('127.0.0.1:5000/a/../b'), /not a valid repository name/);
});

test('defaultUsername: URI user, ECR, Google, then the namespace', () => {
  assert.equal(defaultUsername(parseImageUri('carol@127.0.0.1:5000/alice/app')), 'carol');
  assert.equal(defaultUsername(parseImageUri('123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1')), 'AWS');
  assert.equal(defaultUsername(parseImageUri('europe-docker.pkg.dev/proj/repo/app')), 'oauth2accesstoken');
  assert.equal(defaultUsername(parseImageUri('127.0.0.1:5000/alice/app')), 'alice');
});

test('isLoopbackHost', () => {
  assert.ok(isLoopbackHost('127.0.0.1:5000'));
  assert.ok(isLoopbackHost('127.1.2.3'));
  assert.ok(isLoopbackHost('localhost:80'));
  assert.ok(isLoopbackHost('[::1]:5000'));
  assert.ok(!isLoopbackHost('10.0.0.1:5000'));
  assert.ok(!isLoopbackHost('registry.example.com'));
});

test('parseAuthenticate reads Bearer and Basic challenges', () => {
  const c = parseAuthenticate('Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull"');
  assert.equal(c.scheme, 'bearer');
  assert.deepEqual(c.params, { realm: 'https://auth.example.com/token', service: 'registry.example.com', scope: 'repository:a/b:pull' });
  assert.equal(parseAuthenticate('Basic realm="x"').scheme, 'basic');
});

const d = (c: string) => 'sha256:' + c.repeat(64);

test('parseManifest: index and manifests, media type from header when the body has none', () => {
  const index = parseManifest(
    Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [
      { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('1'), size: 10, platform: { os: 'linux', architecture: 'arm64' } },
      { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('2'), size: 10, platform: { os: 'linux', architecture: 'amd64' } },
    ] })),
    'application/vnd.oci.image.index.v1+json',
  );
  assert.equal(index.kind, 'index');
  assert.equal(index.kind === 'index' && selectPlatform(index).digest, d('2'));

  const m = parseManifest(
    Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: d('3'), size: 5 }, layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+zstd', digest: d('4'), size: 7 }] })),
    'application/vnd.oci.image.manifest.v1+json',
  );
  assert.equal(m.kind, 'manifest');
  assert.equal(m.kind === 'manifest' && m.layers[0]!.digest, d('4'));
});

test('parseManifest and selectPlatform refuse what cannot run', () => {
  assert.throws(() => parseManifest(Buffer.from('{"schemaVersion":1}'), ''), /schema 1/);
  assert.throws(() => parseManifest(Buffer.from('not json'), ''), /not JSON/);
  assert.throws(
    () => parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: d('3'), size: 5 }, layers: [{ mediaType: 'application/x-weird', digest: d('4'), size: 1 }] })), ''),
    /unsupported media type/,
  );
  assert.throws(
    () => parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: 'md5:1', size: 5 }, layers: [] })), 'application/vnd.oci.image.manifest.v1+json'),
    /no valid sha256 digest/,
  );
  assert.throws(
    () => selectPlatform({ kind: 'index', manifests: [{ mediaType: '', digest: d('1'), size: 1, platform: { os: 'linux', architecture: 'arm64' } }] }),
    /no linux\/amd64 manifest \(it has: linux\/arm64\)/,
  );
});

test('parseImageConfig keeps what decides how the image runs', () => {
  const c = parseImageConfig(
    Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Entrypoint: ['/bin/app'], Cmd: ['serve'], Env: ['A=1'], WorkingDir: '/srv', User: '1000:1000', ExposedPorts: { '8080/tcp': {} } } })),
  );
  assert.deepEqual(c, { entrypoint: ['/bin/app'], cmd: ['serve'], env: ['A=1'], workingDir: '/srv', user: '1000:1000', exposedPorts: ['8080/tcp'] });
  assert.throws(() => parseImageConfig(Buffer.from(JSON.stringify({ architecture: 'arm64', os: 'linux' }))), /arm64, not amd64/);
});

test('describeValidation names the field and the rule', () => {
  assert.deepEqual(describeValidation({ instancePath: '/cpu', keyword: 'maximum', params: { comparison: '<=', limit: 8 } }, 'body'), {
    field: 'cpu',
    message: 'cpu must be <= 8',
  });
  assert.deepEqual(describeValidation({ instancePath: '', keyword: 'required', params: { missingProperty: 'imageUri' } }, 'body'), {
    field: 'imageUri',
    message: 'imageUri is required',
  });
});

test('pagination cursors round-trip and reject foreign tokens', () => {
  const token = Buffer.from('1700000000000:img_abc').toString('base64url');
  assert.deepEqual(decodeCursor(token), { createdAt: 1700000000000, id: 'img_abc' });
  assert.equal(decodeCursor('garbage!!'), null);
  assert.equal(decodeCursor(Buffer.from("1:x' OR 1=1").toString('base64url')), null);
});

test('log retention deletes lines older than the configured days, and only those', async () => {
  const fs = await import('node:fs');
  const os = await import('node:os');
  const path = await import('node:path');
  const { Store } = await import('../src/store/store.js');
  const { LogService } = await import('../src/logs/service.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-logs-'));
  const store = new Store(path.join(dir, 'db.sqlite'));
  try {
    const now = Date.now();
    store.appendLogs([
      { ownerId: 'vm1', ts: now - 40 * 86_400_000, level: 'info', message: 'old' },
      { ownerId: 'vm1', ts: now - 1000, level: 'info', message: 'new' },
    ]);
    const logs = new LogService(store, 30); // prunes at start
    assert.deepEqual(logs.query('vm1', { order: 'oldest_first', limit: 10 }).map((l) => l.message), ['new']);
    logs.close();
    const keepAll = new LogService(store, 0);
    assert.equal(keepAll.prune(now + 400 * 86_400_000), 0, 'retention 0 keeps everything');
    keepAll.close();
  } finally {
    store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
