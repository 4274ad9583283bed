"""Page tokens: what this API makes round-trips; nothing else gets past decoding."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.common import paging
from services.common.errors import InvalidArgument

KEY = "0b7e2c9a-5d3f-4e61-9a0c-2f4d6b8e1a37"


def _forged(cursor: list[object]) -> str:
    """A token as the old unsigned format made it (base64 of the JSON cursor)."""
    return base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()


def _signed_body(body: bytes) -> str:
    """A token made with this process's key around any JSON body, to test the
    checks that come after the signature."""
    return f"{paging._b64(body)}.{paging._b64(paging._mac(body))}"


def test_tokens_round_trip() -> None:
    when = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    rows = [(when, KEY), (when + timedelta(seconds=1), KEY)]
    page, token = paging.next_page(rows, 1, lambda r: r)
    assert page == rows[:1]
    assert paging.decode_time_cursor(token, uuid_key=True) == (when, KEY)


def test_times_in_other_offsets_come_back_in_utc() -> None:
    when = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    token = paging.encode_token([when.isoformat(), "evt-1"])
    assert paging.decode_time_cursor(token) == (datetime(2025, 3, 1, 12, 0, tzinfo=UTC), "evt-1")


def test_long_non_ascii_event_ids_make_valid_tokens() -> None:
    key = "\U0001f600" * 255  # the longest event id ingest takes, 4 bytes a character
    token = paging.encode_token([datetime.now(UTC).isoformat(), key])
    cursor = paging.decode_time_cursor(token)
    assert cursor is not None and cursor[1] == key


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        _forged(["0001-01-01T00:00:00+14:00", KEY]),
        _forged(["2025-01-01T00:00:00+00:00", KEY]),
        _forged(["2025-01-01T00:00:00+00:00", "\ud800"]),
        "a.b.c",
        "." * 3000,
        "eyJ9.AAAA",
    ],
)
def test_tokens_this_api_did_not_make_are_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, uuid_key=True)


def test_a_token_signed_by_another_service_is_invalid() -> None:
    paging.configure("admin", "billing")
    token = paging.encode_token([datetime.now(UTC).isoformat(), KEY])
    paging.configure("admin", "meter")
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, uuid_key=True)
    paging.configure("admin", "billing")  # the same secret and service: the same key
    assert paging.decode_time_cursor(token, uuid_key=True) is not None


@pytest.mark.parametrize(
    "cursor",
    [
        ["0001-01-01T00:00:00+14:00", KEY],  # before year 1 in UTC
        ["0001-01-01T00:00:00+00:00", KEY],
        ["9999-12-31T23:59:59-14:00", KEY],  # after year 9999 in UTC
        ["2025-01-01T00:00:00", KEY],  # no offset
        ["not a time", KEY],
        [12, KEY],
        ["2025-01-01T00:00:00+00:00", f"{{{KEY}}}"],
        ["2025-01-01T00:00:00+00:00", f"urn:uuid:{KEY}"],
        ["2025-01-01T00:00:00+00:00", 7],
        ["2025-01-01T00:00:00+00:00"],
        {"a": 1},
    ],
)
def test_signed_content_out_of_range_is_invalid(cursor: object) -> None:
    token = _signed_body(json.dumps(cursor).encode())
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, uuid_key=True)


@pytest.mark.parametrize("key", ["\ud800", "a\x00b", "x" * 600])
def test_signed_event_id_keys_that_sql_cannot_take_are_invalid(key: str) -> None:
    body = json.dumps(["2025-01-01T00:00:00+00:00", key]).encode()
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(_signed_body(body))


def test_page_sizes() -> None:
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size(5000) == paging.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument, match=r"^page_size: "):
        paging.page_size(-1)
