import fs from 'node:fs';
import path from 'node:path';
import { ServiceError } from '../util/errors.js';
import { run } from '../util/exec.js';

export interface BuildFile {
  dir: string;
  name: string;
  content: string;
}

export const MAX_FILES_BYTES = 32 * 1024 * 1024;

/**
 * Checks every file's `dir` + `name` stays inside the build context (no `..`, no absolute path, no
 * NUL, `name` a single component) and the total size; returns the relative paths in order.
 */
export function checkFiles(files: BuildFile[]): string[] {
  let total = 0;
  const seen = new Set<string>();
  return files.map((f, i) => {
    const where = `files[${i}]`;
    if (f.dir.includes('\0') || f.name.includes('\0')) throw new ServiceError(400, `${where} contains a NUL byte`, 'files');
    if (f.dir.startsWith('/') || f.name.includes('/') || f.name === '.' || f.name === '..') {
      throw new ServiceError(400, `${where}: dir must be relative and name a single file name`, 'files');
    }
    const parts = f.dir.split('/').filter((p) => p !== '' && p !== '.');
    if (parts.includes('..')) throw new ServiceError(400, `${where}: dir "${f.dir}" leaves the build context`, 'files');
    const rel = [...parts, f.name].join('/');
    if (seen.has(rel)) throw new ServiceError(400, `${where}: ${rel} is given twice`, 'files');
    seen.add(rel);
    total += Buffer.byteLength(f.content);
    if (total > MAX_FILES_BYTES) throw new ServiceError(400, `files add up to more than ${MAX_FILES_BYTES} bytes`, 'files');
    return rel;
  });
}

export function writeFiles(contextDir: string, files: BuildFile[], rels: string[]): void {
  files.forEach((f, i) => {
    const target = path.join(contextDir, rels[i]!);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    fs.writeFileSync(target, f.content, { flag: 'wx' });
  });
}

/**
 * Shallow clone of one branch with a GitHub App installation token. The token travels in an HTTP
 * header set through git's environment config (GIT_CONFIG_*), so it is never in argv, in the
 * remote URL, in .git/config or in any file the build can COPY; `.git` is removed after the clone.
 */
export async function cloneBranch(
  baseUrl: string,
  repository: string,
  branch: string,
  token: string,
  into: string,
  timeoutMs: number,
  signal: AbortSignal,
): Promise<void> {
  const url = `${baseUrl.replace(/\/+$/, '')}/${repository}.git`;
  const basic = Buffer.from(`x-access-token:${token}`).toString('base64');
  try {
    await run('git', ['clone', '--quiet', '--depth', '1', '--single-branch', '--branch', branch, '--no-tags', '--', url, into], {
      timeoutMs,
      signal,
      env: {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        HOME: '/nonexistent',
        GIT_TERMINAL_PROMPT: '0',
        GIT_CONFIG_NOSYSTEM: '1',
        GIT_CONFIG_COUNT: '1',
        GIT_CONFIG_KEY_0: 'http.extraHeader',
        GIT_CONFIG_VALUE_0: `Authorization: Basic ${basic}`,
      },
    });
  } catch (err) {
    const msg = (err as Error).message.replaceAll(token, '***').replaceAll(basic, '***');
    if (/Remote branch .* not found|couldn't find remote ref/i.test(msg)) throw new ServiceError(400, `branch "${branch}" does not exist in ${repository}`, 'branch');
    if (/Authentication failed|403|401|could not read Username|terminal prompts disabled/i.test(msg)) {
      throw new ServiceError(400, `the token was refused for ${repository}: check the GitHub App installation token and its access to the repository`, 'token');
    }
    if (/not found|does not exist|404/i.test(msg)) throw new ServiceError(400, `repository ${repository} was not found (or the token cannot see it)`, 'repository');
    throw new Error(`git clone failed: ${msg}`);
  }
  fs.rmSync(path.join(into, '.git'), { recursive: true, force: true });
}
