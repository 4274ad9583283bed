"""Request generation for `make fuzz` (tools/fuzz.py): every RPC of the three
services, found in the generated descriptors, and for each call a request built
from the input message's descriptor with some fields mutated to hostile values,
or raw bytes that are not a valid encoding of it.

Generation is pure: case `i` of seed `s` depends only on (s, i) and on the ids
of the resources the fuzzer set up (`Pool`), never on what the services
answered, so a run is reproducible and a case can be generated again alone.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
    tenant_pb2,
)
from usagebilling.common.v1 import quarantine_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

# Which process serves each generated module's services. QuarantineService
# (common) is served by both stages that quarantine: ingest (relay) and meter (fold).
SERVED_BY: tuple[tuple[ModuleType, tuple[str, ...]], ...] = (
    (ingest_pb2, ("ingest",)),
    (meter_pb2, ("meter",)),
    (tenant_pb2, ("billing",)),
    (customer_pb2, ("billing",)),
    (product_pb2, ("billing",)),
    (subscription_pb2, ("billing",)),
    (invoice_pb2, ("billing",)),
    (quarantine_pb2, ("ingest", "meter")),
)
ADMIN_SERVICES = frozenset(
    {"usagebilling.billing.v1.TenantService", "usagebilling.common.v1.QuarantineService"}
)

# Descriptors come from upb; their stubs make every link optional, so the
# generic walkers below take them as Any.
Desc = Any
Field = Any

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# A mutated message larger than this is replaced by an unmutated one: requests
# stay mostly small, so that 20,000 of them take minutes, not hours.
MAX_CASE_BYTES = 4 * 1024 * 1024
# Timestamp bounds (google.protobuf.Timestamp: 0001-01-01 .. 9999-12-31).
TS_MIN = -62135596800
TS_MAX = 253402300799


@dataclass(frozen=True)
class Rpc:
    """One method on one server."""

    server: str  # "ingest" | "meter" | "billing"
    service: str  # full service name
    method: str
    input: Desc
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def label(self) -> str:
        short = self.service.rsplit(".", 1)[-1]
        return f"{self.server}:{short}/{self.method}"

    @property
    def admin(self) -> bool:
        return self.service in ADMIN_SERVICES


def discover() -> list[Rpc]:
    """Every method of every service, in a stable order, from the descriptors."""
    rpcs = []
    for module, servers in SERVED_BY:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for server in servers:
                    rpcs.append(
                        Rpc(
                            server=server,
                            service=service.full_name,
                            method=method.name,
                            input=method.input_type,
                            client_streaming=method.client_streaming,
                            server_streaming=method.server_streaming,
                        )
                    )
    return sorted(rpcs, key=lambda r: (r.server, r.service, r.method))


@dataclass
class Pool:
    """Ids of real resources the fuzzer created, so that mutated requests reach
    the deep paths (a real meter, customer, subscription) and not only the
    "not found" answers."""

    tenant_id: str = ""
    other_tenant_id: str = ""
    spare_key_ids: list[str] = field(default_factory=list)
    meter_ids: list[str] = field(default_factory=list)
    other_meter_ids: list[str] = field(default_factory=list)  # another tenant's
    customer_ids: list[str] = field(default_factory=list)
    customer_external_ids: list[str] = field(default_factory=list)
    product_ids: list[str] = field(default_factory=list)
    subscription_ids: list[str] = field(default_factory=list)
    invoice_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    event_names: list[str] = field(default_factory=list)
    properties: list[str] = field(default_factory=lambda: ["tokens", "region"])
    # Real page tokens, by method name (ListEvents, ListMeters, ...).
    page_tokens: dict[str, list[str]] = field(default_factory=dict)

    def all_ids(self) -> list[str]:
        return [
            *self.meter_ids,
            *self.other_meter_ids,
            *self.customer_ids,
            *self.product_ids,
            *self.subscription_ids,
            *self.invoice_ids,
            *self.event_ids,
            *self.spare_key_ids,
            *([self.tenant_id] if self.tenant_id else []),
        ]


@dataclass
class Case:
    """One call: a request message (or raw bytes, or a stream of either) and
    the credentials to send it with."""

    index: int
    rpc: Rpc
    credentials: str  # "valid", "none", "wrong-key", ... (see _credentials)
    metadata: tuple[tuple[str, str], ...]
    messages: list[Message | bytes]
    mutations: list[str]

    def payloads(self) -> list[bytes]:
        return [m if isinstance(m, bytes) else m.SerializeToString() for m in self.messages]

    def describe(self, limit: int = 0) -> str:
        """The request(s) in text format, or hex for raw bytes; cut to `limit` chars."""
        parts = []
        for m in self.messages:
            if isinstance(m, bytes):
                parts.append(f"hex:{m.hex()}")
            else:
                text = text_format.MessageToString(m, as_one_line=True)
                parts.append(f"{{{text}}}")
        out = " | ".join(parts) if parts else "(no messages)"
        if limit and len(out) > limit:
            return f"{out[:limit]}... ({len(out)} chars)"
        return out


# --- hostile values -------------------------------------------------------------

_UNICODE = [
    "ü",
    "日本語",
    "\U0001f642" * 10,
    "\u202eevil",
    "e\u0301",
    "\ufeffbom",
    "\uffff",
    "\U0010ffff",
    "zero\u200bwidth",
    "Ǆ",
    "ﬁ",
    "İ",
]
_TEXTY = [
    "\n",
    "\r\n",
    "\t",
    "\x7f",
    "\x1b[31mred",
    "'",
    "' OR '1'='1",
    "%",
    "%s%n%x",
    "_",
    "\\",
    "{}",
    "${x}",
    "{{x}}",
    "../../etc/passwd",
    "*",
    ">",
    "a b",
    "a.b",
    "a.*",
    "usagebilling.>",
    "null",
    "None",
    "true",
    "[]",
    '{"a": 1}',
    "<script>",
]
_NUMBERS = [
    "0",
    "-1",
    "1e19",
    "9e30",
    "0e-20000",
    "1e-400",
    "1e1000000",
    "NaN",
    "-NaN",
    "sNaN",
    "Infinity",
    "-inf",
    "-0",
    "0x10",
    "1_000",
    "١٢٣",
    "１２",
    "0.",
    ".5",
    "+1",
    " 1 ",
    "1,5",
    "9" * 40,
    "0." + "0" * 60 + "1",
    "1" * 5000,
    "9223372036854775808",
    "-9223372036854775809",
]
_TIME_ZONES = [
    "Mars/Olympus",
    "UTC+14",
    "+14:00",
    "Etc/GMT+12",
    "Etc/GMT-14",
    "America/Argentina/ComodRivadavia",
    "EST5EDT",
    "../UTC",
    "/etc/localtime",
    "localtime",
    "posixrules",
    "Factory",
    "utc",
    "Europe/Paris\x00",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "America/St_Johns",
]
_CURRENCIES = ["usd", "XXX", "ZZZ", "US", "USDD", "XBT", "EUR ", "JPY", "KWD", "CLF", "BHD"]


def _id_forms(rng: random.Random, real: str) -> str:
    """A real id written in a form uuid.UUID() accepts but the API should not."""
    u = uuid.UUID(real) if _is_uuid(real) else uuid.UUID(int=rng.getrandbits(128))
    forms = [
        f"{{{u}}}",
        f"urn:uuid:{u}",
        str(u).upper(),
        u.hex,
        f" {u}",
        f"{u} ",
        f"{u}\n",
        str(u)[:-1],
        f"{u}0",
        f"{u}\x00",
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "00000000-0000-0000-0000-00000000000g",
        str(u).replace("-", "_"),
        f"{u},{u}",
        f"'{u}'",
        str(uuid.UUID(int=rng.getrandbits(128))),
    ]
    return rng.choice(forms)


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _b64(raw: bytes, *, urlsafe: bool = True) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


def forged_page_token(rng: random.Random, pool: Pool) -> str:
    """A token the API did not make: odd dates, odd keys, odd JSON, odd base64."""
    some_id = rng.choice(pool.all_ids() or [str(uuid.UUID(int=rng.getrandbits(128)))])
    dates = [
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59-14:00",
        "9999-12-31T23:59:59.999999+00:00",
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00+23:59",
        "2024-13-45T00:00:00+00:00",
        "-0001-01-01T00:00:00+00:00",
        "2024-01-01",
        "now",
        "",
    ]
    keys: list[Any] = [
        some_id,
        _id_forms(rng, some_id),
        "\ud800",
        "x\ud800y",
        "\x00",
        "a\x00b",
        "' OR 1=1 --",
        "",
        None,
        12,
        1e308,
        [some_id],
        {"id": some_id},
    ]
    shape = rng.randrange(12)
    if shape == 0:  # the out-of-range dates of the issue
        cursor: Any = [rng.choice(dates[:4]), some_id]
    elif shape == 1:
        cursor = [rng.choice(dates), rng.choice(keys)]
    elif shape == 2:  # lone surrogates in the date
        cursor = [rng.choice(["\ud800", "2024-01-01T00:00:00\udfff+00:00"]), some_id]
    elif shape == 3:
        cursor = rng.choice([[], [some_id], [some_id, some_id, some_id], {}, "x", 7, None, True])
    elif shape == 4:
        cursor = [rng.choice([0, -1, 2**70, 1e308, True, None, [], {}]), rng.choice(keys)]
    elif shape == 5:  # deeply nested JSON (the decoder's recursion)
        depth = rng.choice([50, 1000, 5000])
        return _b64(("[" * depth + "]" * depth).encode())
    elif shape == 6:  # a long number (int parsing limits)
        return _b64(("[" + "1" * rng.choice([100, 5000]) + ', "x"]').encode())
    elif shape == 7:  # bytes that are not UTF-8 / not JSON
        return _b64(
            rng.choice([b"\xff\xfe", b'["\xff", "\xfe"]', rng.randbytes(rng.randrange(40))])
        )
    elif shape == 8:  # base64 oddities
        real = _real_token(rng, pool) or _b64(
            json.dumps(["2024-01-01T00:00:00+00:00", some_id]).encode()
        )
        oddities = [
            real.rstrip("="),
            real + "=",
            real + "==",
            " " + real,
            real.replace("-", "+").replace("_", "/"),
            real[:-2],
            real[::-1],
            real.upper(),
            real + "\n",
            "!!!" + real,
            "=",
            "%3D",
        ]
        return rng.choice(oddities)
    elif shape == 9:  # a real token of another List RPC, or flipped
        real = _real_token(rng, pool)
        if real:
            pos = rng.randrange(len(real))
            return real[:pos] + rng.choice("AZaz09-_") + real[pos + 1 :]
        cursor = [dates[0], some_id]
    elif shape == 10:  # NaN / Infinity literals that Python's json takes
        return _b64(
            rng.choice(
                [b"[NaN, NaN]", b"[Infinity, -Infinity]", b'["2024-01-01T00:00:00+00:00", NaN]']
            )
        )
    else:  # JSON with a huge string
        cursor = ["2024-01-01T00:00:00+00:00", "a" * rng.choice([1000, 100_000])]
    return _b64(json.dumps(cursor).encode(), urlsafe=rng.random() < 0.8)


def _real_token(rng: random.Random, pool: Pool) -> str:
    tokens = [t for ts in pool.page_tokens.values() for t in ts]
    return rng.choice(tokens) if tokens else ""


def hostile_string(rng: random.Random, pool: Pool, name: str) -> str:
    ids = pool.all_ids()
    real = rng.choice(ids) if ids else str(uuid.UUID(int=rng.getrandbits(128)))
    # Most of the time, what this field is most likely to choke on.
    if rng.random() < 0.6:
        if name == "page_token":
            return forged_page_token(rng, pool)
        if name in ("id", "ids") or name.endswith("_id"):
            if rng.random() < 0.8:
                return _id_forms(rng, real)
            return rng.choice(["\x00", real + "\x00"])
        if name == "time_zone":
            return rng.choice(_TIME_ZONES)
        if name == "currency":
            return rng.choice(_CURRENCIES)
        if name in _DECIMAL_FIELDS or name == "string_value":
            return rng.choice(_NUMBERS)
    roll = rng.randrange(20)
    if roll == 0:
        return ""
    if roll == 1:
        return rng.choice(["\x00", "a\x00b", real + "\x00", "\x00" * 3, "\x00" + real])
    if roll == 2:  # long; mostly a few KB, rarely 64 KB
        n = rng.choice([256, 1025, 4097, 4097, 65536])
        return rng.choice(["x", "é", "\U0001f642"]) * n
    if roll == 3:
        return rng.choice(_UNICODE)
    if roll == 4:
        return rng.choice(_TEXTY)
    if roll == 5:
        return rng.choice(_NUMBERS)
    if roll in (6, 7, 8):
        return _id_forms(rng, real)
    if roll == 9:  # a real id of another kind or another tenant
        return rng.choice([*ids, *pool.other_meter_ids, pool.other_tenant_id or real])
    if roll == 10:
        return rng.choice(_TIME_ZONES)
    if roll == 11:
        return forged_page_token(rng, pool)
    if roll == 12:
        return rng.choice(_CURRENCIES)
    if roll == 13:  # random printable
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40)))
    if roll == 14:  # random code points outside the surrogates
        return "".join(chr(_non_surrogate(rng)) for _ in range(rng.randrange(1, 20)))
    if roll == 15:
        return rng.choice(["a@", "@b", "a" * 300 + "@b.c", "a@b@c", " @ ", "a@b.c\x00"])
    if roll == 16:
        return rng.choice(pool.event_names or ["fz.tokens"]) + rng.choice(
            ["", " ", ".", ">", "*", "\x00", "Ω"]
        )
    if roll == 17:
        return rng.choice(pool.properties) + rng.choice([".x", "[0]", " ", "\x00", "..", "$"])
    return valid_string(rng, pool, name, "")


def _non_surrogate(rng: random.Random) -> int:
    while True:
        code = rng.randrange(1, 0x110000)
        if not 0xD800 <= code <= 0xDFFF:
            return code


def hostile_int(rng: random.Random, f: Field) -> int:
    t = f.type
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, UINT32_MAX, 2**31])
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 1, UINT64_MAX, 2**63])
    lo, hi = (
        INT32
        if t
        in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
        else INT64
    )
    return rng.choice(
        [0, -1, 1, lo, hi, hi - 1, lo + 1, 1001, 100_001, 10**9, -(10**9), min(hi, 2**53 + 1)]
    )


def hostile_double(rng: random.Random) -> float:
    return rng.choice(
        [
            float("nan"),
            float("inf"),
            float("-inf"),
            -0.0,
            1e308,
            5e-324,
            1e19,
            1e16,
            9.007199254740993e15,
            2.0**63,
            -(2.0**63),
            1e-300,
            0.1,
        ]
    )


def hostile_enum(rng: random.Random, e: Any) -> int:
    top = max(v.number for v in e.values)
    return int(rng.choice([-1, INT32[0], INT32[1], top + 1, 99, *[v.number for v in e.values]]))


def hostile_timestamp(rng: random.Random, now: int) -> tuple[int, int]:
    return rng.choice(
        [
            (TS_MIN, 0),
            (TS_MAX, 999_999_999),
            (TS_MAX + 1, 0),
            (TS_MIN - 1, 0),
            (0, -1),
            (now, -1),
            (0, 1_000_000_000),
            (now, 999_999_999),
            (-1, 0),
            (0, 0),
            (INT64[1], 0),
            (INT64[0], 0),
            (2**31, 0),
            (now + 10 * 366 * 86400, 0),
            (now - 5 * 366 * 86400, 0),
            (now - 200 * 86400, 0),
            (now, INT32[1]),
        ]
    )


# --- valid values -----------------------------------------------------------------

_ID_FIELDS: dict[str, Callable[[Pool], list[str]]] = {
    "meter_id": lambda p: p.meter_ids,
    "product_id": lambda p: p.product_ids,
    "subscription_id": lambda p: p.subscription_ids,
    "invoice_id": lambda p: p.invoice_ids,
    "tenant_id": lambda p: [p.tenant_id],
    "event_id": lambda p: p.event_ids,
}
# The resource a bare `id` names, by service.
_ID_OF_SERVICE: dict[str, Callable[[Pool], list[str]]] = {
    "MeterService": lambda p: p.meter_ids,
    "CustomerService": lambda p: p.customer_ids,
    "ProductService": lambda p: p.product_ids,
    "SubscriptionService": lambda p: p.subscription_ids,
    "InvoiceService": lambda p: p.invoice_ids,
    "TenantService": lambda p: p.spare_key_ids,  # RevokeApiKey: never the key in use
}
_DECIMAL_FIELDS = {
    "unit_price",
    "up_to",
    "flat_price",
    "free_threshold",
    "package_size",
    "package_price",
}


def _pick(rng: random.Random, values: Sequence[str], fallback: str = "") -> str:
    values = [v for v in values if v]
    return rng.choice(values) if values else fallback


def _new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def valid_string(rng: random.Random, pool: Pool, name: str, context: str) -> str:
    """A plausible value for a string field, by its name. `context` is
    "<server>:<Service>/<Message>" so that ids of the right kind are chosen."""
    if name == "event_id":
        if context.endswith(":Event") or rng.random() < 0.3:  # a new event, or an unknown id
            return _new_id(rng)
        return _pick(rng, pool.event_ids, _new_id(rng))
    if name == "customer_id":
        # Events and meter speak of customers by their external id; billing by its id.
        if context.startswith(("ingest:", "meter:")):
            return _pick(rng, pool.customer_external_ids, "fz-cust-0")
        return _pick(rng, pool.customer_ids, _new_id(rng))
    if name in _ID_FIELDS:
        return _pick(rng, _ID_FIELDS[name](pool), _new_id(rng))
    if name in ("id", "ids"):
        for service, ids in _ID_OF_SERVICE.items():
            if f"{service}/" in context:
                return _pick(rng, ids(pool), _new_id(rng))
        return _new_id(rng)
    if name in ("event_name", "event_names"):
        return _pick(rng, pool.event_names, "fz.tokens")
    if name == "page_token":
        method = context.split("/", 1)[-1].split(":", 1)[0]
        return _pick(rng, pool.page_tokens.get(method, []))
    if name in ("property", "key", "group_by"):
        return rng.choice(pool.properties)
    if name == "currency":
        return rng.choice(["USD", "EUR", "JPY", "KWD"])
    if name == "email":
        return f"fz{rng.randrange(10**6)}@example.com"
    if name == "time_zone":
        return rng.choice(["", "UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"])
    if name in _DECIMAL_FIELDS:
        return rng.choice(["0", "0.01", "1", "2.5", "100", "1000"])
    if name == "string_value":
        return rng.choice(["eu", "us", "gpt-4", "x"])
    # Now and then a name already taken, or that concurrent calls take at once:
    # the race between "is it free?" and the insert must end in ALREADY_EXISTS.
    if name == "external_id":
        if rng.random() < 0.3:
            return rng.choice([*pool.customer_external_ids, "fz-dup-0", "fz-dup-1"])
        return f"fz-cust-{rng.randrange(10**6)}"
    if name == "name":
        if rng.random() < 0.3:
            return rng.choice(["fz-tokens", "fz-calls", "fz-monthly", "fz-dup-0", "fz-dup-1"])
        return f"fz-{rng.randrange(10**9)}"
    return rng.choice(["fuzz", "a", "description", "tokens"])


def valid_timestamp(rng: random.Random, now: int, name: str = "") -> tuple[int, int]:
    """A recent time; for a range's end, a little after now, so that ranges are
    mostly ordered and short (a QueryUsage by minute over weeks is heavy work
    that the fuzzer should ask for only now and then)."""
    nanos = rng.choice([0, 0, rng.randrange(10**9)])
    if name == "end_time":
        return now + rng.choice([0, 60, 3600, 86400]), nanos
    if name == "as_of":
        return now - rng.choice([0, 0, 3600, 86400 * 2]), nanos
    return now - rng.choice([60, 3600, 86400, 3 * 86400, 35 * 86400]), nanos


# Fields a valid-looking request nearly always sets (the rest are left out now and then).
_ESSENTIAL = {
    "id",
    "ids",
    "name",
    "currency",
    "external_id",
    "event_name",
    "event_names",
    "start_time",
    "end_time",
    "as_of",
    "events",
    "timestamp",
    "window_size",
    "key",
    "property",
    "unit_price",
    "package_size",
    "package_price",
}


def _essential(f: Field) -> bool:
    return f.name in _ESSENTIAL or f.name.endswith("_id") or f.type == FieldDescriptor.TYPE_ENUM


def _fix_condition(b: Builder, msg: Any) -> None:
    op = msg.operator
    if op in (meter_pb2.OPERATOR_IN, meter_pb2.OPERATOR_NOT_IN):
        msg.ClearField("value")
        if not msg.values:
            msg.values.add(string_value="eu")
    elif op in (meter_pb2.OPERATOR_EXISTS, meter_pb2.OPERATOR_NOT_EXISTS):
        msg.ClearField("value")
        del msg.values[:]
    else:
        del msg.values[:]
        if not msg.HasField("value"):
            msg.value.string_value = "eu"
        if op in range(meter_pb2.OPERATOR_GREATER_THAN, meter_pb2.OPERATOR_LESS_THAN_OR_EQUALS + 1):
            msg.key = "tokens"
            msg.value.int_value = b.rng.randrange(100)


def _fix_usage_price(b: Builder, msg: Any) -> None:
    model = msg.model
    if model != product_pb2.PRICE_MODEL_PACKAGE:
        msg.package_size = msg.package_price = ""
    if model in (product_pb2.PRICE_MODEL_GRADUATED, product_pb2.PRICE_MODEL_VOLUME):
        msg.unit_price = ""
        del msg.tiers[:]
        msg.tiers.add(up_to="10", unit_price="0.5", flat_price=b.rng.choice(["", "1"]))
        msg.tiers.add(unit_price="0.1")
    else:
        del msg.tiers[:]
    if model == product_pb2.PRICE_MODEL_PACKAGE:
        msg.unit_price = ""
        msg.package_size, msg.package_price = "100", "3"
    if model == product_pb2.PRICE_MODEL_PER_UNIT and not msg.unit_price:
        msg.unit_price = "0.01"
    if b.pool.meter_ids:
        msg.meter_id = b.rng.choice(b.pool.meter_ids)


def _fix_create_meter(b: Builder, msg: Any) -> None:
    if msg.aggregation == meter_pb2.AGGREGATION_COUNT:
        msg.property = b.rng.choice(["", ""])
    elif msg.aggregation == meter_pb2.AGGREGATION_UNIQUE_COUNT:
        msg.property = "region"
    else:
        msg.property = "tokens"
    unique = list(dict.fromkeys(msg.group_by))
    del msg.group_by[:]
    msg.group_by.extend(k for k in unique if k != msg.property)


def _fix_query_usage(b: Builder, msg: Any) -> None:
    # The first meter groups by region; the others by nothing.
    meter_ids = b.pool.meter_ids
    grouped = bool(meter_ids) and msg.meter_id == meter_ids[0]
    del msg.group_by[:]
    msg.group_filter.clear()
    if grouped and b.rng.random() < 0.5:
        msg.group_by.append("region")
        if b.rng.random() < 0.5:
            msg.group_filter["region"] = "eu"
    if msg.window_size == meter_pb2.WINDOW_SIZE_MINUTE:
        msg.start_time.seconds = msg.end_time.seconds - 3 * 3600


_FIXUPS: dict[str, Callable[[Builder, Any], None]] = {
    "usagebilling.meter.v1.Condition": _fix_condition,
    "usagebilling.billing.v1.UsagePrice": _fix_usage_price,
    "usagebilling.meter.v1.CreateMeterRequest": _fix_create_meter,
    "usagebilling.meter.v1.QueryUsageRequest": _fix_query_usage,
}


# --- messages from descriptors ----------------------------------------------------


@dataclass
class Builder:
    rng: random.Random
    pool: Pool
    rpc: Rpc
    now: int

    def context(self, desc: Desc) -> str:
        return (
            f"{self.rpc.server}:{self.rpc.service.rsplit('.', 1)[-1]}/{self.rpc.method}:{desc.name}"
        )

    def build(self, desc: Desc, depth: int = 0) -> Message:
        """A valid-looking message: most fields set, small repeated fields."""
        msg = GetMessageClass(desc)()
        done_oneofs: set[str] = set()
        for f in desc.fields:
            if f.containing_oneof is not None:
                if f.containing_oneof.name in done_oneofs:
                    continue
                f = self.rng.choice(f.containing_oneof.fields)
                done_oneofs.add(f.containing_oneof.name)
            if self.rng.random() < (0.02 if _essential(f) else 0.3):
                continue
            self.fill(msg, f, depth)
        fixup = _FIXUPS.get(desc.full_name)
        if fixup is not None:
            fixup(self, msg)
        return msg

    def fill(self, msg: Message, f: Field, depth: int) -> None:
        rng = self.rng
        ctx = self.context(msg.DESCRIPTOR)
        if _is_map(f):
            target = getattr(msg, f.name)
            value_field = f.message_type.fields_by_name["value"]
            for _ in range(rng.randrange(0, 4)):
                key = rng.choice(self.pool.properties) if f.name != "group_filter" else "region"
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(self.build(value_field.message_type, depth + 1))
                else:
                    target[key] = self.scalar(value_field, ctx, valid=True)
            return
        if f.is_repeated:
            target = getattr(msg, f.name)
            count = rng.choice([0, 1, 1, 2, 3]) if depth < 2 else rng.choice([0, 1])
            if _essential(f):
                count = max(count, 1)
            for _ in range(count):
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    target.add().CopyFrom(self.build(f.message_type, depth + 1))
                else:
                    target.append(self.scalar(f, ctx, valid=True))
            return
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, f.name)
            if f.message_type.full_name == "google.protobuf.Timestamp":
                sub.seconds, sub.nanos = valid_timestamp(rng, self.now, f.name)
            elif depth < 3:
                sub.CopyFrom(self.build(f.message_type, depth + 1))
            return
        setattr(msg, f.name, self.scalar(f, ctx, valid=True))

    def scalar(self, f: Field, ctx: str, *, valid: bool) -> Any:
        rng = self.rng
        t = f.type
        if t == FieldDescriptor.TYPE_STRING:
            return (
                valid_string(rng, self.pool, f.name, ctx)
                if valid
                else hostile_string(rng, self.pool, f.name)
            )
        if t == FieldDescriptor.TYPE_BYTES:
            return rng.randbytes(rng.randrange(0, 16 if valid else 4096))
        if t == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return rng.choice([0.5, 1.0, 2.25, 100.0]) if valid else hostile_double(rng)
        if t == FieldDescriptor.TYPE_ENUM:
            if valid:
                numbers = [v.number for v in f.enum_type.values if v.number]
                return rng.choice(numbers or [0])
            return hostile_enum(rng, f.enum_type)
        if valid:
            if f.name == "page_size":
                return rng.choice([0, 1, 2, 5])
            return rng.randrange(0, 1000)
        return hostile_int(rng, f)

    # --- mutation ---

    def mutate(self, msg: Message, depth: int = 0) -> str:
        """Sets one field somewhere in `msg` to a hostile value; returns its path."""
        rng = self.rng
        desc: Desc = msg.DESCRIPTOR
        fields: list[Field] = list(desc.fields)
        if not fields:
            return "(no fields)"
        # Walk into a set submessage now and then, so that nested fields get their turn.
        nested = [
            f
            for f in fields
            if f.type == FieldDescriptor.TYPE_MESSAGE
            and not _is_map(f)
            and (
                (f.is_repeated and len(getattr(msg, f.name)))
                or (not f.is_repeated and msg.HasField(f.name))
            )
        ]
        if nested and depth < 6 and rng.random() < 0.45:
            f = rng.choice(nested)
            if f.is_repeated:
                items = getattr(msg, f.name)
                i = rng.randrange(len(items))
                return f"{f.name}[{i}]." + self.mutate(items[i], depth + 1)
            return f"{f.name}." + self.mutate(getattr(msg, f.name), depth + 1)
        f = rng.choice(fields)
        self.hostile(msg, f)
        return str(f.name)

    def hostile(self, msg: Message, f: Field) -> None:
        rng = self.rng
        ctx = self.context(msg.DESCRIPTOR)
        if _is_map(f):
            target = getattr(msg, f.name)
            key_field = f.message_type.fields_by_name["key"]
            value_field = f.message_type.fields_by_name["value"]
            n = rng.choice([1, 2, 5, 60, 300])
            for _ in range(n):
                key = self.scalar(key_field, ctx, valid=rng.random() < 0.3)
                if n > 5:
                    key = key[:200]  # keep wide requests small
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    sub = self.build(value_field.message_type, 1)
                    if n <= 5 and rng.random() < 0.7:
                        self.mutate(sub, 1)
                    target[key].CopyFrom(sub)
                else:
                    value = self.scalar(value_field, ctx, valid=rng.random() < 0.5)
                    target[key] = value[:200] if n > 5 and isinstance(value, str) else value
            return
        if f.is_repeated:
            target = getattr(msg, f.name)
            roll = rng.randrange(5)
            del target[:]
            if roll == 0:
                return  # empty
            if roll == 4 and f.message_type is msg.DESCRIPTOR:  # deep (Filter.filters)
                _nest(msg, f.name, rng.choice([5, 30, 90, 99]))
                return
            count = rng.choice([2, 50, 200, 1001]) if roll < 3 else rng.choice([2000, 5000])
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                item = self.build(f.message_type, 2)
                if roll == 2:  # a hostile item, a few times (it may be wide itself)
                    self.mutate(item, 2)
                    count = rng.choice([2, 5, 20])
                # The same item many times: wide, but small to build and send.
                target.extend([item] * min(count, 1001))
            else:
                value = self.scalar(f, ctx, valid=roll == 1)
                if count > 50 and isinstance(value, (str, bytes)):
                    value = value[:100]  # keep wide requests small
                target.extend([value] * count)
            return
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, f.name)
            name = f.message_type.full_name
            if name == "google.protobuf.Timestamp":
                sub.seconds, sub.nanos = hostile_timestamp(rng, self.now)
                return
            roll = rng.randrange(3)
            if roll == 0:
                msg.ClearField(f.name)
            elif roll == 1:
                sub.Clear()
                sub.SetInParent()  # present but empty
            else:
                sub.CopyFrom(self.build(f.message_type, 1))
                self.mutate(sub, 1)
            return
        setattr(msg, f.name, self.scalar(f, ctx, valid=False))


def _nest(msg: Message, name: str, depth: int) -> None:
    for _ in range(depth):
        msg = getattr(msg, name).add() if _repeated(msg, name) else getattr(msg, name)
        msg.SetInParent()


def _repeated(msg: Message, name: str) -> bool:
    return bool(msg.DESCRIPTOR.fields_by_name[name].is_repeated)


def _is_map(f: Field) -> bool:
    return bool(f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry)


def _deep_filter(depth: int) -> Message:
    """A meter Filter nested `depth` levels (past the decoder's limit of 100 when deep)."""
    top = meter_pb2.Filter(conjunction=meter_pb2.CONJUNCTION_AND)
    node = top
    for _ in range(depth):
        node = node.filters.add()
    node.conditions.add(key="region", operator=meter_pb2.OPERATOR_EXISTS)
    return top


# --- raw bytes ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def raw_payload(b: Builder, desc: Desc) -> tuple[bytes, str]:
    """Bytes that are not a valid encoding of `desc` (or are, oddly), and how made."""
    rng = b.rng
    valid = b.build(desc).SerializeToString()
    strings = [f for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING]
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 80)), "random"
    if kind == 1 and len(valid) > 1:
        return valid[: rng.randrange(1, len(valid))], "truncated"
    if kind == 2 and valid:
        pos = rng.randrange(len(valid))
        return valid[:pos] + bytes([valid[pos] ^ (1 << rng.randrange(8))]) + valid[
            pos + 1 :
        ], "bit-flip"
    if kind == 3 and strings:  # a string field that is not UTF-8
        f = rng.choice(strings)
        bad = rng.choice([b"\xff\xfe", b"a\xed\xa0\x80", b"\xc0\x80", b"\x80", b"\xf4\x90\x80\x80"])
        return valid + _tag(f.number, 2) + _varint(len(bad)) + bad, f"non-utf8:{f.name}"
    if kind == 4 and desc.fields:  # a known field with the wrong wire type
        f = rng.choice(desc.fields)
        wire = rng.choice([0, 1, 2, 5])
        body = {
            0: _varint(rng.getrandbits(64)),
            1: rng.randbytes(8),
            2: b"\x03abc",
            5: rng.randbytes(4),
        }[wire]
        return valid + _tag(f.number, wire) + body, f"wire-type:{f.name}:{wire}"
    if kind == 5 and desc.fields:  # a length prefix far past the end
        f = rng.choice(desc.fields)
        return valid + _tag(f.number, 2) + _varint(rng.choice([2**31 - 1, 2**32, 2**63])), "length"
    if kind == 6:  # deep unknown groups / submessages
        depth = rng.choice([50, 101, 500])
        if rng.random() < 0.5:
            return _tag(999, 3) * depth + _tag(999, 4) * depth, f"groups:{depth}"
        inner = b""
        for _ in range(depth):
            inner = _tag(998, 2) + _varint(len(inner)) + inner
        return inner, f"nested:{depth}"
    if kind == 7:  # unknown fields only: a valid message (all defaults)
        return valid + _tag(rng.randrange(100, 2**29 - 1), 0) + _varint(7), "unknown-field"
    if kind == 8:  # negative enum / int32 written as 10-byte varint
        ints = [
            f
            for f in desc.fields
            if f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM)
        ]
        if ints:
            f = rng.choice(ints)
            return valid + _tag(f.number, 0) + _varint(
                rng.choice([-1, 2**40, 2**63])
            ), f"varint:{f.name}"
    if kind == 9 and desc.full_name == "usagebilling.meter.v1.CreateMeterRequest":
        msg = b.build(desc)
        msg.filter.CopyFrom(_deep_filter(rng.choice([99, 101, 150])))  # type: ignore[attr-defined]
        return msg.SerializeToString(), "deep-filter"
    return b"", "empty"


# --- cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    api_key: str
    admin_token: str
    service_token: str
    tenant_id: str
    other_api_key: str
    revoked_key: str


def _credentials(
    rng: random.Random, rpc: Rpc, s: Secrets
) -> tuple[str, tuple[tuple[str, str], ...]]:
    roll = rng.random()
    right = s.admin_token if rpc.admin else s.api_key
    if roll < 0.86:
        return "valid", (("authorization", f"Bearer {right}"),)
    if roll < 0.89:
        return "none", ()
    if roll < 0.91:
        return "wrong-key", (("authorization", f"Bearer ubk_{rng.randbytes(16).hex()}"),)
    if roll < 0.92:
        return "revoked-key", (("authorization", f"Bearer {s.revoked_key}"),)
    if roll < 0.94:
        wrong = s.api_key if rpc.admin else s.admin_token
        return "wrong-kind", (("authorization", f"Bearer {wrong}"),)
    if roll < 0.97:  # the admin or service token acting for a tenant named in a header
        tenant = rng.choice(
            [
                s.tenant_id,
                s.tenant_id.upper(),
                f"{{{s.tenant_id}}}",
                str(uuid.UUID(int=rng.getrandbits(128))),
                "a b",
                "*",
                ">",
                "a.b",
                "x" * 300,
                "",
                "..",
            ]
        )
        kind, token = rng.choice(
            [("admin-for-tenant", s.admin_token), ("service-for-tenant", s.service_token)]
        )
        return kind, (("authorization", f"Bearer {token}"), ("x-usagebilling-tenant", tenant))
    if roll < 0.98:
        return "other-tenant", (("authorization", f"Bearer {s.other_api_key}"),)
    header = rng.choice(
        [
            f"Basic {s.api_key}",
            "Bearer",
            "Bearer ",
            f"bearer   {right}",
            f"Bearer {right} extra",
            f"Bearer {right[:-1]}",
            "Bearer " + "x" * 5000,
        ]
    )
    return "malformed", (("authorization", header),)


def make_case(
    index: int, seed: int, rpcs: Sequence[Rpc], pool: Pool, secrets: Secrets, now: int
) -> Case:
    """Case `index` of run `seed`: which RPC (round robin, so every RPC gets its
    share), what to send, with which credentials."""
    rpc = rpcs[index % len(rpcs)]
    rng = random.Random(f"{seed}:{index}")
    b = Builder(rng, pool, rpc, now)
    credentials, metadata = _credentials(rng, rpc, secrets)
    count = rng.choice([1, 1, 1, 2, 3, 5]) if rpc.client_streaming else 1
    messages: list[Message | bytes] = []
    mutations: list[str] = []
    for _ in range(count):
        if rng.random() < 0.12:
            raw, how = raw_payload(b, rpc.input)
            messages.append(raw)
            mutations.append(f"raw:{how}")
            continue
        msg = b.build(rpc.input)
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3, 5])):
            mutations.append(b.mutate(msg))
        if msg.ByteSize() > MAX_CASE_BYTES:  # wide inside wide: keep the run quick
            msg = b.build(rpc.input)
            mutations.append(f"(over {MAX_CASE_BYTES} bytes: sent unmutated)")
        messages.append(msg)
    if rpc.client_streaming and rng.random() < 0.05:
        messages, mutations = [], ["empty-stream"]
    return Case(index, rpc, credentials, metadata, messages, mutations)


def now_seconds() -> int:
    return int(datetime.now(UTC).timestamp())
