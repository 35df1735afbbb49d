#!/usr/bin/env python3
"""A fedora-messaging consumer of CI messages that validates each one.

  fm_consume_ci.py --amqp-url URL --queue Q --bind 'org.fedoraproject.prod.ci.#'
                   [--bind KEY ...] [--schemas DIR]

Consumes with the real client (fedora_messaging.api.twisted_consume), from
a durable queue Q bound to amq.topic with each --bind key (declared from a
temporary fedora-messaging config). Prints {"ready": true} once the
consumer is bound, then one JSON line per message, flushed:

  {"topic", "id", "headers", "body", "valid": bool, "errors": [...], "schema": name}

The schema of topic `....<artifact>.<event>.<status>` is
`<artifact>.<event>.<status>.json` in --schemas (default
tests/fixtures/ci-messages/): the last three topic parts, as the
`ci-messages` package picks it. The directory holds the spec's
koji-build-group.test.* schemas only; for koji-build.test.<status> the
schema is derived from koji-build-group.test.<status> by replacing the
artifact `$ref` "rpm-build-group.json" with "rpm-build.json" (the spec's own
koji-build schemas differ in exactly that). A `$ref` to a schema that is
not there (notification.json, system.json, stage.json) makes the message
invalid with an "unresolvable" error; it is only followed when the message
carries that field.

Loader fix: the spec's schemas write `common.json#properties/version` (a
fragment without the leading "/" a JSON pointer needs); refs are read as
`common.json#/properties/version`. The files stay unchanged.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMAS = os.path.join(HERE, "..", "fixtures", "ci-messages")
LOCK = threading.Lock()


def emit(obj):
    with LOCK:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()


def fix_refs(node):
    """`x.json#properties/a` -> `x.json#/properties/a`, everywhere."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and "#" in v:
                base, frag = v.split("#", 1)
                if frag and not frag.startswith("/"):
                    v = f"{base}#/{frag}"
            out[k] = fix_refs(v)
        return out
    if isinstance(node, list):
        return [fix_refs(x) for x in node]
    return node


def replace_ref(node, old, new):
    if isinstance(node, dict):
        return {k: (new if k == "$ref" and v == old else replace_ref(v, old, new))
                for k, v in node.items()}
    if isinstance(node, list):
        return [replace_ref(x, old, new) for x in node]
    return node


class Schemas:
    def __init__(self, directory):
        from referencing import Registry
        from referencing.jsonschema import DRAFT7

        self.docs = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json"):
                with open(os.path.join(directory, name)) as f:
                    self.docs[name] = fix_refs(json.load(f))
        # koji-build.test.<status>: the koji-build-group one with the
        # single-build artifact.
        for status in ("queued", "running", "complete", "error"):
            group = self.docs.get(f"koji-build-group.test.{status}.json")
            name = f"koji-build.test.{status}.json"
            if group is not None and name not in self.docs:
                derived = replace_ref(copy.deepcopy(group), "rpm-build-group.json",
                                      "rpm-build.json")
                derived["$id"] = f"koji-build.test.{status}"
                self.docs[name] = derived
        # Every schema under its bare file name: the spec's `$id`s are
        # relative ("koji-build-group.test.complete", ...), so its
        # `$ref: "contact.json"` resolves to the bare name "contact.json".
        self.registry = Registry().with_resources(
            (name, DRAFT7.create_resource(doc)) for name, doc in self.docs.items())

    def validate(self, topic, body):
        """(schema name, errors)."""
        import jsonschema

        name = ".".join(topic.split(".")[-3:]) + ".json"
        schema = self.docs.get(name)
        if schema is None:
            return name, [f"no schema {name} for topic {topic}"]
        validator = jsonschema.Draft7Validator(schema, registry=self.registry)
        try:
            errors = [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                      for e in validator.iter_errors(body)]
        except Exception as e:  # an unresolvable $ref, a broken schema
            errors = [f"unresolvable: {type(e).__name__}: {e}"]
        return name, errors


def wrap_get_message(schemas):
    """The client drops (nacks) a message whose body is not JSON or fails
    the schema class named in its `fedora_messaging_schema` header (e.g.
    `ci_messages.CIMessageV1`, whose schemas the client looks for in
    /usr/share/message-schemas/ci) before any callback sees it. Such a
    message still gets its line here, `valid: false` and
    `"rejected_by_client": true`, and the client then nacks it as usual."""
    from fedora_messaging import exceptions
    from fedora_messaging.twisted import consumer

    real = consumer.get_message

    def get_message(topic, properties, body):
        try:
            return real(topic, properties, body)
        except Exception as e:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = body.decode("utf-8", "replace")
            name, errors = schemas.validate(topic, parsed) if isinstance(parsed, dict) \
                else (None, [])
            emit({
                "topic": topic,
                "id": properties.message_id,
                "headers": properties.headers or {},
                "body": parsed,
                "valid": False,
                "errors": [f"fedora-messaging rejected it: {type(e).__name__}: {e}"] + errors,
                "schema": name,
                "rejected_by_client": True,
            })
            if isinstance(e, exceptions.ValidationError):
                raise
            raise exceptions.ValidationError(e) from e

    consumer.get_message = get_message


def client_schema_dir(schemas):
    """A directory for the `ci-messages` package's own check (the real
    client validates each message against the schema class its
    `fedora_messaging_schema` header names, `ci_messages.CIMessageV1`,
    which reads `<schemapath>/<artifact>.<event>.<status>.json`): the
    fixture schemas with their refs fixed and the derived koji-build ones,
    plus permissive stand-ins (`{}`, not the spec's) for the three files
    the source repository lacked, which that package would otherwise try to
    open. Our own validator (`Schemas.validate`) stays strict."""
    d = tempfile.mkdtemp(prefix="ci-schemas-")
    for name, doc in schemas.docs.items():
        with open(os.path.join(d, name), "w") as f:
            json.dump(doc, f)
    for name in ("system.json", "notification.json", "stage.json"):
        if name not in schemas.docs:
            with open(os.path.join(d, name), "w") as f:
                f.write("{}")
    return d


def write_config(args):
    q = json.dumps(args.queue)
    lines = [
        f"amqp_url = {json.dumps(args.amqp_url)}",
        "",
        "[client_properties]",
        'app = "warden tests (fm_consume_ci.py)"',
        "",
        f"[queues.{q}]",
        "durable = true",
        "auto_delete = false",
        "exclusive = false",
        "arguments = {}",
        "",
        "[[bindings]]",
        f"queue = {q}",
        'exchange = "amq.topic"',
        f"routing_keys = {json.dumps(args.bind)}",
        "",
        "[tls]",
    ]
    for key in ("ca_cert", "certfile", "keyfile"):
        if getattr(args, key):
            lines.append(f"{key} = {json.dumps(getattr(args, key))}")
    lines += [
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
    fd, path = tempfile.mkstemp(prefix="fm-consume-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--amqp-url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--bind", action="append", required=True)
    p.add_argument("--schemas", default=DEFAULT_SCHEMAS)
    p.add_argument("--ca-cert")
    p.add_argument("--certfile")
    p.add_argument("--keyfile")
    args = p.parse_args()

    schemas = Schemas(args.schemas)
    conf = write_config(args)
    os.environ["FEDORA_MESSAGING_CONF"] = conf

    from fedora_messaging import api, config
    from twisted.internet import reactor

    config.conf.setup_logging()
    try:
        from ci_messages.config import CONFIG as CI_CONFIG

        CI_CONFIG.set("main", "schemapath", client_schema_dir(schemas))
    except ImportError:
        pass
    wrap_get_message(schemas)

    def on_message(message):
        name, errors = schemas.validate(message.topic, message.body)
        emit({
            "topic": message.topic,
            "id": message.id,
            "headers": message._headers,
            "body": message.body,
            "valid": not errors,
            "errors": errors,
            "schema": name,
            # It got here: the client's own schema class accepted it.
            "client_validated": True,
        })

    bindings = config.conf["bindings"]
    queues = config.conf["queues"]

    def ready(_consumers):
        os.unlink(conf)
        emit({"ready": True})

    def failed(failure):
        emit({"error": str(failure.value)})
        reactor.stop()

    d = api.twisted_consume(on_message, bindings=bindings, queues=queues)
    d.addCallbacks(ready, failed)
    reactor.run()


if __name__ == "__main__":
    main()
