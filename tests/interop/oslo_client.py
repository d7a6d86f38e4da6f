#!/usr/bin/env python3
"""A real oslo.messaging client for Warren's interop tests; prints one JSON object per line.

    oslo_client.py [--url URL] [--exchange openstack] [--retry 3] [--allowed-exmod MODULE]...
                   [--debug] COMMAND ...
      call TOPIC METHOD ARGS_JSON [--server S] [--timeout SECS] [--context JSON]
      cast TOPIC METHOD ARGS_JSON [--server S] [--fanout] [--context JSON]
      notify EVENT_TYPE PAYLOAD_JSON [--priority info] [--topic notifications]
                                     [--publisher-id ID] [--context JSON]
      listen-notifications [--topic notifications] [--count N] [--timeout SECS] [--pool NAME]

Exit code 0 when the command ran (a remote error or timeout is reported in the JSON),
1 when the message could not be delivered/connection failed, 2 for usage errors.
"""
import argparse
import json
import logging
import queue
import sys
import time
import warnings

warnings.filterwarnings("ignore")  # eventlet/debtcollector deprecation noise on stderr

import kombu  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_context.context import RequestContext  # noqa: E402
import oslo_messaging  # noqa: E402

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


def out(obj):
    print(json.dumps(obj), flush=True)


def json_arg(text):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}")


def probe_broker(url, retries):
    """Fail fast if the broker is unreachable: oslo itself reconnects forever (reply queue)."""
    kurl = "amqp://" + url.split("://", 1)[1].split("?", 1)[0]
    with kombu.Connection(kurl, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=retries, interval_start=0.5, interval_step=0.5)


def exc_json(exc):
    return {"ok": False, "exc_type": type(exc).__name__, "exc_module": type(exc).__module__,
            "message": str(exc), "remote_exc_type": getattr(exc, "exc_type", None),
            "value": getattr(exc, "value", None)}


def rpc_client(transport, a, fanout=False):
    target = oslo_messaging.Target(topic=a.topic, server=a.server, fanout=fanout or None)
    return oslo_messaging.get_rpc_client(transport, target, timeout=getattr(a, "timeout", None),
                                         retry=a.retry)


def cmd_call(transport, a):
    client = rpc_client(transport, a)
    try:
        result = client.call(a.context, a.method, **a.args)
    except (oslo_messaging.MessageDeliveryFailure, oslo_messaging.InvalidTarget):
        raise
    except Exception as exc:  # remote errors, MessagingTimeout, ...
        out(exc_json(exc))
    else:
        out({"ok": True, "result": result})


def cmd_cast(transport, a):
    rpc_client(transport, a, fanout=a.fanout).cast(a.context, a.method, **a.args)
    out({"ok": True})


def cmd_notify(transport, a):
    notifier = oslo_messaging.Notifier(transport, publisher_id=a.publisher_id,
                                       driver="messagingv2", topics=[a.topic], retry=a.retry)
    # oslo drops plain-dict contexts from notifications; a RequestContext is sent redacted
    ctxt = RequestContext.from_dict(a.context) if a.context else None
    getattr(notifier, a.priority)(ctxt, a.event_type, a.payload)
    out({"ok": True})


class NotificationEndpoint:
    def __init__(self, sink):
        for prio in PRIORITIES:
            setattr(self, prio, self._make(prio, sink))

    @staticmethod
    def _make(prio, sink):
        def handler(ctxt, publisher_id, event_type, payload, metadata):
            sink.put({"event_type": event_type, "payload": payload, "priority": prio.upper(),
                      "publisher_id": publisher_id, "metadata": metadata, "context": ctxt})
        return handler


def cmd_listen(transport, a):
    sink = queue.Queue()
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(topic=a.topic)], [NotificationEndpoint(sink)],
        pool=a.pool)
    listener.start()  # queue <topic>.<priority> declared and bound from here on
    out({"ready": True})
    got, deadline = 0, time.monotonic() + a.timeout
    try:
        while got < a.count:
            item = sink.get(timeout=max(0.0, deadline - time.monotonic()))
            out(item)
            got += 1
    except queue.Empty:
        pass
    listener.stop()
    listener.wait()
    out({"done": True, "received": got, "expected": a.count, "timed_out": got < a.count})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="rabbit://guest:guest@127.0.0.1:5672/")
    p.add_argument("--exchange", default="openstack", help="control_exchange")
    p.add_argument("--retry", type=int, default=3, help="connection retries before giving up")
    p.add_argument("--allowed-exmod", action="append", default=[], metavar="MODULE",
                   help="extra module whose remote exceptions are re-created (repeatable)")
    p.add_argument("--debug", action="store_true", help="oslo/kombu debug logs on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def rpc_parser(name, fn):
        s = sub.add_parser(name)
        s.add_argument("topic")
        s.add_argument("method")
        s.add_argument("args", type=json_arg, help="JSON object of keyword arguments")
        s.add_argument("--server")
        s.add_argument("--context", type=json_arg, default={})
        s.set_defaults(fn=fn)
        return s

    rpc_parser("call", cmd_call).add_argument("--timeout", type=float, default=30.0)
    rpc_parser("cast", cmd_cast).add_argument("--fanout", action="store_true")
    s = sub.add_parser("notify")
    s.add_argument("event_type")
    s.add_argument("payload", type=json_arg)
    s.add_argument("--priority", choices=PRIORITIES, default="info")
    s.add_argument("--topic", default="notifications")
    s.add_argument("--publisher-id", default="warren-interop.localhost")
    s.add_argument("--context", type=json_arg, default={})
    s.set_defaults(fn=cmd_notify)
    s = sub.add_parser("listen-notifications")
    s.add_argument("--topic", default="notifications")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--pool", help="listener pool (own queue) instead of the shared queue")
    s.set_defaults(fn=cmd_listen)
    a = p.parse_args()
    if a.command in ("call", "cast") and not isinstance(a.args, dict):
        p.error("ARGS_JSON must be a JSON object")

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if a.debug else logging.ERROR,
                        format="oslo_client %(levelname)s %(name)s: %(message)s")
    try:
        probe_broker(a.url, a.retry)
    except Exception as exc:
        print(f"oslo_client: cannot connect to {a.url}: {exc}", file=sys.stderr)
        return 1
    oslo_messaging.set_transport_defaults(control_exchange=a.exchange)
    conf = cfg.CONF  # oslo.messaging's tracing options are registered on the global CONF only
    conf(args=[], default_config_files=[], default_config_dirs=[])
    if a.command in ("notify", "listen-notifications"):
        transport = oslo_messaging.get_notification_transport(conf, url=a.url)
    else:
        transport = oslo_messaging.get_rpc_transport(conf, url=a.url,
                                                     allowed_remote_exmods=a.allowed_exmod)
    try:
        a.fn(transport, a)
    except Exception as exc:  # delivery/connection failures: not a result of the call
        print(f"oslo_client: {a.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        transport.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
