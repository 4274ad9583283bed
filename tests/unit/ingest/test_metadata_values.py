"""Metadata values at ingest: the shared storable-value rule applied per event,
and the jsonb encoding that keeps each value's kind (the real PostgreSQL round
trip is in tests/integration/ingest/test_value_roundtrip.py)."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime, timedelta

import pytest

from services.common.values import RawValue
from services.ingest.domain.validation import IncomingEvent, triage
from services.ingest.store import decode_metadata, encode_metadata

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _event(event_id: str, **metadata: RawValue) -> IncomingEvent:
    return IncomingEvent(event_id, "c1", "api.call", None, metadata)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0e-20000", "reads as a number outside what meters can store"),
        ("1e1001", "reads as a number outside"),
        ("-1e-1001", "reads as a number outside"),
        (math.nan, "numbers must be finite"),
        (-math.inf, "numbers must be finite"),
        ("a\x00b", "contains a NUL character"),
        ("v" * 501, "is 501 characters long; at most 500"),
    ],
)
def test_a_value_that_cannot_be_stored_rejects_its_event_and_names_the_key(
    value: RawValue, reason: str
) -> None:
    verdict = triage(
        [_event("ok", n=1), _event("bad", n=2, tokens=value), _event("ok2", n="1e1000")],
        NOW,
        timedelta(days=35),
    )
    assert verdict.valid == [0, 2]
    (rejection,) = verdict.rejections
    assert (rejection.index, rejection.event_id) == (1, "bad")
    assert rejection.reason.startswith("metadata['tokens'] ")
    assert reason in rejection.reason


@pytest.mark.parametrize(
    "value",
    [1e19, 1e16, 1.7976931348623157e308, 5e-324, -0.0, 2**63 - 1, -(2**63), "1e-1000", "0e-1000"],
)
def test_edges_that_can_be_stored_are_accepted(value: RawValue) -> None:
    assert triage([_event("e", n=value)], NOW, timedelta(days=35)).valid == [0]


def _bits(value: float) -> bytes:
    return struct.pack("<d", value)


@pytest.mark.parametrize(
    ("value", "marked"),
    [
        (1e16, True),
        (-1e16, True),
        (1e19, True),
        (1.7976931348623157e308, True),
        (-0.0, True),
        (9999999999999998.0, False),  # orjson writes "9999999999999998.0"
        (0.0, False),
        (5e-324, False),
        (0.1, False),
        (100.0, False),
    ],
)
def test_only_doubles_jsonb_would_turn_into_integers_are_marked(value: float, marked: bool) -> None:
    stored = encode_metadata({"n": value, "s": "x", "i": 5})
    assert (stored["n"] == [repr(value)]) is marked
    assert stored["s"] == "x" and stored["i"] == 5
    back = decode_metadata(dict(stored))
    assert type(back["n"]) is float and _bits(back["n"]) == _bits(value)


def test_plain_metadata_is_not_copied() -> None:
    metadata = {"tokens": 5, "region": "eu", "ratio": 0.5, "ok": True}
    assert encode_metadata(metadata) is metadata
    assert decode_metadata(metadata) is metadata


def test_rows_stored_before_the_marker_still_read() -> None:
    # jsonb had turned number_value 1e19 into the integer 10000000000000000000:
    # outside int64, so it can only have been a double.
    old = {"n": 10**19, "m": -(2**63) - 1, "i": 2**63 - 1, "f": 1e16}
    back = decode_metadata(old)
    assert back == {"n": 1e19, "m": float(-(2**63) - 1), "i": 2**63 - 1, "f": 1e16}
    assert type(back["n"]) is float and type(back["i"]) is int
