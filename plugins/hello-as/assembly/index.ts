// hello-as: the polyglot contract (../../polyglot.md) in AssemblyScript, on warren-guest.
import {
  args,
  context,
  error,
  getKey,
  jsonType,
  JsonType,
  logInfo,
  output,
  outputInt,
  readInteger,
  readString,
  OK,
} from "warren-guest";

// The ABI marker: without it the host refuses the module.
export { warren_abi_version } from "warren-guest";

const COUNT_RANGE = "n must be an integer from 0 to 1000";

// echo {"value": V} -> V, the value's JSON text as it arrived.
export function echo(): i32 {
  const value = getKey(args(), "value");
  if (value == null) return error("InvalidArgs", "missing field: value");
  return output(value);
}

// fail {"message": M} -> error PluginError M (default "failed") with data {"code": 42}.
export function fail(): i32 {
  const message = readString(getKey(args(), "message"));
  return error("PluginError", message != null ? message : "failed", '{"code":42}');
}

// count {"n": N} -> streams 1..N (0 <= N <= 1000), logging "counting to N" at info.
export function count(): i32 {
  const n = readInteger(getKey(args(), "n"));
  if (!n.ok || n.value < 0 || n.value > 1000) return error("InvalidArgs", COUNT_RANGE);
  logInfo("counting to " + n.value.toString());
  for (let i: i64 = 1; i <= n.value; i++) outputInt(i);
  return OK;
}

// whoami -> the context's user_id (a string), else null.
export function whoami(): i32 {
  const user = getKey(context(), "user_id");
  if (user != null && jsonType(user) == JsonType.String) return output(user);
  return output("null");
}
