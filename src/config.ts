import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

/** Everything the server reads from the environment; README lists each variable. */
export interface Config {
  port: number;
  host: string;
  dataDir: string;
  apiKey: string | undefined;
  domain: string;
  publicUrl: string | undefined;
  insecureRegistries: string[];
  importConcurrency: number;
  registryTimeoutMs: number;
  importTimeoutMs: number;
  logLevel: string;
  /** tmpfs directory for unpacking layers, or null to unpack under the data dir */
  unpackDir: string | null;
  vmSubnet: string;
  scratchGb: number;
  stopGraceMs: number;
  bootTimeoutMs: number;
  imageWaitMs: number;
  portWaitMs: number;
  cacheTimeoutMs: number;
  /** off: spawn at start; on: a paused QEMU waits for the snapshot; warm: restored, warmed up, paused */
  prepareRestores: 'off' | 'on' | 'warm';
  buildConcurrency: number;
  buildTimeoutMs: number;
  buildMemoryMb: number;
  buildCpus: number;
  githubUrl: string;
  /** registry credentials for FROM, in containers-auth.json format */
  buildAuthFile: string | undefined;
  /** nameserver for RUN steps (default: the host's first non-loopback one) */
  buildDns: string | undefined;
  logRetentionDays: number;
  memoryOvercommit: number;
  cpuOvercommit: number;
  maxVmsPerAccount: number;
  /** what a graceful shutdown does with running VMs: stop them, or keep them for the next start to adopt */
  onShutdown: 'stop' | 'keep';
}

function numVar(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min || n > max) throw new Error(`${name} must be a number between ${min} and ${max}, got "${raw}"`);
  return n;
}

function intVar(env: NodeJS.ProcessEnv, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new Error(`${name} must be an integer between ${min} and ${max}, got "${raw}"`);
  }
  return n;
}

/** CAKEWORK_UNPACK_DIR, `off`, or by default a directory of this data dir's own under /dev/shm. */
function unpackDir(env: NodeJS.ProcessEnv, dataDir: string): string | null {
  const v = env.CAKEWORK_UNPACK_DIR;
  if (v === 'off') return null;
  if (v) return path.resolve(v);
  if (!fs.existsSync('/dev/shm')) return null;
  const tag = crypto.createHash('sha256').update(dataDir).digest('hex').slice(0, 12);
  return `/dev/shm/cakework-unpack-${tag}`;
}

function prepareMode(v: string | undefined): 'off' | 'on' | 'warm' {
  if (v === undefined || v === '') return 'warm';
  if (v === 'off' || v === 'on' || v === 'warm') return v;
  throw new Error(`CAKEWORK_PREPARE_RESTORES must be "off", "on" or "warm", got "${v}"`);
}

function shutdownMode(v: string | undefined): 'stop' | 'keep' {
  if (v === undefined || v === '' || v === 'stop') return 'stop';
  if (v === 'keep') return 'keep';
  throw new Error(`CAKEWORK_ON_SHUTDOWN must be "stop" or "keep", got "${v}"`);
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const port = intVar(env, 'CAKEWORK_PORT', 8080, 0, 65535);
  const dataDir = path.resolve(env.CAKEWORK_DATA_DIR || 'data');
  return {
    port,
    host: env.CAKEWORK_HOST || '0.0.0.0',
    dataDir,
    apiKey: env.CAKEWORK_API_KEY || undefined,
    domain: env.CAKEWORK_DOMAIN || 'localhost',
    publicUrl: env.CAKEWORK_PUBLIC_URL || undefined,
    insecureRegistries: (env.CAKEWORK_INSECURE_REGISTRIES || '')
      .split(',')
      .map((s) => s.trim().toLowerCase())
      .filter(Boolean),
    importConcurrency: intVar(env, 'CAKEWORK_IMPORT_CONCURRENCY', 2, 1, 64),
    registryTimeoutMs: intVar(env, 'CAKEWORK_REGISTRY_TIMEOUT_MS', 30_000, 100, 3_600_000),
    importTimeoutMs: intVar(env, 'CAKEWORK_IMPORT_TIMEOUT_MS', 1_800_000, 1000, 86_400_000),
    logLevel: env.CAKEWORK_LOG_LEVEL || 'info',
    unpackDir: unpackDir(env, dataDir),
    vmSubnet: env.CAKEWORK_VM_SUBNET || '10.213.0.0/16',
    scratchGb: intVar(env, 'CAKEWORK_SCRATCH_GB', 2, 1, 500),
    stopGraceMs: intVar(env, 'CAKEWORK_STOP_GRACE_MS', 10_000, 0, 600_000),
    bootTimeoutMs: intVar(env, 'CAKEWORK_BOOT_TIMEOUT_MS', 60_000, 1000, 600_000),
    imageWaitMs: intVar(env, 'CAKEWORK_IMAGE_WAIT_MS', 60_000, 0, 3_600_000),
    portWaitMs: intVar(env, 'CAKEWORK_PORT_WAIT_MS', 30_000, 0, 600_000),
    cacheTimeoutMs: intVar(env, 'CAKEWORK_CACHE_TIMEOUT_MS', 60_000, 100, 3_600_000),
    prepareRestores: prepareMode(env.CAKEWORK_PREPARE_RESTORES),
    buildConcurrency: intVar(env, 'CAKEWORK_BUILD_CONCURRENCY', 1, 1, 64),
    buildTimeoutMs: intVar(env, 'CAKEWORK_BUILD_TIMEOUT_MS', 1_800_000, 1000, 86_400_000),
    buildMemoryMb: intVar(env, 'CAKEWORK_BUILD_MEMORY_MB', 2048, 64, 1_048_576),
    buildCpus: intVar(env, 'CAKEWORK_BUILD_CPUS', 2, 1, 256),
    githubUrl: env.CAKEWORK_GITHUB_URL || 'https://github.com',
    buildAuthFile: env.CAKEWORK_BUILD_AUTH_FILE || undefined,
    buildDns: env.CAKEWORK_BUILD_DNS || undefined,
    logRetentionDays: intVar(env, 'CAKEWORK_LOG_RETENTION_DAYS', 30, 0, 36_500),
    memoryOvercommit: numVar(env, 'CAKEWORK_MEMORY_OVERCOMMIT', 1.5, 0.1, 100),
    cpuOvercommit: numVar(env, 'CAKEWORK_CPU_OVERCOMMIT', 4, 0.1, 1000),
    maxVmsPerAccount: intVar(env, 'CAKEWORK_MAX_VMS_PER_ACCOUNT', 20, 1, 100_000),
    onShutdown: shutdownMode(env.CAKEWORK_ON_SHUTDOWN),
  };
}
