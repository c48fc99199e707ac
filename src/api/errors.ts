import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { ServiceError } from '../util/errors.js';

/** An error with an HTTP status that is safe to show to the client as is. */
export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

export const notFound = (what: string, id: string): ApiError => new ApiError(404, 'not_found', `${what} ${id} does not exist`);

export interface ErrorBody {
  error: { code: string; message: string; field?: string; requestId?: string };
}

interface AjvError {
  instancePath: string;
  keyword: string;
  params: Record<string, unknown>;
  message?: string;
  /** set when a map key (not a value) broke the rule */
  propertyName?: string;
}

/** Turns a schema violation into a field name and a sentence naming the rule. */
export function describeValidation(v: AjvError, context: string | undefined): { field: string; message: string } {
  const base = v.instancePath.replace(/^\//, '').replace(/\//g, '.');
  let field = base;
  if (v.keyword === 'required') field = [base, String(v.params.missingProperty)].filter(Boolean).join('.');
  if (v.keyword === 'additionalProperties') field = [base, String(v.params.additionalProperty)].filter(Boolean).join('.');
  if (!field) field = context ?? 'body';
  let message: string;
  if (v.propertyName !== undefined) return { field, message: `${field} has an invalid key "${v.propertyName}"` };
  switch (v.keyword) {
    case 'required':
      message = `${field} is required`;
      break;
    case 'additionalProperties':
      message = `${field} is not a known field`;
      break;
    case 'type':
      message = `${field} must be of type ${String(v.params.type)}`;
      break;
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      message = `${field} must be ${String(v.params.comparison)} ${String(v.params.limit)}`;
      break;
    case 'minLength':
      message = Number(v.params.limit) === 1 ? `${field} must not be empty` : `${field} must be at least ${String(v.params.limit)} characters`;
      break;
    case 'maxLength':
      message = `${field} must be at most ${String(v.params.limit)} characters`;
      break;
    case 'pattern':
      message = `${field} has an invalid format`;
      break;
    case 'enum':
      message = `${field} must be one of: ${(v.params.allowedValues as unknown[]).join(', ')}`;
      break;
    case 'maxItems':
    case 'minItems':
    case 'maxProperties':
      message = `${field} ${v.message ?? 'has the wrong number of entries'}`;
      break;
    default:
      message = `${field} ${v.message ?? 'is invalid'}`;
  }
  return { field, message };
}

const SERVICE_CODES: Record<ServiceError['status'], string> = {
  400: 'invalid_request',
  404: 'not_found',
  409: 'conflict',
  429: 'unavailable',
  501: 'not_implemented',
  503: 'unavailable',
};

export function errorHandler(err: FastifyError, req: FastifyRequest, reply: FastifyReply): void {
  let status = 500;
  let body: ErrorBody;
  if (err instanceof ApiError) {
    status = err.statusCode;
    body = { error: { code: err.code, message: err.message, ...(err.field ? { field: err.field } : {}) } };
  } else if (err instanceof ServiceError) {
    status = err.status;
    body = { error: { code: SERVICE_CODES[err.status], message: err.message, ...(err.field ? { field: err.field } : {}) } };
  } else if (err.validation && err.validation.length > 0) {
    status = 400;
    const { field, message } = describeValidation(err.validation[0] as AjvError, err.validationContext);
    body = { error: { code: 'invalid_request', message, field } };
  } else if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500) {
    // Fastify's own client errors (bad JSON, body too large, wrong content type) have safe messages.
    status = err.statusCode;
    body = { error: { code: err.code === 'FST_ERR_CTP_BODY_TOO_LARGE' ? 'body_too_large' : 'invalid_request', message: err.message } };
  } else {
    req.log.error({ err }, 'request failed');
    body = { error: { code: 'internal', message: 'internal server error' } };
  }
  body.error.requestId = req.id;
  void reply.status(status).send(body);
}
