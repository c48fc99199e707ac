import { parseArgs } from 'node:util';
import { createKey } from './accounts/keys.js';
import { openStore } from './app.js';
import { loadConfig } from './config.js';

const usage = `usage: cakework keys create [--name NAME] [--account ACCOUNT_ID]
       cakework keys list
       cakework keys revoke KEY_ID

Works on the data directory in CAKEWORK_DATA_DIR (default ./data), the same store the server uses.
"create" makes a new account unless --account names an existing one, and prints the key once.`;

function fail(message: string): never {
  process.stderr.write(`cakework: ${message}\n${usage}\n`);
  process.exit(2);
}

const [group, command, ...rest] = process.argv.slice(2);
if (group !== 'keys' || !command) fail('unknown command');

const store = openStore(loadConfig());
try {
  if (command === 'create') {
    const { values } = parseArgs({
      args: rest,
      options: { name: { type: 'string' }, account: { type: 'string' } },
      strict: true,
    });
    if (values.name !== undefined && (values.name.length < 1 || values.name.length > 100)) fail('--name must be 1-100 characters');
    const { key, record } = createKey(store, { name: values.name, accountId: values.account });
    process.stdout.write(`${key}\n`);
    process.stderr.write(`created key ${record.id} for account ${record.accountId}; store the key now, it is not shown again\n`);
  } else if (command === 'list') {
    const rows = store.listKeys();
    process.stdout.write('ID\tACCOUNT\tNAME\tPREFIX\tCREATED\tREVOKED\n');
    for (const k of rows) {
      process.stdout.write(
        [k.id, k.accountId, k.name, `${k.prefix}…`, new Date(k.createdAt).toISOString(), k.revokedAt ? new Date(k.revokedAt).toISOString() : '-'].join('\t') + '\n',
      );
    }
  } else if (command === 'revoke') {
    const id = rest[0];
    if (!id || rest.length > 1) fail('revoke takes exactly one key id');
    if (!store.revokeKey(id)) fail(`no key with id ${id}`);
    process.stderr.write(`revoked key ${id}\n`);
  } else {
    fail(`unknown keys command "${command}"`);
  }
} catch (err) {
  fail((err as Error).message);
} finally {
  store.close();
}
