import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import tar from 'tar-stream';

/** A real `docker-registry` (CNCF distribution) on loopback with htpasswd auth, for tests and benchmarks. */

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface TestRegistry {
  /** host:port, as used in imageUri */
  host: string;
  user: string;
  password: string;
  process: ChildProcess;
  /** The Authorization header that lets the first user push to and pull from `repo`. */
  authFor(repo: string): Promise<string>;
  /** Requests the token service answered, by outcome (Bearer registries only). */
  tokenRequests: { granted: number; refused: number };
  stop(): Promise<void>;
}

export interface RegistryAuth {
  users: Record<string, string>;
  /** `basic` (htpasswd) or `token`: the Bearer flow with a token service of the test's own. */
  mode?: 'basic' | 'token';
}

interface TokenService {
  realm: string;
  certFile: string;
  counts: { granted: number; refused: number };
  stop(): Promise<void>;
}

const TOKEN_SERVICE = 'cakework-test-registry';
const TOKEN_ISSUER = 'cakework-test-issuer';

/** A Docker token service: checks Basic credentials and signs an RS256 JWT for the asked scope. */
async function startTokenService(dir: string, users: Record<string, string>): Promise<TokenService> {
  const keyFile = path.join(dir, 'token.key');
  const certFile = path.join(dir, 'token.crt');
  const r = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=cakework-test-token'], { timeout: 60_000 });
  if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
  const key = crypto.createPrivateKey(fs.readFileSync(keyFile));
  const der = new crypto.X509Certificate(fs.readFileSync(certFile)).raw.toString('base64');
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const counts = { granted: 0, refused: 0 };
  const http = await import('node:http');
  const server = http.createServer((req, res) => {
    const url = new URL(req.url!, 'http://token');
    const [scheme, value] = (req.headers.authorization ?? '').split(' ');
    const [user, pass] = scheme === 'Basic' && value ? Buffer.from(value, 'base64').toString().split(':') : [];
    if (!user || users[user] !== pass) {
      counts.refused++;
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"invalid credentials"}');
      return;
    }
    counts.granted++;
    const access = url.searchParams.getAll('scope').map((sc) => {
      const [type, name, actions] = sc.split(':');
      return { type, name, actions: (actions ?? '').split(',') };
    });
    const now = Math.floor(Date.now() / 1000);
    const head = b64({ typ: 'JWT', alg: 'RS256', x5c: [der] });
    const claims = b64({ iss: TOKEN_ISSUER, sub: user, aud: TOKEN_SERVICE, exp: now + 600, nbf: now - 10, iat: now, jti: crypto.randomUUID(), access });
    const sig = crypto.sign('sha256', Buffer.from(`${head}.${claims}`), key).toString('base64url');
    const token = `${head}.${claims}.${sig}`;
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, access_token: token, expires_in: 600 }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    certFile,
    counts,
    stop: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}

export async function startRegistry(auth: RegistryAuth): Promise<TestRegistry> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-registry-'));
  const htpasswd = path.join(dir, 'htpasswd');
  const lines = Object.entries(auth.users).map(([u, p]) => {
    const r = spawnSync('htpasswd', ['-Bbn', u, p], { timeout: 30_000 });
    if (r.status !== 0) throw new Error(`htpasswd failed: ${r.stderr}`);
    return r.stdout.toString().trim();
  });
  fs.writeFileSync(htpasswd, lines.join('\n') + '\n');
  const token = auth.mode === 'token' ? await startTokenService(dir, auth.users) : null;
  const port = await freePort();
  const config = path.join(dir, 'config.yml');
  fs.writeFileSync(
    config,
    [
      'version: 0.1',
      'log: {level: error, accesslog: {disabled: true}}',
      `storage: {filesystem: {rootdirectory: ${dir}/data}, delete: {enabled: true}}`,
      `http: {addr: "127.0.0.1:${port}"}`,
      token
        ? `auth: {token: {realm: "${token.realm}", service: ${TOKEN_SERVICE}, issuer: ${TOKEN_ISSUER}, rootcertbundle: ${token.certFile}}}`
        : `auth: {htpasswd: {realm: cakework-test, path: ${htpasswd}}}`,
    ].join('\n'),
  );
  const child = spawn('docker-registry', ['serve', config], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const host = `127.0.0.1:${port}`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited: ${stderr}`);
    const ok = await fetch(`http://${host}/v2/`).then((r) => r.status === 401, () => false);
    if (ok) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`docker-registry did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const [user, password] = Object.entries(auth.users)[0]!;
  return {
    host,
    user,
    password,
    process: child,
    tokenRequests: token?.counts ?? { granted: 0, refused: 0 },
    async authFor(repo: string) {
      const basic = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
      if (!token) return basic;
      const res = await fetch(`${token.realm}?service=${TOKEN_SERVICE}&scope=repository:${repo}:pull,push`, { headers: { authorization: basic } });
      const body = (await res.json()) as { token: string };
      return `Bearer ${body.token}`;
    },
    async stop() {
      await token?.stop();
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ---------- building and pushing images ----------

export interface TarEntry {
  name: string;
  type?: 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'fifo';
  content?: string | Buffer;
  linkname?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  devmajor?: number;
  devminor?: number;
}

export async function makeTar(entries: TarEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((r) => pack.on('end', () => r()));
  for (const e of entries) {
    const type = e.type ?? 'file';
    const content = e.content === undefined ? undefined : Buffer.from(e.content);
    // tar-stream's type marks optional header fields as required
    const header = {
        name: e.name,
        type,
        mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
        uid: e.uid ?? 0,
        gid: e.gid ?? 0,
        mtime: new Date(1_700_000_000_000),
        size: type === 'file' ? (content?.length ?? 0) : 0,
    } as tar.Header;
    if (e.linkname !== undefined) header.linkname = e.linkname;
    if (e.devmajor !== undefined) header.devmajor = e.devmajor;
    if (e.devminor !== undefined) header.devminor = e.devminor;
    if (type === 'file') pack.entry(header, content ?? Buffer.alloc(0));
    else pack.entry(header);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

export type Compression = 'gzip' | 'zstd' | 'none';

export interface Layer {
  blob: Buffer;
  mediaType: string;
  diffId: string;
}

const sha = (b: Buffer): string => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;

export function compressLayer(tarball: Buffer, compression: Compression, format: 'oci' | 'docker'): Layer {
  const diffId = sha(tarball);
  if (compression === 'zstd') {
    const r = spawnSync('zstd', ['-q', '-c', '-3'], { input: tarball, maxBuffer: 1 << 30, timeout: 120_000 });
    if (r.status !== 0) throw new Error(`zstd failed: ${r.stderr}`);
    return { blob: r.stdout, mediaType: 'application/vnd.oci.image.layer.v1.tar+zstd', diffId };
  }
  if (compression === 'none') return { blob: tarball, mediaType: 'application/vnd.oci.image.layer.v1.tar', diffId };
  return {
    blob: zlib.gzipSync(tarball, { level: 1 }),
    mediaType: format === 'oci' ? 'application/vnd.oci.image.layer.v1.tar+gzip' : 'application/vnd.docker.image.rootfs.diff.tar.gzip',
    diffId,
  };
}

export interface ImageSpec {
  layers: Layer[];
  config?: { Entrypoint?: string[]; Cmd?: string[]; Env?: string[]; WorkingDir?: string; User?: string; ExposedPorts?: Record<string, object> };
  format?: 'oci' | 'docker';
  architecture?: string;
  /** Leave `mediaType` out of the manifest body, as umoci does */
  omitMediaType?: boolean;
}

async function pushBlob(reg: TestRegistry, repo: string, blob: Buffer): Promise<string> {
  const digest = sha(blob);
  const headers = { authorization: await reg.authFor(repo) };
  const head = await fetch(`http://${reg.host}/v2/${repo}/blobs/${digest}`, { method: 'HEAD', headers });
  if (head.ok) return digest;
  const start = await fetch(`http://${reg.host}/v2/${repo}/blobs/uploads/`, { method: 'POST', headers });
  if (start.status !== 202) throw new Error(`blob upload start: HTTP ${start.status}`);
  const loc = new URL(start.headers.get('location')!, `http://${reg.host}`);
  loc.searchParams.set('digest', digest);
  const put = await fetch(loc, {
    method: 'PUT',
    headers: { ...headers, 'content-type': 'application/octet-stream' },
    body: new Uint8Array(blob),
  });
  if (put.status !== 201) throw new Error(`blob upload: HTTP ${put.status} ${await put.text()}`);
  return digest;
}

async function putManifest(reg: TestRegistry, repo: string, ref: string, body: Buffer, mediaType: string): Promise<string> {
  const res = await fetch(`http://${reg.host}/v2/${repo}/manifests/${ref}`, {
    method: 'PUT',
    headers: { authorization: await reg.authFor(repo), 'content-type': mediaType },
    body: new Uint8Array(body),
  });
  if (res.status !== 201) throw new Error(`manifest upload: HTTP ${res.status} ${await res.text()}`);
  return sha(body);
}

/** Pushes one image manifest (OCI or Docker v2); returns its digest. */
export async function pushImage(reg: TestRegistry, repo: string, tag: string, spec: ImageSpec): Promise<{ digest: string; size: number }> {
  const format = spec.format ?? 'oci';
  const config = Buffer.from(
    JSON.stringify({
      architecture: spec.architecture ?? 'amd64',
      os: 'linux',
      config: spec.config ?? {},
      rootfs: { type: 'layers', diff_ids: spec.layers.map((l) => l.diffId) },
    }),
  );
  const configDigest = await pushBlob(reg, repo, config);
  const layers = [];
  for (const l of spec.layers) {
    layers.push({ mediaType: l.mediaType, digest: await pushBlob(reg, repo, l.blob), size: l.blob.length });
  }
  const manifestType = format === 'oci' ? 'application/vnd.oci.image.manifest.v1+json' : 'application/vnd.docker.distribution.manifest.v2+json';
  const manifest: Record<string, unknown> = {
    schemaVersion: 2,
    mediaType: manifestType,
    config: {
      mediaType: format === 'oci' ? 'application/vnd.oci.image.config.v1+json' : 'application/vnd.docker.container.image.v1+json',
      digest: configDigest,
      size: config.length,
    },
    layers,
  };
  if (spec.omitMediaType) delete manifest.mediaType;
  const body = Buffer.from(JSON.stringify(manifest));
  const digest = await putManifest(reg, repo, tag, body, manifestType);
  return { digest, size: body.length };
}

/** Pushes an OCI index whose entries are pushed images for the given platforms. */
export async function pushIndex(
  reg: TestRegistry,
  repo: string,
  tag: string,
  platforms: Array<{ architecture: string; spec: ImageSpec }>,
): Promise<string> {
  const manifests = [];
  for (const p of platforms) {
    const m = await pushImage(reg, repo, `${tag}-${p.architecture}`, { ...p.spec, architecture: p.architecture });
    manifests.push({
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      digest: m.digest,
      size: m.size,
      platform: { os: 'linux', architecture: p.architecture },
    });
  }
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests }));
  return putManifest(reg, repo, tag, body, 'application/vnd.oci.image.index.v1+json');
}

const APPLETS = ['cat', 'echo', 'env', 'grep', 'head', 'httpd', 'nc', 'nproc', 'printf', 'sed', 'sha1sum', 'base64', 'xxd', 'tr', 'cut', 'sleep', 'id', 'pwd', 'ls', 'date', 'hostname', 'ip', 'touch', 'test'];

/** A WebSocket handshake in busybox sh (run per connection by `nc -ll -e`), then a byte echo. */
const WS_ECHO = `#!/bin/sh
key=""
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=$(printf '%s' "\${line#*:}" | tr -d ' ') ;; esac
done
accept=$(printf '%s' "\${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11" | sha1sum | cut -d' ' -f1 | xxd -r -p | base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"
exec cat
`;

/** The busybox-static test app: `busybox httpd` serving /www on port 8080, plus applets and scripts. */
export async function busyboxLayer(compression: Compression = 'gzip', format: 'oci' | 'docker' = 'oci'): Promise<Layer> {
  const busybox = fs.readFileSync('/bin/busybox');
  return compressLayer(
    await makeTar([
      { name: 'bin/', type: 'directory' },
      { name: 'bin/busybox', content: busybox, mode: 0o755 },
      { name: 'bin/sh', type: 'symlink', linkname: 'busybox' },
      ...APPLETS.map((a): TarEntry => ({ name: `bin/${a}`, type: 'symlink', linkname: 'busybox' })),
      { name: 'etc/', type: 'directory' },
      { name: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\nappuser:x:1000:1000:app:/home/app:/bin/sh\n' },
      { name: 'etc/group', content: 'root:x:0:\napp:x:1000:\n' },
      { name: 'home/app/', type: 'directory', uid: 1000, gid: 1000 },
      { name: 'ws-echo.sh', content: WS_ECHO, mode: 0o755 },
      { name: 'www/', type: 'directory' },
      { name: 'www/index.html', content: 'hello from busybox\n' },
      { name: 'tmp/', type: 'directory', mode: 0o1777 },
    ]),
    compression,
    format,
  );
}

export const busyboxConfig = {
  Cmd: ['/bin/busybox', 'httpd', '-f', '-p', '8080', '-h', '/www'],
  Env: ['PATH=/bin', 'GREETING=hello'],
  WorkingDir: '/www',
  ExposedPorts: { '8080/tcp': {} },
};

export interface CountingProxy {
  host: string;
  requests: Array<{ method: string; path: string; status: number }>;
  /** When set, blob responses whose path includes this string get one byte flipped. */
  corruptPath: string | null;
  stop(): Promise<void>;
}

/** A loopback HTTP proxy in front of a registry that records every request (and can corrupt a blob). */
export async function countingProxy(targetHost: string): Promise<CountingProxy> {
  const http = await import('node:http');
  const state: CountingProxy = {
    host: '',
    requests: [],
    corruptPath: null,
    stop: async () => undefined,
  };
  const server = http.createServer((req, res) => {
    const upstream = http.request(
      { host: targetHost.split(':')[0], port: Number(targetHost.split(':')[1]), method: req.method, path: req.url, headers: { ...req.headers, host: targetHost } },
      (up) => {
        state.requests.push({ method: req.method!, path: req.url!, status: up.statusCode! });
        res.writeHead(up.statusCode!, up.headers);
        if (state.corruptPath && req.url!.includes(state.corruptPath)) {
          let first = true;
          up.on('data', (c: Buffer) => {
            if (first) {
              c = Buffer.from(c);
              c[c.length - 1] = c[c.length - 1]! ^ 0xff;
              first = false;
            }
            res.write(c);
          });
          up.on('end', () => res.end());
        } else {
          up.pipe(res);
        }
      },
    );
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  state.host = `127.0.0.1:${(server.address() as import('node:net').AddressInfo).port}`;
  state.stop = () => new Promise((r) => { server.closeAllConnections(); server.close(() => r()); });
  return state;
}

/** Extracts an erofs disk with fsck.erofs, to look at what a VM would see. */
export function extractErofs(disk: string, into: string): void {
  fs.rmSync(into, { recursive: true, force: true });
  const r = spawnSync('fsck.erofs', [`--extract=${into}`, disk], { timeout: 120_000 });
  if (r.status !== 0) throw new Error(`fsck.erofs failed: ${r.stderr}`);
}

/**
 * Mounts an erofs disk read-only (root only) and runs `fn` on it: unlike fsck.erofs's extractor,
 * the kernel shows the setuid bits exactly as a VM will. Returns false when not root.
 */
export function withMountedErofs(disk: string, fn: (dir: string) => void): boolean {
  if (process.getuid?.() !== 0) return false;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-mnt-'));
  const m = spawnSync('mount', ['-t', 'erofs', '-o', 'loop,ro', disk, dir], { timeout: 30_000 });
  if (m.status !== 0) throw new Error(`mount failed: ${m.stderr}`);
  try {
    fn(dir);
  } finally {
    spawnSync('umount', [dir], { timeout: 30_000 });
    fs.rmdirSync(dir);
  }
  return true;
}
