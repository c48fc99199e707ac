import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { ImageService } from '../../images/service.js';
import type { ImageRecord } from '../../store/store.js';
import { parseCursor, parseLimit } from '../params.js';
import { notFound } from '../errors.js';
import { iso } from '../format.js';
import { ImageIdParams, ImageList, ImportImageBody, ImportImageResponse, PageQuery, ErrorSchema } from '../schemas.js';

export function imageView(img: ImageRecord) {
  return {
    imageId: img.id,
    status: img.status,
    source: img.source,
    imageUri: img.imageUri,
    digest: img.digest,
    size: img.size,
    progress: { phase: img.phase, downloadedBytes: img.progressBytes, totalBytes: img.totalBytes },
    error: img.error,
    config: img.config,
    createdAt: iso(img.createdAt),
    updatedAt: iso(img.updatedAt),
  };
}

export const imageRoutes =
  (images: ImageService): FastifyPluginAsyncTypebox =>
  async (app) => {
    const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema };

    app.post(
      '/v1/image/import',
      {
        schema: {
          summary: 'importImage: import an image from an OCI/Docker registry (pulls in the background)',
          tags: ['images'],
          body: ImportImageBody,
          response: { 200: ImportImageResponse, ...errors },
        },
      },
      async (req) => ({ imageId: images.startImport(req.accountId, req.body).id }),
    );

    app.get(
      '/v1/image/:imageId',
      {
        schema: {
          summary: 'getImage (extension): import status, digest, size, progress, failure reason and image config',
          tags: ['images'],
          params: ImageIdParams,
          response: { 200: { $ref: 'ImageDetail#' }, ...errors },
        },
      },
      async (req) => {
        const img = images.getImage(req.accountId, req.params.imageId);
        if (!img) throw notFound('image', req.params.imageId);
        return imageView(img);
      },
    );

    app.get(
      '/v1/images',
      {
        schema: {
          summary: "listImages (extension): the account's images, oldest first, cursor-paginated",
          tags: ['images'],
          querystring: PageQuery,
          response: { 200: ImageList, ...errors },
        },
      },
      async (req) => {
        const limit = parseLimit(req.query.limit, 'limit', 100, 1, 1000);
        const page = images.listImages(req.accountId, limit, parseCursor(req.query.pagination));
        return { images: page.items.map(imageView), pagination: page.next };
      },
    );
  };
