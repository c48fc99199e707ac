import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { CacheVmBody, ErrorSchema, IdParams, ListVmsQuery, LogsQuery, StartVmBody } from '../schemas.js';
import { notImplemented } from './not-implemented.js';

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 501: ErrorSchema };

export const vmRoutes: FastifyPluginAsyncTypebox = async (app) => {
  const vms = notImplemented('Running microVMs');
  const cached = notImplemented('Cached VMs');
  const vm = { tags: ['vms'], response: errors };
  const cvm = { tags: ['cached vms'], response: errors };

  app.post('/v1/vm/start', { schema: { ...vm, summary: 'startVM', body: StartVmBody } }, vms);
  app.post('/v1/vm/:id/stop', { schema: { ...vm, summary: 'stopVM', params: IdParams } }, vms);
  app.get('/v1/vm/:id', { schema: { ...vm, summary: 'getVm', params: IdParams } }, vms);
  app.get('/v1/vms', { schema: { ...vm, summary: 'listVMs', querystring: ListVmsQuery } }, vms);
  app.get('/v1/vm/:id/logs', { schema: { ...vm, summary: 'getVMLogs', params: IdParams, querystring: LogsQuery } }, vms);

  app.post('/v1/vm/cache', { schema: { ...cvm, summary: 'cacheVM', body: CacheVmBody } }, cached);
  app.post('/v1/vm/cached/:id/start', { schema: { ...cvm, summary: 'startCachedVM', params: IdParams } }, cached);
  app.post('/v1/vm/cached/:id/stop', { schema: { ...cvm, summary: 'stopCachedVM', params: IdParams } }, cached);
  app.post('/v1/vm/cached/:id/destroy', { schema: { ...cvm, summary: 'destroyCachedVM (documented path)', params: IdParams } }, cached);
  app.post('/v1/vm/:id/destroy', { schema: { ...cvm, summary: 'destroyCachedVM (path the published SDK calls)', params: IdParams } }, cached);
  app.get(
    '/v1/vm/cached/:id/logs',
    { schema: { ...cvm, summary: 'getCachedVMLogs', params: IdParams, querystring: LogsQuery } },
    cached,
  );
};
