import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { LogService } from '../../logs/service.js';
import type { VmRecord } from '../../store/store.js';
import { VmError, type VmService } from '../../vms/service.js';
import { ApiError, notFound } from '../errors.js';
import { sendLogs } from '../logs.js';
import { CacheVmBody, ErrorSchema, IdParams, ListVmsQuery, LogsQuery, LogsResponse, StartVmBody, VmList } from '../schemas.js';
import { parseCursor, parseLimit } from './images.js';
import { notImplemented } from './not-implemented.js';

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 409: ErrorSchema, 429: ErrorSchema, 501: ErrorSchema, 503: ErrorSchema };

export interface VmRouteDeps {
  vms: VmService;
  logs: LogService;
  /** `http://<id>.<domain>:<port>`-style URL of a VM's endpoint */
  endpointOf: (vmId: string) => string;
  domain: string;
}

export const vmRoutes =
  (deps: VmRouteDeps): FastifyPluginAsyncTypebox =>
  async (app) => {
    const view = (vm: VmRecord) => ({
      id: vm.id,
      hostname: `${vm.id}.${deps.domain}`,
      endpoint: deps.endpointOf(vm.id),
      state: vm.state,
      cpu: vm.cpu,
      memory: vm.memory,
      port: vm.port,
      imageId: vm.imageId,
      ...(vm.volumeGb !== null ? { volumeGB: vm.volumeGb } : {}),
      exitCode: vm.exitCode,
      error: vm.error,
      createdAt: new Date(vm.createdAt).toISOString(),
      updatedAt: new Date(vm.updatedAt).toISOString(),
      startedAt: vm.startedAt ? new Date(vm.startedAt).toISOString() : null,
      stoppedAt: vm.stoppedAt ? new Date(vm.stoppedAt).toISOString() : null,
    });
    const translate = (err: unknown): never => {
      if (err instanceof VmError) throw new ApiError(err.status, err.status === 404 ? 'not_found' : err.status === 400 ? 'invalid_request' : err.status === 409 ? 'conflict' : err.status === 501 ? 'not_implemented' : 'unavailable', err.message, err.field);
      throw err;
    };
    const vm = { tags: ['vms'] };
    const cached = notImplemented('Cached VMs');
    const cvm = { tags: ['cached vms'], response: errors };

    app.post(
      '/v1/vm/start',
      {
        schema: {
          ...vm,
          summary: 'startVM: boot the image as a microVM; answers once the app is started (or listening, with waitForPort)',
          body: StartVmBody,
          response: { 200: { $ref: 'Vm#' }, ...errors },
        },
      },
      async (req) => view(await deps.vms.start(req.accountId, req.body).catch(translate)),
    );
    app.post(
      '/v1/vm/:id/stop',
      { schema: { ...vm, summary: 'stopVM: SIGTERM to the app, hard stop after the grace period', params: IdParams, response: { 200: { $ref: 'Vm#' }, ...errors } } },
      async (req) => view(await deps.vms.stop(req.accountId, req.params.id).catch(translate)),
    );
    app.get(
      '/v1/vm/:id',
      { schema: { ...vm, summary: 'getVm', params: IdParams, response: { 200: { $ref: 'Vm#' }, ...errors } } },
      async (req) => {
        const found = deps.vms.get(req.accountId, req.params.id);
        if (!found) throw notFound('VM', req.params.id);
        return view(found);
      },
    );
    app.get(
      '/v1/vms',
      { schema: { ...vm, summary: 'listVMs: oldest first, cursor-paginated', querystring: ListVmsQuery, response: { 200: VmList, ...errors } } },
      async (req) => {
        const page = deps.vms.list(
          req.accountId,
          { imageId: req.query.imageId, state: req.query.status },
          parseLimit(req.query.limit, 'limit', 100, 1, 1000),
          parseCursor(req.query.pagination),
        );
        return { vms: page.items.map(view), ...(page.next ? { pagination: page.next } : {}) };
      },
    );
    app.get(
      '/v1/vm/:id/logs',
      { schema: { ...vm, summary: 'getVMLogs: stdout (info), stderr (error) and platform events', params: IdParams, querystring: LogsQuery, response: { 200: LogsResponse, ...errors } } },
      async (req, reply) => {
        const found = deps.vms.get(req.accountId, req.params.id);
        if (!found) throw notFound('VM', req.params.id);
        return sendLogs(req, reply, deps.logs, found.id, req.query, () => {
          const s = deps.vms.get(req.accountId, found.id)?.state;
          return s !== 'stopped' && s !== 'failed';
        });
      },
    );

    app.post('/v1/vm/cache', { schema: { ...cvm, summary: 'cacheVM', body: CacheVmBody } }, cached);
    app.post('/v1/vm/cached/:id/start', { schema: { ...cvm, summary: 'startCachedVM', params: IdParams } }, cached);
    app.post('/v1/vm/cached/:id/stop', { schema: { ...cvm, summary: 'stopCachedVM', params: IdParams } }, cached);
    app.post('/v1/vm/cached/:id/destroy', { schema: { ...cvm, summary: 'destroyCachedVM (documented path)', params: IdParams } }, cached);
    app.post('/v1/vm/:id/destroy', { schema: { ...cvm, summary: 'destroyCachedVM (path the published SDK calls)', params: IdParams } }, cached);
    app.get('/v1/vm/cached/:id/logs', { schema: { ...cvm, summary: 'getCachedVMLogs', params: IdParams, querystring: LogsQuery } }, cached);
  };
