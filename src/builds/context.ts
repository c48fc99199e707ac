import fs from 'node:fs';
import path from 'node:path';
import { run } from '../util/exec.js';

/** A request the caller must fix; the API answers 400 naming `field`. */
export class BuildInputError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

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
    if (f.dir.includes('\0') || f.name.includes('\0')) throw new BuildInputError('files', `${where} contains a NUL byte`);
    if (f.dir.startsWith('/') || f.name.includes('/') || f.name === '.' || f.name === '..') {
      throw new BuildInputError('files', `${where}: dir must be relative and name a single file name`);
    }
    const parts = f.dir.split('/').filter((p) => p !== '' && p !== '.');
    if (parts.includes('..')) throw new BuildInputError('files', `${where}: dir "${f.dir}" leaves the build context`);
    const rel = [...parts, f.name].join('/');
    if (seen.has(rel)) throw new BuildInputError('files', `${where}: ${rel} is given twice`);
    seen.add(rel);
    total += Buffer.byteLength(f.content);
    if (total > MAX_FILES_BYTES) throw new BuildInputError('files', `files add up to more than ${MAX_FILES_BYTES} bytes`);
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
    if (/Remote branch .* not found|couldn't find remote ref/i.test(msg)) throw new BuildInputError('branch', `branch "${branch}" does not exist in ${repository}`);
    if (/Authentication failed|403|401|could not read Username|terminal prompts disabled/i.test(msg)) {
      throw new BuildInputError('token', `the token was refused for ${repository}: check the GitHub App installation token and its access to the repository`);
    }
    if (/not found|does not exist|404/i.test(msg)) throw new BuildInputError('repository', `repository ${repository} was not found (or the token cannot see it)`);
    throw new Error(`git clone failed: ${msg}`);
  }
  fs.rmSync(path.join(into, '.git'), { recursive: true, force: true });
}
