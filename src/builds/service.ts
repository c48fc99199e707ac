import fs from 'node:fs';
import path from 'node:path';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config.js';
import type { ImageService } from '../images/service.js';
import { LineSplitter, type LogService } from '../logs/service.js';
import type { BuildRecord, Store } from '../store/store.js';
import { ServiceError } from '../util/errors.js';
import { run } from '../util/exec.js';
import { newId } from '../util/ids.js';
import { Semaphore } from '../util/semaphore.js';
import type { HostNetwork } from '../vms/network.js';
import { cloneBranch, writeFiles, type BuildFile } from './context.js';
import { BuildNetwork, upstreamDns } from './network.js';

const SHUTDOWN = 'shutdown';
const TIMEOUT = 'timeout';

export type BuildSource =
  | { kind: 'github'; token: string; repository: string; branch: string }
  | { kind: 'files'; files: BuildFile[]; rels: string[] };

export interface BuildRequest {
  dockerfile: string;
  dockerignore?: string;
  source: BuildSource;
}

/**
 * Image builds: a queue of jobs (CAKEWORK_BUILD_CONCURRENCY at once), each fetching its source,
 * running `buildah build` with RUN steps in their own namespaces (runc, no network, memory and CPU
 * limits, a time limit), and entering the result into the image store as an import does.
 */
export class BuildService {
  private readonly slots: Semaphore;
  private readonly workDir: string;
  private readonly running = new Map<string, AbortController>();
  private readonly settled = new Set<Promise<void>>();
  private network: BuildNetwork | null = null;

  constructor(
    private readonly store: Store,
    private readonly images: ImageService,
    private readonly logs: LogService,
    private readonly config: Config,
    private readonly log: FastifyBaseLogger,
  ) {
    this.slots = new Semaphore(config.buildConcurrency);
    this.workDir = path.join(config.dataDir, 'work', 'builds');
    fs.rmSync(this.workDir, { recursive: true, force: true });
    fs.mkdirSync(this.workDir, { recursive: true, mode: 0o700 });
    const reason = 'the server restarted during the build; start the build again';
    for (const b of store.failInterruptedBuilds(reason)) {
      this.images.fail(b.imageId, `build ${b.id} failed: ${reason}`);
      this.logs.append(b.id, 'platform', `failed: ${reason}`);
    }
  }

  /**
   * Gives RUN steps a network of their own (outside reachable, host and VMs not) when the VM
   * networking is up; otherwise they run with no network at all.
   */
  async init(hostNetwork: HostNetwork | null): Promise<void> {
    if (!hostNetwork) {
      this.log.warn('builds: RUN steps get no network (VM networking is not available)');
      return;
    }
    const net = new BuildNetwork(hostNetwork);
    try {
      await net.init();
      this.network = net;
    } catch (err) {
      await net.teardown();
      this.log.error({ err }, 'builds: cannot set up the build network; RUN steps get no network');
    }
  }

  /** Validates, records the build and its reserved image, and queues it. */
  start(accountId: string, req: BuildRequest): BuildRecord {
    const image = this.images.reserve(accountId, req.source.kind === 'github' ? `github:${req.source.repository}#${req.source.branch}` : 'files');
    const build = this.store.insertBuild({
      id: newId('bld_'),
      accountId,
      imageId: image.id,
      source: req.source.kind,
      repository: req.source.kind === 'github' ? req.source.repository : null,
      branch: req.source.kind === 'github' ? req.source.branch : null,
    });
    this.store.updateImage(image.id, { phase: 'build queued' });
    this.logs.append(build.id, 'platform', 'queued');
    const done: Promise<void> = this.slots
      .run(() => this.runBuild(build, req))
      .finally(() => this.settled.delete(done));
    this.settled.add(done);
    return build;
  }

  get(accountId: string, id: string): BuildRecord | null {
    return this.store.getBuild(accountId, id);
  }

  private async runBuild(build: BuildRecord, req: BuildRequest): Promise<void> {
    const ctl = new AbortController();
    this.running.set(build.id, ctl);
    const deadline = setTimeout(() => ctl.abort(TIMEOUT), this.config.buildTimeoutMs);
    const log = this.log.child({ buildId: build.id });
    const dir = path.join(this.workDir, build.id);
    const context = path.join(dir, 'context');
    const tag = `localhost/cakework-build-${build.id}`;
    const say = (line: string) => this.logs.append(build.id, 'platform', line);
    const t0 = Date.now();
    this.store.updateBuild(build.id, { status: 'building', startedAt: t0 });
    this.store.updateImage(build.imageId, { phase: 'building' });
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      if (req.source.kind === 'github') {
        say(`cloning ${req.source.repository} at ${req.source.branch}`);
        await cloneBranch(this.config.githubUrl, req.source.repository, req.source.branch, req.source.token, context, 300_000, ctl.signal);
      } else {
        fs.mkdirSync(context);
        writeFiles(context, req.source.files, req.source.rels);
        say(`build context: ${req.source.files.length} files`);
      }
      // The caller's Dockerfile and .dockerignore win over any in the source.
      const dockerfile = path.join(dir, 'Dockerfile');
      fs.writeFileSync(dockerfile, req.dockerfile);
      if (req.dockerignore !== undefined) fs.writeFileSync(path.join(context, '.dockerignore'), req.dockerignore);

      const out = new LineSplitter((l) => this.logs.append(build.id, 'info', l));
      const err = new LineSplitter((l) => this.logs.append(build.id, 'error', l));
      await run('buildah', this.buildArgs(dockerfile, context, tag), {
        timeoutMs: this.config.buildTimeoutMs,
        signal: ctl.signal,
        env: { ...process.env, CONTAINERS_REGISTRIES_CONF: this.registriesConf(dir), ...(this.config.buildAuthFile ? { REGISTRY_AUTH_FILE: this.config.buildAuthFile } : {}) },
        onStdout: (d) => out.push(d),
        onStderr: (d) => err.push(d),
      }).finally(() => {
        out.end();
        err.end();
      });
      const built = Date.now();
      say(`built in ${built - t0} ms; storing the image`);
      const layout = path.join(dir, 'oci');
      // Uncompressed layers: compressing them only to unpack them again next would cost the most time.
      await run('buildah', ['push', '--quiet', '--disable-compression', tag, `oci:${layout}:latest`], { timeoutMs: 600_000, signal: ctl.signal });
      await this.images.importLayout(build.imageId, layout, ctl.signal, log);
      this.store.updateBuild(build.id, { status: 'succeeded', finishedAt: Date.now() });
      say(`succeeded in ${Date.now() - t0} ms (storing took ${Date.now() - built} ms): image ${build.imageId}`);
    } catch (e) {
      const reason = ctl.signal.aborted
        ? ctl.signal.reason === SHUTDOWN
          ? 'the server shut down during the build; start the build again'
          : `the build did not finish within ${this.config.buildTimeoutMs} ms`
        : e instanceof ServiceError
          ? e.message
          : /^buildah exited/.test((e as Error).message)
            ? `the Dockerfile build failed: ${lastStep(this.logs, build.id)}`
            : `build error: ${(e as Error).message}`;
      log.info({ reason }, 'build failed');
      this.store.updateBuild(build.id, { status: 'failed', error: reason, finishedAt: Date.now() });
      this.images.fail(build.imageId, `build ${build.id} failed: ${reason}`);
      say(`failed: ${reason}`);
    } finally {
      clearTimeout(deadline);
      this.running.delete(build.id);
      await run('buildah', ['rmi', '--force', tag], { timeoutMs: 60_000 }).catch(() => undefined);
      fs.rmSync(dir, { recursive: true, force: true });
      this.logs.end(build.id);
    }
  }

  private buildArgs(dockerfile: string, context: string, tag: string): string[] {
    const dns = this.config.buildDns ?? upstreamDns();
    return [
      'build',
      // RUN steps: own namespaces through runc (crun cannot run on hybrid cgroup hosts), the build
      // network (or none), bounded memory and CPU.
      '--isolation', 'oci',
      '--runtime', 'runc',
      '--network', this.network?.buildahNetwork ?? 'none',
      ...(this.network && dns ? ['--dns', dns] : []),
      '--memory', `${this.config.buildMemoryMb}m`,
      '--cpu-period', '100000',
      '--cpu-quota', String(this.config.buildCpus * 100000),
      '--layers=false',
      '--pull=missing',
      '--file', dockerfile,
      '--tag', tag,
      context,
    ];
  }

  /** Registries FROM may pull over plain HTTP: loopback ones and CAKEWORK_INSECURE_REGISTRIES. */
  private registriesConf(dir: string): string {
    const file = path.join(dir, 'registries.conf');
    const insecure = this.config.insecureRegistries.map((r) => `[[registry]]\nlocation = "${r.replace(/"/g, '')}"\ninsecure = true\n`);
    fs.writeFileSync(file, `unqualified-search-registries = ["docker.io"]\n${insecure.join('\n')}`);
    return file;
  }

  async shutdown(): Promise<void> {
    for (const c of this.running.values()) c.abort(SHUTDOWN);
    await Promise.allSettled([...this.settled]);
    await this.network?.teardown();
  }
}

/** The last builder error lines, which say what went wrong (a bad instruction, a failing RUN). */
function lastStep(logs: LogService, buildId: string): string {
  const lines = logs.query(buildId, { order: 'newest_first', limit: 20 }).filter((l) => l.level === 'error');
  const msg = lines.find((l) => /^Error:/.test(l.message)) ?? lines[0];
  // buildah appends a Go struct dump to some messages; the sentence before it is the useful part
  return msg ? msg.message.replace(/^Error:\s*/, '').replace(/\s*&imagebuilder\.Step\{.*$/, '') : 'see the build logs';
}
