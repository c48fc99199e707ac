import { spawn } from 'node:child_process';

export interface RunOptions {
  timeoutMs: number;
  signal?: AbortSignal;
  cwd?: string;
  /** written to the program's stdin */
  input?: string;
  /** replaces the environment */
  env?: NodeJS.ProcessEnv;
  /** sees the output as it comes (it is still collected, last 64 KiB) */
  onStdout?: (chunk: Buffer) => void;
  onStderr?: (chunk: Buffer) => void;
}

/**
 * Runs a program with an argument array (never a shell), kills it at the timeout or on abort, and
 * resolves with its output once it has been reaped. A non-zero exit rejects with the stderr tail.
 */
export function run(cmd: string, args: string[], opts: RunOptions): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      timeout: opts.timeoutMs,
      killSignal: 'SIGKILL',
      signal: opts.signal,
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => {
      opts.onStdout?.(d);
      stdout = (stdout + d.toString()).slice(-65536);
    });
    child.stderr!.on('data', (d: Buffer) => {
      opts.onStderr?.(d);
      stderr = (stderr + d.toString()).slice(-65536);
    });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    child.on('error', (err) => reject(new Error(`${cmd} could not run: ${err.message}`)));
    child.on('close', (code, signal) => {
      if (code === 0) resolve({ stdout, stderr });
      else if (signal) reject(new Error(`${cmd} was killed (${signal}) after ${opts.timeoutMs} ms or on abort`));
      else reject(new Error(`${cmd} exited with code ${code}: ${stderr.trim().split('\n').slice(-5).join(' | ')}`));
    });
  });
}
