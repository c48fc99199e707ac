import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/**
 * An "outside" host of the test's own, for "can reach outside" checks that must not leave the
 * machine: a network namespace with busybox httpd on `ip`:80, reached through a veth pair.
 */
export function startOutsideHost(ip: string, hostSide: string): { stop(): void } {
  const ns = `tnet${crypto.randomBytes(3).toString('hex')}`;
  const run = (...args: string[]) => execFileSync('ip', args, { timeout: 10_000 });
  const www = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-outside-'));
  fs.writeFileSync(path.join(www, 'index.html'), 'outside\n');
  run('netns', 'add', ns);
  run('link', 'add', `${ns}a`, 'type', 'veth', 'peer', 'name', `${ns}b`);
  run('link', 'set', `${ns}b`, 'netns', ns);
  run('addr', 'add', `${hostSide}/24`, 'dev', `${ns}a`);
  run('link', 'set', `${ns}a`, 'up');
  run('-n', ns, 'addr', 'add', `${ip}/24`, 'dev', `${ns}b`);
  run('-n', ns, 'link', 'set', `${ns}b`, 'up');
  run('-n', ns, 'link', 'set', 'lo', 'up');
  const httpd = spawn('ip', ['netns', 'exec', ns, 'busybox', 'httpd', '-f', '-p', '80', '-h', www], { stdio: 'ignore' });
  return {
    stop() {
      httpd.kill('SIGKILL');
      execFileSync('ip', ['link', 'del', `${ns}a`], { stdio: 'ignore' });
      execFileSync('ip', ['netns', 'del', ns]);
      fs.rmSync(www, { recursive: true, force: true });
    },
  };
}
