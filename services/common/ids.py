"""Resource ids are UUIDs in their canonical text form only.

`uuid.UUID()` also accepts "{...}", "urn:uuid:..." and hex without dashes;
taking those would let one resource answer to several ids (and let a braced id
pass one service and fail in another), so anything but the 36-character form
is malformed."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

_CANONICAL = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def is_uuid(text: str) -> bool:
    return _CANONICAL.fullmatch(text) is not None


def parse_uuid(text: str, field: str) -> str:
    """The id in lower case; INVALID_ARGUMENT naming `field` when it is malformed."""
    if not is_uuid(text):
        raise InvalidArgument(f"{field}: {text[:64]!r} is not an id (a UUID such as 3f2b...-...)")
    return text.lower()
