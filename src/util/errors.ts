/**
 * A refusal the caller can act on, raised by any service (images, builds, VMs). The API answers it
 * with `status`, this message and, for a 400, the field at fault.
 */
export class ServiceError extends Error {
  constructor(
    readonly status: 400 | 404 | 409 | 429 | 501 | 503,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}
