import swagger from '@fastify/swagger';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import secureJson from 'secure-json-parse';
import http from 'node:http';
import type { Duplex } from 'node:stream';
import type { Config } from '../config.js';
import type { ImageService } from '../images/service.js';
import type { LogService } from '../logs/service.js';
import { EndpointProxy } from '../proxy/proxy.js';
import type { VmService } from '../vms/service.js';
import type { BuildService } from '../builds/service.js';
import type { Store } from '../store/store.js';
import { newId } from '../util/ids.js';
import { requireApiKey } from './auth.js';
import { ApiError, errorHandler } from './errors.js';
import { buildRoutes } from './routes/builds.js';
import { imageRoutes } from './routes/images.js';
import { vmRoutes } from './routes/vms.js';
import { CachedVmView, ErrorSchema, ImageDetail, VmView } from './schemas.js';

/** Logs each request once, when it completes (with status and time), instead of twice: half the cost on hot paths. */
class OneLinePerRequest extends LogController {
  override incomingRequest(): void {}
  override requestCompleted(_err: Error | null | undefined, req: FastifyRequest, reply: FastifyReply): void {
    req.log.info({ method: req.method, url: req.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime * 100) / 100 }, 'request completed');
  }
}

export interface ApiDeps {
  store: Store;
  images: ImageService;
  vms: VmService;
  builds: BuildService;
  logs: LogService;
  logger: FastifyInstance['log'];
  config: Config;
}

/** The URL of a VM's endpoint: CAKEWORK_PUBLIC_URL's scheme and port, else http and the API's own port. */
function endpointOf(app: FastifyInstance, config: Config, vmId: string): string {
  const host = `${vmId}.${config.domain}`;
  if (config.publicUrl) {
    const u = new URL(config.publicUrl);
    return `${u.protocol}//${host}${u.port ? `:${u.port}` : ''}`;
  }
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : config.port;
  return `http://${host}${port === 80 ? '' : `:${port}`}`;
}

export async function buildApi(deps: ApiDeps): Promise<FastifyInstance> {
  const proxy = new EndpointProxy({ domain: deps.config.domain, route: (id) => deps.vms.route(id) });
  const app = Fastify({
    loggerInstance: deps.logger,
    // Requests for `<vmId>.<domain>` never reach the API routes: the endpoint proxy takes them.
    serverFactory: (handler) => {
      const server = http.createServer((req, res) => {
        const vmId = proxy.vmIdOf(req.headers.host);
        if (vmId) proxy.handle(req, res, vmId);
        else handler(req, res);
      });
      server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        const vmId = proxy.vmIdOf(req.headers.host);
        if (vmId) proxy.upgrade(req, socket, head, vmId);
        else socket.destroy();
      });
      server.on('close', () => proxy.close());
      return server;
    },
    // Follow-mode log streams never end by themselves: closing the server ends them.
    forceCloseConnections: true,
    genReqId: () => newId('req_'),
    requestIdHeader: false,
    logController: new OneLinePerRequest(),
    bodyLimit: 64 * 1024 * 1024,
    ajv: {
      // Bodies are JSON: a number sent as a string is a client bug to report, not to guess around.
      customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false },
    },
  }).withTypeProvider<TypeBoxTypeProvider>();

  // The published SDK sends `Content-Type: application/json` with an empty body on body-less POSTs
  // (stopVm, startCachedVm, ...): an empty body is no body, not a JSON syntax error.
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => {
    const text = body as string;
    if (text.trim() === '') return done(null, undefined);
    try {
      done(null, secureJson.parse(text)); // rejects __proto__ / constructor.prototype poisoning, as Fastify's own parser does
    } catch {
      done(new ApiError(400, 'invalid_json', 'request body is not valid JSON', 'body'), undefined);
    }
  });

  app.addHook('onSend', async (req, reply) => {
    reply.header('x-request-id', req.id);
  });
  app.setErrorHandler(errorHandler);
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send({ error: { code: 'not_found', message: `no route ${req.method} ${req.url.split('?')[0]}`, requestId: req.id } });
  });

  app.addSchema(ErrorSchema);
  app.addSchema(ImageDetail);
  app.addSchema(VmView);
  app.addSchema(CachedVmView);
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'Cakework API (self-hosted)',
        version: '0.1.0',
        description: 'The Cakework REST API: images, builds, one-time and cached microVMs.',
      },
      components: { securitySchemes: { apiKey: { type: 'apiKey', in: 'header', name: 'X-Api-Key' } } },
      security: [{ apiKey: [] }],
    },
  });

  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  app.get('/healthz', { schema: { hide: true } }, async () => ({ ok: true }));

  await app.register(async (v1) => {
    requireApiKey(v1, deps.store);
    await v1.register(imageRoutes(deps.images));
    await v1.register(buildRoutes({ builds: deps.builds, logs: deps.logs }));
    await v1.register(vmRoutes({ vms: deps.vms, logs: deps.logs, domain: deps.config.domain, endpointOf: (id) => endpointOf(app, deps.config, id) }));
  });

  return app;
}

