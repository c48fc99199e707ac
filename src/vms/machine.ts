import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LineSplitter } from '../logs/service.js';
import type { GuestAssets } from './guest.js';
import { kernelCmdline } from './guest.js';
import type { Link } from './network.js';
import { Qmp } from './qmp.js';

/**
 * One microVM: a QEMU `-M microvm` process, its QMP socket and the three virtio-serial ports of the
 * guest init (control, stdout, stderr). QEMU runs in its own session so it outlives a crash of the
 * server, which can then adopt it again from the run directory.
 */

export type Accel = 'kvm' | 'tcg';

export interface MachineSpec {
  id: string;
  cpu: number;
  memoryMb: number;
  imageDisk: string;
  scratchDisk: string;
  link: Link;
  runDir: string;
  accel: Accel;
  assets: GuestAssets;
  /**
   * Guest RAM in a file, for snapshots: `shared` while caching (the file receives the RAM), private
   * copy-on-write when restoring (every start begins from the same RAM). Default: anonymous memfd.
   */
  ramFile?: { path: string; shared: boolean };
  /** start paused, waiting for a migration stream (a snapshot restore) */
  incoming?: boolean;
}

export interface ExitInfo {
  /** what the guest init reported, if it did */
  code: number | null;
  signal: number | null;
  oom: boolean;
  guestError: string | null;
  /** how QEMU itself ended */
  qemu: string;
}

export interface MachineHooks {
  output(level: 'info' | 'error', line: string): void;
}

/** QEMU runs exec: migration URIs through /bin/sh; our paths are quoted and never contain a quote. */
function shellQuote(p: string): string {
  if (p.includes("'")) throw new Error(`path ${p} contains a quote`);
  return `'${p}'`;
}

const SOCKETS = { qmp: 'q.sock', control: 'c.sock', stdout: 'o.sock', stderr: 'e.sock' } as const;
const QMP_TIMEOUT_MS = 10_000;

function connectUnix(file: string, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = (): void => {
      const s = net.connect(file);
      s.once('connect', () => resolve(s));
      s.once('error', (err) => {
        if (Date.now() > deadline) reject(new Error(`cannot connect to ${file}: ${err.message}`));
        else setTimeout(attempt, 5);
      });
    };
    attempt();
  });
}

export function qemuArgs(spec: MachineSpec): string[] {
  const sock = (name: keyof typeof SOCKETS) => path.join(spec.runDir, SOCKETS[name]);
  const port = (id: string, name: string, file: string) => [
    '-chardev', `socket,id=${id},path=${file},server=on,wait=off`,
    '-device', `virtserialport,chardev=${id},name=${name}`,
  ];
  return [
    // acpi=off makes QEMU list the virtio-mmio devices on the kernel command line (the kernel has no ACPI)
    '-M', 'microvm,acpi=off,x-option-roms=off,memory-backend=ram',
    // memfd (shmem) RAM: no transparent huge pages, so an idle guest costs the 4 KiB pages it touched
    // rather than whole 2 MiB pages (measured: 50 MiB of touched RAM became 80 MiB under THP).
    '-object',
    spec.ramFile
      ? `memory-backend-file,id=ram,size=${spec.memoryMb}M,mem-path=${spec.ramFile.path},share=${spec.ramFile.shared ? 'on' : 'off'}`
      : `memory-backend-memfd,id=ram,size=${spec.memoryMb}M`,
    // -S: stay paused after the incoming snapshot is loaded, until we say `cont`
    ...(spec.incoming ? ['-S', '-incoming', 'defer'] : []),
    '-accel', spec.accel === 'kvm' ? 'kvm' : 'tcg,thread=multi,tb-size=16',
    '-cpu', spec.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(spec.cpu),
    '-m', `${spec.memoryMb}M`,
    '-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
    '-name', `cakework-${spec.id}`,
    '-kernel', spec.assets.kernel,
    '-initrd', spec.assets.initrd,
    '-append', kernelCmdline(),
    '-pidfile', path.join(spec.runDir, 'qemu.pid'),
    '-qmp', `unix:${sock('qmp')},server=on,wait=off`,
    '-serial', `file:${path.join(spec.runDir, 'console.log')}`,
    '-device', 'virtio-serial-device',
    ...port('ctl', 'cw.control', sock('control')),
    ...port('out', 'cw.stdout', sock('stdout')),
    ...port('err', 'cw.stderr', sock('stderr')),
    '-drive', `id=image,file=${spec.imageDisk},format=raw,if=none,readonly=on`,
    '-device', 'virtio-blk-device,drive=image,serial=image',
    '-drive', `id=scratch,file=${spec.scratchDisk},format=raw,if=none,cache=unsafe`,
    '-device', 'virtio-blk-device,drive=scratch,serial=scratch',
    '-netdev', `tap,id=net0,ifname=${spec.link.tap},script=no,downscript=no`,
    '-device', `virtio-net-device,netdev=net0,mac=${spec.link.mac}`,
  ];
}

export class Machine {
  private qmp: Qmp | null = null;
  private control: net.Socket | null = null;
  private readonly streams: net.Socket[] = [];
  private controlBuf = '';
  private readonly exit: ExitInfo = { code: null, signal: null, oom: false, guestError: null, qemu: '' };
  private startedResolve!: () => void;
  private startedReject!: (e: Error) => void;
  private exitedResolve!: (e: ExitInfo) => void;
  private exitedAlready = false;
  private pollTimer: NodeJS.Timeout | null = null;

  get hasExited(): boolean {
    return this.exitedAlready;
  }

  /** Resolves when the guest init has started the workload. */
  readonly started: Promise<void>;
  /** Resolves once QEMU has exited, with what is known about why. */
  readonly exited: Promise<ExitInfo>;

  private constructor(
    readonly id: string,
    readonly runDir: string,
    readonly pid: number,
    private readonly hooks: MachineHooks,
    private readonly child: ChildProcess | null,
  ) {
    this.started = new Promise((res, rej) => {
      this.startedResolve = res;
      this.startedReject = rej;
    });
    this.started.catch(() => undefined);
    this.exited = new Promise((res) => (this.exitedResolve = res));
  }

  /** Spawns QEMU, connects to its sockets and hands the guest its run configuration. */
  static async launch(spec: MachineSpec, guestConfig: Buffer | null, hooks: MachineHooks): Promise<Machine> {
    const log = fs.openSync(path.join(spec.runDir, 'qemu.log'), 'a');
    const child = spawn('qemu-system-x86_64', qemuArgs(spec), { detached: true, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    if (!child.pid) {
      const err = await new Promise<Error>((r) => child.once('error', r));
      throw new Error(`cannot start qemu-system-x86_64: ${err.message}`);
    }
    const m = new Machine(spec.id, spec.runDir, child.pid, hooks, child);
    child.on('exit', (code, signal) => m.onQemuExit(signal ? `QEMU was killed by ${signal}` : `QEMU exited with code ${code}`));
    try {
      await Promise.race([
        m.connect(QMP_TIMEOUT_MS),
        m.exited.then(() => {
          throw new Error(`QEMU exited at start: ${m.qemuLogTail()}`);
        }),
      ]);
      if (guestConfig) m.control!.write(guestConfig);
    } catch (err) {
      m.kill();
      throw err;
    }
    return m;
  }

  /** Re-attaches to a QEMU left running by an earlier server process; null when it is gone. */
  static async adopt(id: string, runDir: string, pid: number, hooks: MachineHooks): Promise<Machine | null> {
    if (!Machine.isOurQemu(pid, runDir)) return null;
    const m = new Machine(id, runDir, pid, hooks, null);
    try {
      await m.connect(2000);
    } catch {
      m.kill();
      return null;
    }
    m.startedResolve(); // it was running when the previous server left it
    // Not our child: notice its end by polling.
    m.pollTimer = setInterval(() => {
      if (!Machine.isOurQemu(pid, runDir)) m.onQemuExit('QEMU ended');
    }, 500);
    return m;
  }

  /** True when `pid` is a live QEMU started for this run directory (guards against pid reuse). */
  static isOurQemu(pid: number, runDir: string): boolean {
    try {
      const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      return cmdline.includes('qemu-system') && cmdline.includes(path.join(runDir, SOCKETS.qmp));
    } catch {
      return false;
    }
  }

  private async connect(timeoutMs: number): Promise<void> {
    const file = (name: keyof typeof SOCKETS) => path.join(this.runDir, SOCKETS[name]);
    this.qmp = await Qmp.connect(file('qmp'), timeoutMs);
    this.qmp.onClose = () => {
      // QMP closes when QEMU exits; an adopted QEMU has no exit event, so check at once.
      if (!this.child && !Machine.isOurQemu(this.pid, this.runDir)) this.onQemuExit('QEMU ended');
    };
    const [control, stdout, stderr] = await Promise.all([
      connectUnix(file('control'), timeoutMs),
      connectUnix(file('stdout'), timeoutMs),
      connectUnix(file('stderr'), timeoutMs),
    ]);
    this.control = control;
    control.on('data', (d: Buffer) => this.onControl(d.toString('utf8')));
    // Both output ports are always drained: a port the host stops reading blocks the guest's writes.
    for (const [sock, level] of [
      [stdout, 'info'],
      [stderr, 'error'],
    ] as const) {
      const splitter = new LineSplitter((line) => this.hooks.output(level, line));
      sock.on('data', (d: Buffer) => splitter.push(d));
      sock.on('close', () => splitter.end());
      sock.on('error', () => undefined);
      this.streams.push(sock);
    }
    control.on('error', () => undefined);
  }

  private onControl(text: string): void {
    this.controlBuf += text;
    let nl: number;
    while ((nl = this.controlBuf.indexOf('\n')) >= 0) {
      const line = this.controlBuf.slice(0, nl);
      this.controlBuf = this.controlBuf.slice(nl + 1);
      const [word, ...rest] = line.split(' ');
      const arg = rest.join(' ');
      if (word === 'started') this.startedResolve();
      else if (word === 'exit') this.exit.code = Number(arg);
      else if (word === 'signal') this.exit.signal = Number(arg);
      else if (word === 'oom') this.exit.oom = true;
      else if (word === 'error') this.exit.guestError = arg;
    }
  }

  private onQemuExit(how: string): void {
    if (this.exitedAlready) return;
    this.exitedAlready = true;
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.exit.qemu = how;
    this.startedReject(new Error(this.exit.guestError ?? `the VM ended before its app started (${how})`));
    // Give the output sockets a moment to deliver the last bytes QEMU flushed before exiting.
    setTimeout(() => {
      for (const s of this.streams) s.destroy();
      this.control?.destroy();
      this.qmp?.close();
      this.exitedResolve(this.exit);
    }, 50);
  }

  qemuLogTail(): string {
    try {
      return fs.readFileSync(path.join(this.runDir, 'qemu.log'), 'utf8').trim().split('\n').slice(-3).join(' | ');
    } catch {
      return 'no output';
    }
  }

  /** Last lines of the serial console (kernel messages), for failure reports. */
  consoleTail(lines = 20): string[] {
    try {
      const text = fs.readFileSync(path.join(this.runDir, 'console.log'), 'utf8');
      return text.split('\n').filter(Boolean).slice(-lines);
    } catch {
      return [];
    }
  }

  /** SIGTERM to the workload through the guest init; QMP quit after the grace period; SIGKILL last. */
  async stop(graceMs: number): Promise<ExitInfo> {
    if (!this.exitedAlready) this.control?.write('stop\n');
    const grace = setTimeout(() => void this.qmp?.execute('quit').catch(() => this.kill()), graceMs);
    const hard = setTimeout(() => this.kill(), graceMs + 3000);
    try {
      return await this.exited;
    } finally {
      clearTimeout(grace);
      clearTimeout(hard);
    }
  }

  kill(): void {
    try {
      process.kill(this.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    if (!this.child) this.onQemuExit('QEMU was killed (SIGKILL)');
  }

  /** Stops talking to a QEMU that keeps running (server shutdown while VMs are adopted later). */
  detach(): void {
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.child?.removeAllListeners('exit');
    this.child?.unref();
    for (const s of this.streams) s.destroy();
    this.control?.destroy();
    if (this.qmp) {
      this.qmp.onClose = () => undefined;
      this.qmp.close();
    }
  }

  /** Waits for a QMP-driven migration (save or restore) to complete. */
  private async migrationDone(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = (await this.qmp!.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
      if (info.status === 'completed') return;
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
      if (Date.now() > deadline) throw new Error(`migration not done after ${timeoutMs} ms (${info.status})`);
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  /**
   * Snapshot: pause, write the device state (RAM stays in its shared file: x-ignore-shared) to
   * `stateFile`, then quit. The caller keeps the RAM file and the scratch disk beside it.
   */
  async snapshot(stateFile: string): Promise<void> {
    await this.qmp!.execute('stop');
    await this.qmp!.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await this.qmp!.execute('migrate', { uri: `exec:cat > ${shellQuote(stateFile)}` });
    await this.migrationDone(60_000);
    await this.qmp!.execute('quit').catch(() => undefined);
    await this.exited;
  }

  /** Loads the snapshot's device state into a QEMU started with `incoming`; the VM stays paused. */
  async load(stateFile: string): Promise<void> {
    await this.qmp!.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await this.qmp!.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(stateFile)}` });
    await this.migrationDone(60_000);
  }

  /** Runs the (restored) guest and fixes what a snapshot freezes: its wall clock and its RNG state. */
  async resume(): Promise<void> {
    await this.qmp!.execute('cont');
    this.tell(`time ${Date.now()}`);
    this.tell(`seed ${crypto.randomBytes(64).toString('hex')}`);
    this.startedResolve();
  }

  async pause(): Promise<void> {
    await this.qmp!.execute('stop');
  }

  /** Restore into a QEMU started with `incoming`: load the device state, run, fix clock and RNG. */
  async restore(stateFile: string): Promise<void> {
    await this.load(stateFile);
    await this.resume();
  }

  /** Sends a command to the guest init (e.g. `time <ms>`). */
  tell(line: string): void {
    this.control?.write(`${line}\n`);
  }
}
