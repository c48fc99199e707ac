import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config.js';
import type { ImageService } from '../images/service.js';
import type { LogService } from '../logs/service.js';
import { LIVE_VM_STATES, type Page, type Store, type VmRecord } from '../store/store.js';
import { ServiceError } from '../util/errors.js';
import { newId } from '../util/ids.js';
import { probeAccel } from './accel.js';
import { admit } from './capacity.js';
import { encodeGuestRun, guestAssets, guestRun, missingAssets, type GuestAssets } from './guest.js';
import { Machine, type Accel, type ExitInfo } from './machine.js';
import { HostNetwork, type Link } from './network.js';
import type { Route } from '../proxy/proxy.js';
import { makeScratchDisk } from './scratch.js';
import { CachedVmService } from './cached.js';

export interface StartVmRequest {
  imageId: string;
  cpu?: number;
  memory?: number;
  port?: number;
  envVars?: Record<string, string>;
  volumeGB?: number;
  waitForPort?: boolean;
}

/** Three base-36 characters from the data directory: this server's taps and nftables table. */
export function instanceTag(dataDir: string): string {
  const n = crypto.createHash('sha256').update(dataDir).digest().readUInt32BE(0) % 36 ** 3;
  return n.toString(36).padStart(3, '0');
}

/** Polls until `host:port` accepts a TCP connection; false at the deadline or once `alive` says no. */
export async function portOpens(host: string, port: number, timeoutMs: number, alive: () => boolean): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline && alive()) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host, port });
      s.setTimeout(1000);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('timeout', () => {
        s.destroy();
        resolve(false);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}

interface Live {
  machine: Machine;
  link: Link;
  stopRequested: boolean;
}

/**
 * One-time microVMs: admission, the lifecycle state machine (created → starting → started →
 * stopping → stopped, or failed with a reason), logs, and reconciliation with what a previous server
 * process left running.
 */
export class VmService {
  private readonly live = new Map<string, Live>();
  readonly network: HostNetwork;
  readonly assets: GuestAssets;
  accel: Accel = 'tcg';
  unavailable: string | null = null;
  readonly cached: CachedVmService;
  private readonly vmsDir: string;
  private readonly finishing = new Set<Promise<void>>();

  constructor(
    private readonly store: Store,
    private readonly images: ImageService,
    private readonly logs: LogService,
    private readonly config: Config,
    private readonly log: FastifyBaseLogger,
  ) {
    this.network = new HostNetwork(config.vmSubnet, instanceTag(config.dataDir));
    this.assets = guestAssets();
    this.vmsDir = path.join(config.dataDir, 'vms');
    this.cached = new CachedVmService(this, store, logs, config, log);
  }

  /** Sets up host networking, adopts or cleans up VMs of an earlier run, and probes for KVM. */
  async init(): Promise<void> {
    fs.mkdirSync(this.vmsDir, { recursive: true });
    const missing = missingAssets(this.assets);
    if (process.getuid?.() !== 0) this.unavailable = 'VMs need the server to run as root (tap networking and its firewall rules)';
    else if (missing.length) this.unavailable = `the guest kernel or initramfs is missing (${missing.join(', ')}): run scripts/setup.sh`;
    if (this.unavailable) {
      this.log.warn({ reason: this.unavailable }, 'VMs are unavailable on this server');
    } else {
      try {
        await this.network.init();
      } catch (err) {
        this.unavailable = `cannot set up VM networking: ${(err as Error).message}`;
        this.log.error({ err }, 'VM networking failed');
      }
    }
    await this.reconcile();
    if (!this.unavailable) {
      void probeAccel(this.assets.kernel).then((r) => {
        this.accel = r.accel;
        this.log.info({ accel: r.accel, reason: r.reason }, `VM acceleration: ${r.accel}`);
      });
    }
  }

  private async reconcile(): Promise<void> {
    const keepTaps = new Set<string>();
    await this.cached.reconcile();
    for (const vm of this.store.vmsInStates(LIVE_VM_STATES, 'vm')) {
      const adopted =
        !this.unavailable && vm.state !== 'created' && vm.pid && vm.runDir && vm.slot !== null
          ? await Machine.adopt(vm.id, vm.runDir, vm.pid, this.outputHooks(vm.id))
          : null;
      if (adopted && vm.slot !== null) {
        const link = this.network.link(vm.slot);
        this.network.claim(vm.slot);
        keepTaps.add(link.tap);
        const entry: Live = { machine: adopted, link, stopRequested: vm.state === 'stopping' };
        this.live.set(vm.id, entry);
        this.track(vm.id, entry);
        this.logs.append(vm.id, 'platform', 'adopted by a restarted server; still running');
        this.log.info({ vmId: vm.id, pid: vm.pid }, 'adopted running VM');
        if (vm.state === 'stopping') void adopted.stop(this.config.stopGraceMs);
      } else {
        const reason = vm.state === 'created' || vm.state === 'starting'
          ? 'the server restarted while the VM was starting'
          : "the VM's QEMU process ended while the server was down";
        if (vm.pid && vm.runDir && Machine.isOurQemu(vm.pid, vm.runDir)) process.kill(vm.pid, 'SIGKILL');
        this.logs.append(vm.id, 'platform', `failed: ${reason}`);
        this.store.updateVm(vm.id, { state: 'failed', error: reason, stoppedAt: Date.now(), pid: null });
        this.removeRunDir(vm.runDir);
        this.log.warn({ vmId: vm.id, reason }, 'VM could not be adopted');
      }
    }
    for (const tap of this.cached.liveTaps()) keepTaps.add(tap);
    if (!this.unavailable) await this.network.removeStaleTaps(keepTaps);
    this.killOrphanQemus();
    this.logs.flush();
    this.cached.prepareStopped();
  }

  /** QEMUs running on our data directory that no live record owns are killed. */
  private killOrphanQemus(): void {
    for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
      let cmdline: string;
      try {
        cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        continue;
      }
      if (!cmdline.startsWith('qemu-system') || !cmdline.includes(`${this.vmsDir}/`)) continue;
      const m = new RegExp(`${this.vmsDir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/([a-z0-9]+)/`).exec(cmdline);
      if (m && (this.live.has(m[1]!) || this.cached.isLive(m[1]!) || this.cached.hasPrepared(m[1]!))) continue;
      this.log.warn({ pid }, 'killing an orphan QEMU of this data directory');
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }

  private outputHooks(vmId: string) {
    return { output: (level: 'info' | 'error', line: string) => this.logs.append(vmId, level, line) };
  }

  get(accountId: string, id: string): VmRecord | null {
    const vm = this.store.getVm(accountId, id);
    return vm?.kind === 'vm' ? vm : null;
  }

  list(accountId: string, filter: { imageId?: string; state?: string }, limit: number, cursor: { createdAt: number; id: string } | null): Page<VmRecord> {
    return this.store.listVms(accountId, { ...filter, kind: 'vm' }, limit, cursor);
  }

  /** Where the endpoint proxy sends a VM's traffic, or why it cannot. */
  route(vmId: string): Route | Promise<Route> {
    const vm = this.store.getVmById(vmId);
    if (!vm) return null;
    if (vm.kind === 'cached') return this.cached.route(vm);
    const live = this.live.get(vmId);
    if (!live || vm.state !== 'started') return { state: vm.state };
    return { host: live.link.guestIp, port: vm.port };
  }

  async start(accountId: string, req: StartVmRequest): Promise<VmRecord> {
    if (this.unavailable) throw new ServiceError(501, `VMs are not available on this server: ${this.unavailable}`);
    const image = await this.readyImage(accountId, req.imageId);
    const cpu = req.cpu ?? 1;
    const memory = req.memory ?? 256;
    const port = req.port ?? 8080;
    this.admit(accountId, memory, cpu);

    const vm = this.store.insertVm({ id: newId('vm'), accountId, imageId: image.id, kind: 'vm', cpu, memory, port, envVars: req.envVars ?? {}, volumeGb: req.volumeGB ?? null });
    const log = this.log.child({ vmId: vm.id });
    const link = this.network.allocate();
    const runDir = path.join(this.vmsDir, vm.id);
    const accel = this.accel;
    this.logs.append(vm.id, 'platform', `booting: ${cpu} vCPU, ${memory} MB, image ${image.id}, ${accel.toUpperCase()}`);
    let machine: Machine;
    try {
      fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
      const scratch = path.join(runDir, 'scratch.ext4');
      await makeScratchDisk(scratch, vm.volumeGb ?? this.config.scratchGb);
      await this.network.createTap(link);
      const guest = guestRun(image.config!, vm.envVars, { hostname: vm.id, ip: link.guestIp, gateway: link.hostIp, prefix: link.prefix });
      machine = await Machine.launch(
        { id: vm.id, cpu, memoryMb: memory, imageDisk: image.rootfsPath!, scratchDisk: scratch, link, runDir, accel, assets: this.assets },
        encodeGuestRun(guest, Date.now()),
        this.outputHooks(vm.id),
      );
    } catch (err) {
      log.error({ err }, 'VM launch failed');
      await this.network.removeTap(link);
      this.network.release(link.slot);
      this.removeRunDir(runDir);
      this.fail(vm.id, `could not launch the VM: ${(err as Error).message}`);
      throw new ServiceError(503, `could not launch the VM: ${(err as Error).message}`);
    }
    const entry: Live = { machine, link, stopRequested: false };
    this.live.set(vm.id, entry);
    this.store.updateVm(vm.id, { state: 'starting', pid: machine.pid, runDir, slot: link.slot });
    this.track(vm.id, entry);

    const bootTimer = setTimeout(() => {
      this.logs.append(vm.id, 'platform', `boot did not finish within ${this.config.bootTimeoutMs} ms; killing the VM`);
      machine.kill();
    }, this.config.bootTimeoutMs);
    try {
      await machine.started;
    } catch {
      await machine.exited;
      await this.settled(vm.id);
      return this.store.getVmById(vm.id)!;
    } finally {
      clearTimeout(bootTimer);
    }
    // The exit handler may already have run (an app that exits at once).
    if (this.store.getVmById(vm.id)!.state === 'starting') {
      this.store.updateVm(vm.id, { state: 'started', startedAt: Date.now() });
      this.logs.append(vm.id, 'platform', 'started');
    }
    if (req.waitForPort) await this.waitForPort(vm.id, link.guestIp, port);
    return this.store.getVmById(vm.id)!;
  }

  /** Refuses a VM the host cannot hold or the account may not run (429/503). */
  admit(accountId: string, memoryMb: number, cpus: number): void {
    const refusal = admit(
      { memoryOvercommit: this.config.memoryOvercommit, cpuOvercommit: this.config.cpuOvercommit, maxVmsPerAccount: this.config.maxVmsPerAccount },
      this.usage(),
      this.store.countLiveVms(accountId),
      { memoryMb, cpus },
    );
    if (refusal) throw new ServiceError(refusal.status, refusal.message);
  }

  /** An image that can run now: waits (bounded) for one still importing, refuses a failed one. */
  async readyImage(accountId: string, imageId: string) {
    const deadline = Date.now() + this.config.imageWaitMs;
    for (;;) {
      const image = this.images.getImage(accountId, imageId);
      if (!image) throw new ServiceError(404, `image ${imageId} does not exist`, 'imageId');
      if (image.status === 'failed') throw new ServiceError(400, `image ${imageId} failed to import: ${image.error}`, 'imageId');
      if (image.status === 'ready' && image.config && image.rootfsPath) return image;
      if (Date.now() >= deadline) {
        throw new ServiceError(409, `image ${imageId} is still importing (${image.phase ?? 'queued'}); start the VM once GET /v1/image/${imageId} says ready`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  private async waitForPort(vmId: string, host: string, port: number): Promise<void> {
    const ok = await portOpens(host, port, this.config.portWaitMs, () => this.store.getVmById(vmId)?.state === 'started');
    if (!ok && this.store.getVmById(vmId)?.state === 'started') {
      this.logs.append(vmId, 'platform', `port ${port} did not accept connections within ${this.config.portWaitMs} ms`);
    }
  }

  async stop(accountId: string, id: string): Promise<VmRecord> {
    const vm = this.store.getVm(accountId, id);
    if (!vm || vm.kind !== 'vm') throw new ServiceError(404, `VM ${id} does not exist`);
    const entry = this.live.get(id);
    if (!entry) throw new ServiceError(409, `VM ${id} is not running (state ${vm.state})`);
    if (!entry.stopRequested) {
      entry.stopRequested = true;
      this.store.updateVm(id, { state: 'stopping' });
      this.logs.append(id, 'platform', 'stopping: SIGTERM sent to the app');
    }
    await entry.machine.stop(this.config.stopGraceMs);
    await this.settled(id);
    return this.store.getVmById(id)!;
  }

  /** Waits until the exit handler of a VM has recorded its final state. */
  private async settled(id: string): Promise<void> {
    while (this.live.has(id)) await Promise.race([...this.finishing, new Promise((r) => setTimeout(r, 20))]);
  }

  private track(id: string, entry: Live): void {
    const done: Promise<void> = entry.machine.exited
      .then((exit) => this.onExit(id, entry, exit))
      .catch((err) => this.log.error({ err, vmId: id }, 'VM exit handling failed'))
      .finally(() => this.finishing.delete(done));
    this.finishing.add(done);
  }

  private async onExit(id: string, entry: Live, exit: ExitInfo): Promise<void> {
    let state: 'stopped' | 'failed' = 'stopped';
    let error: string | null = null;
    if (exit.oom) {
      state = 'failed';
      error = 'the app was killed: out of memory';
      this.logs.append(id, 'platform', 'killed: out of memory');
    } else if (exit.code !== null) {
      this.logs.append(id, 'platform', `exited with code ${exit.code}`);
    } else if (exit.signal !== null) {
      this.logs.append(id, 'platform', `killed by signal ${exit.signal}`);
    } else if (exit.guestError) {
      state = 'failed';
      error = `the guest could not start the app: ${exit.guestError}`;
      this.logs.append(id, 'platform', `failed: ${error}`);
    } else if (entry.stopRequested) {
      this.logs.append(id, 'platform', `stopped after the grace period (${exit.qemu})`);
    } else {
      state = 'failed';
      error = `the VM ended unexpectedly: ${exit.qemu}`;
      this.logs.append(id, 'platform', `failed: ${error}`);
      for (const line of entry.machine.consoleTail(10)) this.logs.append(id, 'platform', `console: ${line}`);
    }
    if (state === 'stopped') this.logs.append(id, 'platform', entry.stopRequested ? 'stopped by request' : 'stopped');
    this.store.updateVm(id, { state, error, exitCode: exit.code, stoppedAt: Date.now(), pid: null });
    await this.network.removeTap(entry.link);
    this.network.release(entry.link.slot);
    this.removeRunDir(entry.machine.runDir);
    this.live.delete(id);
    this.logs.end(id);
  }

  private fail(id: string, reason: string): void {
    this.logs.append(id, 'platform', `failed: ${reason}`);
    this.store.updateVm(id, { state: 'failed', error: reason, stoppedAt: Date.now() });
    this.logs.end(id);
  }

  /** A stopped VM keeps its record and logs; its overlay disk, sockets and run files go. */
  private removeRunDir(dir: string | null): void {
    if (dir && dir.startsWith(this.vmsDir + path.sep)) fs.rmSync(dir, { recursive: true, force: true });
  }

  /** Counts the memory and vCPUs of every VM that runs or may run at once (cached VMs while running). */
  private usage(): { memoryMb: number; cpus: number } {
    let memoryMb = 0;
    let cpus = 0;
    for (const vm of this.store.vmsInStates(LIVE_VM_STATES)) {
      memoryMb += vm.memory;
      cpus += vm.cpu;
    }
    return { memoryMb, cpus };
  }

  /** Graceful shutdown: stop every VM (or, with CAKEWORK_ON_SHUTDOWN=keep, leave them for adoption). */
  async shutdown(): Promise<void> {
    const keptCached = await this.cached.shutdown();
    if (this.config.onShutdown === 'keep' && (this.live.size > 0 || keptCached > 0)) {
      // VMs keep running, so their taps and firewall rules must stay for the next start to adopt.
      for (const entry of this.live.values()) entry.machine.detach();
      this.live.clear();
      this.logs.flush();
      return;
    }
    await Promise.allSettled(
      [...this.live.entries()].map(async ([id, entry]) => {
        if (!entry.stopRequested) {
          entry.stopRequested = true;
          this.store.updateVm(id, { state: 'stopping' });
          this.logs.append(id, 'platform', 'stopping: the server is shutting down');
        }
        await entry.machine.stop(Math.min(this.config.stopGraceMs, 5000));
        await this.settled(id);
      }),
    );
    // Nothing of ours runs any more: the firewall table and any tap left go too.
    if (!this.unavailable) {
      await this.network.removeStaleTaps(new Set());
      await this.network.teardown();
    }
    this.logs.flush();
  }
}
