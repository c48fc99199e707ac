import fs from 'node:fs';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import { ensureKey } from './accounts/keys.js';
import { buildApi } from './api/server.js';
import type { Config } from './config.js';
import { BuildService } from './builds/service.js';
import { ImageService } from './images/service.js';
import { LogService } from './logs/service.js';
import { VmService } from './vms/service.js';
import { Store } from './store/store.js';

export interface Server {
  app: FastifyInstance;
  store: Store;
  vms: VmService;
  url: string;
  close(): Promise<void>;
}

export function openStore(config: Config): Store {
  fs.mkdirSync(config.dataDir, { recursive: true });
  return new Store(path.join(config.dataDir, 'cakework.db'));
}

export function makeLogger(config: Config): Logger {
  return pino({ level: config.logLevel, redact: ['req.headers["x-api-key"]', 'password', 'token'] });
}

/** Opens the data directory, reconciles what a previous run left, and serves the API. */
export async function startServer(config: Config, logger: Logger = makeLogger(config)): Promise<Server> {
  const store = openStore(config);
  if (config.apiKey) {
    const r = ensureKey(store, config.apiKey);
    if (r.revoked) logger.warn('CAKEWORK_API_KEY names a revoked key; it stays revoked');
    else logger.info({ accountId: r.accountId, created: r.created }, 'CAKEWORK_API_KEY is ready');
  }
  const images = new ImageService(store, config, logger);
  const logs = new LogService(store, config.logRetentionDays);
  const vms = new VmService(store, images, logs, config, logger);
  await vms.init();
  const builds = new BuildService(store, images, logs, config, logger);
  await builds.init(vms.unavailable ? null : vms.network);
  const app = await buildApi({ store, images, vms, builds, logs, logger, config });
  await app.listen({ port: config.port, host: config.host });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : config.port;
  const host = config.host === '0.0.0.0' || config.host === '::' ? '127.0.0.1' : config.host;
  let closing: Promise<void> | undefined;
  return {
    app,
    store,
    vms,
    url: `http://${host}:${port}`,
    close() {
      closing ??= (async () => {
        await builds.shutdown();
        await vms.shutdown();
        await app.close();
        await images.shutdown();
        logs.close();
        store.close();
      })();
      return closing;
    },
  };
}
