import os from 'node:os';

export interface CapacityLimits {
  memoryOvercommit: number;
  cpuOvercommit: number;
  maxVmsPerAccount: number;
}

export interface Usage {
  memoryMb: number;
  cpus: number;
}

/** Why a VM cannot be admitted, with the HTTP status to answer (429 per account, 503 host full). */
export interface Refusal {
  status: 429 | 503;
  message: string;
}

/**
 * Admission control: a VM starts only if the host can hold it. Memory counts the whole guest RAM
 * against the host's RAM x overcommit (guests touch less than they get, but may touch it all) minus
 * 1 GiB kept for the host; vCPUs count against cores x overcommit.
 */
export function admit(limits: CapacityLimits, used: Usage, liveForAccount: number, want: Usage): Refusal | null {
  if (liveForAccount >= limits.maxVmsPerAccount) {
    return { status: 429, message: `this account already runs ${liveForAccount} VMs, the limit (CAKEWORK_MAX_VMS_PER_ACCOUNT) is ${limits.maxVmsPerAccount}: stop one first` };
  }
  const hostMb = Math.floor(os.totalmem() / 1024 / 1024);
  const memoryBudget = Math.floor(hostMb * limits.memoryOvercommit) - 1024;
  if (used.memoryMb + want.memoryMb > memoryBudget) {
    return {
      status: 503,
      message: `not enough memory on this host: ${want.memoryMb} MB asked, ${Math.max(0, memoryBudget - used.memoryMb)} MB left of ${memoryBudget} MB for VMs; try later or ask for less`,
    };
  }
  const cpuBudget = Math.floor(os.cpus().length * limits.cpuOvercommit);
  if (used.cpus + want.cpus > cpuBudget) {
    return { status: 503, message: `not enough CPU on this host: ${want.cpus} vCPUs asked, ${Math.max(0, cpuBudget - used.cpus)} of ${cpuBudget} left; try later or ask for fewer` };
  }
  return null;
}
