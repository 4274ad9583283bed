"""Opaque page tokens (AIP-158) and page sizes shared by every List RPC."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size: must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(cursor: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()


def decode_token(token: str, size: int) -> list[Any] | None:
    """The cursor of a token made by encode_token with `size` items; None when empty."""
    if not token:
        return None
    try:
        cursor = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError as exc:
        raise InvalidArgument("page_token: not a token returned by this API") from exc
    if not isinstance(cursor, list) or len(cursor) != size:
        raise InvalidArgument("page_token: not a token returned by this API")
    return cursor


def decode_time_cursor(token: str, *, uuid_key: bool = False) -> tuple[datetime, str] | None:
    """The (time, key) a page token made by `next_page` points after; with
    `uuid_key` the key must be a UUID (it is compared as one in SQL)."""
    cursor = decode_token(token, 2)
    if cursor is None:
        return None
    try:
        when = datetime.fromisoformat(str(cursor[0]))
        key = str(uuid.UUID(str(cursor[1]))) if uuid_key else str(cursor[1])
    except ValueError as exc:
        raise InvalidArgument("page_token: not a token returned by this API") from exc
    if when.tzinfo is None:
        raise InvalidArgument("page_token: not a token returned by this API")
    return when, key


def next_page(
    rows: list[T], limit: int, cursor: Callable[[T], tuple[datetime, str]]
) -> tuple[list[T], str]:
    """From up to limit + 1 rows (one more than a page, to learn whether more
    follow): the page, and the token of the next one (empty after the last)."""
    if len(rows) <= limit:
        return rows, ""
    page = rows[:limit]
    when, key = cursor(page[-1])
    return page, encode_token([when.isoformat(), key])


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
    after = decode_time_cursor(request.page_token, uuid_key=uuid_key)
    return next_page(await fetch(after, limit + 1), limit, cursor)
