import crypto from 'node:crypto';
import { ImportError } from './errors.js';
import type { ImageReference } from './reference.js';

export const MANIFEST_ACCEPT = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
].join(', ');

export interface RegistryOptions {
  ref: ImageReference;
  username: string;
  password: string;
  plainHttp: boolean;
  timeoutMs: number;
  signal: AbortSignal;
}

export interface FetchedManifest {
  mediaType: string;
  body: Buffer;
  digest: string;
}

const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

export function sha256Digest(data: Buffer): string {
  return `sha256:${crypto.createHash('sha256').update(data).digest('hex')}`;
}

/** `Bearer realm="...",service="..."` → scheme and parameters. */
export function parseAuthenticate(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^\s*(\w+)\s*(.*)$/s.exec(header);
  const params: Record<string, string> = {};
  if (!m) return { scheme: '', params };
  const re = /([A-Za-z_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g;
  for (let p = re.exec(m[2]!); p; p = re.exec(m[2]!)) {
    params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3]!;
  }
  return { scheme: m[1]!.toLowerCase(), params };
}

/**
 * A client of the OCI distribution API for one repository, pull only.
 * Authentication follows the registry's challenge: Basic, or the Bearer token flow; a rejected
 * credential fails at once (no retries, so a wrong password never turns into a request storm).
 */
export class RegistryClient {
  private authorization: string | null = null;
  private readonly base: string;

  constructor(private readonly opts: RegistryOptions) {
    this.base = `${opts.plainHttp ? 'http' : 'https'}://${opts.ref.registry}/v2/${opts.ref.repository}`;
  }

  private describe(): string {
    return `${this.opts.ref.registry}/${this.opts.ref.repository}`;
  }

  private async send(url: string, accept: string | undefined, timeoutMs: number): Promise<Response> {
    const headers: Record<string, string> = {};
    if (accept) headers.accept = accept;
    if (this.authorization) headers.authorization = this.authorization;
    // The timeout covers the wait for response headers only: a large layer's body may take longer,
    // and the import's own deadline (opts.signal) bounds that.
    const headersDeadline = new AbortController();
    const timer = setTimeout(() => headersDeadline.abort(), timeoutMs);
    const signal = AbortSignal.any([this.opts.signal, headersDeadline.signal]);
    try {
      return await fetch(url, { headers, signal, redirect: 'follow' });
    } catch (err) {
      if (this.opts.signal.aborted) throw err;
      if (headersDeadline.signal.aborted) {
        throw new ImportError(`registry ${this.opts.ref.registry} did not answer within ${timeoutMs} ms`);
      }
      const e = err as Error & { cause?: { code?: string; message?: string } };
      const cause = e.cause?.code ?? e.cause?.message ?? e.message;
      throw new ImportError(`cannot reach registry ${this.opts.ref.registry}: ${cause}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** GET with authentication: one unauthenticated try, then one with the credentials the challenge asks for. */
  async get(path: string, accept?: string, timeoutMs = this.opts.timeoutMs): Promise<Response> {
    const url = `${this.base}${path}`;
    let res = await this.send(url, accept, timeoutMs);
    if (res.status === 401 && !this.authorization) {
      const challenge = res.headers.get('www-authenticate');
      await res.body?.cancel();
      if (!challenge) throw new ImportError(`registry ${this.opts.ref.registry} requires authentication but sent no challenge`);
      this.authorization = await this.authorize(challenge);
      res = await this.send(url, accept, timeoutMs);
    }
    if (res.status === 401) {
      await res.body?.cancel();
      throw new ImportError(
        `registry ${this.opts.ref.registry} rejected the credentials for user "${this.opts.username}" (HTTP 401): check the password and username`,
      );
    }
    if (res.status === 403) {
      await res.body?.cancel();
      throw new ImportError(`user "${this.opts.username}" may not pull ${this.describe()} (HTTP 403)`);
    }
    return res;
  }

  private async authorize(challenge: string): Promise<string> {
    const { scheme, params } = parseAuthenticate(challenge);
    const basic = `Basic ${Buffer.from(`${this.opts.username}:${this.opts.password}`).toString('base64')}`;
    if (scheme === 'basic') return basic;
    if (scheme !== 'bearer' || !params.realm) {
      throw new ImportError(`registry ${this.opts.ref.registry} asks for unsupported authentication "${challenge.slice(0, 100)}"`);
    }
    let realm: URL;
    try {
      realm = new URL(params.realm);
    } catch {
      throw new ImportError(`registry ${this.opts.ref.registry} named an invalid token realm`);
    }
    if (params.service) realm.searchParams.set('service', params.service);
    realm.searchParams.set('scope', params.scope ?? `repository:${this.opts.ref.repository}:pull`);
    const signal = AbortSignal.any([this.opts.signal, AbortSignal.timeout(this.opts.timeoutMs)]);
    let res: Response;
    try {
      res = await fetch(realm, { headers: { authorization: basic }, signal });
    } catch (err) {
      if (this.opts.signal.aborted) throw err;
      throw new ImportError(`cannot reach the token service of ${this.opts.ref.registry} at ${realm.origin}`);
    }
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel();
      throw new ImportError(
        `registry ${this.opts.ref.registry} rejected the credentials for user "${this.opts.username}" (token service HTTP ${res.status}): check the password and username`,
      );
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new ImportError(`token service of ${this.opts.ref.registry} answered HTTP ${res.status}`);
    }
    const body = (await res.json().catch(() => null)) as { token?: string; access_token?: string } | null;
    const token = body?.token ?? body?.access_token;
    if (!token) throw new ImportError(`token service of ${this.opts.ref.registry} returned no token`);
    return `Bearer ${token}`;
  }

  /** Fetches a manifest by tag or digest and verifies its digest. */
  async manifest(reference: string): Promise<FetchedManifest> {
    const res = await this.get(`/manifests/${reference}`, MANIFEST_ACCEPT);
    if (res.status === 404) {
      await res.body?.cancel();
      throw new ImportError(`${this.describe()}:${reference} not found in the registry (HTTP 404): check the repository and tag`);
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new ImportError(`registry answered HTTP ${res.status} for manifest ${this.describe()}:${reference}`);
    }
    const length = Number(res.headers.get('content-length') ?? 0);
    if (length > MAX_MANIFEST_BYTES) {
      await res.body?.cancel();
      throw new ImportError(`manifest of ${this.describe()}:${reference} is larger than ${MAX_MANIFEST_BYTES} bytes`);
    }
    const body = Buffer.from(await res.arrayBuffer());
    if (body.length > MAX_MANIFEST_BYTES) throw new ImportError(`manifest of ${this.describe()}:${reference} is too large`);
    const digest = sha256Digest(body);
    const claimed = res.headers.get('docker-content-digest');
    if (claimed && claimed !== digest) {
      throw new ImportError(`manifest digest mismatch for ${this.describe()}:${reference}: registry says ${claimed}, content is ${digest}`);
    }
    if (reference.startsWith('sha256:') && reference !== digest) {
      throw new ImportError(`manifest digest mismatch: asked for ${reference}, content is ${digest}`);
    }
    const mediaType = (res.headers.get('content-type') ?? '').split(';')[0]!.trim();
    return { mediaType, body, digest };
  }

  /** Opens a blob for streaming; the caller verifies its digest. */
  async blob(digest: string): Promise<Response> {
    const res = await this.get(`/blobs/${digest}`);
    if (res.status === 404) {
      await res.body?.cancel();
      throw new ImportError(`blob ${digest} of ${this.describe()} not found in the registry (HTTP 404)`);
    }
    if (!res.ok || !res.body) {
      await res.body?.cancel();
      throw new ImportError(`registry answered HTTP ${res.status} for blob ${digest}`);
    }
    return res;
  }
}
