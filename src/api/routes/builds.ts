import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { BuildFromFilesBody, BuildFromGithubBody, BuildIdParams, ErrorSchema, LogsQuery } from '../schemas.js';
import { notImplemented } from './not-implemented.js';

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 501: ErrorSchema };

export const buildRoutes: FastifyPluginAsyncTypebox = async (app) => {
  const builds = notImplemented('Building images');
  const b = { tags: ['builds'], response: errors };
  app.post('/v1/image/build/github', { schema: { ...b, summary: 'buildImageFromGithub', body: BuildFromGithubBody } }, builds);
  app.post('/v1/image/build/files', { schema: { ...b, summary: 'buildImageFromFiles', body: BuildFromFilesBody } }, builds);
  app.get('/v1/image/build/:buildId', { schema: { ...b, summary: 'getBuild', params: BuildIdParams } }, builds);
  app.get(
    '/v1/image/build/:buildId/logs',
    { schema: { ...b, summary: 'getBuildLogs', params: BuildIdParams, querystring: LogsQuery } },
    builds,
  );
};
