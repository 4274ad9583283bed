"""QuarantineService's request checks and paging, over an in-memory backend
(the backends themselves are tested against PostgreSQL and NATS)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.quarantine import QuarantinedRecord, QuarantineServicer, parse_ids
from usagebilling.common.v1 import quarantine_pb2

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANTS = [str(uuid.uuid4()), str(uuid.uuid4())]


def _record(n: int) -> QuarantinedRecord:
    return QuarantinedRecord(
        id=str(uuid.UUID(int=n + 1)),
        tenant_id=TENANTS[n % 2],
        stage="relay",
        reason=f"r{n}",
        event_ids=(f"e{n}",),
        attempts=5,
        quarantine_time=T0 + timedelta(seconds=n // 3),  # ties on time: the id decides
        last_attempt_time=T0,
        size_bytes=10,
    )


class Memory:
    def __init__(self, count: int) -> None:
        self.records = {r.id: r for r in map(_record, range(count))}
        self.asked: list[Sequence[str]] = []

    async def list_records(
        self, tenant_id: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantinedRecord]:
        rows = sorted(self.records.values(), key=lambda r: (r.quarantine_time, r.id), reverse=True)
        rows = [r for r in rows if tenant_id is None or r.tenant_id == tenant_id]
        if after is not None:
            rows = [r for r in rows if (r.quarantine_time, r.id) < after]
        return rows[:limit]

    async def replay(self, ids: Sequence[str]) -> tuple[list[str], list[QuarantinedRecord]]:
        self.asked.append(ids)
        return [i for i in ids if self.records.pop(i, None)], []

    async def discard(self, ids: Sequence[str]) -> int:
        return sum(self.records.pop(i, None) is not None for i in ids)


async def test_pages_walk_every_record_once_newest_first() -> None:
    servicer = QuarantineServicer(Memory(25))
    seen: list[str] = []
    token = ""
    while True:
        page = await servicer.ListQuarantined(
            quarantine_pb2.ListQuarantinedRequest(page_size=4, page_token=token), None
        )
        seen += [m.id for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 25 == len(set(seen))
    assert seen[0] == str(uuid.UUID(int=25))  # the newest


async def test_a_tenant_filter_must_be_a_uuid_and_filters() -> None:
    servicer = QuarantineServicer(Memory(6))
    page = await servicer.ListQuarantined(
        quarantine_pb2.ListQuarantinedRequest(tenant_id=TENANTS[1].upper()), None
    )
    assert {m.tenant_id for m in page.messages} == {TENANTS[1]} and len(page.messages) == 3
    with pytest.raises(InvalidArgument, match="tenant_id"):
        await servicer.ListQuarantined(quarantine_pb2.ListQuarantinedRequest(tenant_id="x y"), None)


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        ([], "ids"),
        ([str(uuid.uuid4()) for _ in range(101)], "ids"),
        ([str(uuid.uuid4()), "nope"], "ids[1]"),
        (["{" + str(uuid.uuid4()) + "}"], "ids[0]"),
        (["urn:uuid:" + str(uuid.uuid4())], "ids[0]"),
        ([str(uuid.uuid4()) + "\x00"], "ids[0]"),
    ],
)
async def test_malformed_ids_are_invalid_arguments_naming_the_field(
    ids: list[str], field: str
) -> None:
    servicer = QuarantineServicer(Memory(1))
    for call, request in (
        (servicer.ReplayQuarantined, quarantine_pb2.ReplayQuarantinedRequest(ids=ids)),
        (servicer.DiscardQuarantined, quarantine_pb2.DiscardQuarantinedRequest(ids=ids)),
    ):
        with pytest.raises(InvalidArgument, match="^" + re.escape(field)):
            await call(request, None)


def test_ids_are_lowered_and_repeats_dropped() -> None:
    one = str(uuid.uuid4())
    assert parse_ids([one.upper(), one, one]) == [one]


async def test_replay_of_ids_none_of_which_is_quarantined_is_not_found() -> None:
    memory = Memory(2)
    servicer = QuarantineServicer(memory)
    known = str(uuid.UUID(int=1))
    answer = await servicer.ReplayQuarantined(
        quarantine_pb2.ReplayQuarantinedRequest(ids=[known]), None
    )
    assert list(answer.replayed_ids) == [known]
    with pytest.raises(NotFound):
        await servicer.ReplayQuarantined(quarantine_pb2.ReplayQuarantinedRequest(ids=[known]), None)
    discarded = await servicer.DiscardQuarantined(
        quarantine_pb2.DiscardQuarantinedRequest(ids=[str(uuid.UUID(int=2)), str(uuid.uuid4())]),
        None,
    )
    assert discarded.discarded_count == 1
