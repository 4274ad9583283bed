"""NATS JetStream: connection and idempotent stream set-up."""

from __future__ import annotations

import ssl
from datetime import timedelta
from typing import Any

from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from services.common.logs import get_logger
from services.common.tls import NatsClient

log = get_logger(__name__)

EVENTS_STREAM = "EVENTS"
EVENTS_SUBJECT_PREFIX = "usagebilling.events.v1"
BILLING_STREAM = "BILLING"
BILLING_SUBJECT_PREFIX = "usagebilling.billing.v1"


async def connect(
    url: str,
    name: str,
    *,
    tls: ssl.SSLContext | None = None,
    user: str = "",
    password: str = "",
) -> Any:
    """Connects, retrying without end. With `tls` (services/common/tls.py
    nats_context) the connection is TLS; a tls:// URL requires it. With `user`
    and `password` (USAGEBILLING_NATS_USER/_PASSWORD) the client authenticates
    as that NATS user, whatever credentials the URL holds.

    Replies come to `_INBOX.<name>.>`, so that the server's permissions can
    give each service its own inboxes (no service reads another's replies,
    such as the events a pull consumer is sent)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    client = NatsClient()
    await client.connect(
        url,
        name=name,
        tls=tls,
        user=user or None,
        password=password or None,
        inbox_prefix=inbox_prefix(name),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds; annotated int upstream
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return client


def inbox_prefix(name: str) -> str:
    return f"_INBOX.{name}"


async def ensure_stream(
    js: Any, name: str, subjects: list[str], *, replicas: int, duplicate_window: timedelta
) -> None:
    """Creates the stream, or updates it to this configuration when it exists."""
    config = StreamConfig(
        name=name,
        subjects=subjects,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window.total_seconds(),
    )
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream_created", stream=name, replicas=replicas)
        return
    await js.update_stream(config)


# The streams each service creates (or updates) at start: the one it uses, so
# that its NATS user needs no rights on the other. Meter ensures EVENTS too, so
# that neither of ingest and meter has to start first.
STREAMS_OF: dict[str, tuple[str, ...]] = {
    "ingest": (EVENTS_STREAM,),
    "meter": (EVENTS_STREAM,),
    "billing": (BILLING_STREAM,),
}


# Each stream's subjects and duplicate window.
_STREAM_CONFIG: dict[str, tuple[str, timedelta]] = {
    EVENTS_STREAM: (f"{EVENTS_SUBJECT_PREFIX}.>", timedelta(minutes=10)),
    BILLING_STREAM: (f"{BILLING_SUBJECT_PREFIX}.>", timedelta(hours=1)),
}


async def ensure_streams(
    js: Any, *, replicas: int, names: tuple[str, ...] = (EVENTS_STREAM, BILLING_STREAM)
) -> None:
    for name, (subject, window) in _STREAM_CONFIG.items():
        if name in names:
            await ensure_stream(js, name, [subject], replicas=replicas, duplicate_window=window)
