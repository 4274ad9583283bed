"""IngestService: every validation rule and limit, duplicates, mixed batches,
the event log (get, list, replay) and StreamIngest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from tests.client import Client, event
from usagebilling.ingest.v1 import ingest_pb2


def _now() -> datetime:
    return datetime.now(UTC)


async def _ingest(client: Client, *events: ingest_pb2.Event) -> ingest_pb2.IngestEventsResponse:
    return await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=list(events))
    )


def _bare(
    event_id: str = "e1", customer_id: str = "c1", name: str = "api.call"
) -> ingest_pb2.Event:
    return ingest_pb2.Event(event_id=event_id, customer_id=customer_id, event_name=name)


def _with_metadata(count: int = 1, key_length: int = 3, value_length: int = 3) -> ingest_pb2.Event:
    message = _bare(f"meta-{count}-{key_length}-{value_length}")
    for i in range(count):
        message.metadata[
            f"{i:0{key_length}d}"[-key_length:] if key_length >= 3 else "k"
        ].string_value = "v" * value_length
    return message


def _at(when: datetime, event_id: str) -> ingest_pb2.Event:
    message = _bare(event_id)
    message.timestamp.FromDatetime(when)
    return message


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_bare(event_id=""), "event_id is required"),
        (_bare(event_id="x" * 256), "event_id is 256 characters long; at most 255"),
        (_bare(customer_id=""), "customer_id is required"),
        (_bare(name=""), "event_name is required"),
        (_bare(event_id="nul\x00"), "event_id contains a NUL character"),
        (_with_metadata(count=51), "metadata has 51 keys; at most 50"),
        (_with_metadata(key_length=101), "characters long; at most 100 are allowed"),
        (_with_metadata(value_length=501), "is 501 characters long; at most 500"),
    ],
)
async def test_each_rule_rejects_one_event_and_names_it(
    client: Client, bad: ingest_pb2.Event, reason: str
) -> None:
    good = _bare(event_id=f"good-{reason[:10]}")
    answer = await _ingest(client, good, bad)
    assert answer.accepted_count == 1
    (rejection,) = answer.rejections
    assert rejection.index == 1
    assert rejection.event_id == bad.event_id[:255]
    assert reason in rejection.reason


async def test_limits_at_the_edge_are_accepted(client: Client) -> None:
    edge = _bare(event_id="y" * 255)
    for i in range(50):
        edge.metadata[f"k{i:02d}" + "k" * 97].string_value = "v" * 500
    assert (await _ingest(client, edge)).accepted_count == 1


async def test_timestamps_future_and_backdating_window(client: Client) -> None:
    now = _now()
    answer = await _ingest(
        client,
        _at(now + timedelta(minutes=4), "t-near-future"),
        _at(now + timedelta(minutes=6), "t-far-future"),
        _at(now - timedelta(days=34), "t-old-ok"),
        _at(now - timedelta(days=36), "t-too-old"),
        _bare("t-default"),
    )
    assert answer.accepted_count == 3
    reasons = {r.event_id: r.reason for r in answer.rejections}
    assert "more than 5 minutes in the future" in reasons["t-far-future"]
    assert "older than the backdating window of 35 days" in reasons["t-too-old"]
    stored = await client.call(
        client.ingest.GetEvent, ingest_pb2.GetEventRequest(event_id="t-default")
    )
    assert abs(stored.timestamp.ToDatetime(tzinfo=UTC) - now) < timedelta(seconds=30)


async def test_duplicates_within_a_call_and_across_calls(client: Client) -> None:
    first = await _ingest(client, _bare("d1"), _bare("d2"), _bare("d1"))
    assert (first.accepted_count, first.duplicate_count, len(first.rejections)) == (2, 1, 0)
    second = await _ingest(client, _bare("d2"), _bare("d3"))
    assert (second.accepted_count, second.duplicate_count) == (1, 1)


async def test_more_than_1000_events_fail_whole_and_store_nothing(client: Client) -> None:
    events = [_bare(f"big-{i}") for i in range(1001)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _ingest(client, *events)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1001 events" in str(caught.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await client.call(client.ingest.GetEvent, ingest_pb2.GetEventRequest(event_id="big-0"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await _ingest(client, *events[:1000])).accepted_count == 1000


async def test_an_oversized_message_is_resource_exhausted(client: Client) -> None:
    # Past the 2 MiB a call may carry (this batch is about 36 MB).
    huge = [_bare(f"huge-{i}") for i in range(1000)]
    for message in huge:
        for k in range(50):
            message.metadata[f"key-{k}"].string_value = "v" * 700
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _ingest(client, *huge)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await _ingest(client, _bare("after-huge"))).accepted_count == 1


async def test_mixed_batch_keeps_order_of_rejections(client: Client) -> None:
    now = _now()
    answer = await _ingest(
        client,
        _bare("m-ok-1"),
        _bare(""),
        _at(now + timedelta(hours=1), "m-future"),
        _bare("m-ok-1"),
        _bare("m-ok-2"),
    )
    assert (answer.accepted_count, answer.duplicate_count) == (2, 1)
    assert [r.index for r in answer.rejections] == [1, 2]


async def test_event_log_get_list_and_replay(client: Client) -> None:
    base = _now() - timedelta(hours=1)
    events = [
        event(
            f"log-{i}",
            f"cus-{i % 2}",
            "log.a" if i < 6 else "log.b",
            base + timedelta(minutes=i),
            n=i,
        )
        for i in range(9)
    ]
    await _ingest(client, *events)

    got = await client.call(client.ingest.GetEvent, ingest_pb2.GetEventRequest(event_id="log-3"))
    assert (got.customer_id, got.event_name, got.metadata["n"].int_value) == ("cus-1", "log.a", 3)

    listed: list[str] = []
    token = ""
    while True:
        page = await client.call(
            client.ingest.ListEvents,
            ingest_pb2.ListEventsRequest(customer_id="cus-0", page_size=2, page_token=token),
        )
        listed += [e.event_id for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert listed == ["log-8", "log-6", "log-4", "log-2", "log-0"]  # newest first

    replay = ingest_pb2.ReplayEventsRequest(event_names=["log.b"])
    replay.start_time.FromDatetime(base)
    replay.end_time.FromDatetime(base + timedelta(minutes=8))
    stream = client.ingest.ReplayEvents(replay, metadata=client.metadata)
    assert [e.event_id async for e in stream] == ["log-6", "log-7"]


async def test_stream_ingest_answers_each_request_in_order(client: Client) -> None:
    async def requests() -> AsyncIterator[ingest_pb2.IngestEventsRequest]:
        yield ingest_pb2.IngestEventsRequest(events=[_bare("s1"), _bare("s2")])
        yield ingest_pb2.IngestEventsRequest(events=[_bare("s2"), _bare("")])
        yield ingest_pb2.IngestEventsRequest(events=[_bare(f"s-{i}") for i in range(500)])

    answers = [a async for a in client.ingest.StreamIngest(requests(), metadata=client.metadata)]
    assert [(a.accepted_count, a.duplicate_count, len(a.rejections)) for a in answers] == [
        (2, 0, 0),
        (0, 1, 1),
        (500, 0, 0),
    ]


async def test_unknown_event_and_bad_arguments(client: Client) -> None:
    for call, code in (
        (
            client.ingest.GetEvent(
                ingest_pb2.GetEventRequest(event_id="nope"), metadata=client.metadata
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            client.ingest.GetEvent(ingest_pb2.GetEventRequest(), metadata=client.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            client.ingest.ListEvents(
                ingest_pb2.ListEventsRequest(page_token="garbage"), metadata=client.metadata
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code
