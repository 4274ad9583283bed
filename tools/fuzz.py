"""`make fuzz`: every RPC of the three services, with requests generated from
the descriptors, fields mutated to hostile values, and raw bytes.

    python -m tools.fuzz [--seed 1] [--requests 20000] [--concurrency 6] [--out .run/fuzz]

Starts a private PostgreSQL and NATS (tools/devstack.py, under .run/test-<pid>/
as `make test` does, removed afterwards) and the three services
(tools/suite.py, as `make run` does, the billing scheduler off so that only
RPCs do work), sets up a tenant with real resources (meters, customers,
products, subscriptions, events, invoices, page tokens) so that mutated
requests reach deep paths with valid ids, then sends the requests
(tools/fuzz_gen.py) with the right credentials mostly, sometimes none or wrong
ones. The per-call deadline (60 s) is far above the 5 s limit, so a slow call is
measured rather than cut.

Fails (exit 1) on any INTERNAL or UNKNOWN status, any call over 5 s, any
traceback (or error line with an exception) in the services' logs, and any
service that died. Prints the counts per status and per RPC, and each class of
failure with a minimal reproduction (shrunk by re-sending smaller requests);
every failing case is written to <out>/failures.json, the logs stay in <out>/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tools.devstack import DEFAULT_BASE_DIR, REPO_ROOT, DevStack
from tools.fuzz_gen import Case, Pool, Rpc, Secrets, discover, make_case, now_seconds
from tools.suite import SERVICES, Suite, create_tenant
from tools.with_stack import remove_abandoned_runs
from usagebilling.billing.v1 import (
    customer_pb2,
    customer_pb2_grpc,
    invoice_pb2,
    invoice_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from usagebilling.common.v1 import quarantine_pb2, quarantine_pb2_grpc
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

SLOW_SECONDS = 5.0
DEADLINE_SECONDS = 60.0
# A server stream (ReplayEvents) is read this far, then cancelled by us.
STREAM_READ_LIMIT = 500
FAILING_CODES = frozenset({"INTERNAL", "UNKNOWN", "CLIENT_ERROR"})
# Shown in the report, without failing the run.
WORTH_A_LOOK = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "DATA_LOSS", "OUT_OF_RANGE"}
)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
SHRINK_CLASSES = 100
SHRINK_ATTEMPTS = 80


def _log(message: str) -> None:
    print(f"fuzz: {message}", file=sys.stderr, flush=True)


# --- the stack and the services ---------------------------------------------------


@contextlib.contextmanager
def services(out: Path, stack_dir: Path | None = None) -> Iterator[Suite]:
    """A private PostgreSQL and NATS under `stack_dir` (default <out>/stack;
    removed afterwards) and the three services, logging to <out>/logs/<service>.log."""
    stack_dir = stack_dir or out / "stack"
    shutil.rmtree(out / "logs", ignore_errors=True)
    stack = DevStack(stack_dir)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        out / "logs",
        extra_env={"USAGEBILLING_SCHEDULER_ENABLED": "false"},
    )
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(stack_dir, ignore_errors=True)


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def setup(suite: Suite) -> tuple[Pool, Secrets]:
    """A tenant with real resources (and a second tenant, for cross-tenant ids)."""
    pool = Pool()
    admin = (("authorization", f"Bearer {suite.admin_token}"),)
    tenant_id, api_key = create_tenant(suite, "fuzz")
    other_tenant_id, other_key = create_tenant(suite, "fuzz-other")
    pool.tenant_id, pool.other_tenant_id = tenant_id, other_tenant_id
    auth = (("authorization", f"Bearer {api_key}"),)
    other = (("authorization", f"Bearer {other_key}"),)
    now = datetime.now(UTC).replace(microsecond=0)
    with contextlib.ExitStack() as exits:
        ch = {s: exits.enter_context(grpc.insecure_channel(suite.address(s))) for s in SERVICES}
        tenants = tenant_pb2_grpc.TenantServiceStub(ch["billing"])
        for _ in range(2):
            key = tenants.CreateApiKey(
                tenant_pb2.CreateApiKeyRequest(tenant_id=tenant_id, description="spare"),
                metadata=admin,
            )
            pool.spare_key_ids.append(key.id)
        revoked = tenants.CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(tenant_id=tenant_id, description="revoked"),
            metadata=admin,
        )
        tenants.RevokeApiKey(tenant_pb2.RevokeApiKeyRequest(id=revoked.id), metadata=admin)

        meters = meter_pb2_grpc.MeterServiceStub(ch["meter"])
        pool.event_names = ["fz.tokens", "fz.calls"]
        for request in (
            meter_pb2.CreateMeterRequest(
                name="fz-tokens",
                event_name="fz.tokens",
                aggregation=meter_pb2.AGGREGATION_SUM,
                property="tokens",
                group_by=["region"],
            ),
            meter_pb2.CreateMeterRequest(
                name="fz-calls", event_name="fz.calls", aggregation=meter_pb2.AGGREGATION_COUNT
            ),
            meter_pb2.CreateMeterRequest(
                name="fz-max",
                event_name="fz.tokens",
                aggregation=meter_pb2.AGGREGATION_MAX,
                property="tokens",
                filter=meter_pb2.Filter(
                    conjunction=meter_pb2.CONJUNCTION_AND,
                    conditions=[
                        meter_pb2.Condition(key="region", operator=meter_pb2.OPERATOR_EXISTS)
                    ],
                ),
            ),
        ):
            pool.meter_ids.append(meters.CreateMeter(request, metadata=auth).id)
        pool.other_meter_ids.append(
            meters.CreateMeter(
                meter_pb2.CreateMeterRequest(
                    name="other", event_name="fz.tokens", aggregation=meter_pb2.AGGREGATION_COUNT
                ),
                metadata=other,
            ).id
        )

        customers = customer_pb2_grpc.CustomerServiceStub(ch["billing"])
        for i in range(3):
            customer = customers.CreateCustomer(
                customer_pb2.CreateCustomerRequest(
                    external_id=f"fz-cust-{i}", name=f"Fuzz {i}", email=f"fz{i}@example.com"
                ),
                metadata=auth,
            )
            pool.customer_ids.append(customer.id)
            pool.customer_external_ids.append(customer.external_id)

        products = product_pb2_grpc.ProductServiceStub(ch["billing"])
        monthly = products.CreateProduct(
            product_pb2.CreateProductRequest(
                name="fz-monthly",
                currency="USD",
                billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
                fixed_price_minor=1000,
                usage_prices=[
                    product_pb2.UsagePrice(
                        meter_id=pool.meter_ids[0],
                        model=product_pb2.PRICE_MODEL_PER_UNIT,
                        unit_price="0.01",
                        free_threshold="10",
                    ),
                    product_pb2.UsagePrice(
                        meter_id=pool.meter_ids[1],
                        model=product_pb2.PRICE_MODEL_GRADUATED,
                        tiers=[
                            product_pb2.PriceTier(up_to="10", unit_price="0.5"),
                            product_pb2.PriceTier(unit_price="0.1"),
                        ],
                    ),
                ],
            ),
            metadata=auth,
        )
        daily = products.CreateProduct(
            product_pb2.CreateProductRequest(
                name="fz-daily",
                currency="JPY",
                billing_interval=product_pb2.BILLING_INTERVAL_DAY,
                fixed_price_minor=5,
                usage_prices=[
                    product_pb2.UsagePrice(
                        meter_id=pool.meter_ids[0],
                        model=product_pb2.PRICE_MODEL_PACKAGE,
                        package_size="100",
                        package_price="3",
                    )
                ],
            ),
            metadata=auth,
        )
        pool.product_ids += [monthly.id, daily.id]

        subscriptions = subscription_pb2_grpc.SubscriptionServiceStub(ch["billing"])
        for customer_id, product_id, start in (
            (pool.customer_ids[0], monthly.id, now - timedelta(days=40)),
            (pool.customer_ids[1], daily.id, now - timedelta(days=3)),
            (pool.customer_ids[2], monthly.id, now),
        ):
            subscription = subscriptions.CreateSubscription(
                subscription_pb2.CreateSubscriptionRequest(
                    customer_id=customer_id, product_id=product_id, start_time=_ts(start)
                ),
                metadata=auth,
            )
            pool.subscription_ids.append(subscription.id)

        ingest = ingest_pb2_grpc.IngestServiceStub(ch["ingest"])
        events = []
        for i in range(24):
            event = ingest_pb2.Event(
                event_id=f"00000000-0000-4000-8000-{i:012d}",
                customer_id=pool.customer_external_ids[i % 3],
                event_name=pool.event_names[i % 2],
                timestamp=_ts(now - timedelta(days=i, minutes=i)),
            )
            event.metadata["tokens"].int_value = 10 * i
            event.metadata["region"].string_value = ("eu", "us")[i % 2]
            events.append(event)
        answer = ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=events), metadata=auth)
        if answer.rejections:
            raise RuntimeError(f"setup events rejected: {answer.rejections}")
        pool.event_ids = [e.event_id for e in events]

        invoices = invoice_pb2_grpc.InvoiceServiceStub(ch["billing"])
        run = invoices.RunBillingCycle(
            invoice_pb2.RunBillingCycleRequest(as_of=_ts(now)), metadata=auth, timeout=60
        )
        pool.invoice_ids = list(run.invoice_ids)

        # Real page tokens: a first page of one item of each List RPC.
        pages: dict[str, Callable[[], str]] = {
            "ListMeters": lambda: (
                meters.ListMeters(
                    meter_pb2.ListMetersRequest(page_size=1), metadata=auth
                ).next_page_token
            ),
            "ListCustomers": lambda: (
                customers.ListCustomers(
                    customer_pb2.ListCustomersRequest(page_size=1), metadata=auth
                ).next_page_token
            ),
            "ListProducts": lambda: (
                products.ListProducts(
                    product_pb2.ListProductsRequest(page_size=1), metadata=auth
                ).next_page_token
            ),
            "ListInvoices": lambda: (
                invoices.ListInvoices(
                    invoice_pb2.ListInvoicesRequest(page_size=1), metadata=auth
                ).next_page_token
            ),
            "ListEvents": lambda: (
                ingest.ListEvents(
                    ingest_pb2.ListEventsRequest(page_size=1), metadata=auth
                ).next_page_token
            ),
            "ListQuarantined": lambda: (
                quarantine_pb2_grpc.QuarantineServiceStub(ch["ingest"])
                .ListQuarantined(quarantine_pb2.ListQuarantinedRequest(page_size=1), metadata=admin)
                .next_page_token
            ),
        }
        for method, first_page in pages.items():
            try:
                token = first_page()
            except grpc.RpcError as exc:  # e.g. not served yet
                _log(f"setup: {method} answered {exc.code().name}; no real page token for it")
                continue
            if token:
                pool.page_tokens[method] = [token]
    secrets = Secrets(
        api_key=api_key,
        admin_token=suite.admin_token,
        # billing's: it may act for a tenant on two of meter's methods only.
        service_token=suite.service_tokens["billing"],
        tenant_id=tenant_id,
        other_api_key=other_key,
        revoked_key=revoked.secret,
    )
    return pool, secrets


# --- sending ------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    rpc: str
    code: str
    details: str
    seconds: float
    credentials: str
    mutations: list[str]
    messages_read: int = 0
    started: float = 0.0  # seconds since the first call
    # Seconds of this call during which the fuzzer's own event loop was stalled
    # (by a busy machine or a large request being built): not the server's time.
    stalled: float = 0.0

    @property
    def slow(self) -> bool:
        return self.seconds - self.stalled > SLOW_SECONDS

    @property
    def failed(self) -> bool:
        return self.code in FAILING_CODES or self.slow


class Sender:
    """Sends a case's bytes by method path (no serializer: the request is bytes).

    Client-streaming calls go through the synchronous client in a thread: when
    the server ends a call while the asyncio client is still writing (as on an
    auth failure), grpc.aio reports its own failed write as INTERNAL "Internal
    error from Core" instead of the server's status."""

    def __init__(self, suite: Suite, deadline: float = DEADLINE_SECONDS) -> None:
        self._channels = {
            s: grpc.aio.insecure_channel(suite.address(s), options=CHANNEL_OPTIONS)
            for s in SERVICES
        }
        self._sync_channels = {
            s: grpc.insecure_channel(suite.address(s), options=CHANNEL_OPTIONS) for s in SERVICES
        }
        self._deadline = deadline
        self.origin = time.perf_counter()
        self.stalls: list[tuple[float, float]] = []

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        for sync_channel in self._sync_channels.values():
            sync_channel.close()

    async def send(self, case: Case) -> Outcome:
        rpc = case.rpc
        payloads = case.payloads()
        started = time.perf_counter()
        try:
            if rpc.client_streaming:
                read = await asyncio.to_thread(self._stream_sync, case, payloads)
            else:
                read = await self._call(case, payloads[0])
            code, details = "OK", ""
        except grpc.RpcError as exc:  # both clients' errors (AioRpcError is one)
            code = exc.code().name  # type: ignore[attr-defined]
            details = exc.details() or ""  # type: ignore[attr-defined]
            read = 0
        except Exception as exc:  # the fuzzer's own failure: shown, and fails the run
            code, details, read = "CLIENT_ERROR", repr(exc), 0
        seconds = time.perf_counter() - started
        return Outcome(
            case.index,
            rpc.label,
            code,
            details[:500],
            seconds,
            case.credentials,
            case.mutations,
            read,
            started - self.origin,
        )

    async def _call(self, case: Case, payload: bytes) -> int:
        channel = self._channels[case.rpc.server]
        if not case.rpc.server_streaming:
            await channel.unary_unary(case.rpc.path, None, None)(
                payload, metadata=case.metadata, timeout=self._deadline
            )
            return 1
        call = channel.unary_stream(case.rpc.path, None, None)(
            payload, metadata=case.metadata, timeout=self._deadline
        )
        read = 0
        async for _ in call:
            read += 1
            if read >= STREAM_READ_LIMIT:
                call.cancel()
                break
        return read

    def _stream_sync(self, case: Case, payloads: list[bytes]) -> int:
        channel = self._sync_channels[case.rpc.server]
        call: Any = channel.stream_stream(case.rpc.path, None, None)(
            iter(payloads), metadata=case.metadata, timeout=self._deadline
        )
        read = 0
        for _ in call:
            read += 1
            if read >= STREAM_READ_LIMIT:
                call.cancel()
                break
        return read


async def run_cases(
    sender: Sender,
    cases: Callable[[int], Case],
    count: int,
    concurrency: int,
    progress: Callable[[int], None] = lambda done: None,
) -> tuple[list[Outcome], dict[int, Case]]:
    """Sends cases 0..count-1, `concurrency` at a time; keeps the failing cases."""
    outcomes: list[Outcome] = []
    failing: dict[int, Case] = {}
    next_index = 0
    stalls: list[tuple[float, float]] = []  # (from, to), seconds since sender.origin
    running = True

    async def watch_loop() -> None:
        """Notes when this process's event loop could not run for a while."""
        tick = 0.05
        while running:
            before = time.perf_counter()
            await asyncio.sleep(tick)
            lag = time.perf_counter() - before - tick
            if lag > 0.25:
                stalls.append((before - sender.origin, before - sender.origin + tick + lag))

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            case = cases(index)
            outcome = await sender.send(case)
            outcomes.append(outcome)
            if outcome.code in FAILING_CODES or outcome.seconds > SLOW_SECONDS:
                failing[index] = case
            if len(outcomes) % 1000 == 0:
                progress(len(outcomes))

    watcher = asyncio.create_task(watch_loop())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        running = False
        await watcher
    for index in list(failing):
        outcome = next(o for o in outcomes if o.index == index)
        end = outcome.started + outcome.seconds
        outcome.stalled = sum(max(0.0, min(end, b) - max(outcome.started, a)) for a, b in stalls)
        if not outcome.failed:
            del failing[index]
    sender.stalls = stalls
    outcomes.sort(key=lambda o: o.index)
    return outcomes, failing


# --- failure classes and shrinking --------------------------------------------------

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)


def failure_class(outcome: Outcome) -> tuple[str, str, str]:
    """(rpc, code or SLOW, message with ids and numbers blanked)."""
    if outcome.code in FAILING_CODES:
        text = _UUID.sub("<id>", outcome.details)
        text = re.sub(r"\d+", "N", text)[:160]
        return outcome.rpc, outcome.code, text
    return outcome.rpc, "SLOW", f"over {SLOW_SECONDS:g} s"


def _smaller(msg: Message) -> Iterator[Message]:
    """Copies of `msg` with one thing less: a field cleared, a repeated field
    or map cut to one item, or the same inside a submessage."""
    fields: list[tuple[Any, Any]] = list(msg.ListFields())
    for fd, value in fields:
        trial = type(msg)()
        trial.CopyFrom(msg)
        trial.ClearField(fd.name)
        yield trial
        if fd.type == fd.TYPE_STRING and not fd.is_repeated and len(value) > 1:
            for part in (value[: len(value) // 2], value[len(value) // 2 :]):
                trial = type(msg)()
                trial.CopyFrom(msg)
                setattr(trial, fd.name, part)
                yield trial
        if fd.is_repeated and len(value) > 1:
            is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
            for keep in (0, len(value) - 1):
                trial = type(msg)()
                trial.CopyFrom(msg)
                target = getattr(trial, fd.name)
                if is_map:
                    keys = list(target.keys())
                    for key in keys[:keep] + keys[keep + 1 :]:
                        del target[key]
                else:
                    item = target[keep]
                    if fd.type == fd.TYPE_MESSAGE:
                        saved = type(item)()
                        saved.CopyFrom(item)
                        del target[:]
                        target.add().CopyFrom(saved)
                    else:
                        del target[:]
                        target.append(item)
                yield trial
        if fd.type == fd.TYPE_MESSAGE and not fd.is_repeated:
            for sub in _smaller(value):
                trial = type(msg)()
                trial.CopyFrom(msg)
                getattr(trial, fd.name).CopyFrom(sub)
                yield trial
        elif fd.type == fd.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            for i, item in enumerate(value):
                if i > 2:
                    break
                for sub in _smaller(item):
                    trial = type(msg)()
                    trial.CopyFrom(msg)
                    getattr(trial, fd.name)[i].CopyFrom(sub)
                    yield trial


async def shrink(sender: Sender, case: Case, outcome: Outcome) -> tuple[Case, Outcome]:
    """A smaller case that fails the same way (same RPC, code and message class)."""
    target = failure_class(outcome)
    attempts = 0

    async def same(trial: Case) -> Outcome | None:
        nonlocal attempts
        attempts += 1
        result = await sender.send(trial)
        return result if result.failed and failure_class(result) == target else None

    best, best_outcome = case, outcome
    # A stream: one message alone may do.
    if len(best.messages) > 1:
        for m in best.messages:
            trial = Case(best.index, best.rpc, best.credentials, best.metadata, [m], best.mutations)
            if (found := await same(trial)) is not None:
                best, best_outcome = trial, found
                break
    progress = True
    while progress and attempts < SHRINK_ATTEMPTS:
        progress = False
        messages = best.messages
        for position, message in enumerate(messages):
            candidates: Iterator[Message | bytes]
            if isinstance(message, bytes):
                candidates = iter(
                    [message[: len(message) // 2], message[len(message) // 2 :], message[:-1]]
                    if len(message) > 1
                    else []
                )
            else:
                candidates = _smaller(message)
            for smaller in candidates:
                if attempts >= SHRINK_ATTEMPTS:
                    break
                trial_messages = [*messages[:position], smaller, *messages[position + 1 :]]
                trial = Case(
                    best.index,
                    best.rpc,
                    best.credentials,
                    best.metadata,
                    trial_messages,
                    best.mutations,
                )
                if (found := await same(trial)) is not None:
                    best, best_outcome, progress = trial, found, True
                    break
            if progress:
                break
    return best, best_outcome


# --- the services' logs -------------------------------------------------------------


@dataclass
class LogFinding:
    service: str
    what: str  # the event and the exception's last line
    method: str
    count: int = 0
    sample: str = ""


def scan_logs(log_dir: Path) -> tuple[list[LogFinding], list[LogFinding]]:
    """Tracebacks, and error lines that carry an exception, per service: JSON
    lines of structlog (exception field) and raw tracebacks printed to stderr.
    Second: the other warning and error lines, by event (shown, not failing)."""
    findings: dict[tuple[str, str, str], LogFinding] = {}
    notes: dict[tuple[str, str, str], LogFinding] = {}

    def add(service: str, what: str, method: str, sample: str) -> None:
        what = _UUID.sub("<id>", what)
        key = (service, what, method)
        finding = findings.setdefault(key, LogFinding(service, what, method, 0, sample[-3000:]))
        finding.count += 1

    for service in SERVICES:
        path = log_dir / f"{service}.log"
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            record: Any = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
            if isinstance(record, dict):
                exception = str(record.get("exception") or "")
                level = str(record.get("level", ""))
                if exception or "Traceback" in line:
                    last = (exception.strip().splitlines() or [""])[-1]
                    what = f"{level} {record.get('event', '')}: {last[:200]}"
                    add(service, what, str(record.get("method", "")), exception or line)
                elif level in ("warning", "error", "critical"):
                    key = (service, f"{level} {record.get('event', '')}", "")
                    note = notes.setdefault(key, LogFinding(*key, 0, line[:1000]))
                    note.count += 1
                i += 1
                continue
            if line.startswith("Traceback (most recent call last)"):
                block = [line]
                i += 1
                while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i]):
                    block.append(lines[i])
                    i += 1
                # The exception line, then perhaps chained tracebacks: keep the last.
                while i < len(lines) and not lines[i].startswith("{"):
                    block.append(lines[i])
                    i += 1
                    if lines[i - 1].startswith(("Traceback", "During handling", "The above")):
                        continue
                last = next((b for b in reversed(block) if b and not b.startswith(" ")), "")
                add(service, f"raw traceback: {last[:200]}", "", "\n".join(block))
                continue
            i += 1

    def order(f: LogFinding) -> tuple[int, str, str]:
        return -f.count, f.service, f.what

    return sorted(findings.values(), key=order), sorted(notes.values(), key=order)


# --- the whole run ------------------------------------------------------------------


@dataclass
class Result:
    seed: int
    rpcs: list[Rpc]
    outcomes: list[Outcome]
    seconds: float
    # failure class -> (count, minimal case, its outcome, first outcome)
    classes: dict[tuple[str, str, str], tuple[int, Case, Outcome, Outcome]]
    logs: list[LogFinding]
    log_notes: list[LogFinding] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    failing_cases: list[dict[str, Any]] = field(default_factory=list)
    # When the fuzzer's own event loop stalled (from, to), seconds since the first call.
    stalls: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.classes and not self.logs and not self.dead

    def status_counts(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes)

    def report(self, examples: int = 3) -> str:
        out: list[str] = []
        n = len(self.outcomes)
        rate = n / self.seconds if self.seconds else 0.0
        out.append(
            f"fuzz: seed {self.seed}: {n} requests over {len(self.rpcs)} RPCs"
            f" in {self.seconds:.1f} s ({rate:.0f}/s)"
        )
        out.append("\ncounts per status:")
        for code, count in self.status_counts().most_common():
            out.append(f"  {code:<20} {count:>7}")
        slow_count = sum(o.slow for o in self.outcomes)
        out.append(f"  {'(over ' + format(SLOW_SECONDS, 'g') + ' s)':<20} {slow_count:>7}")
        durations = sorted(o.seconds for o in self.outcomes)
        if durations:
            p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))]
            out.append(
                f"  durations: p50 {durations[len(durations) // 2] * 1000:.1f} ms,"
                f" p99 {p99 * 1000:.1f} ms, max {durations[-1]:.2f} s"
            )
        out.append("\ncounts per RPC:")
        per_rpc: dict[str, Counter[str]] = defaultdict(Counter)
        for o in self.outcomes:
            per_rpc[o.rpc][o.code] += 1
        width = max((len(r.label) for r in self.rpcs), default=20)
        for rpc in self.rpcs:
            counts = per_rpc.get(rpc.label, Counter())
            parts = " ".join(f"{code}={c}" for code, c in counts.most_common())
            out.append(f"  {rpc.label:<{width}} {sum(counts.values()):>6}  {parts}")
        if self.classes:
            total = sum(c[0] for c in self.classes.values())
            out.append(f"\nFAILURES: {total} failing calls in {len(self.classes)} classes")
            for number, (key, (count, case, outcome, first)) in enumerate(
                sorted(self.classes.items(), key=lambda kv: (kv[0][0], -kv[1][0])), 1
            ):
                label, code, message = key
                out.append(f"[{number}] {label} {code} x{count}: {message!r}")
                out.append(
                    f"    minimal: {case.rpc.path} credentials={case.credentials}"
                    f" -> {outcome.code} {outcome.details[:200]!r} in {outcome.seconds:.3f} s"
                )
                out.append(f"    request: {case.describe(limit=600)}")
                out.append(
                    f"    first seen: case #{first.index} (seed {self.seed}),"
                    f" mutations {first.mutations[:6]}"
                )
        odd = Counter(
            (o.rpc, o.code, _UUID.sub("<id>", o.details)[:120])
            for o in self.outcomes
            if o.code in WORTH_A_LOOK
        )
        if odd:
            out.append("\nstatuses worth a look (not failures: a dependency, or a client")
            out.append("mistake answered as if it were one?):")
            for (label, code, message), count in odd.most_common(20):
                out.append(f"  {label} {code} x{count}: {message!r}")
        slow = sorted((o for o in self.outcomes if o.slow), key=lambda o: o.started)
        if slow:
            out.append("\nslow calls in the order they started (the first of a cluster is")
            out.append("often the cause, the others waited behind it on the same server):")
            for o in slow[:20]:
                out.append(
                    f"  +{o.started:7.2f} s  {o.seconds:6.2f} s  {o.rpc} {o.code}"
                    f" case #{o.index} {o.mutations[:4]} {o.details[:100]!r}"
                )
        if self.stalls:
            longest = max(b - a for a, b in self.stalls)
            out.append(
                f"\nthe fuzzer's own event loop stalled {len(self.stalls)} times (longest"
                f" {longest:.2f} s); that time is not counted against the calls it overlapped"
            )
        if self.logs:
            out.append(f"\nLOG FINDINGS: {sum(f.count for f in self.logs)} lines")
            for finding in self.logs:
                method = f" [{finding.method}]" if finding.method else ""
                out.append(f"  {finding.service}.log x{finding.count}{method}: {finding.what}")
            for finding in self.logs[:examples]:
                out.append(f"--- {finding.service}.log sample ---\n{finding.sample[-1500:]}")
        if self.log_notes:
            out.append("\nother warning and error lines in the logs (not failures):")
            for note in self.log_notes:
                out.append(f"  {note.service}.log x{note.count}: {note.what}")
        if self.dead:
            out.append(f"\nDEAD SERVICES: {', '.join(self.dead)}")
        out.append("\nfuzz: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(out)


async def fuzz(
    suite: Suite,
    *,
    seed: int,
    requests: int,
    concurrency: int,
    only: str = "",
    shrink_failures: bool = True,
) -> Result:
    """Sets up the tenant, sends the cases, shrinks one case of each failure
    class; the logs are read by the caller once the services have stopped."""
    rpcs = [r for r in discover() if only in r.label]
    pool, secrets = setup(suite)
    now = now_seconds()
    sender = Sender(suite)
    started = time.monotonic()
    try:
        outcomes, failing = await run_cases(
            sender,
            lambda i: make_case(i, seed, rpcs, pool, secrets, now),
            requests,
            concurrency,
            lambda done: _log(f"{done}/{requests} sent, {time.monotonic() - started:.0f} s"),
        )
        seconds = time.monotonic() - started
        classes: dict[tuple[str, str, str], tuple[int, Case, Outcome, Outcome]] = {}
        counts: Counter[tuple[str, str, str]] = Counter()
        for outcome in outcomes:
            if outcome.failed:
                key = failure_class(outcome)
                counts[key] += 1
                if key not in classes:
                    classes[key] = (0, failing[outcome.index], outcome, outcome)
        for number, key in enumerate(list(classes)):
            _, case, outcome, first = classes[key]
            if shrink_failures and number < SHRINK_CLASSES and key[1] != "SLOW":
                case, outcome = await shrink(sender, case, outcome)
            classes[key] = (counts[key], case, outcome, first)
    finally:
        await sender.close()
    result = Result(seed, rpcs, outcomes, seconds, classes, logs=[], stalls=sender.stalls)
    by_index = {o.index: o for o in outcomes}
    result.failing_cases = [
        {
            "case": index,
            "rpc": case.rpc.path,
            "server": case.rpc.server,
            "credentials": case.credentials,
            "metadata": [list(m) for m in case.metadata if m[0] != "authorization"],
            "request": case.describe(),
            "request_hex": [p.hex() for p in case.payloads()],
            "mutations": case.mutations,
            "status": by_index[index].code,
            "message": by_index[index].details,
            "seconds": round(by_index[index].seconds, 3),
            "stalled": round(by_index[index].stalled, 3),
        }
        for index, case in sorted(failing.items())
    ]
    return result


def run(
    out: Path,
    *,
    seed: int,
    requests: int,
    concurrency: int,
    only: str = "",
    shrink_failures: bool = True,
    stack_dir: Path | None = None,
) -> Result:
    """Starts everything under `out`, fuzzes, stops, reads the logs."""
    out.mkdir(parents=True, exist_ok=True)
    with services(out, stack_dir) as suite:
        result = asyncio.run(
            fuzz(
                suite,
                seed=seed,
                requests=requests,
                concurrency=concurrency,
                only=only,
                shrink_failures=shrink_failures,
            )
        )
        result.dead = suite.dead()
    # After the services stopped: a traceback at shutdown counts too.
    result.logs, result.log_notes = scan_logs(out / "logs")
    (out / "failures.json").write_text(json.dumps(result.failing_cases, indent=1))
    with (out / "outcomes.jsonl").open("w") as lines:
        for o in result.outcomes:
            lines.write(json.dumps(o.__dict__) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".run" / "fuzz")
    parser.add_argument("--only", default="", help="only RPCs whose label contains this")
    parser.add_argument("--no-shrink", action="store_true")
    args = parser.parse_args(argv)
    # The stack where tools.with_stack keeps its own, so that the folder (and
    # servers) of a killed run are cleaned up by the next run of either.
    remove_abandoned_runs()
    result = run(
        args.out,
        seed=args.seed,
        requests=args.requests,
        concurrency=args.concurrency,
        only=args.only,
        shrink_failures=not args.no_shrink,
        stack_dir=DEFAULT_BASE_DIR / f"test-{os.getpid()}",
    )
    print(result.report())
    print(f"fuzz: logs in {args.out / 'logs'}, every failing case in {args.out / 'failures.json'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
