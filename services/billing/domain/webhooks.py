"""Webhook rules with no I/O: Standard Webhooks signing, the retry schedule,
which event types exist, and which addresses a delivery may reach."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"

# The message types an endpoint may ask for (the BILLING subject after the
# prefix). credit.* are the ledger's messages (services/billing/credits.py).
EVENT_TYPES: frozenset[str] = frozenset(
    {
        "invoice.finalized",
        "invoice.voided",
        "usage.threshold_reached",
        "webhook.endpoint_disabled",
        "credit.granted",
        "credit.drawn",
        "credit.expired",
        "credit.rolled_over",
        "credit.forfeited",
        "credit.adjusted",
        "credit.overage",
        "credit.balance_low",
    }
)

# Standard Webhooks' suggested schedule, stretched to about 3 days in all:
# immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 24 h, 24 h.
DEFAULT_SCHEDULE: tuple[timedelta, ...] = tuple(
    timedelta(seconds=s) for s in (0, 5, 300, 1800, 7200, 18000, 36000, 36000, 86400, 86400)
)


class WebhookRuleError(ValueError):
    """A field that breaks a rule; the message starts with the field's name."""


def new_secret(raw: bytes) -> str:
    """`whsec_` + base64 of 24 to 64 random bytes (the caller draws them)."""
    if not 24 <= len(raw) <= 64:
        raise WebhookRuleError("secret: 24 to 64 bytes")
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`
    keyed with the base64-decoded part of the secret after `whsec_`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets: Sequence[str], msg_id: str, now: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers. Every current secret signs (during
    a rotation the old one is still accepted by receivers that have not yet
    switched), space-separated as the specification says."""
    timestamp = int(now.timestamp())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets),
        "content-type": "application/json",
    }


def parse_schedule(text: str) -> tuple[timedelta, ...]:
    """A schedule such as "0s,5s,5m,30m,2h": the delay before each attempt
    (the first is usually 0). Units s, m, h, d; at least one entry."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    delays: list[timedelta] = []
    for part in text.split(","):
        part = part.strip()
        if len(part) < 2 or part[-1] not in units or not part[:-1].isdigit():
            raise WebhookRuleError(f"schedule: {part!r} is not a number followed by s, m, h or d")
        delays.append(timedelta(seconds=int(part[:-1]) * units[part[-1]]))
    if not delays:
        raise WebhookRuleError("schedule: at least one delay")
    return tuple(delays)


def next_attempt(
    schedule: Sequence[timedelta], attempts_made: int, now: datetime
) -> datetime | None:
    """When attempt number attempts_made + 1 is due, or None when the schedule
    is spent (the delivery has failed for good)."""
    if attempts_made >= len(schedule):
        return None
    return now + schedule[attempts_made]


def should_disable(failing_since: datetime | None, now: datetime, disable_after: timedelta) -> bool:
    """An endpoint that has failed (no 2xx) without a success since
    `failing_since` for longer than `disable_after` is disabled."""
    return failing_since is not None and now - failing_since >= disable_after


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host; returns the host."""
    if not url:
        raise WebhookRuleError("url: required")
    if len(url) > 2048:
        raise WebhookRuleError("url: at most 2048 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError as exc:
        raise WebhookRuleError(f"url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRuleError("url: must start with http:// or https://")
    if not parts.hostname:
        raise WebhookRuleError("url: a host is required")
    if parts.username or parts.password:
        raise WebhookRuleError("url: must not hold credentials")
    return parts.hostname


def check_event_types(types: Sequence[str]) -> list[str]:
    if not types:
        raise WebhookRuleError("event_types: at least one")
    unknown = sorted(set(types) - EVENT_TYPES)
    if unknown:
        raise WebhookRuleError(f"event_types: unknown {unknown}; one of {sorted(EVENT_TYPES)}")
    return sorted(set(types))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allowlist(text: str) -> tuple[Network, ...]:
    """A comma-separated list of CIDRs that deliveries may reach even though
    they are private, such as "127.0.0.0/8,::1/128"."""
    nets: list[Network] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise WebhookRuleError(f"allowlist: {part!r} is not a CIDR") from None
    return tuple(nets)


def address_allowed(address: str, allow: Sequence[Network]) -> bool:
    """False for loopback, link-local, private, multicast, reserved and
    unspecified addresses (and IPv4 mapped into IPv6 of those), unless an
    allowlisted network holds the address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class Policy:
    """What the settings say about deliveries."""

    schedule: tuple[timedelta, ...]
    timeout: timedelta
    disable_after: timedelta
    allow_private: bool
    allowlist: tuple[Network, ...]
    max_in_flight: int

    def allowed(self, address: str) -> bool:
        return self.allow_private or address_allowed(address, self.allowlist)
