import { EventEmitter } from 'node:events';
import type { LogLevel, LogLine, LogQuery, Store } from '../store/store.js';

const FLUSH_MS = 50;
const FLUSH_LINES = 500;

/**
 * Durable log lines (SQLite) for VMs and builds, with live followers. Appends are batched into one
 * transaction every 50 ms, so a chatty workload costs one write per batch, not per line.
 */
export class LogService {
  private pending: Array<{ ownerId: string; ts: number; level: LogLevel; message: string }> = [];
  private timer: NodeJS.Timeout | null = null;
  private readonly bus = new EventEmitter();

  private readonly pruneTimer: NodeJS.Timeout | null = null;

  /** `retentionDays`: lines older than that are deleted, at start and then hourly (0 keeps all). */
  constructor(
    private readonly store: Store,
    private readonly retentionDays = 0,
  ) {
    this.bus.setMaxListeners(0);
    if (retentionDays > 0) {
      this.prune();
      this.pruneTimer = setInterval(() => this.prune(), 3_600_000);
      this.pruneTimer.unref();
    }
  }

  prune(now = Date.now()): number {
    return this.retentionDays > 0 ? this.store.deleteLogsBefore(now - this.retentionDays * 86_400_000) : 0;
  }

  close(): void {
    if (this.pruneTimer) clearInterval(this.pruneTimer);
    this.flush();
  }

  append(ownerId: string, level: LogLevel, message: string, ts = Date.now()): void {
    this.pending.push({ ownerId, ts, level, message });
    if (this.pending.length >= FLUSH_LINES) this.flush();
    else this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  /** Writes buffered lines now; callers that must see their lines in a query call this first. */
  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.pending.length === 0) return;
    const batch = this.pending;
    this.pending = [];
    const ids = this.store.appendLogs(batch);
    batch.forEach((l, i) => this.bus.emit(l.ownerId, { id: ids[i]!, ts: l.ts, level: l.level, message: l.message } satisfies LogLine));
  }

  query(ownerId: string, q: LogQuery): LogLine[] {
    this.flush();
    return this.store.queryLogs(ownerId, q);
  }

  /** Calls `onLine` for every line appended from now on; returns the unsubscribe function. */
  subscribe(ownerId: string, onLine: (l: LogLine) => void): () => void {
    this.bus.on(ownerId, onLine);
    return () => this.bus.off(ownerId, onLine);
  }

  /** Announces that no more lines will come for an owner (a VM stopped), ending follow streams. */
  end(ownerId: string): void {
    this.flush();
    this.bus.emit(`${ownerId}:end`);
  }

  onEnd(ownerId: string, cb: () => void): () => void {
    this.bus.once(`${ownerId}:end`, cb);
    return () => this.bus.off(`${ownerId}:end`, cb);
  }
}

const MAX_LINE = 16 * 1024;
const PARTIAL_FLUSH_MS = 200;

/** Cuts a byte stream into lines; a partial line is emitted after a short pause or at 16 KiB. */
export class LineSplitter {
  private buf = '';
  private timer: NodeJS.Timeout | null = null;
  private readonly decoder = new TextDecoder();

  constructor(private readonly emit: (line: string) => void) {}

  push(chunk: Buffer): void {
    this.buf += this.decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      this.emit(this.buf.slice(0, nl).replace(/\r$/, ''));
      this.buf = this.buf.slice(nl + 1);
    }
    while (this.buf.length >= MAX_LINE) {
      this.emit(this.buf.slice(0, MAX_LINE));
      this.buf = this.buf.slice(MAX_LINE);
    }
    if (this.timer) clearTimeout(this.timer);
    this.timer = this.buf ? setTimeout(() => this.end(), PARTIAL_FLUSH_MS) : null;
  }

  end(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.buf) this.emit(this.buf);
    this.buf = '';
  }
}
