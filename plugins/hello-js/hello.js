// Warren example handler in JavaScript: the polyglot contract (plugins/polyglot.md) as a
// WebAssembly component, built with componentize-js against guest-sdk/wit (see build.mjs).
import { emit, log } from 'warren:handler/host@1.0.0';

// A thrown value becomes the `err` of `call`'s result: an `error` record of the WIT world.
function error(cls, message, data) {
  return { class: cls, message, data: data === undefined ? undefined : JSON.stringify(data) };
}

const METHODS = {
  echo(args) {
    if (!Object.hasOwn(args, 'value')) throw error('InvalidArgs', 'missing field: value');
    return JSON.stringify(args.value);
  },
  fail(args) {
    const message = typeof args.message === 'string' ? args.message : 'failed';
    throw error('PluginError', message, { code: 42 });
  },
  count(args) {
    const n = args.n;
    if (!Number.isInteger(n) || n < 0 || n > 1000) {
      throw error('InvalidArgs', 'n must be an integer from 0 to 1000');
    }
    log('info', `counting to ${n}`);
    for (let i = 1; i <= n; i++) emit(JSON.stringify(i));
    return undefined;
  },
  whoami(args, context) {
    return JSON.stringify(context.user_id ?? null);
  },
};

export const handler = {
  methods() {
    return Object.keys(METHODS).sort();
  },
  call(method, args, context) {
    if (!Object.hasOwn(METHODS, method)) throw error('NoSuchMethod', `no method '${method}'`);
    return METHODS[method](JSON.parse(args), JSON.parse(context));
  },
};
