import type { FastifyInstance, FastifyRequest } from 'fastify';
import { authenticate } from '../accounts/keys.js';
import type { Store } from '../store/store.js';
import { ApiError } from './errors.js';

declare module 'fastify' {
  interface FastifyRequest {
    accountId: string;
  }
}

/** Every route registered in this scope needs a valid X-Api-Key; the request then acts for its account. */
export function requireApiKey(app: FastifyInstance, store: Store): void {
  app.decorateRequest('accountId', '');
  app.addHook('onRequest', async (req: FastifyRequest) => {
    const key = req.headers['x-api-key'];
    if (typeof key !== 'string' || key === '') {
      throw new ApiError(401, 'unauthorized', 'missing X-Api-Key header');
    }
    const accountId = authenticate(store, key);
    if (!accountId) throw new ApiError(401, 'unauthorized', 'invalid or revoked API key');
    req.accountId = accountId;
  });
}
