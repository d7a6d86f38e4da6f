#!/usr/bin/env python3
"""Emulates a nova 2012.1 (Essex) rpc caller with plain kombu; prints JSON lines.

    nova_essex_client.py [--url URL] [--exchange nova] TOPIC METHOD ARGS_JSON
                         [--host HOST] [--timeout SECS] [--context JSON] [--msg-id HEX]
                         [--multicall | --cast | --fanout]

call (default) / --multicall: declares direct exchange <msg_id> (durable=False,
auto_delete=True) and an exclusive auto-delete queue <msg_id> bound to it, then
publishes the FLAT request {"method", "args", "_msg_id", "_context_*"} to the topic
exchange with routing key TOPIC (or TOPIC.HOST) and reads replies the way Essex's
MulticallWaiter does: `failure` first (stops), then `ending` (stops), else `result`.
Output, one JSON object per line:
    {"published": {"exchange", "routing_key", "body"}}   the request as sent
    {"raw": <reply body>}                                 every reply, as received
    {"yield": <result>}                                   --multicall: each result on arrival
    {"results": [...], "result": <last result or null (what call() returns)>,
     "failure": <failure value or null>, "ended": bool, "timed_out": bool, "msg_id": ...}
--cast / --fanout publish without _msg_id (fanout: to exchange TOPIC_fanout) and print
only {"published": ...}. Exit 0 when it ran (timeouts and failures included),
1 on connection errors, 2 on usage errors.
"""
import argparse
import datetime
import json
import socket
import sys
import time
import uuid

import kombu
import kombu.exceptions


def essex_context(overrides):
    ctx = {"user_id": "essex-user", "project_id": "essex-project", "is_admin": False,
           "read_deleted": "no", "roles": ["member"], "remote_address": "127.0.0.1",
           "timestamp": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%S.%f"),
           "request_id": "req-" + str(uuid.uuid4()), "auth_token": None}
    ctx.update(overrides)
    return {"_context_" + k: v for k, v in ctx.items()}


def out(obj):
    print(json.dumps(obj), flush=True)


def json_arg(text):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//",
                   help="kombu URL (rabbit:// is accepted too)")
    p.add_argument("--exchange", default="nova", help="control_exchange (topic)")
    p.add_argument("topic")
    p.add_argument("method")
    p.add_argument("args", type=json_arg, help="JSON object of keyword arguments")
    p.add_argument("--host", help="send to TOPIC.HOST")
    p.add_argument("--timeout", type=float, default=60.0, help="Essex rpc_response_timeout")
    p.add_argument("--context", type=json_arg, default={}, help="overrides of the Essex context")
    p.add_argument("--msg-id", default=None, help="default: uuid4().hex")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--multicall", action="store_true")
    mode.add_argument("--cast", action="store_true")
    mode.add_argument("--fanout", action="store_true", help="fanout_cast to TOPIC_fanout")
    a = p.parse_args()
    if not isinstance(a.args, dict) or not isinstance(a.context, dict):
        p.error("ARGS_JSON and --context must be JSON objects")

    url = "amqp://" + a.url[len("rabbit://"):] if a.url.startswith("rabbit://") else a.url
    msg = {"method": a.method, "args": a.args}
    msg.update(essex_context(a.context))
    routing_key = f"{a.topic}.{a.host}" if a.host else a.topic
    if a.fanout:  # Essex FanoutPublisher: no routing key
        exchange = kombu.Exchange(f"{a.topic}_fanout", "fanout", durable=False, auto_delete=True)
        routing_key = ""
    else:
        exchange = kombu.Exchange(a.exchange, "topic", durable=False, auto_delete=False)
    try:
        with kombu.Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=3)
            if a.cast or a.fanout:
                publish(conn, exchange, routing_key, msg)
                return 0
            return call(conn, exchange, routing_key, msg, a)
    except (OSError, kombu.exceptions.OperationalError) as exc:
        print(f"nova_essex_client: connection failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def publish(conn, exchange, routing_key, msg):
    # kombu defaults: json serializer (application/json, utf-8), delivery_mode 2
    kombu.Producer(conn.default_channel, exchange=exchange).publish(
        msg, routing_key=routing_key, declare=[exchange])
    out({"published": {"exchange": exchange.name, "routing_key": routing_key, "body": msg}})


def call(conn, exchange, routing_key, msg, a):
    msg_id = a.msg_id or uuid.uuid4().hex
    msg["_msg_id"] = msg_id
    reply_ex = kombu.Exchange(msg_id, "direct", durable=False, auto_delete=True)
    reply_q = kombu.Queue(msg_id, reply_ex, routing_key=msg_id, durable=False,
                          auto_delete=True, exclusive=True)
    state = {"results": [], "failure": None, "ended": False}

    def on_reply(body, message):
        message.ack()
        out({"raw": body})
        if state["ended"]:
            return  # Essex has stopped reading by now; anything later is ignored
        failure = body.get("failure") if isinstance(body, dict) else None
        if failure:
            state["failure"], state["ended"] = failure, True
        elif isinstance(body, dict) and body.get("ending", False):
            state["ended"] = True
        else:
            result = body.get("result") if isinstance(body, dict) else body
            state["results"].append(result)
            if a.multicall:
                out({"yield": result})

    with kombu.Consumer(conn.channel(), queues=[reply_q], callbacks=[on_reply], no_ack=False):
        publish(conn, exchange, routing_key, msg)  # reply queue exists before the request leaves
        deadline = time.monotonic() + a.timeout
        while not state["ended"] and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except socket.timeout:
                pass
    results = state["results"]
    out({"results": results, "result": results[-1] if results else None,
         "failure": state["failure"], "ended": state["ended"], "timed_out": not state["ended"],
         "msg_id": msg_id})
    return 0


if __name__ == "__main__":
    sys.exit(main())
