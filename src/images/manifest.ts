import { ImportError } from './errors.js';
import type { ImageConfig } from '../store/store.js';

export const INDEX_TYPES = new Set([
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
]);
export const MANIFEST_TYPES = new Set([
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
]);
const LAYER_TYPES = new Set([
  'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.oci.image.layer.v1.tar+zstd',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
]);

const digestRe = /^sha256:[a-f0-9]{64}$/;

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
}

export interface ParsedIndex {
  kind: 'index';
  manifests: Array<Descriptor & { platform?: { os?: string; architecture?: string; variant?: string } }>;
}

export interface ParsedManifest {
  kind: 'manifest';
  config: Descriptor;
  layers: Descriptor[];
}

function descriptor(value: unknown, what: string): Descriptor {
  const d = value as Partial<Descriptor> | null;
  if (!d || typeof d !== 'object' || typeof d.digest !== 'string' || !digestRe.test(d.digest)) {
    throw new ImportError(`${what} has no valid sha256 digest`);
  }
  if (typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw new ImportError(`${what} has no valid size`);
  }
  return { mediaType: typeof d.mediaType === 'string' ? d.mediaType : '', digest: d.digest, size: d.size };
}

/**
 * Parses an index or image manifest. The media type comes from the body's `mediaType` field, or from
 * the Content-Type header when the body has none (as in umoci-made manifests).
 */
export function parseManifest(body: Buffer, headerType: string): ParsedIndex | ParsedManifest {
  let doc: Record<string, unknown>;
  try {
    doc = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw new ImportError('registry returned a manifest that is not JSON');
  }
  const mediaType = typeof doc.mediaType === 'string' ? doc.mediaType : headerType;
  if (doc.schemaVersion === 1) {
    throw new ImportError('registry returned a schema 1 manifest; only OCI and Docker v2 manifests are supported');
  }
  if (INDEX_TYPES.has(mediaType) || (!MANIFEST_TYPES.has(mediaType) && Array.isArray(doc.manifests))) {
    if (!Array.isArray(doc.manifests)) throw new ImportError('image index has no manifests list');
    return {
      kind: 'index',
      manifests: doc.manifests.map((m, i) => ({
        ...descriptor(m, `index entry ${i}`),
        platform: (m as { platform?: ParsedIndex['manifests'][number]['platform'] }).platform,
      })),
    };
  }
  if (MANIFEST_TYPES.has(mediaType) || (doc.config && Array.isArray(doc.layers))) {
    if (!Array.isArray(doc.layers)) throw new ImportError('image manifest has no layers list');
    const layers = doc.layers.map((l, i) => descriptor(l, `layer ${i}`));
    for (const l of layers) {
      if (l.mediaType && !LAYER_TYPES.has(l.mediaType)) {
        throw new ImportError(`layer ${l.digest} has unsupported media type ${l.mediaType}`);
      }
    }
    return { kind: 'manifest', config: descriptor(doc.config, 'image config'), layers };
  }
  throw new ImportError(`unsupported manifest media type "${mediaType || 'none'}"`);
}

/** Picks the linux/amd64 manifest of an index, the first if several (variants do not matter on amd64). */
export function selectPlatform(index: ParsedIndex): Descriptor {
  const found = index.manifests.find((m) => m.platform?.os === 'linux' && m.platform?.architecture === 'amd64');
  if (!found) {
    const have = index.manifests
      .map((m) => (m.platform ? `${m.platform.os}/${m.platform.architecture}` : 'unknown'))
      .join(', ');
    throw new ImportError(`image index has no linux/amd64 manifest (it has: ${have || 'none'})`);
  }
  return found;
}

function stringArray(v: unknown): string[] | null {
  return Array.isArray(v) && v.every((x) => typeof x === 'string') ? (v as string[]) : null;
}

/** Extracts what decides how the image runs from an OCI/Docker image config blob. */
export function parseImageConfig(body: Buffer): ImageConfig {
  let doc: { architecture?: unknown; os?: unknown; config?: Record<string, unknown> | null };
  try {
    doc = JSON.parse(body.toString('utf8')) as typeof doc;
  } catch {
    throw new ImportError('image config blob is not JSON');
  }
  if (typeof doc.os === 'string' && doc.os !== 'linux') throw new ImportError(`image is for ${doc.os}, not linux`);
  if (typeof doc.architecture === 'string' && doc.architecture !== 'amd64') {
    throw new ImportError(`image is for ${doc.architecture}, not amd64`);
  }
  const c = doc.config ?? {};
  return {
    entrypoint: stringArray(c.Entrypoint),
    cmd: stringArray(c.Cmd),
    env: stringArray(c.Env) ?? [],
    workingDir: typeof c.WorkingDir === 'string' ? c.WorkingDir : '',
    user: typeof c.User === 'string' ? c.User : '',
    exposedPorts: c.ExposedPorts && typeof c.ExposedPorts === 'object' ? Object.keys(c.ExposedPorts) : [],
  };
}
