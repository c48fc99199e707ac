import { startServer } from './app.js';
import { loadConfig } from './config.js';

const config = loadConfig();
const server = await startServer(config);
server.app.log.info({ url: server.url, dataDir: config.dataDir, domain: config.domain }, 'Cakework API listening');

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    server.app.log.info({ signal: sig }, 'shutting down');
    const force = setTimeout(() => process.exit(1), 30_000);
    force.unref();
    server.close().then(
      () => process.exit(0),
      (err: unknown) => {
        server.app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  });
}
