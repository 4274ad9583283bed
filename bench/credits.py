"""Benchmark: credit balances (issue 13, step 5).

One customer ("heavy") on a daily product whose tokens price draws credits
has 1,000,000 events in its current period (sent backdated over the last 50
minutes, one token each). Once meter has counted them and billing has settled
the ledger, GetCreditBalance for that customer is timed (sequential calls:
credit_balance_p50_ms / _p99_ms). Then, under a paced load of 20,000 events/s
from other customers, a probe customer sends one event every 200 ms and the
time from its ack until GetCreditBalance shows it is measured
(credit_reflect_p99_ms; the load reached is credit_load_events_per_s).

    python -m bench.credits [--events N] [--balance-calls N] [--load-seconds S]
                            [--diagnose] [--profile DIR]   (its own PostgreSQL, NATS and suite)

--diagnose loads pg_stat_statements and prints, per phase (balance, reflect),
the statements that took PostgreSQL's time, and splits each probe's
reflection into meter's part (ack until QueryUsage shows it) and the rest;
--profile DIR records billing and meter with py-spy (PY_SPY or on PATH) per
phase, as collapsed stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from tools.credit_setup import credit_product
from tools.suite import Suite, create_tenant
from usagebilling.billing.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
)
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

EVENTS = 1_000_000
BATCH = 500
CONCURRENCY = 8
BALANCE_CALLS = 1_000
LOAD_RATE = 20_000
LOAD_SECONDS = 15.0
LOAD_CUSTOMERS = 1_000
PROBE_EVERY = 0.2
# How often a probe's balance is asked until it shows the probe event.
PROBE_POLL = 0.01
PROBE_TIMEOUT = 60.0
RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


def _log(message: str) -> None:
    print(f"credits_bench: {message}", file=sys.stderr, flush=True)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _event(event_id: str, customer: str, when: datetime) -> ingest_pb2.Event:
    message = ingest_pb2.Event(event_id=event_id, customer_id=customer, event_name="llm.call")
    message.timestamp.FromDatetime(when)
    message.metadata["tokens"].int_value = 1
    return message


async def _setup(suite: Suite, auth: Any, channel: Any, meter: Any) -> tuple[str, str]:
    """Meter, credit type, product, and the two subscribed customers."""
    meter_id = (
        await meter.CreateMeter(
            meter_pb2.CreateMeterRequest(
                name="tokens",
                event_name="llm.call",
                aggregation=meter_pb2.AGGREGATION_SUM,
                property="tokens",
            ),
            metadata=auth,
        )
    ).id
    credits = credit_pb2_grpc.CreditServiceStub(channel)
    type_id = (
        await credits.CreateCreditType(
            credit_pb2.CreateCreditTypeRequest(
                name="tokens", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=0
            ),
            metadata=auth,
        )
    ).id
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    customers = [
        (
            await customer_pb2_grpc.CustomerServiceStub(channel).CreateCustomer(
                customer_pb2.CreateCustomerRequest(external_id=name), metadata=auth
            )
        ).id
        for name in ("heavy", "probe")
    ]
    await credit_product(
        channel,
        auth,
        name="Tokens",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_FORGIVE,
        unit_price="0.000005",
        included="1000000000000",
        customer_ids=customers,
        start=start,
    )
    return meter_id, type_id


async def _send_history(ingest: Any, auth: Any, events: int) -> None:
    """`events` events of "heavy", spread over [now - 51 min, now - 1 min)."""
    end = datetime.now(UTC) - timedelta(minutes=1)
    step = timedelta(minutes=50) / events
    limit = asyncio.Semaphore(CONCURRENCY)

    async def batch(first: int) -> None:
        request = ingest_pb2.IngestEventsRequest(
            events=[
                _event(f"h{i}", "heavy", end - step * (i + 1))
                for i in range(first, min(events, first + BATCH))
            ]
        )
        async with limit:
            for attempt in range(5):
                try:
                    await ingest.IngestEvents(request, metadata=auth, timeout=120)
                    return
                except grpc.aio.AioRpcError as exc:
                    # An overloaded machine: the same event ids again are
                    # duplicates for ingest, never counted twice.
                    if exc.code() not in RETRYABLE or attempt == 4:
                        raise
                    await asyncio.sleep(2**attempt)

    await asyncio.gather(*(batch(first) for first in range(0, events, BATCH)))


async def _counted(meter: Any, auth: Any, meter_id: str, customer: str, value: int) -> None:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id=customer)
    request.start_time.FromDatetime(datetime.now(UTC) - timedelta(hours=2))
    request.end_time.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    deadline = time.perf_counter() + 900
    while time.perf_counter() < deadline:
        answer = await meter.QueryUsage(request, metadata=auth, timeout=60)
        if answer.rows and Decimal(answer.rows[0].value) >= value:
            return
        await asyncio.sleep(1)
    raise RuntimeError(f"meter did not count {value} events of {customer} in 900 s")


async def _paced(ingest: Any, auth: Any, rate: int, seconds: float) -> float:
    """Sends `rate` events/s of other customers for `seconds`; returns the rate reached."""
    calls = []
    began = time.perf_counter()
    for n in range(int(rate * seconds / BATCH)):
        await asyncio.sleep(max(0.0, began + n * BATCH / rate - time.perf_counter()))
        now = datetime.now(UTC)
        request = ingest_pb2.IngestEventsRequest(
            events=[_event(f"l{n}-{i}", f"load-{i % LOAD_CUSTOMERS}", now) for i in range(BATCH)]
        )
        calls.append(asyncio.ensure_future(ingest.IngestEvents(request, metadata=auth, timeout=60)))
    answers = await asyncio.gather(*calls, return_exceptions=True)
    # What ingest accepted, per second of the whole send (refused batches are
    # the load this machine could not take: the figure says so).
    accepted: int = sum(a.accepted_count for a in answers if not isinstance(a, BaseException))
    if failed := sum(isinstance(a, BaseException) for a in answers):
        _log(f"{failed} of {len(answers)} load batches failed")
    return accepted / (time.perf_counter() - began)


class Diagnostics:
    """Per phase: PostgreSQL's statements (pg_stat_statements, loaded by the
    standalone stack) and, with a profile directory, py-spy of billing and meter."""

    def __init__(self, suite: Suite, profile: Path | None) -> None:
        self.suite = suite
        self.profile = profile
        self.meter_ms: list[float] = []

    async def _stats(self, query: str) -> list[Any]:
        conn = await asyncpg.connect(self.suite.database_url)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            return list(await conn.fetch(query))
        finally:
            await conn.close()

    async def _background(self) -> dict[str, int]:
        """How often PostgreSQL's background work (autovacuum, checkpoints)
        was seen running, sampled until cancelled."""
        seen: dict[str, int] = {}
        conn = await asyncpg.connect(self.suite.database_url)
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT backend_type, coalesce(wait_event, 'cpu') AS doing"
                    " FROM pg_stat_activity WHERE backend_type IN ('autovacuum worker',"
                    " 'checkpointer') AND (backend_type <> 'checkpointer' OR"
                    " wait_event IS DISTINCT FROM 'CheckpointerMain')"
                )
                for r in rows:
                    key = f"{r['backend_type']} {r['doing']}"
                    seen[key] = seen.get(key, 0) + 1
                await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            return seen
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        await self._stats("SELECT pg_stat_statements_reset()")
        spies = []
        if self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            spy = os.environ.get("PY_SPY") or shutil.which("py-spy") or "py-spy"
            for service in ("billing", "meter"):
                out = self.profile / f"{name}-{service}.txt"
                pid = str(self.suite.processes[service].pid)
                command = [spy, "record", "--nonblocking", "--format", "raw", "-r", "200"]
                spies.append(
                    subprocess.Popen(
                        [*command, "-o", str(out), "-p", pid],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        load = os.getloadavg()[0]
        began = time.perf_counter()
        activity = asyncio.ensure_future(self._background())
        try:
            yield
        finally:
            activity.cancel()
            busy = await activity
            _log(
                f"{name}: load average {load:.1f} -> {os.getloadavg()[0]:.1f} over"
                f" {time.perf_counter() - began:.0f} s; PostgreSQL's own work seen"
                f" (pg_stat_activity, every 0.5 s): {busy or 'none'}"
            )
            for spy_process in spies:
                spy_process.send_signal(signal.SIGINT)
                spy_process.wait(30)
            rows = await self._stats(
                "SELECT calls, total_exec_time AS total, mean_exec_time AS mean, query"
                " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15"
            )
            _log(f"{name}: PostgreSQL's statements by total time (calls, total ms, mean ms):")
            for r in rows:
                text = " ".join(r["query"].split())[:150]
                _log(f"  {r['calls']:>8} {r['total']:>10.1f} {r['mean']:>8.3f}  {text}")


async def run(
    suite: Suite,
    *,
    events: int = EVENTS,
    balance_calls: int = BALANCE_CALLS,
    load_seconds: float = LOAD_SECONDS,
    poll: float = PROBE_POLL,
    diagnostics: Diagnostics | None = None,
) -> dict[str, float]:
    _, secret = create_tenant(suite, f"credits-bench-{uuid.uuid4().hex[:8]}")
    auth = (("authorization", f"Bearer {secret}"),)
    billing = grpc.aio.insecure_channel(suite.address("billing"))
    ingest_channel = grpc.aio.insecure_channel(suite.address("ingest"))
    meter_channel = grpc.aio.insecure_channel(suite.address("meter"))
    try:
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        meter = meter_pb2_grpc.MeterServiceStub(meter_channel)
        credits = credit_pb2_grpc.CreditServiceStub(billing)
        meter_id, type_id = await _setup(suite, auth, billing, meter)
        began = time.perf_counter()
        await _send_history(ingest, auth, events)
        _log(f"{events} events sent in {time.perf_counter() - began:.0f} s")
        await _counted(meter, auth, meter_id, "heavy", events)
        _log("counted by meter")

        async def balance(customer: str) -> credit_pb2.CreditBalance:
            answer: credit_pb2.CreditBalance = await credits.GetCreditBalance(
                credit_pb2.GetCreditBalanceRequest(customer_id=customer, credit_type_id=type_id),
                metadata=auth,
                timeout=30,
            )
            return answer

        # Settled: the ledger has caught up with the history (settled_until
        # within the last two minutes, every event drawn), so that the balance
        # reads only the fresh minutes live.
        expected = 1_000_000_000_000 - events
        deadline = time.perf_counter() + 600
        while True:
            answer = await balance("heavy")
            settled = answer.settled_until.ToDatetime(tzinfo=UTC)
            recent = settled > datetime.now(UTC) - timedelta(minutes=2)
            if answer.HasField("settled_until") and recent and answer.available == str(expected):
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"heavy's balance is {answer.available}, expected {expected}")
            await asyncio.sleep(1)
        phase = diagnostics.phase if diagnostics else _no_phase
        samples = []
        async with phase("balance"):
            for _ in range(balance_calls):
                started = time.perf_counter()
                await balance("heavy")
                samples.append((time.perf_counter() - started) * 1000)
        _log(
            f"balance p50 {statistics.median(samples):.1f} ms, "
            f"p99 {_percentile(samples, 0.99):.1f} ms over {len(samples)} calls"
        )
        if diagnostics:
            slowest = sorted(range(len(samples)), key=lambda i: -samples[i])[:12]
            _log(
                "slowest calls (call number: ms): "
                + ", ".join(f"{i}: {samples[i]:.0f}" for i in sorted(slowest))
            )
        # For comparison: the one meter read a balance makes (the minutes since
        # the last settled one), asked of meter directly.
        minutes = meter_pb2.QueryUsageRequest(
            meter_id=meter_id, customer_id="heavy", window_size=meter_pb2.WINDOW_SIZE_MINUTE
        )
        minutes.start_time.CopyFrom(answer.settled_until)
        minutes.end_time.FromDatetime(datetime.now(UTC) + timedelta(minutes=1))
        reads = []
        for _ in range(200):
            started = time.perf_counter()
            await meter.QueryUsage(minutes, metadata=auth, timeout=30)
            reads.append((time.perf_counter() - started) * 1000)

        # Reflection under load: a probe event every PROBE_EVERY seconds.
        stop = asyncio.Event()
        reflect: list[float] = []

        usage = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id="probe")
        usage.start_time.FromDatetime(datetime.now(UTC) - timedelta(hours=2))
        usage.end_time.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
        skipped = 0

        async def probe() -> None:
            nonlocal skipped
            n = 0
            last = Decimal((await balance("probe")).available)
            while not stop.is_set():
                n += 1
                try:
                    await ingest.IngestEvents(
                        ingest_pb2.IngestEventsRequest(
                            events=[_event(f"p{n}", "probe", datetime.now(UTC))]
                        ),
                        metadata=auth,
                        timeout=60,
                    )
                except grpc.aio.AioRpcError as exc:
                    # Refused under the load (not acknowledged): nothing to time.
                    _log(f"probe {n} not acknowledged: {exc.code().name}")
                    skipped += 1
                    last = Decimal((await balance("probe")).available)
                    continue
                acked = time.perf_counter()
                counted = diagnostics is None
                while Decimal((await balance("probe")).available) != last - 1:
                    if time.perf_counter() - acked > PROBE_TIMEOUT:
                        raise RuntimeError(f"probe {n} not in the balance {PROBE_TIMEOUT} s on")
                    if not counted and diagnostics:
                        # Meter's part of the reflection: its own answer counts the probe.
                        answer = await meter.QueryUsage(usage, metadata=auth, timeout=30)
                        if answer.rows and Decimal(answer.rows[0].value) >= n - skipped:
                            diagnostics.meter_ms.append((time.perf_counter() - acked) * 1000)
                            counted = True
                    await asyncio.sleep(poll)
                if not counted and diagnostics:
                    diagnostics.meter_ms.append((time.perf_counter() - acked) * 1000)
                reflect.append((time.perf_counter() - acked) * 1000)
                last -= 1
                await asyncio.sleep(PROBE_EVERY)

        async with phase("reflect"):
            prober = asyncio.ensure_future(probe())
            reached = await _paced(ingest, auth, LOAD_RATE, load_seconds)
            stop.set()
            await prober
        figures = {
            "credit_balance_p50_ms": statistics.median(samples),
            "credit_balance_p99_ms": _percentile(samples, 0.99),
            "credit_meter_read_p50_ms": statistics.median(reads),
            "credit_reflect_p50_ms": statistics.median(reflect),
            "credit_reflect_p99_ms": _percentile(reflect, 0.99),
            "credit_load_events_per_s": reached,
        }
        if diagnostics and diagnostics.meter_ms:
            figures["credit_reflect_meter_p50_ms"] = statistics.median(diagnostics.meter_ms)
            figures["credit_reflect_meter_p99_ms"] = _percentile(diagnostics.meter_ms, 0.99)
        _log(", ".join(f"{k} {v:,.1f}" for k, v in figures.items()))
        return figures
    finally:
        for channel in (billing, ingest_channel, meter_channel):
            await channel.close(None)


@contextlib.asynccontextmanager
async def _no_phase(name: str) -> AsyncIterator[None]:
    yield


async def _standalone(args: argparse.Namespace) -> dict[str, float]:
    from tools.devstack import DEFAULT_BASE_DIR, DEFAULT_PG_SETTINGS, DevStack

    base = DEFAULT_BASE_DIR / "bench-credits"
    shutil.rmtree(base, ignore_errors=True)
    settings = dict(DEFAULT_PG_SETTINGS)
    if args.diagnose or args.profile:
        settings["shared_preload_libraries"] = "pg_stat_statements"
    stack = DevStack(base, pg_settings=settings)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        base / "logs",
        extra_env={
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            "USAGEBILLING_LOG_LEVEL": "warning",
            "USAGEBILLING_INGEST_RATE_LIMIT": "0",
        },
    )
    try:
        suite.start()
        diagnostics = Diagnostics(suite, args.profile) if args.diagnose or args.profile else None
        return await run(
            suite,
            events=args.events,
            balance_calls=args.balance_calls,
            load_seconds=args.load_seconds,
            poll=args.probe_poll,
            diagnostics=diagnostics,
        )
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--balance-calls", type=int, default=BALANCE_CALLS)
    parser.add_argument("--load-seconds", type=float, default=LOAD_SECONDS)
    parser.add_argument("--probe-poll", type=float, default=PROBE_POLL)
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    figures = asyncio.run(_standalone(args))
    for name, value in figures.items():
        print(f"{name:<28}{value:>14,.1f}")


if __name__ == "__main__":
    main()
