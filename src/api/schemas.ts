import { Type, type Static } from '@sinclair/typebox';

/** Request and response schemas: validation at the edge and the OpenAPI document both come from these. */

export const ErrorSchema = Type.Object(
  {
    error: Type.Object({
      code: Type.String(),
      message: Type.String(),
      field: Type.Optional(Type.String()),
      requestId: Type.Optional(Type.String()),
    }),
  },
  { $id: 'Error' },
);

const id = (description: string) => Type.String({ minLength: 1, maxLength: 64, pattern: '^[A-Za-z0-9_-]+$', description });

export const IdParams = Type.Object({ id: id('Resource id') });
export const ImageIdParams = Type.Object({ imageId: id('Image id') });
export const BuildIdParams = Type.Object({ buildId: id('Build id') });

export const ImportImageBody = Type.Object({
  imageUri: Type.String({
    minLength: 1,
    maxLength: 1024,
    description: '`[http(s)://][user@]host[:port]/repository[:tag][@sha256:digest]`; no host means Docker Hub',
  }),
  password: Type.String({ maxLength: 16384, description: 'Registry password or token; empty for an anonymous pull. Never stored.' }),
  username: Type.Optional(Type.String({ minLength: 1, maxLength: 256, description: 'Registry user; see README for the default' })),
});
export type ImportImageBody = Static<typeof ImportImageBody>;

export const ImportImageResponse = Type.Object({ imageId: Type.String() });

export const ImageDetail = Type.Object(
  {
    imageId: Type.String(),
    status: Type.Union([Type.Literal('importing'), Type.Literal('ready'), Type.Literal('failed')]),
    source: Type.String(),
    imageUri: Type.Union([Type.String(), Type.Null()]),
    digest: Type.Union([Type.String(), Type.Null()]),
    size: Type.Union([Type.Integer(), Type.Null()], { description: 'Bytes of the root-filesystem disk' }),
    progress: Type.Object({
      phase: Type.Union([Type.String(), Type.Null()]),
      downloadedBytes: Type.Integer(),
      totalBytes: Type.Union([Type.Integer(), Type.Null()]),
    }),
    error: Type.Union([Type.String(), Type.Null()], { description: 'Why the import failed' }),
    config: Type.Union([
      Type.Object({
        entrypoint: Type.Union([Type.Array(Type.String()), Type.Null()]),
        cmd: Type.Union([Type.Array(Type.String()), Type.Null()]),
        env: Type.Array(Type.String()),
        workingDir: Type.String(),
        user: Type.String(),
        exposedPorts: Type.Array(Type.String()),
      }),
      Type.Null(),
    ]),
    createdAt: Type.String({ format: 'date-time' }),
    updatedAt: Type.String({ format: 'date-time' }),
  },
  { $id: 'ImageDetail' },
);

export const PageQuery = Type.Object({
  limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,4}$', description: 'Page size, 1-1000 (default 100)' })),
  pagination: Type.Optional(Type.String({ maxLength: 256, description: 'Token from the previous page' })),
});

export const ImageList = Type.Object({
  images: Type.Array(Type.Ref('ImageDetail')),
  pagination: Type.Union([Type.String(), Type.Null()]),
});

const envVars = Type.Record(Type.String(), Type.String({ maxLength: 32768, pattern: '^[^\\u0000]*$' }), {
  propertyNames: { pattern: '^[A-Za-z_][A-Za-z0-9_]{0,255}$' },
  maxProperties: 256,
  description: 'Environment variables for the app (names: letters, digits, _); they override the image Env',
});

const vmShape = {
  imageId: id('Image to run'),
  cpu: Type.Optional(Type.Integer({ minimum: 1, maximum: 8, default: 1, description: 'vCPUs, 1-8' })),
  memory: Type.Optional(Type.Integer({ minimum: 256, maximum: 16384, default: 256, description: 'MB of RAM, 256-16384' })),
  port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, default: 8080, description: 'Port the app listens on' })),
  envVars: Type.Optional(envVars),
};

export const StartVmBody = Type.Object({
  ...vmShape,
  volumeGB: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, description: 'Size in GB of the writable disk under the image (default CAKEWORK_SCRATCH_GB); discarded when the VM stops' })),
  waitForPort: Type.Optional(Type.Boolean({ description: 'Answer only once the app accepts connections on `port` (bounded by CAKEWORK_PORT_WAIT_MS)' })),
});

export const CacheVmBody = Type.Object({
  ...vmShape,
  wakeOnRequest: Type.Optional(Type.Boolean({ description: 'A request to the stopped VM\'s endpoint starts it (default true)' })),
  idleStopSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 86400, description: 'Stop after this many seconds without a request to the endpoint' })),
});

export const ListVmsQuery = Type.Object({
  imageId: Type.Optional(id('Only VMs of this image')),
  status: Type.Optional(Type.Union(['created', 'starting', 'started', 'stopping', 'stopped', 'failed'].map((s) => Type.Literal(s)))),
  pagination: Type.Optional(Type.String({ maxLength: 256 })),
  limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,4}$', description: 'Page size, 1-1000 (default 100)' })),
});

export const LogsQuery = Type.Object({
  query: Type.Optional(Type.String({ maxLength: 1024, description: 'Case-insensitive substring' })),
  batch: Type.Optional(Type.String({ pattern: '^[0-9]{2,4}$', description: 'Lines per page, 50-1000 (default 100)' })),
  order: Type.Optional(Type.Union([Type.Literal('oldest_first'), Type.Literal('newest_first')])),
  pagination: Type.Optional(Type.String({ maxLength: 256 })),
  from: Type.Optional(Type.String({ format: 'date-time' })),
  to: Type.Optional(Type.String({ format: 'date-time' })),
  follow: Type.Optional(Type.Union([Type.Literal('true'), Type.Literal('false')], { description: 'Stream lines until the VM stops: NDJSON, or SSE with Accept: text/event-stream' })),
});

export const VmView = Type.Object(
  {
    id: Type.String(),
    hostname: Type.String({ description: '<id>.<CAKEWORK_DOMAIN>' }),
    endpoint: Type.String({ description: 'URL that reaches the app' }),
    state: Type.Union(['created', 'caching', 'starting', 'started', 'stopping', 'stopped', 'failed', 'destroyed'].map((s) => Type.Literal(s))),
    cpu: Type.Integer(),
    memory: Type.Integer(),
    port: Type.Integer(),
    imageId: Type.String(),
    volumeGB: Type.Optional(Type.Integer()),
    exitCode: Type.Union([Type.Integer(), Type.Null()]),
    error: Type.Union([Type.String(), Type.Null()]),
    createdAt: Type.String({ format: 'date-time' }),
    updatedAt: Type.String({ format: 'date-time' }),
    startedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
    stoppedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  },
  { $id: 'Vm' },
);

export const CachedVmView = Type.Object(
  {
    ...VmView.properties,
    runs: Type.Integer({ description: 'How many times it was started from its snapshot' }),
    wakeOnRequest: Type.Boolean(),
    idleStopSeconds: Type.Union([Type.Integer(), Type.Null()]),
    disk: Type.Union([
      Type.Object({ ramBytes: Type.Integer(), stateBytes: Type.Integer(), diskBytes: Type.Integer() }, { description: 'Bytes the snapshot uses on disk; the image disk is shared' }),
      Type.Null(),
    ]),
  },
  { $id: 'CachedVm' },
);

export const VmList = Type.Object({
  vms: Type.Array(Type.Ref('Vm')),
  pagination: Type.Optional(Type.String()),
});

export const LogsResponse = Type.Object({
  lines: Type.Array(Type.Object({ timestamp: Type.Integer(), level: Type.String(), message: Type.String() })),
  pagination: Type.Optional(Type.String()),
  from: Type.Optional(Type.String()),
  to: Type.Optional(Type.String()),
});

export const BuildFromGithubBody = Type.Object({
  dockerfile: Type.String({ minLength: 1, maxLength: 1_048_576 }),
  dockerignore: Type.Optional(Type.String({ maxLength: 1_048_576 })),
  token: Type.String({ minLength: 1, maxLength: 4096 }),
  repository: Type.String({ pattern: '^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$', description: 'owner/repo' }),
  branch: Type.String({ minLength: 1, maxLength: 255 }),
});

export const BuildView = Type.Object({
  buildId: Type.String(),
  imageId: Type.String({ description: 'Reserved at once; startVM on it waits for the build' }),
  status: Type.Union(['created', 'building', 'succeeded', 'failed'].map((s) => Type.Literal(s))),
  error: Type.Union([Type.String(), Type.Null()]),
  createdAt: Type.String({ format: 'date-time' }),
  updatedAt: Type.String({ format: 'date-time' }),
  startedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
  finishedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
});

export const BuildFromFilesBody = Type.Object({
  dockerfile: Type.String({ minLength: 1, maxLength: 1_048_576 }),
  dockerignore: Type.Optional(Type.String({ maxLength: 1_048_576 })),
  files: Type.Array(
    Type.Object({
      dir: Type.String({ maxLength: 4096, description: 'Directory inside the build context; "." is the root' }),
      name: Type.String({ minLength: 1, maxLength: 255 }),
      content: Type.String(),
    }),
    { maxItems: 10000, description: 'At most 10000 files and 32 MiB in all' },
  ),
});
