"""Checks of free-text request fields; each message names the field."""

from __future__ import annotations

from typing import Final

from services.common.errors import InvalidArgument

MAX_TEXT: Final = 255


def check_text(field: str, value: str, *, required: bool, max_length: int = MAX_TEXT) -> None:
    """Required when asked, at most `max_length` characters, no NUL (which
    PostgreSQL's text type cannot hold)."""
    if required and not value:
        raise InvalidArgument(f"{field}: required")
    if len(value) > max_length:
        raise InvalidArgument(f"{field}: at most {max_length} characters")
    if "\x00" in value:
        raise InvalidArgument(f"{field}: contains a NUL character")
