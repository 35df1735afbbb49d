#!/usr/bin/env python3
"""Publish Fedora messages to RabbitMQ with the real fedora-messaging client.

  fm_publish.py --amqp-url URL --kind koji|bodhi [--count N] [--id-prefix P]
                [--exchange amq.topic] [--fast]
  fm_publish.py --amqp-url URL --raw-body FILE --routing-key KEY [--id ID]

--kind builds a message of the real schema class (Koji:
koji_fedoramessaging_messages.build.BuildStateChangeV1; Bodhi:
bodhi.messages.schemas.update.UpdateRequestTestingV1) from the body in
tests/fixtures/fedora-messaging/ (see SOURCES.md there) and publishes it
with fedora_messaging.api.publish (which validates it against the class's
schema first). The topic prefix is Fedora's, "org.fedoraproject.prod", so
the routing key is exactly what Fedora's bus carries.

--id-prefix P makes the message ids deterministic: P-0, P-1, ... (so a test
can publish "the same message" twice). Without it the client's own UUID4.

--fast (for --count N benchmarks): the same message objects (same
properties, headers, routing key and body bytes as api.publish would send)
published over one pika connection with publisher confirms, without
api.publish's per-message round trip through the Twisted thread.

--raw-body publishes the file's bytes as they are (no validation, no
fedora-messaging headers) with pika: for undecodable-message tests.

Prints one JSON line per message: {"id", "topic", "routing_key",
"schema_topic"} (topic = routing key, the full Fedora topic); with
--count it also prints {"published": N, "seconds": S, "rate": R} to stderr.

TLS (amqps:// URLs): --ca-cert, --certfile, --keyfile.
"""

import argparse
import json
import os
import ssl
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "fedora-messaging")
TOPIC_PREFIX = "org.fedoraproject.prod"

KINDS = {
    "koji": "koji_buildsys.build.state.change__msg_build_complete.json",
    "bodhi": "bodhi_update.request.testing__test_request_testing_v1.json",
}


def toml_str(s):
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def write_config(args):
    """A fedora-messaging config: the broker, Fedora's topic prefix, logs
    to stderr (stdout carries the JSON lines)."""
    lines = [
        f"amqp_url = {toml_str(args.amqp_url)}",
        f"topic_prefix = {toml_str(TOPIC_PREFIX)}",
        f"publish_exchange = {toml_str(args.exchange)}",
        "",
        "[tls]",
    ]
    if args.ca_cert:
        lines.append(f"ca_cert = {toml_str(args.ca_cert)}")
    if args.certfile:
        lines.append(f"certfile = {toml_str(args.certfile)}")
    if args.keyfile:
        lines.append(f"keyfile = {toml_str(args.keyfile)}")
    lines += [
        "",
        "[client_properties]",
        'app = "warden tests (fm_publish.py)"',
        "",
        "[log_config]",
        "version = 1",
        "disable_existing_loggers = false",
        "[log_config.handlers.console]",
        'class = "logging.StreamHandler"',
        'stream = "ext://sys.stderr"',
        "[log_config.root]",
        'level = "WARNING"',
        'handlers = ["console"]',
    ]
    fd, path = tempfile.mkstemp(prefix="fm-publish-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def load_body(kind):
    with open(os.path.join(FIXTURES, KINDS[kind])) as f:
        return json.load(f)


def make_message(kind, body):
    if kind == "koji":
        from koji_fedoramessaging_messages.build import BuildStateChangeV1

        return BuildStateChangeV1(body=body)
    from bodhi.messages.schemas.update import UpdateRequestTestingV1

    return UpdateRequestTestingV1(body=body)


def pika_params(args):
    import pika

    params = pika.URLParameters(args.amqp_url)
    if args.amqp_url.startswith("amqps://"):
        ctx = ssl.create_default_context(cafile=args.ca_cert)
        if args.certfile:
            ctx.load_cert_chain(args.certfile, args.keyfile)
        params.ssl_options = pika.SSLOptions(ctx, "127.0.0.1")
    return params


def line(m):
    """The JSON line for message `m`: its id, its topic on the bus (the
    routing key) and, for the record, the schema class's own topic."""
    return json.dumps({"id": m.id, "topic": m._encoded_routing_key,
                       "routing_key": m._encoded_routing_key, "schema_topic": m.topic})


def publish_raw(args):
    import pika

    with open(args.raw_body, "rb") as f:
        body = f.read()
    conn = pika.BlockingConnection(pika_params(args))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, message_id=args.id)
    ch.basic_publish(args.exchange, args.routing_key, body, props, mandatory=False)
    conn.close()
    print(json.dumps({"id": args.id, "topic": args.routing_key, "routing_key": args.routing_key}),
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--amqp-url", required=True)
    p.add_argument("--kind", choices=sorted(KINDS))
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--id-prefix")
    p.add_argument("--exchange", default="amq.topic")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--raw-body")
    p.add_argument("--routing-key")
    p.add_argument("--id", help="message_id property for --raw-body")
    p.add_argument("--ca-cert")
    p.add_argument("--certfile")
    p.add_argument("--keyfile")
    args = p.parse_args()

    if args.raw_body:
        if not args.routing_key:
            p.error("--raw-body needs --routing-key")
        publish_raw(args)
        return
    if not args.kind:
        p.error("--kind or --raw-body is required")

    conf = write_config(args)
    os.environ["FEDORA_MESSAGING_CONF"] = conf
    try:
        from fedora_messaging import api

        body = load_body(args.kind)
        messages = []
        for i in range(args.count):
            m = make_message(args.kind, body)
            if args.id_prefix is not None:
                m.id = f"{args.id_prefix}-{i}"
            messages.append(m)
        start = time.monotonic()
        if args.fast:
            import pika

            conn = pika.BlockingConnection(pika_params(args))
            ch = conn.channel()
            ch.confirm_delivery()
            # Every message has the same class and body: one validation
            # (jsonschema takes ~20 ms a message) stands for all.
            messages[0].validate()
            for m in messages:
                ch.basic_publish(args.exchange, m._encoded_routing_key, m._encoded_body,
                                 m._properties, mandatory=True)
                print(line(m))
            conn.close()
        else:
            for m in messages:
                api.publish(m, exchange=args.exchange)
                print(line(m))
        sys.stdout.flush()
        secs = time.monotonic() - start
        if args.count > 1:
            print(json.dumps({"published": args.count, "seconds": round(secs, 3),
                              "rate": round(args.count / secs, 1)}), file=sys.stderr)
    finally:
        os.unlink(conf)


if __name__ == "__main__":
    main()
