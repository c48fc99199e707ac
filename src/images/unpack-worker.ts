import { parentPort } from 'node:worker_threads';
import { applyLayer } from './unpack.js';

/** Worker thread entry: applies layers one message at a time, in the order they arrive. */
parentPort!.on('message', (msg: { id: number; root: string; blobPath: string }) => {
  applyLayer(msg.root, msg.blobPath).then(
    (stats) => parentPort!.postMessage({ id: msg.id, stats }),
    (err: Error) => parentPort!.postMessage({ id: msg.id, error: err.message, unsafe: err.name === 'UnsafeLayerError' }),
  );
});
