"""Warren example handler in Python: the polyglot contract (plugins/polyglot.md) as a
WebAssembly component, built with componentize-py against guest-sdk/wit (see build.sh)."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Error, Level


def _dumps(value):
    # Compact, like the other languages, so every hello-<lang> gives byte-identical replies.
    return json.dumps(value, separators=(",", ":"))


def _error(cls, message, data=None):
    return Err(Error(cls, message, None if data is None else _dumps(data)))


def _echo(args, context):
    if "value" not in args:
        raise _error("InvalidArgs", "missing field: value")
    return _dumps(args["value"])


def _fail(args, context):
    message = args.get("message")
    if not isinstance(message, str):
        message = "failed"
    raise _error("PluginError", message, {"code": 42})


def _count(args, context):
    n = args.get("n")
    # bool is an int in Python; JSON true is not a count.
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 1000:
        raise _error("InvalidArgs", "n must be an integer from 0 to 1000")
    host.log(Level.INFO, f"counting to {n}")
    for i in range(1, n + 1):
        host.emit(_dumps(i))
    return None


def _whoami(args, context):
    return _dumps(context.get("user_id"))


METHODS = {"count": _count, "echo": _echo, "fail": _fail, "whoami": _whoami}


class Handler(exports.Handler):
    def methods(self):
        return sorted(METHODS)

    def call(self, method, args, context):
        fn = METHODS.get(method)
        if fn is None:
            raise _error("NoSuchMethod", f"no method '{method}'")
        return fn(json.loads(args), json.loads(context))
