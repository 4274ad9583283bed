"""Page tokens: what this API makes round-trips; nothing else gets past decoding."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.common import paging
from services.common.errors import InvalidArgument

KEY = "0b7e2c9a-5d3f-4e61-9a0c-2f4d6b8e1a37"
QUERY = "q" * 32


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
    page, token = paging.next_page(rows, 1, lambda r: r, QUERY)
    assert page == rows[:1]
    assert paging.decode_time_cursor(token, QUERY, uuid_key=True) == (when, KEY)


def test_times_in_other_offsets_come_back_in_utc() -> None:
    when = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    token = paging.encode_token([when.isoformat(), "evt-1", QUERY])
    assert paging.decode_time_cursor(token, QUERY) == (
        datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        "evt-1",
    )


def test_long_non_ascii_event_ids_make_valid_tokens() -> None:
    key = "\U0001f600" * 255  # the longest event id ingest takes, 4 bytes a character
    token = paging.time_token(datetime.now(UTC), key, QUERY)
    cursor = paging.decode_time_cursor(token, QUERY)
    assert cursor is not None and cursor[1] == key


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        _forged(["0001-01-01T00:00:00+14:00", KEY, QUERY]),
        _forged(["2025-01-01T00:00:00+00:00", KEY, QUERY]),
        _forged(["2025-01-01T00:00:00+00:00", "\ud800", QUERY]),
        "a.b.c",
        "." * 3000,
        "eyJ9.AAAA",
    ],
)
def test_tokens_this_api_did_not_make_are_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, QUERY, uuid_key=True)


def test_a_token_signed_by_another_service_is_invalid() -> None:
    paging.configure("admin", "billing")
    token = paging.time_token(datetime.now(UTC), KEY, QUERY)
    paging.configure("admin", "meter")
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, QUERY, uuid_key=True)
    paging.configure("admin", "billing")  # the same secret and service: the same key
    assert paging.decode_time_cursor(token, QUERY, uuid_key=True) is not None


def test_a_token_made_for_other_filters_is_invalid() -> None:
    """A token is bound to the request it was made for: the same request with
    another filter, another tenant or another List RPC is refused naming
    page_token; another page_size is the same request."""
    from services.common.context import set_tenant
    from usagebilling.billing.v1 import credit_pb2, invoice_pb2

    set_tenant("tenant-a")
    first = credit_pb2.ListCreditLedgerRequest(customer_id="cus_1", page_size=1)
    query = paging.request_digest(first)
    token = paging.time_token(datetime.now(UTC), "12", query)
    again = credit_pb2.ListCreditLedgerRequest(customer_id="cus_1", page_size=9, page_token=token)
    assert paging.request_digest(again) == query
    assert paging.decode_time_cursor(token, paging.request_digest(again)) is not None
    others = [
        credit_pb2.ListCreditLedgerRequest(customer_id="cus_x", page_token=token),
        credit_pb2.ListCreditLedgerRequest(page_token=token),
        credit_pb2.ListCreditLedgerRequest(customer_id="cus_1", kind=1, page_token=token),
        invoice_pb2.ListInvoicesRequest(page_token=token),
    ]
    for other in others:
        with pytest.raises(InvalidArgument, match=r"^page_token: made for another request"):
            paging.decode_time_cursor(token, paging.request_digest(other))
    set_tenant("tenant-b")
    with pytest.raises(InvalidArgument, match=r"^page_token: made for another request"):
        paging.decode_time_cursor(token, paging.request_digest(again))
    set_tenant(None)


@pytest.mark.parametrize(
    "cursor",
    [
        ["0001-01-01T00:00:00+14:00", KEY, QUERY],  # before year 1 in UTC
        ["0001-01-01T00:00:00+00:00", KEY, QUERY],
        ["9999-12-31T23:59:59-14:00", KEY, QUERY],  # after year 9999 in UTC
        ["2025-01-01T00:00:00", KEY, QUERY],  # no offset
        ["not a time", KEY, QUERY],
        [12, KEY, QUERY],
        ["2025-01-01T00:00:00+00:00", f"{{{KEY}}}", QUERY],
        ["2025-01-01T00:00:00+00:00", f"urn:uuid:{KEY}", QUERY],
        ["2025-01-01T00:00:00+00:00", 7, QUERY],
        ["2025-01-01T00:00:00+00:00", KEY, 7],
        ["2025-01-01T00:00:00+00:00", KEY],  # made before tokens were bound to requests
        ["2025-01-01T00:00:00+00:00"],
        {"a": 1},
    ],
)
def test_signed_content_out_of_range_is_invalid(cursor: object) -> None:
    token = _signed_body(json.dumps(cursor).encode())
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(token, QUERY, uuid_key=True)


@pytest.mark.parametrize("key", ["\ud800", "a\x00b", "x" * 600])
def test_signed_event_id_keys_that_sql_cannot_take_are_invalid(key: str) -> None:
    body = json.dumps(["2025-01-01T00:00:00+00:00", key, QUERY]).encode()
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        paging.decode_time_cursor(_signed_body(body), QUERY)


def test_page_sizes() -> None:
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size(5000) == paging.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument, match=r"^page_size: "):
        paging.page_size(-1)


@pytest.mark.parametrize(
    ("page_size", "sizes"), [(0, [10] * 230), (7, [10] * 30), (100, [400] * 9)]
)
async def test_bounded_pages_return_every_row_once_and_hold_one_chunk_at_a_time(
    page_size: int, sizes: list[int]
) -> None:
    """fetch_bounded_page over 230 small rows, or rows of 400 bytes against a
    1,000-byte budget: every row once, in order; no page over the budget
    (but one row); no fetch asks for more than CHUNK rows."""
    from google.protobuf.wrappers_pb2 import StringValue

    base = datetime(2025, 3, 1, tzinfo=UTC)
    rows = [
        (base + timedelta(seconds=i), f"{i:08d}-0000-4000-8000-000000000000")
        for i in range(len(sizes))
    ]
    asked: list[int] = []

    async def fetch(after: tuple[datetime, str] | None, limit: int) -> list[int]:
        asked.append(limit)
        start = 0 if after is None else rows.index(after) + 1
        return list(range(start, min(start + limit, len(rows))))

    from usagebilling.meter.v1.meter_pb2 import ListMetersRequest

    seen: list[int] = []
    token = ""
    while True:
        page, token = await paging.fetch_bounded_page(
            ListMetersRequest(page_size=page_size, page_token=token),
            fetch,
            lambda i: rows[i],
            lambda i: StringValue(value=f"{i:08d}".ljust(sizes[i], "x")),
            1000,
        )
        assert page
        assert len(page) <= paging.page_size(page_size)
        total = sum(m.ByteSize() + paging.ENTRY_OVERHEAD for m in page)
        assert total <= 1000 or len(page) == 1
        seen += [int(m.value[:8]) for m in page]
        if not token:
            break
    assert seen == list(range(len(sizes)))
    assert max(asked) <= paging.CHUNK
