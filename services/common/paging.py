"""Opaque page tokens (AIP-158) and page sizes shared by every List RPC."""

from __future__ import annotations

import base64
import json
from typing import Any

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


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
