import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';

/**
 * A git server on loopback: git's own smart-HTTP CGI (`git http-backend`) behind a check of the
 * GitHub App convention (Basic auth, user x-access-token, password = the installation token).
 */
export interface GitServer {
  url: string;
  /** Authorization headers seen, to prove the token reached the server and nothing else did */
  authHeaders: string[];
  makeRepo(fullName: string, branches: Record<string, Record<string, string>>): void;
  stop(): Promise<void>;
}

export async function startGitServer(token: string): Promise<GitServer> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-git-'));
  const authHeaders: string[] = [];
  const expected = `Basic ${Buffer.from(`x-access-token:${token}`).toString('base64')}`;
  const server = http.createServer((req, res) => {
    authHeaders.push(req.headers.authorization ?? '');
    if (req.headers.authorization !== expected) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="git"' }).end('bad token\n');
      return;
    }
    const u = new URL(req.url!, 'http://git');
    const cgi = spawn('git', ['http-backend'], {
      env: {
        PATH: process.env.PATH,
        GIT_PROJECT_ROOT: root,
        GIT_HTTP_EXPORT_ALL: '1',
        PATH_INFO: decodeURIComponent(u.pathname),
        QUERY_STRING: u.search.slice(1),
        REQUEST_METHOD: req.method,
        CONTENT_TYPE: req.headers['content-type'] ?? '',
        REMOTE_USER: 'x-access-token',
        REMOTE_ADDR: '127.0.0.1',
      },
      stdio: ['pipe', 'pipe', 'ignore'],
      timeout: 60_000,
    });
    req.pipe(cgi.stdin);
    let head = Buffer.alloc(0);
    let headersDone = false;
    cgi.stdout.on('data', (d: Buffer) => {
      if (headersDone) {
        res.write(d);
        return;
      }
      head = Buffer.concat([head, d]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      headersDone = true;
      let status = 200;
      const headers: Record<string, string> = {};
      for (const line of head.subarray(0, end).toString().split('\r\n')) {
        const i = line.indexOf(':');
        const k = line.slice(0, i).trim().toLowerCase();
        const v = line.slice(i + 1).trim();
        if (k === 'status') status = Number(v.split(' ')[0]);
        else headers[k] = v;
      }
      res.writeHead(status, headers);
      res.write(head.subarray(end + 4));
    });
    cgi.on('close', () => res.end());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const git = (cwd: string, ...args: string[]) =>
    execFileSync('git', ['-c', 'user.name=test', '-c', 'user.email=test@example.com', ...args], { cwd, stdio: 'pipe', timeout: 30_000 });
  return {
    url: `http://127.0.0.1:${port}`,
    authHeaders,
    makeRepo(fullName, branches) {
      const bare = path.join(root, `${fullName}.git`);
      fs.mkdirSync(bare, { recursive: true });
      git(bare, 'init', '--quiet', '--bare');
      const work = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-git-work-'));
      git(work, 'init', '--quiet');
      for (const [branch, files] of Object.entries(branches)) {
        git(work, 'checkout', '--quiet', '--orphan', branch);
        git(work, 'rm', '-rf', '--quiet', '--ignore-unmatch', '.');
        for (const [file, content] of Object.entries(files)) {
          fs.mkdirSync(path.dirname(path.join(work, file)), { recursive: true });
          fs.writeFileSync(path.join(work, file), content);
        }
        git(work, 'add', '-A');
        git(work, 'commit', '--quiet', '-m', `${branch} contents`);
        git(work, 'push', '--quiet', bare, `${branch}:refs/heads/${branch}`);
      }
      fs.rmSync(work, { recursive: true, force: true });
    },
    async stop() {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      fs.rmSync(root, { recursive: true, force: true });
    },
  };
}
