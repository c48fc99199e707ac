import { spawn } from 'node:child_process';
import fs from 'node:fs';
import type { Accel } from './machine.js';
import { kernelCmdline } from './guest.js';

/**
 * KVM is used only where a guest actually boots under it: /dev/kvm may exist and still be unusable
 * (PVM hosts run only PVM-built guests, and a normal kernel crawls there). The probe boots the guest
 * kernel with no root filesystem: it panics at once and, with panic=-1 and -no-reboot, QEMU exits.
 * Booting within the time limit means KVM works.
 */
export async function probeAccel(kernel: string, timeoutMs = 5000): Promise<{ accel: Accel; reason: string }> {
  try {
    fs.accessSync('/dev/kvm', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is not available' };
  }
  const started = Date.now();
  const result = await new Promise<{ ok: boolean; why: string }>((resolve) => {
    const child = spawn(
      'qemu-system-x86_64',
      ['-M', 'microvm,acpi=off,x-option-roms=off', '-accel', 'kvm', '-cpu', 'host', '-m', '128', '-nodefaults', '-no-user-config', '-nographic', '-no-reboot', '-kernel', kernel, '-append', kernelCmdline(), '-serial', 'none'],
      { stdio: ['ignore', 'ignore', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' },
    );
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-500)));
    child.on('error', (e) => resolve({ ok: false, why: e.message }));
    child.on('exit', (code, signal) => {
      if (signal) resolve({ ok: false, why: `the probe guest did not finish booting within ${timeoutMs} ms` });
      else if (code === 0) resolve({ ok: true, why: '' });
      else resolve({ ok: false, why: `QEMU exited with ${code}: ${stderr.trim().split('\n').pop() ?? ''}` });
    });
  });
  return result.ok
    ? { accel: 'kvm', reason: `a probe guest booted under KVM in ${Date.now() - started} ms` }
    : { accel: 'tcg', reason: `KVM probe failed: ${result.why}` };
}
