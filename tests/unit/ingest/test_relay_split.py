"""The relay's pure parts: cutting a batch to the server's max_payload, safe
subjects, and which publish errors are the batch's own."""

from __future__ import annotations

import itertools
import uuid

import nats.errors
import nats.js.errors
import pytest

from services.ingest.relay import (
    Unpublishable,
    event_ids,
    is_permanent,
    split,
    subject_for,
)
from usagebilling.ingest.v1 import ingest_pb2

TENANT = "6b1f3c1e-8a0e-4a63-9b9e-0f5d2c1a7e11"
MSG_ID = "0c7d2a52-2f0e-4f1b-8d3c-5e2b1a9f4c10"


def _batch(count: int, value_size: int) -> ingest_pb2.EventBatch:
    batch = ingest_pb2.EventBatch(tenant_id=TENANT)
    for n in range(count):
        item = batch.events.add(event_id=f"e-{n}", customer_id="c", event_name="x")
        item.metadata["a"].string_value = "v" * value_size
        item.metadata["b"].string_value = "w" * (n % 7)  # sizes differ from event to event
    return batch


def test_a_batch_that_fits_goes_out_as_it_is_under_the_row_s_id() -> None:
    payload = _batch(3, 100).SerializeToString()
    assert split(MSG_ID, payload, len(payload)) == [(MSG_ID, payload)]


@pytest.mark.parametrize(
    ("count", "value_size", "limit"), [(40, 30_000, 1_047_552), (1000, 1000, 64_000), (50, 10, 120)]
)
def test_a_larger_batch_is_cut_into_parts_that_fit_and_keep_every_event_in_order(
    count: int, value_size: int, limit: int
) -> None:
    batch = _batch(count, value_size)
    payload = batch.SerializeToString()
    assert len(payload) > limit
    parts = split(MSG_ID, payload, limit)
    assert len(parts) > 1
    assert [part_id for part_id, _ in parts] == [f"{MSG_ID}.{n}" for n in range(len(parts))]
    assert all(len(data) <= limit for _, data in parts)
    rebuilt = [ingest_pb2.EventBatch.FromString(data) for _, data in parts]
    assert all(b.tenant_id == TENANT for b in rebuilt)
    assert [e for b in rebuilt for e in b.events] == list(batch.events)
    # Greedy: the first event of each part did not fit in the part before it.
    for before, after in itertools.pairwise(rebuilt):
        grown = ingest_pb2.EventBatch(tenant_id=TENANT, events=[*before.events, after.events[0]])
        assert grown.ByteSize() > limit
    # The same payload and limit give the same messages (a republish is a duplicate).
    assert split(MSG_ID, payload, limit) == parts


def test_an_event_that_alone_does_not_fit_is_unpublishable() -> None:
    payload = _batch(2, 5000).SerializeToString()
    with pytest.raises(Unpublishable, match="alone"):
        split(MSG_ID, payload, 4000)


def test_a_payload_that_is_not_an_event_batch_is_unpublishable_when_it_must_be_cut() -> None:
    garbage = b"\xff" * 200
    with pytest.raises(Unpublishable, match="not an EventBatch"):
        split(MSG_ID, garbage, 100)
    assert event_ids(garbage) == []
    assert event_ids(_batch(2, 1).SerializeToString()) == ["e-0", "e-1"]


@pytest.mark.parametrize(
    "tenant", ["acme corp", "a.b", "*", ">", "", "tenant\x00", "{" + TENANT + "}"]
)
def test_a_tenant_id_that_is_not_a_uuid_has_no_subject(tenant: str) -> None:
    with pytest.raises(Unpublishable, match="tenant_id"):
        subject_for(tenant)


def test_a_uuid_tenant_is_one_subject_token() -> None:
    tenant = str(uuid.uuid4())
    assert subject_for(tenant).split(".")[-1] == tenant


@pytest.mark.parametrize(
    "error",
    [
        Unpublishable("x"),
        nats.errors.BadSubjectError(),
        nats.errors.MaxPayloadError(),
        nats.js.errors.BadRequestError(
            code=400, description="message size exceeds maximum allowed"
        ),
    ],
)
def test_errors_of_the_batch_itself_are_permanent(error: Exception) -> None:
    assert is_permanent(error)


@pytest.mark.parametrize(
    "error",
    [
        nats.errors.TimeoutError(),
        TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.NoStreamResponseError(),
        nats.js.errors.ServiceUnavailableError(code=503),
        nats.errors.ConnectionClosedError(),
        nats.errors.OutboundBufferLimitError(),
    ],
)
def test_errors_of_nats_are_transient(error: Exception) -> None:
    assert not is_permanent(error)
