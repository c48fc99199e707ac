import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startGitServer, type GitServer } from './helpers/git.js';
import { request, waitFor200 } from './helpers/http.js';
import { startOutsideHost } from './helpers/netns.js';
import { busyboxConfig, busyboxLayer, pushImage, startRegistry, type TestRegistry } from './helpers/registry.js';
import { startTestServer, type TestServer } from './helpers/server.js';

// Real Dockerfile builds with buildah: sources from a real git server on loopback, FROM a real registry.

const has = (cmd: string) => {
  try {
    execFileSync('which', [cmd], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
};
const skip = process.getuid?.() !== 0 ? 'builds need root (buildah with runc)' : !has('buildah') || !has('runc') ? 'buildah or runc is not installed (run scripts/setup.sh)' : false;
const vmSkip = !fs.existsSync('/var/cache/cakework-kernel/vmlinux') ? 'the guest kernel is not built' : false;

const TOKEN = 'ghs_testinstallationtoken0123456789';
let reg: TestRegistry;
let git: GitServer;
let srv: TestServer;
let base: string;
let authFile: string;

async function waitBuild(id: string, timeoutMs = 120_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await srv.call('GET', `/v1/image/build/${id}`);
    assert.equal(r.status, 200);
    if (r.body.status === 'succeeded' || r.body.status === 'failed') return r.body;
    assert.ok(Date.now() < deadline, `build ${id} still ${r.body.status}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

async function buildLogs(id: string): Promise<Array<{ level: string; message: string }>> {
  return (await srv.call('GET', `/v1/image/build/${id}/logs?batch=1000`)).body.lines;
}

describe('image builds', { skip }, () => {
  before(async () => {
    reg = await startRegistry({ users: { builder: 'builder-pass' } });
    await pushImage(reg, 'builds/base', 'v1', { layers: [await busyboxLayer()], config: busyboxConfig });
    base = `${reg.host}/builds/base:v1`;
    git = await startGitServer(TOKEN);
    git.makeRepo('acme/site', {
      main: { 'index.html': 'from git main\n' },
      feature: {
        'index.html': 'from git feature\n',
        'secret.txt': 'do not ship\n',
        Dockerfile: 'FROM nonexistent.invalid/replaced:never\n',
      },
    });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-build-auth-'));
    const auth = path.join(dir, 'auth.json');
    authFile = auth;
    fs.writeFileSync(auth, JSON.stringify({ auths: { [reg.host]: { auth: Buffer.from('builder:builder-pass').toString('base64') } } }));
    srv = await startTestServer({
      CAKEWORK_GITHUB_URL: git.url,
      CAKEWORK_INSECURE_REGISTRIES: reg.host,
      CAKEWORK_BUILD_AUTH_FILE: auth,
      CAKEWORK_VM_SUBNET: '198.18.0.0/17',
    });
  });
  after(async () => {
    await srv?.close();
    await git?.stop();
    await reg?.stop();
  });

  const dockerfile = () =>
    [`FROM ${base}`, 'COPY . /www/', 'RUN ["/bin/sh", "-c", "echo run-step-says-hello; ls /www"]', 'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]', ''].join('\n');

  test('a build from a branch: our Dockerfile and .dockerignore apply, RUN output is logged, the image runs', { skip: vmSkip }, async () => {
    const r = await srv.call('POST', '/v1/image/build/github', { dockerfile: dockerfile(), dockerignore: 'secret.txt\n', token: TOKEN, repository: 'acme/site', branch: 'feature' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.status, 'created');
    assert.match(r.body.buildId, /^bld_/);
    assert.match(r.body.imageId, /^img_/);
    // startVM on the reserved image waits for the build
    const vm = await srv.call('POST', '/v1/vm/start', { imageId: r.body.imageId, waitForPort: true });
    assert.equal(vm.status, 200, JSON.stringify(vm.body));
    const build = await waitBuild(r.body.buildId);
    assert.equal(build.status, 'succeeded', build.error);
    assert.equal((await waitFor200(srv.url, vm.body.hostname, '/index.html')).body, 'from git feature\n');
    assert.equal((await request(srv.url, vm.body.hostname, '/secret.txt')).status, 404, '.dockerignore kept secret.txt out');
    await srv.call('POST', `/v1/vm/${vm.body.id}/stop`);

    const lines = await buildLogs(r.body.buildId);
    assert.ok(lines.some((l) => l.level === 'info' && l.message === 'run-step-says-hello'), 'RUN output in the logs');
    assert.ok(lines.some((l) => /^STEP 3\/4: RUN/.test(l.message)));
    assert.ok(!JSON.stringify(lines).includes(TOKEN), 'the token never reaches the logs');
    const img = (await srv.call('GET', `/v1/image/${r.body.imageId}`)).body;
    assert.equal(img.status, 'ready');
    assert.equal(img.source, 'build');
    assert.deepEqual(img.config.cmd, ['/bin/busybox', 'httpd', '-f', '-p', '8080', '-h', '/www']);
    assert.ok(git.authHeaders.includes(`Basic ${Buffer.from(`x-access-token:${TOKEN}`).toString('base64')}`));
  });

  test('a bad token, a missing branch, a bad Dockerfile line and a failing RUN each fail with a reason', async () => {
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ token: 'wrong-token', branch: 'main' }, /the token was refused for acme\/site/],
      [{ token: TOKEN, branch: 'no-such-branch' }, /branch "no-such-branch" does not exist in acme\/site/],
      [{ token: TOKEN, branch: 'main', dockerfile: `FROM ${base}\nFROBNICATE everything\n` }, /the Dockerfile build failed: .*(FROBNICATE|unknown instruction|unrecognized)/i],
      [{ token: TOKEN, branch: 'main', dockerfile: `FROM ${base}\nRUN ["/bin/sh", "-c", "echo about to fail; exit 42"]\n` }, /the Dockerfile build failed: .*(exit status 42|42)/],
    ];
    for (const [body, reason] of cases) {
      const r = await srv.call('POST', '/v1/image/build/github', { dockerfile: dockerfile(), repository: 'acme/site', ...body });
      assert.equal(r.status, 200);
      const build = await waitBuild(r.body.buildId);
      assert.equal(build.status, 'failed');
      assert.match(build.error, reason);
      const img = (await srv.call('GET', `/v1/image/${r.body.imageId}`)).body;
      assert.equal(img.status, 'failed');
      const vm = await srv.call('POST', '/v1/vm/start', { imageId: r.body.imageId });
      assert.equal(vm.status, 400, 'startVM on a failed build names the image');
      assert.match(vm.body.error.message, /failed/);
    }
  });

  test('a RUN step reaches outside hosts but not the host, its services or the API', async (t) => {
    const outside = startOutsideHost('198.19.78.2', '198.19.78.1');
    t.after(() => outside.stop());
    const [regHost, regPort] = reg.host.split(':');
    const apiPort = new URL(srv.url).port;
    const probe = (label: string, host: string, port: string | number) =>
      `if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 ${host} ${port} | head -c 100 | grep -q .; then echo ${label}=reached; else echo ${label}=blocked; fi`;
    const script = [
      probe('outside', '198.19.78.2', 80),
      probe('registry_loopback', regHost!, regPort!),
      probe('api_via_gateway', '$(ip route | sed -n "s/^default via \\([0-9.]*\\).*/\\1/p")', apiPort),
      probe('registry_via_gateway', '$(ip route | sed -n "s/^default via \\([0-9.]*\\).*/\\1/p")', regPort!),
    ].join('; ');
    const r = await srv.call('POST', '/v1/image/build/files', { dockerfile: `FROM ${base}\nRUN ["/bin/sh", "-c", ${JSON.stringify(script)}]\n`, files: [] });
    const build = await waitBuild(r.body.buildId);
    assert.equal(build.status, 'succeeded', build.error);
    const out = (await buildLogs(r.body.buildId)).filter((l) => l.level === 'info' && /=(reached|blocked)$/.test(l.message)).map((l) => l.message);
    assert.deepEqual(out, ['outside=reached', 'registry_loopback=blocked', 'api_via_gateway=blocked', 'registry_via_gateway=blocked']);
  });

  test('a build from files; path escapes and oversize input are refused with a 400 naming files', async () => {
    const r = await srv.call('POST', '/v1/image/build/files', {
      dockerfile: `FROM ${base}\nCOPY . /www/\nCMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]\n`,
      files: [
        { dir: '.', name: 'index.html', content: 'from files\n' },
        { dir: 'sub/dir', name: 'deep.txt', content: 'deep\n' },
      ],
    });
    assert.equal(r.status, 200);
    const build = await waitBuild(r.body.buildId);
    assert.equal(build.status, 'succeeded', build.error);
    assert.equal((await srv.call('GET', `/v1/image/${r.body.imageId}`)).body.status, 'ready');
    for (const files of [
      [{ dir: '../..', name: 'x', content: '' }],
      [{ dir: '/etc', name: 'x', content: '' }],
      [{ dir: '.', name: '../x', content: '' }],
      [{ dir: 'a\u0000b', name: 'x', content: '' }],
      [{ dir: '.', name: 'big', content: 'x'.repeat(33 * 1024 * 1024) }],
    ]) {
      const bad = await srv.call('POST', '/v1/image/build/files', { dockerfile: `FROM ${base}\n`, files });
      assert.equal(bad.status, 400, JSON.stringify(files).slice(0, 80));
      assert.equal(bad.body.error.field, 'files');
    }
    assert.equal((await srv.call('GET', '/v1/image/build/bld_nope')).status, 404);
  });

  test('a shutdown mid-build leaves the build and its image failed with the reason, also after a restart', async () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-build-restart-'));
    const a = await startTestServer({ CAKEWORK_INSECURE_REGISTRIES: reg.host, CAKEWORK_BUILD_AUTH_FILE: authFile }, dataDir);
    const r = await a.call('POST', '/v1/image/build/files', { dockerfile: `FROM ${base}\nRUN ["/bin/sh", "-c", "echo slow; sleep 30"]\n`, files: [] });
    for (let i = 0; (await a.call('GET', `/v1/image/build/${r.body.buildId}`)).body.status !== 'building' && i < 200; i++) await new Promise((res) => setTimeout(res, 50));
    await a.close();
    const b = await startTestServer({ CAKEWORK_API_KEY: a.key }, dataDir);
    try {
      const build = (await b.call('GET', `/v1/image/build/${r.body.buildId}`)).body;
      assert.equal(build.status, 'failed');
      assert.match(build.error, /the server shut down during the build/);
      const img = (await b.call('GET', `/v1/image/${r.body.imageId}`)).body;
      assert.equal(img.status, 'failed');
      assert.match(img.error, /shut down during the build/);
    } finally {
      await b.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
