import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { applyLayer } from '../src/images/unpack.js';
import { compressLayer, makeTar, type Compression, type TarEntry } from './helpers/registry.js';

// Layers are applied onto a real directory, exactly as an import does (in its worker thread).

const base = fs.mkdtempSync(path.join(os.tmpdir(), 'cw-unpack-'));
after(() => fs.rmSync(base, { recursive: true, force: true }));

let n = 0;
function newRoot(): string {
  const root = path.join(base, `case${n++}`, 'rootfs');
  fs.mkdirSync(root, { recursive: true });
  return root;
}

async function layer(entries: TarEntry[], compression: Compression = 'gzip'): Promise<string> {
  const file = path.join(base, `layer-${crypto.randomBytes(6).toString('hex')}`);
  fs.writeFileSync(file, compressLayer(await makeTar(entries), compression, 'oci').blob);
  return file;
}

const exists = (p: string) => fs.existsSync(p) || (() => { try { fs.lstatSync(p); return true; } catch { return false; } })();

test('whiteouts hide lower-layer files; an opaque whiteout empties the directory below', async () => {
  const root = newRoot();
  await applyLayer(root, await layer([
    { name: 'a/', type: 'directory' }, { name: 'a/x', content: 'x' }, { name: 'a/y', content: 'y' },
    { name: 'b/', type: 'directory' }, { name: 'b/old', content: 'old' }, { name: 'b/sub/', type: 'directory' }, { name: 'b/sub/deep', content: 'd' },
    { name: 'c/keep', content: 'keep' },
  ]));
  await applyLayer(root, await layer([
    { name: 'a/.wh.x' },
    { name: 'b/new', content: 'new' },
    { name: 'b/.wh..wh..opq' },
    { name: 'c/.wh.missing' },
  ], 'zstd'));
  assert.ok(!exists(path.join(root, 'a/x')), 'a/x is whited out');
  assert.equal(fs.readFileSync(path.join(root, 'a/y'), 'utf8'), 'y');
  assert.deepEqual(fs.readdirSync(path.join(root, 'b')), ['new'], 'opaque dir keeps only this layer\'s entries');
  assert.equal(fs.readFileSync(path.join(root, 'c/keep'), 'utf8'), 'keep');
  assert.ok(!exists(path.join(root, 'a/.wh.x')), 'whiteout markers are not files in the result');
});

test('an entry with ".." is refused and nothing is written outside the root', async () => {
  const root = newRoot();
  const victim = path.join(path.dirname(root), `escaped-${crypto.randomBytes(4).toString('hex')}`);
  const rel = path.relative(root, victim);
  assert.ok(rel.startsWith('..'));
  await assert.rejects(applyLayer(root, await layer([{ name: 'ok', content: '1' }, { name: rel, content: 'pwned' }])), /contains "\.\."/);
  assert.ok(!exists(victim));
  const hl = await layer([{ name: 'etc/', type: 'directory' }, { name: 'etc/hl', type: 'link', linkname: '../../../../etc/passwd' }]);
  await assert.rejects(applyLayer(newRoot(), hl), /contains "\.\."/);
});

test('absolute names and symlinks are resolved inside the root', async () => {
  const root = newRoot();
  const marker = `cw-escape-${crypto.randomBytes(4).toString('hex')}`;
  await applyLayer(root, await layer([
    { name: '/etc/abs', content: 'abs' },
    { name: 'evil', type: 'symlink', linkname: '/' },
    { name: 'up', type: 'symlink', linkname: '../../../../../..' },
    { name: 'tmp/', type: 'directory' },
  ]));
  await applyLayer(root, await layer([
    { name: `evil/tmp/${marker}`, content: 'through absolute symlink' },
    { name: `up/${marker}`, content: 'through relative symlink' },
  ]));
  assert.equal(fs.readFileSync(path.join(root, 'etc/abs'), 'utf8'), 'abs');
  assert.ok(!exists(path.join('/tmp', marker)), 'nothing written to the host /tmp');
  assert.ok(!exists(path.join(path.dirname(root), marker)));
  assert.equal(fs.readFileSync(path.join(root, 'tmp', marker), 'utf8'), 'through absolute symlink');
  assert.equal(fs.readFileSync(path.join(root, marker), 'utf8'), 'through relative symlink');
});

test('a file entry replaces a symlink instead of writing through it', async () => {
  const root = newRoot();
  const outside = path.join(path.dirname(root), 'outside.txt');
  fs.writeFileSync(outside, 'original');
  await applyLayer(root, await layer([{ name: 'link', type: 'symlink', linkname: outside }]));
  await applyLayer(root, await layer([{ name: 'link', content: 'replaced' }]));
  assert.equal(fs.readFileSync(outside, 'utf8'), 'original');
  assert.ok(fs.lstatSync(path.join(root, 'link')).isFile());
});

test('merged /usr: a later layer writes through lib -> usr/lib', async () => {
  const root = newRoot();
  await applyLayer(root, await layer([{ name: 'usr/lib/', type: 'directory' }, { name: 'lib', type: 'symlink', linkname: 'usr/lib' }], 'none'));
  await applyLayer(root, await layer([{ name: 'lib/libx.so', content: 'elf' }]));
  assert.equal(fs.readFileSync(path.join(root, 'usr/lib/libx.so'), 'utf8'), 'elf');
  assert.ok(fs.lstatSync(path.join(root, 'lib')).isSymbolicLink());
});

test('hard links, modes, ownership and device nodes', async () => {
  const root = newRoot();
  const stats = await applyLayer(root, await layer([
    { name: 'bin/tool', content: '#!/bin/sh\n', mode: 0o4755, uid: 1000, gid: 1001 },
    { name: 'bin/alias', type: 'link', linkname: 'bin/tool' },
    { name: 'dev/', type: 'directory' },
    { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 },
    { name: 'run/fifo', type: 'fifo' },
  ]));
  assert.equal(stats.entries, 5);
  const tool = fs.statSync(path.join(root, 'bin/tool'));
  assert.equal(fs.statSync(path.join(root, 'bin/alias')).ino, tool.ino);
  assert.ok(fs.statSync(path.join(root, 'run/fifo')).isFIFO());
  if (process.getuid?.() === 0) {
    assert.equal(tool.mode & 0o7777, 0o4755, 'setuid survives chown');
    assert.equal(tool.uid, 1000);
    assert.equal(tool.gid, 1001);
    const dev = fs.statSync(path.join(root, 'dev/null'));
    assert.ok(dev.isCharacterDevice());
    assert.equal(dev.rdev, (1 << 8) | 3);
  } else {
    console.log('# not root: ownership and device-node checks skipped (they need CAP_CHOWN and CAP_MKNOD)');
  }
  const dangling = await layer([{ name: 'x', type: 'link', linkname: 'does/not/exist' }]);
  await assert.rejects(applyLayer(newRoot(), dangling), /not a file in the image/);
});

test('a corrupt layer fails with the decompressor error', async () => {
  const file = path.join(base, 'corrupt');
  fs.writeFileSync(file, Buffer.concat([Buffer.from([0x1f, 0x8b, 8, 0]), crypto.randomBytes(4096)]));
  await assert.rejects(applyLayer(newRoot(), file));
  const zfile = path.join(base, 'corrupt.zst');
  fs.writeFileSync(zfile, Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), crypto.randomBytes(4096)]));
  await assert.rejects(applyLayer(newRoot(), zfile), /zstd/);
});
