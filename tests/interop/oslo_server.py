#!/usr/bin/env python3
"""A real oslo.messaging RPC server for Warren's interop tests.

    oslo_server.py --topic T [--server S] [--url URL] [--exchange openstack]
                   [--record FILE] [--debug]

Serves the endpoint below on topic T (queues T, T.S and fanout T_fanout_<hex>) with
the threading executor. Prints "READY" on stdout once its queues are declared and
it is consuming; SIGTERM/SIGINT stop it cleanly (prints "STOPPED", exit 0).
"""
import argparse
import json
import logging
import signal
import sys
import threading
import warnings

warnings.filterwarnings("ignore")  # eventlet/debtcollector deprecation noise on stderr

import kombu  # noqa: E402
from oslo_config import cfg  # noqa: E402
import oslo_messaging  # noqa: E402


def ctxt_dict(ctxt):
    return ctxt.to_dict() if hasattr(ctxt, "to_dict") else dict(ctxt or {})


class Endpoint:
    def __init__(self, record_path):
        self.record_path = record_path
        self.lock = threading.Lock()

    def echo(self, ctxt, value):
        return value

    def fail(self, ctxt, message):
        raise ValueError(message)

    def add(self, ctxt, a, b):
        return a + b

    def whoami(self, ctxt):
        return ctxt_dict(ctxt)

    def record(self, ctxt, value):
        """Meant for casts: appends `value` as one JSON line to --record FILE."""
        if not self.record_path:
            raise RuntimeError("server started without --record")
        with self.lock, open(self.record_path, "a") as f:
            f.write(json.dumps(value) + "\n")
        return value


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="rabbit://guest:guest@127.0.0.1:5672/")
    p.add_argument("--exchange", default="openstack", help="control_exchange")
    p.add_argument("--topic", required=True)
    p.add_argument("--server", default="oslo-server")
    p.add_argument("--record", metavar="FILE", help="file that record() appends to")
    p.add_argument("--debug", action="store_true", help="oslo/kombu debug logs on stderr")
    args = p.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.WARNING,
                        format="oslo_server %(levelname)s %(name)s: %(message)s")
    try:  # fail fast: oslo itself would retry the connection forever and never print READY
        with kombu.Connection("amqp://" + args.url.split("://", 1)[1].split("?", 1)[0],
                              connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=3, interval_start=0.5, interval_step=0.5)
    except Exception as exc:
        print(f"oslo_server: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    conf = cfg.CONF  # oslo.messaging's tracing options are registered on the global CONF only
    conf(args=[], default_config_files=[], default_config_dirs=[])
    transport = oslo_messaging.get_rpc_transport(conf, url=args.url)
    target = oslo_messaging.Target(topic=args.topic, server=args.server)
    server = oslo_messaging.get_rpc_server(transport, target, [Endpoint(args.record)])
    assert server.executor_type == "threading", server.executor_type

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server.start()  # declares the three consumers synchronously
    print("READY", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    server.wait()
    transport.cleanup()
    print("STOPPED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
