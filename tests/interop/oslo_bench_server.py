#!/usr/bin/env python3
"""The oslo.messaging peer of `warren bench --compare`: a real RPC server with an echo endpoint.

    oslo_bench_server.py --topic T [--server S] [--url URL] [--exchange openstack]
                         [--prefetch 64]

Serves echo(value) -> value on topic T (queues T, T.S and a fanout queue) with the threading
executor and oslo.messaging's defaults (64 executor threads, confirmed publishes, one reply
per call), except rabbit_qos_prefetch_count, which the bench sets to Warren's prefetch (64)
so all servers work under the same flow control (oslo's default, 0, is unlimited).
Prints "READY" on stdout once it is consuming; SIGTERM/SIGINT stop it (prints "STOPPED").
"""
import argparse
import logging
import signal
import sys
import threading
import warnings

warnings.filterwarnings("ignore")  # eventlet/debtcollector deprecation noise on stderr

from oslo_config import cfg  # noqa: E402
import oslo_messaging  # noqa: E402
from oslo_messaging._drivers import impl_rabbit  # noqa: E402


class Endpoint:
    def echo(self, ctxt, value):
        return value


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="rabbit://guest:guest@127.0.0.1:5672/")
    p.add_argument("--exchange", default="openstack", help="control_exchange")
    p.add_argument("--topic", required=True)
    p.add_argument("--server", default="oslo-bench")
    p.add_argument("--prefetch", type=int, default=64,
                   help="rabbit_qos_prefetch_count (0: unlimited, oslo's default)")
    args = p.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="oslo_bench_server %(levelname)s %(name)s: %(message)s")
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    conf = cfg.CONF
    conf(args=[], default_config_files=[], default_config_dirs=[])
    # The driver registers these when it loads; registering the same options first is allowed
    # and lets the override be set before the transport reads it.
    conf.register_opts(impl_rabbit.rabbit_opts, group="oslo_messaging_rabbit")
    conf.set_override("rabbit_qos_prefetch_count", args.prefetch, group="oslo_messaging_rabbit")
    transport = oslo_messaging.get_rpc_transport(conf, url=args.url)
    target = oslo_messaging.Target(topic=args.topic, server=args.server)
    server = oslo_messaging.get_rpc_server(transport, target, [Endpoint()])
    assert server.executor_type == "threading", server.executor_type

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server.start()  # declares the consumers synchronously
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
