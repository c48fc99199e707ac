import { ApiError } from '../errors.js';

/**
 * Routes whose capability is not built yet are registered with their real schemas (so bad input
 * still gets a 400 naming the field) and answer 501: never a fake success.
 */
export function notImplemented(capability: string): () => Promise<never> {
  return async () => {
    throw new ApiError(501, 'not_implemented', `${capability} is not implemented on this server yet`);
  };
}
