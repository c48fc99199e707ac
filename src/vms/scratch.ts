import fs from 'node:fs';
import { run } from '../util/exec.js';

/**
 * The overlay's writable disk of one VM: a sparse ext4 file (no journal, since it is discarded with
 * the VM). Making it costs ~15 ms whatever its size; writes beyond guest RAM land here.
 */
export async function makeScratchDisk(file: string, gb: number): Promise<void> {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, gb * 1024 ** 3);
  await run('mkfs.ext4', ['-q', '-F', '-m', '0', '-O', '^has_journal', '-E', 'lazy_itable_init=1,lazy_journal_init=1', file], { timeoutMs: 60_000 });
}
