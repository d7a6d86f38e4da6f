// warren-guest for AssemblyScript: the guest side of Warren ABI v1 (guest-sdk/ABI.md).
//
// Strings inside AssemblyScript are UTF-16; everything on the wire is UTF-8 JSON text. This
// library converts at the boundary (String.UTF8), so handlers work with ordinary strings.
//
// Your entry file must re-export the ABI marker and export each method as `(): i32`:
//
//   import { args, getKey, output, error } from "warren-guest";
//   export { warren_abi_version } from "warren-guest";
//
//   export function echo(): i32 {
//     const value = getKey(args(), "value");
//     if (value == null) return error("InvalidArgs", "missing field: value");
//     return output(value);
//   }
//
// and be compiled with `--use abort=warren-guest/assembly/index/abort` (or the package's
// asconfig.json), so that AssemblyScript's `abort` logs and traps instead of importing
// `env.abort`, which the host does not provide.

// ---------------------------------------------------------------------------------------------
// The raw ABI: imports from module "warren_v1".

@external("warren_v1", "input_len")
declare function input_len(): i32;
@external("warren_v1", "input_read")
declare function input_read(dst: usize): void;
@external("warren_v1", "context_len")
declare function context_len(): i32;
@external("warren_v1", "context_read")
declare function context_read(dst: usize): void;
@external("warren_v1", "output_write")
declare function output_write(src: usize, len: i32): void;
@external("warren_v1", "error_write")
declare function error_write(src: usize, len: i32): void;
@external("warren_v1", "log")
declare function log_write(level: i32, src: usize, len: i32): void;

/** The ABI version this library implements. */
export const ABI_VERSION: i32 = 1;

/** The ABI marker the host checks at load time: re-export it from your entry file. */
export function warren_abi_version(): i32 {
  return ABI_VERSION;
}

/** Method status: success. */
export const OK: i32 = 0;
/** Method status: failure (what `error` returns). */
export const FAILED: i32 = 1;

/** Log levels (ABI.md: 0 trace .. 4 error). */
export enum Level {
  Trace = 0,
  Debug = 1,
  Info = 2,
  Warn = 3,
  Error = 4,
}

// ---------------------------------------------------------------------------------------------
// Input.

function readUtf8(len: i32, fill: (dst: usize) => void): string {
  if (len <= 0) return "";
  const buf = new ArrayBuffer(len);
  fill(changetype<usize>(buf));
  return String.UTF8.decode(buf);
}

let argsCache: string | null = null;
let contextCache: string | null = null;

/** The args JSON object as text (read once per invocation). */
export function args(): string {
  let cached = argsCache;
  if (cached == null) {
    cached = readUtf8(input_len(), (dst: usize): void => input_read(dst));
    argsCache = cached;
  }
  return cached;
}

/** The request context JSON object as text (`{}` when the request carried none). */
export function context(): string {
  let cached = contextCache;
  if (cached == null) {
    cached = readUtf8(context_len(), (dst: usize): void => context_read(dst));
    contextCache = cached;
  }
  return cached;
}

// ---------------------------------------------------------------------------------------------
// Minimal JSON reading. Values are their raw JSON text; the input is trusted to be valid JSON
// (the host guarantees it for args and context).

/** What kind of JSON value a raw text is. */
export enum JsonType {
  Invalid = 0,
  Null,
  Bool,
  Number,
  String,
  Array,
  Object,
}

function isWs(c: i32): bool {
  return c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d;
}

function skipWs(s: string, i: i32): i32 {
  while (i < s.length && isWs(s.charCodeAt(i))) i++;
  return i;
}

// Index just past the string starting at s[i] == '"', or -1.
function stringEnd(s: string, i: i32): i32 {
  for (i++; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c == 0x5c) i++;
    else if (c == 0x22) return i + 1;
  }
  return -1;
}

// Index just past the value starting at s[i] (after whitespace), or -1.
function valueEnd(s: string, i: i32): i32 {
  i = skipWs(s, i);
  if (i >= s.length) return -1;
  const first = s.charCodeAt(i);
  if (first == 0x22) return stringEnd(s, i);
  if (first == 0x7b || first == 0x5b) {
    let depth = 0;
    for (; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c == 0x22) {
        const end = stringEnd(s, i);
        if (end < 0) return -1;
        i = end - 1;
      } else if (c == 0x7b || c == 0x5b) {
        depth++;
      } else if (c == 0x7d || c == 0x5d) {
        if (--depth == 0) return i + 1;
      }
    }
    return -1;
  }
  const start = i;
  while (i < s.length) {
    const c = s.charCodeAt(i);
    if (c == 0x2c || c == 0x7d || c == 0x5d || isWs(c)) break;
    i++;
  }
  return i > start ? i : -1;
}

/** The kind of the JSON value `raw` (by its first character). */
export function jsonType(raw: string | null): JsonType {
  if (raw == null) return JsonType.Invalid;
  const t = raw.trim();
  if (t.length == 0) return JsonType.Invalid;
  const c = t.charCodeAt(0);
  if (c == 0x6e) return JsonType.Null; // n
  if (c == 0x74 || c == 0x66) return JsonType.Bool; // t f
  if (c == 0x22) return JsonType.String;
  if (c == 0x5b) return JsonType.Array;
  if (c == 0x7b) return JsonType.Object;
  if (c == 0x2d || (c >= 0x30 && c <= 0x39)) return JsonType.Number;
  return JsonType.Invalid;
}

/**
 * The raw JSON text of the value of top-level key `key` in the object `json`, or null if
 * `json` is not an object or has no such key. With duplicate keys the last one wins.
 */
export function getKey(json: string, key: string): string | null {
  let i = skipWs(json, 0);
  if (i >= json.length || json.charCodeAt(i) != 0x7b) return null;
  let found: string | null = null;
  i = skipWs(json, i + 1);
  while (i < json.length && json.charCodeAt(i) == 0x22) {
    const kend = stringEnd(json, i);
    if (kend < 0) break;
    const k = unescape(json.substring(i, kend));
    i = skipWs(json, kend);
    if (i >= json.length || json.charCodeAt(i) != 0x3a) break;
    const vstart = skipWs(json, i + 1);
    const vend = valueEnd(json, vstart);
    if (vend < 0) break;
    if (k != null && k == key) found = json.substring(vstart, vend);
    i = skipWs(json, vend);
    if (i >= json.length || json.charCodeAt(i) != 0x2c) break;
    i = skipWs(json, i + 1);
  }
  return found;
}

/** An integer read by `readInteger`: `ok` is false when the value was not one. */
export class JsonInt {
  constructor(public ok: bool, public value: i64) {}
}

/**
 * Read `raw` as an integer: ok only for a JSON number without fraction or exponent that fits
 * in i64 (`3` yes; `3.0`, `1e3`, `"3"`, `true` no).
 */
export function readInteger(raw: string | null): JsonInt {
  if (raw == null) return new JsonInt(false, 0);
  const t = raw.trim();
  let i = 0;
  let neg = false;
  if (i < t.length && t.charCodeAt(i) == 0x2d) {
    neg = true;
    i++;
  }
  if (i >= t.length) return new JsonInt(false, 0);
  let mag: u64 = 0;
  const limit: u64 = neg ? (<u64>i64.MAX_VALUE) + 1 : <u64>i64.MAX_VALUE;
  for (; i < t.length; i++) {
    const c = t.charCodeAt(i);
    if (c < 0x30 || c > 0x39) return new JsonInt(false, 0);
    const d = <u64>(c - 0x30);
    if (mag > (limit - d) / 10) return new JsonInt(false, 0);
    mag = mag * 10 + d;
  }
  return new JsonInt(true, neg ? <i64>(0 - mag) : <i64>mag);
}

function hex4(s: string, i: i32): i32 {
  if (i + 4 > s.length) return -1;
  let v = 0;
  for (let k = 0; k < 4; k++) {
    const c = s.charCodeAt(i + k);
    v <<= 4;
    if (c >= 0x30 && c <= 0x39) v |= c - 0x30;
    else if (c >= 0x61 && c <= 0x66) v |= c - 0x61 + 10;
    else if (c >= 0x41 && c <= 0x46) v |= c - 0x41 + 10;
    else return -1;
  }
  return v;
}

/**
 * Decode the JSON string `raw` (quotes included) to a string, or null if it is not a JSON
 * string.
 */
export function unescape(raw: string | null): string | null {
  if (raw == null) return null;
  const s = raw.trim();
  if (s.length < 2 || s.charCodeAt(0) != 0x22 || s.charCodeAt(s.length - 1) != 0x22) return null;
  const end = s.length - 1;
  // Fast path: nothing escaped.
  if (s.indexOf("\\") < 0) return s.substring(1, end);
  const parts = new Array<string>();
  let run = 1;
  let i = 1;
  while (i < end) {
    if (s.charCodeAt(i) != 0x5c) {
      i++;
      continue;
    }
    if (i > run) parts.push(s.substring(run, i));
    if (i + 1 >= end) return null;
    const e = s.charCodeAt(i + 1);
    i += 2;
    if (e == 0x22) parts.push('"');
    else if (e == 0x5c) parts.push("\\");
    else if (e == 0x2f) parts.push("/");
    else if (e == 0x62) parts.push("\b");
    else if (e == 0x66) parts.push("\f");
    else if (e == 0x6e) parts.push("\n");
    else if (e == 0x72) parts.push("\r");
    else if (e == 0x74) parts.push("\t");
    else if (e == 0x75) {
      // A UTF-16 code unit: AssemblyScript strings are UTF-16, so surrogate pairs simply join.
      const cu = hex4(s, i);
      if (cu < 0) return null;
      parts.push(String.fromCharCode(cu));
      i += 4;
    } else return null;
    run = i;
  }
  if (end > run) parts.push(s.substring(run, end));
  return parts.join("");
}

/** Read `raw` as a string value (decoded), or null if it is not a JSON string. */
export function readString(raw: string | null): string | null {
  return unescape(raw);
}

// ---------------------------------------------------------------------------------------------
// Minimal JSON writing.

const HEX = "0123456789abcdef";

/** `s` as a JSON string literal, quotes included. */
export function quote(s: string): string {
  const parts = new Array<string>();
  parts.push('"');
  let run = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let esc: string | null = null;
    if (c == 0x22) esc = '\\"';
    else if (c == 0x5c) esc = "\\\\";
    else if (c == 0x0a) esc = "\\n";
    else if (c == 0x0d) esc = "\\r";
    else if (c == 0x09) esc = "\\t";
    else if (c == 0x08) esc = "\\b";
    else if (c == 0x0c) esc = "\\f";
    else if (c < 0x20) esc = "\\u00" + HEX.charAt(c >> 4) + HEX.charAt(c & 15);
    if (esc != null) {
      if (i > run) parts.push(s.substring(run, i));
      parts.push(esc);
      run = i + 1;
    }
  }
  if (s.length > run) parts.push(s.substring(run));
  parts.push('"');
  return parts.join("");
}

// ---------------------------------------------------------------------------------------------
// Results, errors, logs.

function withUtf8(text: string, f: (ptr: usize, len: i32) => void): void {
  const buf = String.UTF8.encode(text);
  f(changetype<usize>(buf), buf.byteLength);
}

/**
 * Emit one result: `json` is JSON text. Call it several times to stream several results; a
 * method that emits none returns null. Returns OK.
 */
export function output(json: string): i32 {
  withUtf8(json, (ptr: usize, len: i32): void => output_write(ptr, len));
  return OK;
}

/** Emit an integer result. */
export function outputInt(v: i64): i32 {
  return output(v.toString());
}

/** Emit a string result (JSON-escaped for you). */
export function outputString(s: string): i32 {
  return output(quote(s));
}

/**
 * Set the structured error `{"class", "message", "data"}` and return FAILED, so a method can
 * `return error(...)`. `data` is raw JSON text, or null for none.
 */
export function error(cls: string, message: string, data: string | null = null): i32 {
  let json = '{"class":' + quote(cls) + ',"message":' + quote(message);
  if (data != null) json += ',"data":' + data;
  json += "}";
  withUtf8(json, (ptr: usize, len: i32): void => error_write(ptr, len));
  return FAILED;
}

/** Log a line at `level`. */
export function log(level: Level, message: string): void {
  const buf = String.UTF8.encode(message);
  log_write(<i32>level, changetype<usize>(buf), buf.byteLength);
}

export function logInfo(message: string): void {
  log(Level.Info, message);
}

export function logWarn(message: string): void {
  log(Level.Warn, message);
}

export function logError(message: string): void {
  log(Level.Error, message);
}

/**
 * AssemblyScript's abort handler for `--use abort=warren-guest/assembly/index/abort`: logs the
 * message and location at error level, then traps (the caller sees GuestTrap).
 */
export function abort(
  message: string | null,
  fileName: string | null,
  line: u32,
  column: u32,
): void {
  const msg = message != null ? message : "abort";
  const file = fileName != null ? fileName : "?";
  log(Level.Error, msg + " at " + file + ":" + line.toString() + ":" + column.toString());
  unreachable();
}
