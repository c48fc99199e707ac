import { ImportError } from './errors.js';

/** A parsed `imageUri`: `[scheme://][user@]host[:port]/repo[:tag][@sha256:...]`, Docker Hub when host is absent. */
export interface ImageReference {
  /** Host and optional port used for API calls, e.g. `registry-1.docker.io` or `127.0.0.1:5000`. */
  registry: string;
  repository: string;
  /** A tag or a `sha256:` digest. */
  reference: string;
  userFromUri: string | null;
  scheme: 'http' | 'https' | null;
}

const componentRe = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/;
const tagRe = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const digestRe = /^sha256:[a-f0-9]{64}$/;
const hostRe = /^(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$/;

export function parseImageUri(uri: string): ImageReference {
  let rest = uri.trim();
  let scheme: ImageReference['scheme'] = null;
  const schemeMatch = /^(https?):\/\//i.exec(rest);
  if (schemeMatch) {
    scheme = schemeMatch[1]!.toLowerCase() as 'http' | 'https';
    rest = rest.slice(schemeMatch[0].length);
  }
  let userFromUri: string | null = null;
  const firstSlash = rest.indexOf('/');
  const at = rest.indexOf('@');
  if (at !== -1 && (firstSlash === -1 || at < firstSlash)) {
    userFromUri = decodeURIComponent(rest.slice(0, at));
    rest = rest.slice(at + 1);
    if (!userFromUri) throw new ImportError('imageUri has an empty user name before "@"');
  }

  let reference = 'latest';
  const digestAt = rest.indexOf('@');
  if (digestAt !== -1) {
    reference = rest.slice(digestAt + 1);
    rest = rest.slice(0, digestAt);
    if (!digestRe.test(reference)) throw new ImportError(`imageUri digest "${reference}" is not a sha256 digest`);
  } else {
    const lastSlash = rest.lastIndexOf('/');
    const colon = rest.lastIndexOf(':');
    if (colon > lastSlash) {
      reference = rest.slice(colon + 1);
      rest = rest.slice(0, colon);
      if (!tagRe.test(reference)) throw new ImportError(`imageUri tag "${reference}" is not a valid tag`);
    }
  }

  const parts = rest.split('/');
  let registry = 'registry-1.docker.io';
  const first = parts[0] ?? '';
  if (parts.length > 1 && (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('['))) {
    registry = first;
    parts.shift();
    if (!hostRe.test(registry)) throw new ImportError(`imageUri registry host "${registry}" is not a valid host`);
    if (registry === 'docker.io' || registry === 'index.docker.io') registry = 'registry-1.docker.io';
  } else if (scheme) {
    throw new ImportError('imageUri with a scheme must name a registry host');
  }
  if (registry === 'registry-1.docker.io' && parts.length === 1) parts.unshift('library');
  if (parts.length === 0 || parts.some((p) => !componentRe.test(p))) {
    throw new ImportError(
      `imageUri repository "${parts.join('/')}" is not a valid repository name (lowercase letters, digits, separators)`,
    );
  }
  const repository = parts.join('/');
  if (repository.length > 255) throw new ImportError('imageUri repository name is longer than 255 characters');
  return { registry, repository, reference, userFromUri, scheme };
}

/**
 * The user name sent with the password when the request gives none:
 * the user part of the URI, then `AWS` for Amazon ECR, `oauth2accesstoken` for Google registries,
 * then the repository's first path component (the account or organisation on Docker Hub, GHCR, GitLab).
 */
export function defaultUsername(ref: ImageReference): string {
  if (ref.userFromUri) return ref.userFromUri;
  const host = ref.registry.replace(/:\d+$/, '').toLowerCase();
  if (/\.dkr\.ecr(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$/.test(host)) return 'AWS';
  if (host === 'gcr.io' || host.endsWith('.gcr.io') || host.endsWith('-docker.pkg.dev')) return 'oauth2accesstoken';
  return ref.repository.split('/')[0]!;
}

export function isLoopbackHost(registry: string): boolean {
  const host = registry.replace(/:\d+$/, '').replace(/^\[|\]$/g, '').toLowerCase();
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}
