import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ImageConfig } from '../store/store.js';

/** The guest kernel and initramfs that `scripts/setup.sh` builds, and what the guest init is told. */

const projectRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface GuestAssets {
  kernel: string;
  initrd: string;
}

export function guestAssets(env: NodeJS.ProcessEnv = process.env): GuestAssets {
  return {
    kernel: env.CAKEWORK_KERNEL || '/var/cache/cakework-kernel/vmlinux',
    initrd: env.CAKEWORK_INITRD || path.join(projectRoot, 'dist', 'guest', 'initramfs.cpio'),
  };
}

export function missingAssets(a: GuestAssets): string[] {
  return [a.kernel, a.initrd].filter((f) => !fs.existsSync(f));
}

/** Host TSC frequency: without `tsc_early_khz` some TCG boots hang calibrating the TSC. */
function hostTscKhz(): number {
  const m = /cpu MHz\s*:\s*([\d.]+)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
  return m ? Math.round(Number(m[1]) * 1000) : 2_000_000;
}

const tscKhz = hostTscKhz();

/** Kernel command line; every option here was measured to shorten a TCG boot (host-facts.md). */
export function kernelCmdline(): string {
  return [
    'console=ttyS0',
    'quiet',
    `tsc_early_khz=${tscKhz}`,
    'tsc=reliable',
    'no_timer_check',
    'cryptomgr.notests',
    'mitigations=off',
    'audit=0',
    'nowatchdog',
    'i8042.noaux',
    'i8042.nomux',
    'i8042.nopnp',
    'i8042.dumbkbd',
    '8250.nr_uarts=1',
    'reboot=t',
    'panic=-1',
    'pci=off',
    'nolapic_timer',
  ].join(' ');
}

export interface GuestRun {
  argv: string[];
  env: string[];
  cwd: string;
  user: string;
  hostname: string;
  ip: string;
  gateway: string;
  prefix: number;
}

/** What runs: Entrypoint + Cmd, the image Env with envVars overriding it, WorkingDir and User. */
export function guestRun(config: ImageConfig, envVars: Record<string, string>, net: Omit<GuestRun, 'argv' | 'env' | 'cwd' | 'user'>): GuestRun {
  const env = new Map<string, string>();
  for (const kv of config.env) {
    const eq = kv.indexOf('=');
    if (eq > 0) env.set(kv.slice(0, eq), kv.slice(eq + 1));
  }
  for (const [k, v] of Object.entries(envVars)) env.set(k, v);
  return {
    argv: [...(config.entrypoint ?? []), ...(config.cmd ?? [])],
    env: [...env].map(([k, v]) => `${k}=${v}`),
    cwd: config.workingDir || '/',
    user: config.user,
    ...net,
  };
}

/** The config block the guest init reads: NUL-terminated key/value strings ending with "end". */
export function encodeGuestRun(r: GuestRun, nowMs: number): Buffer {
  const kv: string[] = ['time', String(nowMs), 'hostname', r.hostname, 'ip', r.ip, 'gateway', r.gateway, 'prefix', String(r.prefix), 'cwd', r.cwd, 'user', r.user];
  for (const a of r.argv) kv.push('arg', a);
  for (const e of r.env) kv.push('env', e);
  kv.push('end');
  for (const s of kv) if (s.includes('\0')) throw new Error('guest config strings cannot contain NUL');
  return Buffer.from(kv.join('\0') + '\0');
}
