"""Page tokens (AIP-158) and page sizes shared by every List RPC.

A token is `<cursor>.<mac>`: the cursor (the time and key of the last row
served, and a digest of the request it was made for, as JSON) and an
HMAC-SHA256 of it under a key every replica of the service shares (derived
from the service token, see `configure`). A token this API did not make is
refused before its content is read, and the content of one it did make is
still checked, so no token reaches SQL or date arithmetic with a value they
cannot take.

The digest (`request_digest`) covers the tenant, the request's type and every
field of the request but page_token and page_size, so a token passed with
other filters (another customer, another time range) is refused with
INVALID_ARGUMENT naming page_token (AIP-158) instead of answering those
filters from the position of another listing."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from services.common.context import current_tenant_or_none
from services.common.errors import InvalidArgument
from services.common.ids import is_uuid

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Tokens we make are about 100 characters, some 1,400 with the longest event
# id ingest takes (255 characters of up to 4 UTF-8 bytes); longer is not ours.
MAX_TOKEN_CHARS = 2048
MAX_KEY_CHARS = 512
_MAC_BYTES = 16
# One day inside Python's datetime range (PostgreSQL's is wider): a cursor time
# can be compared, shifted and formatted without overflowing.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)

_NOT_OURS = "page_token: not a token returned by this API"
_OTHER_REQUEST = (
    "page_token: made for another request; pass it with the same fields"
    " (page_size aside) as the request that returned it"
)
# Until `configure` is called (tests that build servicers in-process), tokens
# are valid only within this process.
_signing_key = secrets.token_bytes(32)

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def configure(secret: str, service: str) -> None:
    """Sets the key tokens are signed with, from a secret every replica of
    `service` has (the service token). Each service gets its own key."""
    global _signing_key
    _signing_key = hmac.new(
        secret.encode(), b"usagebilling page token v1 " + service.encode(), hashlib.sha256
    ).digest()


def request_digest(request: Message, tenant_id: str | None = None) -> str:
    """What a paged request's page tokens are bound to: a digest of the tenant
    (`tenant_id`, else the caller's), the request's type and every field of it
    but page_token and page_size (which AIP-158 lets change between pages)."""
    query = type(request)()
    query.CopyFrom(request)
    for field in ("page_token", "page_size"):
        if field in query.DESCRIPTOR.fields_by_name:
            query.ClearField(field)
    digest = hashlib.sha256()
    for part in (
        (tenant_id or current_tenant_or_none() or "").encode(),
        query.DESCRIPTOR.full_name.encode(),
        query.SerializeToString(deterministic=True),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:32]


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size: must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(body: bytes) -> bytes:
    return hmac.new(_signing_key, body, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_token(cursor: list[Any]) -> str:
    body = json.dumps(cursor, separators=(",", ":"), ensure_ascii=False).encode()
    return f"{_b64(body)}.{_b64(_mac(body))}"


def decode_token(token: str, size: int) -> list[Any] | None:
    """The cursor of a token made by encode_token with `size` items; None when
    empty; INVALID_ARGUMENT for anything else."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise InvalidArgument(_NOT_OURS)
    body_text, mac_text = token.split(".")
    try:
        body, mac = _unb64(body_text), _unb64(mac_text)
    except (binascii.Error, ValueError):
        raise InvalidArgument(_NOT_OURS) from None
    if not hmac.compare_digest(mac, _mac(body)):
        raise InvalidArgument(_NOT_OURS)
    try:
        cursor = json.loads(body)
    except ValueError:
        raise InvalidArgument(_NOT_OURS) from None
    if not isinstance(cursor, list) or len(cursor) != size:
        raise InvalidArgument(_NOT_OURS)
    return cursor


def _cursor_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidArgument(_NOT_OURS)
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            raise InvalidArgument(_NOT_OURS)
        when = when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(_NOT_OURS) from None
    if not EARLIEST <= when <= LATEST:
        raise InvalidArgument("page_token: its time is out of range")
    return when


def _cursor_key(value: Any, uuid_key: bool) -> str:
    if not isinstance(value, str) or len(value) > MAX_KEY_CHARS:
        raise InvalidArgument(_NOT_OURS)
    if uuid_key:
        if not is_uuid(value):
            raise InvalidArgument(_NOT_OURS)
        return value.lower()
    try:
        value.encode()  # a lone surrogate cannot be sent to PostgreSQL
    except UnicodeEncodeError:
        raise InvalidArgument(_NOT_OURS) from None
    if "\x00" in value:
        raise InvalidArgument(_NOT_OURS)
    return value


def time_token(when: datetime, key: str, query: str) -> str:
    """The token of the page after the row at (when, key) of the request whose
    digest is `query` (request_digest)."""
    return encode_token([when.astimezone(UTC).isoformat(), key, query])


def decode_time_cursor(
    token: str, query: str, *, uuid_key: bool = False
) -> tuple[datetime, str] | None:
    """The (time, key) a page token made by `time_token` points after, when it
    was made for the request whose digest is `query`; with `uuid_key` the key
    must be a UUID (it is compared as one in SQL)."""
    cursor = decode_token(token, 3)
    if cursor is None:
        return None
    if not isinstance(cursor[2], str):
        raise InvalidArgument(_NOT_OURS)
    if not hmac.compare_digest(cursor[2], query):
        raise InvalidArgument(_OTHER_REQUEST)
    return _cursor_time(cursor[0]), _cursor_key(cursor[1], uuid_key)


def next_page(
    rows: list[T], limit: int, cursor: Callable[[T], tuple[datetime, str]], query: str
) -> tuple[list[T], str]:
    """From up to limit + 1 rows (one more than a page, to learn whether more
    follow): the page, and the token of the next one (empty after the last)."""
    if len(rows) <= limit:
        return rows, ""
    page = rows[:limit]
    return page, time_token(*cursor(page[-1]), query)


# A repeated message field's tag and length prefix, at most (for up to 2 MB).
ENTRY_OVERHEAD = 6
# Rows read from the store at a time by fetch_bounded_page.
CHUNK = 50
_LONGEST_TIME = datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
_A_UUID = "00000000-0000-0000-0000-000000000000"


async def fetch_bounded_page(
    request: Any,
    fetch: Callable[[tuple[datetime, str] | None, int], Awaitable[list[T]]],
    cursor: Callable[[T], tuple[datetime, str]],
    to_message: Callable[[T], M],
    max_bytes: int,
) -> tuple[list[M], str]:
    """A page of a List RPC whose entries and next page token stay under
    `max_bytes` (one entry at least): as fetch_page, but the rows are read
    CHUNK at a time and converted as they come, so that neither the answer
    (gRPC clients refuse over 4 MB by default) nor the rows held while it is
    made outgrow the budget, whatever the page_size; the next page's token
    starts at the first row left out."""
    limit = page_size(request.page_size)
    query = request_digest(request)
    after = decode_time_cursor(request.page_token, query, uuid_key=True)
    # The answer's next_page_token is within the budget too: the longest a
    # token of this request can be (a time with microseconds, a UUID), with
    # its field's tag and length.
    max_bytes -= len(time_token(_LONGEST_TIME, _A_UUID, query)) + 3
    page: list[M] = []
    last: T | None = None
    size = 0
    while True:
        want = min(CHUNK, limit + 1 - len(page))  # one more than the page: is there more?
        rows = await fetch(after, want)
        for row in rows:
            if len(page) == limit:
                return page, time_token(*cursor(last), query) if last is not None else ""
            message = to_message(row)
            size += message.ByteSize() + ENTRY_OVERHEAD
            if page and size > max_bytes:
                assert last is not None
                return page, time_token(*cursor(last), query)
            page.append(message)
            last = row
        if len(rows) < want:
            return page, ""
        after = cursor(rows[-1])


async def fetch_page(
    request: Any,
    fetch: Callable[[tuple[datetime, str] | None, int], Awaitable[list[T]]],
    cursor: Callable[[T], tuple[datetime, str]],
    *,
    uuid_key: bool = True,
) -> tuple[list[T], str]:
    """One page of a List RPC: checks the request's page_size and page_token,
    asks `fetch(after, limit)` for one row more than a page, and returns the
    page and the next page's token (rows ordered by `cursor`)."""
    limit = page_size(request.page_size)
    query = request_digest(request)
    after = decode_time_cursor(request.page_token, query, uuid_key=uuid_key)
    return next_page(await fetch(after, limit + 1), limit, cursor, query)
