"""Kill -9 during credits' draw-down (issue 13): no draw-down is entered
twice, or missed, when billing or meter is killed with SIGKILL while usage
flows and settlement runs.

Its own stack (it kills and restarts services). Billing is killed at three
kinds of points, each found in PostgreSQL rather than guessed by timing:
inside a settlement pass's transaction while it waits for meter's usage (meter
is stopped with SIGSTOP for that), inside a pass's ledger INSERT (the test
holds, uncommitted, a row with the unique key of the draw the pass is about to
write, so the pass blocks there with its transaction half written), and at
random moments while events flow. Meter is killed right after ingest
acknowledged a batch, while its consumer has messages in flight (mid-fold).
Then, once everything is restarted and settled: each minute's draw equals that
minute's tokens (a draw entered twice would double it, a missed one leave it
short), the grant is entered once, and the balance equals the ledger's sum."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import nats
import pytest

from services.billing.domain.credits import floor_minute
from services.common.jetstream import EVENTS_STREAM
from tests.client import Client, event, eventually
from tests.credit_setup import tokens_setup
from tests.private_suite import private_suite
from tools.credit_setup import credit_product
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.billing.v1 import (
    credit_pb2,
    credit_pb2_grpc,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

D = Decimal
GRANT = D(10_000_000)  # never runs out: every minute's tokens are one DRAWN entry
CONSUMER = "meter"  # meter's default USAGEBILLING_METER_CONSUMER
HEALTHY = 120.0  # seconds a restarted service may take on a loaded machine


@pytest.fixture(scope="module")
def kill_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    # Reconciliation (a meter read inside the pass's transaction) often.
    env = {"USAGEBILLING_CREDITS_RECONCILE": "5s"}
    with private_suite(tmp_path_factory, "credits-kill", env, timeout=HEALTHY) as suite:
        yield suite


async def _restart(suite: Suite, service: str) -> None:
    suite.start_service(service)
    await asyncio.to_thread(suite.wait_healthy, service, HEALTHY)


async def _kill(suite: Suite, service: str) -> None:
    process = suite.processes[service]
    process.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL


class Usage:
    """The tenant's one customer, its tokens meter and its credits; the
    events sent (by id: every send is retried with the same ids until
    ingest answers, so each is counted once whatever failed in between)."""

    def __init__(self, client: Client, meter_id: str, type_id: str, customer_id: str) -> None:
        self.client = client
        self.meter_id = meter_id
        self.type_id = type_id
        self.customer_id = customer_id
        self.sent: dict[str, tuple[datetime, int]] = {}
        self.credits = credit_pb2_grpc.CreditServiceStub(client.channels["billing"])

    async def send(self, events: list[tuple[datetime, int]]) -> None:
        batch = []
        for when, tokens in events:
            event_id = f"e-{len(self.sent)}"
            self.sent[event_id] = (when, tokens)
            batch.append(event(event_id, "cus_kill", "llm.call", when, tokens=tokens))
        request = ingest_pb2.IngestEventsRequest(events=batch)
        deadline = asyncio.get_running_loop().time() + 180
        while True:
            try:
                answer = await self.client.call(self.client.ingest.IngestEvents, request)
            except grpc.aio.AioRpcError:  # billing (the API key) or a service restarting
                assert asyncio.get_running_loop().time() < deadline, "ingest refused for 180 s"
                await asyncio.sleep(0.5)
                continue
            assert not answer.rejections, answer.rejections
            assert answer.accepted_count + answer.duplicate_count == len(batch)
            return

    def per_minute(self) -> dict[datetime, int]:
        minutes: dict[datetime, int] = {}
        for when, tokens in self.sent.values():
            minute = floor_minute(when)
            minutes[minute] = minutes.get(minute, 0) + tokens
        return minutes

    async def ledger(self) -> list[credit_pb2.CreditLedgerEntry]:
        entries: list[credit_pb2.CreditLedgerEntry] = []
        token = ""
        while True:
            page = await self.client.call(
                self.credits.ListCreditLedger,
                credit_pb2.ListCreditLedgerRequest(
                    customer_id=self.customer_id, page_size=1000, page_token=token
                ),
            )
            entries.extend(page.entries)
            token = page.next_page_token
            if not token:
                return entries


def drawn_per_minute(entries: list[credit_pb2.CreditLedgerEntry]) -> dict[datetime, D]:
    drawn: dict[datetime, D] = {}
    for e in entries:
        if e.kind == credit_pb2.CREDIT_ENTRY_KIND_DRAWN:
            minute = e.effective_time.ToDatetime(tzinfo=UTC)
            drawn[minute] = drawn.get(minute, D(0)) - D(e.amount)
    return {m: v for m, v in drawn.items() if v}


@pytest.fixture
async def usage(kill_suite: Suite) -> AsyncIterator[Usage]:
    _, secret = await asyncio.to_thread(create_tenant, kill_suite, f"kill-{uuid.uuid4().hex[:6]}")
    client = Client({s: kill_suite.address(s) for s in SERVICES}, secret)
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_kill")
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="Tokens",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
        included=str(GRANT),
        customer_ids=[customer_id],
        start=datetime.now(UTC) - timedelta(hours=2),
    )
    yield Usage(client, meter_id, type_id, customer_id)
    await client.close()


async def _first_pid(db: Any, query: str, timeout: float) -> int | None:
    """The first backend `query` finds within `timeout` seconds, or None."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        pid = await db.fetchval(query)
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.05)
    return None


# A settlement pass: the account's row lock held by a transaction that waits
# (here: for meter's answer).
IN_PASS = """
SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = 'billing.credit_accounts'::regclass
  AND l.mode = 'RowShareLock' AND a.state = 'idle in transaction' LIMIT 1
"""
# A settlement pass blocked in its ledger INSERT.
IN_APPEND = """
SELECT pid FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO billing.credit_ledger%' LIMIT 1
"""


async def test_kill_9_of_billing_and_meter_during_draw_down_draws_each_minute_once(
    kill_suite: Suite, usage: Usage
) -> None:
    suite = kill_suite
    rng = random.Random(13)
    db = await asyncpg.connect(kill_suite.database_url)
    # Polls pg_stat_activity from its own connection: within the blocker's
    # transaction below it would show one snapshot throughout.
    watch = await asyncpg.connect(kill_suite.database_url)
    try:

        def spread(count: int, back: timedelta) -> list[tuple[datetime, int]]:
            # Up to `back` ago (within settlement's one-hour recheck), a second
            # short of now (not in the future by ingest's clock).
            now = datetime.now(UTC) - timedelta(seconds=1)
            return [
                (now - back * rng.random(), rng.randint(1, 1000)) for _ in range(count)
            ]  # fmt: skip

        # The included grant is made by the first pass.
        await usage.send(spread(50, timedelta(minutes=30)))
        entries = await eventually(
            usage.ledger,
            lambda es: any(e.kind == credit_pb2.CREDIT_ENTRY_KIND_DRAWN for e in es),
            timeout=120,
        )
        assert any(e.kind == credit_pb2.CREDIT_ENTRY_KIND_GRANTED for e in entries)

        # 1. Meter killed mid-fold (its consumer has messages delivered and
        # not acknowledged), twice, while batches go in.
        nc = await nats.connect(suite.nats_url)
        try:
            for _ in range(2):
                sending = asyncio.gather(
                    *(usage.send(spread(1000, timedelta(minutes=45))) for _ in range(4))
                )
                info = None
                for _ in range(2000):
                    info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
                    if info.num_ack_pending:
                        break
                    await asyncio.sleep(0.002)
                assert info is not None and info.num_ack_pending, "meter never had a fold in flight"
                await _kill(suite, "meter")
                await sending
                await usage.send(spread(200, timedelta(minutes=10)))  # while meter is down
                await _restart(suite, "meter")
        finally:
            await nc.close()

        # 2. Billing killed inside a pass's transaction, waiting for meter.
        await usage.send(spread(100, timedelta(minutes=20)))
        meter = suite.processes["meter"]
        meter.send_signal(signal.SIGSTOP)
        try:
            pid = await _first_pid(watch, IN_PASS, timeout=120)
            assert pid is not None, "no settlement pass held an account while meter was stopped"
            await _kill(suite, "billing")
        finally:
            meter.send_signal(signal.SIGCONT)
        await _restart(suite, "billing")

        # 3. Billing killed inside a pass's ledger INSERT: the next minute's
        # draw is held by this uncommitted row of the same unique key.
        target = floor_minute(datetime.now(UTC)) + timedelta(minutes=1)
        blocker = db.transaction()
        await blocker.start()
        try:
            await db.execute(
                "INSERT INTO billing.credit_ledger (tenant_id, customer_id, credit_type_id, kind,"
                " entry_key, revision, amount, balance_after, effective_at)"
                " SELECT tenant_id, id, $2, 'DRAWN', $3, 0, 0, 0, $4"
                " FROM billing.customers WHERE id = $1",
                uuid.UUID(usage.customer_id),
                uuid.UUID(usage.type_id),
                f"draw:{usage.meter_id}:{target.isoformat()}",
                target,
            )
            while datetime.now(UTC) < target + timedelta(seconds=2):
                await asyncio.sleep(0.2)
            await usage.send([(datetime.now(UTC) - timedelta(seconds=1), 7) for _ in range(5)])
            await usage.send(spread(20, timedelta(minutes=40)))
            pid = await _first_pid(watch, IN_APPEND, timeout=240)
            assert pid is not None, "no settlement pass reached the held draw"
            await _kill(suite, "billing")
        finally:
            await blocker.rollback()
        await _restart(suite, "billing")

        # 4. Billing killed at random moments while events flow.
        for _ in range(3):
            stop = asyncio.Event()

            async def flow(stop: asyncio.Event = stop) -> None:
                while not stop.is_set():
                    await usage.send(spread(50, timedelta(minutes=50)))
                    await asyncio.sleep(0.2)

            flowing = asyncio.create_task(flow())
            await asyncio.sleep(rng.uniform(0.5, 4))
            await _kill(suite, "billing")
            await asyncio.sleep(rng.uniform(0, 1))
            await _restart(suite, "billing")
            stop.set()
            await flowing

        # Everything sent is metered once.
        expected = usage.per_minute()
        total = sum(expected.values())

        async def metered() -> D:
            request = meter_pb2.QueryUsageRequest(meter_id=usage.meter_id, customer_id="cus_kill")
            request.start_time.FromDatetime(datetime.now(UTC) - timedelta(hours=3))
            request.end_time.FromDatetime(datetime.now(UTC) + timedelta(minutes=1))
            answer = await usage.client.call(usage.client.meter.QueryUsage, request)
            return sum((D(r.value) for r in answer.rows), D(0))

        assert await eventually(metered, lambda v: v == total, timeout=120) == total

        # And drawn once: each minute's draw is its tokens, no more, no less.
        expected_drawn = {m: D(v) for m, v in expected.items()}
        entries = await eventually(
            usage.ledger, lambda es: drawn_per_minute(es) == expected_drawn, timeout=300
        )
        assert drawn_per_minute(entries) == expected_drawn
        # Still so after more passes and a reconciliation.
        await asyncio.sleep(12)
        entries = await usage.ledger()
        assert drawn_per_minute(entries) == expected_drawn
        kinds = {credit_pb2.CreditEntryKind.Name(e.kind) for e in entries}
        assert kinds == {"CREDIT_ENTRY_KIND_GRANTED", "CREDIT_ENTRY_KIND_DRAWN"}
        granted = [e for e in entries if e.kind == credit_pb2.CREDIT_ENTRY_KIND_GRANTED]
        assert [D(e.amount) for e in granted] == [GRANT]
        drawn_quantity = sum(
            (D(e.quantity) for e in entries if e.kind == credit_pb2.CREDIT_ENTRY_KIND_DRAWN),
            D(0),
        )
        assert drawn_quantity == total
        ledger_sum = sum((D(e.amount) for e in entries), D(0))
        assert ledger_sum == GRANT - total
        last = max(entries, key=lambda e: int(e.id))  # balance_after runs in id order
        assert D(last.balance_after) == ledger_sum
        balance = await usage.client.call(
            usage.credits.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(
                customer_id="cus_kill", credit_type_id=usage.type_id
            ),
        )
        assert D(balance.available) == ledger_sum
        print(f"{len(usage.sent)} events, {total} tokens over {len(expected)} minutes")
    finally:
        await db.close()
        await watch.close()
