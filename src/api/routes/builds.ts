import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { checkFiles } from '../../builds/context.js';
import type { BuildService } from '../../builds/service.js';
import type { LogService } from '../../logs/service.js';
import type { BuildRecord } from '../../store/store.js';
import { notFound } from '../errors.js';
import { iso, isoOrNull } from '../format.js';
import { sendLogs } from '../logs.js';
import { BuildFromFilesBody, BuildFromGithubBody, BuildIdParams, BuildView, ErrorSchema, LogsQuery, LogsResponse } from '../schemas.js';

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema };

export const buildRoutes =
  (deps: { builds: BuildService; logs: LogService }): FastifyPluginAsyncTypebox =>
  async (app) => {
    const b = { tags: ['builds'] };
    const view = (r: BuildRecord) => ({
      buildId: r.id,
      imageId: r.imageId,
      status: r.status,
      error: r.error,
      createdAt: iso(r.createdAt),
      updatedAt: iso(r.updatedAt),
      startedAt: isoOrNull(r.startedAt),
      finishedAt: isoOrNull(r.finishedAt),
    });
    app.post(
      '/v1/image/build/github',
      {
        schema: {
          ...b,
          summary: "buildImageFromGithub: build the user's repository at a branch with your Dockerfile; returns at once",
          body: BuildFromGithubBody,
          response: { 200: BuildView, ...errors },
        },
      },
      async (req) => {
        const { dockerfile, dockerignore, token, repository, branch } = req.body;
        return view(deps.builds.start(req.accountId, { dockerfile, dockerignore, source: { kind: 'github', token, repository, branch } }));
      },
    );
    app.post(
      '/v1/image/build/files',
      { schema: { ...b, summary: 'buildImageFromFiles: build from files given in the request; returns at once', body: BuildFromFilesBody, response: { 200: BuildView, ...errors } } },
      async (req) => {
        const { dockerfile, dockerignore, files } = req.body;
        const rels = checkFiles(files);
        return view(deps.builds.start(req.accountId, { dockerfile, dockerignore, source: { kind: 'files', files, rels } }));
      },
    );
    app.get(
      '/v1/image/build/:buildId',
      { schema: { ...b, summary: 'getBuild', params: BuildIdParams, response: { 200: BuildView, ...errors } } },
      async (req) => {
        const found = deps.builds.get(req.accountId, req.params.buildId);
        if (!found) throw notFound('build', req.params.buildId);
        return view(found);
      },
    );
    app.get(
      '/v1/image/build/:buildId/logs',
      { schema: { ...b, summary: 'getBuildLogs: every builder output line; follow=true streams until the build ends', params: BuildIdParams, querystring: LogsQuery, response: { 200: LogsResponse, ...errors } } },
      async (req, reply) => {
        const found = deps.builds.get(req.accountId, req.params.buildId);
        if (!found) throw notFound('build', req.params.buildId);
        return sendLogs(req, reply, deps.logs, found.id, req.query, () => {
          const s = deps.builds.get(req.accountId, found.id)?.status;
          return s === 'created' || s === 'building';
        });
      },
    );
  };
