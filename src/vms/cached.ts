import fs from 'node:fs';
import path from 'node:path';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config.js';
import type { LogService } from '../logs/service.js';
import type { Route } from '../proxy/proxy.js';
import type { Store, VmRecord } from '../store/store.js';
import { ServiceError } from '../util/errors.js';
import { run } from '../util/exec.js';
import { newId } from '../util/ids.js';
import { encodeGuestRun, guestRun } from './guest.js';
import { Machine, type MachineSpec } from './machine.js';
import type { Link } from './network.js';
import { makeScratchDisk } from './scratch.js';
import { portOpens, type VmService } from './service.js';

export interface CacheVmRequest {
  imageId: string;
  cpu?: number;
  memory?: number;
  port?: number;
  envVars?: Record<string, string>;
  /** a request to the stopped VM's endpoint starts it (default true) */
  wakeOnRequest?: boolean;
  /** stop after this many seconds without a request to the endpoint */
  idleStopSeconds?: number;
}

interface Running {
  machine: Machine;
  link: Link;
  stopRequested: boolean;
  lastRequest: number;
}

/**
 * The next run of a stopped cached VM, made ahead: its disk copy, its tap and a paused QEMU, either
 * waiting for the snapshot (-incoming defer) or, when `warm`, with the snapshot loaded, run once
 * against one request (so TCG has translated the app's request path) and paused again.
 */
interface Prepared {
  machine: Machine;
  link: Link;
  runDir: string;
  warm: boolean;
  /** output of the warm-up is not the user's: lines are dropped until the run starts */
  gate: { open: boolean };
}

const SNAPSHOT = { ram: 'ram', state: 'state', disk: 'scratch.ext4' } as const;

/**
 * Cached VMs: boot once, wait until the app listens, snapshot (guest RAM in a file + device state +
 * the overlay disk), stop. Every start restores that snapshot into a new QEMU (RAM mapped
 * copy-on-write, so writes of a run never reach the snapshot), pushes the host's clock and fresh
 * randomness in, and serves the same endpoint. A cached VM keeps its network slot (its address is
 * inside the snapshot) until it is destroyed.
 */
export class CachedVmService {
  private readonly running = new Map<string, Running>();
  private readonly starting = new Map<string, Promise<VmRecord>>();
  private readonly prepared = new Map<string, Promise<Prepared | null>>();
  private readonly snapshotsDir: string;
  private readonly vmsDir: string;
  private idleTimer: NodeJS.Timeout | null = null;
  /** set by shutdown: no new prepared restores from then on */
  private closing = false;

  constructor(
    private readonly vms: VmService,
    private readonly store: Store,
    private readonly logs: LogService,
    private readonly config: Config,
    private readonly log: FastifyBaseLogger,
  ) {
    this.snapshotsDir = path.join(config.dataDir, 'snapshots');
    this.vmsDir = path.join(config.dataDir, 'vms');
  }

  isLive(id: string): boolean {
    return this.running.has(id);
  }

  liveTaps(): string[] {
    return [...this.running.values()].map((r) => r.link.tap);
  }

  /** Prepared restores are live QEMUs too (the start-up orphan sweep must spare them). */
  hasPrepared(id: string): boolean {
    return this.prepared.has(id);
  }

  /**
   * Gets the next run of a stopped cached VM ready ahead of time (CAKEWORK_PREPARE_RESTORES): its disk
   * copy, its tap and a QEMU paused in `-incoming defer` with its sockets connected. A start then
   * only loads the device state and continues: ~60 ms less than spawning at start time, for ~20 MB
   * of host memory per stopped cached VM.
   */
  private prepare(vm: VmRecord): void {
    if (this.closing || this.config.prepareRestores === 'off' || this.prepared.has(vm.id) || this.vms.unavailable) return;
    const p = this.launchForRestore(vm, this.config.prepareRestores === 'warm').then(
      (prep) => {
        void prep.machine.exited.then(() => {
          if (this.prepared.get(vm.id) === p) this.prepared.delete(vm.id);
        });
        return prep;
      },
      (err: Error) => {
        this.log.warn({ vmId: vm.id, err: err.message }, 'could not prepare a restore');
        this.prepared.delete(vm.id);
        return null;
      },
    );
    this.prepared.set(vm.id, p);
  }

  /** Prepares the next run of every stopped cached VM; called once start-up clean-up is over. */
  prepareStopped(): void {
    for (const vm of this.store.vmsInStates(['stopped'], 'cached')) this.prepare(vm);
  }

  /** Takes the prepared restore of a VM, if there is a usable one. */
  private async takePrepared(id: string): Promise<Prepared | null> {
    const p = this.prepared.get(id);
    if (!p) return null;
    this.prepared.delete(id);
    const prep = await p;
    return prep && !prep.machine.hasExited ? prep : null;
  }

  private async dropPrepared(id: string): Promise<void> {
    const prep = await this.takePrepared(id);
    if (!prep) return;
    prep.machine.kill();
    await prep.machine.exited;
    await this.vms.network.removeTap(prep.link);
    this.removeRunDir(prep.runDir);
  }

  private async launchForRestore(vm: VmRecord, warm: boolean): Promise<Prepared> {
    const image = this.store.getImageById(vm.imageId);
    if (!image?.rootfsPath || !fs.existsSync(image.rootfsPath)) throw new ServiceError(409, `the image disk of cached VM ${vm.id} is gone`);
    const link = this.vms.network.link(vm.slot!);
    const runDir = path.join(this.vmsDir, vm.id);
    try {
      fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
      // This run's own copy of the snapshot's disk (sparse, or a reflink where the filesystem can).
      const disk = path.join(runDir, SNAPSHOT.disk);
      await copySparse(path.join(vm.snapshotDir!, SNAPSHOT.disk), disk);
      await this.vms.network.createTap(link);
      const gate = { open: !warm };
      const machine = await Machine.launch(this.spec(vm, image.rootfsPath, disk, link, runDir, false), null, this.hooks(vm.id, gate));
      if (warm) {
        try {
          await machine.load(path.join(vm.snapshotDir!, SNAPSHOT.state));
          await machine.resume();
          await warmUp(link.guestIp, vm.port);
          await machine.pause();
        } catch (err) {
          machine.kill();
          throw err;
        }
      }
      return { machine, link, runDir, warm, gate };
    } catch (err) {
      await this.vms.network.removeTap(link);
      this.removeRunDir(runDir);
      throw err;
    }
  }

  /** Claims the slots of every cached VM, adopts running ones, and settles the rest. */
  async reconcile(): Promise<void> {
    fs.mkdirSync(this.snapshotsDir, { recursive: true });
    const all = this.store.vmsInStates(['created', 'caching', 'starting', 'started', 'stopping', 'stopped'], 'cached');
    for (const vm of all) {
      if (vm.slot !== null) this.vms.network.claim(vm.slot);
      if (vm.state === 'stopped') continue;
      if (vm.state === 'created' || vm.state === 'caching') {
        this.failCaching(vm.id, 'the server restarted while the snapshot was being made');
        continue;
      }
      const adopted =
        !this.vms.unavailable && vm.pid && vm.runDir ? await Machine.adopt(vm.id, vm.runDir, vm.pid, this.hooks(vm.id)) : null;
      if (adopted && vm.slot !== null) {
        const entry: Running = { machine: adopted, link: this.vms.network.link(vm.slot), stopRequested: vm.state === 'stopping', lastRequest: Date.now() };
        this.running.set(vm.id, entry);
        this.trackRun(vm.id, entry);
        this.logs.append(vm.id, 'platform', `run ${vm.runs}: adopted by a restarted server; still running`);
      } else {
        if (vm.pid && vm.runDir && Machine.isOurQemu(vm.pid, vm.runDir)) process.kill(vm.pid, 'SIGKILL');
        this.logs.append(vm.id, 'platform', `run ${vm.runs}: ended while the server was down; the snapshot is kept`);
        this.store.updateVm(vm.id, { state: 'stopped', pid: null, stoppedAt: Date.now() });
        this.removeRunDir(vm.runDir);
      }
    }
    this.idleTimer = setInterval(() => this.stopIdle(), 1000);
    this.idleTimer.unref();
  }

  private hooks(id: string, gate: { open: boolean } = { open: true }) {
    return {
      output: (level: 'info' | 'error', line: string) => {
        if (gate.open) this.logs.append(id, level, line);
      },
    };
  }

  get(accountId: string, id: string): VmRecord | null {
    const vm = this.store.getVm(accountId, id);
    return vm?.kind === 'cached' ? vm : null;
  }

  private mustGet(accountId: string, id: string): VmRecord {
    const vm = this.get(accountId, id);
    if (!vm) throw new ServiceError(404, `cached VM ${id} does not exist`);
    return vm;
  }

  /** Boots, waits until the app listens on `port`, snapshots, stops. Answers once the snapshot exists. */
  async cache(accountId: string, req: CacheVmRequest): Promise<VmRecord> {
    if (this.vms.unavailable) throw new ServiceError(501, `VMs are not available on this server: ${this.vms.unavailable}`);
    const image = await this.vms.readyImage(accountId, req.imageId);
    const cpu = req.cpu ?? 1;
    const memory = req.memory ?? 256;
    const port = req.port ?? 8080;
    this.vms.admit(accountId, memory, cpu);
    const inserted = this.store.insertVm({
      id: newId('vm'),
      accountId,
      imageId: image.id,
      kind: 'cached',
      cpu,
      memory,
      port,
      envVars: req.envVars ?? {},
      volumeGb: null,
      wake: req.wakeOnRequest ?? true,
      idleStopS: req.idleStopSeconds ?? null,
    });
    const link = this.vms.network.allocate();
    const vmId = inserted.id;
    const snapDir = path.join(this.snapshotsDir, vmId);
    const runDir = path.join(this.vmsDir, vmId);
    this.store.updateVm(vmId, { state: 'caching', slot: link.slot, snapshotDir: snapDir, runDir });
    const vm = this.store.getVmById(vmId)!;
    this.logs.append(vm.id, 'platform', `caching: booting ${cpu} vCPU, ${memory} MB, image ${image.id}, ${this.vms.accel.toUpperCase()}`);
    const started = Date.now();
    let machine: Machine | null = null;
    let cached = false;
    try {
      fs.mkdirSync(snapDir, { recursive: true, mode: 0o700 });
      fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
      await makeScratchDisk(path.join(snapDir, SNAPSHOT.disk), this.config.scratchGb);
      await this.vms.network.createTap(link);
      const guest = guestRun(image.config!, vm.envVars, { hostname: vm.id, ip: link.guestIp, gateway: link.hostIp, prefix: link.prefix });
      machine = await Machine.launch(
        this.spec(vm, image.rootfsPath!, path.join(snapDir, SNAPSHOT.disk), link, runDir, true),
        encodeGuestRun(guest, Date.now()),
        this.hooks(vm.id),
      );
      this.store.updateVm(vm.id, { pid: machine.pid });
      await machine.started;
      const listening = await portOpens(link.guestIp, port, this.config.cacheTimeoutMs, () => !machine!.hasExited);
      if (!listening) {
        throw new Error(
          machine.hasExited
            ? `the app exited before it listened on port ${port}`
            : `the app did not listen on port ${port} within ${this.config.cacheTimeoutMs} ms`,
        );
      }
      await machine.snapshot(path.join(snapDir, SNAPSHOT.state));
      this.logs.append(vm.id, 'platform', `cached: snapshot taken ${Date.now() - started} ms after boot began; the VM is stopped`);
      this.store.updateVm(vm.id, { state: 'stopped', pid: null, stoppedAt: Date.now() });
      cached = true;
    } catch (err) {
      machine?.kill();
      await machine?.exited;
      const reason = (err as Error).message;
      this.log.warn({ vmId: vm.id, reason }, 'cacheVM failed');
      for (const line of machine?.consoleTail(10) ?? []) this.logs.append(vm.id, 'platform', `console: ${line}`);
      this.failCaching(vm.id, `caching failed: ${reason}`);
    } finally {
      await this.vms.network.removeTap(link);
      this.removeRunDir(runDir);
      this.logs.flush();
    }
    const result = this.store.getVmById(vm.id)!;
    if (cached) this.prepare(result);
    return result;
  }

  private failCaching(id: string, reason: string): void {
    const vm = this.store.getVmById(id);
    this.logs.append(id, 'platform', `failed: ${reason}`);
    this.store.updateVm(id, { state: 'failed', error: reason, pid: null, stoppedAt: Date.now() });
    if (vm?.slot !== null && vm?.slot !== undefined) this.vms.network.release(vm.slot);
    if (vm?.snapshotDir) fs.rmSync(vm.snapshotDir, { recursive: true, force: true });
    this.logs.end(id);
  }

  private spec(vm: VmRecord, imageDisk: string, scratchDisk: string, link: Link, runDir: string, caching: boolean): MachineSpec {
    return {
      id: vm.id,
      cpu: vm.cpu,
      memoryMb: vm.memory,
      imageDisk,
      scratchDisk,
      link,
      runDir,
      accel: this.vms.accel,
      assets: this.vms.assets,
      ramFile: { path: path.join(vm.snapshotDir!, SNAPSHOT.ram), shared: caching },
      incoming: !caching,
    };
  }

  /** Restores the snapshot (never a cold boot). Starting a started cached VM returns it as it is. */
  async start(accountId: string, id: string): Promise<VmRecord> {
    const vm = this.mustGet(accountId, id);
    return this.startRecord(vm);
  }

  private startRecord(vm: VmRecord): Promise<VmRecord> {
    if (vm.state === 'started') return Promise.resolve(vm);
    const pending = this.starting.get(vm.id);
    if (pending) return pending;
    if (vm.state === 'destroyed') throw new ServiceError(409, `cached VM ${vm.id} was destroyed`);
    if (vm.state === 'failed') throw new ServiceError(409, `cached VM ${vm.id} failed: ${vm.error}`);
    if (vm.state !== 'stopped') throw new ServiceError(409, `cached VM ${vm.id} is ${vm.state}; try again in a moment`);
    const p = this.restore(vm).finally(() => this.starting.delete(vm.id));
    this.starting.set(vm.id, p);
    return p;
  }

  private async restore(vm: VmRecord): Promise<VmRecord> {
    this.vms.admit(vm.accountId, vm.memory, vm.cpu);
    const run = vm.runs + 1;
    const t0 = Date.now();
    this.store.updateVm(vm.id, { state: 'starting', runs: run, runDir: path.join(this.vmsDir, vm.id), exitCode: null, error: null });
    let prep: Prepared | null = null;
    try {
      prep = (await this.takePrepared(vm.id)) ?? (await this.launchForRestore(vm, false));
      this.logs.append(vm.id, 'platform', `run ${run}: starting from the snapshot${prep.warm ? ' (warm standby)' : ''}`);
      prep.gate.open = true;
      if (prep.warm) await prep.machine.resume();
      else await prep.machine.restore(path.join(vm.snapshotDir!, SNAPSHOT.state));
    } catch (err) {
      if (prep) {
        prep.machine.kill();
        await prep.machine.exited;
        await this.vms.network.removeTap(prep.link);
        this.removeRunDir(prep.runDir);
      }
      const reason = `run ${run}: could not restore the snapshot: ${(err as Error).message}`;
      this.logs.append(vm.id, 'platform', reason);
      this.store.updateVm(vm.id, { state: 'stopped', error: reason, pid: null });
      throw err instanceof ServiceError ? err : new ServiceError(503, reason);
    }
    const entry: Running = { machine: prep.machine, link: prep.link, stopRequested: false, lastRequest: Date.now() };
    this.running.set(vm.id, entry);
    this.store.updateVm(vm.id, { state: 'started', pid: prep.machine.pid, startedAt: Date.now() });
    this.logs.append(vm.id, 'platform', `run ${run}: started (restored in ${Date.now() - t0} ms)`);
    this.trackRun(vm.id, entry);
    return this.store.getVmById(vm.id)!;
  }

  private trackRun(id: string, entry: Running): void {
    void entry.machine.exited.then(async (exit) => {
      const vm = this.store.getVmById(id);
      const run = vm?.runs ?? 0;
      let how: string;
      if (exit.oom) how = 'killed: out of memory';
      else if (exit.code !== null) how = `exited with code ${exit.code}`;
      else if (exit.signal !== null) how = `killed by signal ${exit.signal}`;
      else if (entry.stopRequested) how = `stopped after the grace period (${exit.qemu})`;
      else how = `ended unexpectedly: ${exit.qemu}`;
      this.logs.append(id, 'platform', `run ${run}: ${how}`);
      this.logs.append(id, 'platform', `run ${run}: stopped${entry.stopRequested ? ' by request' : ''}; the snapshot is kept`);
      this.store.updateVm(id, { state: vm?.state === 'destroyed' ? 'destroyed' : 'stopped', exitCode: exit.code, pid: null, stoppedAt: Date.now() });
      await this.vms.network.removeTap(entry.link);
      this.removeRunDir(entry.machine.runDir);
      this.running.delete(id);
      this.logs.end(id);
      const after = this.store.getVmById(id);
      if (after?.state === 'stopped') this.prepare(after);
    });
  }

  async stop(accountId: string, id: string): Promise<VmRecord> {
    const vm = this.mustGet(accountId, id);
    await this.starting.get(id)?.catch(() => undefined);
    const entry = this.running.get(id);
    if (!entry) {
      if (vm.state === 'destroyed') throw new ServiceError(409, `cached VM ${id} was destroyed`);
      return this.store.getVmById(id)!; // already stopped: stopping is idempotent
    }
    await this.stopEntry(id, entry, 'stopping: SIGTERM sent to the app');
    return this.store.getVmById(id)!;
  }

  private async stopEntry(id: string, entry: Running, why: string): Promise<void> {
    if (!entry.stopRequested) {
      entry.stopRequested = true;
      this.store.updateVm(id, { state: 'stopping' });
      this.logs.append(id, 'platform', why);
    }
    await entry.machine.stop(this.config.stopGraceMs);
    while (this.running.has(id)) await new Promise((r) => setTimeout(r, 10));
  }

  /** Stops it if running, deletes the snapshot and frees its address. The record stays, `destroyed`. */
  async destroy(accountId: string, id: string): Promise<VmRecord> {
    const vm = this.mustGet(accountId, id);
    if (vm.state === 'destroyed') return vm;
    await this.starting.get(id)?.catch(() => undefined);
    const entry = this.running.get(id);
    if (entry) await this.stopEntry(id, entry, 'stopping: the cached VM is being destroyed');
    await this.dropPrepared(id);
    if (vm.snapshotDir) fs.rmSync(vm.snapshotDir, { recursive: true, force: true });
    if (vm.slot !== null) this.vms.network.release(vm.slot);
    this.store.updateVm(id, { state: 'destroyed', pid: null });
    this.logs.append(id, 'platform', 'destroyed: snapshot and disk deleted');
    this.logs.end(id);
    return this.store.getVmById(id)!;
  }

  /** Proxy routing: a started VM's address; a stopped one is woken when allowed. */
  route(vm: VmRecord): Route | Promise<Route> {
    const entry = this.running.get(vm.id);
    if (entry && vm.state === 'started') {
      entry.lastRequest = Date.now();
      return { host: entry.link.guestIp, port: vm.port };
    }
    if ((vm.state === 'stopped' || vm.state === 'starting') && vm.wake) {
      return this.startRecord(vm).then((started) => {
        const e = this.running.get(started.id);
        if (e) e.lastRequest = Date.now();
        return e ? { host: e.link.guestIp, port: started.port } : { state: started.state };
      });
    }
    return { state: vm.state };
  }

  private stopIdle(): void {
    for (const [id, entry] of this.running) {
      const vm = this.store.getVmById(id);
      if (!vm?.idleStopS || entry.stopRequested || vm.state !== 'started') continue;
      if (Date.now() - entry.lastRequest > vm.idleStopS * 1000) {
        void this.stopEntry(id, entry, `stopping: no request for ${vm.idleStopS} s`).catch(() => undefined);
      }
    }
  }

  /** Disk used by a cached VM's snapshot (the image disk is shared and not counted). */
  diskUsage(vm: VmRecord): { ramBytes: number; stateBytes: number; diskBytes: number } | null {
    if (!vm.snapshotDir || !fs.existsSync(vm.snapshotDir)) return null;
    const used = (f: string) => {
      try {
        return fs.statSync(path.join(vm.snapshotDir!, f)).blocks * 512;
      } catch {
        return 0;
      }
    };
    return { ramBytes: used(SNAPSHOT.ram), stateBytes: used(SNAPSHOT.state), diskBytes: used(SNAPSHOT.disk) };
  }

  /**
   * Prepared restores always go (a restart prepares again); running cached VMs stop or, with
   * CAKEWORK_ON_SHUTDOWN=keep, keep running. Returns how many were kept.
   */
  async shutdown(): Promise<number> {
    this.closing = true;
    if (this.idleTimer) clearInterval(this.idleTimer);
    const kept = this.config.onShutdown === 'keep' ? this.running.size : 0;
    if (kept > 0) {
      for (const e of this.running.values()) e.machine.detach();
      this.running.clear();
    } else {
      await Promise.allSettled([...this.running.entries()].map(([id, e]) => this.stopEntry(id, e, 'stopping: the server is shutting down')));
    }
    await Promise.allSettled([...this.prepared.keys()].map((id) => this.dropPrepared(id)));
    return kept;
  }

  private removeRunDir(dir: string | null): void {
    if (dir && dir.startsWith(this.vmsDir + path.sep)) fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** One request to the app, so the restored guest's request path is translated before a user's comes. */
async function warmUp(host: string, port: number): Promise<void> {
  const net = await import('node:net');
  await new Promise<void>((resolve) => {
    const s = net.connect({ host, port });
    const done = (): void => {
      s.destroy();
      resolve();
    };
    s.setTimeout(3000, done);
    s.once('connect', () => s.write('GET / HTTP/1.0\r\nHost: cakework-warm-up\r\nUser-Agent: cakework-warm-up\r\n\r\n'));
    s.on('data', () => undefined);
    s.once('end', done);
    s.once('error', done);
  });
}

/** Copies a sparse file keeping its holes (and sharing blocks where the filesystem can reflink). */
async function copySparse(from: string, to: string): Promise<void> {
  await run('cp', ['--sparse=always', '--reflink=auto', from, to], { timeoutMs: 60_000 });
}
