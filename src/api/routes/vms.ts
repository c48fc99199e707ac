import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { LogService } from '../../logs/service.js';
import type { VmRecord } from '../../store/store.js';
import type { VmService } from '../../vms/service.js';
import { notFound } from '../errors.js';
import { iso, isoOrNull } from '../format.js';
import { sendLogs } from '../logs.js';
import { CacheVmBody, ErrorSchema, IdParams, ListVmsQuery, LogsQuery, LogsResponse, StartVmBody, VmList } from '../schemas.js';
import { parseCursor, parseLimit } from '../params.js';

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
      createdAt: iso(vm.createdAt),
      updatedAt: iso(vm.updatedAt),
      startedAt: isoOrNull(vm.startedAt),
      stoppedAt: isoOrNull(vm.stoppedAt),
    });
    const vm = { tags: ['vms'] };
    const cvm = { tags: ['cached vms'] };
    const cachedView = (c: VmRecord) => ({
      ...view(c),
      runs: c.runs,
      wakeOnRequest: c.wake,
      idleStopSeconds: c.idleStopS,
      disk: deps.vms.cached.diskUsage(c),
    });
    const cachedResponse = { 200: { $ref: 'CachedVm#' }, ...errors };

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
      async (req) => view(await deps.vms.start(req.accountId, req.body)),
    );
    app.post(
      '/v1/vm/:id/stop',
      { schema: { ...vm, summary: 'stopVM: SIGTERM to the app, hard stop after the grace period', params: IdParams, response: { 200: { $ref: 'Vm#' }, ...errors } } },
      async (req) => view(await deps.vms.stop(req.accountId, req.params.id)),
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

    app.post(
      '/v1/vm/cache',
      {
        schema: {
          ...cvm,
          summary: 'cacheVM: boot, wait until the app listens on port, snapshot, stop; answers once the snapshot exists (state stopped) or failed',
          body: CacheVmBody,
          response: cachedResponse,
        },
      },
      async (req) => cachedView(await deps.vms.cached.cache(req.accountId, req.body)),
    );
    app.get(
      '/v1/vm/cached/:id',
      { schema: { ...cvm, summary: 'getCachedVm (extension): state, runs and snapshot disk use', params: IdParams, response: cachedResponse } },
      async (req) => {
        const found = deps.vms.cached.get(req.accountId, req.params.id);
        if (!found) throw notFound('cached VM', req.params.id);
        return cachedView(found);
      },
    );
    app.post(
      '/v1/vm/cached/:id/start',
      { schema: { ...cvm, summary: 'startCachedVM: restore the snapshot (idempotent when started)', params: IdParams, response: cachedResponse } },
      async (req) => cachedView(await deps.vms.cached.start(req.accountId, req.params.id)),
    );
    app.post(
      '/v1/vm/cached/:id/stop',
      { schema: { ...cvm, summary: 'stopCachedVM: stop it and keep the snapshot (idempotent when stopped)', params: IdParams, response: cachedResponse } },
      async (req) => cachedView(await deps.vms.cached.stop(req.accountId, req.params.id)),
    );
    for (const [url, summary] of [
      ['/v1/vm/cached/:id/destroy', 'destroyCachedVM (documented path): delete the snapshot; the record stays as destroyed'],
      ['/v1/vm/:id/destroy', 'destroyCachedVM (the path the published SDK calls)'],
    ] as const) {
      app.post(url, { schema: { ...cvm, summary, params: IdParams, response: cachedResponse } }, async (req) =>
        cachedView(await deps.vms.cached.destroy(req.accountId, req.params.id)),
      );
    }
    app.get(
      '/v1/vm/cached/:id/logs',
      { schema: { ...cvm, summary: 'getCachedVMLogs: lines of every run; platform lines mark each run', params: IdParams, querystring: LogsQuery, response: { 200: LogsResponse, ...errors } } },
      async (req, reply) => {
        const found = deps.vms.cached.get(req.accountId, req.params.id);
        if (!found) throw notFound('cached VM', req.params.id);
        return sendLogs(req, reply, deps.logs, found.id, req.query, () => deps.vms.cached.isLive(found.id));
      },
    );
  };
