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


def check_name(field: str, value: str, *, max_length: int = MAX_TEXT) -> None:
    """A required name: check_text's rules, and not blank (only whitespace)."""
    check_text(field, value, required=True, max_length=max_length)
    if not value.strip():
        raise InvalidArgument(f"{field}: must not be blank (only whitespace)")


SHOWN: Final = 64


def shown(value: str) -> str:
    """A request's text quoted in an error message: at most its first SHOWN
    characters (a client's 10,000-character id is not echoed back whole)."""
    if len(value) <= SHOWN:
        return repr(value)
    return f"{value[:SHOWN]!r}... ({len(value)} characters)"
