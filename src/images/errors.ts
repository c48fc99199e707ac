/** A failure whose message is written for the user: it becomes the image's `error` as is. */
export class ImportError extends Error {
  override name = 'ImportError';
}
