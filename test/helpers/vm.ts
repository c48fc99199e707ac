import { pushImage, type ImageSpec, type TestRegistry } from './registry.js';
import type { TestServer } from './server.js';

export type Caller = Pick<TestServer, 'call'>;

/** Pushes `spec` as `repo:tag` and imports it through the API; returns the ready image id. */
export async function importImage(srv: Pick<TestServer, 'call' | 'waitForImage'>, reg: TestRegistry, repo: string, tag: string, spec: ImageSpec): Promise<string> {
  await pushImage(reg, repo, tag, spec);
  const r = await srv.call('POST', '/v1/image/import', { imageUri: `${reg.host}/${repo}:${tag}`, password: reg.password, username: reg.user });
  if (r.status !== 200) throw new Error(`import: ${r.status} ${JSON.stringify(r.body)}`);
  const img = await srv.waitForImage(r.body.imageId);
  if (img.status !== 'ready') throw new Error(`import failed: ${img.error}`);
  return img.imageId;
}

/** Polls GET /v1/vm/{id} until `done` accepts it. */
export async function waitForVm(srv: Caller, id: string, done: (vm: any) => boolean, timeoutMs = 60_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await srv.call('GET', `/v1/vm/${id}`);
    if (r.status !== 200) throw new Error(`GET vm: ${r.status} ${JSON.stringify(r.body)}`);
    if (done(r.body)) return r.body;
    if (Date.now() > deadline) throw new Error(`VM ${id} not done within ${timeoutMs} ms: ${JSON.stringify(r.body)}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

export const isOver = (vm: { state: string }) => vm.state === 'stopped' || vm.state === 'failed';

export async function logLines(srv: Caller, id: string, query = ''): Promise<Array<{ timestamp: number; level: string; message: string }>> {
  const r = await srv.call('GET', `/v1/vm/${id}/logs?batch=1000${query}`);
  if (r.status !== 200) throw new Error(`logs: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body.lines;
}

/** Waits until a log line matching `re` shows up. */
export async function waitForLog(srv: Caller, id: string, re: RegExp, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if ((await logLines(srv, id)).some((l) => re.test(l.message))) return;
    if (Date.now() > deadline) throw new Error(`no log line matching ${re} for ${id}: ${JSON.stringify(await logLines(srv, id))}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}
