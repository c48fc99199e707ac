import http from 'node:http';
import net from 'node:net';
import type { Duplex } from 'node:stream';

/**
 * The endpoint proxy: requests whose Host is `<vmId>.<domain>` go to that VM's app port, with
 * keep-alive upstream connections, bodies streamed both ways and WebSocket (any Upgrade) tunnelled.
 * Hand-written on node:http because the job is small and the maintained proxy libraries add
 * routing layers we do not need; errors answer with a clear JSON body instead of hanging.
 */

export type Route = { host: string; port: number } | { state: string } | null;

export interface ProxyOptions {
  domain: string;
  /** where a VM's traffic goes, why it cannot, or null for an unknown VM (async: a cached VM may be woken) */
  route(vmId: string): Route | Promise<Route>;
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade'];

export class EndpointProxy {
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 10_000 });
  private readonly suffix: string;

  constructor(private readonly opts: ProxyOptions) {
    this.suffix = `.${opts.domain.toLowerCase()}`;
  }

  /** The VM id a Host header names, or null when the request is for the API itself. */
  vmIdOf(hostHeader: string | undefined): string | null {
    if (!hostHeader) return null;
    const host = hostHeader.toLowerCase().replace(/:\d+$/, '');
    if (!host.endsWith(this.suffix)) return null;
    const label = host.slice(0, -this.suffix.length);
    return /^[a-z0-9]{1,63}$/.test(label) ? label : null;
  }

  private refuse(vmId: string, route: Route): { status: number; body: string } {
    if (!route) return { status: 404, body: JSON.stringify({ error: { code: 'not_found', message: `no VM ${vmId} on this server` } }) };
    const state = 'state' in route ? route.state : 'started';
    return { status: 502, body: JSON.stringify({ error: { code: 'vm_not_running', message: `VM ${vmId} is not running (state ${state})` } }) };
  }

  handle(req: http.IncomingMessage, res: http.ServerResponse, vmId: string): void {
    const r = this.opts.route(vmId);
    if (r instanceof Promise) {
      req.pause(); // keep the body until the VM is up
      r.then(
        (route) => this.forward(req, res, vmId, route),
        (err: Error) => res.writeHead(502, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { code: 'bad_gateway', message: `VM ${vmId} could not be started: ${err.message}` } })),
      );
    } else {
      this.forward(req, res, vmId, r);
    }
  }

  private forward(req: http.IncomingMessage, res: http.ServerResponse, vmId: string, route: Route): void {
    if (!route || !('host' in route)) {
      const r = this.refuse(vmId, route);
      res.writeHead(r.status, { 'content-type': 'application/json' }).end(r.body);
      return;
    }
    const headers = { ...req.headers };
    for (const h of HOP_BY_HOP) delete headers[h];
    headers['x-forwarded-for'] = req.socket.remoteAddress ?? '';
    headers['x-forwarded-host'] = req.headers.host ?? '';
    headers['x-forwarded-proto'] = 'http';
    const upstream = http.request(
      { host: route.host, port: route.port, method: req.method, path: req.url, headers, agent: this.agent },
      (up) => {
        const out = { ...up.headers };
        for (const h of HOP_BY_HOP) delete out[h];
        res.writeHead(up.statusCode ?? 502, up.statusMessage, out);
        up.pipe(res);
        up.on('error', () => res.destroy());
      },
    );
    upstream.setTimeout(300_000, () => upstream.destroy(new Error('upstream timeout')));
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      if (res.headersSent) {
        res.destroy();
        return;
      }
      const notListening = err.code === 'ECONNREFUSED' || err.code === 'ECONNRESET' || err.code === 'EHOSTUNREACH';
      const message = notListening
        ? `the app in VM ${vmId} is not listening on port ${route.port} yet`
        : `cannot reach the app in VM ${vmId}: ${err.message}`;
      res.writeHead(502, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { code: 'bad_gateway', message } }));
    });
    req.pipe(upstream);
    res.on('close', () => {
      if (!res.writableFinished) upstream.destroy();
    });
  }

  /** Tunnels an Upgrade request (WebSocket) as raw bytes once the app accepts the connection. */
  upgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer, vmId: string): void {
    const r = this.opts.route(vmId);
    if (r instanceof Promise) {
      socket.pause();
      r.then(
        (route) => this.tunnel(req, socket, head, vmId, route),
        () => socket.destroy(),
      );
    } else {
      this.tunnel(req, socket, head, vmId, r);
    }
  }

  private tunnel(req: http.IncomingMessage, socket: Duplex, head: Buffer, vmId: string, route: Route): void {
    socket.resume();
    if (!route || !('host' in route)) {
      const r = this.refuse(vmId, route);
      socket.end(`HTTP/1.1 ${r.status} ${http.STATUS_CODES[r.status]}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(r.body)}\r\nconnection: close\r\n\r\n${r.body}`);
      return;
    }
    const upstream = net.connect({ host: route.host, port: route.port });
    upstream.once('connect', () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstream.write(lines.join('\r\n') + '\r\n\r\n');
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.on('error', () => {
      if (upstream.bytesRead === 0 && socket.writable) {
        const body = JSON.stringify({ error: { code: 'bad_gateway', message: `the app in VM ${vmId} is not listening on port ${route.port} yet` } });
        socket.end(`HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
      } else socket.destroy();
    });
    socket.on('error', () => upstream.destroy());
    socket.on('close', () => upstream.destroy());
    upstream.on('close', () => socket.destroy());
  }

  close(): void {
    this.agent.destroy();
  }
}
