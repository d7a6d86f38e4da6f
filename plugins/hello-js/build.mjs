// Build the JavaScript example component: hello.js -> argv[2] (default hello-js.wasm).
// Uses componentize-js's JS API (pinned in package.json; `npm ci` installs it): the engine is
// SpiderMonkey, pre-initialised with wizer, so the component is ~12 MB.
import { writeFile, rename } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, resolve } from 'node:path';
import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? resolve(here, 'hello-js.wasm'));

const { component } = await componentize({
  sourcePath: resolve(here, 'hello.js'),
  witPath: resolve(here, '../../guest-sdk/wit'),
  worldName: 'handler-world',
  // No fetch(): handlers reach nothing outside their sandbox, and the host links no wasi:http.
  disableFeatures: ['http', 'fetch-event'],
});
const tmp = `${out}.tmp${process.pid}`;
await writeFile(tmp, component);
await rename(tmp, out);
console.log(`hello-js: ${out} (${component.length} bytes)`);
