import net from 'node:net';

/**
 * A minimal QMP client (JSON lines over a unix socket): capabilities negotiation, commands matched to
 * replies by id, and events. Hand-written because no maintained Node QMP library exists; the protocol
 * is a few lines of JSON.
 */
export class Qmp {
  private buf = '';
  private nextId = 0;
  private readonly pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closed = false;
  onEvent: (event: string, data: unknown) => void = () => {};
  onClose: () => void = () => {};

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('close', () => {
      this.closed = true;
      this.greetingWaiter?.(false);
      for (const p of this.pending.values()) p.reject(new Error('QMP connection closed'));
      this.pending.clear();
      this.onClose();
    });
    sock.on('error', () => undefined);
  }

  /** Connects, retrying while QEMU has not created the socket yet, and negotiates capabilities. */
  static async connect(path: string, timeoutMs: number): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new Qmp(sock);
        await qmp.greeting(deadline - Date.now());
        await qmp.execute('qmp_capabilities');
        return qmp;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`QMP socket ${path} not ready: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 5));
      }
    }
  }

  private greetingWaiter: ((ok: boolean) => void) | null = null;

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no QMP greeting')), Math.max(timeoutMs, 100));
      this.greetingWaiter = (ok) => {
        clearTimeout(timer);
        if (ok) resolve();
        else reject(new Error('QMP closed before its greeting'));
      };
    });
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if ('QMP' in msg) {
        this.greetingWaiter?.(true);
        this.greetingWaiter = null;
      } else if ('event' in msg) {
        this.onEvent(String(msg.event), msg.data);
      } else if ('id' in msg) {
        const p = this.pending.get(String(msg.id));
        if (!p) continue;
        this.pending.delete(String(msg.id));
        if ('error' in msg) {
          const e = msg.error as { class?: string; desc?: string };
          p.reject(new Error(`QMP error ${e.class ?? ''}: ${e.desc ?? ''}`));
        } else {
          p.resolve(msg.return);
        }
      }
    }
  }

  execute(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
    if (this.closed) return Promise.reject(new Error('QMP connection closed'));
    const id = String(this.nextId++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.sock.write(JSON.stringify({ execute: command, arguments: args, id }) + '\n');
    });
  }

  close(): void {
    this.sock.destroy();
  }
}
