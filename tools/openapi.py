"""The OpenAPI 3.1 document of the HTTP/JSON API, generated from protos/.

Every RPC is `POST /<package.Service>/<Method>` in the Connect protocol
(services/common/http_gateway.py); the bodies are the messages in protobuf's
canonical JSON; descriptions are the proto comments (buf's COMMENTS rules keep
every RPC, message and field commented). Written by tools/gen_protos.sh to
usagebilling/openapi.json, where the services serve it (GET /openapi.json) and
`make proto-check` (run by `make test`) finds drift.

    python -m tools.openapi [--markdown] [--out PATH]     (default: standard output)

With --markdown: the same as a readable reference, docs/reference.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "usagebilling."
# The service each package's RPCs are served by, and its default HTTP port
# (services/common/config.py DEFAULT_HTTP_PORTS).
SERVED_BY = {
    "usagebilling.ingest.": ("ingest", 8081),
    "usagebilling.meter.": ("meter", 8082),
    "usagebilling.billing.": ("billing", 8083),
}
# QuarantineService (usagebilling.common) is served by ingest and meter.
QUARANTINE = "usagebilling.common.v1.QuarantineService"
F = descriptor_pb2.FieldDescriptorProto
SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
    # 64-bit integers are JSON strings in canonical JSON (numbers are accepted).
    F.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_UINT64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_FIXED64: {"type": ["string", "integer"], "format": "int64"},
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, UTC (Z) or with an offset: 2026-01-31T10:30:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "description": "Seconds with an s suffix: 3.5s.",
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "description": "Connect's error: the gRPC status code in snake_case and its message"
    " (INVALID_ARGUMENT names the field). HTTP status: invalid_argument,"
    " failed_precondition and out_of_range 400, unauthenticated 401,"
    " permission_denied 403, not_found 404, already_exists and aborted 409,"
    " resource_exhausted 429 (with Retry-After when the server sets it), canceled 499,"
    " internal, unknown and data_loss 500, unimplemented 501, unavailable 503,"
    " deadline_exceeded 504.",
    "required": ["code"],
    "properties": {
        "code": {
            "type": "string",
            "enum": [
                "canceled",
                "unknown",
                "invalid_argument",
                "deadline_exceeded",
                "not_found",
                "already_exists",
                "permission_denied",
                "resource_exhausted",
                "failed_precondition",
                "aborted",
                "out_of_range",
                "unimplemented",
                "internal",
                "unavailable",
                "data_loss",
                "unauthenticated",
            ],
        },
        "message": {"type": "string"},
    },
}
# Over HTTP an event's metadata value may also be plain JSON.
PLAIN_VALUE = {
    "anyOf": [
        {"type": "string"},
        {"type": "number"},
        {"type": "boolean"},
        {"$ref": "#/components/schemas/usagebilling.common.v1.Value"},
    ],
    "description": "A plain JSON string, number or boolean, or the canonical Value form."
    " A whole number within int64 is stored as int_value; another number as number_value"
    " when a double holds it exactly as written, else as the decimal string as written"
    " (no rounding: ten events of 0.1 sum to exactly 1).",
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """protos/ compiled with their comments (grpc_tools' protoc)."""
    files = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{ROOT / 'protos'}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ],
            check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(comments: dict[tuple[int, ...], str], path: tuple[int, ...]) -> str:
    return comments.get(path, "").strip()


def _clean(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if not line.startswith("buf:lint:"))


class Builder:
    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.schemas: dict[str, Any] = {"ConnectError": ERROR_SCHEMA}
        self.paths: dict[str, Any] = {}
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.files = [f for f in files.file if f.package.startswith(PACKAGE)]
        for file in files.file:
            self._index(file.package, file.message_type)

    def _index(self, scope: str, messages: Any) -> None:
        for message in messages:
            name = f"{scope}.{message.name}"
            self.messages[name] = message
            self._index(name, message.nested_type)

    def build(self) -> dict[str, Any]:
        for file in self.files:
            comments = {
                tuple(loc.path): _clean(loc.leading_comments or loc.trailing_comments)
                for loc in file.source_code_info.location
            }
            for i, message in enumerate(file.message_type):
                self._message(file.package, message, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self._enum(file.package, enum, (5, i), comments)
            for i, service in enumerate(file.service):
                self._service(file.package, service, (6, i), comments)
        self.paths["/events/ingest"] = _dodo_path()
        return {
            "openapi": "3.1.0",
            "info": {
                "title": "usage-billing HTTP/JSON API",
                "version": "v1",
                "description": "Every gRPC method of ingest, meter and billing over HTTP in the"
                " Connect protocol: POST /<package.Service>/<Method> with Content-Type"
                " application/json and the request message in protobuf's canonical JSON"
                " (lowerCamelCase or proto field names; enums by name; 64-bit integers as"
                " strings; timestamps in RFC 3339). Authorization: Bearer <API key>."
                " Each service answers on its own HTTP port (see each path's servers);"
                " streaming methods take Connect's enveloped application/connect+json."
                " Generated from protos/ by tools/openapi.py.",
            },
            "servers": [{"url": "http://127.0.0.1:8083", "description": "billing (make run)"}],
            "security": [{"bearer": []}],
            "paths": dict(sorted(self.paths.items())),
            "components": {
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A tenant's API key (CreateApiKey); the admin token"
                        " for TenantService and QuarantineService.",
                    }
                },
                "schemas": dict(sorted(self.schemas.items())),
            },
        }

    def _message(
        self,
        scope: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{message.name}"
        if message.options.map_entry:
            return
        properties: dict[str, Any] = {}
        for j, field in enumerate(message.field):
            property_schema = self._field(name, field)
            if text := _comment(comments, (*path, 2, j)):
                property_schema = {**property_schema, "description": text}
            properties[field.json_name] = property_schema
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if text := _comment(comments, path):
            schema["description"] = text
        oneofs = [o.name for o in message.oneof_decl]
        real = [
            o
            for k, o in enumerate(oneofs)
            if any(
                f.HasField("oneof_index") and f.oneof_index == k and not f.proto3_optional
                for f in message.field
            )
        ]
        if real:
            schema["description"] = (
                schema.get("description", "") + "\n\nAt most one of each"
                f" oneof ({', '.join(real)}) is set."
            ).strip()
        self.schemas[name] = schema
        for k, nested in enumerate(message.nested_type):
            self._message(name, nested, (*path, 3, k), comments)
        for k, enum in enumerate(message.enum_type):
            self._enum(name, enum, (*path, 4, k), comments)

    def _type(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        type_name = field.type_name.lstrip(".")
        if field.type == F.TYPE_ENUM:
            return {"$ref": f"#/components/schemas/{type_name}"}
        if field.type in (F.TYPE_MESSAGE, F.TYPE_GROUP):
            if type_name in WELL_KNOWN:
                return dict(WELL_KNOWN[type_name])
            return {"$ref": f"#/components/schemas/{type_name}"}
        return dict(SCALARS[field.type])

    def _field(self, owner: str, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        entry = self.messages.get(field.type_name.lstrip("."))
        if entry is not None and entry.options.map_entry:
            value = entry.field[1]
            plain = (
                owner == "usagebilling.ingest.v1.Event"
                and value.type_name == ".usagebilling.common.v1.Value"
            )
            return {
                "type": "object",
                "additionalProperties": PLAIN_VALUE if plain else self._type(value),
            }
        schema = self._type(field)
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": schema}
        return schema

    def _enum(
        self,
        scope: str,
        enum: descriptor_pb2.EnumDescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        values = []
        for j, value in enumerate(enum.value):
            text = _comment(comments, (*path, 2, j))
            values.append(f"- {value.name} ({value.number})" + (f": {text}" if text else ""))
        description = _comment(comments, path)
        description = (description + "\n\n" if description else "") + "\n".join(values)
        self.schemas[f"{scope}.{enum.name}"] = {
            "type": "string",
            "enum": [v.name for v in enum.value],
            "description": description + "\n\nThe number is accepted too.",
        }

    def _service(
        self,
        package: str,
        service: descriptor_pb2.ServiceDescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        full = f"{package}.{service.name}"
        if full == QUARANTINE:
            served = [("ingest", 8081), ("meter", 8082)]
        else:
            served = [next(v for k, v in SERVED_BY.items() if package.startswith(k))]
        for j, method in enumerate(service.method):
            streaming = method.client_streaming or method.server_streaming
            media = "application/connect+json" if streaming else "application/json"
            description = _comment(comments, (*path, 2, j))
            if streaming:
                description += (
                    "\n\nStreaming: the body is a sequence of Connect envelopes (a flags byte,"
                    " a 4-byte big-endian length, a JSON message), read whole before the"
                    " first answer (half duplex); the answer ends with an end-stream envelope"
                    " (flags 2) holding the error, if any."
                )
            request = {"$ref": f"#/components/schemas/{method.input_type.lstrip('.')}"}
            response = {"$ref": f"#/components/schemas/{method.output_type.lstrip('.')}"}
            self.paths[f"/{full}/{method.name}"] = {
                "servers": [
                    {"url": f"http://127.0.0.1:{port}", "description": f"{name} (make run)"}
                    for name, port in served
                ],
                "post": {
                    "operationId": f"{service.name}_{method.name}",
                    "tags": [full],
                    "summary": description.split("\n")[0] if description else method.name,
                    "description": description.strip(),
                    "requestBody": {"required": True, "content": {media: {"schema": request}}},
                    "responses": {
                        "200": {
                            "description": "The response message.",
                            "content": {media: {"schema": response}},
                        },
                        "default": {
                            "description": "An error (Connect's JSON error).",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ConnectError"}
                                }
                            },
                        },
                    },
                },
            }


def _dodo_path() -> dict[str, Any]:
    event = {
        "type": "object",
        "required": ["event_id", "customer_id", "event_name"],
        "properties": {
            "event_id": {
                "type": "string",
                "description": "Unique per tenant: a resend is a duplicate.",
            },
            "customer_id": {"type": "string", "description": "The customer's external_id."},
            "event_name": {"type": "string", "description": "What meters select on."},
            "timestamp": {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339; the server's time when left out.",
            },
            "metadata": {"type": "object", "additionalProperties": PLAIN_VALUE},
        },
    }
    return {
        "servers": [{"url": "http://127.0.0.1:8081", "description": "ingest (make run)"}],
        "post": {
            "operationId": "DodoIngestEvents",
            "tags": ["usagebilling.ingest.v1.IngestService"],
            "summary": "Dodo Payments' ingest request: IngestEvents in Dodo's shape.",
            "description": "The request body of Dodo Payments' POST /events/ingest, so that a"
            " user switches by changing the base URL and the key. IngestEvents underneath"
            " (same validation, limits and errors).",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["events"],
                            "properties": {
                                "events": {"type": "array", "items": event, "maxItems": 1000}
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "Events stored.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "ingested_count": {"type": "integer"},
                                    "duplicate_count": {"type": "integer"},
                                    "rejections": {
                                        "type": "array",
                                        "items": {
                                            "$ref": "#/components/schemas/"
                                            "usagebilling.ingest.v1.EventRejection"
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "default": {
                    "description": "An error (Connect's JSON error).",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ConnectError"}
                        }
                    },
                },
            },
        },
    }


def render() -> str:
    return json.dumps(Builder(descriptor_set()).build(), indent=2, ensure_ascii=False) + "\n"


def _type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name.rsplit('.', 1)[-1]}](#{name.replace('.', '').lower()})"
    if "anyOf" in schema:
        return " or ".join(_type_of(s) for s in schema["anyOf"])
    kind = schema.get("type", "")
    if kind == "array":
        return f"list of {_type_of(schema['items'])}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type_of(schema['additionalProperties'])}"
    if isinstance(kind, list):
        kind = " or ".join(kind)
    return f"{kind} ({schema['format']})" if "format" in schema else str(kind)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown() -> str:
    """docs/reference.md: every RPC and message with the proto comments."""
    document = Builder(descriptor_set()).build()
    out = [
        "# API reference (generated)",
        "",
        "Generated from the comments in `protos/` by `python -m tools.openapi --markdown`"
        " (`make proto`); `make proto-check` (run by `make test`) fails when it drifts."
        " Over HTTP/JSON each RPC is `POST /<package.Service>/<Method>`"
        " ([api.md](api.md#httpjson)); over gRPC, the same method.",
        "",
        "## RPCs",
    ]
    by_tag: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, item in document["paths"].items():
        operation = item["post"]
        by_tag.setdefault(operation["tags"][0], []).append((path, operation))
    for tag in sorted(by_tag):
        out += ["", f"### {tag}"]
        for path, operation in by_tag[tag]:
            body = operation["requestBody"]["content"]
            request = next(iter(body.values()))["schema"]
            answer = next(iter(operation["responses"]["200"]["content"].values()))["schema"]
            out += [
                "",
                f"#### `{path}`",
                "",
                f"{_type_of(request)} → {_type_of(answer)}",
                "",
                operation["description"],
            ]
    out += ["", "## Messages and enums"]
    for name, schema in document["components"]["schemas"].items():
        out += ["", f"### {name}", ""]
        if description := schema.get("description"):
            out += [description, ""]
        if schema.get("properties"):
            out += ["| field | type | description |", "|---|---|---|"]
            for field, spec in schema["properties"].items():
                out.append(
                    f"| `{field}` | {_type_of(spec)} | {_cell(spec.get('description', ''))} |"
                )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write here (default: standard output)")
    parser.add_argument("--markdown", action="store_true", help="docs/reference.md instead")
    args = parser.parse_args(argv)
    text = render_markdown() if args.markdown else render()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
