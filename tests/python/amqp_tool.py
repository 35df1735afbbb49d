#!/usr/bin/env python3
"""Small AMQP helpers for tests, with pika (a fedora-messaging dependency).

  amqp_tool.py --amqp-url URL declare --queue Q [--bind KEY ...] [--exchange amq.topic]
      a durable queue, bound to the exchange with each KEY.
  amqp_tool.py --amqp-url URL get --queue Q [--count N] [--requeue]
      takes up to N messages (basic.get) and prints one JSON line each:
      {"routing_key", "exchange", "redelivered", "properties": {...},
       "headers": {...}, "body": text or null, "body_b64"}; acks them
      unless --requeue.
"""

import argparse
import base64
import datetime
import json
import sys

import pika


def jsonable(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (datetime.datetime, datetime.date)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


PROPS = ["content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
         "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--amqp-url", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("declare")
    d.add_argument("--queue", required=True)
    d.add_argument("--bind", action="append", default=[])
    d.add_argument("--exchange", default="amq.topic")
    g = sub.add_parser("get")
    g.add_argument("--queue", required=True)
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--requeue", action="store_true")
    args = p.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    ch = conn.channel()
    if args.cmd == "declare":
        ch.queue_declare(args.queue, durable=True)
        for key in args.bind:
            ch.queue_bind(args.queue, args.exchange, routing_key=key)
        print(json.dumps({"declared": args.queue, "bindings": args.bind}))
    else:
        for _ in range(args.count):
            method, props, body = ch.basic_get(args.queue, auto_ack=False)
            if method is None:
                break
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            print(json.dumps({
                "routing_key": method.routing_key,
                "exchange": method.exchange,
                "redelivered": method.redelivered,
                "properties": {k: jsonable(getattr(props, k)) for k in PROPS
                               if getattr(props, k) is not None},
                "headers": jsonable(props.headers or {}),
                "header_types": {k: type(v).__name__ for k, v in (props.headers or {}).items()},
                "body": text,
                "body_b64": base64.b64encode(body).decode(),
            }))
            if args.requeue:
                ch.basic_nack(method.delivery_tag, requeue=True)
            else:
                ch.basic_ack(method.delivery_tag)
    sys.stdout.flush()
    conn.close()


if __name__ == "__main__":
    main()
